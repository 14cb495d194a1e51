"""One command that checks and times on a GPU what only a GPU can show (docs/benchmarks.md, "The GPU check").

    python benchmarks/gpu_check.py --device cuda --out gpu-check    # sized for under 8 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --out /tmp/check    # tiny shapes, the same code paths (a test)

Parts, each in its own try block (a failure is recorded with its error line and the next part runs); the results
go to DIR/gpu_check.json and DIR/gpu_check.md after every part (atomic writes), so a run stopped by a time limit
keeps the parts it finished:

1. ``kernels``: the Triton quantize-and-pack and fake-quant kernels bit-exact against the PyTorch reference on
   Qwen3-4B's projection shapes in bf16 and float16 (the first shape of each also against the reference on the CPU,
   the definition), and their GB/s (bytes read + written, kernel alone, the global scale given) against a
   device-to-device copy of the same input.
2. ``pack``: ``pack`` on the device of a synthetic ~2 GB bf16 checkpoint against a plain copy of its files.
3. ``cka``: diagnose's streaming CKA statistics (the embeddings and every layer, teacher + one student) against the
   two bf16 forwards at the Qwen3-0.6B shape, 28 layers, in each precision; and the bf16 precision's error against
   float64 CKA on the same features.
4. ``distill``: distill's step time and peak memory with and without the CKA term at the Qwen3-0.6B shape (the
   real loop, W4A4 student), the CKA term alone, and the memory estimate of ``ckaqad_cli.memory`` against the peak.

On the CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1 is set here before triton loads).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from bench_diagnose import _best, _sync  # noqa: E402  (the benchmarks' one synchronized timer)
from bench_pack import write_synthetic_checkpoint  # noqa: E402
QWEN3_4B_PROJECTIONS = ((4096, 2560), (1024, 2560), (2560, 4096), (9728, 2560), (2560, 9728))
"""(out, in) of Qwen3-4B's q, k and v, o, gate and up, down projections."""
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TINY_LM = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)


@dataclass(frozen=True)
class Plan:
    """The shapes of one device's check."""

    kernel_shapes: tuple[tuple[int, int], ...]
    repeats: int  # timed repeats (the best counts)
    checkpoint: dict[str, int]  # bench_pack.write_synthetic_checkpoint's shape
    lm: dict[str, Any]  # the Qwen3 config fields of the cka and distill parts
    cka_batch: tuple[int, int]  # sequences x tokens
    distill_batch: tuple[int, int]
    distill_steps: int  # the first is not timed


PLANS = {
    "cuda": Plan(kernel_shapes=QWEN3_4B_PROJECTIONS, repeats=10,
                 checkpoint=dict(hidden=2048, intermediate=8192, layers=14, vocab=32000), lm=QWEN3_06B,
                 cka_batch=(4, 2048), distill_batch=(4, 2048), distill_steps=4),
    "cpu": Plan(kernel_shapes=((64, 128), (32, 256)), repeats=2,
                checkpoint=dict(hidden=128, intermediate=256, layers=2, vocab=512), lm=TINY_LM,
                cka_batch=(2, 64), distill_batch=(2, 64), distill_steps=2),
}


