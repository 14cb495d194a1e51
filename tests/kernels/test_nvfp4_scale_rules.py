"""The NVFP4 scale rules (docs/nvfp4.md, "Scale rules") in the PyTorch reference: against a float64 brute force,
their error order, their edge cases and their refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaqad_kernels import nvfp4_ref as ref
from ckaqad_kernels.nvfp4_spec import (
    E4M3_MAX,
    FOUR_OVER_SIX_FACTOR,
    MSE_MAX_CANDIDATES,
    MSE_STEPS_ABOVE,
    MSE_STEPS_BELOW,
    SCALE_RULES,
)

from .nvfp4_cases import assert_same_bits, e4m3_positive_values, float64_scale_search, planted, weights_for

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SEARCHING = ("four-over-six", "mse", "mse-act")


def _bytes(scales: torch.Tensor) -> torch.Tensor:
    return scales.view(torch.uint8).long()


@pytest.mark.parametrize("rule", SEARCHING)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_reference_picks_the_float64_brute_force_choice(rule, dtype):
    torch.manual_seed(DTYPES.index(dtype))
    x = (torch.randn(24, 128) * torch.rand(24, 1) * 0.1).to(dtype)
    x[3, 16:32] = 0.0
    w = weights_for(rule, 128)
    _, scales, g = ref.quantize(x, scale_rule=rule, channel_weights=w)
    chosen = _bytes(scales)
    best, err, mask = float64_scale_search(x, float(g), rule, w)
    differ = chosen != best
    mine = err.gather(-1, (chosen - 1).unsqueeze(-1)).squeeze(-1)
    theirs = err.gather(-1, (best - 1).unsqueeze(-1)).squeeze(-1)
    in_set = mask.gather(-1, (chosen - 1).unsqueeze(-1)).squeeze(-1)
    # a difference is a float32 near-tie of two candidates' errors, never a worse scale
    assert in_set.all()
    assert (mine[differ] <= theirs[differ] * (1 + 1e-5)).all()
    assert differ.float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_rule_is_never_worse_than_the_one_it_extends(dtype):
    torch.manual_seed(3)
    x = (torch.randn(64, 256) * 0.02).to(dtype)
    xb = x.float().reshape(64, -1, 16)
    g = ref.resolve_global_scale(x, None)

    def errors(rule, weights=None, scored_with=None):
        scales = ref.quantize(x, scale_rule=rule, channel_weights=weights)[1]
        return ref.block_errors(xb, ref.block_divisors(scales, g), scored_with)

    amax, four, mse = errors("amax"), errors("four-over-six"), errors("mse")
    assert (four <= amax).all() and (mse <= four).all()
    assert (mse < amax).float().mean() > 0.3  # it changes something
    w = weights_for("mse-act", 256)
    weighted = ref.resolve_channel_weights("mse-act", w, 256, x.device)
    assert (errors("mse-act", w, weighted) <= errors("mse", None, weighted)).all()


def test_mse_act_with_unit_weights_is_mse():
    torch.manual_seed(4)
    x = torch.randn(16, 512) * 0.02
    a = ref.quantize_and_pack(x, scale_rule="mse")
    b = ref.quantize_and_pack(x, scale_rule="mse-act", channel_weights=torch.ones(512))
    assert torch.equal(a[0], b[0])
    assert_same_bits(a[1], b[1])


@pytest.mark.parametrize("rule", SCALE_RULES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_equals_the_packed_bytes_decoded(rule, dtype):
    torch.manual_seed(5)
    x = (torch.randn(2, 7, 64) * 0.05).to(dtype)
    w = weights_for(rule, 64)
    packed, scales, g = ref.quantize_and_pack(x, 0.001, scale_rule=rule, channel_weights=w)
    fq = ref.fake_quantize(x, 0.001, scale_rule=rule, channel_weights=w)
    assert_same_bits(fq, ref.dequantize(packed, scales, g, dtype=dtype))


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_zero_blocks_keep_scale_one_and_planted_cases(rule):
    x = planted()
    w = weights_for(rule, x.shape[-1])
    codes, scales, _ = ref.quantize(x, scale_rule=rule, channel_weights=w)
    zero = x.reshape(x.shape[0], -1, 16).abs().amax(-1) == 0
    assert (scales.float()[zero] == 1.0).all()
    assert (codes.reshape(x.shape[0], -1, 16)[zero] == 0).all()


@pytest.mark.parametrize("rule", SEARCHING)
def test_subnormal_scales_are_searched_too(rule):
    # g = 1: block maxima 6 * k * 2**-9 give amax-rule scales k * 2**-9, the subnormal E4M3 range
    rows = [[6.0 * 448.0] + [0.0] * 15]
    for k in range(1, 9):
        rows.append([6.0 * k * 2.0**-9] + [(j % 5) * k * 2.0**-9 * 0.9 for j in range(15)])
    x = torch.tensor(rows).reshape(1, -1)
    w = weights_for(rule, x.shape[-1])
    _, scales, g = ref.quantize(x, scale_rule=rule, channel_weights=w)
    assert float(g) == 1.0
    best, _, _ = float64_scale_search(x, 1.0, rule, w)
    assert torch.equal(_bytes(scales), best)
    assert (_bytes(scales)[0, 1:] < 16).all()


def test_four_over_six_clamps_the_larger_candidate_at_448():
    # the block holding the tensor's max has scale 448; 1.5 * 448 clamps back to 448, so both candidates are 448
    x = torch.tensor([[6.0 * 448.0, 1000.0] + [0.0] * 14])
    _, scales, g = ref.quantize(x, scale_rule="four-over-six")
    assert float(g) == 1.0 and float(scales[0, 0]) == E4M3_MAX


def test_four_over_six_ties_keep_the_amax_scale():
    # a block of one value v: both candidates represent it exactly (6 * s or 4 * 1.5 s), zero error each
    x = torch.tensor([[6.0 * 448.0] + [0.0] * 15 + [6.0] + [0.0] * 15])
    _, scales, _ = ref.quantize(x, scale_rule="four-over-six")
    assert float(scales[0, 1]) == 1.0


def test_the_mse_range_never_holds_more_than_the_pinned_count():
    """The number of bytes from (amax byte - 2) to (1.5x byte + 2): checked at every point where either changes."""
    v = e4m3_positive_values()
    mids = (v[:-1] + v[1:]) / 2
    edges = torch.cat([v, mids, mids / FOUR_OVER_SIX_FACTOR]).to(torch.float32)
    s = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0)), torch.nextafter(edges, torch.tensor(1e9))])
    s = s[(s >= 2.0**-9) & (s <= 448)]
    amax_byte = _bytes(s.clamp(2.0**-9, 448).to(torch.float8_e4m3fn))
    four_byte = _bytes((s * FOUR_OVER_SIX_FACTOR).clamp(2.0**-9, 448).to(torch.float8_e4m3fn))
    count = (four_byte + MSE_STEPS_ABOVE).clamp(max=126) - (amax_byte - MSE_STEPS_BELOW).clamp(min=1) + 1
    assert int(count.max()) <= MSE_MAX_CANDIDATES


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_infinities_and_nan_are_refused_when_encoding(rule):
    x = torch.zeros(2, 32)
    x[1, 5] = float("inf")
    with pytest.raises(ValueError, match="'w' contains NaN or Inf"):
        ref.quantize_and_pack(x, name="w", scale_rule=rule, channel_weights=weights_for(rule, 32))


@pytest.mark.parametrize("rule", SEARCHING)
def test_fake_quantize_propagates_nan_blocks(rule):
    x = torch.randn(2, 32)
    x[0, 3] = float("nan")
    out = ref.fake_quantize(x, 0.01, scale_rule=rule, channel_weights=weights_for(rule, 32))
    assert out[0, :16].isnan().all() and not out[0, 16:].isnan().any() and not out[1].isnan().any()


def test_bad_rules_and_weights_are_refused_in_one_line():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="scale rule must be one of amax, four-over-six, mse, mse-act, not 'best'"):
        ref.quantize(x, scale_rule="best")
    with pytest.raises(ValueError, match="needs channel_weights"):
        ref.quantize(x, scale_rule="mse-act")
    with pytest.raises(ValueError, match="takes no channel weights"):
        ref.quantize(x, scale_rule="mse", channel_weights=torch.ones(32))
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        ref.quantize(x, scale_rule="mse-act", channel_weights=torch.ones(16))
    for bad in (float("inf"), float("nan"), -1.0):
        w = torch.ones(32)
        w[3] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            ref.fake_quantize(x, scale_rule="mse-act", channel_weights=w)


_values = st.one_of(
    st.just(0.0),
    st.floats(min_value=-(2.0**16), max_value=2.0**16, allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.sampled_from(DTYPES),
    st.sampled_from(SEARCHING),
    st.data(),
)
def test_property_rules_are_at_least_as_good_as_amax(rows, blocks, dtype, rule, data):
    k = 16 * blocks
    x = torch.tensor(data.draw(st.lists(_values, min_size=rows * k, max_size=rows * k))).reshape(rows, k)
    x = x.to(dtype)
    if not torch.isfinite(x).all():  # fp16 overflow of a drawn value
        return
    w = weights_for(rule, k)
    g = ref.resolve_global_scale(x, None)
    weighted = ref.resolve_channel_weights(rule, w, k, x.device)
    xb = x.float().reshape(rows, blocks, 16)
    errs = {}
    for name in ("amax", rule):
        scales = ref.quantize(x, scale_rule=name, channel_weights=w if name == rule else None)[1]
        errs[name] = ref.block_errors(xb, ref.block_divisors(scales, g), weighted)
    assert (errs[rule] <= errs["amax"]).all()
