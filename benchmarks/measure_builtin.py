"""Task accuracy of the built-in teacher, in BF16 and under NVFP4 post-training fake quantization, per family.

    python benchmarks/measure_builtin.py --n 1000 --seed 0 --schemes bf16,w4a16,w4a4 --json /tmp/accuracy.json

Prints a table on stderr and the numbers as JSON on stdout (and in ``--json`` when given). This is the measurement
behind the accuracy quoted in docs/builtin.md; it is no part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from ckaqad_cli.atomic import atomic_write_json
from ckaqad_cli.builtin.tasks import FAMILIES, evaluate, generate
from ckaqad_cli.models import load_model, ptq_student
from ckaqad_cli.settings import BUILTIN
from ckaqad_cli.report import summary_table

SCHEMES = ("bf16", "w4a16", "w4a4")


def measure(model_spec: str, schemes: list[str], n: int, seed: int, batch_size: int = 64) -> dict:
    """``{scheme: evaluate(...)}`` on ``n`` held-out problems drawn with ``seed``."""
    teacher, tokenizer = load_model(model_spec, dtype=torch.bfloat16)
    problems = generate("test", n, seed)
    results = {}
    for scheme in schemes:
        model = teacher if scheme == "bf16" else ptq_student(teacher, scheme)[0]
        started = time.monotonic()
        results[scheme] = {**evaluate(model, tokenizer, problems, batch_size), "seconds": time.monotonic() - started}
    return {"model": model_spec, "split": "test", "seed": seed, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN, help="model spec, as for --teacher (default builtin)")
    parser.add_argument("--n", type=int, default=1000, help="held-out problems (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default 0)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated (default {','.join(SCHEMES)})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here (default: stdout only)")
    args = parser.parse_args(argv)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if unknown := set(schemes) - set(SCHEMES):
        parser.error(f"unknown schemes {sorted(unknown)}; choose from {SCHEMES}")
    torch.set_num_threads(args.threads)
    report = measure(args.model, schemes, args.n, args.seed)
    rows = {
        scheme: {"overall": r["overall"], **{family: r["per_family"].get(family) for family in FAMILIES}}
        for scheme, r in report["results"].items()
    }
    title = f"exact match on {args.n} held-out problems (seed {args.seed})"
    Console(stderr=True).print(summary_table(rows, ["overall", *FAMILIES], title=title))
    if args.json:
        atomic_write_json(args.json, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
