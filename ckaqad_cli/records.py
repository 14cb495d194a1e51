"""Typed records of run.json: what distill, pack and diagnose write there (``write``) and what others read (``of``).

run.json is the one contract between stages (see rundir.py). The stage records its outputs and metrics through the
``write`` of its class below, and a module that needs them reads them through ``of``: the keys are written here once,
for both sides, and a renamed key breaks here and in the tests, not silently in a model card. Each ``of`` returns
None unless the stage finished.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckaqad_cli.rundir import StageRecord


def _done(manifest: dict[str, Any] | None, stage: str) -> _Sections | None:
    """The record of a finished ``stage`` and its config, metrics and outputs (each {} when absent), else None."""
    entry = ((manifest or {}).get("stages") or {}).get(stage)
    if not (isinstance(entry, dict) and entry.get("status") == "done"):
        return None
    return _Sections(entry, entry.get("config") or {}, entry.get("metrics") or {}, entry.get("outputs") or {})


@dataclass(frozen=True)
class _Sections:
    entry: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    outputs: dict[str, Any]

    def teacher_input(self) -> dict[str, Any]:
        return (self.entry.get("inputs") or {}).get("teacher") or {}


def _file_sizes(files: Any) -> dict[str, int]:
    if isinstance(files, list):  # an older record: [{"path": ..., "size": ...}]
        files = {f["path"]: f["size"] for f in files if isinstance(f, dict) and "path" in f and "size" in f}
    return files if isinstance(files, dict) else {}


@dataclass(frozen=True)
class DistillRecord:
    """What distill records: its configuration (as resolved), its summary metrics and the student's folder."""

    teacher: str | None
    teacher_input: dict[str, Any]
    """describe_input() of the teacher: {"hub_id": ...}, {"path": ...} or {"builtin": ...}."""
    data: str | None
    scheme: str | None
    scale_rule: str | None
    activation_arithmetic: str | None
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

    @staticmethod
    def write(rec: StageRecord, *, student: str, metrics_file: str, summary: dict[str, Any]) -> None:
        """Distill's outputs (the student's folder, metrics.jsonl) and its summary (steps, tokens_seen, mode,
        mean_lambda_cka, held-out KL and CKA, ...), paths relative to the run."""
        rec.outputs.update(student=student, metrics=metrics_file)
        rec.metrics.update(summary)

    @property
    def kl_only(self) -> bool:
        return self.lambda_cka == 0

    @classmethod
    def of(cls, manifest: dict[str, Any] | None, stage: str = "distill") -> DistillRecord | None:
        if (r := _done(manifest, stage)) is None:
            return None
        return cls(
            **{key: r.config.get(key) for key in ("teacher", "data", "scheme", "scale_rule", "activation_arithmetic",
                                                  "lr", "seq_len", "lambda_cka", "cka_balance")},
            **{key: r.metrics.get(key) for key in ("tokens_seen", "mean_lambda_cka", "mode")},
            teacher_input=r.teacher_input(),
            steps=r.metrics.get("steps", r.config.get("steps")),
            student=r.outputs.get("student"),
            ended=r.entry.get("ended"),
        )


@dataclass(frozen=True)
class LinearPrecision:
    """How a packed model stores its Linear weights: modules per format and the average bits per weight as written,
    counted as ``ckaqad plan`` counts a budget (NVFP4 4.5, FP8 8 and its scales, BF16 16)."""

    nvfp4: int
    fp8: int
    kept: int
    bits: float


@dataclass(frozen=True)
class PackRecord:
    """What pack records: the packed folder, its format, scheme and file sizes, and whether it packed --model."""

    model: str | None
    format: str | None
    scheme: str | None
    files: dict[str, int] = field(default_factory=dict)
    scale_rule: str | None = None
    """The weights' block-scale rule (None in records written before it was recorded: amax)."""
    from_model: str | None = None
    """The --model it packed, None when it packed the run's distilled student."""
    started: str | None = None
    precision: LinearPrecision | None = None
    """None in records written before it was recorded."""

    @staticmethod
    def write(rec: StageRecord, *, model: str, format: str, scheme: str, scale_rule: str,
              files: dict[str, int], precision: LinearPrecision) -> None:
        """Pack's outputs: the packed folder (relative to the run), its format, scheme, scale rule, file sizes and
        Linear precision."""
        rec.outputs.update(model=model, format=format, scheme=scheme, scale_rule=scale_rule, files=files,
                           linear_precision=asdict(precision))

    @classmethod
    def of(cls, manifest: dict[str, Any] | None) -> PackRecord | None:
        if (r := _done(manifest, "pack")) is None:
            return None
        return cls(**{key: r.outputs.get(key) for key in ("model", "format", "scheme", "scale_rule")},
                   files=_file_sizes(r.outputs.get("files")), from_model=r.config.get("model"),
                   started=r.entry.get("started"), precision=_precision(r.outputs.get("linear_precision")))


def _precision(recorded: Any) -> LinearPrecision | None:
    try:
        return LinearPrecision(**recorded) if isinstance(recorded, dict) else None
    except TypeError:  # another version's keys
        return None


@dataclass(frozen=True)
class DiagnoseRecord:
    """What diagnose records: its report files and plot, and per student {mean_cka, min_cka, kl, top1, task_acc}."""

    report_json: str | None
    plot: str | None
    teacher: str | None
    teacher_input: dict[str, Any]
    students: dict[str, dict[str, Any]]

    @staticmethod
    def write(rec: StageRecord, *, report_json: str, report_md: str, plot: str,
              students: dict[str, dict[str, Any]]) -> None:
        """Diagnose's report files (relative to the run) and its summary per student."""
        rec.outputs.update(report_json=report_json, report_md=report_md, plot=plot)
        rec.metrics.update(students)

    @classmethod
    def of(cls, manifest: dict[str, Any] | None, stage: str = "diagnose") -> DiagnoseRecord | None:
        if (r := _done(manifest, stage)) is None:
            return None
        return cls(
            report_json=r.outputs.get("report_json"),
            plot=r.outputs.get("plot"),
            teacher=r.config.get("teacher"),
            teacher_input=r.teacher_input(),
            students={label: m for label, m in r.metrics.items() if isinstance(m, dict)},
        )
