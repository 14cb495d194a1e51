"""The memory estimate of ``ckaqad_cli.memory`` against the measured peak of distill on the CPU, in one process and
under torchrun with gloo.

    python benchmarks/bench_memory.py --markdown benchmarks/results_memory_cpu.md
    python benchmarks/bench_memory.py --shapes dense-small --worlds 1     # one run
    python benchmarks/bench_memory.py --h100-table                         # docs/distributed.md's estimates

Each run is a fresh process per rank training ``--steps`` steps of a random-weight model (W4A4 student, float32, the
real loop: ``trainer.Trainer``). Its peak is the rank's resident-set high-water mark from the end of the set-up
(reset through /proc/self/clear_refs) to the end of training, minus its resident set before any model was built
(the Python runtime and libraries, which the estimate leaves out); the larger of the ranks counts. glibc's malloc
gets a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_, 128 KiB), so freed tensors go back to the system and the peak
counts live tensors, not what the allocator held on to.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {
    "dense-small": ("qwen3", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=64, vocab_size=8192),
                    dict(batch_size=4, seq_len=256, kl_chunk_tokens=1024, grad_checkpointing=False)),
    "dense-wide": ("qwen3", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=4, head_dim=64, vocab_size=32000),
                   dict(batch_size=2, seq_len=512, kl_chunk_tokens=256, grad_checkpointing=False)),
    "dense-checkpointed": ("qwen3", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=8192),
                           dict(batch_size=4, seq_len=512, kl_chunk_tokens=512, grad_checkpointing=True)),
    "moe": ("qwen3_moe", dict(hidden_size=256, intermediate_size=768, moe_intermediate_size=256, num_experts=8,
                              num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=64, vocab_size=8192),
            dict(batch_size=4, seq_len=256, kl_chunk_tokens=1024, grad_checkpointing=False)),
}
"""name -> (model type, config fields, distill options)."""
QWEN3 = {
    "Qwen3-0.6B": ("qwen3", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen3-4B": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_experts=128, num_experts_per_tok=8, num_hidden_layers=48,
                                        num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        vocab_size=151936, tie_word_embeddings=False)),
}
"""The shapes of docs/distributed.md's table (config.json of each model on the Hub)."""
H100 = 80 * 1024**3
_MMAP_THRESHOLD = str(128 * 1024)


def _status_kb(field: str) -> int:
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def config_of(name: str):
    from transformers import AutoConfig

    arch, fields, _ = SHAPES[name]
    return AutoConfig.for_model(arch, **fields, max_position_embeddings=4096)


class _Tokenizer:
    bos_token_id = None


def estimate(name: str, world: int) -> float:
    """The estimated peak per rank (bytes)."""
    from ckaqad_cli import memory

    _, fields, opts = SHAPES[name]
    sizes = memory.model_sizes(config_of(name), "w4a4", device_type="cpu", name=name)
    layers = fields["num_hidden_layers"]
    cka_layers = len([i for i in range(layers) if (layers - 1 - i) % 4 == 0])  # the preset's every:4
    settings = memory.Settings(cka_layers=cka_layers, **opts)
    return memory.estimate(sizes, settings, world_size=world, device_type="cpu").peak


def worker(name: str, steps: int, out: Path) -> None:
    """One rank of one run: estimate, train, write the estimate and this rank's measured peak to
    ``out``.rankN.json. The estimate comes first: its probe forwards load the model's code and the kernels, so the
    resident set measured after it holds all of the runtime."""
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from ckaqad_cli import distributed
    from ckaqad_cli.models import ptq_student
    from ckaqad_cli.settings.distill import DistillConfig
    from ckaqad_cli.trainer import Models, Trainer

    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    estimated = estimate(name, ctx.world_size)
    base = _status_kb("VmRSS")
    _, _, opts = SHAPES[name]
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config_of(name), dtype=torch.float32)
    student, recipe = ptq_student(teacher, "w4a4", dtype=torch.float32)
    student.requires_grad_(True).train()
    models = Models(student=student, teacher=teacher, tokenizer=_Tokenizer(), recipe=recipe)
    ids = torch.randint(0, teacher.config.vocab_size, (opts["batch_size"] * steps + ctx.world_size, opts["seq_len"]),
                        generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(
        teacher="bench", steps=steps, lr=1e-5, eval_every=10**6, save_every=10**6, eval_sequences=ctx.world_size,
        eval_batch_size=ctx.world_size, eval_tokens=64, **opts,
    ).resolved()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer.setup(cfg, models, ids[ctx.world_size:], ids[: ctx.world_size], Path(tmp), ctx,
                                fingerprint={}, console=Console(quiet=True))
        with open("/proc/self/clear_refs", "w") as f:  # the high-water mark restarts from here
            f.write("5")
        trainer.fit(show_progress=False)
    peak = _status_kb("VmHWM") - base
    Path(f"{out}.rank{ctx.rank}.json").write_text(json.dumps({"peak": peak, "estimate": estimated}))
    distributed.teardown(ctx)


def measure(name: str, world: int, steps: int) -> tuple[float, float]:
    """(estimated, measured) peak (bytes) of the largest rank of one run."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=_MMAP_THRESHOLD, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak"
        args = [__file__, "--worker", name, "--steps", str(steps), "--out", str(out)]
        launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", str(world)]
        proc = subprocess.run([*launch, *args], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} on {world} rank(s) failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in Path(tmp).glob("peak.rank*.json")]
    return ranks[0]["estimate"], max(r["peak"] for r in ranks)


def h100_table() -> str:
    """Markdown: the estimated peak per rank of the Qwen3 shapes on 1, 2 and 8 H100s, distill's preset for real
    models (8 x 2048 tokens, --cka-layers every:4, W4A4), as it is and with --grad-checkpointing (and
    --teacher-offload)."""
    from transformers import AutoConfig

    from ckaqad_cli import memory
    from ckaqad_cli.units import format_bytes

    variants = (("preset", {}), ("--grad-checkpointing", dict(grad_checkpointing=True)),
                ("--grad-checkpointing --teacher-offload", dict(grad_checkpointing=True, teacher_offload=True)))
    lines = ["| model | options | 1 H100 | 2 H100s | 8 H100s |", "|---|---|---|---|---|"]
    for name, (arch, fields) in QWEN3.items():
        sizes = memory.model_sizes(AutoConfig.for_model(arch, **fields), "w4a4", device_type="cuda", name=name)
        layers = fields["num_hidden_layers"]
        cka_layers = len([i for i in range(layers) if (layers - 1 - i) % 4 == 0])
        for label, extra in variants:
            settings = memory.Settings(batch_size=8, seq_len=2048, cka_layers=cka_layers, **extra)
            cells = []
            for world in (1, 2, 8):
                est = memory.estimate(sizes, settings, world_size=world, device_type="cuda")
                mark = "fits" if memory.fits(est, [H100] * world) else "does not fit"
                cells.append(f"{format_bytes(est.peak)} ({mark})")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--h100-table", action="store_true", help="print docs/distributed.md's table of estimates")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return
    if args.h100_table:
        print(h100_table())
        return
    from ckaqad_cli.units import format_bytes

    lines = ["| shape | ranks | estimated per rank | measured (largest rank) | estimate / measured |",
             "|---|---|---|---|---|"]
    for name in args.shapes:
        for world in args.worlds:
            est, got = measure(name, world, args.steps)
            row = f"| {name} | {world} | {format_bytes(est)} | {format_bytes(got)} | {est / got:.3f} |"
            lines.append(row)
            print(row, flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
