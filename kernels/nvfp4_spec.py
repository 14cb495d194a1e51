"""The NVFP4 definition as constants. docs/nvfp4.md states the rules; every code path follows them.

Summary of the pinned float32 order (x is the input, upcast exactly to float32):

    amax   = max |x|                       over the tensor (or a calibrated / fused-group amax)
    g      = amax / 2688                   (6 * 448); g == 0 -> 1.0; a non-finite g is kept (activations propagate)
    a_b    = max |x|                       over each block of BLOCK_SIZE consecutive elements of the last dim
    s      = a_b / (6 * g)                 the product 6 * g is rounded to float32 first, then one division
    s      = 1.0 where s == 0               (zero block)
    s_q    = e4m3(clamp(s, 2**-9, 448))    round to nearest even; NaN where a_b is not finite
    d      = float32(s_q) * g
    r      = x / d
    code   = (r < 0) << 3 | idx(|r|)       idx: round half to even on E2M1_VALUES, saturating at 6
    value  = E2M1(code) * d                (cast to the output dtype last)

A scale rule other than "amax" replaces s_q by the candidate of least block error (docs/nvfp4.md, "Scale rules").
"""

from __future__ import annotations

E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of the FP4 E2M1 codes 0..7; code | 8 is the negative of the same magnitude."""

BLOCK_SIZE = 16
FP4_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SCALE = 2.0**-9
"""Smallest positive E4M3 value (a subnormal). Block scales are clamped up to it, never flushed to zero."""

GLOBAL_SCALE_DIVISOR = FP4_MAX * E4M3_MAX  # 2688.0, exact in float32
BYTES_PER_BLOCK = BLOCK_SIZE // 2 + 1
"""Stored bytes of one block of 16 weights: 16 four-bit codes and one E4M3 scale (4.5 bits a weight)."""


def stored_bytes(weights: int) -> int:
    """Bytes of codes and block scales for ``weights`` weights (a multiple of BLOCK_SIZE); global scales apart."""
    return weights // BLOCK_SIZE * BYTES_PER_BLOCK
ZERO_BLOCK_SCALE = 1.0
"""Block scale written for an all-zero block (E4M3 byte 0x38), as ModelOpt does; its codes are all 0."""
ZERO_TENSOR_GLOBAL_SCALE = 1.0
"""Global scale used when the amax is zero (an all-zero tensor), instead of 0 (which would divide by zero)."""

ROUNDING_BOUNDS: tuple[tuple[float, bool], ...] = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)
"""Midpoints between neighbouring E2M1 magnitudes, with whether an exact hit rounds up (True) or down.

idx(|r|) is the number of bounds that |r| passes: strictly (|r| > b) where the lower neighbour has an even mantissa,
or inclusively (|r| >= b) where the upper one has; that is round half to even on the E2M1 grid.
"""

SIGN_BIT = 0x8

SCALE_RULES: tuple[str, ...] = ("amax", "four-over-six", "mse", "mse-act")
"""How a weight block's E4M3 scale is chosen: from the block max (block max -> 6), or the candidate of least error
among {block max -> 6, block max -> 4} (four-over-six), a range of E4M3 scales around them (mse), or that range
scored by the error weighted with per-input-channel weights, the calibration inputs' E[x^2] (mse-act)."""
DEFAULT_SCALE_RULE = "amax"
FOUR_OVER_SIX_FACTOR = 1.5
"""The Four-over-Six candidate is e4m3(clamp(s * 1.5, 2**-9, 448)): the block max maps to 4 instead of 6."""
MSE_STEPS_BELOW = 2
"""mse / mse-act candidates start this many E4M3 steps (bytes) below the amax rule's scale byte ..."""
MSE_STEPS_ABOVE = 2
"""... and end this many steps above the Four-over-Six candidate's byte (clamped to bytes 1..126)."""
MSE_MAX_CANDIDATES = 11
"""At most this many bytes lie in an mse range: the Four-over-Six byte is at most 6 above the amax byte."""
E4M3_MAX_BYTE = 0x7E
"""The byte of 448, the largest finite E4M3 value (byte 1 is the smallest positive one, 2**-9)."""

ACTIVATION_ARITHMETICS: tuple[str, ...] = ("divide", "reciprocal")
"""How activations are quantized: "divide" is the definition above (r = x / d); "reciprocal" is what vLLM's and
TensorRT-LLM's CUDA kernels compute (docs/nvfp4.md, "Activations as engines quantize them")."""
DEFAULT_ACTIVATION_ARITHMETIC = "divide"


def check_scale_rule(rule: str) -> None:
    """One line naming the bad value."""
    if rule not in SCALE_RULES:
        raise ValueError(f"scale rule must be one of {', '.join(SCALE_RULES)}, not {rule!r}")


def check_activation_arithmetic(arithmetic: str) -> None:
    """One line naming the bad value."""
    if arithmetic not in ACTIVATION_ARITHMETICS:
        choices = ", ".join(ACTIVATION_ARITHMETICS)
        raise ValueError(f"activation arithmetic must be one of {choices}, not {arithmetic!r}")

SWIZZLE_ROWS = 128
SWIZZLE_COLS = 4
"""Blackwell block-scale tile: 128 rows x 4 scale columns (64 elements of K), 512 bytes per tile."""
