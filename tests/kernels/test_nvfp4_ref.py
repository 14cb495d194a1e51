"""The PyTorch reference against the written definition (docs/nvfp4.md)."""

from __future__ import annotations

import pytest
import torch

from ckaqad_kernels import nvfp4_ref as ref
from ckaqad_kernels.nvfp4_spec import E2M1_VALUES, ROUNDING_BOUNDS

from .nvfp4_cases import (
    assert_same_bits,
    float64_model,
    grid_index,
    is_near_midpoint,
    planted,
    scale_midpoints,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_cases_match_the_float64_model_exactly(dtype):
    for x in (planted(dtype), scale_midpoints(dtype)):
        codes, scales, g = ref.quantize(x)
        assert float(g) == 1.0  # the anchor block pins amax = 2688
        codes64, scales64, _ = float64_model(x, 1.0)
        assert torch.equal(codes, codes64)
        assert torch.equal(scales.to(torch.float64), scales64)


def test_every_rounding_boundary_rounds_half_to_even():
    # with g = 1 and a block amax of 6, s = 1 and r = x
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    x = torch.zeros(2, 32)
    x[0, 0] = 2688.0
    x[1, 0] = 6.0
    x[1, 1:8] = mids
    x[1, 8:15] = -mids
    out = ref.fake_quantize(x)
    assert torch.equal(out[1, 1:8], expected)
    assert torch.equal(out[1, 8:15], -expected)


def test_every_float32_near_each_midpoint_grid_point_and_binade_edge_gets_the_defined_code():
    # The encoder rounds with one float add (a + 2**(22 + e)); check it, for every float32 within 4096 ulps of each
    # place where the rule changes, against the rule as written: count the midpoints passed, half to even.
    centers = [b for b, _ in ROUNDING_BOUNDS] + list(E2M1_VALUES[1:]) + [6.5, 8.0, 2.0**-126, 1e30]
    offsets = torch.arange(-4096, 4097, dtype=torch.int32)
    bits = torch.cat([torch.tensor([c], dtype=torch.float32).view(torch.int32) + offsets for c in centers])
    r = bits[bits >= 0].view(torch.float32)
    r = torch.cat([r, -r, torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])
    a = r.double().abs()
    index = sum(((a >= b) if up else (a > b)).long() for b, up in ROUNDING_BOUNDS)
    expected = index | ((r < 0).long() << 3)
    assert torch.equal(ref._e2m1_codes(r).long(), expected)
    magnitude = torch.tensor(E2M1_VALUES, dtype=torch.float64)[index]
    values = ref._e2m1_values(r)
    assert torch.equal(values.double().abs(), magnitude)
    assert torch.equal(torch.signbit(values), r < 0)  # -0.0 exactly where a negative r rounds to 0
    assert ref._e2m1_values(torch.tensor([float("nan")])).isnan().all()


def test_random_bf16_agrees_with_float64_model_except_one_step_at_boundaries():
    torch.manual_seed(0)
    x = torch.randn(256, 512, dtype=torch.bfloat16)
    codes, scales, g = ref.quantize(x)
    codes64, scales64, r64 = float64_model(x, float(g))
    assert torch.equal(scales.to(torch.float64), scales64)
    diff = codes != codes64
    assert diff.float().mean() < 0.01
    assert ((grid_index(codes) - grid_index(codes64)).abs()[diff] == 1).all()
    assert is_near_midpoint(r64[diff]).all()


def test_zero_tensor_zero_blocks_and_their_scale_byte():
    x = torch.zeros(3, 32, dtype=torch.bfloat16)
    packed, scales, g = ref.quantize_and_pack(x)
    assert float(g) == 1.0
    assert (packed == 0).all()
    assert (scales.view(torch.uint8) == 0x38).all()  # E4M3 1.0
    assert not ref.dequantize(packed, scales, g).any()


def test_static_global_scale_saturates_instead_of_nan():
    x = torch.full((1, 16), 1000.0)
    codes, scales, _ = ref.quantize(x, global_scale=1e-3)  # s = 1000 / 0.006, far above 448
    assert float(scales.float().max()) == 448.0
    assert (codes == 7).all()
    assert torch.allclose(ref.fake_quantize(x, 1e-3), torch.full_like(x, 6 * 448 * 1e-3))


def test_pack_nibble_order_and_round_trip():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)
    packed = ref.pack_fp4(codes)
    assert packed[0, 0] == 0x10 and packed[0, 1] == 0x32  # element 0 low nibble, element 1 high
    assert torch.equal(ref.unpack_fp4(packed), codes)


