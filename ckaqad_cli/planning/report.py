"""The plan's report: the unit table and the summary (rich and Markdown), report.json, and plan.png."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rich.console import Console

from ckaqad_cli.report import FitTable, summary_markdown, summary_table, write_files
from ckaqad_cli.units import fmt, format_bytes

SUMMARY_COLUMNS = ("bits", "mean_cka", "min_cka", "kl", "top1", "task_acc")


def upgrade_label(report: Mapping) -> str:
    """What the plan's chosen units become: BF16 or FP8 (reports written before FP8 plans say BF16)."""
    return report.get("upgrade", "bf16").upper()


def unit_columns(report: Mapping) -> tuple[str, ...]:
    return ("unit", "layer", "weights", "NVFP4", upgrade_label(report), "cka", "kl", "grad", "plan")


def _upgraded_bytes(report: Mapping, unit: Mapping) -> int | None:
    return unit.get(f"{report.get('upgrade', 'bf16')}_bytes")


def _unit_cells(report: Mapping, unit: Mapping) -> list[str]:
    layer = "-" if unit["layer"] is None else str(unit["layer"] + 1)
    size = _upgraded_bytes(report, unit)
    return [unit["name"], layer, fmt(unit["weights"], thousands=True), format_bytes(unit["nvfp4_bytes"]),
            "-" if size is None else format_bytes(size), fmt(unit["cka"]), fmt(unit["kl"]), fmt(unit["grad"]),
            upgrade_label(report) if unit["kept"] else "NVFP4"]


def unit_table(report: Mapping) -> FitTable:
    """One row per unit: size in each format, the three scores, and where the plan puts it."""
    title = (f"units (decoder layers from 1); the plan puts {len(report['kept'])} in {upgrade_label(report)} by "
             f"{report['score']}")
    return FitTable(title, unit_columns(report), [_unit_cells(report, u) for u in report["units"]], corner="metric")


def how_to_use(report: Mapping) -> str:
    """The options that train or pack this plan by hand."""
    options = [("--exclude", report["exclude"]), ("--fp8", report.get("fp8", []))]
    return " ".join(f"`{option}` {' '.join(repr(p) for p in globs)}" for option, globs in options if globs)


def summary_rows(report: Mapping) -> dict[str, dict[str, object]]:
    """The teacher, uniform NVFP4 and the plan: effective bits, layer CKA, KL, top-1 and task accuracy."""
    accuracy = report.get("task_accuracy") or {}
    rows: dict[str, dict[str, object]] = {"teacher": {"bits": 16.0, "task_acc": accuracy.get("teacher")}}
    for label, bits in (("uniform", report["uniform_bits"]), ("plan", report["effective_bits"])):
        measured = report["comparison"][label]
        rows[label] = {"bits": bits, **{k: measured[k] for k in ("mean_cka", "min_cka", "kl", "top1")},
                       "task_acc": accuracy.get(label)}
    return rows


def _budget_weight(report: Mapping) -> str:
    if report.get("budget_over", "linear") == "linear":
        return "weight"
    return f"unit weight, with the {sum(report['fixed'].values()):,} weights that stay BF16 whatever the plan on top"


def to_markdown(report: Mapping) -> str:
    parts = [
        "# ckaqad plan\n",
        f"Teacher: `{report['teacher']}`, scheme {report['scheme']}, scale rule "
        f"{report.get('scale_rule', 'amax')}, budget {fmt(report['budget_bits'])} bits per "
        f"{_budget_weight(report)} ({format_bytes(report['budget_bytes'])} of Linear weights); score "
        f"`{report['score']}`. The plan puts "
        f"{len(report['kept'])} of {len(report['units'])} units in {upgrade_label(report)}: "
        f"{fmt(report['effective_bits'])} bits per "
        f"weight ({format_bytes(report['weight_bytes'])}); uniform NVFP4 is {fmt(report['uniform_bits'])}. "
        f"Calibration: {report['tokens']} tokens of `{report['data']}`.\n",
        "## Summary\n",
        "bits: average bits per Linear weight (NVFP4 4.5, FP8 8 and a scale per output channel, BF16 16); mean_cka / "
        "min_cka: linear CKA over the decoder layers; kl: mean per-token KL(teacher || model) in nats; top1: "
        "agreement of the argmax tokens; task_acc: built-in task accuracy.\n",
        summary_markdown(summary_rows(report), SUMMARY_COLUMNS),
        "## Units\n",
        "cka: mean of 1 - CKA at the unit's layer and at the last layer with the unit alone in NVFP4; kl: output KL "
        "with the unit alone in NVFP4; grad: AutoQuantize's Fisher estimate. The plan puts the units of most score "
        f"per byte in {upgrade_label(report)} within the budget.\n",
        "| " + " | ".join(unit_columns(report)) + " |",
        "|---" * len(unit_columns(report)) + "|",
        *("| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(_unit_cells(report, u))) + " |"
          for u in report["units"]),
        "\n## Layer CKA against the teacher\n",
        "| layer | uniform | plan |",
        "|---|---|---|",
        *(f"| {name} | {fmt(u)} | {fmt(p)} |" for name, u, p in zip(
            report["layers"], report["comparison"]["uniform"]["linear_cka"], report["comparison"]["plan"]["linear_cka"],
            strict=True)),
        f"\nTo train or pack this plan: {how_to_use(report) or 'no option (uniform NVFP4)'}.",
    ]
    return "\n".join(parts) + "\n"


def plan_figure(report: Mapping):
    """Left: each unit's score against its bytes in the upgrade, the chosen units filled; right: layer CKA, uniform
    and plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for kept, style in ((False, dict(mfc="none", color="C0", label="NVFP4")),
                        (True, dict(color="C3", label=f"in {upgrade_label(report)}"))):
        units = [u for u in report["units"] if u["kept"] == kept and _upgraded_bytes(report, u) is not None]
        left.plot([_upgraded_bytes(report, u) for u in units], [max(u[report["score"]], 1e-12) for u in units], "o",
                  ms=7, ls="none", **style)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel(f"unit bytes in {upgrade_label(report)}")
    left.set_ylabel(f"{report['score']} score (unit alone in NVFP4)")
    left.set_title(f"units at {fmt(report['budget_bits'])} bits", fontsize=10)
    left.legend(fontsize=9, frameon=False)
    x = list(range(len(report["layers"])))
    for k, label in enumerate(("uniform", "plan")):
        right.plot(x, report["comparison"][label]["linear_cka"], marker="os"[k], mfc="none", ls="-:"[k],
                   color=f"C{k}", label=f"{label} ({fmt(report['uniform_bits' if k == 0 else 'effective_bits'])} bits)")
    right.set_xlabel("layer (0 = embeddings)")
    right.set_ylabel("linear CKA vs teacher")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_title("layer CKA", fontsize=10)
    right.legend(fontsize=9, frameon=False)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_plan_report(report: Mapping, directory: Path, *, console: Console | None = None) -> dict[str, Path]:
    """Write report.json, report.md and plan.png into ``directory``; print the tables on ``console``."""
    paths = write_files(report, directory, to_markdown(report), ("plan.png", plan_figure(report)))
    if console is not None:
        console.print(unit_table(report))
        console.print(summary_table(summary_rows(report), SUMMARY_COLUMNS, title="uniform NVFP4 against the plan"))
    return paths
