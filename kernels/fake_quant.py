"""Fake quantization with a straight-through estimator, for quantization-aware training."""

from __future__ import annotations

import torch

from . import dispatch
from . import nvfp4_ref as ref
from .nvfp4_spec import FP4_MAX


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, global_scale, zero_grad_clipped, backend):
        g = ref.resolve_global_scale(x, global_scale)
        if zero_grad_clipped:
            ctx.save_for_backward(ref.scaled_blocks(x, g).abs().reshape(x.shape) > FP4_MAX)
        ctx.zero_grad_clipped = zero_grad_clipped
        return dispatch.fake_quantize(x, g, backend=backend)

    @staticmethod
    def backward(ctx, grad):
        if ctx.zero_grad_clipped:
            (clipped,) = ctx.saved_tensors
            grad = grad.masked_fill(clipped, 0)
        return grad, None, None, None


def fake_quantize_ste(
    x: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    zero_grad_clipped: bool = False,
    backend: dispatch.Backend = "auto",
) -> torch.Tensor:
    """NVFP4 quantize-dequantize whose gradient passes through unchanged.

    With ``zero_grad_clipped`` the gradient is zero where the input lay beyond its block's largest representable
    magnitude (|x / (s * g)| > 6, so it saturated). The global scale (given, or amax(x) / 2688 when None) is treated
    as a constant: no gradient flows into it.
    """
    return _FakeQuantizeSTE.apply(x, global_scale, zero_grad_clipped, backend)
