"""NVFP4 quantize-and-pack speed (run by hand; not a test).

CPU: our C kernel (what pack runs on the CPU) and our PyTorch reference against compressed-tensors' NVFP4 compressor
and ModelOpt's NVFP4QTensor.quantize on the same bf16 matrices; each timing covers the whole job (global scale, block
scales, codes, packing). The ratios are against the C kernel (the reference where no C compiler is found).
GPU: the Triton kernels against a device-to-device copy of the same tensor, in GB/s of input read, and bit-exactness
against the CPU reference. rules: the C kernel under each scale rule (docs/nvfp4.md, "Scale rules"), in GB/s of bf16
input read and relative to the amax rule. fake: fake quantization (quantize and decode, what a quantization-aware
student runs twice per linear layer and step) of float32 activations: the C kernel, the reference and ModelOpt's
NVFP4QTensor quantize + dequantize (ModelOpt's training quantizer, TensorQuantizer, refuses CPU tensors), bit-exactness
of each against the reference.

    python benchmarks/bench_nvfp4.py cpu --markdown benchmarks/results_nvfp4_cpu.md
    python benchmarks/bench_nvfp4.py fake --shapes 4096x128 4096x512 8192x4096 --threads 1
    python benchmarks/bench_nvfp4.py rules --shapes 4096x4096 --threads 1
    python benchmarks/bench_nvfp4.py gpu --shapes 8192x28672 16384x16384
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ckaqad_cli.atomic import atomic_write_text
from ckaqad_kernels import dispatch, nvfp4_cpu
from ckaqad_kernels import nvfp4_ref as ref
from ckaqad_kernels.nvfp4_spec import SCALE_RULES

DEFAULT_SHAPES = ("4096x4096", "8192x28672")
console = Console(stderr=True)


def _shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def _best_of(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Rounds over all contenders (fair under a fluctuating load); the best wall and CPU time of each."""
    for fn in contenders.values():
        fn()  # warm-up
    best = {label: (float("inf"), float("inf")) for label in contenders}
    for _ in range(repeats):
        for label, fn in contenders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[label] = (min(best[label][0], wall), min(best[label][1], cpu))
    return best


def _modelopt() -> Callable[[torch.Tensor], object] | None:
    try:
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    except ImportError:
        return None
    return lambda w: NVFP4QTensor.quantize(w, 16)


