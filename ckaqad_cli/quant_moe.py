"""NVFP4 fake quantization of fused MoE experts: the 3-D ``gate_up_proj`` / ``down_proj`` weights of a transformers
experts module quantized expert by expert (:class:`NVFP4Experts`), and the per-expert checkpoint names
(``M.E.gate_proj``, ``M.E.up_proj``, ``M.E.down_proj``) that recipes and packed checkpoints use for them.

:mod:`ckaqad_cli.quant` selects and wraps the modules of a model; this module knows the experts' layout.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ckaqad_cli.errors import CkaqadError
from ckaqad_kernels.fake_quant import fake_quantize_ste
from ckaqad_kernels.nvfp4_ref import global_scale_from_amax
from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE, DEFAULT_ACTIVATION_ARITHMETIC, DEFAULT_SCALE_RULE

EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj")
"""Per-expert checkpoint Linears of a fused experts module ``M``: ``M.E.gate_proj`` and ``M.E.up_proj`` are the
two halves of ``M.gate_up_proj[E]`` [2I, H], ``M.E.down_proj`` is ``M.down_proj[E]`` [H, I] (the Qwen2/Qwen3-MoE,
DeepSeek, OLMoE layout transformers converts on load)."""

_EXPERT_NAME = re.compile(r"^(?P<experts>.+)\.(?P<index>\d+)\.(?P<leaf>gate_proj|up_proj|down_proj)$")


def fused_experts_problem(module: nn.Module) -> str | None:
    """Why ``module`` (which holds 3-D parameters) cannot be fake-quantized as fused experts; None when it can."""
    gate_up, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    if not all(isinstance(p, torch.Tensor) and p.ndim == 3 for p in (gate_up, down)):
        return "fused 3-D MoE expert weights without gate_up_proj/down_proj; left unquantized"
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        return "fused MoE experts in a transposed or interleaved layout are not supported; left unquantized"
    if not hasattr(module, "_apply_gate") or not getattr(module, "has_gate", False):
        return "fused MoE experts without transformers' experts interface (_apply_gate); left unquantized"
    hidden, inter = gate_up.shape[-1], down.shape[-1]
    if hidden % BLOCK_SIZE or inter % BLOCK_SIZE:
        return f"expert in_features {hidden}/{inter} are not multiples of {BLOCK_SIZE}"
    return None


def expert_module_names(experts_name: str, num_experts: int) -> list[str]:
    """The per-expert checkpoint Linears of a fused experts module, expert by expert."""
    return [f"{experts_name}.{e}.{leaf}" for e in range(num_experts) for leaf in EXPERT_LEAVES]


def weight_scale_rule(
    scale_rule: str, channel_weights: torch.Tensor | None, calibrating: bool
) -> tuple[str, torch.Tensor | None]:
    """(rule, channel weights) a module quantizes its weight with: mse-act needs the calibrated channel weights, and
    while calibration records them (``calibrating``) a module without them yet uses mse."""
    if scale_rule != "mse-act":
        return scale_rule, None
    if channel_weights is not None:
        return scale_rule, channel_weights
    if not calibrating:
        raise CkaqadError("the mse-act scale rule needs the calibration inputs' second moments: calibrate "
                          "(quant_calibration.record_inputs) and set_channel_weights before the forward")
    return "mse", None


def _per_expert_fake_quant(
    weight: torch.Tensor, scale_rule: str = DEFAULT_SCALE_RULE, channel_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize a fused [E, out, in] weight expert by expert: blocks along ``in``, one global scale per expert
    from the expert's whole slice (for gate_up_proj: gate and up together, one fused group, as pack does it), the
    scale rule's block scales (mse-act: channel_weights [E, in], each expert's inputs' E[x^2])."""
    amax = weight.detach().abs().amax(dim=(1, 2)).to(torch.float32)
    return torch.stack([
        fake_quantize_ste(weight[e], global_scale_from_amax(amax[e]), scale_rule=scale_rule,
                          channel_weights=None if channel_weights is None else channel_weights[e])
        for e in range(weight.shape[0])
    ])


