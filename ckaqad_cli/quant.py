"""Model-level NVFP4 fake quantization: which Linears, fused groups, the fake-quant Linear, the recipe on disk.

Training (distill) and export (pack) read the same QuantRecipe, so the deployed model is the one that was trained:
the same modules, the same fused groups sharing one weight global scale, the same calibrated input amaxes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ckaqad_cli.atomic import atomic_write_json
from ckaqad_cli.errors import CkaqadError
from ckaqad_kernels.fake_quant import fake_quantize_ste
from ckaqad_kernels.nvfp4_ref import global_scale_from_amax
from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE

RECIPE_FILE = "quant_recipe.json"
RECIPE_VERSION = 1
SCHEMES = ("w4a4", "w4a16")

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

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise CkaqadError(f"unknown NVFP4 scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")

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
    if not weights:
        raise ValueError("a fused group needs at least one weight")
    amax = torch.stack([w.detach().abs().amax().to(torch.float32) for w in weights]).amax()
    return global_scale_from_amax(amax)


class _FusedGroup:
    """The NVFP4Linears of one fused group. Weights are read at call time (they train, FSDP swaps tensors)."""

    def __init__(self, members: Sequence[NVFP4Linear]):
        self.members = list(members)

    def global_scale(self) -> torch.Tensor:
        return group_weight_global_scale([m.weight for m in self.members])


class NVFP4Linear(nn.Linear):
    """An nn.Linear whose weight (and, for W4A4, input) is NVFP4 fake-quantized with a straight-through estimator.

    It keeps the wrapped Linear's ``weight`` and ``bias`` Parameters, so state_dict names do not change. The weight
    uses its fused group's shared global scale; the input a dynamic per-tensor one, or ``input_amax`` once
    calibrated (a non-persistent buffer: it lives in the recipe, not the state dict).
    """

    def __init__(self, linear: nn.Linear, *, quantize_input: bool, quantize_weight: bool = True):
        nn.Module.__init__(self)
        if linear.in_features % BLOCK_SIZE:
            raise ValueError(f"NVFP4Linear needs in_features divisible by {BLOCK_SIZE}, got {linear.in_features}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.quantize_weight = quantize_weight
        self.quantize_input = quantize_input
        self.register_buffer("input_amax", None, persistent=False)
        self.fused_group: _FusedGroup | None = None

    def weight_global_scale(self) -> torch.Tensor:
        if self.fused_group is not None:
            return self.fused_group.global_scale()
        return group_weight_global_scale([self.weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.quantize_weight:
            weight = fake_quantize_ste(weight, self.weight_global_scale())
        if self.quantize_input:
            g_in = None if self.input_amax is None else global_scale_from_amax(self.input_amax)
            x = fake_quantize_ste(x, g_in)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"weight={'nvfp4' if self.quantize_weight else 'off'}"]
        if self.quantize_input:
            parts.append("input=nvfp4 " + ("dynamic" if self.input_amax is None else "static"))
        return ", ".join(parts)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _wrap(model: nn.Module, names: Sequence[str], groups: Sequence[Sequence[str]], scheme: str) -> None:
    wrapped: dict[str, NVFP4Linear] = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped[name] = NVFP4Linear(getattr(parent, leaf), quantize_input=scheme == "w4a4")
        setattr(parent, leaf, wrapped[name])
    for group in groups:
        shared = _FusedGroup([wrapped[n] for n in group])
        for member in shared.members:
            member.fused_group = shared


def apply_fake_quant(model: nn.Module, scheme: str = "w4a4", exclude: Iterable[str] = ()) -> QuantRecipe:
    """Wrap every nn.Linear not excluded (DEFAULT_EXCLUDE plus ``exclude``) in an NVFP4Linear, in place.

    Linears whose in_features is not a multiple of 16 stay as they are and are listed in ``recipe.skipped``, as are
    excluded ones and fused 3-D MoE expert tensors (not nn.Linear, so not wrapped).
    """
    recipe = QuantRecipe(scheme=scheme, exclude=[*DEFAULT_EXCLUDE, *exclude])
    for name, module in model.named_modules():
        if isinstance(module, NVFP4Linear):
            raise CkaqadError(f"{name} is already fake-quantized; apply_fake_quant runs once per model")
        if isinstance(module, nn.Linear):
            pattern = _matches(name, recipe.exclude)
            if pattern is not None:
                recipe.skipped[name] = f"excluded by {pattern!r}"
            elif module.in_features % BLOCK_SIZE:
                recipe.skipped[name] = f"in_features {module.in_features} is not a multiple of {BLOCK_SIZE}"
            else:
                recipe.quantized.append(name)
        elif any(p.ndim == 3 for p in module.parameters(recurse=False)) and not _matches(name, recipe.exclude):
            recipe.skipped[name] = "fused 3-D MoE expert weights are not nn.Linear; left unquantized"
    recipe.fused_groups = fused_groups(recipe.quantized)
    _wrap(model, recipe.quantized, recipe.fused_groups, scheme)
    return recipe


def apply_recipe(model: nn.Module, recipe: QuantRecipe) -> None:
    """Re-apply a saved recipe: the same modules, fused groups and calibrated input amaxes."""
    for name in recipe.quantized:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CkaqadError(f"the quantization recipe names {name}, which this model does not have") from None
        if not isinstance(module, nn.Linear) or isinstance(module, NVFP4Linear) or module.in_features % BLOCK_SIZE:
            raise CkaqadError(f"the quantization recipe names {name}, which is not a quantizable nn.Linear here")
    listed = set(recipe.quantized)
    for group in recipe.fused_groups:
        if not set(group) <= listed:
            raise CkaqadError(f"fused group {group} of the quantization recipe has unquantized members")
    _wrap(model, recipe.quantized, recipe.fused_groups, recipe.scheme)
    set_input_amax(model, recipe.input_amax)


def set_input_amax(model: nn.Module, input_amax: dict[str, float]) -> None:
    """Switch the named NVFP4Linears to a static input global scale from a calibrated amax."""
    for name, amax in input_amax.items():
        module = model.get_submodule(name)
        if not isinstance(module, NVFP4Linear):
            raise CkaqadError(f"{name} is not fake-quantized, so it takes no input amax")
        value = torch.tensor(float(amax), dtype=torch.float32, device=module.weight.device)
        if not bool(torch.isfinite(value)) or value < 0:
            raise CkaqadError(f"input amax {amax} of {name} is not a finite non-negative number")
        module.input_amax = value


@contextlib.contextmanager
def record_input_amax(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block, collect the largest |input| each NVFP4Linear sees: {module name: amax}, for calibration."""
    amax: dict[str, float] = {}
    handles = []

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen = float(args[0].detach().abs().amax())
            amax[name] = max(amax.get(name, seen), seen)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, NVFP4Linear):
            handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        yield amax
    finally:
        for handle in handles:
            handle.remove()
