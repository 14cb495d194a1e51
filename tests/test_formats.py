"""The two on-disk formats: configs the reference libraries accept, scale conventions, detection."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaqad_cli import formats
from ckaqad_cli.formats import compressed_tensors as ct
from ckaqad_cli.formats import layout
from ckaqad_cli.formats import modelopt as mo
from ckaqad_kernels import nvfp4_ref
from fixtures import READER_SCALE, reader_rounding_weight

finite_scales = st.floats(min_value=2.0**-100, max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_compressed_tensors_config_is_what_compressed_tensors_parses(scheme):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import NVFP4, NVFP4A16

    qc = ct.quantization_config(scheme, ["lm_head", "model.layers.0.mlp.down_proj"])
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "quant_method"})
    group = parsed.config_groups["group_0"]
    preset = NVFP4 if scheme == "w4a4" else NVFP4A16
    assert group.weights == preset["weights"]
    assert group.input_activations == preset.get("input_activations")
    assert parsed.format == "nvfp4-pack-quantized" and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head", "model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_modelopt_configs_match_modelopts_own_conversion(scheme):
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    hf = mo.hf_quant_config(scheme, ["lm_head"])
    q = hf["quantization"]
    assert {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules"} <= set(q)  # vLLM reads each
    assert q["quant_algo"] == {"w4a4": "NVFP4", "w4a16": "W4A16_NVFP4"}[scheme] and q["group_size"] == 16
    assert mo.quantization_config(scheme, ["lm_head"]) == convert_hf_quant_config_format(hf)


@settings(max_examples=300, deadline=None)
@given(finite_scales)
def test_compressed_tensors_reciprocal_decodes_back_exactly_when_possible(g_value):
    g = torch.tensor(g_value, dtype=torch.float32)
    stored = layout.encode(ct, "m", torch.zeros(1, 8, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.float8_e4m3fn), g, g)
    r = stored["m.weight_global_scale"]
    assert r.shape == (1,) and r.dtype == torch.float32
    assert torch.equal(stored["m.input_global_scale"], r)
    # within a float32 ulp of 1/g: what compressed-tensors and vLLM expect
    assert abs(float(r) * g_value - 1.0) < 2.5e-7
    back = ct.load_scale(r)
    if formats.scale_is_exact(ct, g):
        assert torch.equal(back, g)
    else:  # no float32 has a reciprocal rounding to g: nothing could be stored exactly
        near = [torch.nextafter(r, torch.tensor(d)) for d in (float("inf"), float("-inf"))]
        assert all(not torch.equal(ct.load_scale(c), g) for c in [r, *near])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.floats(1e-3, 1e3), st.integers(0, 2**31))
def test_modelopt_encode_decode_is_bit_exact(rows, blocks, amax_scale, seed):
    x = torch.randn(rows, blocks * 16, generator=torch.Generator().manual_seed(seed)) * amax_scale
    packed, scales, g = nvfp4_ref.quantize_and_pack(x)
    tensors = layout.encode(mo, "m", packed, scales, g, None)
    assert tensors["m.weight_scale_2"].shape == () and "m.input_scale" not in tensors
    for spec in layout.module_specs(mo, "m", rows, blocks * 16, "w4a16"):
        assert tensors[spec.name].dtype == spec.dtype and tuple(tensors[spec.name].shape) == spec.shape
    assert torch.equal(layout.decode(mo, tensors, "m", torch.float32), nvfp4_ref.fake_quantize(x))


def test_compressed_tensors_specs_match_encode():
    x = torch.randn(3, 32)
    packed, scales, g = nvfp4_ref.quantize_and_pack(x)
    tensors = layout.encode(ct, "a.b", packed, scales, g, torch.tensor(0.5))
    specs = layout.module_specs(ct, "a.b", 3, 32, "w4a4")
    assert [s.name for s in specs] == list(tensors)
    for spec in specs:
        assert tensors[spec.name].dtype == spec.dtype and tuple(tensors[spec.name].shape) == spec.shape


def test_detect_format(tmp_path):
    assert formats.detect_format(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": ct.quantization_config("w4a4", [])}))
    assert formats.detect_format(tmp_path) == "compressed-tensors"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": mo.quantization_config("w4a4", [])}))
    assert formats.detect_format(tmp_path) == "modelopt"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    assert formats.detect_format(tmp_path) is None
    with pytest.raises(Exception, match="unknown format"):
        formats.format_module("gguf")


@pytest.mark.parametrize("name", list(formats.FORMATS))
@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_every_format_keeps_the_protocol(name, scheme):
    """What pack, verify and the packed loader use of a format (formats/__init__.py): one module answers it all."""
    fmt = formats.FORMATS[name]
    assert fmt.NAME == name and len(fmt.PARAMS) == len(set(fmt.PARAMS)) == 4
    ignore = ["lm_head"]
    config = formats.packed_config({"model_type": "llama", "compression_config": {}}, fmt, scheme, ignore)
    assert list(config) == ["model_type", fmt.CONFIG_KEYS[0]] and fmt.is_format(config)
    assert fmt.scheme_of(config) == scheme
    assert formats.dense_config(config) == {"model_type": "llama"}
    assert set(fmt.extra_files(scheme, ignore)) == set(fmt.EXTRA_FILES)
    x = torch.randn(2, 32)
    packed, scales, g = nvfp4_ref.quantize_and_pack(x)
    tensors = layout.encode(fmt, "m", packed, scales, g, g if scheme == "w4a4" else None)
    assert [s.name for s in layout.module_specs(fmt, "m", 2, 32, scheme)] == list(tensors)
    divisors = fmt.block_divisors(scales, fmt.store_scale(g))  # the readers' own arithmetic, near our s * g
    assert divisors.dtype == torch.float32 and torch.allclose(divisors, nvfp4_ref.block_divisors(scales, g), rtol=1e-6)
    want = nvfp4_ref.dequantize_with_divisors(packed, divisors, dtype=torch.float32)
    assert torch.equal(layout.decode(fmt, tensors, "m", torch.float32), want)
    assert formats.scale_is_exact(fmt, g) == bool(layout.decoded_global_scale(fmt, g) == g)


def test_extra_files_alone_identify_a_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name, fmt in formats.FORMATS.items():
        for file, content in fmt.extra_files("w4a16", []).items():
            (tmp_path / file).write_text(json.dumps(content))
            assert formats.detect_format(tmp_path) == name
            (tmp_path / file).unlink()


def test_compressed_tensors_readers_divide_by_the_stored_reciprocal():
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    w = reader_rounding_weight()
    packed, scales, g = nvfp4_ref.quantize_and_pack(w)
    assert float(scales[1, 0].float()) == READER_SCALE and torch.equal(ct.load_scale(ct.store_scale(g)), g)
    want = nvfp4_ref.fake_quantize(w, g)
    tensors = layout.encode(ct, "m", packed, scales, g, None)
    got = layout.decode(ct, tensors, "m", torch.bfloat16)
    scheme = QuantizationScheme(targets=["Linear"], weights=preset_name_to_scheme("NVFP4A16", ["Linear"]).weights)
    state = {p: tensors[f"m.{p}"] for p in ct.PARAMS[:3]}
    theirs = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(got, theirs)  # our unpacker decodes as compressed-tensors does
    differ = got != want  # only in row 1's block, each value one bf16 step from the student's
    assert bool(differ[1, 1]) and not differ[0].any() and not differ[1, 2:].any()
    step = torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(want[differ].float().abs()))
    assert torch.equal((got[differ].float() - want[differ].float()).abs(), step)
    modelopt = layout.encode(mo, "m", packed, scales, g, None)  # ModelOpt multiplies: exact
    assert torch.equal(layout.decode(mo, modelopt, "m", torch.bfloat16), want)
