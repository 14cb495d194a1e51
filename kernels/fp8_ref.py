"""FP8 W8A8 (E4M3 weights with a scale per output channel, inputs with a dynamic scale per token): the middle format
a plan may give a unit instead of BF16 (docs/fp8.md). The rules, pinned in float32 (x upcast exactly first):

    amax   = max |x|                       over each row: a weight's output channel, an input's token
    s      = amax / 448                    one float32 division; s == 0 -> SCALE_FOR_ZERO_ROW (float32 eps)
    code   = e4m3(clamp(x / s, -448, 448)) round to nearest even (torch's cast to float8_e4m3fn)
    value  = float32(code) * s             (cast to the output dtype last)

These are compressed-tensors' FP8_DYNAMIC preset as its ``calculate_qparams`` / ``quantize`` / ``dequantize``
compute it for float32 tensors (tests/kernels/test_fp8_ref.py checks bit for bit); vLLM loads such a config group
beside NVFP4 ones. NaN or Inf in a row make that row's values NaN.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
SCALE_FOR_ZERO_ROW = torch.finfo(torch.float32).eps
"""Scale of an all-zero row (compressed-tensors' eps for float32 scales): its codes are all 0."""
BITS_PER_WEIGHT = 8
SCALE_BYTES = 4
"""A float32 scale per output channel (``weight_scale`` [out, 1])."""


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., 1]: each row's amax / 448 (SCALE_FOR_ZERO_ROW for an all-zero row)."""
    amax = x.detach().to(torch.float32).abs().amax(dim=-1, keepdim=True)
    scale = amax / E4M3_MAX
    return torch.where(scale == 0, torch.full_like(scale, SCALE_FOR_ZERO_ROW), scale)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of x with the per-row float32 ``scale`` [..., 1]."""
    return (x.detach().to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code * scale in float32, cast to ``dtype`` last."""
    return (codes.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scales [..., 1]) of x, one scale per row: a weight [out, in] as it is stored."""
    scale = row_scales(x)
    return quantize(x, scale), scale


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize x row by row (a weight per output channel, an input per token), in x's dtype."""
    return dequantize(*quantize_rows(x), x.dtype)
