"""Activation quantization as the engines compute it (docs/nvfp4.md, "Activations as engines quantize them"):
ckaqad's arithmetic="reciprocal" against a block-by-block transcription of vLLM's / TensorRT-LLM's
cvt_warp_fp16_to_fp4, written here with numpy float32 scalars and table look-ups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckaqad_kernels import dispatch
from ckaqad_kernels import nvfp4_ref as ref
from ckaqad_kernels.fake_quant import fake_quantize_ste

from .nvfp4_cases import GRID, assert_same_bits, e4m3_positive_values, round_half_even_on

F32 = np.float32
E4M3 = torch.cat([torch.zeros(1, dtype=torch.float64), e4m3_positive_values()])


def rcp(a: np.float32) -> np.float32:
    """rcp.approx.ftz.f32, modelled as the correctly rounded float32 reciprocal."""
    return F32(1.0) / a


def fp8_e4m3_satfinite(v: np.float32) -> np.float32:
    """__nv_fp8_e4m3(float): round to nearest even among the E4M3 values, saturating at 448."""
    idx = round_half_even_on(E4M3, torch.tensor([min(float(v), 448.0)], dtype=torch.float64))
    return F32(E4M3[idx].item())


def e2m1_rn_satfinite(v: np.float32) -> float:
    """cvt.rn.satfinite.e2m1x2.f32: nearest E2M1 value, ties to the even code, saturating at +-6."""
    mag = GRID[round_half_even_on(GRID, torch.tensor([min(abs(float(v)), 6.0)], dtype=torch.float64))].item()
    return -mag if v < 0 else mag


def engine_block(x16: np.ndarray, sf_scale: np.float32, g: np.float32) -> list[float]:
    """One block of 16, as the kernel quantizes it; the value each code stands for once the GEMM scales it by
    input_scale (g): E2M1 * float(sf8) * g."""
    vec_max = F32(np.max(np.abs(x16)))
    sf_value = sf_scale * (vec_max * rcp(F32(6.0)))
    sf8 = fp8_e4m3_satfinite(sf_value)
    output_scale = rcp(sf8 * rcp(sf_scale)) if sf8 != 0 else F32(0.0)
    d = sf8 * g
    return [float(F32(e2m1_rn_satfinite(F32(v) * output_scale)) * d) for v in x16]


def engine_fake_quant(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    gf = F32(float(g))
    sf_scale = F32(1.0) / gf  # vLLM: input_scale_inv = 1 / input_scale
    rows = x.to(torch.float32).reshape(-1, 16).numpy()
    out = [engine_block(row, sf_scale, gf) for row in rows]
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reciprocal_arithmetic_is_the_engines(dtype):
    torch.manual_seed(21)
    x = (torch.randn(6, 64) * torch.logspace(-3, 1, 6).unsqueeze(-1)).to(dtype)
    x[2, 16:32] = 0  # zero block: scale byte 0 in the engine
    x[4, 32:48] = 5e-5  # a block whose scale underflows E4M3 at the static scale below: zeroed by the engine
    for g in (ref.resolve_global_scale(x, None), torch.tensor(0.02)):
        got = ref.fake_quantize(x, g, arithmetic="reciprocal")
        assert_same_bits(got, engine_fake_quant(x, g))
        assert_same_bits(dispatch.fake_quantize(x, g, backend="torch", arithmetic="reciprocal"), got)
    assert (ref.fake_quantize(x, 0.02, arithmetic="reciprocal")[4, 32:48] == 0).all()
    assert (ref.fake_quantize(x, 0.02)[4, 32:48] != 0).all()  # the definition clamps the scale at 2**-9


def test_divide_and_reciprocal_differ_only_near_ties():
    """On bf16 activations the two arithmetics give the same values almost everywhere (issue 21 measured 268 of
    655,360 codes with vLLM); each difference is one E2M1 step or one E4M3 scale step."""
    torch.manual_seed(22)
    x = (torch.randn(256, 1024) * 3).to(torch.bfloat16)
    g = ref.resolve_global_scale(x, None)
    a = ref.fake_quantize(x, g).float()
    b = ref.fake_quantize(x, g, arithmetic="reciprocal").float()
    differ = a != b
    assert 0 < int(differ.sum()) < x.numel() // 500


def test_the_ste_takes_the_arithmetic_and_nan_propagates():
    torch.manual_seed(23)
    x = torch.randn(2, 32, requires_grad=True)
    out = fake_quantize_ste(x, arithmetic="reciprocal", zero_grad_clipped=True)
    assert_same_bits(out.detach(), ref.fake_quantize(x.detach(), arithmetic="reciprocal"))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    y = torch.randn(2, 32)
    y[1, 5] = float("inf")
    got = ref.fake_quantize(y, 0.01, arithmetic="reciprocal")
    assert got[1, :16].isnan().all() and not got[0].isnan().any() and not got[1, 16:].isnan().any()
    with pytest.raises(ValueError, match="activation arithmetic must be one of divide, reciprocal, not 'x'"):
        ref.fake_quantize(y, arithmetic="x")
    with pytest.raises(ValueError, match="takes the amax scale rule"):
        ref.fake_quantize(y, arithmetic="reciprocal", scale_rule="mse")