# -- timing --------------------------------------------------------------------------------------------------------
def best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The best wall time of ``fn`` over ``repeats`` after one untimed call (compilation, allocator warm-up),
    synchronized before and after each call."""
    fn()
    return _best(fn, repeats, device)


def _qwen3(fields: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    config = Qwen3Config(**fields, max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


# -- 1. kernels ----------------------------------------------------------------------------------------------------
def check_kernels(plan: Plan, device: torch.device) -> dict[str, Any]:
    from ckaqad_kernels import nvfp4_ref as ref
    from ckaqad_kernels import nvfp4_triton

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for i, (m, k) in enumerate(plan.kernel_shapes):
            x = (torch.randn(m, k, device=device, generator=gen) * 0.02).to(dtype)
            g = ref.resolve_global_scale(x, None)
            packed, scales = nvfp4_triton.quantize_and_pack(x, g)
            fake = nvfp4_triton.fake_quantize(x, g)
            want_packed, want_scales, _ = ref.quantize_and_pack(x, g)
            exact = (torch.equal(packed, want_packed) and torch.equal(scales.view(torch.uint8),
                                                                       want_scales.view(torch.uint8))
                     and torch.equal(fake.view(torch.int16), ref.fake_quantize(x, g).view(torch.int16)))
            if i == 0 and device.type != "cpu":  # the definition: the reference on the CPU
                cpu_packed, cpu_scales, _ = ref.quantize_and_pack(x.cpu(), g.cpu())
                exact = exact and torch.equal(packed.cpu(), cpu_packed) and torch.equal(
                    scales.view(torch.uint8).cpu(), cpu_scales.view(torch.uint8))
            copy_out = torch.empty_like(x)
            copy_s = best_seconds(lambda: copy_out.copy_(x), device, plan.repeats)
            pack_s = best_seconds(lambda: nvfp4_triton.quantize_and_pack(x, g), device, plan.repeats)
            fake_s = best_seconds(lambda: nvfp4_triton.fake_quantize(x, g), device, plan.repeats)
            copy_gbs = 2 * x.nbytes / copy_s / 1e9
            pack_gbs = (x.nbytes + packed.nbytes + scales.nbytes) / pack_s / 1e9
            fake_gbs = 2 * x.nbytes / fake_s / 1e9
            rows.append({"shape": [m, k], "dtype": str(dtype).removeprefix("torch."), "bit_exact": bool(exact),
                         "copy_gbs": copy_gbs, "pack_gbs": pack_gbs, "pack_of_copy": pack_gbs / copy_gbs,
                         "fake_gbs": fake_gbs, "fake_of_copy": fake_gbs / copy_gbs})
    return {"rows": rows, "all_bit_exact": all(r["bit_exact"] for r in rows),
            "min_pack_of_copy": min(r["pack_of_copy"] for r in rows),
            "min_fake_of_copy": min(r["fake_of_copy"] for r in rows)}


# -- 2. pack -------------------------------------------------------------------------------------------------------
def check_pack(plan: Plan, device: torch.device, work: Path) -> dict[str, Any]:
    from ckaqad_cli.stages.pack import PackConfig, pack_model

    src = work / "source"
    total, _ = write_synthetic_checkpoint(src, **plan.checkpoint)
    start = time.perf_counter()
    shutil.copytree(src, work / "copy")
    for f in (work / "copy").iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    copy_s = time.perf_counter() - start
    shutil.rmtree(work / "copy")
    start = time.perf_counter()
    result = pack_model(PackConfig(model=str(src), out=str(work / "packed"), scheme="w4a16", verify=False,
                                   device=str(device)))
    _sync(device)
    pack_s = time.perf_counter() - start
    return {"checkpoint_bytes": total, "copy_s": copy_s, "pack_s": pack_s, "pack_of_copy": pack_s / copy_s,
            "kernel": result.summary["kernel"], "bytes_after": result.summary["bytes_after"]}


# -- 3. CKA statistics against the forwards ------------------------------------------------------------------------
def check_cka(plan: Plan, device: torch.device) -> dict[str, Any]:
    from ckaqad_cli.cka_streaming import CKA_PRECISIONS, StreamingCKA
    from ckaqad_cli.models import capture_residuals

    teacher, student = (_qwen3(plan.lm, torch.bfloat16, device, seed) for seed in (0, 1))
    sequences, seq_len = plan.cka_batch
    ids = torch.randint(0, plan.lm["vocab_size"], (sequences, seq_len), device=device)
    with torch.no_grad(), capture_residuals(teacher) as ht, capture_residuals(student) as hs:
        def forwards() -> None:
            ht.clear(), hs.clear()
            teacher(input_ids=ids), student(input_ids=ids)

        forwards_s = best_seconds(forwards, device, plan.repeats)
        feats_t = [h[:, 1:].reshape(-1, h.shape[-1]) for h in ht[:-1]]
        feats_s = [h[:, 1:].reshape(-1, h.shape[-1]) for h in hs[:-1]]
    out: dict[str, Any] = {"forwards_s": forwards_s, "captures": len(feats_t), "tokens": feats_t[0].shape[0]}
    for precision in CKA_PRECISIONS:
        accumulators = [StreamingCKA(precision) for _ in feats_t]

        def stats() -> None:
            for acc, y, x in zip(accumulators, feats_t, feats_s, strict=True):
                acc.update(x, y)

        seconds = best_seconds(stats, device, plan.repeats)  # the untimed first call allocates the sums
        out[precision] = {"stats_s": seconds, "share_of_forwards": seconds / forwards_s}
    errors = []
    for y, x in zip(feats_t, feats_s, strict=True):
        bf16, exact = StreamingCKA("bf16"), StreamingCKA()
        bf16.update(x, y)
        exact.update(x.double(), y.double())
        errors.append(max(abs(bf16.linear() - exact.linear()), abs(bf16.debiased() - exact.debiased())))
    out["bf16_max_error_vs_float64"] = max(errors)
    return out


# -- 4. distill ----------------------------------------------------------------------------------------------------
class _Tokenizer:
    bos_token_id = None


def _distill_run(plan: Plan, device: torch.device, lambda_cka: float | None, work: Path) -> tuple[dict[str, Any], Any]:
    """Steps of the real loop (``Trainer.step``), KL-only when ``lambda_cka`` is 0: (their median time and peak
    memory, the resolved DistillConfig)."""
    from rich.console import Console

    from ckaqad_cli import distributed
    from ckaqad_cli.models import ptq_student
    from ckaqad_cli.settings.distill import DistillConfig
    from ckaqad_cli.trainer import Models, Trainer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = _qwen3(plan.lm, dtype, device, 0)
    student, recipe = ptq_student(teacher, "w4a4", dtype=torch.float32)
    student.requires_grad_(True).train()
    batch, seq_len = plan.distill_batch
    steps = plan.distill_steps
    ids = torch.randint(0, plan.lm["vocab_size"], (batch * steps + 1, seq_len),
                        generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(teacher="gpu-check", steps=steps, batch_size=batch, seq_len=seq_len, lr=1e-5,
                        lambda_cka=lambda_cka, eval_every=10**6, save_every=10**6, eval_sequences=1,
                        eval_batch_size=1, eval_tokens=64).resolved()
    models = Models(student=student, teacher=teacher, tokenizer=_Tokenizer(), recipe=recipe)
    trainer = Trainer.setup(cfg, models, ids[1:], ids[:1], work / f"distill-{lambda_cka}",
                            distributed.DistContext(device=device), fingerprint={}, console=Console(quiet=True))
    records = [trainer.step(s) for s in range(steps)]
    out = {"step_s": statistics.median(r["step_time_s"] for r in records[1:]),
           "peak_bytes": max(r["peak_mem_mb"] for r in records[1:]) * 2**20,
           "cka_layers": list(trainer.settings.cka_layers) if trainer.settings.uses_cka else []}
    del trainer, models, teacher, student
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, cfg


def cka_term_seconds(plan: Plan, device: torch.device, layers: int, tokens: int) -> float:
    """The CKA term alone (what --lambda-cka 0 skips): sampled rows of each selected layer, cka_loss forward and
    backward, timed as in benchmarks/bench_distill_overhead.py."""
    from ckaqad_cli.cka import cka_loss

    seq, width = plan.distill_batch[1], plan.lm["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(0)
    full_s = [torch.randn(1, seq, width, device=device, generator=gen, requires_grad=True) for _ in range(layers)]
    full_t = [torch.randn(1, seq, width, device=device, generator=gen) for _ in range(layers)]
    rows = torch.zeros(min(tokens, seq - 1), dtype=torch.long, device=device)
    cols = torch.randperm(seq - 1, device=device)[: rows.shape[0]] + 1

    def term() -> None:
        cka_loss([h[rows, cols] for h in full_s], [h[rows, cols] for h in full_t]).backward()

    return best_seconds(term, device, plan.repeats)


def check_distill(plan: Plan, device: torch.device, work: Path) -> dict[str, Any]:
    from ckaqad_cli import memory
    from transformers import Qwen3Config

    kl_only, _ = _distill_run(plan, device, 0.0, work)
    cka, cfg = _distill_run(plan, device, None, work)
    term_s = cka_term_seconds(plan, device, len(cka["cka_layers"]), cfg.cka_tokens)
    sizes = memory.model_sizes(Qwen3Config(**plan.lm), "w4a4", device_type=device.type, name="qwen3-0.6b shape")
    estimates = {
        name: memory.estimate(sizes, memory.Settings.of(cfg, layers), device_type=device.type).peak
        for name, layers in (("kl_only", 0), ("cka", len(cka["cka_layers"])))
    }
    return {
        "kl_only": kl_only, "cka": cka, "cka_term_s": term_s, "cka_term_share": term_s / kl_only["step_s"],
        "step_overhead": cka["step_s"] / kl_only["step_s"] - 1,
        "memory_overhead": cka["peak_bytes"] / kl_only["peak_bytes"] - 1,
        "estimate_bytes": estimates,
        "estimate_of_measured": {k: estimates[k] / v["peak_bytes"] for k, v in (("kl_only", kl_only), ("cka", cka))},
        "memory_note": "peak = torch.cuda.max_memory_allocated" if device.type == "cuda"
        else "peak = the process's resident-set high-water mark, runtime included (the estimate leaves it out)",
    }


# -- the report ----------------------------------------------------------------------------------------------------
def _markdown(results: dict[str, Any]) -> str:
    from ckaqad_cli.units import fmt, format_bytes

    lines = [f"# GPU check: {results['device']}", "", f"torch {results['torch']}, {results['when']}, "
             f"`{results['command']}`", ""]
    parts = results["parts"]
    for name, part in parts.items():
        lines.append(f"## {name}: {part['status']} ({fmt(part.get('seconds'))} s)")
        lines.append("")
        if part["status"] != "ok":
            lines += [f"    {part['error']}", ""]
            continue
        if name == "kernels":
            lines += ["| shape | dtype | bit-exact | copy GB/s | quantize+pack GB/s (x copy) | fake-quant GB/s "
                      "(x copy) |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['shape'][0]} x {r['shape'][1]} | {r['dtype']} | {r['bit_exact']} | {r['copy_gbs']:.1f} | "
                      f"{r['pack_gbs']:.1f} ({r['pack_of_copy']:.2f}) | {r['fake_gbs']:.1f} ({r['fake_of_copy']:.2f}) |"
                      for r in part["rows"]]
        elif name == "pack":
            lines += [f"- checkpoint {format_bytes(part['checkpoint_bytes'])} -> {format_bytes(part['bytes_after'])};"
                      f" copy {part['copy_s']:.1f} s, pack {part['pack_s']:.1f} s ({part['pack_of_copy']:.2f} x copy);"
                      f" kernel: {part['kernel']}"]
        elif name == "cka":
            lines += [f"- two bf16 forwards: {part['forwards_s']:.4f} s ({part['captures']} captures of "
                      f"{part['tokens']} tokens)"]
            lines += [f"- statistics, {p} precision: {part[p]['stats_s']:.4f} s, "
                      f"{100 * part[p]['share_of_forwards']:.2f}% of the forwards" for p in ("bf16", "float32")]
            lines.append(f"- bf16 precision against float64 CKA: max error {part['bf16_max_error_vs_float64']:.1e}")
        elif name == "distill":
            lines += ["| measure | KL-only | CKA-QAD | overhead |", "|---|---|---|---|",
                      f"| step time (s) | {part['kl_only']['step_s']:.4f} | {part['cka']['step_s']:.4f} | "
                      f"{100 * part['step_overhead']:+.2f}% |",
                      f"| peak memory | {format_bytes(part['kl_only']['peak_bytes'])} | "
                      f"{format_bytes(part['cka']['peak_bytes'])} | {100 * part['memory_overhead']:+.2f}% |",
                      f"| memory estimate (x measured) | {format_bytes(part['estimate_bytes']['kl_only'])} "
                      f"({part['estimate_of_measured']['kl_only']:.2f}) | "
                      f"{format_bytes(part['estimate_bytes']['cka'])} ({part['estimate_of_measured']['cka']:.2f}) | |",
                      f"| CKA term alone (s), share of a KL-only step | | {part['cka_term_s']:.4f} | "
                      f"{100 * part['cka_term_share']:.2f}% |", "", f"{part['memory_note']}; CKA layers "
                      f"{part['cka']['cka_layers']}."]
        lines.append("")
    return "\n".join(lines)


def _write(out: Path, results: dict[str, Any]) -> None:
    from ckaqad_cli.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "gpu_check.json", results)
    atomic_write_text(out / "gpu_check.md", _markdown(results))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def run(device_name: str, out: Path, parts: list[str]) -> dict[str, Any]:
    from rich.console import Console

    from ckaqad_cli.progress import make_progress

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    plan = PLANS[device.type]
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": _device_name(device), "torch": torch.__version__,
                               "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "command": " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]]), "parts": {}}
    checks = {"kernels": lambda w: check_kernels(plan, device), "pack": lambda w: check_pack(plan, device, w),
              "cka": lambda w: check_cka(plan, device), "distill": lambda w: check_distill(plan, device, w)}
    console = Console(stderr=True)
    with make_progress(console, label="gpu check") as progress:
        task = progress.add_task("parts", total=len(parts))
        for name in parts:
            progress.update(task, description=name)
            start = time.perf_counter()
            work = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
            try:
                part = {"status": "ok", **checks[name](work)}
            except Exception as exc:  # each part on its own: a failure must not hide the others
                part = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                        "traceback": traceback.format_exc()}
            finally:
                shutil.rmtree(work, ignore_errors=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            part["seconds"] = time.perf_counter() - start
            results["parts"][name] = part
            _write(out, results)
            progress.advance(task)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (tiny shapes)")
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--parts", nargs="+", default=["kernels", "pack", "cka", "distill"],
                   choices=["kernels", "pack", "cka", "distill"])
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton loads: the kernels run in the interpreter
    results = run(args.device, args.out, args.parts)
    failed = [n for n, part in results["parts"].items() if part["status"] != "ok"]
    print(json.dumps({"out": str(args.out), "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
