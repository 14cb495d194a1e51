"""The whole chain over one run directory: [plan ->] PTQ diagnose -> distill (CKA-QAD) [-> KL-only baseline] ->
diagnose -> pack (with verify) -> push as a dry run -> the comparison table. With a plan (``--budget-bits``) every
later stage quantizes the plan's units (they take the run's plan by default).

Every step is an ordinary stage recorded in run.json; a step already done with the same settings is skipped, so an
interrupted pipeline continues where it stopped when run again. Every option of every stage is checked before the
first stage starts; a finished stage asked for with other settings is refused (``--force`` redoes every stage).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console

from ckaqad_cli import formats
from ckaqad_cli import report as report_io
from ckaqad_cli.atomic import atomic_write_json, atomic_write_text
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.objective import TeacherMemo
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.diagnose import DiagnoseConfig
from ckaqad_cli.settings.distill import DistillConfig
from ckaqad_cli.settings.pack import PackConfig
from ckaqad_cli.settings.pipeline import PipelineConfig
from ckaqad_cli.settings.plan import PlanConfig
from ckaqad_cli.settings.push import PushConfig
from ckaqad_cli.stages.diagnose import run_diagnose
from ckaqad_cli.stages.distill import run_distill
from ckaqad_cli.stages.pack import run_pack
from ckaqad_cli.stages.plan import run_plan
from ckaqad_cli.stages.push import check_repo_id, push_folder

STAGE = "pipeline"
CKA_QAD, KL_ONLY, TEACHER = "cka-qad", "kl-only", "bf16-teacher"
COLUMNS = ("mean_cka", "min_cka", "kl", "top1", "task_acc")


def _distill_config(cfg: PipelineConfig, *, lambda_cka: float | None) -> DistillConfig:
    overrides = {
        k: getattr(cfg, k) for k in ("steps", "batch_size", "seq_len", "lr", "cka_layers") if getattr(cfg, k) is not None
    }
    return DistillConfig(
        teacher=cfg.teacher, data=cfg.data, scheme=cfg.scheme, seed=cfg.seed, device=cfg.device,
        scale_rule=cfg.scale_rule, activation_arithmetic=cfg.activation_arithmetic,
        lambda_cka=lambda_cka, force=cfg.force, **overrides,
    )


def _plan_config(cfg: PipelineConfig) -> PlanConfig:
    plan = PlanConfig(
        budget_bits=cfg.budget_bits, budget_over=cfg.plan_budget_over, score=cfg.plan_score, upgrade=cfg.plan_upgrade,
        teacher=cfg.teacher, data=cfg.data, scheme=cfg.scheme,
        scale_rule=cfg.scale_rule, activation_arithmetic=cfg.activation_arithmetic, max_tokens=cfg.diagnose_tokens,
        seq_len=cfg.diagnose_seq_len, task_problems=cfg.task_problems, seed=cfg.seed, device=cfg.device,
        force=cfg.force,
    )
    plan.check()
    return plan


def _diagnose_config(cfg: PipelineConfig, stage: str, students: list[tuple[str, str]]) -> DiagnoseConfig:
    return DiagnoseConfig(
        teacher=cfg.teacher, data=cfg.data, students=students, ptq=[cfg.scheme], use_run_student=False,
        scale_rule=cfg.scale_rule, activation_arithmetic=cfg.activation_arithmetic,
        max_tokens=cfg.diagnose_tokens, seq_len=cfg.diagnose_seq_len, task_problems=cfg.task_problems,
        seed=cfg.seed, device=cfg.device, stage=stage, force=cfg.force,
    )


# Settings that do not change what a stage writes (or that a stage records resolved): not compared on a re-run.
_NOT_COMPARED = frozenset({"force", "resume", "device", "dtype", "world_size", "students", "verify", "dry_run"})


@dataclass
class _Step:
    name: str
    settings: dict[str, Any]
    """What the stage will record as its config (compared with a finished stage's record on a re-run)."""
    run: Callable[[], Any]


def settings_that_differ(recorded: dict[str, Any], planned: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (recorded, planned)} for every setting a finished stage was run with otherwise. A setting the
    record lacks is newer than the run, which ran with what is now its default: not compared."""
    planned = json.loads(json.dumps(planned, default=str))  # tuples as lists, as run.json holds them
    return {
        key: (recorded[key], value)
        for key, value in planned.items()
        if key not in _NOT_COMPARED and key in recorded and recorded[key] != value
    }


def _steps(cfg: PipelineConfig, run: RunDir, console: Console) -> list[_Step]:
    """The stages in order. Every stage's configuration is built (and so checked) here, before any stage runs."""

    def student(stage: str) -> str:
        path = run.stage_output(stage, "student")
        if path is None:
            raise CkaqadError(f"stage {stage} recorded no student in {run.path}")
        return str(path)

    def final_students() -> list[tuple[str, str]]:
        students = [(CKA_QAD, student("distill"))]
        if cfg.baseline:
            students.append((KL_ONLY, student("distill-kl")))
        return students

    push_settings = {"repo_id": cfg.repo_id, "dry_run": True}

    def push_dry_run() -> Any:
        with run.stage("push-dry-run", config=push_settings, force=cfg.force) as rec:
            result = push_folder(None, PushConfig(repo_id=cfg.repo_id, dry_run=True), run=run)
            card = atomic_write_text(run.stage_dir("push-dry-run") / "README.md", result["card"])
            rec.outputs.update(card=run.relpath(card), files=len(result["files"]), commits=result["commits"])
            rec.metrics["bytes"] = sum(result["files"].values())
        return result

    distill_cka = _distill_config(cfg, lambda_cka=cfg.lambda_cka)
    distill_kl = _distill_config(cfg, lambda_cka=0.0)
    diagnose_ptq = _diagnose_config(cfg, "diagnose-ptq", [])
    diagnose_final = _diagnose_config(cfg, "diagnose", [])
    pack = PackConfig(format=cfg.format, verify=True, force=cfg.force)
    formats.format_module(pack.format)
    check_repo_id(cfg.repo_id)
    for distill_cfg in (distill_cka, distill_kl):
        distill_cfg.resolved().validate()

    steps = []
    if cfg.budget_bits is not None:
        plan = _plan_config(cfg)
        steps.append(_Step("plan", asdict(plan), lambda: run_plan(plan, run, console=console)))
    # the KL-only run reads the CKA-QAD run's rows in the same order: it takes the teacher's outputs from memory
    memo = TeacherMemo() if cfg.baseline else None

    def baseline() -> Any:
        try:
            return run_distill(distill_kl, run, console=console, stage="distill-kl", teacher_memo=memo)
        finally:
            memo.clear()

    task_memo: dict[str, dict] = {}  # the teacher's and PTQ student's task accuracy, decoded once for both diagnoses
    steps += [
        _Step("diagnose-ptq", asdict(diagnose_ptq),
              lambda: run_diagnose(diagnose_ptq, run, console=console, task_memo=task_memo)),
        _Step("distill", asdict(distill_cka.resolved()),
              lambda: run_distill(distill_cka, run, console=console, teacher_memo=memo)),
    ]
    if cfg.baseline:
        steps.append(_Step("distill-kl", asdict(distill_kl.resolved()), baseline))
    steps += [
        _Step("diagnose", asdict(diagnose_final), lambda: run_diagnose(
            dataclasses.replace(diagnose_final, students=final_students()), run, console=console,
            task_memo=task_memo)),
        _Step("pack", asdict(pack), lambda: run_pack(pack, run)),
        _Step("push-dry-run", push_settings, push_dry_run),
    ]
    return steps


def check_finished_stages(steps: list[_Step], run: RunDir) -> None:
    """A finished stage is skipped only when it was run with the settings asked for now; otherwise refuse, naming
    the settings (``--force`` redoes every stage), so that run.json always describes what is on disk."""
    for step in steps:
        entry = run.stage_entry(step.name)
        if not entry or entry.get("status") != "done":
            continue
        differ = settings_that_differ(entry.get("config") or {}, step.settings)
        if differ:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(differ.items()))
            raise CkaqadError(
                f"stage {step.name} of {run.path} finished with other settings ({what}): pass --force to redo "
                "every stage with the new ones, or use another --run"
            )


