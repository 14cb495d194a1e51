"""Triton kernels (TRITON_INTERPRET=1 on the CPU) against the PyTorch reference, bit for bit; dispatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ckaqad_kernels import dispatch, nvfp4_triton  # noqa: E402
from ckaqad_kernels import nvfp4_ref as ref  # noqa: E402

from .nvfp4_cases import assert_same_bits, planted, scale_midpoints  # noqa: E402

if not dispatch.triton_interpreted() and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 before import", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# rows = 1, widths below / not a multiple of the kernel tile (TILE_K = 128), rows not a multiple of TILE_M
SHAPES = ((1, 16), (1, 144), (3, 48), (17, 272), (2, 5, 32))


def _both(x, g=None, swizzle=False):
    x = x.to(DEVICE)
    t = dispatch.quantize_and_pack(x, g, backend="triton", swizzle=swizzle)
    r = dispatch.quantize_and_pack(x, g, backend="torch", swizzle=swizzle)
    return t, r


def _check(x, g=None):
    (tp, ts, tg), (rp, rs, rg) = _both(x, g)
    assert_same_bits(tg, rg)
    assert torch.equal(tp, rp)
    assert_same_bits(ts, rs)
    x = x.to(DEVICE)
    assert_same_bits(dispatch.fake_quantize(x, g, backend="triton"), dispatch.fake_quantize(x, g, backend="torch"))


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
