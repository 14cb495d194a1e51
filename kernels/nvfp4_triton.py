"""Triton kernels for NVFP4: fused quantize-and-pack and fused fake-quant (quantize-dequantize).

Bit-identical to nvfp4_ref: the same float32 operations in the same order (docs/nvfp4.md), IEEE divisions
(tl.div_rn, never the approximate `/`), no FMA contraction (enable_fp_fusion=False), the E4M3 rounding done on the
float32 bits (round to nearest even) instead of a hardware convert, and NaN handled explicitly (PTX min/max drop NaN).
The global scale is an input (a device pointer), so nothing synchronizes with the host. On the CPU these run under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import nvfp4_spec as spec
from .nvfp4_spec import BLOCK_SIZE, SWIZZLE_COLS, SWIZZLE_ROWS

_FP4_MAX = tl.constexpr(spec.FP4_MAX)
_E4M3_MAX = tl.constexpr(spec.E4M3_MAX)
_E4M3_MIN_SCALE = tl.constexpr(spec.E4M3_MIN_SCALE)
_ZERO_BLOCK_SCALE = tl.constexpr(spec.ZERO_BLOCK_SCALE)
_E4M3_MAX_BYTE = tl.constexpr(spec.E4M3_MAX_BYTE)
_MSE_STEPS_BELOW = tl.constexpr(spec.MSE_STEPS_BELOW)
_MSE_STEPS_ABOVE = tl.constexpr(spec.MSE_STEPS_ABOVE)
_MSE_MAX_CANDIDATES = tl.constexpr(spec.MSE_MAX_CANDIDATES)

TILE_M = 16
TILE_K = 128
"""Elements per program: TILE_M rows x TILE_K columns (TILE_K a multiple of 16; ragged edges are masked)."""


@triton.jit
def _e4m3_round(s):
    """float32 s in [2**-9, 448] or NaN -> (E4M3 byte int32, its float32 value), round to nearest even on the bits."""
    # Normal range (>= 2**-6): keep 3 of the 23 mantissa bits.
    u = s.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000
    normal_value = u.to(tl.float32, bitcast=True)
    normal_byte = (u >> 20).to(tl.int32) - 960  # (exponent - 120) << 3 | mantissa
    # Subnormal range: multiples of 2**-9; adding 2**23 rounds s * 512 to an integer, to nearest even.
    m = (s * 512.0 + 8388608.0) - 8388608.0
    sub = s < 0.015625
    byte = tl.where(sub, m.to(tl.int32), normal_byte)
    value = tl.where(sub, m * 0.001953125, normal_value)
    is_nan = s != s
    byte = tl.where(is_nan, 0x7F, byte)
    value = tl.where(is_nan, s, value)
    return byte, value


@triton.jit
def _clamp_scale(s):
    return tl.where(s > _E4M3_MAX, _E4M3_MAX, tl.where(s < _E4M3_MIN_SCALE, _E4M3_MIN_SCALE, s))


@triton.jit
def _block_scales(xb, g):
    """xb [TM, TK/16, 16] float32, g float32 -> (E4M3 byte int32 [TM, TK/16], its float32 value, s of step 4 after
    step 5, whether the block holds NaN or Inf)."""
    block_amax = tl.max(tl.abs(xb), axis=2)
    # x - x is 0 for finite x and NaN for NaN/Inf; tl.max may drop NaN, a sum keeps it.
    nonfinite = tl.sum(xb - xb, axis=2) != 0.0
    s = tl.div_rn(block_amax, _FP4_MAX * g)
    s = tl.where(s == 0.0, _ZERO_BLOCK_SCALE, s)
    byte, value = _e4m3_round(tl.where(nonfinite, float("nan"), _clamp_scale(s)))
    return byte, value, s, nonfinite


@triton.jit
def _e4m3_value(byte):
    """float32 value of positive E4M3 bytes (int32, 1..126)."""
    normal = ((((byte >> 3) + 120) << 23) | ((byte & 7) << 20)).to(tl.float32, bitcast=True)
    return tl.where(byte < 8, byte.to(tl.float32) * 0.001953125, normal)


@triton.jit
def _e2m1_value(r):
    """E2M1 value of r rounded half to even, saturating at 6, with r's sign (-0.0 gives +0.0)."""
    a = tl.abs(r)
    q = tl.where(a > 5.0, 6.0, tl.where(a >= 3.5, 4.0, tl.where(a > 2.5, 3.0, tl.where(a >= 1.75, 2.0, tl.where(
        a > 1.25, 1.5, tl.where(a >= 0.75, 1.0, tl.where(a > 0.25, 0.5, 0.0)))))))
    return tl.where(r < 0.0, -q, q)


