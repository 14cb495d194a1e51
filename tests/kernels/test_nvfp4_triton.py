"""Triton kernels (TRITON_INTERPRET=1 on the CPU) against the PyTorch reference, bit for bit; dispatch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from ckaqad_kernels import dispatch, nvfp4_cpu, nvfp4_triton  # noqa: E402
from ckaqad_kernels import nvfp4_ref as ref  # noqa: E402

from ckaqad_kernels.nvfp4_spec import SCALE_RULES  # noqa: E402

from .nvfp4_cases import assert_same_bits, planted, scale_midpoints, weights_for  # noqa: E402

if not dispatch.triton_interpreted() and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 before import", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# rows = 1, widths below / not a multiple of the kernel tile (TILE_K = 128), rows not a multiple of TILE_M
SHAPES = ((1, 16), (1, 144), (3, 48), (17, 272), (2, 5, 32))


def _both(x, g=None, swizzle=False, rule="amax"):
    x = x.to(DEVICE)
    kw = {"scale_rule": rule, "channel_weights": weights_for(rule, x.shape[-1])}
    t = dispatch.quantize_and_pack(x, g, backend="triton", swizzle=swizzle, **kw)
    r = dispatch.quantize_and_pack(x, g, backend="torch", swizzle=swizzle, **kw)
    return t, r


def _check(x, g=None, rule="amax"):
    (tp, ts, tg), (rp, rs, rg) = _both(x, g, rule=rule)
    assert_same_bits(tg, rg)
    assert torch.equal(tp, rp)
    assert_same_bits(ts, rs)
    x = x.to(DEVICE)
    kw = {"scale_rule": rule, "channel_weights": weights_for(rule, x.shape[-1])}
    assert_same_bits(dispatch.fake_quantize(x, g, backend="triton", **kw),
                     dispatch.fake_quantize(x, g, backend="torch", **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_shapes_bit_exact(shape, dtype):
    torch.manual_seed(sum(shape) * 3 + DTYPES.index(dtype))
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(dtype)
    _check(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_cases_bit_exact(dtype):
    _check(planted(dtype))
    _check(scale_midpoints(dtype))  # every E4M3 value and midpoint, subnormal scales included


def test_static_global_scale_saturation_and_tiny_scales_bit_exact():
    torch.manual_seed(5)
    x = torch.randn(4, 64, dtype=torch.bfloat16) * 100
    _check(x, 1e-3)  # block scales clamp at 448
    _check(x, 1e4)  # block scales clamp up to 2**-9
    _check(torch.zeros(2, 32, dtype=torch.float16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_inputs_bit_exact(dtype):
    """Subnormal inputs of each dtype, negative ones included (their code is -0, 8, where the ratio stays below 0),
    beside normal values and in blocks of subnormals alone. The Triton interpreter's own bf16 -> float32 conversion
    loses bf16 subnormals; the kernel converts bf16 by shifting its bits."""
    tiny = torch.finfo(dtype).tiny
    torch.manual_seed(11)
    x = torch.randn(4, 64).to(dtype)
    x[:, 7] = -tiny / 3
    x[:, 9] = -tiny / 50
    x[:, 11] = tiny / 7
    x[2, 16:32] = -tiny * torch.rand(16).to(dtype) / 2  # a block of subnormals only
    assert (x.abs() < tiny).sum() >= 12 + 16 and (x[:, 9] != 0).all()
    _check(x)


def test_swizzled_scales_match_reference_swizzle():
    torch.manual_seed(6)
    x = torch.randn(130, 80, dtype=torch.bfloat16)  # two row tiles, a partial column tile
    (tp, ts, _), (rp, rs, _) = _both(x, swizzle=True)
    assert ts.shape == (256, 8)
    assert torch.equal(tp, rp)
    assert_same_bits(ts, rs)
    (_, ts3, _), (_, rs3, _) = _both(x.reshape(2, 65, 80), swizzle=True)  # batched: per matrix
    assert_same_bits(ts3, rs3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_block_propagates_in_fake_quant_kernel():
    x = torch.randn(2, 48)
    x[0, 17] = float("nan")
    x[1, 40] = float("inf")
    for g in (None, 0.01):
        t = dispatch.fake_quantize(x.to(DEVICE), g, backend="triton").cpu()
        r = ref.fake_quantize(x, g)
        assert torch.equal(torch.isnan(t), torch.isnan(r))
        assert torch.equal(t[~torch.isnan(t)], r[~torch.isnan(r)])
    with pytest.raises(ValueError, match="'w'"):
        dispatch.quantize_and_pack(x.to(DEVICE), 0.01, backend="triton", name="w")


@pytest.mark.parametrize("rule", SCALE_RULES[1:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rules_bit_exact(rule, dtype):
    """Each searching rule on a small random matrix (ragged tile edges), with a zero block and a static global scale
    that makes subnormal and saturated scales; the planted cases (the interpreter is slow: kept small)."""
    torch.manual_seed(13 + DTYPES.index(dtype))
    x = (torch.randn(3, 48) * torch.rand(3, 1) * 4).to(dtype)
    x[1, 16:32] = 0
    _check(x, rule=rule)
    _check(x, 1e-1, rule=rule)
    _check(x, 1e3, rule=rule)
    _check(planted(dtype), rule=rule)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_scale_rules_swizzled_and_nan_blocks():
    torch.manual_seed(14)
    x = torch.randn(130, 32, dtype=torch.bfloat16)
    (tp, ts, _), (rp, rs, _) = _both(x, swizzle=True, rule="mse")
    assert torch.equal(tp, rp)
    assert_same_bits(ts, rs)
    x = torch.randn(2, 32)
    x[0, 3] = float("nan")
    x[1, 20] = float("inf")
    for rule in SCALE_RULES[1:]:
        w = weights_for(rule, 32)
        t = dispatch.fake_quantize(x.to(DEVICE), 0.01, backend="triton", scale_rule=rule, channel_weights=w).cpu()
        r = ref.fake_quantize(x, 0.01, scale_rule=rule, channel_weights=w)
        assert torch.equal(torch.isnan(t), torch.isnan(r)) and torch.isnan(r[0, :16]).all()
        assert torch.equal(t[~torch.isnan(t)], r[~torch.isnan(r)])


def test_dispatch_auto_uses_the_reference_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(nvfp4_triton, "quantize_and_pack", lambda *a, **k: calls.append(a))
    dispatch.quantize_and_pack(torch.randn(2, 16))
    assert calls == []
    with pytest.raises(ValueError, match="backend"):
        dispatch.fake_quantize(torch.randn(2, 16), backend="cuda")
    with pytest.raises(ValueError, match="multiple of 16"):
        dispatch.quantize_and_pack(torch.randn(2, 24), backend="triton")
    with pytest.raises(ValueError, match="float32"):
        dispatch.fake_quantize(torch.randn(2, 16, dtype=torch.float64), backend="triton")


@settings(max_examples=8, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 3), st.sampled_from(DTYPES), st.sampled_from(SCALE_RULES),
    st.sampled_from([None, 1e-4, 1.0, 1e3]), st.integers(0, 2**16),
)
def test_property_reference_c_and_triton_give_the_same_bytes(rows, blocks, dtype, rule, g, seed):
    """Random shapes, dtypes, rules and global scales (1e3: subnormal and clamped scales; 1e-4: saturated ones),
    with a zero block: the three implementations agree to the bit."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 16 * blocks, generator=gen) * 10.0 ** torch.randint(-3, 3, (rows, 1), generator=gen))
    x[0, :16] = 0
    x = x.to(dtype)
    _check(x, g, rule=rule)
    if nvfp4_cpu.available() and DEVICE == "cpu":
        w = weights_for(rule, x.shape[-1])
        c = nvfp4_cpu.quantize_and_pack(x, g, scale_rule=rule, channel_weights=w)
        r = ref.quantize_and_pack(x, g, scale_rule=rule, channel_weights=w)
        assert torch.equal(c[0], r[0])
        assert_same_bits(c[1], r[1])
