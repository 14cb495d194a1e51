"""Backend choice for NVFP4: the Triton kernels on CUDA tensors, the C kernel on CPU tensors, the PyTorch reference
elsewhere.

backend="auto" picks by device (the C kernel only where a C compiler is found, see nvfp4_cpu); "triton", "c" or
"torch" forces one. Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is first imported (the test
suite does this). All give the same bits.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import nvfp4_cpu
from . import nvfp4_ref as ref
from .nvfp4_spec import DEFAULT_ACTIVATION_ARITHMETIC, DEFAULT_SCALE_RULE, check_activation_arithmetic

Backend = Literal["auto", "triton", "c", "torch"]
BACKENDS = ("auto", "triton", "c", "torch")
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend in ("torch", "c"):
        return False
    if backend == "auto":
        return x.is_cuda and x.dtype in TRITON_DTYPES and _triton_available()
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton kernels take bfloat16, float16 or float32, got {x.dtype}")
    if not x.is_cuda and not triton_interpreted():
        raise ValueError(
            "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 in the environment before triton is imported"
        )
    return True


def _use_c(x: torch.Tensor, backend: str) -> bool:
    """Whether the C kernel runs (backend "c" insists: an unusable one raises there)."""
    if backend == "c":
        return True
    return backend == "auto" and x.device.type == "cpu" and x.dtype in nvfp4_cpu.DTYPES and nvfp4_cpu.available()


def quantize_and_pack_backend(x: torch.Tensor, backend: Backend = "auto") -> str:
    """Which code :func:`quantize_and_pack` runs for x: "triton", "c" or "torch" (for summaries and reports)."""
    if _use_triton(x, backend):
        return "triton"
    return "c" if _use_c(x, backend) else "torch"


def _triton_available() -> bool:
    try:
        from . import nvfp4_triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in the interpreter (TRITON_INTERPRET=1 was set before triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    from . import nvfp4_triton

    return isinstance(nvfp4_triton._quantize_pack_kernel, InterpretedFunction)


def quantize_and_pack(
    x: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    backend: Backend = "auto",
    swizzle: bool = False,
    name: str | None = None,
    scale_rule: str = DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed uint8 [..., K/2], E4M3 block scales, g float32 0-d); see nvfp4_ref.quantize_and_pack.

    ``swizzle`` returns the block scales in the Blackwell 128x4 tiled layout instead of the linear [..., K/16] one.
    NaN or Inf in x raises a ValueError naming ``name``. ``scale_rule`` is one of nvfp4_spec.SCALE_RULES;
    "mse-act" needs ``channel_weights`` [K].
    """
    ref.check_last_dim(x)
    rule = {"scale_rule": scale_rule, "channel_weights": channel_weights}
    if not _use_triton(x, backend):
        encode = ref.quantize_and_pack
        if _use_c(x, backend):
            encode = nvfp4_cpu.quantize_and_pack
        packed, scales, g = encode(x, global_scale, name=name, **rule)
        return packed, ref.swizzle_block_scales(scales) if swizzle else scales, g
    from . import nvfp4_triton

    rule["channel_weights"] = _flat_weights(scale_rule, channel_weights, x)
    g = ref.resolve_global_scale(x, global_scale)
    finite = torch.isfinite(g) if global_scale is None else torch.isfinite(g) & torch.isfinite(x).all()
    if not bool(finite):  # with the dynamic g, amax(x) is finite exactly when every element is
        raise ref.nonfinite_error(name)
    if swizzle and x.ndim != 2:
        packed, scales = nvfp4_triton.quantize_and_pack(x.detach(), g, **rule)
        return packed, ref.swizzle_block_scales(scales), g
    packed, scales = nvfp4_triton.quantize_and_pack(x.detach(), g, swizzle=swizzle, **rule)
    return packed, scales, g


def _flat_weights(scale_rule: str, channel_weights: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The checked channel weights as float32 [K] on x's device (None for rules without them)."""
    w = ref.resolve_channel_weights(scale_rule, channel_weights, x.shape[-1], x.device)
    return None if w is None else w.reshape(-1)


def fake_quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    backend: Backend = "auto",
    scale_rule: str = DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
    arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
) -> torch.Tensor:
    """Quantize-dequantize in x's dtype (no autograd; see fake_quant.fake_quantize_ste). NaN/Inf propagate.

    The engines' activation arithmetic ("reciprocal") has no kernel: every backend runs the PyTorch reference for it.
    """
    ref.check_last_dim(x)
    check_activation_arithmetic(arithmetic)
    rule = {"scale_rule": scale_rule, "channel_weights": channel_weights}
    if arithmetic == "divide" and _use_c(x, backend):
        return nvfp4_cpu.fake_quantize(x, global_scale, **rule)
    if arithmetic != "divide" or not _use_triton(x, backend):
        return ref.fake_quantize(x, global_scale, arithmetic=arithmetic, **rule)
    from . import nvfp4_triton

    weights = _flat_weights(scale_rule, channel_weights, x)
    return nvfp4_triton.fake_quantize(x.detach(), ref.resolve_global_scale(x, global_scale), scale_rule=scale_rule,
                                      channel_weights=weights)
