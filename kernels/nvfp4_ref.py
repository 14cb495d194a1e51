"""PyTorch reference of the NVFP4 definition (docs/nvfp4.md), on any device; the Triton kernels match it bit for bit.

Every float operation happens in float32, in the order pinned in nvfp4_spec. Divisions by a scalar use a tensor on the
input's device: CUDA turns a division by a host scalar into a multiplication by its reciprocal, which rounds
differently.
"""

from __future__ import annotations

from typing import NamedTuple, TypedDict, Unpack

import torch
import torch.nn.functional as F

from .nvfp4_spec import (
    BLOCK_SIZE,
    DEFAULT_ACTIVATION_ARITHMETIC,
    DEFAULT_SCALE_RULE,
    E2M1_VALUES,
    E4M3_MAX,
    E4M3_MAX_BYTE,
    E4M3_MIN_SCALE,
    FOUR_OVER_SIX_FACTOR,
    FP4_MAX,
    GLOBAL_SCALE_DIVISOR,
    MSE_MAX_CANDIDATES,
    MSE_STEPS_ABOVE,
    MSE_STEPS_BELOW,
    SIGN_BIT,
    SWIZZLE_COLS,
    SWIZZLE_ROWS,
    ZERO_BLOCK_SCALE,
    ZERO_TENSOR_GLOBAL_SCALE,
    check_activation_arithmetic,
    check_scale_rule,
)

ROWS_PER_CHUNK_ELEMENTS = 1 << 18
"""Encoding works through chunks of rows of about this many elements per torch thread: a MB or two of float32
temporaries per core, which stay in its cache across the dozen elementwise passes (2.7x faster than chunks of 4M
elements on 2 cores), and few enough parallel regions that a loaded CPU does not stall on thread barriers."""

_E2M1_SIGNED = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES], dtype=torch.float32)
"""Decoded value of each 4-bit code (code 8 is -0.0)."""


def check_last_dim(x: torch.Tensor, what: str = "NVFP4 input") -> None:
    """Refuse a last dimension that blocks of 16 cannot tile."""
    if x.ndim == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(
            f"{what} needs a last dimension that is a multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}"
        )


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """g = amax / (6 * 448) as a float32 0-d tensor (ModelOpt's weight_scale_2); an amax of 0 gives 1.0.

    A non-finite amax gives a non-finite g on purpose: activations carrying NaN/Inf then dequantize to NaN.
    """
    amax = torch.as_tensor(amax).detach().to(torch.float32).reshape(())
    g = amax / torch.tensor(GLOBAL_SCALE_DIVISOR, dtype=torch.float32, device=amax.device)
    return torch.where(g == 0, torch.ones_like(g) * ZERO_TENSOR_GLOBAL_SCALE, g)


_AMINMAX_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a float32 0-d tensor (0 for an empty tensor); NaN anywhere gives NaN, +-Inf gives Inf.

    One aminmax pass, then max(-min, max): the same value as x.abs().amax(), an order of magnitude faster on the CPU
    (no |x| temporary).
    """
    x = x.detach()
    if not x.numel():
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if x.dtype not in _AMINMAX_DTYPES:
        return x.abs().amax().to(torch.float32)
    lo, hi = torch.aminmax(x)
    return torch.maximum(-lo, hi).to(torch.float32)


def resolve_global_scale(x: torch.Tensor, global_scale: torch.Tensor | float | None) -> torch.Tensor:
    """The float32 0-d g on x's device: the given one, or computed from amax(x) when None."""
    if global_scale is None:
        return global_scale_from_amax(tensor_amax(x))
    g = torch.as_tensor(global_scale).detach().to(device=x.device, dtype=torch.float32)
    if g.numel() != 1:
        raise ValueError(f"global_scale must hold one value, got shape {tuple(g.shape)}")
    return g.reshape(())


def nonfinite_error(name: str | None) -> ValueError:
    """The error for NaN/Inf in a tensor to encode (a weight): it names the tensor."""
    what = f"tensor {name!r}" if name else "the tensor"
    return ValueError(f"{what} contains NaN or Inf; NVFP4 cannot encode it")


