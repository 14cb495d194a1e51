"""FP8 W8A8 (E4M3 weights with a scale per output channel, inputs with a dynamic scale per token): the middle format
a plan may give a unit instead of BF16 (docs/fp8.md). The rules, pinned in float32 (x upcast exactly first):

    amax   = max |x|                       over each row: a weight's output channel, an input's token
    s      = amax / 448                    one float32 division; s == 0 -> SCALE_FOR_ZERO_ROW (float32 eps)
    s      = s rounded up to bfloat16      weights only: the stored scale survives a bf16 reader exactly
    code   = e4m3(clamp(x / s, -448, 448)) round to nearest even (torch's cast to float8_e4m3fn)
    value  = float32(code) * s             (cast to the output dtype last)

These are compressed-tensors' FP8_DYNAMIC preset as its ``calculate_qparams`` / ``quantize`` / ``dequantize``
compute it for float32 tensors, but for the weights' scales rounded up to bfloat16 (transformers makes a bf16 model's
FP8 scale parameters bf16, so a float32 scale would be rounded on load; rounding up keeps |x / s| <= 448).
tests/kernels/test_fp8_ref.py checks against compressed-tensors bit for bit; vLLM loads such a config group beside
NVFP4 ones. NaN or Inf in a row make that row's values NaN.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
SCALE_FOR_ZERO_ROW = torch.finfo(torch.float32).eps
"""Scale of an all-zero row (compressed-tensors' eps for float32 scales): its codes are all 0."""
BITS_PER_WEIGHT = 8
SCALE_BYTES = 4
"""A float32 scale per output channel (``weight_scale`` [out, 1])."""


def stored_bytes(out_features: int, in_features: int) -> int:
    """Bytes of an FP8 weight [out, in] as stored: a byte a code and a float32 scale per output channel."""
    return out_features * in_features * BITS_PER_WEIGHT // 8 + SCALE_BYTES * out_features


def row_scales(x: torch.Tensor, *, bf16_exact: bool = False) -> torch.Tensor:
    """float32 [..., 1]: each row's amax / 448 (SCALE_FOR_ZERO_ROW for an all-zero row); with ``bf16_exact``
    rounded up to the next bfloat16 value (the weights' rule)."""
    amax = x.detach().to(torch.float32).abs().amax(dim=-1, keepdim=True)
    scale = amax / E4M3_MAX
    scale = torch.where(scale == 0, torch.full_like(scale, SCALE_FOR_ZERO_ROW), scale)
    if bf16_exact:  # a non-negative float32 rounded up to 16 significant bits: bfloat16's (Inf and NaN stay so)
        scale = ((scale.view(torch.int32) + 0xFFFF) & ~0xFFFF).view(torch.float32)
    return scale


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of x with the per-row float32 ``scale`` [..., 1]."""
    return (x.detach().to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code * scale in float32, cast to ``dtype`` last."""
    return (codes.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scales [out, 1]) of a weight [out, in], one bf16-exact scale per output channel: as stored."""
    scale = row_scales(w, bf16_exact=True)
    return quantize(w, scale), scale


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """A weight quantized and decoded per output channel, in its dtype."""
    return dequantize(*quantize_weight(w), w.dtype)


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """Inputs quantized and decoded per token (the last dimension), in their dtype: compressed-tensors' dynamic
    per-token scales."""
    scale = row_scales(x)
    return dequantize(quantize(x, scale), scale, x.dtype)
