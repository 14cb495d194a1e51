"""pack's recipe read off a dense decoder checkpoint's tensor names equals the recipe of the model built on the meta
device (the path every other architecture takes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckaqad_cli import formats
from ckaqad_cli.quant import apply_fake_quant, recipe_for_linears
from ckaqad_cli.safetensors_io import SafetensorsSource
from ckaqad_cli.packing import plan
from ckaqad_cli.packing.plan import DENSE_DECODER_TYPES, build_recipe, dense_decoder_linears
from fixtures import tiny_model_dir


def _save(directory: Path, model_type: str, *, tie: bool, intermediate: int = 64, **extra) -> Path:
    return tiny_model_dir(directory, model_type, tokenizer=False, vocab_size=96, hidden_size=32,
                          intermediate_size=intermediate, head_dim=8, tie_word_embeddings=tie, **extra)


def _recipes(directory: Path, exclude: list[str]):
    config = formats.read_config(directory)
    with SafetensorsSource(directory) as src:
        linears = dense_decoder_linears(config, src)
    assert linears is not None
    by_names = recipe_for_linears(linears, "w4a4", exclude)
    by_model = apply_fake_quant(plan._meta_model(config), "w4a4", exclude)
    return by_names, by_model


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("model_type", DENSE_DECODER_TYPES)
def test_names_give_the_meta_models_recipe(tmp_path, model_type, tie):
    directory = _save(tmp_path / "m", model_type, tie=tie, intermediate=40)  # down_proj: 40 is no multiple of 16
    for exclude in ([], ["*.1.mlp.gate_proj", "*.1.mlp.up_proj"]):
        by_names, by_model = _recipes(directory, exclude)
        assert by_names.quantized == by_model.quantized
        assert by_names.skipped == by_model.skipped
        assert by_names.fused_groups == by_model.fused_groups
    assert "model.layers.0.mlp.down_proj" in by_names.skipped and "lm_head" in by_names.skipped
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in by_names.fused_groups


def test_qwen2_biases_and_qwen3_norms_are_part_of_the_layout(tmp_path):
    for model_type in ("qwen2", "qwen3"):
        directory = _save(tmp_path / model_type, model_type, tie=False)
        names = set(load_file(directory / "model.safetensors"))
        extra = {"qwen2": "model.layers.0.self_attn.q_proj.bias", "qwen3": "model.layers.0.self_attn.q_norm.weight"}
        assert extra[model_type] in names
        by_names, by_model = _recipes(directory, [])
        assert by_names.quantized == by_model.quantized and len(by_names.quantized) == 14


def test_anything_outside_the_layout_builds_the_model(tmp_path, monkeypatch):
    directory = _save(tmp_path / "m", "llama", tie=False)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(32, 32)  # a Linear the names cannot place
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = formats.read_config(directory)
    with SafetensorsSource(directory) as src:
        assert dense_decoder_linears(config, src) is None
        assert dense_decoder_linears({**config, "model_type": "qwen3_moe"}, src) is None
        assert dense_decoder_linears({**config, "auto_map": {"AutoModel": "x.Y"}}, src) is None
        built = []
        real = plan._meta_model
        monkeypatch.setattr(plan, "_meta_model", lambda c: built.append(1) or real(c))
        build_recipe(directory, config, "w4a16", [], src)  # the meta model, which has no extra_proj: ignored
        assert built == [1]
    clean = _save(tmp_path / "clean", "llama", tie=True)
    with SafetensorsSource(clean) as src:
        recipe = build_recipe(clean, formats.read_config(clean), "w4a16", [], src)
    assert built == [1] and recipe.scheme == "w4a16"  # the names: no model built
