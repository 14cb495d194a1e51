"""`ckaqad pack`: both formats x both schemes on tiny Llama / Qwen3 / Qwen3-MoE models built from configs, the run
flow, sharding, tied embeddings, odd widths, every bad input, and bounded memory."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from ckaqad_cli.atomic import OUTPUT_MARKER
from ckaqad_cli import formats
from ckaqad_cli.app import app
from ckaqad_cli.quant import QuantRecipe, fused_groups, group_weight_global_scale
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.safetensors_io import INDEX_FILE, SafetensorsSource
from ckaqad_cli.packing.verify import same_bits
from ckaqad_cli.packing.write import MAX_CPU_WORKERS
from ckaqad_cli.stages.pack import PackConfig, pack_model
from ckaqad_kernels import nvfp4_ref
from fixtures import reader_rounding_weight, tiny_model_dir

runner = CliRunner()


def make_model(directory: Path, arch: str = "llama", *, student: str | None = "w4a4", tie: bool = False,
               intermediate: int = 96, shard: str | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny HF model directory of ``arch`` (llama, qwen3, qwen3moe) in the fixtures' default shape (a distilled
    student with quant_recipe.json when ``student`` names a scheme)."""
    return tiny_model_dir(directory, {"qwen3moe": "qwen3_moe"}.get(arch, arch), student=student, shard=shard,
                          dtype=dtype, intermediate_size=intermediate, tie_word_embeddings=tie)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(f"what is {i} plus {3 * i}? the answer is {4 * i}." for i in range(200)))
    return str(path)


def _assert_decodes_to(decoded: torch.Tensor, want: torch.Tensor, g: torch.Tensor, fmt: str, module: str) -> None:
    """Bit for bit; except in compressed-tensors, whose readers divide each block scale by the stored 1/g: a value
    may then differ by the divisor's two float32 steps at most (an inexact reciprocal, the division's rounding) plus
    one rounding step of the dtype (docs/formats.md, "Exactness")."""
    if fmt == "compressed-tensors":
        bound = want.float().abs() * (2.0**-22 + torch.finfo(want.dtype).eps)
        assert ((decoded.float() - want.float()).abs() <= bound).all(), module
    else:
        assert same_bits(decoded, want), module


