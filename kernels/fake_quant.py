"""Fake quantization with a straight-through estimator, for quantization-aware training."""

from __future__ import annotations

import torch

from . import dispatch
from . import nvfp4_ref as ref
from .nvfp4_spec import DEFAULT_ACTIVATION_ARITHMETIC, DEFAULT_SCALE_RULE, FP4_MAX


class _FakeQuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, global_scale, zero_grad_clipped, backend, scale_rule, channel_weights, arithmetic):
        g = ref.resolve_global_scale(x, global_scale)
        rule = {"scale_rule": scale_rule, "channel_weights": channel_weights, "arithmetic": arithmetic}
        if zero_grad_clipped:
            ctx.save_for_backward(ref.scaled_blocks(x, g, **rule).abs().reshape(x.shape) > FP4_MAX)
        ctx.zero_grad_clipped = zero_grad_clipped
        return dispatch.fake_quantize(x, g, backend=backend, **rule)

    @staticmethod
    def backward(ctx, grad):
        if ctx.zero_grad_clipped:
            (clipped,) = ctx.saved_tensors
            grad = grad.masked_fill(clipped, 0)
        return grad, None, None, None, None, None, None


def fake_quantize_ste(
    x: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    zero_grad_clipped: bool = False,
    backend: dispatch.Backend = "auto",
    scale_rule: str = DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
    arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
) -> torch.Tensor:
    """NVFP4 quantize-dequantize whose gradient passes through unchanged.

    With ``zero_grad_clipped`` the gradient is zero where the input lay beyond its block's largest representable
    magnitude (|x / (s * g)| > 6, so it saturated). The global scale (given, or amax(x) / 2688 when None) is treated
    as a constant: no gradient flows into it, nor into the choice of scales. ``scale_rule`` / ``channel_weights``
    (weights) and ``arithmetic`` (activations) as in nvfp4_ref.fake_quantize.
    """
    return _FakeQuantizeSTE.apply(x, global_scale, zero_grad_clipped, backend, scale_rule, channel_weights, arithmetic)
