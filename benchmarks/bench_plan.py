"""``ckaqad plan`` against ModelOpt's AutoQuantize on the built-in teacher (by hand, not a test).

``compare``: the same choices (NVFP4 W4A4 or BF16 per unit), the same effective-bits budgets (every Linear weight
counted, the BF16 ``lm_head`` included, as both tools count them), the same calibration batches. ckaqad measures its
three scores once and chooses per score and budget; AutoQuantize scores once per method (``gradient`` with the
next-token cross-entropy as its loss, ``kl_div``) and re-solves per budget from its search state. Every distinct
choice is then fake-quantized by ckaqad (the same NVFP4 numerics for all) and measured on held-out text (test split):
KL(teacher || student), mean and min layer CKA, top-1, and task accuracy on ``--task-problems`` problems of each of
the ``--eval-seeds``.

AutoQuantize's NVFP4 fake quantization asserts ``amax.is_cuda`` on the CPU; ckaqad's own fake quantization is
registered as its quant backend (``register_quant_backend``) for the NVFP4 quantizers, so the search runs on the CPU
(docs/plan.md, "AutoQuantize on the CPU").

``cost``: ``ckaqad plan`` (every unit's three scores, then uniform NVFP4 against the plan) and one
``ckaqad diagnose --ptq w4a4`` pass, as whole commands on the same calibration tokens, on a Qwen3-0.6B-shaped model
with random weights (``--layers`` decoder layers, 28 by default) saved under ``--workdir``; wall and CPU seconds,
peak RSS, and the in-process breakdown (report.json's ``cost``, run.json's stage times).

``qad``: CKA-QAD (``ckaqad distill``, its default steps) from uniform NVFP4 and from ``ckaqad plan``'s choice at each
of ``--qad-budgets`` (the plan run first in the same run directory: distill takes it by default), then each PTQ start
and each distilled student measured against the teacher as ``compare`` measures (KL, layer CKA, top-1 on the
held-out text; task accuracy over the evaluation seeds).

``plot``: the Pareto plot (task accuracy against effective bits) from a compare result (default: the transcribed
``results_plan_compare.json``) and, with ``--qad-json``, the qad result.

    python benchmarks/bench_plan.py compare --json /tmp/plan_compare.json --plot benchmarks/results_plan_pareto.png
    OMP_NUM_THREADS=1 python benchmarks/bench_plan.py cost --layers 28 --cost-tokens 128 --seq-len 128 --json /tmp/plan_cost.json
    OMP_NUM_THREADS=1 python benchmarks/bench_plan.py qad --qad-budgets 5.0 6.0 --calib-tokens 1024 --json benchmarks/results_plan_qad.json
    python benchmarks/bench_plan.py plot --qad-json benchmarks/results_plan_qad.json --plot benchmarks/results_plan_pareto.png
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from ckaqad_cli.builtin import tasks
from ckaqad_cli.data import load_texts, pack_sequences
from ckaqad_cli.models import load_model
from ckaqad_cli.planning import sensitivity
from ckaqad_cli.planning.budget import choose
from ckaqad_cli.planning.evaluate import compare, task_accuracy
from ckaqad_cli.planning.switch import prepare
from ckaqad_cli.planning.units import UnitTable
from ckaqad_cli.settings.plan import SCORES

BUDGETS = (4.75, 5.0, 5.5, 6.0)
HERE = Path(__file__).resolve().parent
BACKEND = "ckaqad_nvfp4"
QUIET = Console(stderr=True, quiet=True)


def sequences(split: str, tokens: int, tokenizer) -> torch.Tensor:
    return pack_sequences(load_texts("builtin", split=split, seed=0), tokenizer, 128, max_tokens=tokens, seed=0)


# -- AutoQuantize ------------------------------------------------------------------------------------------------
def _nvfp4_backend(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """ckaqad's NVFP4 fake quantization (per-tensor global scale from the tensor's amax, blocks of 16, E4M3 scales)
    standing in for ModelOpt's CUDA-only dynamic block quantization."""
    from ckaqad_kernels.fake_quant import fake_quantize_ste
    from ckaqad_kernels.nvfp4_ref import global_scale_from_amax, tensor_amax

    return fake_quantize_ste(inputs, global_scale_from_amax(tensor_amax(inputs)))


