"""The C kernels (nvfp4_cpu: quantize-and-pack, fake quantization) against the PyTorch reference, bit for bit; their
build and dispatch."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ckaqad_kernels import dispatch, nvfp4_cpu
from ckaqad_kernels.fake_quant import fake_quantize_ste
from ckaqad_kernels import nvfp4_ref as ref
from ckaqad_kernels.nvfp4_spec import SCALE_RULES

from .nvfp4_cases import assert_same_bits, float64_model, planted, scale_midpoints, weights_for

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def test_the_kernel_builds_where_a_compiler_is_found():
    """Not a silent skip: on a machine with cc (CI's), the kernel must build and load."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert nvfp4_cpu.available(), nvfp4_cpu.unavailable_reason()


needs_kernel = pytest.mark.skipif(not nvfp4_cpu.available(), reason=f"C kernel: {nvfp4_cpu.unavailable_reason()}")


def _check(x: torch.Tensor, g=None, rules=SCALE_RULES) -> None:
    """C against the reference under every scale rule (mse-act with weights_for's channel weights)."""
    for rule in rules:
        w = weights_for(rule, x.shape[-1])
        cp, cs, cg = nvfp4_cpu.quantize_and_pack(x, g, scale_rule=rule, channel_weights=w)
        rp, rs, rg = ref.quantize_and_pack(x, g, scale_rule=rule, channel_weights=w)
        assert_same_bits(cg, rg)
        assert cp.dtype == torch.uint8 and cp.shape == rp.shape
        assert torch.equal(cp, rp), rule
        assert cs.dtype == torch.float8_e4m3fn
        assert_same_bits(cs, rs)


def _check_fake(x: torch.Tensor, g=None, rules=SCALE_RULES) -> None:
    """C fake quantization against the reference under every scale rule: the same bits, NaN where it has NaN (a NaN's
    payload and sign are not specified)."""
    for rule in rules:
        w = weights_for(rule, x.shape[-1])
        c = nvfp4_cpu.fake_quantize(x, g, scale_rule=rule, channel_weights=w)
        r = ref.fake_quantize(x, g, scale_rule=rule, channel_weights=w)
        assert c.dtype == x.dtype and c.shape == x.shape
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(c), nan), rule
        assert_same_bits(c[~nan], r[~nan])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (3, 48), (17, 272), (2, 5, 32), (3, 4096 + 64), (300, 4096 * 2)])
def test_random_shapes_bit_exact(shape, dtype):
    # widths across the kernel's 4096-element row pieces; 300 x 8192 splits into several row tasks on two threads;
    # quantize-and-pack and fake quantization alike
    torch.manual_seed(sum(shape) + DTYPES.index(dtype))
    x = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(x)
        _check_fake(x)
    finally:
        torch.set_num_threads(before)
    _check(x, 0.37)
    _check_fake(x, 0.37)
    _check_fake(x.transpose(0, -2) if x.ndim > 2 else x.T.contiguous().T)  # not contiguous


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_cases_and_every_scale_midpoint_bit_exact(dtype):
    for check in (_check, _check_fake):
        check(planted(dtype))
        check(scale_midpoints(dtype))  # every E4M3 value and midpoint, subnormal scales included
    codes, _, _ = float64_model(planted(dtype), 1.0)  # and the definition itself, in float64
    assert torch.equal(ref.unpack_fp4(nvfp4_cpu.quantize_and_pack(planted(dtype))[0]), codes)


@needs_kernel
def test_every_float32_block_scale_rounds_like_the_reference():
    """Block amaxes sweeping the float32 values from 2**-10 to 460 (every 1009th bit pattern) with g = 1/6, where
    6 * g is exactly 1, so s = a_b: every E4M3 binade, subnormal and saturated, and the rounding between them."""
    g = torch.tensor(1 / 6, dtype=torch.float32)
    assert float(6 * g) == 1.0
    lo = torch.tensor(2.0**-10).view(torch.int32).item()
    hi = torch.tensor(460.0).view(torch.int32).item()
    amax = torch.arange(lo, hi, 1009, dtype=torch.int32).view(torch.float32)
    blocks = torch.rand(len(amax), 16, generator=torch.Generator().manual_seed(0)) * amax[:, None]
    blocks[:, 3] = -amax  # the amax, negative
    _check(blocks, g)
    _check_fake(blocks, g)


