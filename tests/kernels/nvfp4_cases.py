"""Shared inputs for the NVFP4 tests: planted cases and an independent float64 model of the definition."""

from __future__ import annotations

import torch

from ckaqad_kernels.nvfp4_spec import BLOCK_SIZE, E2M1_VALUES

GRID = torch.tensor(E2M1_VALUES, dtype=torch.float64)
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e4m3_positive_values() -> torch.Tensor:
    """Every finite positive E4M3 value, ascending (bytes 0x01..0x7E)."""
    return torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)


def round_half_even_on(grid: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid value (ties to the even index), saturating; float64, written without tricks."""
    dist = (v.unsqueeze(-1) - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist == best
    idx = torch.arange(len(grid)).expand_as(dist)
    lowest = torch.where(tied, idx, len(grid)).min(dim=-1).values
    two = tied.sum(-1) > 1
    return torch.where(two & (lowest % 2 == 1), lowest + 1, lowest)


def float64_model(x: torch.Tensor, g: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition evaluated in float64 (g given): (codes, scale values, r = x / d before rounding)."""
    x64 = x.to(torch.float64).reshape(*x.shape[:-1], -1, BLOCK_SIZE)
    a = x64.abs().amax(-1)
    s = a / (6.0 * g)
    s = torch.where(s == 0, torch.ones_like(s), s).clamp(2.0**-9, 448.0)
    e4m3 = torch.cat([torch.zeros(1, dtype=torch.float64), e4m3_positive_values()])
    s_q = e4m3[round_half_even_on(e4m3, s)]
    r = x64 / (s_q * g).unsqueeze(-1)
    idx = round_half_even_on(GRID, r.abs().clamp(max=6.0))
    codes = idx | ((r < 0).long() << 3)
    return codes.reshape(x.shape).to(torch.uint8), s_q, r.reshape(x.shape)


def planted(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of 32 that hit the edge cases with g = 1 (global amax 2688), so r = x / s in each block."""
    rows = []
    anchor = [6.0 * 448.0] + [0.0] * 15  # block 0 of row 0 pins amax, so g = 1
    rows.append(anchor + [0.0] * 16)  # an all-zero block
    # every midpoint of the E2M1 grid, exactly, with s = 1 (block amax 6): both signs
    mids = [6.0] + [m for m in MIDPOINTS] + [-m for m in MIDPOINTS] + [0.0]
    rows.append(mids + [6.0] + [m * 0.5 for m in MIDPOINTS] + [-6.0] + [0.0] * 7)  # second block: s = 1 too
    # subnormal E4M3 scales: block amax 6 * k * 2**-9 gives s = k * 2**-9 (k < 8 is subnormal)
    sub = []
    for k in (1, 3):
        sub += [6.0 * k * 2.0**-9] + [j * k * 2.0**-9 / 4 for j in range(15)]
    rows.append(sub)
    # below the smallest scale (clamped up to 2**-9) and one huge outlier per block
    rows.append([1e-4 * (j + 1) for j in range(16)] + [1000.0] + [0.3 * (j - 7) for j in range(15)])
    # negative zero and tiny negatives that round to zero
    rows.append([-0.0] * 8 + [-1e-3, 1e-3, -0.0, 0.0, 6.0, -6.0, -0.1, 0.1] + [-0.0] * 16)
    x = torch.tensor(rows, dtype=torch.float64)
    return x.to(dtype)


def scale_midpoints(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blocks whose scale a_b / (6 g) (g = 1) is exactly every E4M3 value and every midpoint between two of them."""
    v = e4m3_positive_values()
    targets = torch.cat([v, (v[:-1] + v[1:]) / 2, torch.tensor([2.0**-10])])  # 2**-10: halfway to zero
    blocks = torch.zeros(len(targets) + 1, BLOCK_SIZE, dtype=torch.float64)
    blocks[0, 0] = 6.0 * 448.0  # pins g = 1
    blocks[1:, 0] = 6.0 * targets
    blocks[1:, 1] = -3.0 * targets  # r = -3 exactly when s rounds to the target itself
    per_row = 16
    pad = (-len(blocks)) % per_row
    blocks = torch.cat([blocks, torch.zeros(pad, BLOCK_SIZE, dtype=torch.float64)])
    return blocks.reshape(-1, per_row * BLOCK_SIZE).to(dtype)


def to_bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so -0.0 differs from 0.0 and NaN compares equal to itself."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    diff = to_bits(a) != to_bits(b)
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} differ, first at {diff.nonzero()[0].tolist()}"


def is_near_midpoint(r: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    m = torch.tensor(MIDPOINTS, dtype=torch.float64)
    return ((r.abs().to(torch.float64).unsqueeze(-1) - m).abs() <= rel * m).any(-1)


def grid_index(codes: torch.Tensor) -> torch.Tensor:
    """Signed grid position: -7..7 (both zeros at 0), so one grid step is a difference of 1."""
    mag = (codes & 7).long()
    return torch.where((codes & 8) > 0, -mag, mag)



def float64_scale_search(
    x: torch.Tensor, g: float, rule: str, channel_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scale rules by brute force in float64: (chosen byte, float64 error of every byte 1..126, candidate mask).

    The candidate set follows docs/nvfp4.md (bytes of the amax scale and of the 1.5x scale, evaluated in float64;
    mse: from 2 below the one to 2 above the other), and every candidate's block error is computed in float64,
    without the pinned float32 order. Ties go to the amax scale, then to the smallest byte. Shapes [..., K/16].
    """
    x64 = x.to(torch.float64).reshape(*x.shape[:-1], -1, BLOCK_SIZE)
    e4m3 = torch.cat([torch.zeros(1, dtype=torch.float64), e4m3_positive_values()])
    s = x64.abs().amax(-1) / (6.0 * g)
    s = torch.where(s == 0, torch.ones_like(s), s)
    amax_byte = round_half_even_on(e4m3, s.clamp(2.0**-9, 448.0))
    four_byte = round_half_even_on(e4m3, (1.5 * s).clamp(2.0**-9, 448.0))
    d = e4m3[1:] * g  # bytes 1..126
    r = x64.unsqueeze(-2) / d.unsqueeze(-1)  # [..., NB, 126, 16]
    q = GRID[round_half_even_on(GRID, r.abs().clamp(max=6.0))] * torch.sign(r)
    err = (x64.unsqueeze(-2) - q * d.unsqueeze(-1)) ** 2
    if channel_weights is not None:
        err = err * channel_weights.to(torch.float64).reshape(-1, 1, BLOCK_SIZE)
    err = err.sum(-1)
    byte = torch.arange(1, 127).expand_as(err)
    if rule == "four-over-six":
        mask = (byte == amax_byte.unsqueeze(-1)) | (byte == four_byte.unsqueeze(-1))
    else:
        mask = (byte >= (amax_byte - 2).clamp(min=1).unsqueeze(-1)) & (byte <= (four_byte + 2).unsqueeze(-1))
    masked = torch.where(mask, err, torch.inf)
    best = masked.min(-1, keepdim=True).values
    tied = masked == best
    at_amax = (tied & (byte == amax_byte.unsqueeze(-1))).any(-1)
    smallest = torch.where(tied, byte, 127).min(-1).values
    return torch.where(at_amax, amax_byte, smallest), err, mask


def weights_for(rule: str, k: int, seed: int = 0) -> torch.Tensor | None:
    """Channel weights for mse-act (spread over four orders of magnitude, every 7th zero), None for other rules."""
    if rule != "mse-act":
        return None
    gen = torch.Generator().manual_seed(seed)
    w = 10.0 ** (torch.rand(k, generator=gen) * 4 - 2)
    w[::7] = 0.0
    return w
