"""Diagnose benchmarks (by hand, not a test).

1. ``scaling``: diagnose throughput (tokens/s) and peak RSS as the tokens grow 1x, 4x, 16x, 64x on a fixed small
   model; each size runs in a fresh subprocess so that its peak memory is its own. Memory should stay flat.
2. ``overhead``: cost of the streaming CKA statistics (teacher + one student, every layer and the embeddings)
   against the two forward passes, for a Qwen3-0.6B-shaped model with random weights (hidden 1024, MLP 3072,
   16 heads, 8 KV heads, vocabulary 151936), in the model's dtype (``--dtype``) at ``--seq-len`` tokens per
   sequence. Per-layer costs are measured at two depths and extrapolated to 28 layers (give 28 as the second depth
   to measure the real one). The statistics are timed in the steady state of a long run: every accumulator has
   already seen one batch (its first batch allocates and zeroes the float64 sums, a cost paid once per run).
   ``--device cuda`` runs both on a GPU (timed after a synchronize; the forwards get one untimed warm-up).

    python benchmarks/bench_diagnose.py scaling --base-tokens 2048
    python benchmarks/bench_diagnose.py overhead --layers 4 28 --tokens 1024 --seq-len 256 --dtype float32
    python benchmarks/bench_diagnose.py overhead --layers 4 28 --tokens 8192 --seq-len 2048 --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _tiny(path: Path, seed: int, *, hidden: int, layers: int, vocab: int = 112) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ckaqad_cli.builtin.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def one_run(root: Path, tokens: int) -> dict:
    from rich.console import Console

    from ckaqad_cli.rundir import RunDir
    from ckaqad_cli.stages.diagnose import DiagnoseConfig, run_diagnose

    cfg = DiagnoseConfig(teacher=str(root / "teacher"), students=[("s", str(root / "student"))], seq_len=256,
                         max_tokens=tokens, batch_size=8, task_problems=0, device="cpu", dtype="float32")
    start = time.perf_counter()
    report = run_diagnose(cfg, RunDir(Path(tempfile.mkdtemp()) / "run"), console=Console(stderr=True, quiet=True))
    seconds = time.perf_counter() - start
    return {"tokens": report["tokens"], "seconds": seconds, "tokens_per_s": report["tokens"] / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def scaling(args) -> None:
    root = Path(tempfile.mkdtemp())
    _tiny(root / "teacher", 0, hidden=256, layers=4)
    _tiny(root / "student", 1, hidden=256, layers=4)
    print("| tokens | seconds | tokens/s | peak RSS (MB) |\n|---|---|---|---|")
    for factor in (1, 4, 16, 64):
        out = subprocess.run([sys.executable, __file__, "_one", str(root), str(args.base_tokens * factor)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |", flush=True)


def _qwen3_shaped(layers: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def overhead(args) -> None:
    from ckaqad_cli.cka_streaming import StreamingCKA
    from ckaqad_cli.models import capture_residuals

    torch.manual_seed(0)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    seq = args.seq_len
    ids = torch.randint(0, 151936, (max(1, args.tokens // seq), seq)).to(device)
    rows = {}
    for layers in args.layers:
        teacher, student = _qwen3_shaped(layers, dtype).to(device), _qwen3_shaped(layers, dtype).to(device)
        with capture_residuals(teacher) as ht, capture_residuals(student) as hs:
            def forwards():
                ht.clear(), hs.clear()
                teacher(input_ids=ids), student(input_ids=ids)

            if device.type == "cuda":
                forwards()  # kernel selection and allocator warm-up, once per process
            t_fwd = _best(forwards, args.repeats, device)
            feats_t = [h[:, 1:].reshape(-1, h.shape[-1]) for h in ht[:-1]]
            feats_s = [h[:, 1:].reshape(-1, h.shape[-1]) for h in hs[:-1]]

        accumulators = [StreamingCKA() for _ in feats_t]

        def stats():
            for acc, y, x in zip(accumulators, feats_t, feats_s, strict=True):
                acc.update(x, y)

        stats()  # the first batch of each accumulator allocates its sums: not the steady state

        t_cka = _best(stats, args.repeats, device)
        rows[layers] = (t_fwd, t_cka)
        print(f"layers={layers}: two forwards {t_fwd:.3f} s, CKA statistics ({layers + 1} captures) {t_cka:.3f} s, "
              f"ratio {100 * t_cka / t_fwd:.1f}%", flush=True)
    (l1, (f1, c1)), (l2, (f2, c2)) = sorted(rows.items())[:2]
    fwd_per_layer, cka_per_layer = (f2 - f1) / (l2 - l1), (c2 - c1) / (l2 - l1)
    fwd_fixed, cka_fixed = f1 - l1 * fwd_per_layer, c1 - l1 * cka_per_layer
    f28, c28 = fwd_fixed + 28 * fwd_per_layer, cka_fixed + 28 * cka_per_layer
    print(f"per layer: forwards {fwd_per_layer:.4f} s, CKA {cka_per_layer:.4f} s; "
          f"extrapolated to 28 layers: forwards {f28:.2f} s, CKA {c28:.2f} s, ratio {100 * c28 / f28:.1f}%")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_one":
        torch.set_num_threads(2)
        print(json.dumps(one_run(Path(sys.argv[2]), int(sys.argv[3]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scaling")
    s.add_argument("--base-tokens", type=int, default=2048)
    o = sub.add_parser("overhead")
    o.add_argument("--layers", type=int, nargs=2, default=[2, 4])
    o.add_argument("--tokens", type=int, default=1024)
    o.add_argument("--repeats", type=int, default=2)
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    o.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args()
    {"scaling": scaling, "overhead": overhead}[args.cmd](args)


if __name__ == "__main__":
    main()