def _expected_weights(source: Path, modules: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (fake-quantized weight the student's forward uses, its group's shared global scale)}."""
    with SafetensorsSource(source) as src:
        weights = {m: src.get(f"{m}.weight") for m in modules}
    out = {}
    groups = fused_groups(modules)
    grouped = {m for g in groups for m in g}
    for group in groups + [[m] for m in modules if m not in grouped]:
        g = group_weight_global_scale([weights[m] for m in group])
        out.update({m: (nvfp4_ref.fake_quantize(weights[m], g), g) for m in group})
    return out


@pytest.mark.parametrize(
    ("arch", "fmt", "scheme"),
    [
        ("llama", "compressed-tensors", "w4a4"),
        ("llama", "modelopt", "w4a4"),
        ("qwen3", "compressed-tensors", "w4a16"),
        ("qwen3", "modelopt", "w4a16"),
    ],
)
def test_pack_student_decodes_bit_exact_and_loads(tmp_path, calib, arch, fmt, scheme):
    source = make_model(tmp_path / "student", arch)
    out = tmp_path / "out"
    result = pack_model(PackConfig(model=str(source), out=str(out), format=fmt, scheme=scheme, calib_data=calib, calib_tokens=512, verify=True))
    summary = result.summary
    recipe = QuantRecipe.load(source)
    assert summary["modules_quantized"] == len(recipe.quantized) == 14
    assert formats.detect_format(out) == fmt
    # our unpacker gives, bit for bit, the weights the student's forward used
    decoded = formats.load_dequantized_state_dict(out)
    for module, (want, g) in _expected_weights(source, recipe.quantized).items():
        _assert_decodes_to(decoded[f"{module}.weight"], want, g, fmt, module)
    # verify took the right path and passed within its tolerance
    logits = summary["verify"]["logits"]
    assert logits["passed"] and logits["path"].startswith("ckaqad unpacker")
    exact = not summary["verify"]["weights"]["reciprocal_scale_inexact"]
    if exact:  # our unpacker, W4A4 activations included: the student's logits exactly
        assert logits["weights_only_max_abs_diff"] == logits["max_abs_diff"] == 0.0
    if fmt == "compressed-tensors":  # transformers reads the same weights: weights-only logits exact there too
        assert logits["path"].endswith("transformers + compressed-tensors (weights only)")
        through = logits["transformers"]
        if exact:
            assert through["weights_only_max_abs_diff"] == 0.0
        if scheme == "w4a16":
            assert through["max_abs_diff"] == through["weights_only_max_abs_diff"]
    else:
        assert "transformers" not in logits
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("modelopt" if fmt == "modelopt" else "compressed-tensors")
    assert "lm_head" in (config["quantization_config"]["ignore"])
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert summary["bytes_after"] < summary["bytes_before"]
    if scheme == "w4a4":  # a finite positive input scale on every quantized module
        tensors = load_file(out / "model.safetensors")
        key = "input_global_scale" if fmt == "compressed-tensors" else "input_scale"
        scales = [t for n, t in tensors.items() if n.endswith(key)]
        assert len(scales) == 14 and all(math.isfinite(float(s)) and float(s) > 0 for s in scales)


def test_w4a4_ptq_of_the_builtin_teacher_verifies_exactly_and_reports_compressed_tensors(tmp_path):
    """The gate is exactness through our unpacker, not compressed-tensors' own W4A4 arithmetic: on this small model
    its bf16 activation scales flip enough codes to move top-1 well below 1, on a checkpoint that is exact."""
    from ckaqad_cli.models import resolve_spec

    result = pack_model(PackConfig(model=resolve_spec("builtin"), out=str(tmp_path / "out"), verify=True))
    logits = result.summary["verify"]["logits"]
    assert logits["passed"] and logits["tolerance"].startswith("exact (0 difference)")
    assert logits["transformers"]["same_as_unpacker"]
    assert logits["weights_only_max_abs_diff"] == logits["max_abs_diff"] == 0.0
    assert logits["transformers"]["weights_only_max_abs_diff"] == 0.0
    assert 0.0 < logits["transformers"]["top1_agreement"] < 1.0  # reported, and below 1 here: not gated


def test_verify_logits_fail_when_one_weight_differs_from_the_student(tmp_path, monkeypatch):
    """The logits check runs its bf16 GEMMs as float32 ones on the CPU (packing.verify._cpu_linears_in_float32):
    still the same path for the student and both decodes, so a student whose weight differs from what was packed
    fails the logits check, through our unpacker and through transformers; F.linear is torch's own again after."""
    import torch.nn.functional as F

    from ckaqad_cli.errors import CkaqadError
    from ckaqad_cli.packing import verify

    native_linear, load_student = F.linear, verify.load_student

    def student_with_a_changed_row(*args, **kwargs):
        model, tokenizer = load_student(*args, **kwargs)
        with torch.no_grad():
            model.get_submodule("model.layers.1.mlp.down_proj").weight[3] *= 4
        return model, tokenizer

    monkeypatch.setattr(verify, "load_student", student_with_a_changed_row)
    source = make_model(tmp_path / "dense", student=None)
    with pytest.raises(CkaqadError, match=r"verify failed \(ckaqad unpacker; transformers") as failure:
        pack_model(PackConfig(model=str(source), out=str(tmp_path / "out"), scheme="w4a16", verify=True))
    unpacker_diff = float(re.search(r"weights only ([0-9.e+-]+)\)", str(failure.value)).group(1))
    assert unpacker_diff > 0 and "the same as our unpacker" in str(failure.value)
    assert F.linear is native_linear


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_verify_passes_where_compressed_tensors_readers_round_one_step_from_the_student(tmp_path, fmt):
    """compressed-tensors' readers divide each block scale by the stored 1/g; for some scales that decodes one bf16
    step from the student's s * g, even where 1/g is exact (tests/test_formats.py). Such a module is counted apart,
    verify passes within its tolerance and transformers' weights-only logits equal our unpacker's (the real loader
    decodes as we model it); the ModelOpt checkpoint of the same model stays bit-exact."""
    source = make_model(tmp_path / "dense", student=None)
    tensors = load_file(source / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name][:2, :16] = reader_rounding_weight()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    result = pack_model(PackConfig(model=str(source), out=str(tmp_path / "out"), format=fmt, scheme="w4a16",
                                   verify=True))
    weights, logits = result.summary["verify"]["weights"], result.summary["verify"]["logits"]
    assert logits["passed"] and not weights["mismatched"]
    if fmt == "compressed-tensors":
        assert name.removesuffix(".weight") in weights["reciprocal_scale_inexact"]
        assert logits["transformers"]["same_as_unpacker"]
    else:
        assert weights["bit_exact"] == weights["modules"] and logits["max_abs_diff"] == 0.0


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_float32_distilled_student_deploys_in_bf16_and_loads_as_written(tmp_path, calib, scheme):
    """distill saves float32 master weights: pack quantizes from them, but writes the unquantized tensors and the
    config in bf16 (auto), which transformers loads without being told a dtype; --dtype float32 keeps float32."""
    source = make_model(tmp_path / "student", student=scheme, dtype=torch.float32)
    out = tmp_path / "out"
    result = pack_model(PackConfig(model=str(source), out=str(out), calib_data=calib, calib_tokens=512, verify=True))
    assert result.summary["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == tensors["model.norm.weight"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    # the codes come from the float32 master weights, as the student trained
    expected = _expected_weights(source, QuantRecipe.load(source).quantized)
    decoded = formats.load_dequantized_state_dict(out, dtype=torch.float32)
    for module, (want, g) in expected.items():
        _assert_decodes_to(decoded[f"{module}.weight"], want, g, "compressed-tensors", module)
    logits = result.summary["verify"]["logits"]
    assert logits["passed"] and "transformers" in logits  # bf16 now: transformers reads it, weights-only exact
    if not result.summary["verify"]["weights"]["reciprocal_scale_inexact"]:
        assert logits["max_abs_diff"] == logits["transformers"]["weights_only_max_abs_diff"] == 0.0
    model = AutoModelForCausalLM.from_pretrained(out)  # no dtype given: the config's
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits.isfinite().all()

    kept = pack_model(PackConfig(model=str(source), out=str(tmp_path / "f32"), calib_data=calib, calib_tokens=512,
                                 verify=True, dtype="float32"))
    assert kept.summary["dtype"] == "float32" and kept.summary["verify"]["logits"]["passed"]
    assert load_file(tmp_path / "f32" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_bf16_student_packed_into_another_dtype_verifies_exactly(tmp_path, calib, dtype):
    """--dtype wider than or beside the source's: the reference weights are quantized in float32 and rounded once
    into the chosen dtype, as the checkpoint decodes (ModelOpt stores every global scale exactly: 0 difference)."""
    source = make_model(tmp_path / "student", student="w4a4")
    result = pack_model(PackConfig(model=str(source), out=str(tmp_path / "out"), format="modelopt", calib_data=calib,
                                   calib_tokens=512, verify=True, dtype=dtype))
    logits = result.summary["verify"]["logits"]
    assert result.summary["dtype"] == dtype and logits["tolerance"] == "exact (0 difference)"
    assert logits["weights_only_max_abs_diff"] == logits["max_abs_diff"] == 0.0 and logits["passed"]


def test_modelopt_output_matches_modelopt_and_compressed_tensors_decoders(tmp_path, calib):
    """ModelOpt's own NVFP4QTensor.dequantize and compressed-tensors' ModelOpt converter read our modelopt output."""
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    source = make_model(tmp_path / "student", "llama")
    mo, ct = tmp_path / "mo", tmp_path / "ct"
    pack_model(PackConfig(model=str(source), out=str(mo), format="modelopt", calib_data=calib, calib_tokens=512, verify=False))
    pack_model(PackConfig(model=str(source), out=str(ct), format="compressed-tensors", calib_data=calib, calib_tokens=512, verify=False))
    mo_t, ct_t = load_file(mo / "model.safetensors"), load_file(ct / "model.safetensors")
    expected = _expected_weights(source, QuantRecipe.load(source).quantized)
    for module, (want, _) in expected.items():
        qt = NVFP4QTensor(torch.Size(want.shape), torch.float32, mo_t[f"{module}.weight"])
        got = qt.dequantize(
            dtype=torch.float32, scale=mo_t[f"{module}.weight_scale"], double_scale=mo_t[f"{module}.weight_scale_2"],
            block_sizes={-1: 16},
        )
        # ModelOpt's float32 order is ours: equal values (it decodes code 8 as +0 where we give -0)
        assert torch.equal(got.to(want.dtype), want), module
    converted = ModelOptNvfp4Converter(targets=["Linear"], ignore=["lm_head"]).process(dict(mo_t))
    for name, tensor in ct_t.items():
        assert name in converted, name
        if tensor.dtype in (torch.uint8, torch.float8_e4m3fn, torch.bfloat16):
            assert same_bits(converted[name], tensor), name
        else:  # reciprocal scales: 1 / x computed by the converter, ours picks the exactly-invertible neighbour
            torch.testing.assert_close(converted[name].reshape(1), tensor, rtol=2**-22, atol=0)


def test_moe_model_ptq_verifies_through_our_unpacker(tmp_path, calib):
    source = make_model(tmp_path / "moe", "qwen3moe", student=None)
    result = pack_model(PackConfig(model=str(source), out=str(tmp_path / "out"), calib_data=calib, calib_tokens=512, verify=True))
    logits = result.summary["verify"]["logits"]
    assert logits["path"].startswith("ckaqad unpacker") and "MoE" in logits["path"]
    assert logits["passed"]
    weights = result.summary["verify"]["weights"]
    assert not weights["mismatched"]
    if not weights["reciprocal_scale_inexact"]:
        assert logits["max_abs_diff"] == 0.0
    with SafetensorsSource(tmp_path / "out") as packed, SafetensorsSource(source) as src:
        router = "model.layers.0.mlp.gate.weight"  # routers stay unquantized, as stored
        assert same_bits(packed.get(router), src.get(router))
        assert "model.layers.0.mlp.gate.weight_packed" not in packed


def test_moe_experts_quantized_per_expert_with_fallback_input_scales(tmp_path):
    """A recipe naming per-expert modules (the checkpoint layout): each expert packed on its own, gate/up sharing a
    global scale, and an expert calibration never routed to still gets a finite input scale (documented fallback)."""
    source = make_model(tmp_path / "moe", "qwen3moe", student=None)
    with SafetensorsSource(source) as src:
        experts = sorted({n.rpartition(".")[0] for n in src.names() if ".experts." in n})
    amax = {m: 1.0 + i for i, m in enumerate(experts) if ".experts.3." not in m}  # expert 3 never routed
    QuantRecipe(scheme="w4a4", quantized=experts, fused_groups=fused_groups(experts), input_amax=amax).save(source)
    out = tmp_path / "out"
    result = pack_model(PackConfig(model=str(source), out=str(out), format="modelopt", verify=False))
    fallbacks = result.summary["input_scale_fallbacks"]
    assert set(fallbacks) == {m for m in experts if ".experts.3." in m}
    tensors = load_file(out / "model.safetensors")
    for m in experts:
        scale = float(tensors[f"{m}.input_scale"])
        assert math.isfinite(scale) and scale > 0
    layer0_down = [m for m in experts if m.startswith("model.layers.0.") and m.endswith("down_proj")]
    want = max(amax[m] for m in layer0_down if m in amax) / 2688
    assert float(tensors["model.layers.0.mlp.experts.3.down_proj.input_scale"]) == pytest.approx(want, rel=1e-6)
    gate, up = "model.layers.1.mlp.experts.2.gate_proj", "model.layers.1.mlp.experts.2.up_proj"
    assert same_bits(tensors[f"{gate}.weight_scale_2"], tensors[f"{up}.weight_scale_2"])
    decoded = formats.load_dequantized_state_dict(out)
    for module, (want_w, g) in _expected_weights(source, experts).items():
        _assert_decodes_to(decoded[f"{module}.weight"], want_w, g, "modelopt", module)


def test_sharded_source_and_output_tied_embeddings_and_odd_width(tmp_path, calib):
    source = make_model(tmp_path / "src", "llama", student=None, tie=True, intermediate=40, shard="20KB")
    assert (source / INDEX_FILE).is_file()
    out = tmp_path / "out"
    result = pack_model(
        PackConfig(model=str(source), out=str(out), scheme="w4a16", max_shard_size="30KB", calib_data=calib, verify=True)
    )
    s = result.summary
    assert s["shards"] > 1 and (out / INDEX_FILE).is_file()
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    odd = [m for m, why in s["kept"].items() if "not a multiple of 16" in why]
    assert odd == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert set(odd) <= set(ignore)
    with SafetensorsSource(out) as packed:
        assert "lm_head.weight" not in packed  # tied: stays tied, not stored, not quantized
        assert packed.spec("model.layers.0.mlp.down_proj.weight").dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert s["verify"]["logits"]["max_abs_diff"] == 0.0
    # bits per Linear weight as a plan counts them: the tied head at 16 bits, the odd down_projs in bf16
    dense = AutoModelForCausalLM.from_pretrained(source)
    linears = {n: m.weight.numel() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = sum(linears[n] for n in [*odd, "lm_head"])
    quantized = sum(linears.values()) - kept
    assert s["linear_weight_bits"] == pytest.approx((4.5 * quantized + 16 * kept) / sum(linears.values()), rel=1e-12)


def test_cli_run_flow_records_outputs(tmp_path, calib):
    run = RunDir(tmp_path / "run")
    student = make_model(run.stage_dir("distill") / "student", "llama")
    with run.stage("distill", config={"data": calib}) as rec:
        rec.outputs["student"] = "distill/student"
    result = runner.invoke(app, ["pack", "--run", str(run.path), "--no-verify"])
    assert result.exit_code == 0, result.output
    entry = run.stage_entry("pack")
    assert entry["status"] == "done"
    assert entry["outputs"]["model"] == "pack/model" and entry["outputs"]["format"] == "compressed-tensors"
    assert entry["outputs"]["scheme"] == "w4a4"
    out = run.path / "pack" / "model"
    assert entry["outputs"]["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert "modules quantized" in result.output and "compression ratio" in result.output
    assert json.loads((run.path / "pack" / "summary.json").read_text())["modules_quantized"] == 14
    assert student.is_dir()
    assert "**CKA-QAD**" in (out / "README.md").read_text()  # the run's distilled student
    # another model packed inside the same run is not what the run distilled: its card says so
    teacher = make_model(tmp_path / "teacher", "llama", student=None)
    result = runner.invoke(app, ["pack", "--run", str(run.path), "--model", str(teacher), "--out",
                                 str(tmp_path / "ptq"), "--no-verify", "--scheme", "w4a16", "--force"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "ptq" / "README.md").read_text()
    assert "post-training quantization" in card and "CKA-QAD" not in card


# -- bad inputs: one line, exit 1, nothing left looking finished --------------------------------------------------


def _invoke_bad(tmp_path, source: Path, *extra: str):
    out = tmp_path / "bad-out"
    result = runner.invoke(
        app, ["pack", "--run", str(tmp_path / "run"), "--model", str(source), "--out", str(out), "--no-verify", *extra]
    )
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".bad-out", "bad-out"))]
    return lines[0], leftovers


def test_bad_input_no_safetensors(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    line, left = _invoke_bad(tmp_path, tmp_path / "src")
    assert "no safetensors" in line and not left


def test_bad_input_pickle_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    line, left = _invoke_bad(tmp_path, src)
    assert "pickle" in line and not left


def test_bad_input_truncated_safetensors(tmp_path):
    src = make_model(tmp_path / "src", student=None)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    line, left = _invoke_bad(tmp_path, src)
    assert "corrupt or truncated" in line and not left


def test_bad_input_existing_output_needs_force(tmp_path):
    src = make_model(tmp_path / "src", student=None)
    (tmp_path / "bad-out").mkdir()
    (tmp_path / "bad-out" / "keep.txt").write_text("mine")
    line, _ = _invoke_bad(tmp_path, src, "--scheme", "w4a16")
    assert "exists" in line and "--force" in line
    assert (tmp_path / "bad-out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("fp8", [(), ("--fp8", "*.o_proj")])  # packed in NVFP4, or in FP8
def test_bad_input_nan_weight_names_the_tensor(tmp_path, fp8):
    src = make_model(tmp_path / "src", student=None)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    line, left = _invoke_bad(tmp_path, src, "--scheme", "w4a16", *fp8)
    assert "model.layers.1.self_attn.o_proj.weight" in line and "NaN" in line and not left


def test_bad_input_exclusion_that_splits_a_fused_group_or_leaves_nothing(tmp_path):
    """vLLM refuses a q/k/v (or gate/up) group that is partly quantized; a model with nothing quantized is no NVFP4
    model. Both are refused before anything is written."""
    src = make_model(tmp_path / "src", student=None)
    line, left = _invoke_bad(tmp_path, src, "--scheme", "w4a16", "--exclude", "*q_proj")
    assert "model.layers.0.self_attn.q_proj is excluded by '*q_proj'" in line and "k_proj" in line, line
    assert "'*.q_proj' and '*.k_proj' and '*.v_proj'" in line and not left
    line, left = _invoke_bad(tmp_path, src, "--scheme", "w4a16", "--exclude", "*.up_proj")
    assert "gate_proj / up_proj" in line and not left
    line, left = _invoke_bad(tmp_path, src, "--scheme", "w4a16", "--exclude", "*")
    assert "nothing to quantize" in line and not left
    result = pack_model(PackConfig(model=str(src), out=str(tmp_path / "ok"), scheme="w4a16", verify=False,
                                   exclude=["*.q_proj", "*.k_proj", "*.v_proj"]))
    assert result.summary["modules_quantized"] == 2 * 4  # o_proj, gate, up, down of both layers
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert "model.layers.1.self_attn.k_proj" in config["quantization_config"]["ignore"]


def test_bad_input_output_that_would_replace_the_source(tmp_path):
    src = make_model(tmp_path / "src", student=None)
    for out in (src, tmp_path):
        result = runner.invoke(app, ["pack", "--model", str(src), "--out", str(out), "--force", "--no-verify",
                                     "--scheme", "w4a16"])
        assert result.exit_code == 1 and "would replace the model it is packed from" in result.output
    assert (src / "model.safetensors").is_file() and (src / "config.json").is_file()


def test_bad_device_or_backend_is_refused_before_any_work(monkeypatch):
    from ckaqad_cli.errors import CkaqadError
    from ckaqad_kernels import dispatch

    with pytest.raises(CkaqadError, match="--device must be cpu, cuda or cuda:N"):
        PackConfig(model="m", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CkaqadError, match="no CUDA device is available"):
            PackConfig(model="m", device="cuda")
        PackConfig(model="m", backend="triton")  # the tests run Triton in its interpreter, on the CPU
        monkeypatch.setattr(dispatch, "triton_interpreted", lambda: False)
        with pytest.raises(CkaqadError, match="--backend triton needs --device cuda"):
            PackConfig(model="m", backend="triton")


def test_bad_input_not_enough_disk_space(tmp_path, monkeypatch):
    import ckaqad_cli.safetensors_write as sio

    src = make_model(tmp_path / "src", student=None)
    monkeypatch.setattr(sio.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 1000})())
    line, left = _invoke_bad(tmp_path, src, "--scheme", "w4a16")
    assert "not enough disk space" in line and not left


# -- memory ------------------------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from ckaqad_cli.formats import read_config
    from ckaqad_cli.safetensors_io import SafetensorsSource
    from ckaqad_cli.packing.plan import build_recipe
    from ckaqad_cli.stages.pack import PackConfig, pack_model
    from ckaqad_kernels import nvfp4_cpu

    with SafetensorsSource(Path(sys.argv[1])) as src:  # fixed costs: the recipe, loading the C kernel
        build_recipe(Path(sys.argv[1]), read_config(sys.argv[1]), "w4a16", [], src)
    nvfp4_cpu.available()

    def peak():  # VmHWM: this process image's peak RSS (ru_maxrss would carry pytest's over fork+exec)
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024

    base = peak()
    pack_model(PackConfig(model=sys.argv[1], out=sys.argv[2], scheme="w4a16", verify=False, max_shard_size="64MB"))
    print(json.dumps({"base": base, "peak": peak()}))
    """
)


def test_peak_memory_bounded_by_largest_tensor(tmp_path):
    """Pack a ~300 MB checkpoint in a subprocess: peak RSS growth stays below a few times its largest tensor."""
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_pack.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pack", bench)
    bench_pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_pack)
    src = tmp_path / "big"
    total, largest = bench_pack.write_synthetic_checkpoint(src, hidden=1024, intermediate=4096, layers=10, vocab=8192)
    assert total > 350e6
    largest_quantized = 4096 * 1024 * 2  # one MLP projection (the largest tensors, the embeddings, are copied)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(src), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["base"]
    # at most MAX_CPU_WORKERS + 1 steps in flight (a fused group: up to 3 weights and their outputs), the
    # quantizer's chunk temporaries (a few MB per worker) and one copied tensor: a constant times the largest tensor
    in_flight = MAX_CPU_WORKERS + 2
    bound = in_flight * 3 * largest_quantized + 2 * largest + 96 * 2**20
    assert growth < bound, f"RSS grew {growth / 1e6:.0f} MB; bound {bound / 1e6:.0f} MB"
    assert growth < 0.8 * total, f"RSS grew {growth / 1e6:.0f} MB for a {total / 1e6:.0f} MB model"


def test_backend_choice_is_checked_and_the_summary_names_the_kernel(tmp_path, monkeypatch):
    from ckaqad_cli.errors import CkaqadError
    from ckaqad_kernels import nvfp4_cpu

    with pytest.raises(CkaqadError, match="--backend must be one of"):
        PackConfig(model="m", backend="cuda")
    with pytest.raises(CkaqadError, match="runs on the CPU"):
        PackConfig(model="m", backend="c", device="cuda")
    src = make_model(tmp_path / "src", student=None)
    outs = {}
    for backend in ("auto", "torch"):
        result = pack_model(PackConfig(model=str(src), out=str(tmp_path / backend), scheme="w4a16", verify=False,
                                       backend=backend))
        outs[backend] = load_file(tmp_path / backend / "model.safetensors")
        want = "C (CPU)" if nvfp4_cpu.available() and backend == "auto" else "PyTorch reference"
        assert result.summary["kernel"].startswith(want)
    assert outs["auto"].keys() == outs["torch"].keys()
    for name, tensor in outs["auto"].items():  # whichever kernel ran, the same bytes
        assert torch.equal(tensor.view(torch.uint8), outs["torch"][name].view(torch.uint8)), name
    monkeypatch.setattr(nvfp4_cpu, "_library", lambda: (None, "no C compiler found (set CC)"))
    result = pack_model(PackConfig(model=str(src), out=str(tmp_path / "fallback"), scheme="w4a16", verify=False))
    assert result.summary["kernel"] == "PyTorch reference (C kernel unavailable: no C compiler found (set CC))"
    with pytest.raises(CkaqadError, match="--backend c: the C kernel is not available"):
        PackConfig(model="m", backend="c")


def test_force_never_deletes_a_folder_ckaqad_did_not_write(tmp_path):
    """`pack --out X --force` replaces an earlier ckaqad output, never a user's folder (issue 18, item 1)."""
    src = make_model(tmp_path / "src", student=None)
    user = tmp_path / "userdir"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("x")
    result = runner.invoke(app, ["pack", "--run", str(tmp_path / "run"), "--model", str(src), "--out", str(user),
                                 "--force", "--no-verify", "--scheme", "w4a16"])
    assert result.exit_code == 1, result.output
    assert "did not write" in result.output and "--force replaces only" in result.output
    assert (user / "thesis.txt").read_text() == "x" and (user / "sub").is_dir()
    assert RunDir(tmp_path / "run").stage_entry("pack") is None  # refused before the run was touched
    (tmp_path / "file").write_text("y")
    result = runner.invoke(app, ["pack", "--model", str(src), "--out", str(tmp_path / "file"), "--force",
                                 "--no-verify", "--scheme", "w4a16"])
    assert result.exit_code == 1 and (tmp_path / "file").read_text() == "y"
    # ckaqad's own output (it carries the marker) and an empty folder are replaced
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(2):
        result = runner.invoke(app, ["pack", "--model", str(src), "--out", str(out), "--force", "--no-verify",
                                     "--scheme", "w4a16"])
        assert result.exit_code == 0, result.output
        assert (out / OUTPUT_MARKER).is_file() and (out / "config.json").is_file()


def _finished_pack(tmp_path) -> tuple[Path, Path, dict]:
    src = make_model(tmp_path / "src", student=None)
    run = tmp_path / "run"
    result = runner.invoke(app, ["pack", "--run", str(run), "--model", str(src), "--no-verify", "--scheme", "w4a16"])
    assert result.exit_code == 0, result.output
    return src, run, RunDir(run).stage_entry("pack")


def test_failed_forced_pack_keeps_the_finished_record(tmp_path):
    """A bad `pack --force` on a finished run leaves the run as it was (issue 18, item 4): a bad --model is refused
    before run.json is touched; a failure inside the stage puts the finished record back (the output is atomic)."""
    src, run, done = _finished_pack(tmp_path)
    result = runner.invoke(app, ["pack", "--run", str(run), "--model", str(tmp_path / "typo"), "--force"])
    assert result.exit_code == 1 and "is not a directory" in result.output
    assert RunDir(run).stage_entry("pack") == done
    result = runner.invoke(app, ["pack", "--run", str(run), "--model", str(src), "--force", "--no-verify",
                                 "--scheme", "w4a16", "--exclude", "*"])
    assert result.exit_code == 1 and "nothing to quantize" in result.output
    entry = RunDir(run).stage_entry("pack")
    assert entry["status"] == "done" and entry["outputs"] == done["outputs"]
    assert "nothing to quantize" in entry["last_failed_attempt"]["error"]
    assert RunDir(run).stage_output("pack", "model") == run / "pack" / "model"


def test_push_finds_a_pack_written_outside_the_run(tmp_path):
    """`pack --run R --out /elsewhere` then `push --run R` (issue 18, item 7)."""
    src = make_model(tmp_path / "src", student=None)
    run, out = tmp_path / "run", tmp_path / "elsewhere" / "packed"
    result = runner.invoke(app, ["pack", "--run", str(run), "--model", str(src), "--out", str(out), "--no-verify",
                                 "--scheme", "w4a16"])
    assert result.exit_code == 0, result.output
    assert RunDir(run).stage_output("pack", "model") == out.resolve()
    result = runner.invoke(app, ["push", "--run", str(run), "--repo-id", "me/m", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_scale_rules_pack_ptq_exactly_and_a_student_keeps_its_rule(tmp_path, fmt):
    """--scale-rule on a --model pack: mse-act calibrates its channel weights on --calib-data, the packed weights
    decode bit-exactly to the fake-quantized student with that rule (verify), and differ from amax's; a distilled
    student is packed with the rule it was trained with, never another."""
    from ckaqad_cli.builtin import TEACHER_DIR
    from ckaqad_cli.errors import CkaqadError

    packed = {}
    for rule in ("amax", "mse-act"):
        result = pack_model(PackConfig(model=str(TEACHER_DIR), out=str(tmp_path / rule), format=fmt, scheme="w4a16",
                                       scale_rule=rule, calib_data="builtin", calib_tokens=512, verify=True))
        assert result.summary["verify"]["weights"]["bit_exact"] == result.summary["modules_quantized"]
        packed[rule] = load_file(tmp_path / rule / "model.safetensors")
    scales = [n for n in packed["amax"] if n.endswith(".weight_scale")]
    assert any(not torch.equal(packed["amax"][n].view(torch.uint8), packed["mse-act"][n].view(torch.uint8))
               for n in scales)
    student = make_model(tmp_path / "student", student="w4a16")
    with pytest.raises(CkaqadError, match="trained with the amax scale rule"):
        pack_model(PackConfig(model=str(student), out=str(tmp_path / "s"), format=fmt, scale_rule="mse"))