def comparison_rows(diagnose_report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The comparison table from the final diagnose report: the teacher, then every student."""
    tasks = diagnose_report.get("task_accuracy", {})

    def with_tasks(row: dict[str, Any], label: str) -> dict[str, Any]:
        acc = tasks.get(label)
        if acc is not None:
            row["task_acc"] = acc["overall"]
            row.update({f"acc:{family}": value for family, value in sorted(acc["per_family"].items())})
        return row

    rows = {TEACHER: with_tasks({"mean_cka": 1.0, "min_cka": 1.0, "kl": 0.0, "top1": 1.0}, "teacher")}
    for label in sorted(diagnose_report["students"], key=_row_rank):
        s = diagnose_report["students"][label]
        rows[label] = with_tasks({k: s[k] for k in ("mean_cka", "min_cka", "kl", "top1")}, label)
    return rows


def _row_rank(label: str) -> tuple[int, str]:
    """PTQ first, then KL-only, then CKA-QAD: the order of the paper's table."""
    return (0 if label.startswith("ptq-") else 1 if label == KL_ONLY else 2 if label == CKA_QAD else 3, label)


def write_comparison(run: RunDir, console: Console) -> dict[str, Any]:
    """Write pipeline/comparison.json, .md and cka.png from the final diagnose report; print the table."""
    report_path = run.stage_output("diagnose", "report_json")
    if report_path is None:
        raise CkaqadError(f"the final diagnose stage of {run.path} has no report")
    report = json.loads(report_path.read_text())
    rows = comparison_rows(report)
    columns = list(COLUMNS) + sorted({k for r in rows.values() for k in r if k.startswith("acc:")})
    out = run.stage_dir(STAGE)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "comparison.json", {"rows": rows, "columns": columns, "filters": report.get("filters")})
    md = "# NVFP4 students against the BF16 teacher\n\n" + report_io.summary_markdown(rows, columns) + "\n"
    atomic_write_text(out / "comparison.md", md)
    plot = run.stage_output("diagnose", "plot")
    if plot is not None:
        tmp = out / ".cka.png.tmp"
        shutil.copyfile(plot, tmp)
        tmp.replace(out / "cka.png")
    console.print(report_io.summary_table(rows, columns, title="BF16 teacher vs NVFP4 students"))
    return {"rows": rows, "columns": columns}


