"""The accuracy study of the built-in reasoner (issue 22): does CKA-QAD beat KL-only QAD on task accuracy, and does RL
post-training make KL-only QAD drift more than on the SFT checkpoint?

For one teacher (``--teacher``: ``builtin-reasoner``, the RL-post-trained teacher, or the SFT checkpoint's directory)
and each seed: three W4A4 students, NVFP4 PTQ (amax), KL-only QAD (``ckaqad distill --lambda-cka 0``) and CKA-QAD
(``ckaqad distill``, the balanced lambda), the two QAD runs on the same data, steps and seed (whole ``ckaqad distill``
commands, the built-in reasoner's preset). Each student and the teacher are then measured on the seed's draw of the
held-out split: task accuracy over ``--problems`` problems (greedy KV-cached decoding of the whole trace, exact match
of the final answer), and per family the KL(teacher || student) per token, top-1 agreement and the linear CKA of every
decoder layer's residual stream, teacher-forced on ``--texts`` held-out texts of that family.

``sweep``: CKA-QAD at fixed lambdas, ``--factors`` times the balanced run's mean lambda, on one seed.
``report``: the tables (accuracy: mean over seeds and a 95% t interval; CKA-QAD minus KL-only paired by seed, and
McNemar's exact test over all problems; per family; the drift-accuracy correlation per layer across students and
families; KL-only drift after RL against SFT) as Markdown and JSON.

Everything is resumable: each student is a run directory under ``--workdir``, each measurement a JSON file next to
it; a second invocation skips what is there.

    python benchmarks/bench_reasoner_study.py run --label rl --seeds 0 1 2 3 4 --problems 2000
    python benchmarks/bench_reasoner_study.py run --label sft --teacher SFT_DIR --seeds 0 1 2 --problems 2000
    python benchmarks/bench_reasoner_study.py sweep --label rl --seed 0 --factors 0 0.25 0.5 1 2
    python benchmarks/bench_reasoner_study.py report --markdown study.md --json study.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan import against_teacher  # noqa: E402  (the benchmarks' one teacher-forced KL / CKA / top-1)

from ckaqad_cli.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from ckaqad_cli.builtin import reasoner_tasks  # noqa: E402
from ckaqad_cli.builtin.generation import decode  # noqa: E402
from ckaqad_cli.data import pack_sequences  # noqa: E402
from ckaqad_cli.models import load_model, ptq_student  # noqa: E402
from ckaqad_cli.quant import freeze_quantized_weights  # noqa: E402
from ckaqad_cli.settings import BUILTIN_REASONER  # noqa: E402
from ckaqad_cli.settings.distill import PRESETS  # noqa: E402

SCHEME = "w4a4"
STUDENTS = ("ptq", "kl-only", "cka-qad")
TEXT_SEED = 50_000  # the texts of the KL / CKA measurement are a draw of their own, disjoint from the problems' seed
SEQ_LEN = 256  # the reasoner preset's sequence length
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95% quantiles of Student's t by degrees of freedom (n seeds - 1)."""


