"""Model-level NVFP4 fake quantization: which Linears, fused groups, the fake-quant Linear, the recipe on disk.

Training (distill) and export (pack) read the same QuantRecipe, so the deployed model is the one that was trained:
the same modules, the same fused groups sharing one weight global scale, the same calibrated input amaxes.
Fused MoE experts (3-D expert weights) are fake-quantized per expert by :mod:`ckaqad_cli.quant_moe`.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ckaqad_cli.atomic import atomic_write_json
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.quant_fp8 import AdoptingLinear, FP8Linear
from ckaqad_cli.quant_moe import (
    NVFP4Experts,
    expert_module_names,
    expert_of,
    fused_experts_problem,
    is_fused_experts,
    num_experts,
    weight_scale_rule,
    wrap_experts,
)
from ckaqad_cli.settings import check_scheme
from ckaqad_kernels import nvfp4_spec
from ckaqad_kernels.fake_quant import fake_quantize_ste
from ckaqad_kernels.nvfp4_ref import global_scale_from_amax, tensor_amax
from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE, DEFAULT_ACTIVATION_ARITHMETIC, DEFAULT_SCALE_RULE

RECIPE_FILE = "quant_recipe.json"
RECIPE_VERSION = 1


def check_scale_rule(rule: str, option: str = "--scale-rule") -> None:
    """One line naming the option for a scale rule that is not one of nvfp4_spec.SCALE_RULES."""
    if rule not in nvfp4_spec.SCALE_RULES:
        raise CkaqadError(f"{option} must be one of {', '.join(nvfp4_spec.SCALE_RULES)}, not {rule!r}")


def check_activation_arithmetic(arithmetic: str, option: str = "--activation-arithmetic") -> None:
    """One line naming the option for an activation arithmetic not in nvfp4_spec.ACTIVATION_ARITHMETICS."""
    if arithmetic not in nvfp4_spec.ACTIVATION_ARITHMETICS:
        raise CkaqadError(
            f"{option} must be one of {', '.join(nvfp4_spec.ACTIVATION_ARITHMETICS)}, not {arithmetic!r}"
        )

DEFAULT_EXCLUDE: tuple[str, ...] = (
    "lm_head",
    "*.lm_head",
    "*embed_tokens*",
    "*embed_out*",
    "*wte",
    "*norm*",
    "*.gate",  # MoE router gates (Qwen-MoE mlp.gate, Mixtral block_sparse_moe.gate)
    "*router*",
    "*shared_expert_gate*",
    "score",
    "*.score",
)
"""fnmatch globs over module names left unquantized: output head, embeddings, norms, MoE routers, score heads."""

_FUSED_LEAVES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("wq", "wk", "wv"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),  # Mixtral / Llama-native gate and up, also per MoE expert
)
"""Sibling projections that engines run as one fused GEMM: they must share one weight global scale."""


@dataclass
class QuantRecipe:
    """What was fake-quantized and how; saved beside a student (RECIPE_FILE) and read by pack."""

    scheme: str = "w4a4"
    exclude: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fused_groups: list[list[str]] = field(default_factory=list)
    input_amax: dict[str, float] = field(default_factory=dict)
    """Calibrated static input amax per module (w4a4); a module not listed quantizes its input dynamically."""
    scale_rule: str = DEFAULT_SCALE_RULE
    """How weight block scales are chosen (nvfp4_spec.SCALE_RULES); mse-act reads
    quant_calibration.SECOND_MOMENTS_FILE beside the recipe. Recipes written before this field existed read as
    "amax"."""
    activation_arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC
    """How W4A4 inputs are fake-quantized (nvfp4_spec.ACTIVATION_ARITHMETICS): "divide" or the engines'
    "reciprocal"."""
    fp8: list[str] = field(default_factory=list)
    """Linears in FP8 (docs/fp8.md) instead of NVFP4: W8A8 in a w4a4 recipe, W8A16 in a w4a16 one; ``fp8_globs``
    chose them. Not in ``quantized`` (the NVFP4 modules)."""
    fp8_globs: list[str] = field(default_factory=list)
    """The fnmatch globs (``--fp8``) that put Linears in FP8; an excluded Linear stays unquantized."""

    def __post_init__(self) -> None:
        check_scheme(self.scheme, "scheme")
        check_scale_rule(self.scale_rule, "scale_rule")
        check_activation_arithmetic(self.activation_arithmetic, "activation_arithmetic")

    def save(self, directory: str | Path) -> Path:
        payload = {"version": RECIPE_VERSION, "block_size": BLOCK_SIZE, **asdict(self)}
        return atomic_write_json(Path(directory) / RECIPE_FILE, payload)

    @classmethod
    def load(cls, directory: str | Path) -> QuantRecipe:
        path = Path(directory) / RECIPE_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CkaqadError(f"no {RECIPE_FILE} in {directory}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise CkaqadError(f"cannot read {path}: {e}") from None
        if data.pop("version", None) != RECIPE_VERSION or data.pop("block_size", None) != BLOCK_SIZE:
            raise CkaqadError(f"{path} is not a version-{RECIPE_VERSION} NVFP4 recipe with blocks of {BLOCK_SIZE}")
        try:
            return cls(**data)
        except TypeError as e:
            raise CkaqadError(f"{path} is malformed: {e}") from None


def _split_name(name: str) -> tuple[str, str]:
    """'a.b.q_proj' or 'a.b.q_proj.weight' -> ('a.b', 'q_proj')."""
    parts = name.split(".")
    if parts[-1] == "weight" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts[:-1]), parts[-1]


def fused_groups(module_names: Iterable[str]) -> list[list[str]]:
    """Group q/k/v of one attention, gate/up of one MLP and each MoE expert's w1/w3; plain names, no model needed.

    Names may end in ".weight" (safetensors keys); they come back as given. Groups of one are left out.
    """
    found: dict[tuple[str, int], dict[str, str]] = {}
    for name in module_names:
        parent, leaf = _split_name(name)
        for kind, leaves in enumerate(_FUSED_LEAVES):
            if leaf in leaves:
                found.setdefault((parent, kind), {})[leaf] = name
    groups = []
    for (_, kind), members in found.items():
        if len(members) > 1:
            groups.append([members[leaf] for leaf in _FUSED_LEAVES[kind] if leaf in members])
    return groups


def group_weight_global_scale(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float32 0-d global scale shared by a fused group: from the largest amax among its weights."""
    return group_global_scale_from_amaxes([tensor_amax(w) for w in weights])