@triton.jit
def _fold_halves(t, TM: tl.constexpr, NB: tl.constexpr, N: tl.constexpr):
    """t [TM, NB, N] -> t[..., i] + t[..., i + N/2] for i < N/2."""
    lo, hi = tl.split(tl.permute(tl.reshape(t, (TM, NB, 2, N // 2)), (0, 1, 3, 2)))
    return lo + hi


@triton.jit
def _block_error(xb, d, w, HAS_W: tl.constexpr, TM: tl.constexpr, NB: tl.constexpr):
    """Sum over each block of [w *] (x - E2M1(x / d) * d)**2 in the pinned order (fold halves 16 -> 1)."""
    dd = d[:, :, None]
    e = xb - _e2m1_value(tl.div_rn(xb, dd)) * dd
    t = e * e
    if HAS_W:
        t = t * w
    t = _fold_halves(t, TM, NB, 16)
    t = _fold_halves(t, TM, NB, 8)
    t = _fold_halves(t, TM, NB, 4)
    lo, hi = tl.split(t)
    return lo + hi


@triton.jit
def _search_scales(xb, g, amax_byte, s, w, RULE: tl.constexpr, TM: tl.constexpr, NB: tl.constexpr):
    """The scale bytes of a searching rule (docs/nvfp4.md, "Scale rules"): candidates in the pinned order, masked
    beyond each block's range; one replaces the best when its error is smaller, or equal and it is the amax byte."""
    four_byte, _ = _e4m3_round(_clamp_scale(s * 1.5))
    if RULE == 1:
        first = amax_byte
        last = four_byte
        count: tl.constexpr = 2
    else:
        first = tl.maximum(amax_byte - _MSE_STEPS_BELOW, 1)
        last = tl.minimum(four_byte + _MSE_STEPS_ABOVE, _E4M3_MAX_BYTE)
        count: tl.constexpr = _MSE_MAX_CANDIDATES
    best = amax_byte
    best_err = tl.full(s.shape, float("inf"), tl.float32)
    for j in tl.static_range(count):
        if RULE == 1:
            c = first if j == 0 else last
        else:
            c = first + j
        err = _block_error(xb, _e4m3_value(tl.minimum(c, _E4M3_MAX_BYTE)) * g, w, RULE == 3, TM, NB)
        better = (c <= last) & ((err < best_err) | ((err == best_err) & (c == amax_byte)))
        best = tl.where(better, c, best)
        best_err = tl.where(better, err, best_err)
    return best


@triton.jit
def _scaled_values(x_ptr, g_ptr, w_ptr, rows, cols, M, K, stride_m, RULE: tl.constexpr, TK: tl.constexpr,
                   TM: tl.constexpr, BLOCK: tl.constexpr):
    """Load a tile, compute block scales (by the scale rule) and r = x / (s * g). Returns (r [TM, TK/16, 16], d,
    scale byte)."""
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    offs = rows[:, None].to(tl.int64) * stride_m + cols[None, :]
    if x_ptr.dtype.element_ty == tl.bfloat16:
        # bf16 -> float32 is the 16 bits shifted up; the interpreter's own conversion loses bf16 subnormals.
        bits = tl.load(x_ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0).to(tl.uint32)
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr)
    xb = tl.reshape(x, (TM, TK // BLOCK, BLOCK))
    byte, s_value, s, nonfinite = _block_scales(xb, g)
    if RULE != 0:
        w = 0.0
        if RULE == 3:
            w = tl.reshape(tl.load(w_ptr + cols, mask=cols < K, other=0.0), (1, TK // BLOCK, BLOCK))
        byte = tl.where(nonfinite, 0x7F, _search_scales(xb, g, byte, s, w, RULE, TM, TK // BLOCK))
        s_value = tl.where(nonfinite, float("nan"), _e4m3_value(tl.minimum(byte, _E4M3_MAX_BYTE)))
    d = s_value * g
    r = tl.div_rn(xb, d[:, :, None])
    return r, d, byte


@triton.jit
def _e2m1_index(a):
    """Index 0..7 of |r| rounded half to even on the E2M1 grid, saturating at 6."""
    idx = (a > 0.25).to(tl.int32)
    idx += (a >= 0.75).to(tl.int32)
    idx += (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32)
    idx += (a > 2.5).to(tl.int32)
    idx += (a >= 3.5).to(tl.int32)
    idx += (a > 5.0).to(tl.int32)
    return idx


@triton.jit
def _store_scales(scale_ptr, byte, rows, pid_k, M, K, SWIZZLE: tl.constexpr, TM: tl.constexpr, TK: tl.constexpr,
                  BLOCK: tl.constexpr):
    kb = pid_k * (TK // BLOCK) + tl.arange(0, TK // BLOCK)
    n_kb = K // BLOCK
    smask = (rows < M)[:, None] & (kb < n_kb)[None, :]
    if SWIZZLE:
        col_tiles = (n_kb + 3) // 4
        r2 = rows[:, None]
        k2 = kb[None, :]
        offs = ((r2.to(tl.int64) // 128) * col_tiles + k2 // 4) * 512 + (r2 % 32) * 16 + ((r2 // 32) % 4) * 4 + k2 % 4
    else:
        offs = rows[:, None].to(tl.int64) * n_kb + kb[None, :]
    tl.store(scale_ptr + offs, byte.to(tl.uint8), mask=smask)


@triton.jit
def _quantize_pack_kernel(x_ptr, g_ptr, w_ptr, packed_ptr, scale_ptr, M, K, stride_m, RULE: tl.constexpr,
                          SWIZZLE: tl.constexpr, TM: tl.constexpr, TK: tl.constexpr, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * TM + tl.arange(0, TM)
    cols = pid_k * TK + tl.arange(0, TK)
    r, d, byte = _scaled_values(x_ptr, g_ptr, w_ptr, rows, cols, M, K, stride_m, RULE, TK, TM, BLOCK)
    code = _e2m1_index(tl.abs(r)) | tl.where(r < 0.0, 8, 0)
    lo, hi = tl.split(tl.reshape(code, (TM, TK // 2, 2)))
    packed = (lo | (hi << 4)).to(tl.uint8)
    pcols = pid_k * (TK // 2) + tl.arange(0, TK // 2)
    pmask = (rows < M)[:, None] & (pcols < K // 2)[None, :]
    tl.store(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + pcols[None, :], packed, mask=pmask)
    _store_scales(scale_ptr, byte, rows, pid_k, M, K, SWIZZLE, TM, TK, BLOCK)


@triton.jit
def _fake_quantize_kernel(x_ptr, g_ptr, w_ptr, out_ptr, M, K, stride_m, RULE: tl.constexpr, OUT_BF16: tl.constexpr,
                          TM: tl.constexpr, TK: tl.constexpr, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * TM + tl.arange(0, TM)
    cols = pid_k * TK + tl.arange(0, TK)
    r, d, byte = _scaled_values(x_ptr, g_ptr, w_ptr, rows, cols, M, K, stride_m, RULE, TK, TM, BLOCK)
    out = tl.reshape(_e2m1_value(r) * d[:, :, None], (TM, TK))
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    if OUT_BF16:
        # Round to nearest even on the bits: the interpreter's float32 -> bfloat16 cast truncates.
        u = out.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        out = tl.where(out != out, 0x7FC0, u).to(tl.uint16)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _grid(m: int, k: int) -> tuple[int, int]:
    return (triton.cdiv(m, TILE_M), triton.cdiv(k, TILE_K))


def _rule_args(scale_rule: str, channel_weights: torch.Tensor | None, g: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(the rule's index in SCALE_RULES, the weights [K] float32 or an unused stand-in)."""
    weights = g if channel_weights is None else channel_weights.reshape(-1).contiguous()
    return spec.SCALE_RULES.index(scale_rule), weights


def quantize_and_pack(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    swizzle: bool = False,
    scale_rule: str = spec.DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
):
    """x [..., K] (bf16/fp16/fp32), g float32 0-d on x's device -> (packed uint8 [..., K/2], scales e4m3).

    Scales are [..., K/16] linear, or with ``swizzle`` the 128x4 tiled layout of one 2-D matrix
    [ceil(M/128)*128, ceil(K/64)*4] (x must then be 2-D). Inputs are validated by the caller (dispatch), the channel
    weights included (float32 on x's device, as nvfp4_ref.resolve_channel_weights returns them).
    """
    k = x.shape[-1]
    x2 = _as_rows(x)
    m = x2.shape[0]
    packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
    if swizzle:
        mt, kt = triton.cdiv(m, SWIZZLE_ROWS), triton.cdiv(k // BLOCK_SIZE, SWIZZLE_COLS)
        scales = torch.zeros(mt * SWIZZLE_ROWS, kt * SWIZZLE_COLS, dtype=torch.uint8, device=x.device)
    else:
        scales = torch.empty(m, k // BLOCK_SIZE, dtype=torch.uint8, device=x.device)
    rule, weights = _rule_args(scale_rule, channel_weights, global_scale)
    if m:
        _quantize_pack_kernel[_grid(m, k)](
            x2, global_scale, weights, packed, scales, m, k, x2.stride(0),
            RULE=rule, SWIZZLE=swizzle, TM=TILE_M, TK=TILE_K, BLOCK=BLOCK_SIZE, enable_fp_fusion=False,
        )
    lead = x.shape[:-1]
    scales = scales.view(torch.float8_e4m3fn)
    if not swizzle:
        scales = scales.reshape(*lead, k // BLOCK_SIZE)
    return packed.reshape(*lead, k // 2), scales


def fake_quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    scale_rule: str = spec.DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize x [..., K] in its own dtype with the float32 0-d global scale g (and the scale rule)."""
    k = x.shape[-1]
    x2 = _as_rows(x)
    m = x2.shape[0]
    out = torch.empty(m, k, dtype=x.dtype, device=x.device)
    out_bf16 = x.dtype == torch.bfloat16
    rule, weights = _rule_args(scale_rule, channel_weights, global_scale)
    if m:
        _fake_quantize_kernel[_grid(m, k)](
            x2, global_scale, weights, out.view(torch.uint16) if out_bf16 else out, m, k, x2.stride(0), RULE=rule,
            OUT_BF16=out_bf16, TM=TILE_M, TK=TILE_K, BLOCK=BLOCK_SIZE, enable_fp_fusion=False,
        )
    return out.reshape(x.shape)
