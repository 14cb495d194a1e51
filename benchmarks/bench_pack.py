"""Benchmark `ckaqad pack` on a synthetic bf16 Llama checkpoint: wall time against a plain copy of the same files
and against compressed-tensors' own NVFP4 compression of the same model, and peak RSS of each (in subprocesses).

    python benchmarks/bench_pack.py --hidden 2048 --intermediate 8192 --layers 14 --vocab 32000   # ~2 GB

Writes benchmarks/results_pack_cpu.md (pass --results to change). The checkpoint is written one tensor at a time
(its generation never holds the model either).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ckaqad_cli.safetensors_io import SafetensorsSource, ShardedWriter, TensorSpec
from ckaqad_cli.units import format_bytes


def write_synthetic_checkpoint(
    directory: Path, *, hidden: int, intermediate: int, layers: int, vocab: int, shard: str = "1GB", seed: int = 0
) -> tuple[int, int]:
    """A Llama checkpoint with random bf16 weights (config, tokenizer, shards); returns (total bytes, largest tensor)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ckaqad_cli.builtin.tokenizer import build_tokenizer
    from ckaqad_cli.safetensors_io import parse_size

    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256, tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    specs = [TensorSpec(n, torch.bfloat16, tuple(p.shape)) for n, p in model.state_dict().items()]
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(directory, specs, parse_size(shard))
    gen = torch.Generator().manual_seed(seed)
    for spec in specs:
        scale = 1.0 if len(spec.shape) == 1 else 0.02
        writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * scale).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


_PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
"""Peak RSS of this process image (VmHWM). ru_maxrss is not used: Linux carries the parent's over fork+exec."""

_PACK = """
import json, sys, time
from ckaqad_cli.stages.pack import PackConfig, pack_model
t = time.perf_counter()
pack_model(PackConfig(model=sys.argv[1], out=sys.argv[2], scheme="w4a16", format=sys.argv[3], verify=False))
print(json.dumps({"seconds": time.perf_counter() - t, "rss": PEAK}))
"""

_COPY = """
import json, shutil, sys, time
t = time.perf_counter()
shutil.copytree(sys.argv[1], sys.argv[2])
import os; [os.fsync(os.open(os.path.join(sys.argv[2], f), os.O_RDONLY)) for f in os.listdir(sys.argv[2])]
print(json.dumps({"seconds": time.perf_counter() - t, "rss": PEAK}))
"""

_CT = """
import json, sys, time
import torch
t = time.perf_counter()
from transformers import AutoModelForCausalLM
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
from compressed_tensors.quantization.quant_scheme import NVFP4A16
from compressed_tensors.quantization.utils import generate_gparam, calculate_qparams
from compressed_tensors.compressors import ModelCompressor
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **NVFP4A16)},
                        ignore=["lm_head"], format="nvfp4-pack-quantized")
apply_quantization_config(model, qc)
for name, m in model.named_modules():
    if getattr(m, "quantization_scheme", None) is None:
        continue
    w = m.weight.detach()
    amax = w.abs().amax().float()
    gs = generate_gparam(-amax, amax)
    blocks = w.float().reshape(w.shape[0], -1, 16)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale, zp = calculate_qparams(lo, hi, m.quantization_scheme.weights, global_scale=gs)
    m.weight_global_scale.data.copy_(gs.reshape(m.weight_global_scale.shape))
    m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
compressor = ModelCompressor.from_pretrained_model(model, quantization_format="nvfp4-pack-quantized")
compressor.compress_model(model)
model.save_pretrained(sys.argv[2])
compressor.update_config(sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t, "rss": PEAK}))
"""


def _timed(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script.replace("PEAK", _PEAK), *args], capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", type=Path, default=None, help="Where to write (default: a temp dir, removed after).")
    ap.add_argument("--skip-ct", action="store_true", help="Skip compressed-tensors' own compression.")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("results_pack_cpu.md"))
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pack."))
    try:
        src = work / "src"
        t = time.perf_counter()
        total, largest = write_synthetic_checkpoint(
            src, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab
        )
        print(f"synthetic checkpoint {format_bytes(total)} (largest tensor {format_bytes(largest)}) in {time.perf_counter() - t:.1f}s")
        rows = {"plain copy": _timed(_COPY, str(src), str(work / "copy"))}
        shutil.rmtree(work / "copy", ignore_errors=True)
        for fmt in ("compressed-tensors", "modelopt"):
            rows[f"ckaqad pack --format {fmt} --scheme w4a16"] = _timed(_PACK, str(src), str(work / fmt), fmt)
            shutil.rmtree(work / fmt, ignore_errors=True)
        if not args.skip_ct:
            rows["compressed-tensors ModelCompressor (NVFP4A16)"] = _timed(_CT, str(src), str(work / "ct"))
        with SafetensorsSource(src) as s:
            n_tensors = len(s)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    copy_s = rows["plain copy"].get("seconds")
    lines = [
        "# `ckaqad pack` on the CPU",
        "",
        f"Synthetic bf16 Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
        f"{args.vocab}: {format_bytes(total)} in {n_tensors} tensors, largest {format_bytes(largest)}. "
        f"Machine: {os.cpu_count()} CPU cores (shared), torch {torch.__version__}.",
        "",
        "Command: `python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) + "`",
        "",
        "| what | wall time (s) | x copy | peak RSS |",
        "|---|---|---|---|",
    ]
    for label, r in rows.items():
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} | | |")
            continue
        ratio = f"{r['seconds'] / copy_s:.2f}" if copy_s else "-"
        lines.append(f"| {label} | {r['seconds']:.1f} | {ratio} | {format_bytes(r['rss'])} |")
    text = "\n".join(lines) + "\n"
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
