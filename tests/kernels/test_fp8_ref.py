"""FP8 W8A8 reference (kernels/fp8_ref.py) against compressed-tensors' FP8_DYNAMIC and against float64: weights with
bf16-exact scales per output channel, inputs with compressed-tensors' own per-token scales."""

from __future__ import annotations

import pytest
import torch

from ckaqad_kernels import fp8_ref


def _tensors() -> list[torch.Tensor]:
    torch.manual_seed(5)
    heavy = torch.distributions.StudentT(2.0).sample((64, 96)) * 0.05
    spread = torch.randn(48, 128) * torch.logspace(-4, 2, 48)[:, None]  # rows of very different scale
    zero_row = torch.randn(8, 32)
    zero_row[3] = 0
    tiny = torch.randn(4, 64) * 1e-30  # scales in float32's subnormal range
    return [torch.randn(32, 64), heavy, spread, zero_row, tiny]


def _e4m3_nearest_even_f64(r: torch.Tensor) -> torch.Tensor:
    """Round float64 values (|r| <= 448) to E4M3 by enumeration of the grid, ties to the even code."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64)
    codes = torch.arange(256)
    keep = torch.isfinite(grid) & (grid >= 0)
    grid, codes = grid[keep], codes[keep]
    mag = r.abs().reshape(-1, 1)
    dist = (mag - grid).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    even = tied & (codes % 2 == 0)
    pick = torch.where(even.any(dim=1, keepdim=True), even, tied).float().argmax(dim=1)
    return (grid[pick] * r.sign().reshape(-1)).reshape(r.shape)


def _bf16_up(s: torch.Tensor) -> torch.Tensor:
    """The least bfloat16 value >= s (float32 in and out): the nearest, or the next one up when the nearest is below."""
    nearest = s.to(torch.bfloat16)
    up = torch.nextafter(nearest, torch.tensor(float("inf"), dtype=torch.bfloat16))
    return torch.where(nearest.float() >= s, nearest.float(), up.float())


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("case", range(5))
def test_values_equal_a_float64_rounding_of_the_definition(case, weights):
    x = _tensors()[case]
    scale = (x.double().abs().amax(dim=-1, keepdim=True) / 448).float()  # amax exact, one correctly rounded division
    scale = torch.where(scale == 0, torch.tensor(fp8_ref.SCALE_FOR_ZERO_ROW), scale)
    if weights:
        scale = _bf16_up(scale)
        assert torch.equal(scale.to(torch.bfloat16).float(), scale)
    r = (x.double() / scale.double()).float().double().clamp(-448, 448)
    expected = (_e4m3_nearest_even_f64(r) * scale.double()).float()
    got = fp8_ref.fake_quantize_weight(x) if weights else fp8_ref.fake_quantize_tokens(x)
    assert torch.equal(got, expected)
    if weights:
        codes, got_scale = fp8_ref.quantize_weight(x)
        assert torch.equal(got_scale, scale) and codes.dtype == torch.float8_e4m3fn


def test_an_all_zero_row_decodes_to_zero_and_others_keep_their_amax():
    x = _tensors()[3]
    codes, scale = fp8_ref.quantize_weight(x)
    assert scale[3].item() == fp8_ref.SCALE_FOR_ZERO_ROW
    assert (codes[3].to(torch.float32) == 0).all()
    for out in (fp8_ref.fake_quantize_weight(x), fp8_ref.fake_quantize_tokens(x)):
        assert (out[3] == 0).all()
    # per token the largest magnitude of each row is code 448 times amax / 448: amax to within a float32 step
    rows = [i for i in range(x.shape[0]) if i != 3]
    out = fp8_ref.fake_quantize_tokens(x)
    assert torch.allclose(out[rows].abs().amax(dim=1), x[rows].abs().amax(dim=1), rtol=2**-22, atol=0)


def test_nan_and_inf_make_their_row_nan():
    x = torch.randn(3, 32)
    x[0, 5], x[2, 7] = float("nan"), float("inf")
    for out in (fp8_ref.fake_quantize_weight(x), fp8_ref.fake_quantize_tokens(x)):
        assert out[0].isnan().all() and out[2].isnan().all() and torch.isfinite(out[1]).all()


def test_bfloat16_inputs_are_upcast_and_the_output_keeps_their_dtype():
    x = torch.randn(16, 64).to(torch.bfloat16)
    for fake in (fp8_ref.fake_quantize_weight, fp8_ref.fake_quantize_tokens):
        out = fake(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, fake(x.float()).to(torch.bfloat16))


@pytest.fixture(scope="module")
def ct_fp8():
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    return scheme, calculate_qparams, quantize, dequantize


@pytest.mark.parametrize("case", range(5))
def test_weights_match_compressed_tensors_bit_for_bit(ct_fp8, case):
    scheme, calculate_qparams, quantize, dequantize = ct_fp8
    w = _tensors()[case]
    amax = w.abs().amax(dim=1, keepdim=True)
    scale, zero = calculate_qparams(-amax, amax, scheme.weights)
    assert torch.equal(fp8_ref.row_scales(w), scale)  # their scale; ours rounds it up to bfloat16
    codes, ours = fp8_ref.quantize_weight(w)
    assert torch.equal(ours, _bf16_up(scale))
    theirs = quantize(w, ours, zero, scheme.weights, dtype=torch.float8_e4m3fn)  # their quantizer, our scale
    assert torch.equal(codes.view(torch.uint8), theirs.view(torch.uint8))
    assert torch.equal(fp8_ref.dequantize(codes, ours), dequantize(theirs, ours, zero, scheme.weights))
    # a bf16 reader (transformers' bf16 scale parameters) decodes the same values: scale and product exact
    assert torch.equal(fp8_ref.dequantize(codes, ours, torch.bfloat16),
                       codes.to(torch.bfloat16) * ours.to(torch.bfloat16))


@pytest.mark.parametrize("case", range(5))
def test_inputs_match_compressed_tensors_per_token_fake_quantization(ct_fp8, case):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    scheme, calculate_qparams, _, _ = ct_fp8
    x = _tensors()[case].unsqueeze(0)  # [batch, tokens, features]
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale, zero = calculate_qparams(-amax, amax, scheme.input_activations)
    theirs = fake_quantize(x, scale, zero, scheme.input_activations)
    assert torch.equal(fp8_ref.fake_quantize_tokens(x), theirs)