@pytest.mark.parametrize("shape", [(1, 16), (5, 48), (2, 3, 64)])
def test_quantize_and_pack_equals_pack_of_quantize_and_dequantize_inverts_it(shape):
    torch.manual_seed(1)
    x = torch.randn(shape) * 5
    codes, scales, g = ref.quantize(x)
    packed, scales2, g2 = ref.quantize_and_pack(x)
    assert torch.equal(packed, ref.pack_fp4(codes))
    assert_same_bits(scales, scales2)
    values = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))[codes.long()]
    d = (scales.float() * g).repeat_interleave(16, dim=-1)
    assert torch.equal(ref.dequantize(packed, scales, g), values * d)


def test_chunked_pack_matches_one_pass(monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(37, 96, dtype=torch.bfloat16)
    whole = ref.quantize_and_pack(x)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(ref, "ROWS_PER_CHUNK_ELEMENTS", 200)  # 2 rows per chunk, ragged last chunk
    chunked = ref.quantize_and_pack(x)
    for a, b in zip(whole, chunked, strict=True):
        assert_same_bits(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_equals_dequantize_of_quantize_bit_for_bit(dtype):
    torch.manual_seed(3)
    x = torch.cat([torch.randn(8, 64, dtype=dtype), planted(dtype)[:, :32].repeat(1, 2)])
    for g in (None, 0.004):
        packed, scales, gq = ref.quantize_and_pack(x, g)
        assert_same_bits(ref.fake_quantize(x, g), ref.dequantize(packed, scales, gq, dtype=dtype))


def test_last_dim_not_multiple_of_16_is_refused():
    x = torch.randn(4, 40)
    for fn in (ref.quantize, ref.quantize_and_pack, ref.fake_quantize):
        with pytest.raises(ValueError, match="multiple of 16"):
            fn(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_is_an_error_naming_it_and_propagates_in_fake_quant(bad):
    x = torch.randn(2, 32)
    x[1, 20] = bad
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight"):
        ref.quantize_and_pack(x, name="model.layers.3.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ref.quantize(x, global_scale=0.01)
    assert torch.isnan(ref.fake_quantize(x)).all()  # dynamic g is non-finite: everything NaN
    static = ref.fake_quantize(x, 0.01)
    assert torch.isnan(static[1, 16:]).all() and torch.isfinite(static[:, :16]).all()
    assert torch.isfinite(static[0]).all()


def test_global_scale_from_amax():
    assert float(ref.global_scale_from_amax(2688.0)) == 1.0
    assert float(ref.global_scale_from_amax(0.0)) == 1.0
    g = ref.global_scale_from_amax(torch.tensor(3.0, dtype=torch.bfloat16))
    assert g.dtype == torch.float32 and g.shape == () and float(g) == float(torch.tensor(3.0) / 2688)


def test_swizzle_places_each_scale_at_the_documented_byte():
    torch.manual_seed(4)
    m, kb = 200, 9
    raw = torch.randint(1, 0x7F, (m, kb), dtype=torch.uint8)
    out = ref.swizzle_block_scales(raw.view(torch.float8_e4m3fn)).view(torch.uint8)
    assert out.shape == (256, 12)
    flat = out.reshape(-1)
    col_tiles = 3
    for i in range(m):
        for k in range(kb):
            tile = (i // 128) * col_tiles + k // 4
            assert flat[tile * 512 + (i % 32) * 16 + ((i // 32) % 4) * 4 + k % 4] == raw[i, k]
    assert int((flat != 0).sum()) == m * kb  # the padding is zero
    batched = ref.swizzle_block_scales(raw.repeat(2, 1, 1).view(torch.float8_e4m3fn)).view(torch.uint8)
    assert torch.equal(batched[1], out)