@needs_kernel
def test_every_bfloat16_value_bit_exact():
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = bits[torch.isfinite(bits)]
    x = finite[: len(finite) // 16 * 16].reshape(-1, 16)
    _check(x)  # one global scale from the largest bf16: most blocks clamp to the smallest scale
    for g in (1.0, 2.0**-100, 2.0**100):  # scales saturating at 448 or clamped at 2**-9 for most blocks
        _check(x, g)


finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@needs_kernel
@settings(max_examples=200, deadline=None)
@given(
    arrays(dtype="float32", shape=st.tuples(st.integers(1, 4), st.sampled_from([16, 32, 80])), elements=finite_float32),
    st.one_of(st.none(), st.floats(min_value=2.0**-100, max_value=2.0**100, width=32)),
)
def test_any_float32_input_bit_exact(x, g):
    _check(torch.from_numpy(x.copy()), g)
    _check_fake(torch.from_numpy(x.copy()), g)


@needs_kernel
def test_non_contiguous_input_and_zeros():
    torch.manual_seed(3)
    x = torch.randn(64, 48, dtype=torch.bfloat16).T  # [48, 64], not contiguous
    for check in (_check, _check_fake):
        check(x)
        check(torch.zeros(2, 32, dtype=torch.float16))
        check(torch.zeros(0, 32))


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_raises_naming_the_tensor(bad):
    x = torch.randn(40, 4096 + 32)
    x[37, 4100] = bad  # in the second row piece of a late row
    for rule in SCALE_RULES:
        with pytest.raises(ValueError, match="'layer.w'"):
            nvfp4_cpu.quantize_and_pack(x, 0.01, name="layer.w", scale_rule=rule,
                                        channel_weights=weights_for(rule, x.shape[-1]))
    with pytest.raises(ValueError, match="'layer.w'"):
        nvfp4_cpu.quantize_and_pack(torch.ones(1, 16), float("nan"), name="layer.w")


@needs_kernel
def test_wrong_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_cpu.quantize_and_pack(torch.ones(2, 24))
    with pytest.raises(ValueError, match="CPU tensors"):
        nvfp4_cpu.quantize_and_pack(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="not 'best'"):
        nvfp4_cpu.quantize_and_pack(torch.ones(2, 16), scale_rule="best")
    with pytest.raises(ValueError, match="finite and non-negative"):
        nvfp4_cpu.quantize_and_pack(torch.ones(2, 16), scale_rule="mse-act", channel_weights=torch.full((16,), -1.0))


@needs_kernel
def test_dispatch_picks_the_c_kernel_on_cpu(monkeypatch):
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert dispatch.quantize_and_pack_backend(x) == "c"
    assert dispatch.quantize_and_pack_backend(x, "torch") == "torch"
    assert dispatch.quantize_and_pack_backend(x.double()) == "torch"  # float64: the reference
    calls = []
    real = nvfp4_cpu.quantize_and_pack
    monkeypatch.setattr(nvfp4_cpu, "quantize_and_pack", lambda *a, **k: calls.append(1) or real(*a, **k))
    packed, scales, _ = dispatch.quantize_and_pack(x, swizzle=True)
    assert calls == [1]
    assert torch.equal(packed, ref.quantize_and_pack(x)[0])
    assert scales.shape == (128, 4)  # swizzled like the other backends
    dispatch.quantize_and_pack(x, backend="torch")
    assert calls == [1]


@needs_kernel
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fake_quantize_propagates_a_nonfinite_block_as_nan(bad):
    """A block holding NaN or Inf decodes to NaN and its neighbours are untouched (the scale search of the other
    blocks of its row piece included); a non-finite or zero global scale gives what the reference gives."""
    torch.manual_seed(5)
    x = torch.randn(40, 4096 + 32)
    x[37, 4100] = bad  # in the second row piece of a late row
    for g in (None, 0.01, float("nan"), float("inf"), 0.0):
        _check_fake(x, g)
    out = nvfp4_cpu.fake_quantize(x, 0.01)
    assert torch.isnan(out[37, 4096:4112]).all() and not torch.isnan(out[37, 4112:]).any()
    assert torch.isnan(nvfp4_cpu.fake_quantize(x)).all()  # the dynamic global scale of amax = Inf or NaN


@needs_kernel
def test_fake_quantize_dispatch_and_training_use_the_c_kernel(monkeypatch):
    """dispatch and fake_quantize_ste run the C kernel on CPU tensors (not for the engines' reciprocal arithmetic,
    which only the reference computes); the gradient still passes straight through."""
    calls = []
    real = nvfp4_cpu.fake_quantize
    monkeypatch.setattr(nvfp4_cpu, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(8, 64, requires_grad=True)
    y = fake_quantize_ste(x)
    assert calls == [1]
    assert_same_bits(y.detach(), ref.fake_quantize(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    dispatch.fake_quantize(x.detach(), backend="torch")
    dispatch.fake_quantize(x.detach(), arithmetic="reciprocal")
    dispatch.fake_quantize(x.detach().double())
    assert calls == [1]
    dispatch.fake_quantize(x.detach(), backend="c")
    assert calls == [1, 1]


def test_build_is_cached_and_a_broken_compiler_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CKAQAD_CACHE", str(tmp_path))
    nvfp4_cpu._library.cache_clear()
    try:
        monkeypatch.setenv("CC", "false")  # exists, exits 1: the build fails
        if shutil.which("false") is None:
            pytest.skip("no `false` command")
        assert not nvfp4_cpu.available()
        assert "failed" in nvfp4_cpu.unavailable_reason()
        assert dispatch.quantize_and_pack_backend(torch.ones(1, 16)) == "torch"  # auto falls back
        with pytest.raises(RuntimeError, match="not available"):
            nvfp4_cpu.quantize_and_pack(torch.ones(1, 16))
        assert not any(tmp_path.rglob("*.so"))  # nothing half-built left in the cache
        monkeypatch.setenv("CKAQAD_CPU_KERNEL", "0")
        nvfp4_cpu._library.cache_clear()
        assert "CKAQAD_CPU_KERNEL=0" in nvfp4_cpu.unavailable_reason()
        monkeypatch.delenv("CKAQAD_CPU_KERNEL")
        monkeypatch.delenv("CC")
        nvfp4_cpu._library.cache_clear()
        if nvfp4_cpu._compiler() is None:
            return
        assert nvfp4_cpu.available()
        built = list(tmp_path.rglob("*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        nvfp4_cpu._library.cache_clear()
        assert nvfp4_cpu.available()
        assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt
    finally:
        nvfp4_cpu._library.cache_clear()
