"""Reports: the per-layer CKA table (rich and Markdown), a summary table of students, report.json and the CKA plot.

The summary table is generic (rows = labels, columns = metric names) so later stages can reuse it for their own
comparison of models.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ckaqad_cli.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

WORST_MARK = "▼"
WORST_COUNT = 3  # at most this many layers marked per student (a quarter of the layers on small models)
IDENTICAL = 1 - 1e-4  # a layer at or above this CKA is never marked
SUMMARY_COLUMNS = ("mean_cka", "min_cka", "worst_layer", "mean_debiased_cka", "kl", "top1", "perplexity")


def fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"
    return "-" if value is None else str(value)


def worst_layers(values: Sequence[float], count: int = WORST_COUNT) -> set[int]:
    """Indices of the lowest values (the embeddings, index 0, excluded; layers with CKA ~1 never marked)."""
    count = min(count, max(1, (len(values) - 1) // 4))
    ranked = sorted((i for i in range(1, len(values)) if values[i] < IDENTICAL), key=lambda i: values[i])
    return set(ranked[:count])


def _layer_rows(report: Mapping) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    labels = list(report["students"])
    marks = {lb: worst_layers(report["students"][lb]["linear_cka"]) for lb in labels}
    rows = []
    for i, name in enumerate(report["layers"]):
        row = []
        for lb in labels:
            s = report["students"][lb]
            text = f"{s['linear_cka'][i]:.4f} ({s['debiased_cka'][i]:.4f})"
            row.append((text, i in marks[lb]))
        rows.append(row)
    return labels, rows


def layer_table(report: Mapping) -> Table:
    """Layers as rows, students as columns: linear CKA (debiased in brackets); the worst layers marked."""
    labels, rows = _layer_rows(report)
    table = Table(title=f"layer CKA vs teacher: linear (debiased); {WORST_MARK} = worst layers")
    table.add_column("layer")
    for lb in labels:
        table.add_column(lb, justify="right")
    for name, row in zip(report["layers"], rows, strict=True):
        table.add_row(name, *[f"[red]{t} {WORST_MARK}[/red]" if worst else t for t, worst in row])
    return table


def summary_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str], *, title: str = "") -> Table:
    """A generic comparison: one row per label, one column per metric name (missing -> '-')."""
    table = Table(title=title or None)
    table.add_column("model")
    for c in columns:
        table.add_column(c, justify="right")
    for label, metrics in rows.items():
        table.add_row(label, *[fmt(metrics.get(c)) for c in columns])
    return table


def summary_markdown(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str]) -> str:
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fmt(m.get(c)) for c in columns) + " |" for label, m in rows.items()]
    return "\n".join(lines) + "\n"


def student_rows(report: Mapping) -> dict[str, dict[str, object]]:
    """The summary rows of a diagnose report: the teacher, then each student, task accuracy added when measured."""
    acc = report.get("task_accuracy") or {}
    rows: dict[str, dict[str, object]] = {"teacher": {"perplexity": report["teacher"]["perplexity"]}}
    rows.update({lb: {k: s.get(k) for k in SUMMARY_COLUMNS} for lb, s in report["students"].items()})
    for label, result in acc.items():
        rows.setdefault(label, {})["task_acc"] = result["overall"]
    return rows


def _columns(report: Mapping) -> list[str]:
    return list(SUMMARY_COLUMNS) + (["task_acc"] if report.get("task_accuracy") else [])


def lm_eval_rows(report: Mapping) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
    """(model labels, rows (task, metric, one "value ± stderr" cell per model)) of the lm-evaluation-harness results;
    a model without the metric gets '-'."""
    results = report.get("lm_eval") or {}
    labels = list(results)
    keys: dict[tuple[str, str], None] = {}  # (task, metric) in first-seen order
    for tasks in results.values():
        keys.update({(task, metric): None for task, metrics in tasks.items() for metric in metrics})

    def cell(label: str, task: str, metric: str) -> str:
        m = results[label].get(task, {}).get(metric)
        if m is None:
            return "-"
        return fmt(m["value"]) + ("" if m["stderr"] is None else f" ± {fmt(m['stderr'])}")

    return labels, [(task, metric, [cell(lb, task, metric) for lb in labels]) for task, metric in keys]


def lm_eval_table(report: Mapping) -> Table:
    """Tasks and metrics as rows, models as columns: value ± standard error."""
    labels, rows = lm_eval_rows(report)
    table = Table(title="lm-evaluation-harness: value ± stderr")
    for name in ("task", "metric"):
        table.add_column(name)
    for lb in labels:
        table.add_column(lb, justify="right")
    for task, metric, cells in rows:
        table.add_row(task, metric, *cells)
    return table


def to_markdown(report: Mapping) -> str:
    labels, rows = _layer_rows(report)
    parts = [
        "# ckaqad diagnose\n",
        f"Teacher: `{report['teacher_spec']}`. Tokens: {report['tokens']} ({report['cka_tokens']} in CKA after the "
        f"filters). Token filters: {', '.join(report['filters'])}.\n",
        "## Summary\n",
        "mean_cka / min_cka: linear CKA over the decoder layers (embeddings excluded); kl: mean per-token "
        "KL(teacher || student) in nats; top1: agreement of the argmax tokens.\n",
        summary_markdown(student_rows(report), _columns(report)),
        f"## Layer CKA (linear, debiased in brackets; {WORST_MARK} marks the worst layers)\n",
        "| layer | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for name, row in zip(report["layers"], rows, strict=True):
        parts.append(f"| {name} | " + " | ".join(f"**{t}** {WORST_MARK}" if w else t for t, w in row) + " |")
    if report.get("lm_eval"):
        labels, lm_rows = lm_eval_rows(report)
        parts += [
            "\n## lm-evaluation-harness (value ± standard error)\n",
            "| task | metric | " + " | ".join(labels) + " |",
            "|---" * (len(labels) + 2) + "|",
        ]
        parts += [f"| {task} | {metric} | " + " | ".join(cells) + " |" for task, metric, cells in lm_rows]
    return "\n".join(parts) + "\n"


def plot_cka(report: Mapping, path: Path) -> Path:
    """CKA per layer, one line per student (linear solid, debiased dotted), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    x = list(range(len(report["layers"])))
    for label, s in report["students"].items():
        (line,) = ax.plot(x, s["linear_cka"], marker="o", ms=3, label=f"{label} (linear)")
        ax.plot(x, s["debiased_cka"], ls=":", color=line.get_color(), label=f"{label} (debiased)")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("CKA vs teacher")
    ax.set_title("Layerwise CKA against the teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(report: Mapping, directory: Path, *, console: Console | None = None) -> dict[str, Path]:
    """Write report.json, report.md and cka.png into ``directory``; print the tables on ``console``."""
    directory = Path(directory)
    paths = {
        "report_json": atomic_write_json(directory / "report.json", report),
        "report_md": atomic_write_text(directory / "report.md", to_markdown(report)),
        "plot": plot_cka(report, directory / "cka.png"),
    }
    if console is not None:
        console.print(layer_table(report))
        console.print(summary_table(student_rows(report), _columns(report), title="summary"))
        if report.get("lm_eval"):
            console.print(lm_eval_table(report))
    return paths
