"""The tiny models the tests build, in one place (no download, a few kB each).

Three builders, each taking a model type and config fields over one default shape (``SMALL``):

- ``tiny_config(arch, **fields)``: the transformers config;
- ``tiny_model(arch, seed=, dtype=, **fields)``: the model in memory, random weights drawn after
  ``torch.manual_seed(seed)`` in ``dtype`` (byte-identical to building in float32 and casting);
- ``tiny_model_dir(directory, arch, seed=, dtype=, student=, shard=, tokenizer=, **fields)``: saved as a Hugging
  Face directory; with ``student`` a distilled student (fake-quantized to that scheme, with ``quant_recipe.json``),
  with the built-in character tokenizer unless ``tokenizer=False``.

On top of them, the shapes several test files share: ``save_tiny_model`` (the float32 model of the loading and
diagnose tests), ``tiny_models`` and ``tiny_sequences`` (distill's teacher, student and data) and
``packed_model_dir`` (a compressed-tensors NVFP4 checkpoint as a third-party tool writes it).

Importable as ``fixtures`` from every test (pytest's ``pythonpath = ["tests"]``) and from scripts run out of tests/.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ckaqad_cli.builtin.tokenizer import VOCAB_SIZE, build_tokenizer
from ckaqad_kernels import nvfp4_ref

if TYPE_CHECKING:
    from ckaqad_cli.trainer import Models

SMALL = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
"""The default shape: two decoder layers of width 64, the built-in tokenizer's vocabulary."""
MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
"""What a mixture-of-experts type (``qwen3_moe``) adds to ``SMALL``."""
SEQ_LEN = 24
"""The length of ``tiny_sequences``."""


def token_ids() -> dict[str, int]:
    """The built-in tokenizer's special tokens, as config fields."""
    tok = build_tokenizer()
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def tiny_config(arch: str = "llama", **fields) -> PretrainedConfig:
    """The config of model type ``arch`` (llama, qwen3, qwen3_moe, ...): ``SMALL`` with ``fields`` over it."""
    return AutoConfig.for_model(arch, **{**SMALL, **(MOE if arch.endswith("_moe") else {}), **fields})


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype | None = None, **fields) -> PreTrainedModel:
    """A random-weight causal LM of ``tiny_config(arch, **fields)`` (in training mode, as transformers builds it)."""
    config = tiny_config(arch, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def tiny_model_dir(directory: Path, arch: str = "llama", *, seed: int = 0, dtype: torch.dtype | None = None,
                   student: str | None = None, shard: str | None = None, tokenizer: bool = True, **fields) -> Path:
    """``tiny_model(...)`` saved to ``directory`` (sharded at ``shard``, e.g. "20KB"); a distilled student of scheme
    ``student`` (fake-quantized, with its quant_recipe.json) when given; with the built-in tokenizer."""
    from ckaqad_cli.quant import apply_fake_quant

    model = tiny_model(arch, seed=seed, dtype=dtype, **fields)
    recipe = apply_fake_quant(model, student) if student else None
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    if recipe:
        recipe.save(directory)
    if tokenizer:
        build_tokenizer().save_pretrained(directory)
    return Path(directory)


def save_tiny_model(
    path: Path, *, arch: str = "llama", layers: int = 2, hidden: int = 32, vocab: int = 112, seed: int = 0,
    max_positions: int = 64,
) -> Path:
    """A tiny float32 causal LM with the built-in character tokenizer and its special tokens, saved as a HF
    directory: two heads of width ``hidden // 2``, one key-value head, MLP twice as wide as the model."""
    return tiny_model_dir(
        path, arch, seed=seed, dtype=torch.float32, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=hidden // 2, max_position_embeddings=max_positions, tie_word_embeddings=False, **token_ids(),
    )


def tiny_models(seed: int = 0, scheme: str = "w4a4", arch: str = "llama") -> Models:
    """distill's models: a float32 four-layer teacher of model type ``arch`` (frozen, eval) and its PTQ student
    (trainable)."""
    from ckaqad_cli.models import ptq_student
    from ckaqad_cli.trainer import Models

    tokenizer = build_tokenizer()
    teacher = tiny_model(
        arch, seed=seed, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ).eval().requires_grad_(False)
    student, recipe = ptq_student(teacher, scheme, dtype=torch.float32)
    student.requires_grad_(True).train()
    return Models(student=student, teacher=teacher, tokenizer=tokenizer, recipe=recipe)


def tiny_sequences(n: int = 40, seed: int = 0) -> torch.Tensor:
    """``n`` random token sequences for ``tiny_models``, each starting with BOS."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (n, SEQ_LEN), generator=gen)
    ids[:, 0] = build_tokenizer().bos_token_id
    return ids


def packed_model_dir(directory: Path) -> Path:
    """A real compressed-tensors NVFP4 (W4A16) checkpoint of a tiny bf16 Llama, sharded at 12 kB, with the built-in
    tokenizer: what pack writes, packed by compressed-tensors itself with scales from the weights' amax."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    model = tiny_model(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2, max_position_embeddings=64,
        dtype=torch.bfloat16,
    )
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format="nvfp4-pack-quantized")
    )
    for module in model.modules():
        if hasattr(module, "weight_global_scale"):
            w = module.weight.float()
            g = 6 * 448 / w.abs().amax()
            module.weight_global_scale.data.fill_(g)
            block_amax = w.reshape(w.shape[0], -1, 16).abs().amax(-1)
            module.weight_scale.data.copy_((block_amax / 6 * g).clamp(max=448).to(module.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="nvfp4-pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(directory, max_shard_size="12KB")
    compressor.update_config(directory)
    build_tokenizer().save_pretrained(directory)
    return Path(directory)


READER_AMAX, READER_SCALE = 1.6953125, 0.017578125
"""A weight amax whose global scale g has a float32 reciprocal G that rounds back to g exactly, and an E4M3 block
scale s for which s / G (what compressed-tensors' readers compute) and s * g (ours) round one step apart."""


def reader_rounding_weight() -> torch.Tensor:
    """bf16 [2, 16]: row 0 sets g (its max is READER_AMAX); row 1's block gets scale READER_SCALE and one value of
    code 1.5, which the two divisors decode one bf16 step apart (tests/test_formats.py)."""
    g = nvfp4_ref.global_scale_from_amax(torch.tensor(READER_AMAX))
    w = torch.zeros(2, 16)
    w[0, 0] = READER_AMAX
    w[1, 0], w[1, 1] = 6 * READER_SCALE * g, 1.5 * READER_SCALE * g
    return w.bfloat16()
