"""Is ``ckaqad plan``'s choice the best a budget allows? Every choice measured (issue 20's 5.0-bit clause).

``ckaqad plan --upgrade fp8`` ranks units by one score each (measured with the unit alone in NVFP4) and fills the
budget greedily. This script drops both shortcuts on the built-in teacher: it lists every *maximal* set of units
that fits the budget in the plan's upgrade format (no further unit fits beside it; any other set is one of these
with units left in NVFP4, which we take to be no better), and measures each one's student exactly as ``ckaqad plan`` measures its own (the
product's ``planning.switch.planned`` and ``planning.evaluate``): output KL against the teacher on each seed's
calibration text (``plan``'s default 8192 tokens), and task accuracy on each seed's held-out problems. If no set
recovers half of uniform NVFP4's task-accuracy loss, no chooser can at this budget with these formats.

    OMP_NUM_THREADS=2 python benchmarks/bench_plan_oracle.py --budget-bits 5 --json benchmarks/results_plan_oracle.json

Selecting the best of many sets by their accuracy on the evaluation problems overstates that set's accuracy (the
maximum of noisy estimates): the table's best row is an upper bound of what a choice can do here, not a result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
from rich.console import Console

from ckaqad_cli import models
from ckaqad_cli.builtin import suite
from ckaqad_cli.data import load_texts, pack_sequences
from ckaqad_cli.planning import sensitivity
from ckaqad_cli.planning.budget import budget_bytes, choose
from ckaqad_cli.planning.evaluate import compare, task_accuracy
from ckaqad_cli.planning.switch import prepare
from ckaqad_cli.settings.plan import PlanConfig


def maximal_sets(table, limit: int, upgrade: str) -> list[tuple[str, ...]]:
    """Every set of upgradable units whose extra bytes fit ``limit`` and to which no further unit can be added."""
    units = table.upgradable(upgrade)
    extra = {u.name: u.extra_bytes(upgrade) for u in units}
    cheapest = min(extra.values())
    found = []
    for k in range(1, int(limit // cheapest) + 1):
        for combo in itertools.combinations(units, k):
            spent = sum(extra[u.name] for u in combo)
            names = {u.name for u in combo}
            if spent <= limit and not any(spent + extra[u.name] <= limit for u in units if u.name not in names):
                found.append(tuple(u.name for u in combo))
    return found


def short(names) -> str:
    return ", ".join(n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                     .replace("q_proj+k_proj+v_proj", "qkv").replace("gate_proj+up_proj", "gate_up") for n in names) \
        or "(none: uniform NVFP4)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-bits", type=float, default=5.0)
    ap.add_argument("--upgrade", default="fp8", choices=("bf16", "fp8"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--task-problems", type=int, default=256)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    console = Console(stderr=True)
    cpu = torch.device("cpu")
    model, tokenizer = models.load_model("builtin", device=cpu, dtype=torch.float32)
    table, _ = prepare(model, "w4a4", ())
    limit = budget_bytes(table, args.budget_bits) - table.bytes_of(())
    sets = maximal_sets(table, limit, args.upgrade)
    plans = {"uniform": ()} | {"|".join(s): s for s in sets}
    console.print(f"{len(sets)} maximal sets fit {args.budget_bits:g} bits ({limit:,} bytes over uniform NVFP4)")
    tasks = suite("builtin")
    out = {"budget_bits": args.budget_bits, "upgrade": args.upgrade, "extra_bytes_allowed": limit,
           "seeds": args.seeds, "task_problems": args.task_problems, "plan_choice": {}, "sets": {}}
    for seed in args.seeds:
        cfg = PlanConfig(budget_bits=args.budget_bits, upgrade=args.upgrade, seed=seed)
        texts = load_texts(cfg.data, split=cfg.split, seed=seed, text_field=cfg.text_field)
        calib = pack_sequences(texts, tokenizer, cfg.seq_len, max_tokens=cfg.max_tokens, seed=seed)
        measured = sensitivity.measure(model, table, calib, batch_size=cfg.batch_size,
                                       bos_token_id=tokenizer.bos_token_id, console=console)
        out["plan_choice"][seed] = list(choose(table, measured.scores(cfg.score), args.budget_bits, args.upgrade).kept)
        kl = compare(model, table, plans, calib, batch_size=cfg.batch_size, bos_token_id=tokenizer.bos_token_id,
                     console=console, upgrade=args.upgrade)
        acc = task_accuracy(model, tokenizer, table, plans, tasks.generate("test", args.task_problems, seed),
                            tasks.evaluate, args.upgrade)
        out.setdefault("teacher", {})[seed] = acc["teacher"]
        for label, names in plans.items():
            row = out["sets"].setdefault(label, {"units": list(names), "bits": table.bits(table.bytes_of(
                names, args.upgrade)), "kl": {}, "task_acc": {}})
            row["kl"][seed], row["task_acc"][seed] = kl[label]["kl"], acc[label]
        args.json.write_text(json.dumps(out, indent=1))
        console.print(f"seed {seed}: teacher {acc['teacher']:.4f}, uniform {acc['uniform']:.4f}")
    teacher = statistics.mean(out["teacher"].values())
    uniform = statistics.mean(out["sets"]["uniform"]["task_acc"].values())
    for row in out["sets"].values():
        row["mean_kl"] = statistics.mean(row["kl"].values())
        row["mean_task_acc"] = statistics.mean(row["task_acc"].values())
        row["share_of_loss_recovered"] = (row["mean_task_acc"] - uniform) / (teacher - uniform)
    args.json.write_text(json.dumps(out, indent=1))
    chosen = {"|".join(c) for c in out["plan_choice"].values()}
    print(f"teacher {teacher:.4f}, uniform NVFP4 {uniform:.4f} (loss {100 * (teacher - uniform):.1f} points); "
          f"{len(sets)} maximal sets; * = ckaqad plan's choice")
    print("| units in " + args.upgrade.upper() + " | bits | KL (mean) | task acc (seeds) | mean | share of loss |")
    print("|---|---|---|---|---|---|")
    for label, row in sorted(out["sets"].items(), key=lambda kv: kv[1]["mean_kl"]):
        accs = " / ".join(f"{a:.3f}" for a in row["task_acc"].values())
        star = " *" if label in chosen else ""
        print(f"| {short(row['units'])}{star} | {row['bits']:.4f} | {row['mean_kl']:.4f} | {accs} | "
              f"{row['mean_task_acc']:.4f} | {100 * row['share_of_loss_recovered']:.0f}% |")


if __name__ == "__main__":
    main()