def nvfp4_config() -> dict:
    """ModelOpt's NVFP4 W4A4 preset with its NVFP4 quantizers sent to the registered CPU backend."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import register_quant_backend

    register_quant_backend(BACKEND, _nvfp4_backend)
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("cfg", {}).get("num_bits") == (2, 1):
            entry["cfg"] = {**entry["cfg"], "backend": BACKEND}
    return cfg


def autoquantize(method: str, batches: list[torch.Tensor]) -> tuple[dict, float]:
    """(search state, seconds) of ``mtq.auto_quantize`` on a fresh copy of the built-in teacher."""
    import modelopt.torch.quantization as mtq

    model, _ = load_model("builtin", dtype=torch.float32)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = mtq.auto_quantize(
            model, constraints={"effective_bits": BUDGETS[-1]}, quantization_formats=[nvfp4_config()],
            data_loader=batches, forward_step=lambda m, b: m(input_ids=b, use_cache=False).logits,
            loss_func=lambda out, b: F.cross_entropy(out[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten()),
            disabled_layers=["*lm_head*"], num_calib_steps=len(batches), num_score_steps=len(batches), method=method,
        )
    return state, time.perf_counter() - start


def autoquantize_kept(state: dict, table: UnitTable, bits: float) -> tuple[str, ...]:
    """The units AutoQuantize keeps in BF16 at ``bits``, re-solved from its search state (its own solver: the LP for
    gradient scores, the threshold search for KL scores)."""
    from modelopt.torch.quantization.algorithms import QuantRecipe, _resolve_best_recipe

    recipe = _resolve_best_recipe(state, {"effective_bits": bits})
    none = QuantRecipe(quant_cfg=None)
    kept = {m for name, fmt in recipe.items() if fmt == none for m in state["candidate_stats"][name]["module_names"]}
    return tuple(u.name for u in table.units if kept & set(u.members))


# -- measurements ------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, table: UnitTable, plans: dict[str, tuple[str, ...]], held_out: torch.Tensor,
             problems: int, seeds: list[int]) -> dict[str, dict]:
    """KL, layer CKA, top-1 on held-out text and task accuracy per seed of each distinct plan."""
    measured = compare(model, table, plans, held_out, batch_size=8, bos_token_id=tokenizer.bos_token_id,
                       console=QUIET)
    accuracy = {seed: task_accuracy(model, tokenizer, table, plans, tasks.generate("test", problems, seed),
                                     tasks.evaluate)
                for seed in seeds}
    out = {}
    for label in ["teacher", *plans]:
        per_seed = [accuracy[seed][label] for seed in seeds]
        numbers = {k: measured[label][k] for k in ("kl", "mean_cka", "min_cka", "top1")} if label in plans else {}
        out[label] = {**numbers, "task_acc": statistics.mean(per_seed), "task_acc_seeds": per_seed}
    return out


@torch.no_grad()
def against_teacher(teacher, student, held_out: torch.Tensor, bos_token_id: int | None) -> dict:
    """KL(teacher || student), layer CKA (mean and min over the decoder layers) and top-1 of a separately loaded
    student on the held-out sequences: the arithmetic of ``planning.evaluate.compare`` (the PTQ rows), batches of 8,
    the same token filter (position 0 / BOS dropped), the same streaming CKA."""
    from ckaqad_cli.cka import TokenFilter
    from ckaqad_cli.cka_streaming import StreamingCKA
    from ckaqad_cli.kl import token_kl
    from ckaqad_cli.models import capture_residuals

    token_filter, acc, kl, top1 = TokenFilter(), [], 0.0, 0.0
    for ids in torch.split(held_out, 8):
        with capture_residuals(teacher) as t:
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        with capture_residuals(student) as s:
            logits = student(input_ids=ids, use_cache=False).logits
        acc = acc or [StreamingCKA() for _ in t[:-1]]
        keep = token_filter.mask(ids, None, (), bos_token_id)
        for a, x, y in zip(acc, s[:-1], t[:-1], strict=True):
            a.update_teacher(y[keep])
            a.update_student("s", x[keep], y[keep])
        kl += float(token_kl(logits, teacher_logits).sum())
        top1 += float((logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
    linear = [a.linear("s") for a in acc]
    return {"kl": kl / held_out.numel(), "mean_cka": sum(linear[1:]) / len(linear[1:]), "min_cka": min(linear[1:]),
            "top1": top1 / held_out.numel(), "linear_cka": linear}


def run_compare(args: argparse.Namespace) -> dict:
    model, tokenizer = load_model("builtin", dtype=torch.float32)
    calibration = sequences("train", args.calib_tokens, tokenizer)
    held_out = sequences("test", args.eval_tokens, tokenizer)
    batches = list(torch.split(calibration, 8))
    table, _ = prepare(model, "w4a4", ())
    start = time.perf_counter()
    measured = sensitivity.measure(model, table, calibration, batch_size=8, bos_token_id=tokenizer.bos_token_id,
                                   console=QUIET)
    seconds = {"ckaqad (cka, kl and grad together)": time.perf_counter() - start}
    choices: dict[tuple[float, str], tuple[str, ...]] = {}
    for bits in BUDGETS:
        for score in SCORES:
            choices[bits, f"ckaqad {score}"] = choose(table, measured.scores(score), bits).kept
    for method in ("gradient", "kl_div"):
        state, seconds[f"AutoQuantize {method}"] = autoquantize(method, batches)
        for bits in BUDGETS:
            choices[bits, f"AutoQuantize {method}"] = autoquantize_kept(state, table, bits)
    distinct = {kept: f"plan{i}" for i, kept in enumerate(dict.fromkeys([(), *choices.values()]))}
    results = evaluate(model, tokenizer, table, {label: kept for kept, label in distinct.items()}, held_out,
                       args.task_problems, args.eval_seeds)
    rows = [{"budget": None, "method": "teacher", "kept": [], "bits": 16.0, **results["teacher"]},
            {"budget": None, "method": "uniform NVFP4", "kept": [], "bits": table.bits(table.bytes_of(())),
             **results[distinct[()]]}]
    rows += [{"budget": bits, "method": method, "kept": list(kept), "bits": table.bits(table.bytes_of(kept)),
              **results[distinct[kept]]} for (bits, method), kept in choices.items()]
    return {"rows": rows, "seconds": seconds, "calib_tokens": int(calibration.numel()),
            "eval_tokens": int(held_out.numel()), "task_problems": args.task_problems, "eval_seeds": args.eval_seeds,
            "cost": {"forwards_per_batch": measured.forwards_per_batch, "batches": measured.batches},
            "scores": {u.name: {s: measured.scores(s)[u.name] for s in SCORES} for u in table.units}}


def run_qad(args: argparse.Namespace) -> dict:
    """CKA-QAD (``ckaqad distill``, its defaults: the built-in preset, W4A4, seed 0) from uniform NVFP4 and from
    ``ckaqad plan``'s choice at each of ``--qad-budgets`` (distill takes the run's plan by default), as whole
    commands; then each PTQ start and each distilled student against the teacher on the held-out text and the task
    suite (3 evaluation seeds), with the same arithmetic as ``compare``."""
    import shutil
    import subprocess
    import sys

    from ckaqad_cli.models import ptq_student
    from ckaqad_cli.quant import freeze_quantized_weights

    ckaqad = str(Path(sys.executable).with_name("ckaqad"))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    steps = [] if args.steps is None else ["--steps", str(args.steps)]
    starts: dict[str, dict] = {"uniform NVFP4": {"budget": None, "run": work / "uniform", "exclude": []}}
    starts.update({f"ckaqad plan {bits}": {"budget": bits, "run": work / f"plan-{bits}"} for bits in args.qad_budgets})
    seconds: dict[str, float] = {}

    def command(label: str, argv: list[str]) -> None:
        print("ckaqad " + " ".join(argv), flush=True)
        start = time.perf_counter()
        subprocess.run([ckaqad, *argv], check=True, stdout=subprocess.DEVNULL)
        seconds[label] = time.perf_counter() - start

    for label, start in starts.items():
        run = start["run"]
        if not (run / "distill" / "student" / "config.json").exists():
            shutil.rmtree(run, ignore_errors=True)
            if start["budget"] is not None:  # the compare subcommand's calibration: 4 batches of 8 x 128, seed 0
                command(f"{label}: plan", ["plan", "--run", str(run), "--budget-bits", str(start["budget"]),
                                           "--max-tokens", str(args.calib_tokens), "--seq-len", "128",
                                           "--batch-size", "8", "--task-problems", "0", "--device", "cpu"])
            command(f"{label}: distill", ["distill", "--run", str(run), "--device", "cpu", *steps])
        if start["budget"] is not None:
            report = json.loads((run / "plan" / "report.json").read_text())
            start.update(exclude=report["exclude"], kept=report["kept"], bits=report["effective_bits"])
        record = json.loads((run / "run.json").read_text())["stages"]["distill"]
        start["distill_config"] = {k: record["config"].get(k) for k in ("steps", "scheme", "exclude", "seed")}
        start["distill_metrics"] = record.get("metrics")

    teacher, tokenizer = load_model("builtin", dtype=torch.float32)
    held_out = sequences("test", args.eval_tokens, tokenizer)
    problems = {seed: tasks.generate("test", args.task_problems, seed) for seed in args.eval_seeds}

    def measure(student) -> dict:
        numbers = against_teacher(teacher, student, held_out, tokenizer.bos_token_id)
        freeze_quantized_weights(student)  # the same numerics, quantized once for decoding
        per_seed = [tasks.evaluate(student, tokenizer, problems[seed])["overall"] for seed in args.eval_seeds]
        return {**numbers, "task_acc": statistics.mean(per_seed), "task_acc_seeds": per_seed}

    rows = []
    per_seed = [tasks.evaluate(teacher, tokenizer, problems[seed])["overall"] for seed in args.eval_seeds]
    rows.append({"start": "teacher", "stage": "-", "bits": 16.0, "task_acc": statistics.mean(per_seed),
                 "task_acc_seeds": per_seed})
    model, _ = load_model("builtin", dtype=torch.float32)
    table, _ = prepare(model, "w4a4", ())
    del model
    for label, start in starts.items():
        kept = tuple(start.get("kept", ()))
        bits = table.bits(table.bytes_of(kept))
        ptq, _ = ptq_student(teacher, "w4a4", exclude=tuple(start["exclude"]), dtype=torch.float32)
        rows.append({"start": label, "stage": "PTQ", "kept": list(kept), "bits": bits, **measure(ptq)})
        del ptq
        student, _ = load_model(str(start["run"] / "distill" / "student"), dtype=torch.float32)
        rows.append({"start": label, "stage": "CKA-QAD", "kept": list(kept), "bits": bits, **measure(student),
                     "distill_config": start["distill_config"]})
        del student
        print(json.dumps(rows[-2:]), flush=True)
    return {"rows": rows, "seconds": seconds, "eval_tokens": int(held_out.numel()),
            "task_problems": args.task_problems, "eval_seeds": args.eval_seeds, "calib_tokens": args.calib_tokens}


def pareto(result: dict, path: Path, qad: dict | None = None) -> None:
    """Task accuracy (mean of the evaluation seeds) against effective bits: uniform NVFP4 and each method (PTQ), the
    teacher as a line; with ``qad`` (the qad subcommand's result) its PTQ starts and the students after CKA-QAD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=110)
    teacher = next(r["task_acc"] for r in result["rows"] if r["method"] == "teacher")
    ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher (BF16)")
    methods = list(dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "teacher"))
    for k, method in enumerate(methods):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["bits"])
        ax.plot([r["bits"] for r in rows], [r["task_acc"] for r in rows], marker="osD^vP*X"[k % 8], mfc="none",
                ls="-" if len(rows) > 1 else "none", label=f"PTQ: {method}", alpha=0.8)
    if qad is not None:  # its PTQ starts are the compare rows above (the same numbers); the students after QAD
        rows = sorted((r for r in qad["rows"] if r["stage"] == "CKA-QAD"), key=lambda r: r["bits"])
        steps = rows[0]["distill_config"]["steps"] if rows else "?"
        ax.plot([r["bits"] for r in rows], [r["task_acc"] for r in rows], marker="*", ms=11, color="tab:red",
                label=f"after CKA-QAD ({steps} steps): uniform, ckaqad plan 5.0 and 6.0")
    ax.set_xlabel("effective bits per Linear weight")
    ax.set_ylabel(f"task accuracy (mean of {len(result['eval_seeds'])} seeds)")
    title = "built-in teacher, W4A4: uniform NVFP4, ckaqad plan, AutoQuantize"
    ax.set_title(title + (" (PTQ and after CKA-QAD)" if qad else " (PTQ)"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(0.0, 0.95))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def qwen3_shaped(directory: Path, layers: int) -> Path:
    """A Qwen3-0.6B-shaped model with random weights (hidden 1024, MLP 3072, 16 q / 8 kv heads of 128, vocabulary
    151936, tied embeddings, ``layers`` decoder layers) saved in bfloat16 with the built-in character tokenizer (its
    112 ids are a subset of the vocabulary: the arithmetic is the real model's, nothing is downloaded)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from ckaqad_cli.builtin.tokenizer import build_tokenizer

    if (directory / "config.json").exists():
        return directory
    tokenizer = build_tokenizer()
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory


def timed(argv: list[str], log: Path) -> dict:
    """Wall seconds, CPU seconds (user + system, less sensitive than wall to other jobs on a shared machine) and
    peak RSS (MB) of one whole command (``/usr/bin/time``), its output kept in ``log``."""
    import subprocess

    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(["/usr/bin/time", "-f", "peak_rss_kb=%M cpu_seconds=%U+%S", *argv], stdout=out, stderr=subprocess.STDOUT,
                       check=True)
    wall = time.perf_counter() - start
    line = [line for line in log.read_text().splitlines() if line.startswith("peak_rss_kb=")][-1]
    fields = dict(field.split("=") for field in line.split())
    user, system = fields["cpu_seconds"].split("+")
    return {"wall_seconds": wall, "cpu_seconds": float(user) + float(system),
            "peak_rss_mb": int(fields["peak_rss_kb"]) / 1024}


def stage_seconds(run: Path, stage: str) -> float:
    """The stage's own seconds as run.json records them (started to ended, 1-second resolution)."""
    import datetime as dt

    entry = json.loads((run / "run.json").read_text())["stages"][stage]
    return (dt.datetime.fromisoformat(entry["ended"]) - dt.datetime.fromisoformat(entry["started"])).total_seconds()


@torch.no_grad()
def forward_seconds(teacher_dir: Path, tokens: int, seq_len: int, repeats: int = 3) -> dict:
    """In-process wall and CPU seconds (best of ``repeats``; CPU = this process's, less sensitive to other jobs) of
    the pieces both commands are made of, on ``tokens`` tokens of the built-in train split: the teacher's whole
    forward (logits), its decoder alone, its output head alone, and the uniform W4A4 PTQ student's whole forward
    (fake quantization of every weight and input included)."""
    from ckaqad_cli.models import ptq_student

    model, tokenizer = load_model(str(teacher_dir), dtype=torch.float32)
    ids = pack_sequences(load_texts("builtin", split="train", seed=0), tokenizer, seq_len, max_tokens=tokens, seed=0)
    student, _ = ptq_student(model, "w4a4")
    final = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    pieces = {"teacher_forward": lambda: model(input_ids=ids, use_cache=False).logits,
              "decoder_only": lambda: model.base_model(input_ids=ids, use_cache=False).last_hidden_state,
              "head_only": lambda: head(final),
              "ptq_student_forward": lambda: student(input_ids=ids, use_cache=False).logits}
    out = {}
    for name, piece in pieces.items():
        piece()  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            piece()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        out[name] = {"wall": min(wall), "cpu": min(cpu)}
    return out


def run_cost(args: argparse.Namespace) -> dict:
    """``ckaqad plan`` (every unit's three scores, then uniform-against-plan) and one ``ckaqad diagnose --ptq w4a4``
    pass on a Qwen3-0.6B-shaped model, as whole commands on the same calibration tokens, with the in-process
    breakdown that the reports record."""
    import os
    import shutil
    import sys

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    teacher = qwen3_shaped(work / f"qwen3-shape-{args.layers}L", args.layers)
    ckaqad = [str(Path(sys.executable).with_name("ckaqad"))]  # the console script of this environment
    common = ["--teacher", str(teacher), "--data", "builtin", "--split", "train", "--seq-len", str(args.seq_len),
              "--max-tokens", str(args.cost_tokens), "--batch-size", str(args.batch_size), "--device", "cpu",
              "--dtype", "float32", "--task-problems", "0", "--seed", "0"]
    out: dict = {"layers": args.layers, "tokens": args.cost_tokens, "seq_len": args.seq_len,
                 "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "commands": {}}
    for name, argv in (("diagnose", ["diagnose", "--ptq", "w4a4", *common]),
                       ("plan", ["plan", "--budget-bits", str(args.cost_budget), *common])):
        run = work / f"run-{name}"
        command = [*ckaqad, *argv, "--run", str(run)]
        print(" ".join(["ckaqad", *argv, "--run", str(run)]), flush=True)
        if args.timing_only:  # the commands' numbers from the last run of this workdir
            measured = json.loads((work / "cost.json").read_text())["commands"][name]
            out["commands"][name] = measured
            continue
        shutil.rmtree(run, ignore_errors=True)
        measured = timed(command, work / f"{name}.log")
        report = json.loads((run / name / "report.json").read_text())
        measured["stage_seconds"] = stage_seconds(run, name)
        measured["command"] = " ".join(["ckaqad", *argv, "--run", str(run)])
        if name == "plan":
            measured.update(report["cost"])
            measured["effective_bits"] = report["effective_bits"]
            measured["kept"] = report["kept"]
            measured["uniform_bits"] = report["uniform_bits"]
        else:
            measured["tokens"] = report["tokens"]
        out["commands"][name] = measured
        print(json.dumps(measured), flush=True)
    plan, diagnose = out["commands"]["plan"], out["commands"]["diagnose"]
    layers = args.layers
    out["theory_forward_ratio"] = (3 * layers + 3) / 2
    out["forward_ratio"] = plan["forwards_per_batch"] / 2
    out["ratio_sensitivity_to_diagnose_stage"] = plan["sensitivity_seconds"] / diagnose["stage_seconds"]
    out["ratio_plan_stage_to_diagnose_stage"] = plan["stage_seconds"] / diagnose["stage_seconds"]
    out["ratio_whole_commands"] = plan["wall_seconds"] / diagnose["wall_seconds"]
    out["ratio_whole_commands_cpu"] = plan["cpu_seconds"] / diagnose["cpu_seconds"]
    if not args.timing_only:
        (work / "cost.json").write_text(json.dumps(out, indent=1))
    if args.no_pieces:
        return out
    pieces = forward_seconds(teacher, args.cost_tokens, args.seq_len)
    out["pieces_seconds"] = pieces
    forward = pieces["teacher_forward"]
    out["sensitivity_in_teacher_forwards"] = plan["sensitivity_seconds"] / forward["wall"]
    out["diagnose_stage_in_teacher_forwards"] = diagnose["stage_seconds"] / forward["wall"]
    out["plan_command_cpu_in_teacher_forwards"] = plan["cpu_seconds"] / forward["cpu"]
    out["diagnose_command_cpu_in_teacher_forwards"] = diagnose["cpu_seconds"] / forward["cpu"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("compare", "cost", "qad", "plot"))
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--task-problems", type=int, default=256)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--qad-budgets", type=float, nargs="+", default=[5.0, 6.0],
                        help="qad: the plan budgets distilled from (beside uniform NVFP4)")
    parser.add_argument("--steps", type=int, help="qad: distill steps (default: distill's own, the built-in preset)")
    parser.add_argument("--layers", type=int, default=28, help="cost: decoder layers of the Qwen3-0.6B shape")
    parser.add_argument("--cost-tokens", type=int, default=512, help="cost: calibration tokens of both commands")
    parser.add_argument("--seq-len", type=int, default=256, help="cost: tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1, help="cost: sequences per forward")
    parser.add_argument("--cost-budget", type=float, default=8.0, help="cost: plan's --budget-bits")
    parser.add_argument("--no-pieces", action="store_true", help="cost: the commands only, not the in-process pieces")
    parser.add_argument("--timing-only", action="store_true",
                        help="cost: only the in-process pieces; the commands' numbers from the workdir's cost.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ckaqad_plan_bench"),
                        help="cost, qad: where the model and the runs are written (qad reuses finished runs)")
    parser.add_argument("--compare-json", type=Path, default=HERE / "results_plan_compare.json",
                        help="plot: the compare result (the PTQ points)")
    parser.add_argument("--qad-json", type=Path, help="plot: the qad result (the after-QAD points)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="compare: the Pareto plot (task accuracy against bits) as a PNG")
    args = parser.parse_args()
    if args.what == "plot":
        qad = json.loads(args.qad_json.read_text()) if args.qad_json else None
        pareto(json.loads(args.compare_json.read_text()), args.plot, qad)
        return
    result = {"compare": run_compare, "cost": run_cost, "qad": run_qad}[args.what](args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot is not None and args.what == "compare":
        pareto(result, args.plot)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