def _is_sharded(weight: torch.Tensor) -> bool:
    """A DTensor parameter is FSDP2's sharded storage, read by FSDP itself between forwards (its getattr of the
    parameter); in the forward FSDP2 puts the whole unsharded tensor in its place, which is what gets quantized."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)


class NVFP4Experts(nn.Module):
    """Mixin for a fused experts module (3-D ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) whose expert
    weights, and for W4A4 inputs, are NVFP4 fake-quantized expert by expert, bit-identical to pack's per-expert
    tensors. ``apply_fake_quant`` swaps a module's class for a subclass of its own class and this one, so the
    Parameters, their state_dict names and the transformers forward (any experts implementation that calls
    ``_apply_gate``: grouped_mm, batched_mm) stay as they are; reading ``gate_up_proj`` / ``down_proj`` returns the
    fake-quantized tensors, with a straight-through gradient into the Parameters.

    The inputs of all experts of one module share one global scale per projection (``input_amax`` for gate/up,
    ``down_input_amax`` for down; dynamic when None): the token rows are quantized once before the routing split,
    which is the same as quantizing each expert's rows with that shared scale.
    """

    quantize_weight: bool
    quantize_input: bool
    input_amax: torch.Tensor | None
    down_input_amax: torch.Tensor | None
    gate_up_channel_weights: torch.Tensor | None
    down_channel_weights: torch.Tensor | None
    input_observer: Any

    def _init_fake_quant(self, *, quantize_input: bool, scale_rule: str, activation_arithmetic: str) -> None:
        self.quantize_weight = True
        self.quantize_input = quantize_input
        self.scale_rule = scale_rule
        self.activation_arithmetic = activation_arithmetic
        self.calibrating = False
        """Set during calibration: mse-act weights without channel weights yet are quantized with mse meanwhile."""
        self.register_buffer("input_amax", None, persistent=False)
        self.register_buffer("down_input_amax", None, persistent=False)
        self.register_buffer("gate_up_channel_weights", None, persistent=False)  # [E, H], mse-act
        self.register_buffer("down_channel_weights", None, persistent=False)  # [E, I], mse-act
        self.input_observer = None
        """Called as observer(projection, tensor) with each unquantized input ("gate_up" / "down"): calibration."""
        self._gate_applied = False

    def _quantized(self, name: str, channel_weights: torch.Tensor | None) -> torch.Tensor:
        weight = self._parameters[name]
        if not self.quantize_weight or _is_sharded(weight):
            return weight
        return _per_expert_fake_quant(weight, *weight_scale_rule(self.scale_rule, channel_weights, self.calibrating))

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self._quantized("gate_up_proj", self.gate_up_channel_weights)

    @property
    def down_proj(self) -> torch.Tensor:
        return self._quantized("down_proj", self.down_channel_weights)

    def _quantize_input(self, projection: str, x: torch.Tensor, amax: torch.Tensor | None) -> torch.Tensor:
        if self.input_observer is not None:
            self.input_observer(projection, x)
        if not self.quantize_input:
            return x
        g = None if amax is None else global_scale_from_amax(amax)
        return fake_quantize_ste(x, g, arithmetic=self.activation_arithmetic)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        self._gate_applied = True
        return self._quantize_input("down", super()._apply_gate(gate_up_out), self.down_input_amax)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._gate_applied = False
        out = super().forward(self._quantize_input("gate_up", hidden_states, self.input_amax), *args, **kwargs)
        if (self.quantize_input or self.input_observer is not None) and not self._gate_applied:
            impl = getattr(getattr(self, "config", None), "_experts_implementation", None)
            raise CkaqadError(
                f"NVFP4 input quantization of fused MoE experts needs an experts implementation that calls "
                f"_apply_gate (grouped_mm or batched_mm), not {impl!r}: load the model with "
                f"experts_implementation='grouped_mm'"
            )
        return out

    def extra_repr(self) -> str:
        parts = [f"weight={'nvfp4 per expert ' + self.scale_rule if self.quantize_weight else 'off'}"]
        if self.quantize_input:
            parts.append("input=nvfp4 " + ("dynamic" if self.input_amax is None else "static"))
        return ", ".join(parts)


_EXPERTS_CLASSES: dict[type, type] = {}


def wrap_experts(
    module: nn.Module,
    scheme: str,
    scale_rule: str = DEFAULT_SCALE_RULE,
    activation_arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
) -> None:
    cls = type(module)
    if cls not in _EXPERTS_CLASSES:
        _EXPERTS_CLASSES[cls] = type(f"NVFP4{cls.__name__}", (NVFP4Experts, cls), {})
    module.__class__ = _EXPERTS_CLASSES[cls]
    module._init_fake_quant(quantize_input=scheme == "w4a4", scale_rule=scale_rule,
                            activation_arithmetic=activation_arithmetic)


def num_experts(module: nn.Module) -> int:
    return int(module._parameters["gate_up_proj"].shape[0])


def expert_of(name: str) -> str | None:
    """'M.3.gate_proj' -> 'M'; None for a name that is not a per-expert Linear."""
    m = _EXPERT_NAME.match(name)
    return m["experts"] if m else None


def is_fused_experts(model: nn.Module, name: str) -> bool:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    return not isinstance(module, nn.ModuleList) and fused_experts_problem(module) is None