def _ct_compress(w: torch.Tensor, observer_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """compressed-tensors' own NVFP4 path: its observer math (run in ``observer_dtype``), then its compressor."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = preset_name_to_scheme("NVFP4A16", ["Linear"]).weights
    rows, cols = w.shape
    wo = w.to(observer_dtype)
    global_scale = generate_gparam(wo.amin(), wo.amax())
    blocks = wo.view(rows, cols // 16, 16)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
    state = {"weight": w, "weight_scale": scale, "weight_global_scale": global_scale}
    return NVFP4PackedCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))


def _compressed_tensors() -> Callable[[torch.Tensor], object] | None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return None
    return _ct_compress


def _ct_encode(w: torch.Tensor, observer_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, E4M3 scale bytes) from compressed-tensors' compressor."""
    state = _ct_compress(w, observer_dtype)
    return ref.unpack_fp4(state["weight_packed"]), state["weight_scale"].view(torch.uint8)


def agreement(shapes: list[tuple[int, int]], seeds: int) -> str:
    """Code and block-scale agreement between the implementations on random bf16 weights, as a Markdown table."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests' model
    from tests.kernels.nvfp4_cases import float64_model

    totals: dict[str, list[int]] = {}
    elements = blocks_total = 0
    for shape in shapes:
        for seed in range(seeds):
            torch.manual_seed(seed)
            w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
            codes, scales, g = ref.quantize(w)
            qt, mo_scales, _ = NVFP4QTensor.quantize(w.clone(), 16)
            c64, s64, _ = float64_model(w, float(g))
            encoded = {
                "ours": (codes, scales.view(torch.uint8)),
                "ModelOpt": (ref.unpack_fp4(qt._quantized_data), mo_scales.view(torch.uint8)),
                "compressed-tensors, float32 observer": _ct_encode(w, torch.float32),
                "compressed-tensors, bf16 observer": _ct_encode(w, torch.bfloat16),
                "float64 evaluation of our definition": (c64, s64.to(torch.float8_e4m3fn).view(torch.uint8)),
            }
            pairs = [("ours", other) for other in encoded if other != "ours"]
            pairs.append(("ModelOpt", "compressed-tensors, float32 observer"))
            pairs.append(("ModelOpt", "compressed-tensors, bf16 observer"))
            for a, b in pairs:
                (ca, sa), (cb, sb) = encoded[a], encoded[b]
                counts = totals.setdefault(f"{a} vs {b}", [0, 0])
                counts[0] += int((ca != cb).sum())
                counts[1] += int((sa != sb).sum())
            elements += w.numel()
            blocks_total += w.numel() // 16
    lines = [f"{seeds} seeds x {', '.join(f'{r}x{c}' for r, c in shapes)} of torch.randn * 0.02 in bf16 "
             f"({elements} elements, {blocks_total} blocks)", "",
             "| pair | codes that differ | block-scale bytes that differ |", "|---|---|---|"]
    for pair, (codes_diff, scales_diff) in totals.items():
        lines.append(f"| {pair} | {codes_diff} ({codes_diff / elements:.3%}) | "
                     f"{scales_diff} ({scales_diff / blocks_total:.3%}) |")
    return "\n".join(lines) + "\n"


def bench_cpu(shapes: list[tuple[int, int]], repeats: int) -> tuple[list[dict], str]:
    contenders = {"ours (torch reference)": lambda w: ref.quantize_and_pack(w)}
    ours = "ours (torch reference)"
    if nvfp4_cpu.available():
        ours = "ours (C kernel)"
        contenders = {ours: lambda w: nvfp4_cpu.quantize_and_pack(w), **contenders}
    else:
        console.print(f"[yellow]C kernel unavailable ({nvfp4_cpu.unavailable_reason()}); skipped[/]")
    for label, make in (("compressed-tensors compressor", _compressed_tensors), ("ModelOpt NVFP4QTensor", _modelopt)):
        fn = make()
        if fn is None:
            console.print(f"[yellow]{label} is not installed; skipped[/]")
        else:
            contenders[label] = fn
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        console.print(f"{shape[0]}x{shape[1]}: {', '.join(contenders)} ...")
        best = _best_of({label: (lambda fn=fn: fn(w.clone())) for label, fn in contenders.items()}, repeats)
        times = {label: wall for label, (wall, _) in best.items()}
        cpu_times = {label: cpu for label, (_, cpu) in best.items()}
        others = [label for label in times if not label.startswith("ours")]
        rows.append({
            "shape": f"{shape[0]}x{shape[1]}", "times": times, "cpu_times": cpu_times,
            "speedup_vs_fastest_other": min(times[o] for o in others) / times[ours] if others else None,
            "cpu_speedup_vs_fastest_other": min(cpu_times[o] for o in others) / cpu_times[ours] if others else None,
        })
    return rows, "cpu"


def bench_rules(shapes: list[tuple[int, int]], repeats: int) -> str:
    """The C kernel (the reference where none is built) under each scale rule, on N(0, 0.02^2) bf16 matrices."""
    encode = nvfp4_cpu.quantize_and_pack if nvfp4_cpu.available() else ref.quantize_and_pack
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"{encode.__module__}.quantize_and_pack, best of {repeats}, {torch.get_num_threads()} torch threads; "
             f"load average (1/5/15 min) at the start {load}", "",
             "| matrix (bf16) | " + " | ".join(f"{rule} GB/s (x amax time)" for rule in SCALE_RULES) + " |",
             "|---|" + "---|" * len(SCALE_RULES)]
    for rows, cols in shapes:
        torch.manual_seed(0)
        w = torch.randn(rows, cols, dtype=torch.bfloat16) * 0.02
        weights = torch.rand(cols) + 0.1
        best = _best_of({rule: (lambda rule=rule: encode(w, scale_rule=rule,
                                                         channel_weights=weights if rule == "mse-act" else None))
                         for rule in SCALE_RULES}, repeats)
        cells = [f"{w.numel() * 2 / best[rule][0] / 1e9:.2f} ({best[rule][0] / best['amax'][0]:.1f}x)"
                 for rule in SCALE_RULES]
        lines.append(f"| {rows}x{cols} | " + " | ".join(cells) + " |")
    lines += ["", "load average (1/5/15 min) at the end " + " / ".join(f"{x:.1f}" for x in os.getloadavg())]
    return "\n".join(lines) + "\n"


def _modelopt_fake() -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    except ImportError:
        return None

    def fake(x: torch.Tensor) -> torch.Tensor:
        packed, scale, double_scale = NVFP4QTensor.quantize(x, 16)
        return packed.dequantize(dtype=x.dtype, scale=scale, double_scale=double_scale, block_sizes={-1: 16})

    return fake


def _agreement(out: torch.Tensor, expected: torch.Tensor) -> str:
    if torch.equal(out.view(torch.int32), expected.view(torch.int32)):
        return "bits"
    return "values" if torch.equal(out, expected) else "NO"


def bench_fake(shapes: list[tuple[int, int]], repeats: int) -> str:
    """Fake quantization of N(0, 1) float32 activations, dynamic global scale: time and bit-exactness."""
    contenders = {"ours (torch reference)": ref.fake_quantize}
    if nvfp4_cpu.available():
        contenders = {"ours (C kernel)": nvfp4_cpu.fake_quantize, **contenders}
    if _modelopt_fake() is not None:
        contenders["ModelOpt NVFP4QTensor"] = _modelopt_fake()
    first = next(iter(contenders))
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"Best of {repeats} rounds, {torch.get_num_threads()} torch threads, wall milliseconds; load average "
             f"(1/5/15 min) at the start {load}. x: how many times {first}'s time; then its agreement with the "
             "reference: bits (the same bits), values (equal values, but +0.0 where the reference decodes a negative "
             "value rounded to zero as -0.0) or NO.", "",
             "| activations (float32) | " + " | ".join(f"{label} ms (x, agreement)" for label in contenders) + " |",
             "|---|" + "---|" * len(contenders)]
    for rows, cols in shapes:
        torch.manual_seed(0)
        x = torch.randn(rows, cols)
        expected = ref.fake_quantize(x)
        exact = {label: _agreement(fn(x), expected) for label, fn in contenders.items()}
        best = _best_of({label: (lambda fn=fn: fn(x)) for label, fn in contenders.items()}, repeats)
        cells = [f"{best[label][0] * 1e3:.2f} ({best[label][0] / best[first][0]:.1f}x, {exact[label]})"
                 for label in contenders]
        lines.append(f"| {rows}x{cols} | " + " | ".join(cells) + " |")
    lines += ["", "load average (1/5/15 min) at the end " + " / ".join(f"{x:.1f}" for x in os.getloadavg())]
    return "\n".join(lines) + "\n"


def _cuda_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_gpu(shapes: list[tuple[int, int]], repeats: int) -> tuple[list[dict], str]:
    if not torch.cuda.is_available():
        raise SystemExit("gpu mode needs a CUDA device")
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        w = (torch.randn(shape, dtype=torch.bfloat16) * 0.02).cuda()
        g = ref.global_scale_from_amax(w.abs().amax())
        gb = w.numel() * w.element_size() / 1e9
        times = {
            "device-to-device copy": _cuda_time(lambda: w.clone(), repeats),
            "Triton quantize+pack": _cuda_time(lambda: dispatch.quantize_and_pack(w, g, backend="triton"), repeats),
            "Triton fake-quant": _cuda_time(lambda: dispatch.fake_quantize(w, g, backend="triton"), repeats),
        }
        packed, scales, _ = dispatch.quantize_and_pack(w, g, backend="triton")
        cpu_packed, cpu_scales, _ = ref.quantize_and_pack(w.cpu(), g.cpu())
        exact = torch.equal(packed.cpu(), cpu_packed) and torch.equal(
            scales.cpu().view(torch.uint8), cpu_scales.view(torch.uint8))
        fake = dispatch.fake_quantize(w, g, backend="triton").cpu()
        fq_exact = torch.equal(fake, ref.fake_quantize(w.cpu(), g.cpu()))
        rows.append({"shape": f"{shape[0]}x{shape[1]}", "times": times,
                     "gbps": {k: gb / t for k, t in times.items()},
                     "bit_exact": exact and fq_exact})
    return rows, torch.cuda.get_device_name()


def render(rows: list[dict], mode: str, device: str, command: str) -> str:
    load = ", load average {:.1f} / {:.1f} / {:.1f} (1/5/15 min)".format(*os.getloadavg()) if mode == "cpu" else ""
    lines = [f"Command: `{command}`", "",
             f"Machine: {device}; torch {torch.__version__}; {os.cpu_count()} CPU cores visible; "
             f"{platform.processor() or platform.machine()}{load}", ""]
    if mode == "cpu":
        labels = list(rows[0]["times"])
        lines.append("Best of the timed rounds; wall seconds, with process CPU seconds (all threads) in brackets. "
                     "The last columns are the faster library's time divided by our first column's (above 1: ours is "
                     "faster).")
        lines.append("")
        lines.append("| matrix (bf16) | " + " | ".join(f"{label} (s)" for label in labels) +
                     " | fastest other / ours (wall) | fastest other / ours (CPU) |")
        lines.append("|" + "---|" * (len(labels) + 3))

        def ratio(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}x"

        for row in rows:
            cells = " | ".join(f"{row['times'][label]:.2f} ({row['cpu_times'][label]:.2f})" for label in labels)
            lines.append(f"| {row['shape']} | {cells} | {ratio(row['speedup_vs_fastest_other'])} | "
                         f"{ratio(row['cpu_speedup_vs_fastest_other'])} |")
    else:
        labels = list(rows[0]["times"])
        lines.append("| matrix (bf16) | " + " | ".join(f"{label} (GB/s of input)" for label in labels) +
                     " | quantize+pack / copy | bit-exact vs CPU |")
        lines.append("|" + "---|" * (len(labels) + 3))
        for row in rows:
            cells = " | ".join(f"{row['gbps'][label]:.0f}" for label in labels)
            ratio = row["gbps"]["Triton quantize+pack"] / row["gbps"]["device-to-device copy"]
            lines.append(f"| {row['shape']} | {cells} | {ratio:.0%} | {row['bit_exact']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("cpu", "gpu", "agreement", "rules", "fake"),
                        help="cpu / gpu: time quantize-and-pack; agreement: compare codes with the libraries; "
                             "rules: the C kernel under each scale rule; fake: fake quantization on the CPU")
    parser.add_argument("--seeds", type=int, default=4, help="agreement: random matrices per shape "
                        "(default: %(default)s)")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="ROWSxCOLS (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per contender, best (cpu) or median "
                        "(gpu) kept (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--markdown", help="also write the results table to this file")
    args = parser.parse_args(argv)
    shapes = [_shape(s) for s in args.shapes]
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(["benchmarks/bench_nvfp4.py", *sys.argv[1:]])
    if args.mode in ("agreement", "rules", "fake"):
        run_mode = {"agreement": lambda: agreement(shapes, args.seeds),
                    "rules": lambda: bench_rules(shapes, args.repeats),
                    "fake": lambda: bench_fake(shapes, args.repeats)}
        body = run_mode[args.mode]()
        text = f"Command: `{command}`\n\n" + body
        print(text)
        if args.markdown:
            atomic_write_text(args.markdown, text)
        return
    rows, device = (bench_cpu if args.mode == "cpu" else bench_gpu)(shapes, args.repeats)
    if args.mode == "cpu":
        device = f"CPU, {torch.get_num_threads()} torch threads"
    text = render(rows, args.mode, device, command)
    table = Table(title=f"NVFP4 quantize-and-pack ({args.mode})")
    for column in ("matrix", *rows[0]["times"]):
        table.add_column(column)
    for row in rows:
        table.add_row(row["shape"], *(f"{t * 1e3:.1f} ms" for t in row["times"].values()))
    Console().print(table)
    print(text)
    if args.markdown:
        atomic_write_text(args.markdown, text)


if __name__ == "__main__":
    main()
