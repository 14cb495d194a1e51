"""Step-time and peak-memory overhead of the CKA term against KL-only QAD (lambda = 0), same model, batch, hardware.

Model: Qwen3-0.6B-shaped (width 1024, MLP 3072, 16 query / 8 KV heads of 128, vocab 151936, tied embeddings),
random weights, ``--layers`` decoder layers (28 in the real model; fewer to keep the CPU run short). Every run is a
fresh process running the real training loop (``stages.distill.train``) for ``--steps`` steps, W4A4 student; the
first step is dropped. KL-only and CKA runs alternate so that drifting machine load hits both alike.

Because whole-step times on a shared machine are noisy at the 1% level, the CKA work is also timed on its own:
the same number of sampled tokens and layers through ``cka_loss`` forward and backward (the hooks' gather is
included), which is the part lambda = 0 skips.

    python benchmarks/bench_distill_overhead.py --layers 4 --seq-len 1024 --repeats 3 \
        --markdown benchmarks/results_distill_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def qwen3_06b_config(layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
    )


class _Tokenizer:
    """The loop reads only these from a tokenizer (nothing is saved: the run stops before the student is written)."""

    bos_token_id = 151643


def one_run(args: argparse.Namespace) -> None:
    """Child process: one training run, prints its per-step times and peak memory as JSON."""
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from ckaqad_cli import distributed
    from ckaqad_cli.models import ptq_student
    from ckaqad_cli.stages import distill as S

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(qwen3_06b_config(args.layers), dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    student, recipe = ptq_student(teacher, "w4a4")
    student.requires_grad_(True).train()
    models = S.Models(student=student, teacher=teacher, tokenizer=_Tokenizer(), recipe=recipe)
    ids = torch.randint(0, 151000, (args.batch_size * args.steps + 1, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    lam = 0.0 if args.mode == "kl" else None
    cfg = S.DistillConfig(
        teacher="bench", steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-5,
        lambda_cka=lam, eval_every=10**6, save_every=10**6, eval_sequences=1, eval_batch_size=1, eval_tokens=64,
    ).resolved()
    out = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    S._save_student = lambda *a, **k: None  # the benchmark times training, not the final save
    S.train(cfg, models, ids[1:], ids[:1], out, distributed.DistContext(), console=Console(quiet=True),
            show_progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["type"] == "train"]
    print(json.dumps({"step_time_s": [r["step_time_s"] for r in steps], "peak_mem_mb": steps[-1]["peak_mem_mb"],
                      "cka_layers": S.parse_layers(cfg.cka_layers, args.layers), "cka_tokens": cfg.cka_tokens,
                      "cka_layers_spec": cfg.cka_layers}))


def cka_work_seconds(layers: int, tokens: int, width: int, repeats: int) -> float:
    """Median time of the CKA term alone: gather sampled rows of each selected layer, cka_loss forward + backward."""
    import torch

    from ckaqad_cli.cka import cka_loss

    gen = torch.Generator().manual_seed(0)
    seq = 1024
    full_s = [torch.randn(1, seq, width, generator=gen, requires_grad=True) for _ in range(layers)]
    full_t = [torch.randn(1, seq, width, generator=gen) for _ in range(layers)]
    rows, cols = torch.zeros(tokens, dtype=torch.long), torch.randperm(seq - 1, generator=gen)[:tokens] + 1
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = cka_loss([h[rows, cols] for h in full_s], [h[rows, cols] for h in full_t])
        loss.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--modes", default="kl,cka",
                   help="whole-step runs to time: kl,cka (the A/B) or kl alone (then only the CKA term's share of a "
                        "KL-only step is reported; for models whose steps take minutes on the CPU)")
    p.add_argument("--bound-layers", type=int, default=None,
                   help="also time the CKA term for the default layer selection of a model with this many layers (28 "
                        "for Qwen3-0.6B) and give its share of this model's KL-only step: an upper bound on the share "
                        "at that depth, since a deeper model's step is longer (for depths whose training does not fit "
                        "in memory)")
    p.add_argument("--mode", choices=["kl", "cka"], default=None, help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.mode is not None:
        one_run(args)
        return

    modes = [m for m in args.modes.split(",") if m]
    if "kl" not in modes or set(modes) - {"kl", "cka"}:
        p.error("--modes must be kl or kl,cka")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in modes:
            cmd = [sys.executable, __file__, "--mode", mode, "--layers", str(args.layers), "--seq-len",
                   str(args.seq_len), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"repeat {r} {mode}: {results[mode][-1]}", file=sys.stderr, flush=True)
    step = {m: statistics.median(t for run in results[m] for t in run["step_time_s"][1:]) for m in results}
    mem = {m: statistics.median(run["peak_mem_mb"] for run in results[m]) for m in results}
    if "cka" not in results:  # the CKA settings the run would use, from the KL-only run's record
        step["cka"], mem["cka"] = float("nan"), float("nan")
    info = results["kl"][0]
    cka_alone = cka_work_seconds(len(info["cka_layers"]), info["cka_tokens"], 1024, repeats=5)
    bound = None
    if args.bound_layers:
        from ckaqad_cli.objective import parse_layers

        deep_layers = parse_layers(info["cka_layers_spec"], args.bound_layers)
        deep_alone = cka_work_seconds(len(deep_layers), info["cka_tokens"], 1024, repeats=5)
        bound = {"layers": args.bound_layers, "cka_layers": deep_layers, "cka_term_alone_s": deep_alone,
                 "upper_bound_pct_of_step": 100 * deep_alone / step["kl"]}
    table = {
        "step_s_kl_only": step["kl"], "step_s_cka": step["cka"],
        "step_overhead_pct": 100 * (step["cka"] / step["kl"] - 1),
        "cka_term_alone_s": cka_alone, "cka_term_alone_pct_of_step": 100 * cka_alone / step["kl"],
        "peak_rss_mb_kl_only": mem["kl"], "peak_rss_mb_cka": mem["cka"],
        "peak_mem_overhead_pct": 100 * (mem["cka"] / mem["kl"] - 1),
        "cka_layers": info["cka_layers"], "cka_tokens": info["cka_tokens"], "bound": bound,
    }
    print(json.dumps(table, indent=2))
    if args.markdown:
        cmd = " ".join(["python benchmarks/bench_distill_overhead.py", *sys.argv[1:]])
        lines = [
            "# CKA-term overhead in `ckaqad distill` (CPU)",
            "",
            f"Command: `{cmd}`",
            "",
            f"Model: Qwen3-0.6B shape (width 1024, MLP 3072, 16/8 heads of 128, vocab 151936, tied embeddings), "
            f"random weights, **{args.layers} decoder layers instead of 28** (CPU time), W4A4 student, batch "
            f"{args.batch_size} x {args.seq_len} tokens, float32 on {os.cpu_count()} CPU cores. Default CKA settings "
            f"(`--cka-layers every:4` -> layers {info['cka_layers']}, `--cka-tokens {info['cka_tokens']}`). Median "
            f"over {args.repeats} fresh processes per mode x {args.steps - 1} timed steps (first step dropped).",
            "",
            "| measure | KL-only (lambda 0) | CKA-QAD | overhead |",
            "|---|---|---|---|",
            f"| step time (s) | {step['kl']:.3f} | {step['cka']:.3f} | {table['step_overhead_pct']:+.2f}% |"
            if "cka" in results else f"| step time (s) | {step['kl']:.3f} | not run (`--modes kl`) | |",
            f"| CKA term alone (s), share of a KL-only step | | {cka_alone:.4f} | "
            f"{table['cka_term_alone_pct_of_step']:.2f}% |",
            f"| peak RSS (MB) | {mem['kl']:.0f} | {mem['cka']:.0f} | {table['peak_mem_overhead_pct']:+.2f}% |"
            if "cka" in results else f"| peak RSS (MB) | {mem['kl']:.0f} | not run | |",
            "",
        ]
        if bound:
            lines[-1:-1] = [
                f"| CKA term of the {bound['layers']}-layer default selection (layers {bound['cka_layers']}), share "
                f"of this model's KL-only step: **upper bound** at {bound['layers']} layers | | "
                f"{bound['cka_term_alone_s']:.4f} | {bound['upper_bound_pct_of_step']:.2f}% |",
            ]
        args.markdown.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