def run_pipeline(cfg: PipelineConfig, run: RunDir, *, console: Console | None = None) -> dict[str, Any]:
    """Run every step not yet done, then the comparison. Returns the comparison rows."""
    console = console or Console(stderr=True)
    steps = _steps(cfg, run, console)
    if cfg.dry_run:  # the distill stages hold the peak; the KL-only one needs no more memory than CKA-QAD
        distill = _distill_config(cfg, lambda_cka=cfg.lambda_cka)
        distill.dry_run = True
        run_distill(distill, run, console=console)
        return {}
    with run.lock():
        if not cfg.force:
            check_finished_stages(steps, run)
        for i, step in enumerate(steps, 1):
            entry = run.stage_entry(step.name)
            if entry and entry.get("status") == "done" and not cfg.force:
                console.print(f"[dim][{i}/{len(steps)}] {step.name}: done already, skipped[/dim]")
                continue
            console.rule(f"[{i}/{len(steps)}] {step.name}")
            step.run()
        with run.stage(STAGE, config=asdict(cfg), force=True) as rec:
            result = write_comparison(run, console)
            rec.outputs.update(
                comparison_json=f"{STAGE}/comparison.json", comparison_md=f"{STAGE}/comparison.md",
                plot=f"{STAGE}/cka.png",
            )
            rec.metrics.update({label: {k: row.get(k) for k in COLUMNS} for label, row in result["rows"].items()})
    return result
