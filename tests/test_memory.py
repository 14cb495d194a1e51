"""The memory estimate of distill: the probe's counts against a whole model's, against a measured CPU peak, and its
verdict and table."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from ckaqad_cli import memory
from fixtures import tiny_config

GB = 1e9
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _saved_by_whole_model(config, tokens: int) -> int:
    """Bytes autograd saves in a training forward of the whole fake-quantized student (parameters not counted)."""
    inside, outside, _ = memory._saved_bytes(config, "w4a4", (), tokens, False)
    return inside + outside


def test_probe_extrapolates_to_the_count_of_the_whole_model():
    """Counted at 1/16 and 1/8 of the width on one layer, extrapolated to full width and three layers: the same bytes
    as counted on the whole model, within 3%."""
    config = tiny_config("qwen3", hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, num_hidden_layers=3, vocab_size=256)
    assert memory._probe_scale(config) == 16
    sizes = memory.model_sizes(config, "w4a4", device_type="cpu")
    tokens = 64
    predicted = sizes.layers * (tokens * sizes.act_token_layer + sizes.act_layer) + tokens * sizes.act_token_root
    assert predicted == pytest.approx(_saved_by_whole_model(config, tokens), rel=0.03)
    assert sizes.params == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def test_probe_under_autocast_keeps_bf16_weight_copies():
    """A GPU run computes under bf16 autocast: each fake-quantized weight is kept as its bf16 cast, half the bytes of
    the float32 copy a CPU run keeps."""
    config = tiny_config("qwen3", hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32)
    cpu, gpu = (memory.model_sizes(config, "w4a4", device_type=kind) for kind in ("cpu", "cuda"))
    assert gpu.act_layer == pytest.approx(cpu.act_layer / 2, rel=0.05)
    assert gpu.act_token_layer < cpu.act_token_layer


def test_estimate_matches_the_measured_peak_on_the_cpu():
    """One shape of benchmarks/bench_memory.py (a real distill run in a fresh process): within 15%."""
    sys.path.insert(0, str(BENCHMARKS))
    from bench_memory import measure

    estimated, measured = measure("dense-small", 1, steps=2)
    assert estimated == pytest.approx(measured, rel=0.15)


def _sizes(params: float) -> memory.ModelSizes:
    return memory.ModelSizes(name="m", params=int(params), root_params=int(params // 10),
                             layer_params=int(params // 40), layers=36, hidden=2560, vocab=151936,
                             act_token_layer=2e5, act_token_root=3e4, act_layer=2e8)


def test_world_size_shards_weights_and_optimizer_but_not_activations():
    sizes, settings = _sizes(4e9), memory.Settings(batch_size=8, seq_len=2048)
    one, eight = (memory.estimate(sizes, settings, world_size=w) for w in (1, 8))
    for part in ("teacher weights", "student master weights", "AdamW moments"):
        assert eight.parts[part] == pytest.approx(one.parts[part] / 8)
    assert one.parts["AdamW moments"] == 2 * one.parts["student master weights"] == 2 * 4 * 4e9
    assert "FSDP2 unsharded root and layers" in eight.parts and "FSDP2 unsharded root and layers" not in one.parts
    checkpointed = memory.estimate(sizes, memory.Settings(batch_size=8, seq_len=2048, grad_checkpointing=True))
    assert checkpointed.moments["KL backward"] < one.moments["KL backward"]
    offloaded = memory.estimate(sizes, memory.Settings(batch_size=8, seq_len=2048, teacher_offload=True),
                                world_size=8)
    assert offloaded.parts["teacher weights"] == 0


def test_verdict_says_what_to_change():
    sizes, settings = _sizes(4e9), memory.Settings(batch_size=8, seq_len=2048)
    h100s = [80 * GB] * 8
    est = memory.estimate(sizes, settings, world_size=1)
    assert not memory.fits(est, h100s)
    line = memory.verdict(sizes, est, h100s)
    assert line.startswith("does not fit") and "--nproc-per-node 4: " in line and "--nproc-per-node 8" not in line
    two = memory.estimate(sizes, settings, world_size=2)
    assert "--grad-checkpointing: " in memory.verdict(sizes, two, h100s)
    huge = dataclasses.replace(_sizes(8e9), act_layer=5e9)  # no world size fits without checkpointing
    line = memory.verdict(huge, memory.estimate(huge, settings, world_size=1), h100s[:1])
    assert "GPUs (torchrun over several nodes) with --grad-checkpointing --teacher-offload" in line
    big = memory.estimate(sizes, settings, world_size=8)
    assert memory.fits(big, h100s) and memory.verdict(sizes, big, h100s).startswith("fits")
    assert not memory.fits(big, h100s[:4])  # 8 ranks need 8 GPUs
    cpu = memory.estimate(sizes, settings, world_size=2, device_type="cpu")
    assert memory.fits(cpu, [int(2.1 * cpu.peak / 0.9)]) and not memory.fits(cpu, [int(1.9 * cpu.peak / 0.9)])


def test_table_prints_whole_at_80_columns():
    sizes = _sizes(4e9)
    est = memory.estimate(sizes, memory.Settings(batch_size=8, seq_len=2048, cka_layers=9), world_size=2)
    console = Console(width=80, record=True)
    console.print(memory.table(est, [80 * GB] * 2))
    text = console.export_text()
    assert "…" not in text and "peak per rank (KL backward)" in text and "│ CKA hooks" not in text
    assert "KL chunk" in text and "72.0 GB" in text


def test_settings_of_a_distill_config():
    from ckaqad_cli.settings.distill import DistillConfig

    cfg = DistillConfig(teacher="x", lambda_cka=0.0, grad_checkpointing=True).resolved()
    settings = memory.Settings.of(cfg, 9)
    assert settings.cka_layers == 0 and settings.grad_checkpointing and settings.seq_len == cfg.seq_len
    assert memory.Settings.of(DistillConfig(teacher="x").resolved(), 9).cka_layers == 9


def test_device_memory_of_the_cpu_is_the_host_ram():
    (ram,) = memory.device_memory("cpu")
    assert ram > 1e8
    if not torch.cuda.is_available():
        assert memory.device_memory("cuda") == []
