"""Would an FP8 W8A8 middle format let ``ckaqad plan`` meet issue 20's 5.0-bit goal? A feasibility study (by hand).

The goal: at 5.0 bits, before any distillation, a plan recovers at least half of uniform NVFP4 W4A4's task-accuracy
loss on the built-in teacher. With NVFP4-or-BF16 units it recovers under a tenth (docs/results.md, "Bit budget"): a
BF16 unit costs 11.5 bits a weight more than NVFP4, so 5.0 bits keep about 4% of the weights, and the W4A4 loss is
mostly the activations'. vLLM loads FP8 W8A8 config groups beside NVFP4 ones (docs/plan.md, "A middle format"), so
this script asks what FP8 units instead of BF16 ones would buy. It was written before ckaqad had FP8 (now
``ckaqad plan --upgrade fp8``, whose weight scales are bf16-exact: docs/fp8.md) and keeps its own float32-scale FP8
below as the record of that study:

- FP8 units: weights E4M3 with one float32 scale per output channel (amax / 448), inputs E4M3 with a dynamic scale
  per token (amax / 448): compressed-tensors' FP8_DYNAMIC scheme. They count 8 bits a weight plus 32 bits per output
  channel; NVFP4 4.5, BF16 16, the output head BF16 in every plan (as ``ckaqad plan`` counts).
- Each budget's FP8 plan ranks units by ckaqad's default score (cka) per extra byte and fills the budget greedily,
  as ``planning.budget.choose`` does for BF16 units; the BF16 plan is ``choose`` itself.
- Every plan's student is measured against the teacher as ``bench_plan.py compare`` measures (KL, mean and min
  layer CKA, top-1 on held-out text; task accuracy on ``--task-problems`` problems of each of ``--eval-seeds``), with
  all-FP8 (every unit FP8: the middle format's ceiling) beside them.

    python benchmarks/bench_plan_fp8.py --json benchmarks/results_plan_fp8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_plan import BUDGETS, QUIET, against_teacher, sequences
from ckaqad_cli.builtin import tasks
from ckaqad_cli.models import load_model
from ckaqad_cli.planning import sensitivity
from ckaqad_cli.planning.budget import budget_bytes, choose
from ckaqad_cli.planning.switch import nvfp4_units, prepare, quantized
from ckaqad_cli.planning.units import Unit, UnitTable
from ckaqad_cli.quant import freeze_quantized_weights

FP8_MAX = 448.0
"""Largest E4M3 magnitude: an FP8 scale is amax / FP8_MAX."""


def fp8(x: torch.Tensor, dim: int) -> torch.Tensor:
    """E4M3 quantize-dequantize with one scale per slice along ``dim`` (amax / 448; all-zero slices stay zero)."""
    scale = (x.abs().amax(dim=dim, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.linear(fp8(x, -1), self.fp8_weight, self.bias)


def fp8_bytes(model: torch.nn.Module, unit: Unit) -> int:
    """The unit's weights in FP8: a byte a weight and a float32 scale per output channel."""
    rows = sum(model.get_submodule(m).out_features for m in unit.modules)
    return unit.weights + 4 * rows


def fp8_choice(model, table: UnitTable, scores: dict[str, float], bits: float) -> tuple[tuple[str, ...], float]:
    """The units in FP8 under ``bits`` (greedy by score per extra byte over NVFP4, ties in module order); its bits."""
    order = {u.name: i for i, u in enumerate(table.units)}
    extra = {u.name: fp8_bytes(model, u) - u.nvfp4_bytes for u in table.units}
    ranked = sorted(table.units, key=lambda u: (-scores[u.name] / extra[u.name], order[u.name]))
    limit, spent, chosen = budget_bytes(table, bits), table.bytes_of(()), set()
    for unit in ranked:
        if spent + extra[unit.name] <= limit:
            chosen.add(unit.name)
            spent += extra[unit.name]
    return tuple(u.name for u in table.units if u.name in chosen), table.bits(spent)


def student(model, table: UnitTable, bf16: tuple[str, ...], fp8_units: tuple[str, ...]):
    """A copy with the units in ``bf16`` unquantized, those in ``fp8_units`` FP8 W8A8, the others NVFP4 W4A4
    (weights quantized once)."""
    with quantized(model, nvfp4_units(table, (*bf16, *fp8_units)), table.scheme):
        out = copy.deepcopy(model)
    freeze_quantized_weights(out)
    for unit in table.units:
        if unit.name in fp8_units:
            for name in unit.modules:
                module = out.get_submodule(name)
                module.fp8_weight = fp8(module.weight.detach(), 1)
                module.forward = types.MethodType(_fp8_forward, module)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--task-problems", type=int, default=256)
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model("builtin", dtype=torch.float32)
    calibration = sequences("train", args.calib_tokens, tokenizer)
    held_out = sequences("test", args.eval_tokens, tokenizer)
    table, _ = prepare(model, "w4a4", ())
    scores = sensitivity.measure(model, table, calibration, batch_size=8, bos_token_id=tokenizer.bos_token_id,
                                 console=QUIET).scores("cka")
    every = tuple(u.name for u in table.units)
    plans = {"uniform NVFP4": ((), (), table.bits(table.bytes_of(())))}
    for bits in BUDGETS:
        kept = choose(table, scores, bits)
        plans[f"{bits} BF16 units"] = (kept.kept, (), kept.effective_bits)
        fp8_units, fp8_bits = fp8_choice(model, table, scores, bits)
        plans[f"{bits} FP8 units"] = ((), fp8_units, fp8_bits)
    plans["all FP8"] = ((), every, table.bits(table.bytes_of(()) + sum(fp8_bytes(model, u) - u.nvfp4_bytes
                                                                         for u in table.units)))
    problems = {seed: tasks.generate("test", args.task_problems, seed) for seed in args.eval_seeds}
    teacher_acc = [tasks.evaluate(model, tokenizer, problems[s])["overall"] for s in args.eval_seeds]
    rows = [{"plan": "teacher", "bits": 16.0, "task_acc": statistics.mean(teacher_acc), "task_acc_seeds": teacher_acc}]
    for label, (bf16, fp8_units, bits) in plans.items():
        s = student(model, table, bf16, fp8_units)
        acc = [tasks.evaluate(s, tokenizer, problems[seed])["overall"] for seed in args.eval_seeds]
        measured = against_teacher(model, s, held_out, tokenizer.bos_token_id)
        rows.append({"plan": label, "bits": bits, "bf16_units": list(bf16), "fp8_units": list(fp8_units),
                     **{k: measured[k] for k in ("kl", "mean_cka", "min_cka", "top1")},
                     "task_acc": statistics.mean(acc), "task_acc_seeds": acc})
        print(f"{label:18s} {bits:6.3f} bits  KL {measured['kl']:.4f}  mean CKA {measured['mean_cka']:.4f}  "
              f"task {statistics.mean(acc):.4f}  {acc}", flush=True)
    args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
