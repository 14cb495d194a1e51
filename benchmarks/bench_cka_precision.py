"""Precision of candidate GPU arithmetic for the streaming CKA statistics, emulated on the CPU (by hand, not a test).

On a GPU the float32 GEMMs of ``StreamingCKA`` run far below the bf16 tensor-core rate, so a GPU path would take
bf16 operands with float32 accumulation and output (``torch.mm(a, b, out_dtype=torch.float32)``, CUDA only). This
script measures, against float64 CKA over all tokens, what each candidate operand form costs in accuracy. A GEMM of
bf16 operands with float32 accumulation is emulated exactly enough by a float32 GEMM of the same bf16 values: each
product of two bf16 numbers is exact in float32, and only the order of the float32 additions differs.

Candidates, per batch of bf16 features (totals kept in float64 across batches, as ``StreamingCKA`` does):

- ``float32 shifted`` (what ``StreamingCKA`` does today): rows shifted by the first batch's mean, float32 operands.
- ``bf16 shifted``: the shifted rows rounded to bf16, one product per matrix.
- ``bf16 raw``: the features as they are (exact bf16), no shift; centered in float64 at the end.
- ``bf16 split``: shifted rows split into hi = bf16(z) and lo = bf16(z - hi); hi^T hi + hi^T lo + lo^T hi
  (three products).
- ``bf16 split4``: the same plus lo^T lo (four products).

    python benchmarks/bench_cka_precision.py --tokens 16384
"""

from __future__ import annotations

import argparse

import torch

CANDIDATES = ("float32 shifted", "bf16 shifted", "bf16 raw", "bf16 split", "bf16 split4")


def _bf16(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.bfloat16).to(torch.float32)


def _product(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b of one batch under candidate ``kind`` (a, b already shifted or not), as float64."""
    if kind == "float32 shifted":
        return (a.T @ b).double()
    if kind in ("bf16 shifted", "bf16 raw"):
        return (_bf16(a).T @ _bf16(b)).double()
    ha, hb = _bf16(a), _bf16(b)
    la, lb = _bf16(a - ha), _bf16(b - hb)
    three = ha.T @ hb + ha.T @ lb + la.T @ hb
    return (three if kind == "bf16 split" else three + la.T @ lb).double()


def streamed_cka(kind: str, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """Linear CKA of the concatenated batches, streamed batch by batch with candidate ``kind``."""
    shift_x = torch.zeros(xs[0].shape[1]) if kind == "bf16 raw" else xs[0].mean(0)
    shift_y = torch.zeros(ys[0].shape[1]) if kind == "bf16 raw" else ys[0].mean(0)
    n, gxx, gyy, gxy, sx, sy = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for x, y in zip(xs, ys, strict=True):
        x, y = x - shift_x, y - shift_y
        gxx = gxx + _product(kind, x, x)
        gyy = gyy + _product(kind, y, y)
        gxy = gxy + _product(kind, x, y)
        sx, sy, n = sx + x.double().sum(0), sy + y.double().sum(0), n + x.shape[0]
    mx, my = sx / n, sy / n
    cxx, cyy = gxx - n * torch.outer(mx, mx), gyy - n * torch.outer(my, my)
    cxy = gxy - n * torch.outer(mx, my)
    return float(cxy.square().sum() / (cxx.norm() * cyy.norm()))


def reference_cka(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


def builtin_layers(tokens: int, seq_len: int) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
    """Per layer (name, student batches, teacher batches): the built-in teacher in bf16 against its W4A4 PTQ copy on
    the built-in test split, position 0 dropped."""
    from ckaqad_cli import models
    from ckaqad_cli.data import load_texts, pack_sequences
    from ckaqad_cli.models import capture_residuals

    teacher, tok = models.load_model("builtin", dtype=torch.bfloat16)
    student, _ = models.ptq_student(teacher, "w4a4")
    ids = pack_sequences(load_texts("builtin", split="test"), tok, seq_len, max_tokens=tokens)
    per_layer: dict[int, tuple[list, list]] = {}
    with torch.no_grad(), capture_residuals(teacher) as ht, capture_residuals(student) as hs:
        for batch in ids.split(8):
            ht.clear(), hs.clear()
            teacher(input_ids=batch), student(input_ids=batch)
            for i, (s, t) in enumerate(zip(hs[:-1], ht[:-1], strict=True)):
                xs, ys = per_layer.setdefault(i, ([], []))
                xs.append(s[:, 1:].reshape(-1, s.shape[-1]).float())
                ys.append(t[:, 1:].reshape(-1, t.shape[-1]).float())
    return [(f"builtin layer {i}", xs, ys) for i, (xs, ys) in sorted(per_layer.items())]


def _batches(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
    """bf16-rounded features cut into batches of 1016 tokens (8 sequences of 128 without position 0)."""
    return name, list(_bf16(x).split(1016)), list(_bf16(y).split(1016))


def massive(tokens: int, width: int, seed: int) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
    """Synthetic residual-stream-like features: unit noise, a few channels with means of 50-200 and 1% of the
    tokens (sinks) with three channels near 1000; the student is the teacher plus 30% drift."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(tokens, width, generator=g)
    y[:, :4] += torch.tensor([50.0, -80.0, 120.0, 200.0])
    sinks = torch.rand(tokens, generator=g) < 0.01
    y[sinks, 4:7] += 1000.0
    return _batches(f"massive activations (width {width})", y + 0.3 * torch.randn(tokens, width, generator=g), y)


def offsets(tokens: int, width: int, scale: float, seed: int) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
    """Unit noise on top of a per-channel mean drawn with standard deviation ``scale`` (every channel offset);
    the student is the teacher plus 30% drift."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(tokens, width, generator=g) + scale * torch.randn(width, generator=g)
    return _batches(f"channel means ~{scale:g}x the spread", y + 0.3 * torch.randn(tokens, width, generator=g), y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args()
    torch.manual_seed(0)
    cases = [*builtin_layers(args.tokens, args.seq_len), massive(args.tokens, args.width, 0),
             *(offsets(args.tokens, args.width, scale, 1) for scale in (5.0, 20.0, 100.0))]
    print("| features | float64 CKA | " + " | ".join(f"{k}: error" for k in CANDIDATES) + " |")
    print("|---|---|" + "---|" * len(CANDIDATES))
    for name, xs, ys in cases:
        ref = reference_cka(xs, ys)
        errors = [streamed_cka(k, xs, ys) - ref for k in CANDIDATES]
        print(f"| {name} | {ref:.6f} | " + " | ".join(f"{e:+.1e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    main()
