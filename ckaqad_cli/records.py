"""Typed views of the stage records in run.json that other modules read.

run.json is the one contract between stages (see rundir.py). A module that needs what another stage recorded reads it
through these dataclasses, not by string keys: the fields below are the keys the writing stage records (distill's
``summary`` and config, pack's outputs, diagnose's outputs and metrics), in one place, and a renamed key breaks here
and in the tests, not silently in a model card. Each ``of`` returns None unless the stage finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _done(manifest: dict[str, Any] | None, stage: str) -> dict[str, Any] | None:
    entry = ((manifest or {}).get("stages") or {}).get(stage)
    return entry if isinstance(entry, dict) and entry.get("status") == "done" else None


@dataclass(frozen=True)
class DistillRecord:
    """What distill records: its configuration (as resolved), its summary metrics and the student's folder."""

    teacher: str | None
    teacher_input: dict[str, Any]
    """describe_input() of the teacher: {"hub_id": ...}, {"path": ...} or {"builtin": ...}."""
    data: str | None
    scheme: str | None
    lr: float | None
    seq_len: int | None
    lambda_cka: float | None
    """The fixed CKA weight, or None when it was balanced each step (then ``cka_balance`` is set)."""
    cka_balance: float | None
    steps: int | None
    tokens_seen: int | None
    mean_lambda_cka: float | None
    """The CKA weight averaged over the steps (a balanced run's, or the fixed one)."""
    mode: str | None
    """"kl-only" or "cka-qad"."""
    student: str | None
    ended: str | None

    @property
    def kl_only(self) -> bool:
        return self.lambda_cka == 0

    @classmethod
    def of(cls, manifest: dict[str, Any] | None, stage: str = "distill") -> DistillRecord | None:
        entry = _done(manifest, stage)
        if entry is None:
            return None
        config, metrics = entry.get("config") or {}, entry.get("metrics") or {}
        return cls(
            teacher=config.get("teacher"),
            teacher_input=(entry.get("inputs") or {}).get("teacher") or {},
            data=config.get("data"),
            scheme=config.get("scheme"),
            lr=config.get("lr"),
            seq_len=config.get("seq_len"),
            lambda_cka=config.get("lambda_cka"),
            cka_balance=config.get("cka_balance"),
            steps=metrics.get("steps", config.get("steps")),
            tokens_seen=metrics.get("tokens_seen"),
            mean_lambda_cka=metrics.get("mean_lambda_cka"),
            mode=metrics.get("mode"),
            student=(entry.get("outputs") or {}).get("student"),
            ended=entry.get("ended"),
        )


@dataclass(frozen=True)
class PackRecord:
    """What pack records: the packed folder, its format, scheme and file sizes, and whether it packed --model."""

    model: str | None
    format: str | None
    scheme: str | None
    files: dict[str, int] = field(default_factory=dict)
    from_model: str | None = None
    """The --model it packed, None when it packed the run's distilled student."""
    started: str | None = None

    @classmethod
    def of(cls, manifest: dict[str, Any] | None) -> PackRecord | None:
        entry = _done(manifest, "pack")
        if entry is None:
            return None
        outputs = entry.get("outputs") or {}
        files = outputs.get("files")
        if isinstance(files, list):  # an older record: [{"path": ..., "size": ...}]
            files = {f["path"]: f["size"] for f in files if isinstance(f, dict) and "path" in f and "size" in f}
        return cls(
            model=outputs.get("model"),
            format=outputs.get("format"),
            scheme=outputs.get("scheme"),
            files=files if isinstance(files, dict) else {},
            from_model=(entry.get("config") or {}).get("model"),
            started=entry.get("started"),
        )


@dataclass(frozen=True)
class DiagnoseRecord:
    """What diagnose records: its report files and plot, and per student {mean_cka, min_cka, kl, top1, task_acc}."""

    report_json: str | None
    plot: str | None
    teacher: str | None
    teacher_input: dict[str, Any]
    students: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, manifest: dict[str, Any] | None, stage: str = "diagnose") -> DiagnoseRecord | None:
        entry = _done(manifest, stage)
        if entry is None:
            return None
        outputs = entry.get("outputs") or {}
        metrics = entry.get("metrics") or {}
        return cls(
            report_json=outputs.get("report_json"),
            plot=outputs.get("plot"),
            teacher=(entry.get("config") or {}).get("teacher"),
            teacher_input=(entry.get("inputs") or {}).get("teacher") or {},
            students={label: m for label, m in metrics.items() if isinstance(m, dict)},
        )