def block_scales_e4m3(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales from float32 block amaxes: e4m3(clamp(a_b / (6 g), 2**-9, 448)), 1.0 for zero blocks.

    A block whose amax is not finite gets the NaN scale (byte 0x7F).
    """
    six_g = FP4_MAX * global_scale
    s = block_amax / six_g
    s = torch.where(s == 0, torch.full_like(s, ZERO_BLOCK_SCALE), s)
    s = s.clamp(E4M3_MIN_SCALE, E4M3_MAX)
    s = torch.where(torch.isfinite(block_amax), s, torch.full_like(s, float("nan")))
    return s.to(torch.float8_e4m3fn)


def resolve_channel_weights(
    scale_rule: str, channel_weights: torch.Tensor | None, k: int, device: torch.device
) -> torch.Tensor | None:
    """Check a scale rule and its channel weights: float32 [K/16, 16] for mse-act, None for the other rules.

    mse-act needs one finite, non-negative weight per input channel (the calibration inputs' E[x^2]); the other
    rules take none.
    """
    check_scale_rule(scale_rule)
    if scale_rule != "mse-act":
        if channel_weights is not None:
            raise ValueError(f"scale rule {scale_rule!r} takes no channel weights (only 'mse-act' does)")
        return None
    if channel_weights is None:
        raise ValueError("scale rule 'mse-act' needs channel_weights: the calibration inputs' E[x^2] per channel")
    w = torch.as_tensor(channel_weights).detach().to(device=device, dtype=torch.float32)
    if w.shape != (k,):
        raise ValueError(f"channel weights must have shape ({k},), one per input channel, got {tuple(w.shape)}")
    if not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError("channel weights must be finite and non-negative")
    return w.reshape(k // BLOCK_SIZE, BLOCK_SIZE)


def e4m3_byte_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 value of E4M3 bytes held in an integer tensor (0..127)."""
    return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def tree_sum16(t: torch.Tensor) -> torch.Tensor:
    """Sum over a last dimension of 16 in the pinned order: fold halves, t[i] + t[i + 8], then + 4, + 2, + 1."""
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        t = t[..., :half] + t[..., half:]
    return t.squeeze(-1)


def block_errors(xb: torch.Tensor, d: torch.Tensor, channel_weights: torch.Tensor | None) -> torch.Tensor:
    """Per block, sum over its 16 elements of [w *] (x - E2M1(x / d) * d)**2, float32 in the pinned order.

    xb [..., NB, 16] float32, d [..., NB] the block divisors, channel_weights None or [NB, 16].
    """
    dd = d.unsqueeze(-1)
    err = xb - _e2m1_values(xb / dd).mul_(dd)
    err = err.mul_(err)
    if channel_weights is not None:
        err = err.mul_(channel_weights)
    return tree_sum16(err)


def search_block_scales(
    xb: torch.Tensor,
    block_amax: torch.Tensor,
    g: torch.Tensor,
    scales: torch.Tensor,
    scale_rule: str,
    channel_weights: torch.Tensor | None,
) -> torch.Tensor:
    """The E4M3 scales [..., NB] a searching scale rule picks (docs/nvfp4.md, "Scale rules").

    ``scales`` are the amax rule's (block_scales_e4m3). Candidates are visited in ascending byte order (for
    four-over-six: the amax scale, then the 1.5x one); one replaces the best so far when its block error is strictly
    smaller, or equal while it is the amax scale. A block that is not finite keeps the NaN scale.
    """
    s = block_amax / (FP4_MAX * g)
    s = torch.where(s == 0, torch.full_like(s, ZERO_BLOCK_SCALE), s)
    four = (s * FOUR_OVER_SIX_FACTOR).clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)
    amax_byte = scales.view(torch.uint8).to(torch.int32)
    four_byte = four.view(torch.uint8).to(torch.int32)
    if scale_rule == "four-over-six":
        candidates = [(amax_byte, None), (four_byte, None)]
    else:
        low = (amax_byte - MSE_STEPS_BELOW).clamp_(min=1)
        high = (four_byte + MSE_STEPS_ABOVE).clamp_(max=E4M3_MAX_BYTE)
        candidates = [(low + j, low + j <= high) for j in range(MSE_MAX_CANDIDATES)]
    best = amax_byte
    best_err = torch.full_like(s, float("inf"))
    for byte, valid in candidates:
        byte = byte.clamp(max=E4M3_MAX_BYTE)
        err = block_errors(xb, e4m3_byte_values(byte) * g, channel_weights)
        better = (err < best_err) | ((err == best_err) & (byte == amax_byte))
        if valid is not None:
            better &= valid
        best = torch.where(better, byte, best)
        best_err = torch.where(better, err, best_err)
    best = best.to(torch.uint8).view(torch.float8_e4m3fn)
    return torch.where(torch.isfinite(block_amax), best, scales)


_FLOAT32_EXPONENT_BITS = 0x7F800000
_ONE_BITS = 0x3F800000  # float32 1.0
_TWO_POW_22_BITS = 0x4A800000  # float32 2**22


def _rounder_bits(a: torch.Tensor) -> torch.Tensor:
    """For a = |r| clamped to [0, 6] (float32): the int32 bits of M = 2 ** (22 + max(floor(log2 a), 0)).

    Why: float32 a + M (a < M) is rounded, half to even, to a multiple of ulp(M) = 2 ** (max(floor(log2 a), 0) - 1),
    which is exactly the E2M1 grid spacing at a (0.5 below 2, 1 in [2, 4), 2 in [4, 6]); a + M = M + k * ulp(M) and
    the parity of k is the parity of the E2M1 index, so IEEE's "even" is E2M1's. One add replaces a search of the grid.
    NaN gives garbage bits here, and NaN again once added.
    """
    return a.view(torch.int32).bitwise_and(_FLOAT32_EXPONENT_BITS).clamp_(min=_ONE_BITS).add_(22 << 23)


def _rounded_magnitudes(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a + M as float32, bits of M) for a = min(|r|, 6): see _rounder_bits; (a + M) - M is |r| on the E2M1 grid."""
    a = r.abs().clamp_(max=FP4_MAX)
    m_bits = _rounder_bits(a)
    return a.add_(m_bits.view(torch.float32)), m_bits


def _sign_source(r: torch.Tensor) -> torch.Tensor:
    """r + 0.0 turns -0.0 into +0.0, so the sign bit marks exactly r < 0 (as the definition says)."""
    return r + 0.0


def _e2m1_codes(r: torch.Tensor) -> torch.Tensor:
    """Codes (r < 0) << 3 | index of finite scaled values r, as int32.

    a + M = M + k * ulp(M) (see _rounder_bits), so k is the difference of the bits; the index is k below 2, k + 2 in
    [2, 4) (k = 2..4) and k + 4 in [4, 6] (k = 2, 3): (bits(M) - bits(2**22)) >> 22 is that offset (0, 2 or 4).
    """
    shifted, m_bits = _rounded_magnitudes(r)
    index = shifted.view(torch.int32).sub_(m_bits).add_(m_bits.sub_(_TWO_POW_22_BITS).bitwise_right_shift_(22))
    return index.bitwise_or_(_sign_source(r).view(torch.int32).bitwise_right_shift(28).bitwise_and_(SIGN_BIT))


def _pack_int32_codes(codes: torch.Tensor) -> torch.Tensor:
    """int32 codes [..., K] (K even) -> uint8 [..., K/2], element 2i in the low nibble (as pack_fp4).

    A little-endian int64 view holds element 2i in its low and 2i+1 in its high 32 bits: one shift and one or put
    both nibbles in the low byte, and the cast to uint8 keeps that byte.
    """
    pairs = codes.view(torch.int64)
    return pairs.bitwise_or(pairs.bitwise_right_shift(28)).to(torch.uint8)


def _e2m1_values(r: torch.Tensor) -> torch.Tensor:
    """The decoded value of each code of r (float32; -0.0 for code 8), without forming the codes; NaN stays NaN."""
    shifted, m_bits = _rounded_magnitudes(r)
    return shifted.sub_(m_bits.view(torch.float32)).copysign_(_sign_source(r))


def _float32_and_block_amax(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [R, K] -> (a float32 copy, to be scaled in place; its block maxima [R, K/16]).

    The block max is a max-pool (NaN-propagating, and faster than amax over a 16-wide last dimension).
    """
    rows, k = x2.shape
    xf = x2.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    block_amax = F.max_pool1d(xf.abs().unsqueeze(1), BLOCK_SIZE).squeeze(1) if rows else xf.new_empty(0, k // 16)
    return xf, block_amax


def _scales_and_ratios(
    x2: torch.Tensor,
    g: torch.Tensor,
    *,
    name: str | None,
    check_finite: bool,
    scale_rule: str = DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2 [R, K] in its own dtype -> (E4M3 scales [R, K/16], r = x / d float32 [R, K], d float32 [R, K/16, 1]).

    channel_weights: as resolve_channel_weights returns them.
    """
    rows, k = x2.shape
    xf, block_amax = _float32_and_block_amax(x2)
    if check_finite and not bool(torch.isfinite(block_amax).all()):
        raise nonfinite_error(name)
    scales = block_scales_e4m3(block_amax, g)
    xb = xf.view(rows, k // BLOCK_SIZE, BLOCK_SIZE)
    if scale_rule != "amax":
        scales = search_block_scales(xb, block_amax, g, scales, scale_rule, channel_weights)
    d = block_divisors(scales, g).unsqueeze(-1)
    return scales, xb.div_(d).view(rows, k), d


def _row_chunks(rows: int, k: int) -> list[slice]:
    step = max(1, ROWS_PER_CHUNK_ELEMENTS * torch.get_num_threads() // k)
    return [slice(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def block_divisors(block_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """d = float32(s) * g per block: x / d is what gets rounded, E2M1 value * d is what comes back."""
    return block_scales.to(torch.float32) * global_scale


def scaled_blocks(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    scale_rule: str = DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
    arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
) -> torch.Tensor:
    """r as float32 [..., K/16, 16] (x / d, or x times the engines' reciprocal): the values rounded onto the E2M1
    grid (|r| > 6 saturates). Parameters as fake_quantize's."""
    check_last_dim(x)
    check_activation_arithmetic(arithmetic)
    k = x.shape[-1]
    w = resolve_channel_weights(scale_rule, channel_weights, k, x.device)
    r = _fake_quant_ratios(x.detach().reshape(-1, k), global_scale, scale_rule, w, arithmetic)[1]
    return r.reshape(*x.shape[:-1], -1, BLOCK_SIZE)


class EncodeOptions(TypedDict, total=False):
    """The keyword options of every NVFP4 encoder (quantize, quantize_and_pack, nvfp4_cpu.quantize_and_pack).

    ``name`` labels the tensor in the NaN/Inf error; ``scale_rule`` is one of nvfp4_spec.SCALE_RULES (default
    DEFAULT_SCALE_RULE); ``channel_weights`` [K], the inputs' E[x^2] per channel, is what "mse-act" needs.
    """

    name: str | None
    scale_rule: str
    channel_weights: torch.Tensor | None


class Encoding(NamedTuple):
    """An encoder's checked inputs: the last dimension, g (float32 0-d, finite), the resolved channel weights."""

    k: int
    g: torch.Tensor
    channel_weights: torch.Tensor | None
    scale_rule: str
    name: str | None


def encoding(
    x: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    name: str | None = None,
    scale_rule: str = DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
) -> Encoding:
    """Check an encoder's inputs (EncodeOptions) and resolve them; NaN or Inf in g raises the error naming ``name``."""
    check_last_dim(x)
    k = x.shape[-1]
    w = resolve_channel_weights(scale_rule, channel_weights, k, x.device)
    g = resolve_global_scale(x, global_scale)
    if not bool(torch.isfinite(g)):
        raise nonfinite_error(name)
    return Encoding(k, g, w, scale_rule, name)


def _encode(
    x: torch.Tensor, global_scale: torch.Tensor | float | None, pack: bool, options: EncodeOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k, g, w, scale_rule, name = encoding(x, global_scale, **options)
    x2 = x.detach().reshape(-1, k)
    rows = x2.shape[0]
    width = k // 2 if pack else k
    codes = torch.empty(rows, width, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows, k // BLOCK_SIZE, dtype=torch.float8_e4m3fn, device=x.device)
    for rows_slice in _row_chunks(rows, k):
        scales[rows_slice], r, _ = _scales_and_ratios(x2[rows_slice], g, name=name, check_finite=True,
                                                      scale_rule=scale_rule, channel_weights=w)
        chunk = _e2m1_codes(r)
        codes[rows_slice] = _pack_int32_codes(chunk) if pack else chunk
    lead = x.shape[:-1]
    return codes.reshape(*lead, width), scales.reshape(*lead, k // BLOCK_SIZE), g


def quantize(
    x: torch.Tensor, global_scale: torch.Tensor | float | None = None, **options: Unpack[EncodeOptions]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes uint8 [..., K] = sign << 3 | index, block scales float8_e4m3fn [..., K/16], g float32 0-d).

    global_scale None computes g from amax(x). NaN or Inf in x raises a ValueError naming ``name``; the options are
    EncodeOptions.
    """
    return _encode(x, global_scale, False, options)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte: element 2i in the low nibble, 2i+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_fp4: uint8 [..., K/2] -> codes uint8 [..., K]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4 needs uint8 bytes, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def quantize_and_pack(
    x: torch.Tensor, global_scale: torch.Tensor | float | None = None, **options: Unpack[EncodeOptions]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed uint8 [..., K/2], block scales float8_e4m3fn [..., K/16], g float32 0-d).

    The bytes of pack_fp4(quantize(x)[0]) (same options), made chunk by chunk of rows to bound memory.
    """
    return _encode(x, global_scale, True, options)


def _unpacked_shape(packed: torch.Tensor) -> tuple[int, ...]:
    """The codes' shape [..., K] of packed bytes [..., K/2]; raises unless they are uint8 and blocks of 16 tile K."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4 needs uint8 bytes, got {packed.dtype}")
    shape = (*packed.shape[:-1], 2 * packed.shape[-1]) if packed.ndim else ()
    if not shape or shape[-1] % BLOCK_SIZE:
        raise ValueError(f"packed NVFP4 data (unpacked) needs a last dimension that is a multiple of {BLOCK_SIZE}, "
                         f"got shape {shape}")
    return shape


def _decode(packed: torch.Tensor, shape: tuple[int, ...], divisors: torch.Tensor, dtype: torch.dtype
            ) -> torch.Tensor:
    """value = E2M1(code) * d, computed in float32, cast to dtype last; chunk by chunk of rows, so that the float32
    temporaries stay small (and are reused) whatever the tensor's size. ``shape``: _unpacked_shape(packed)."""
    k = shape[-1]
    packed2, divisors2 = packed.reshape(-1, k // 2), divisors.reshape(-1, k // BLOCK_SIZE)
    out = torch.empty(packed2.shape[0], k, dtype=dtype, device=packed.device)
    table = _E2M1_SIGNED.to(packed.device)
    for rows in _row_chunks(packed2.shape[0], k):
        values = table[unpack_fp4(packed2[rows]).to(torch.int32)].reshape(-1, k // BLOCK_SIZE, BLOCK_SIZE)
        out[rows] = (values * divisors2[rows].unsqueeze(-1)).reshape(-1, k).to(dtype)
    return out.reshape(shape)


def dequantize_with_divisors(packed: torch.Tensor, divisors: torch.Tensor, dtype: torch.dtype = torch.float32
                             ) -> torch.Tensor:
    """Packed bytes [..., K/2] + float32 block divisors d [..., K/16] -> E2M1 value * d [..., K] in ``dtype``: the
    decode of a reader that forms d its own way (compressed-tensors divides s by its stored reciprocal of g)."""
    shape = _unpacked_shape(packed)
    if divisors.shape != (*shape[:-1], shape[-1] // BLOCK_SIZE) or divisors.dtype != torch.float32:
        raise ValueError(f"block divisors of shape {tuple(divisors.shape)} ({divisors.dtype}) do not match packed "
                         f"data {tuple(packed.shape)} (float32 wanted)")
    return _decode(packed, shape, divisors, dtype)


def dequantize(
    packed: torch.Tensor,
    block_scales: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed bytes [..., K/2] + linear block scales [..., K/16] + g -> values [..., K] in ``dtype``."""
    shape = _unpacked_shape(packed)
    if block_scales.shape != (*shape[:-1], shape[-1] // BLOCK_SIZE):
        raise ValueError(
            f"block scales of shape {tuple(block_scales.shape)} do not match packed data {tuple(packed.shape)}"
        )
    g = torch.as_tensor(global_scale).to(device=packed.device, dtype=torch.float32).reshape(())
    return _decode(packed, shape, block_divisors(block_scales, g), dtype)


def fake_quantize(
    x: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    *,
    scale_rule: str = DEFAULT_SCALE_RULE,
    channel_weights: torch.Tensor | None = None,
    arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC,
) -> torch.Tensor:
    """Quantize-dequantize in x's dtype; equals dequantize(*quantize_and_pack(x, g, ...), dtype=x.dtype) exactly.

    NaN/Inf propagate instead of raising: a block holding one dequantizes to NaN, and with the dynamic global scale
    (global_scale None) the whole tensor does. ``arithmetic="reciprocal"`` (activations; amax rule only) computes
    codes and scales as the engines' CUDA kernels do (engine_scales_and_ratios).
    """
    check_last_dim(x)
    check_activation_arithmetic(arithmetic)
    k = x.shape[-1]
    w = resolve_channel_weights(scale_rule, channel_weights, k, x.device)
    if arithmetic != "divide" and scale_rule != "amax":
        raise ValueError(f"activation arithmetic {arithmetic!r} takes the amax scale rule, not {scale_rule!r}")
    g = resolve_global_scale(x, global_scale)
    x2 = x.detach().reshape(-1, k)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    for rows_slice in _row_chunks(x2.shape[0], k):
        _, r, d = _fake_quant_ratios(x2[rows_slice], g, scale_rule, w, arithmetic)
        rows = r.shape[0]
        out[rows_slice] = _e2m1_values(r).view(rows, -1, BLOCK_SIZE).mul_(d).view(rows, k)
    return out.reshape(x.shape)


def _fake_quant_ratios(
    x2: torch.Tensor, g: torch.Tensor, scale_rule: str, channel_weights: torch.Tensor | None, arithmetic: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scales, r, d) of rows x2 without the NaN/Inf check: by the definition, or as the engines compute them."""
    if arithmetic == "divide":
        return _scales_and_ratios(x2, g, name=None, check_finite=False, scale_rule=scale_rule,
                                  channel_weights=channel_weights)
    return engine_scales_and_ratios(x2, g)


_RECIPROCAL_OF_FP4_MAX = 1.0 / FP4_MAX
"""The engines' rcp(6.0), taken as float32(1/6) (docs/nvfp4.md: reciprocals are modelled as correctly rounded)."""


def engine_scales_and_ratios(
    x2: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation quantization as vLLM's and TensorRT-LLM's CUDA kernels compute it (cvt_warp_fp16_to_fp4).

    With G = 1 / g (the engine's SFScale) and v the block max: SF = G * (v * rcp(6)); s = e4m3(SF), saturating,
    no lower clamp (a tiny or zero SF gives scale 0 and all codes 0); r = x * rcp(s * rcp(G)), 0 where s is 0.
    Every rcp is the correctly rounded float32 reciprocal. Returns what _scales_and_ratios does: (E4M3 scales
    [R, K/16], r [R, K], d = s * g [R, K/16, 1]); NaN or Inf in a block makes its scale NaN (training propagates it).
    """
    rows, k = x2.shape
    xf, block_amax = _float32_and_block_amax(x2)
    one = torch.ones((), dtype=torch.float32, device=xf.device)
    big_g = one / g
    sf = big_g * (block_amax * torch.tensor(_RECIPROCAL_OF_FP4_MAX, dtype=torch.float32, device=xf.device))
    sf = torch.where(torch.isfinite(block_amax), sf.clamp(max=E4M3_MAX), torch.full_like(sf, float("nan")))
    scales = sf.to(torch.float8_e4m3fn)
    s = scales.to(torch.float32)
    out_scale = torch.where(s != 0, one / (s * (one / big_g)), torch.zeros_like(s)).unsqueeze(-1)
    r = xf.view(rows, k // BLOCK_SIZE, BLOCK_SIZE).mul_(out_scale).view(rows, k)
    return scales, r, block_divisors(scales, g).unsqueeze(-1)


def swizzle_block_scales(block_scales: torch.Tensor) -> torch.Tensor:
    """Linear scales [..., M, K/16] -> the Blackwell 128x4 tiled layout, shape [..., ceil(M/128)*128, ceil(K/64)*4].

    Padding is zero. Within each 512-byte tile, scale (m, k) sits at (m % 32) * 16 + ((m // 32) % 4) * 4 + k % 4;
    tiles follow row-tile major, then column tile (torchao's to_blocked, vLLM's swizzle_blockscale).
    """
    if block_scales.ndim < 2:
        raise ValueError(f"block scales need at least 2 dimensions, got shape {tuple(block_scales.shape)}")
    *lead, m, kb = block_scales.shape
    mt, kt = -(-m // SWIZZLE_ROWS), -(-kb // SWIZZLE_COLS)
    raw = block_scales.view(torch.uint8)
    padded = torch.zeros(*lead, mt * SWIZZLE_ROWS, kt * SWIZZLE_COLS, dtype=torch.uint8, device=raw.device)
    padded[..., :m, :kb] = raw
    tiles = padded.reshape(*lead, mt, 4, 32, kt, SWIZZLE_COLS)
    n = len(lead)
    order = [*range(n), n, n + 3, n + 2, n + 1, n + 4]  # -> [..., mt, kt, 32, 4, 4]
    out = tiles.permute(order).reshape(*lead, mt * SWIZZLE_ROWS, kt * SWIZZLE_COLS)
    return out.view(block_scales.dtype)
