"""Against independent implementations: compressed-tensors and NVIDIA ModelOpt (both in the test extra).

Decoding: each library's dequantizer applied to our bytes, under every scale rule, gives our values. Encoding: each library's own quantizer
agrees with our codes on >= 99% of elements, and every difference is one grid step at a rounding boundary.
"""

from __future__ import annotations

import pytest
import torch

from ckaqad_kernels import dispatch
from ckaqad_kernels import nvfp4_ref as ref
from ckaqad_kernels.nvfp4_spec import SCALE_RULES

from .nvfp4_cases import grid_index, is_near_midpoint


def _weights() -> list[torch.Tensor]:
    torch.manual_seed(11)
    return [
        torch.randn(256, 512, dtype=torch.bfloat16),
        (torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02).to(torch.bfloat16),  # heavy tails
        (torch.randn(64, 1024) * torch.logspace(-3, 1, 1024)).to(torch.bfloat16),  # channels of very different scale
    ]


def _assert_codes_close(ours: torch.Tensor, theirs: torch.Tensor, r: torch.Tensor) -> None:
    diff = ours != theirs
    assert 1 - diff.float().mean() >= 0.99
    assert ((grid_index(ours) - grid_index(theirs)).abs()[diff] == 1).all()
    assert is_near_midpoint(r[diff]).all()


@pytest.fixture(scope="module")
def ct():
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    return NVFP4PackedCompressor, quantize_and_pack_fp4, preset_name_to_scheme("NVFP4A16", ["Linear"]).weights, (
        calculate_qparams, generate_gparam)


def _encode(w: torch.Tensor, g: torch.Tensor | None, rule: str):
    """Our bytes under a scale rule (mse-act with channel weights that vary over four orders of magnitude)."""
    weights = 10.0 ** torch.linspace(-2, 2, w.shape[-1]) if rule == "mse-act" else None
    return dispatch.quantize_and_pack(w, g, scale_rule=rule, channel_weights=weights)


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_compressed_tensors_decompresses_our_bytes_to_our_values(ct, rule):
    compressor, _, args, _ = ct
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    for w in _weights():
        for g in (None, torch.tensor(2.0**-14)):  # natural g, and one whose reciprocal is exact
            packed, scales, gq = _encode(w, g, rule)
            # compressed-tensors stores the reciprocal of our g (its converter from ModelOpt does the same)
            state = {"weight_packed": packed, "weight_scale": scales, "weight_global_scale": (1 / gq).reshape(1)}
            theirs = compressor.decompress(state, scheme)["weight"]
            ours = ref.dequantize(packed, scales, gq, dtype=theirs.dtype)
            assert theirs.dtype == torch.bfloat16
            assert torch.equal(theirs, ours)


def test_compressed_tensors_quantizer_agrees_on_codes(ct):
    _, quantize_and_pack_fp4, args, (calculate_qparams, generate_gparam) = ct
    for w in _weights():
        rows, k = w.shape
        wf = w.float()  # an observer in float32: block amaxes are exact
        global_scale = generate_gparam(wf.amin(), wf.amax())
        blocks = wf.reshape(rows, k // 16, 16)
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
        theirs = ref.unpack_fp4(quantize_and_pack_fp4(w, scale, global_scale=global_scale))
        codes, scales, g = ref.quantize(w)
        assert (codes == theirs).float().mean() >= 0.99
        # A block scale may differ only at an exact E4M3 tie (their float32 order lands just past it): one step.
        their_bytes = scale.to(torch.float8_e4m3fn).view(torch.uint8)
        other = their_bytes != scales.view(torch.uint8)
        assert ((their_bytes.int() - scales.view(torch.uint8).int()).abs()[other] == 1).all()
        s64 = blocks.abs().amax(-1).double() / (6 * g.double())
        tie = (scales.double() + their_bytes.view(torch.float8_e4m3fn).double()) / 2
        assert torch.allclose(s64[other], tie[other], rtol=1e-6, atol=0)
        # Elsewhere every code difference is one grid step at a rounding boundary.
        same = (~other).repeat_interleave(16, dim=-1)
        r = ref.scaled_blocks(w, g).reshape(w.shape)
        _assert_codes_close(codes[same], theirs[same], r[same])


@pytest.fixture(scope="module")
def nvfp4_qtensor():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    return NVFP4QTensor


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_modelopt_dequantizes_our_bytes_to_our_values(nvfp4_qtensor, rule):
    for w in _weights():
        packed, scales, g = _encode(w, None, rule)
        qt = nvfp4_qtensor(w.shape, torch.float32, packed)
        theirs = qt.dequantize(dtype=torch.float32, scale=scales, double_scale=g, block_sizes={-1: 16})
        assert torch.equal(theirs, ref.dequantize(packed, scales, g))


def test_modelopt_quantizer_agrees_on_codes(nvfp4_qtensor):
    for w in _weights():
        qt, their_scales, their_g = nvfp4_qtensor.quantize(w.clone(), 16)
        codes, scales, g = ref.quantize(w)
        assert float(their_g) == float(g)
        assert torch.equal(their_scales.view(torch.uint8), scales.view(torch.uint8))
        r = ref.scaled_blocks(w, g).reshape(w.shape)
        _assert_codes_close(codes, ref.unpack_fp4(qt._quantized_data), r)
