"""Reports: the per-layer CKA table (rich and Markdown), a summary table of students, report.json and the CKA plot.

The summary table is generic (rows = labels, columns = metric names) so later stages can reuse it for their own
comparison of models.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from ckaqad_cli.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ckaqad_cli.settings import BUILTIN_TEACHERS
from ckaqad_cli.units import fmt

WORST_MARK = "▼"
WORST_COUNT = 3  # at most this many layers marked per student (a quarter of the layers on small models)
IDENTICAL = 1 - 1e-4  # a layer at or above this CKA is never marked
HUGE_PERPLEXITY = 1e3  # a teacher perplexity above this gets a note: the text is not what the teacher models
SUMMARY_COLUMNS = ("mean_cka", "min_cka", "worst_layer", "mean_debiased_cka", "kl", "top1", "perplexity")


def _cell_width(markup: str) -> int:
    return max((Text.from_markup(line).cell_len for line in markup.splitlines()), default=0)


class FitTable:
    """A rich table that never cuts a cell, whatever the width (a terminal, or 80 columns in a log file).

    At the console's width it prints as one table when that fits; else transposed (rows and columns swapped, for a
    table with one key column) when that fits; else as several tables of as many columns as fit, each repeating the
    ``keys`` leading key columns. Every column folds rather than ending in an ellipsis, so even a single cell wider
    than the console is printed in full.
    """

    def __init__(self, title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]], *, keys: int = 1,
                 corner: str = "") -> None:
        self.title, self.headers, self.keys, self.corner = title, list(headers), keys, corner
        self.rows = [list(r) for r in rows]

    @staticmethod
    def width(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
        """The printed width of a rich table of these cells (heavy head box, one space of padding each side)."""
        widths = [max([_cell_width(h), *(_cell_width(r[i]) for r in rows)]) for i, h in enumerate(headers)]
        return sum(widths) + 3 * len(widths) + 1

    def _table(self, title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]], keys: int) -> Table:
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i < keys else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        return table

    def _transposed(self) -> tuple[list[str], list[list[str]]]:
        headers = [self.corner, *(r[0] for r in self.rows)]
        return headers, [[h, *(r[i] for r in self.rows)] for i, h in enumerate(self.headers) if i > 0]

    def tables(self, width: int) -> list[Table]:
        """The table(s) to print at ``width`` columns."""
        if self.width(self.headers, self.rows) <= width:
            return [self._table(self.title, self.headers, self.rows, self.keys)]
        if self.keys == 1 and self.rows:
            headers, rows = self._transposed()
            if self.width(headers, rows) <= width:
                return [self._table(self.title, headers, rows, 1)]
        groups: list[list[int]] = [[]]
        for i in range(self.keys, len(self.headers)):
            trial = [*range(self.keys), *groups[-1], i]
            wide = self.width([self.headers[j] for j in trial], [[r[j] for j in trial] for r in self.rows]) > width
            if groups[-1] and wide:
                groups.append([])
            groups[-1].append(i)
        out = []
        for n, group in enumerate(groups):
            cols = [*range(self.keys), *group]
            title = self.title if n == 0 or not self.title else f"{self.title} (continued)"
            out.append(self._table(title, [self.headers[j] for j in cols], [[r[j] for j in cols] for r in self.rows],
                                   self.keys))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.tables(options.max_width)


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


def layer_table(report: Mapping) -> FitTable:
    """Layers as rows, students as columns: linear CKA (debiased in brackets); the worst layers marked."""
    labels, rows = _layer_rows(report)
    cells = [[name, *(f"[red]{t} {WORST_MARK}[/red]" if worst else t for t, worst in row)]
             for name, row in zip(report["layers"], rows, strict=True)]
    return FitTable(f"layer CKA vs teacher: linear (debiased); {WORST_MARK} = worst layers", ["layer", *labels], cells,
                    corner="student")


def summary_table(rows: Mapping[str, Mapping[str, object]], columns: Sequence[str], *, title: str = "") -> FitTable:
    """A generic comparison: one row per label, one column per metric name (missing -> '-'); transposed (metrics as
    rows) where the models-as-rows table is wider than the console."""
    cells = [[label, *(fmt(metrics.get(c)) for c in columns)] for label, metrics in rows.items()]
    return FitTable(title or None, ["model", *columns], cells, corner="metric")


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


def perplexity_note(report: Mapping) -> str | None:
    """A word on a huge teacher perplexity (above HUGE_PERPLEXITY), which otherwise reads as a broken teacher."""
    ppl = report["teacher"].get("perplexity")
    if not isinstance(ppl, (int, float)) or not ppl > HUGE_PERPLEXITY:
        return None
    if report.get("teacher_spec") in BUILTIN_TEACHERS:
        why = ("the built-in teacher learnt only the answers of its task problems, never the randomly drawn prompts "
               "or other text, so its perplexity is huge by design")
    else:
        why = "the text is far from what the teacher was trained on, so perplexity says little about the students"
    return (f"teacher perplexity {fmt(float(ppl))} (above {HUGE_PERPLEXITY:.0f}): {why}; compare the students "
            "by KL, top-1" + (" and task accuracy" if report.get("task_accuracy") else "") + " against the teacher.")


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


def lm_eval_table(report: Mapping) -> FitTable:
    """Tasks and metrics as rows, models as columns: value ± standard error."""
    labels, rows = lm_eval_rows(report)
    return FitTable("lm-evaluation-harness: value ± stderr", ["task", "metric", *labels],
                    [[task, metric, *cells] for task, metric, cells in rows], keys=2)


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
        *([f"Note: {perplexity_note(report)}\n"] if perplexity_note(report) else []),
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


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def cka_figure(report: Mapping):
    """The CKA plot as a matplotlib Figure: linear CKA (left) and debiased CKA (right) per layer, one line per student.

    The students' lines often lie on top of each other (CKA differences in the third decimal), so each student has
    its own colour, marker (hollow, the first student's largest, so that coinciding markers stay visible as rings)
    and line style; the legend, one entry per student, sits below the panels, never over a line. Layer ticks are
    whole numbers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = list(report["students"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), dpi=110, sharey=True)
    x = list(range(len(report["layers"])))
    for k, label in enumerate(labels):
        s = report["students"][label]
        style = dict(marker=MARKERS[k % len(MARKERS)], ms=9 - 4 * k / max(1, len(labels) - 1), mfc="none", mew=1.4,
                     ls=LINESTYLES[k % len(LINESTYLES)], lw=1.4, color=f"C{k % 10}", label=label)
        axes[0].plot(x, s["linear_cka"], **style)
        axes[1].plot(x, s["debiased_cka"], **style)
    for ax, kind in zip(axes, ("linear", "debiased"), strict=True):
        ax.set_title(f"{kind} CKA", fontsize=10)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.3, x[-1] + 0.3 if x else 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CKA vs teacher")
    fig.suptitle("Layerwise CKA against the teacher")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 4), fontsize=9, frameon=False)
    rows = -(-len(names) // 4)
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    return fig


def save_png(fig: Any, path: Path) -> Path:
    """A matplotlib figure (made by a *_figure function, which selects the Agg backend) as a PNG at ``path``,
    written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_files(report: Mapping, directory: Path, markdown: str, plot: tuple[str, Any]) -> dict[str, Path]:
    """report.json, report.md (``markdown``) and the PNG ``plot`` = (file name, figure) in ``directory``."""
    directory = Path(directory)
    return {
        "report_json": atomic_write_json(directory / "report.json", report),
        "report_md": atomic_write_text(directory / "report.md", markdown),
        "plot": save_png(plot[1], directory / plot[0]),
    }


def write_report(report: Mapping, directory: Path, *, console: Console | None = None) -> dict[str, Path]:
    """Write report.json, report.md and cka.png into ``directory``; print the tables on ``console``."""
    paths = write_files(report, directory, to_markdown(report), ("cka.png", cka_figure(report)))
    if console is not None:
        console.print(layer_table(report))
        console.print(summary_table(student_rows(report), _columns(report), title="summary"))
        if note := perplexity_note(report):
            console.print(f"note: {note}", highlight=False, markup=False)
        if report.get("lm_eval"):
            console.print(lm_eval_table(report))
    return paths