def distill(run: Path, teacher: str, seed: int, lambda_cka: float | None, steps: int | None) -> Path:
    """``ckaqad distill`` into ``run`` with the built-in reasoner's preset and data (skipped when its student exists);
    the student's directory."""
    student = run / "distill" / "student"
    if (student / "config.json").exists():
        return student
    argv = [str(Path(sys.executable).with_name("ckaqad")), "distill", "--run", str(run), "--teacher", teacher,
            "--data", BUILTIN_REASONER, "--seed", str(seed), "--scheme", SCHEME, "--device", "cpu", "--force"]
    # the reasoner's preset spelled out: a teacher given as a directory (the SFT model) would get the real-model one
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in PRESETS[BUILTIN_REASONER].items()
             if not (key == "steps" and steps is not None)]
    argv += [] if lambda_cka is None else ["--lambda-cka", str(lambda_cka)]
    argv += [] if steps is None else ["--steps", str(steps)]
    print(" ".join(argv[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    print(f"  {time.perf_counter() - started:.0f} s", flush=True)
    return student


def distill_metrics(student: Path) -> dict:
    """The distill stage's metrics of run.json (final KL, mean lambda, ...)."""
    return json.loads((student.parents[1] / "run.json").read_text())["stages"]["distill"]["metrics"]


def build(label: str, teacher_model, spec: str | Path) -> torch.nn.Module:
    """The student ``label``: the PTQ copy of the teacher, or a distilled student's directory; weights frozen to
    their quantized values (decoding then quantizes only the activations)."""
    if label == "ptq":
        model, _ = ptq_student(teacher_model, SCHEME)
    else:
        model, _ = load_model(spec, dtype=torch.float32)
    freeze_quantized_weights(model)
    return model.eval().requires_grad_(False)


def measure(model, teacher, tokenizer, seed: int, problems: int, texts: int) -> dict:
    """Per-problem correctness on the seed's held-out draw, and per family KL / top-1 / layer CKA against the teacher
    (for the teacher itself only the correctness)."""
    drawn = reasoner_tasks.generate("test", problems, seed)
    replies = decode(model, tokenizer, [p.prompt for p in drawn], max_new_tokens=reasoner_tasks.MAX_TRACE_CHARS,
                     progress=True)
    out = {"families": [p.family for p in drawn],
           "correct": [int(reasoner_tasks.is_correct(r, p)) for r, p in zip(replies, drawn)], "per_family": {}}
    if model is teacher:
        return out
    for family in reasoner_tasks.FAMILIES:
        text = [p.text for p in reasoner_tasks.generate("test", texts, TEXT_SEED + seed, [family])]
        sequences = pack_sequences(text, tokenizer, SEQ_LEN, seed=seed)
        measured = against_teacher(teacher, model, sequences, tokenizer.bos_token_id)
        out["per_family"][family] = {k: measured[k] for k in ("kl", "top1", "linear_cka")}
    return out


def measured(path: Path, make) -> dict:
    """The measurement cached at ``path``, made (and written atomically) when absent."""
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = make()
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(path, result)
    return result


def run_seeds(args: argparse.Namespace) -> None:
    work = args.workdir / args.label
    work.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_model(args.teacher, dtype=torch.float32)
    atomic_write_json(work / "study.json", {"teacher": str(args.teacher), "problems": args.problems,
                                            "texts": args.texts, "steps": args.steps, "scheme": SCHEME})
    for seed in args.seeds:
        runs = {"kl-only": distill(work / f"kl-only-{seed}", args.teacher, seed, 0.0, args.steps),
                "cka-qad": distill(work / f"cka-qad-{seed}", args.teacher, seed, None, args.steps)}
        measured(work / f"teacher-{seed}.json",
                 lambda: measure(teacher, teacher, tokenizer, seed, args.problems, args.texts))
        for label in STUDENTS:
            def make(label=label):
                model = build(label, teacher, runs.get(label, ""))
                return measure(model, teacher, tokenizer, seed, args.problems, args.texts)
            result = measured(work / f"{label}-{seed}.json", make)
            print(f"{args.label} seed {seed} {label}: accuracy {statistics.mean(result['correct']):.4f}", flush=True)


def run_sweep(args: argparse.Namespace) -> None:
    work = args.workdir / args.label
    teacher, tokenizer = load_model(args.teacher, dtype=torch.float32)
    seed = args.seed
    balanced = distill_metrics(distill(work / f"cka-qad-{seed}", args.teacher, seed, None, args.steps))
    for factor in args.factors:
        value = factor * balanced["mean_lambda_cka"]
        run = work / (f"kl-only-{seed}" if factor == 0 else f"sweep-{factor:g}-{seed}")  # factor 0 is KL-only
        student = distill(run, args.teacher, seed, value, args.steps)
        result = measured(work / f"sweep-{factor:g}-{seed}.json",
                          lambda: measure(build("sweep", teacher, student), teacher, tokenizer, seed, args.problems,
                                          args.texts) | {"lambda_cka": value, "factor": factor})
        print(f"sweep x{factor:g} (lambda {value:.3g}): accuracy {statistics.mean(result['correct']):.4f}", flush=True)


# -- statistics ----------------------------------------------------------------------------------------------------


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% t interval (0 for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def mcnemar(a: list[int], b: list[int]) -> tuple[int, int, float]:
    """(problems only ``a`` answers, only ``b`` answers, the exact two-sided McNemar p-value)."""
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return only_a, only_b, min(1.0, 2 * tail)


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = statistics.mean(x), statistics.mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def accuracy(result: dict, family: str | None = None) -> float:
    hits = [c for c, f in zip(result["correct"], result["families"]) if family in (None, f)]
    return sum(hits) / len(hits)


def layer_cka(result: dict) -> list[float]:
    """Per decoder layer, the CKA averaged over the families (layer 0, the embeddings, left out)."""
    per = [r["linear_cka"][1:] for r in result["per_family"].values()]
    return [statistics.mean(col) for col in zip(*per)]


def summarize(work: Path) -> dict:
    """Every table's numbers from the cached measurements of every teacher label under ``work``."""
    out: dict = {}
    for study in sorted(p for p in work.iterdir() if (p / "study.json").exists()):
        seeds = sorted(int(p.stem.split("-")[-1]) for p in study.glob("cka-qad-*.json"))
        seeds = [s for s in seeds if all((study / f"{k}-{s}.json").exists() for k in ("teacher", *STUDENTS))]
        if not seeds:
            continue
        load = {(k, s): json.loads((study / f"{k}-{s}.json").read_text()) for k in ("teacher", *STUDENTS)
                for s in seeds}
        families = list(dict.fromkeys(load["teacher", seeds[0]]["families"]))
        rows = {}
        for k in ("teacher", *STUDENTS):
            row = {"accuracy": mean_ci([accuracy(load[k, s]) for s in seeds]),
                   "per_family": {f: mean_ci([accuracy(load[k, s], f) for s in seeds]) for f in families}}
            if k != "teacher":
                per_seed = [layer_cka(load[k, s]) for s in seeds]
                row.update(mean_cka=mean_ci([statistics.mean(c) for c in per_seed]),
                           min_cka=mean_ci([min(c) for c in per_seed]),
                           kl=mean_ci([statistics.mean(r["kl"] for r in load[k, s]["per_family"].values())
                                       for s in seeds]))
            rows[k] = row
        diff = {"overall": mean_ci([accuracy(load["cka-qad", s]) - accuracy(load["kl-only", s]) for s in seeds])}
        diff.update({f: mean_ci([accuracy(load["cka-qad", s], f) - accuracy(load["kl-only", s], f) for s in seeds])
                     for f in families})
        a = [c for s in seeds for c in load["cka-qad", s]["correct"]]
        b = [c for s in seeds for c in load["kl-only", s]["correct"]]
        only_cka, only_kl, p = mcnemar(a, b)
        # drift against accuracy lost: one point per (student, seed, family)
        points = []
        for k in STUDENTS:
            for s in seeds:
                for f in families:
                    lost = accuracy(load["teacher", s], f) - accuracy(load[k, s], f)
                    drift = [1 - c for c in load[k, s]["per_family"][f]["linear_cka"][1:]]
                    points.append((lost, drift, load[k, s]["per_family"][f]["kl"], f))
        layers = len(points[0][1])
        # within families: each family's mean taken out of both sides, so that what differs between families (how
        # hard, how long its traces) does not make the correlation
        centred = []
        for f in families:
            mine = [p for p in points if p[3] == f]
            lost_mean = statistics.mean(p[0] for p in mine)
            drift_mean = [statistics.mean(p[1][i] for p in mine) for i in range(layers)]
            centred += [(p[0] - lost_mean, [p[1][i] - drift_mean[i] for i in range(layers)]) for p in mine]
        lost_all = [p[0] for p in points]
        correlation = {"per_layer": [pearson([p[1][i] for p in points], lost_all) for i in range(layers)],
                       "mean_drift": pearson([statistics.mean(p[1]) for p in points], lost_all),
                       "kl": pearson([p[2] for p in points], lost_all), "points": len(points),
                       "within_family_per_layer": [pearson([d[i] for _, d in centred], [x for x, _ in centred])
                                                   for i in range(layers)],
                       "within_family_mean_drift": pearson([statistics.mean(d) for _, d in centred],
                                                           [x for x, _ in centred])}
        sweep = {}
        for path in sorted(study.glob("sweep-*.json")):
            r = json.loads(path.read_text())
            c = layer_cka(r)
            sweep[r["factor"]] = {"lambda_cka": r["lambda_cka"], "accuracy": accuracy(r),
                                  "mean_cka": statistics.mean(c),
                                  "min_cka": min(c), "kl": statistics.mean(x["kl"] for x in r["per_family"].values()),
                                  "problems": len(r["correct"])}
        out[study.name] = {"config": json.loads((study / "study.json").read_text()), "seeds": seeds,
                           "families": families, "rows": rows, "cka_minus_kl": diff,
                           "mcnemar": {"only_cka_qad": only_cka, "only_kl_only": only_kl, "p": p,
                                       "problems": len(a)},
                           "correlation": correlation, "sweep": sweep}
    return out


def pm(value: tuple[float, float], scale: float = 100, digits: int = 1) -> str:
    return f"{scale * value[0]:.{digits}f} +- {scale * value[1]:.{digits}f}"


def markdown(summary: dict) -> str:
    lines = []
    for label, s in summary.items():
        c = s["config"]
        lines += [f"### Teacher `{label}` ({c['teacher']}), seeds {', '.join(map(str, s['seeds']))}, "
                  f"{c['problems']} problems and {c['texts']} texts a family per seed", "",
                  "| model | task accuracy % (95% CI) | mean layer CKA | min layer CKA | KL / token |",
                  "|---|---|---|---|---|"]
        for k, row in s["rows"].items():
            extra = ([pm(row["mean_cka"], 1, 4), pm(row["min_cka"], 1, 4), pm(row["kl"], 1, 4)]
                     if "kl" in row else ["1", "1", "0"])
            lines.append(f"| {k} | {pm(row['accuracy'])} | " + " | ".join(extra) + " |")
        lines += ["", "| family | " + " | ".join(s["rows"]) + " | CKA-QAD - KL-only (points, 95% CI) |",
                  "|---|" + "---|" * (len(s["rows"]) + 1)]
        for f in s["families"]:
            lines.append(f"| {f} | " + " | ".join(pm(r["per_family"][f]) for r in s["rows"].values())
                         + f" | {pm(s['cka_minus_kl'][f])} |")
        m = s["mcnemar"]
        lines += ["| all | " + " | ".join(pm(r["accuracy"]) for r in s["rows"].values())
                  + f" | {pm(s['cka_minus_kl']['overall'])} |", "",
                  f"McNemar over all {m['problems']} problems: only CKA-QAD right {m['only_cka_qad']}, only KL-only "
                  f"right {m['only_kl_only']}, exact two-sided p = {m['p']:.3g}.", ""]
        r = s["correlation"]
        lines += [f"Drift against accuracy lost ({r['points']} points: student x seed x family): Pearson r of "
                  "1 - CKA per layer " + ", ".join(f"L{i + 1} {v:+.2f}" for i, v in enumerate(r["per_layer"]))
                  + f"; mean over layers {r['mean_drift']:+.2f}; KL {r['kl']:+.2f}. Within families (each family's "
                  "mean taken out): "
                  + ", ".join(f"L{i + 1} {v:+.2f}" for i, v in enumerate(r["within_family_per_layer"]))
                  + f"; mean over layers {r['within_family_mean_drift']:+.2f}.", ""]
        if s["sweep"]:
            lines += ["| lambda factor | lambda | task accuracy % | mean CKA | min CKA | KL |",
                      "|---|---|---|---|---|---|"]
            for factor, w in sorted(s["sweep"].items()):
                lines.append(f"| {factor:g} | {w['lambda_cka']:.3g} | {100 * w['accuracy']:.1f} | "
                             f"{w['mean_cka']:.4f} | {w['min_cka']:.4f} | {w['kl']:.4f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "sweep", "report"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/reasoner-study"), help="run dirs and measurements")
    parser.add_argument("--label", default="rl", help="the teacher's name in the tables and its folder (default rl)")
    parser.add_argument("--teacher", default=BUILTIN_REASONER, help="builtin-reasoner or a teacher directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="run: distill / draw seeds")
    parser.add_argument("--seed", type=int, default=0, help="sweep: the seed")
    parser.add_argument("--factors", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 2],
                        help="sweep: lambda as these multiples of the balanced run's mean lambda")
    parser.add_argument("--problems", type=int, default=2000, help="held-out problems per seed (default 2000)")
    parser.add_argument("--texts", type=int, default=64, help="held-out texts per family and seed for KL and CKA")
    parser.add_argument("--steps", type=int, default=None, help="distill steps (default: the reasoner preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--markdown", type=Path, default=None, help="report: write the tables here")
    parser.add_argument("--json", type=Path, default=None, help="report: write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "run":
        run_seeds(args)
    elif args.command == "sweep":
        run_sweep(args)
    else:
        summary = summarize(args.workdir)
        text = markdown(summary)
        print(text)
        if args.markdown:
            atomic_write_text(args.markdown, text + "\n")
        if args.json:
            atomic_write_json(args.json, summary)


if __name__ == "__main__":
    main()