def group_global_scale_from_amaxes(amaxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """group_weight_global_scale from the weights' amaxes (``tensor_amax``), for a caller that already has them."""
    if not amaxes:
        raise ValueError("a fused group needs at least one weight")
    return global_scale_from_amax(torch.stack(list(amaxes)).amax())


class _FusedGroup:
    """The NVFP4Linears of one fused group. Weights are read at call time (they train, FSDP swaps tensors).

    Members that are called on the same input (q/k/v, gate/up) and quantize it dynamically in the same arithmetic
    share one quantized copy of it: the first member to see an input quantizes it, the others take that copy (the
    same values, computed once; the gradient passes straight through either way). The copy is dropped once every
    member has taken it, or when a member is called on another input.
    """

    def __init__(self, members: Sequence[NVFP4Linear]):
        self.members = list(members)
        self._shared: tuple[torch.Tensor, int, bool, torch.Tensor, list[NVFP4Linear]] | None = None
        """(input, its version counter, whether gradients were on, its quantized copy, the members yet to take it)"""

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shared": None}  # a copy (copy.deepcopy of the model) starts with nothing shared

    def global_scale(self) -> torch.Tensor:
        return group_weight_global_scale([m.weight for m in self.members])

    def shares_input(self) -> bool:
        """Whether the members quantize their inputs alike: all dynamic, in one arithmetic."""
        first = self.members[0]
        return all(m.quantize_input and m.input_amax is None and m.activation_arithmetic == first.activation_arithmetic
                   for m in self.members)

    def quantized_input(self, member: NVFP4Linear, x: torch.Tensor) -> torch.Tensor:
        """``member``'s quantized input: the group's copy when ``x`` is the input it was made from, else made now."""
        shared, grad = self._shared, torch.is_grad_enabled()
        if shared is not None and shared[0] is x and shared[1:3] == (x._version, grad) and member in shared[4]:
            shared[4].remove(member)
            if not shared[4]:
                self._shared = None
            return shared[3]
        quantized = fake_quantize_ste(x, None, arithmetic=member.activation_arithmetic)
        self._shared = (x, x._version, grad, quantized, [m for m in self.members if m is not member])
        return quantized


class NVFP4Linear(AdoptingLinear):
    """An nn.Linear whose weight (and, for W4A4, input) is NVFP4 fake-quantized with a straight-through estimator.

    The weight uses its fused group's shared global scale; the input a dynamic per-tensor one, or ``input_amax`` once
    calibrated (a non-persistent buffer: it lives in the recipe, not the state dict).
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        quantize_input: bool,
        quantize_weight: bool = True,
        scale_rule: str = DEFAULT_SCALE_RULE,
        activation_arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
    ):
        if linear.in_features % BLOCK_SIZE:
            raise ValueError(f"NVFP4Linear needs in_features divisible by {BLOCK_SIZE}, got {linear.in_features}")
        super().__init__(linear)
        self.quantize_weight = quantize_weight
        self.quantize_input = quantize_input
        self.register_buffer("input_amax", None, persistent=False)
        self.scale_rule = scale_rule
        self.register_buffer("channel_weights", None, persistent=False)
        """E[x^2] per input channel for the mse-act scale rule (quant_calibration.SECOND_MOMENTS_FILE)."""
        self.activation_arithmetic = activation_arithmetic
        self.calibrating = False
        """Set by quant_calibration.record_inputs: an mse-act weight without its channel weights yet is quantized
        with mse meanwhile."""
        self.fused_group: _FusedGroup | None = None

    def weight_global_scale(self) -> torch.Tensor:
        if self.fused_group is not None:
            return self.fused_group.global_scale()
        return group_weight_global_scale([self.weight])

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (straight-through gradient), with the module's scale rule."""
        rule, weights = weight_scale_rule(self.scale_rule, self.channel_weights, self.calibrating)
        return fake_quantize_ste(self.weight, self.weight_global_scale(), scale_rule=rule, channel_weights=weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight() if self.quantize_weight else self.weight
        if self.quantize_input and self.fused_group is not None and self.fused_group.shares_input():
            x = self.fused_group.quantized_input(self, x)
        elif self.quantize_input:
            g_in = None if self.input_amax is None else global_scale_from_amax(self.input_amax)
            x = fake_quantize_ste(x, g_in, arithmetic=self.activation_arithmetic)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"weight={'nvfp4 ' + self.scale_rule if self.quantize_weight else 'off'}"]
        if self.quantize_input:
            parts.append("input=nvfp4 " + ("dynamic" if self.input_amax is None else "static"))
        return ", ".join(parts)


@torch.no_grad()
def freeze_quantized_weights(model: nn.Module) -> None:
    """Store each fake-quantized weight's quantized values in its Parameter and stop quantizing it again.

    In the weights' dtype the model then computes exactly as before. In float32 the stored values are exactly what a
    packed checkpoint decodes from; copied into a model of another dtype, each is rounded once, as the checkpoint
    decodes into that dtype (pack's verify of a student deployed in another dtype).
    """
    linears = [m for m in model.modules() if isinstance(m, (NVFP4Linear, FP8Linear)) and m.quantize_weight]
    experts = [m for m in model.modules() if isinstance(m, NVFP4Experts) and m.quantize_weight]
    # every value first: a fused group's global scale reads its members' weights
    values = [(m.weight, m.quantized_weight()) for m in linears]
    values += [(m._parameters[p], getattr(m, p)) for m in experts for p in ("gate_up_proj", "down_proj")]
    for parameter, quantized in values:
        parameter.copy_(quantized)
    stop_weight_quantization(model)


def stop_weight_quantization(model: nn.Module) -> None:
    """Leave the weights of every fake-quantized module as they are (they already hold quantized values); input
    quantization is untouched."""
    for module in model.modules():
        if isinstance(module, (NVFP4Linear, NVFP4Experts, FP8Linear)):
            module.quantize_weight = False


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _wrap(
    model: nn.Module,
    names: Sequence[str],
    groups: Sequence[Sequence[str]],
    scheme: str,
    scale_rule: str,
    activation_arithmetic: str,
    fp8: Sequence[str] = (),
) -> None:
    """Wrap the named Linears and, for per-expert names (``M.E.gate_proj``...), their fused experts module ``M``, in
    NVFP4; the Linears named in ``fp8`` in FP8."""
    for name in fp8:
        FP8Linear.swap_in(model, name, quantize_input=scheme == "w4a4")
    experts = {e for n in names if (e := expert_of(n)) is not None and is_fused_experts(model, e)}
    for name in sorted(experts):
        wrap_experts(model.get_submodule(name), scheme, scale_rule, activation_arithmetic)
    groups = [g for g in groups if not any(expert_of(n) in experts for n in g)]
    names = [n for n in names if expert_of(n) not in experts]
    wrapped: dict[str, NVFP4Linear] = {}
    for name in names:
        wrapped[name] = NVFP4Linear(model.get_submodule(name), quantize_input=scheme == "w4a4", scale_rule=scale_rule,
                                    activation_arithmetic=activation_arithmetic)
        model.set_submodule(name, wrapped[name])
    for group in groups:
        shared = _FusedGroup([wrapped[n] for n in group])
        for member in shared.members:
            member.fused_group = shared


def _select_linear(recipe: QuantRecipe, name: str, in_features: int) -> None:
    """Add one Linear to the recipe: NVFP4, FP8 (an ``fp8_globs`` match), or skipped with why (an exclusion, or a
    width NVFP4 blocks cannot tile)."""
    pattern = _matches(name, recipe.exclude)
    if pattern is not None:
        recipe.skipped[name] = f"excluded by {pattern!r}"
    elif _matches(name, recipe.fp8_globs) is not None:
        recipe.fp8.append(name)
    elif in_features % BLOCK_SIZE:
        recipe.skipped[name] = f"in_features {in_features} is not a multiple of {BLOCK_SIZE}"
    else:
        recipe.quantized.append(name)


def _group_recipe(recipe: QuantRecipe) -> None:
    """Set the recipe's fused groups, refusing a recipe that quantizes nothing or only part of a fused group.

    Engines run q/k/v and gate/up as one GEMM over their concatenated weights: vLLM refuses a checkpoint whose fused
    group is partly quantized, so an exclusion must take the whole group or none of it.
    """
    if not recipe.quantized and not recipe.fp8:
        raise CkaqadError(f"nothing to quantize: every Linear is excluded or too narrow ({len(recipe.skipped)} skipped)")
    fp8 = set(recipe.fp8)
    for group in fused_groups([*recipe.quantized, *recipe.skipped, *recipe.fp8]):
        leaves = [_split_name(n)[1] for n in group]
        kept = [n for n in group if n in recipe.skipped]
        if kept and len(kept) < len(group):
            quantized = [n for n in group if n not in recipe.skipped]
            raise CkaqadError(
                f"{kept[0]} is {recipe.skipped[kept[0]]} but {', '.join(quantized)} of its fused group would be "
                f"quantized: engines run {' / '.join(leaves)} as one GEMM and need them all quantized or all kept; "
                f"exclude {' and '.join(repr('*.' + leaf) for leaf in leaves)} together, or none of them"
            )
        in_fp8 = [n for n in group if n in fp8]
        if in_fp8 and len(in_fp8) < len(group):
            raise CkaqadError(
                f"{in_fp8[0]} would be FP8 but {', '.join(n for n in group if n not in fp8)} of its fused group "
                f"NVFP4: engines run {' / '.join(leaves)} as one GEMM in one format; give --fp8 "
                f"{' and '.join(repr('*.' + leaf) for leaf in leaves)} together, or none of them"
            )
    recipe.fused_groups = fused_groups(recipe.quantized)


def recipe_for_linears(
    linears: Iterable[tuple[str, int]],
    scheme: str = "w4a4",
    exclude: Iterable[str] = (),
    scale_rule: str = DEFAULT_SCALE_RULE,
    activation_arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
    fp8: Iterable[str] = (),
) -> QuantRecipe:
    """The recipe apply_fake_quant would make for a model whose only quantizable modules are these
    (name, in_features) Linears, in module order: for pack, which knows some layouts without building the model."""
    recipe = QuantRecipe(scheme=scheme, exclude=[*DEFAULT_EXCLUDE, *exclude], scale_rule=scale_rule,
                         activation_arithmetic=activation_arithmetic, fp8_globs=list(fp8))
    for name, in_features in linears:
        _select_linear(recipe, name, in_features)
    _group_recipe(recipe)
    return recipe


def apply_fake_quant(
    model: nn.Module,
    scheme: str = "w4a4",
    exclude: Iterable[str] = (),
    scale_rule: str = DEFAULT_SCALE_RULE,
    activation_arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
    fp8: Iterable[str] = (),
) -> QuantRecipe:
    """Wrap every nn.Linear not excluded (DEFAULT_EXCLUDE plus ``exclude``) in an NVFP4Linear, and fake-quantize
    every fused MoE experts module per expert (NVFP4Experts), in place.

    The recipe names fused experts by their per-expert checkpoint Linears (``M.E.gate_proj``, ``M.E.up_proj``,
    ``M.E.down_proj``; gate/up of each expert one fused group), so pack packs exactly what was trained. Linears whose
    in_features is not a multiple of 16 stay as they are and are listed in ``recipe.skipped``, as are excluded
    modules and fused experts in a layout fused_experts_problem refuses. ``scale_rule`` (weights) and
    ``activation_arithmetic`` (W4A4 inputs) are recorded in the recipe; an mse-act model needs set_channel_weights
    (after calibrating with quant_calibration.record_inputs) before it runs outside calibration. Linears matching an
    ``fp8`` glob (and no exclusion) are FP8Linears instead (``recipe.fp8``); fused experts take no FP8.
    """
    recipe = QuantRecipe(scheme=scheme, exclude=[*DEFAULT_EXCLUDE, *exclude], scale_rule=scale_rule,
                         activation_arithmetic=activation_arithmetic, fp8_globs=list(fp8))
    for name, module in model.named_modules():
        if isinstance(module, (NVFP4Linear, NVFP4Experts, FP8Linear)):
            raise CkaqadError(f"{name} is already fake-quantized; apply_fake_quant runs once per model")
        if isinstance(module, nn.Linear):
            _select_linear(recipe, name, module.in_features)
        elif any(p.ndim == 3 for p in module.parameters(recurse=False)):
            pattern = _matches(name, recipe.exclude)
            problem = f"excluded by {pattern!r}" if pattern is not None else fused_experts_problem(module)
            if problem is None and _matches(name, recipe.fp8_globs) is not None:
                problem = "FP8 is for Linear modules; fused experts are NVFP4 or kept"
                raise CkaqadError(f"{name} matches --fp8 {_matches(name, recipe.fp8_globs)!r}: {problem}")
            if problem is not None:
                recipe.skipped[name] = problem
            else:
                recipe.quantized += expert_module_names(name, num_experts(module))
    _group_recipe(recipe)
    _wrap(model, recipe.quantized, recipe.fused_groups, scheme, scale_rule, activation_arithmetic, recipe.fp8)
    return recipe


def apply_recipe(
    model: nn.Module, recipe: QuantRecipe, second_moments: dict[str, torch.Tensor] | None = None
) -> None:
    """Re-apply a saved recipe: the same modules, fused groups, scale rule and calibrated input amaxes; for the
    mse-act rule, the channel weights from ``second_moments`` (quant_calibration.load_second_moments) when given."""
    listed = set(recipe.quantized)
    experts: set[str] = set()
    for name in recipe.quantized:
        experts_name = expert_of(name)
        if experts_name is not None and is_fused_experts(model, experts_name):
            experts.add(experts_name)
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CkaqadError(f"the quantization recipe names {name}, which this model does not have") from None
        if not isinstance(module, nn.Linear) or isinstance(module, (NVFP4Linear, FP8Linear)) or (
                module.in_features % BLOCK_SIZE):
            raise CkaqadError(f"the quantization recipe names {name}, which is not a quantizable nn.Linear here")
    for name in recipe.fp8:
        module = _submodule_or_none(model, name)
        if not isinstance(module, nn.Linear) or isinstance(module, (NVFP4Linear, FP8Linear)) or name in listed:
            raise CkaqadError(f"the quantization recipe puts {name} in FP8, which is not an nn.Linear of its own here")
    grouped = {tuple(g) for g in recipe.fused_groups}
    for name in sorted(experts):
        module = model.get_submodule(name)
        if isinstance(module, NVFP4Experts):
            raise CkaqadError(f"{name} is already fake-quantized; a recipe is applied once per model")
        members = expert_module_names(name, num_experts(module))
        if not set(members) <= listed:
            raise CkaqadError(f"the quantization recipe quantizes only some experts of {name}; it takes all or none")
        for gate in members[0::3]:
            if (gate, gate.replace(".gate_proj", ".up_proj")) not in grouped:
                raise CkaqadError(f"the quantization recipe does not fuse {gate} with its up_proj (one global scale)")
    for group in recipe.fused_groups:
        if not set(group) <= listed:
            raise CkaqadError(f"fused group {group} of the quantization recipe has unquantized members")
    _wrap(model, recipe.quantized, recipe.fused_groups, recipe.scheme, recipe.scale_rule,
          recipe.activation_arithmetic, recipe.fp8)
    set_input_amax(model, recipe.input_amax)
    if second_moments is not None:
        set_channel_weights(model, second_moments)


def _amax_tensor(name: str, amax: float, device: torch.device) -> torch.Tensor:
    value = torch.tensor(float(amax), dtype=torch.float32, device=device)
    if not bool(torch.isfinite(value)) or value < 0:
        raise CkaqadError(f"input amax {amax} of {name} is not a finite non-negative number")
    return value


def set_input_amax(model: nn.Module, input_amax: dict[str, float]) -> None:
    """Switch the named NVFP4Linears, and the fused experts of per-expert names, to a static input global scale
    from a calibrated amax. The experts of one module share one input scale per projection, so their amaxes must
    be equal (as record_input_amax records them)."""
    shared: dict[tuple[str, str], set[float]] = {}
    for name, amax in input_amax.items():
        experts_name = expert_of(name)
        if experts_name is not None and isinstance(_submodule_or_none(model, experts_name), NVFP4Experts):
            attr = "down_input_amax" if name.endswith(".down_proj") else "input_amax"
            shared.setdefault((experts_name, attr), set()).add(float(amax))
            continue
        module = model.get_submodule(name)
        if not isinstance(module, NVFP4Linear):
            raise CkaqadError(f"{name} is not fake-quantized, so it takes no input amax")
        module.input_amax = _amax_tensor(name, amax, module.weight.device)
    for (experts_name, attr), values in shared.items():
        if len(values) > 1:
            raise CkaqadError(
                f"the experts of {experts_name} share one input scale per projection, but their input amaxes for "
                f"{attr} differ ({min(values):.4g} to {max(values):.4g})"
            )
        module = model.get_submodule(experts_name)
        setattr(module, attr, _amax_tensor(experts_name, values.pop(), module._parameters["down_proj"].device))


def _submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def set_channel_weights(model: nn.Module, second_moments: dict[str, torch.Tensor]) -> None:
    """Give every mse-act NVFP4Linear and fused experts module its channel weights (E[x^2] per input channel) from
    ``second_moments`` (quant_calibration's InputRecord.second_moments or load_second_moments). A module without
    an entry is an error."""
    for name, module in model.named_modules():
        if isinstance(module, NVFP4Linear) and module.scale_rule == "mse-act":
            module.channel_weights = _channel_weights(second_moments, name, module.in_features, module.weight.device)
        elif isinstance(module, NVFP4Experts) and module.scale_rule == "mse-act":
            members = expert_module_names(name, num_experts(module))
            device = module._parameters["down_proj"].device
            hidden, inter = module._parameters["gate_up_proj"].shape[-1], module._parameters["down_proj"].shape[-1]
            module.gate_up_channel_weights = torch.stack(
                [_channel_weights(second_moments, m, hidden, device) for m in members[0::3]])
            module.down_channel_weights = torch.stack(
                [_channel_weights(second_moments, m, inter, device) for m in members[2::3]])


def _channel_weights(moments: dict[str, torch.Tensor], name: str, width: int, device: torch.device) -> torch.Tensor:
    if name not in moments:
        raise CkaqadError(f"no input second moments for {name}: the mse-act scale rule needs them for every module")
    w = moments[name].detach().to(device=device, dtype=torch.float32)
    if w.shape != (width,) or not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise CkaqadError(f"the input second moments of {name} are not {width} finite non-negative numbers")
    return w
