"""models.py: offline loading of local directories, distilled and packed students, decoder layers."""

from __future__ import annotations

import json

import pytest
import torch

from ckaqad_cli import formats, models, quant
from ckaqad_cli.errors import CkaqadError
from fixtures import save_tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_load_local_dir_offline(tmp_path, arch):
    d = save_tiny_model(tmp_path / arch, arch=arch, layers=3)
    model, tok = models.load_model(d, dtype=torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert len(models.decoder_layers(model)) == 3
    assert models.max_positions(model) == 64
    ids = tok("1+2=3", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 112)
    bf16, _ = models.load_model(d)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_missing_dir_and_unknown_hub_id_are_clear_errors(tmp_path):
    with pytest.raises(CkaqadError, match="not a directory"):
        models.load_model(tmp_path / "nope")
    with pytest.raises(CkaqadError, match="hub id"):
        models.load_model("no-such-org/no-such-model-xyz")


@pytest.mark.parametrize(
    "name, damage",
    [("model.safetensors", lambda b: b"garbage"), ("model.safetensors", lambda b: b[:-100]),
     ("config.json", lambda b: b"{bad"), ("tokenizer.json", lambda b: b[: len(b) // 2]),
     ("tokenizer_config.json", lambda b: b"\x8f\xff")],
)
def test_damaged_file_of_a_local_model_is_named(tmp_path, name, damage):
    d = save_tiny_model(tmp_path / "m")
    (d / name).write_bytes(damage((d / name).read_bytes()))
    with pytest.raises(CkaqadError, match=f"^{d / name} is not") as e:
        models.load_model(d, dtype=torch.float32)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["/no/such/model", "./out/student", "~/models/x", "runs/q3/distill/student",
                                  "not a hub id", "org/name/"])
def test_check_spec_refuses_a_missing_path_that_is_no_hub_id(tmp_path, spec):
    with pytest.raises(CkaqadError, match=rf"^--teacher {spec}: no such directory \(and not a hub id"):
        models.check_spec(spec, "--teacher")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CkaqadError, match="is a file"):
        models.check_spec(tmp_path / "file", "--student")
    for fine in ("builtin", "Qwen/Qwen3-0.6B", "gpt2", str(tmp_path)):
        models.check_spec(fine, "--teacher")


def test_unreachable_hub_fails_fast_with_the_cache_error(tmp_path, monkeypatch):
    """Online mode with no network (a closed local port): one quick request, then the local cache alone, instead
    of huggingface_hub's minute of retries for every file."""
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    start = time.monotonic()
    with pytest.raises(CkaqadError, match=r"^cannot load model no-such-org/no-such-model as a hub id .*unreachable"):
        models.load_model("no-such-org/no-such-model")
    assert time.monotonic() - start < 10


def test_never_trusts_remote_code_by_default(tmp_path, monkeypatch):
    seen = {}
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    models.load_model(save_tiny_model(tmp_path / "m"), dtype=torch.float32)
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True


def test_builtin_teacher_loads_when_shipped():

    model, tok = models.load_model("builtin", dtype=torch.float32)
    assert len(models.decoder_layers(model)) == model.config.num_hidden_layers


def test_ptq_student_is_a_fake_quantized_copy(tmp_path):
    teacher, tok = models.load_model(save_tiny_model(tmp_path / "m"), dtype=torch.float32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, _ = models.ptq_student(teacher, "w4a16")
    ids = tok("12+34=46", return_tensors="pt")["input_ids"]
    assert not torch.equal(student(ids).logits, teacher(ids).logits)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched


def test_ptq_student_for_distill_casts_excludes_and_returns_the_recipe(tmp_path):
    teacher, _ = models.load_model(save_tiny_model(tmp_path / "m"), dtype=torch.bfloat16)
    student, recipe = models.ptq_student(teacher, "w4a4", exclude=("*.layers.0.*",), dtype=torch.float32)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # the teacher is not cast with it
    assert recipe.scheme == "w4a4" and "*.layers.0.*" in recipe.exclude
    wrapped = {n for n, m in student.named_modules() if isinstance(m, quant.NVFP4Linear)}
    assert sorted(wrapped) == sorted(recipe.quantized) and all(".layers.1." in n for n in wrapped)
    assert recipe.skipped["model.layers.0.mlp.down_proj"].startswith("excluded by '*.layers.0.*'")
    assert not student.training and not any(p.requires_grad for p in student.parameters())


def test_distilled_student_dir_reapplies_recipe(tmp_path):
    d = save_tiny_model(tmp_path / "m")
    dense, tok = models.load_model(d, dtype=torch.float32)
    recipe = quant.apply_fake_quant(dense, scheme="w4a16")
    recipe.save(d)
    assert quant.RECIPE_FILE == models.RECIPE_FILE
    loaded, _ = models.load_model(d, dtype=torch.float32)
    ids = tok("7*8-5=51", return_tensors="pt")["input_ids"]
    assert torch.allclose(loaded(ids).logits, dense(ids).logits)


def test_packed_dir_loads_through_our_unpacker(tmp_path, monkeypatch):
    """A directory that detect_format recognizes is built from its config and filled by load_dequantized_state_dict."""
    d = save_tiny_model(tmp_path / "m")
    reference, tok = models.load_model(d, dtype=torch.float32)
    state = {k: v * 0.5 for k, v in reference.state_dict().items()}  # distinguishable from the saved weights
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (d / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(formats, "detect_format", lambda path: "compressed-tensors")
    monkeypatch.setattr(formats, "load_dequantized_state_dict", lambda path: state)
    model, _ = models.load_model(d, dtype=torch.float32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert getattr(model.config, "quantization_config", None) is None
