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

SWIZZLE_ROWS = 128
SWIZZLE_COLS = 4
"""Blackwell block-scale tile: 128 rows x 4 scale columns (64 elements of K), 512 bytes per tile."""
