"""Reports as a log shows them (80 columns, no terminal): no cell cut, every number in full; the perplexity note;
the CKA plot's ticks and legend."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from ckaqad_cli import report as R
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.stages.pipeline import write_comparison


def fake_report(students=("ptq-w4a4", "kl-only", "cka-qad"), layers=5, teacher_ppl=3.7, tasks=True) -> dict:
    out = {"teacher": {"perplexity": teacher_ppl}, "teacher_spec": "org/teacher", "students": {}, "tokens": 512,
           "cka_tokens": 496, "filters": ["padding"],
           "layers": ["embeddings", *(f"layer {i}" for i in range(1, layers))]}
    for k, label in enumerate(students):
        linear = [1.0, *(0.99 - 0.0123456789 * i - 0.001 * k for i in range(1, layers))]
        out["students"][label] = {
            "spec": label, "linear_cka": linear, "debiased_cka": [v - 0.002 for v in linear],
            "mean_cka": sum(linear[1:]) / (layers - 1), "min_cka": min(linear[1:]), "worst_layer": layers - 1,
            "mean_debiased_cka": sum(linear[1:]) / (layers - 1) - 0.002, "kl": 0.123456 + k, "top1": 0.876543,
            "perplexity": teacher_ppl * 1.1,
        }
    if tasks:
        fam = {"arithmetic": 0.87, "program_trace": 0.71, "list_ops": 1.0, "string_ops": 1.0, "brackets": 0.935}
        out["task_accuracy"] = {lb: {"overall": 0.8, "per_family": fam} for lb in ("teacher", *students)}
    return out


def render(*renderables, width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width)  # a file, as stderr redirected to a log: not a terminal
    assert not console.is_terminal
    for r in renderables:
        console.print(r)
    return console.file.getvalue()


def assert_readable(text: str, values) -> None:
    assert "…" not in text and "..." not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    missing = [v for v in values if v not in text]
    assert not missing, (missing, text)


def test_summary_table_fits_80_columns_in_full():
    report = fake_report()
    rows = R.student_rows(report)
    text = render(R.summary_table(rows, R._columns(report), title="summary"))
    cells = [R.fmt(v) for r in rows.values() for v in r.values()]
    assert_readable(text, [*cells, *rows, *R._columns(report)])
    assert "0.1235" in text and "0.12345" not in text  # 4 decimals


@pytest.mark.parametrize("students", [4, 9])
def test_layer_table_fits_80_columns_in_full(students):
    report = fake_report(students=[f"student-{i}" for i in range(students)])
    text = render(R.layer_table(report))
    _, rows = R._layer_rows(report)
    assert_readable(text, [*report["students"], *report["layers"], *(t for row in rows for t, _ in row)])


def test_lm_eval_table_fits_80_columns_in_full():
    report = fake_report(students=[f"model-{i}" for i in range(6)])
    report["lm_eval"] = {lb: {"arc_easy": {"acc,none": {"value": 0.7123456, "stderr": 0.0123}},
                              "hellaswag": {"acc_norm,none": {"value": 0.5, "stderr": None}}}
                         for lb in ["teacher", *report["students"]]}
    text = render(R.lm_eval_table(report))
    labels, rows = R.lm_eval_rows(report)
    assert_readable(text, [*labels, *(c for _, _, cells in rows for c in cells), "acc_norm,none"])


def test_a_cell_wider_than_the_console_folds_instead_of_an_ellipsis():
    long = "x" * 150
    text = render(R.FitTable("t", ["model", "kl"], [[long, "0.1000"]]))
    assert "…" not in text and "".join(line.strip("│ ┃") for line in text.splitlines()).count("x") == 150
    assert max(len(line) for line in text.splitlines()) <= 80


def test_pipeline_comparison_fits_80_columns_in_full(tmp_path):
    run = RunDir(tmp_path)
    report = fake_report()
    with run.stage("diagnose", config={}) as rec:
        (tmp_path / "diagnose" / "report.json").write_text(json.dumps(report))
        rec.outputs["report_json"] = "diagnose/report.json"
    console = Console(file=io.StringIO(), width=80)
    result = write_comparison(run, console)
    cells = [R.fmt(v) for r in result["rows"].values() for v in r.values()]
    assert_readable(console.file.getvalue(), [*cells, *result["rows"], *result["columns"]])


@pytest.mark.parametrize("spec, words", [
    ("builtin", "answers of its task problems"),
    ("org/teacher", "far from what the teacher was trained on"),
])
def test_a_huge_teacher_perplexity_is_explained(tmp_path, spec, words):
    def write(ppl: float) -> tuple[str, str]:
        console = Console(file=io.StringIO(), width=80)
        R.write_report({**fake_report(teacher_ppl=ppl), "teacher_spec": spec}, tmp_path, console=console)
        return console.file.getvalue(), (tmp_path / "report.md").read_text()

    text, md = write(12.5)  # an ordinary perplexity: no note
    assert "note:" not in text and "Note:" not in md
    text, md = write(2.14e6)
    assert "2.14e+06" in text
    assert "note: teacher perplexity 2.14e+06" in " ".join(text.split())  # wrapped at spaces, nothing cut
    assert words in " ".join(text.split()) and words in md and "task accuracy" in md
    assert_readable(text, [words.split()[-1]])


@pytest.mark.parametrize("layers", [5, 37])
def test_cka_plot_has_integer_layer_ticks_and_a_visible_legend_entry_per_student(layers):
    import matplotlib.pyplot as plt

    students = ["ptq-w4a4", "kl-only", "cka-qad"]
    report = fake_report(students=students, layers=layers)
    for s in report["students"].values():  # identical curves: the worst case for lines hiding each other
        s["linear_cka"] = list(report["students"]["cka-qad"]["linear_cka"])
    fig = R.cka_figure(report)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = fig.get_axes()
        for ax in axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        legends = [*fig.legends, *(ax.get_legend() for ax in axes if ax.get_legend())]
        assert len(legends) == 1
        legend = legends[0]
        assert [t.get_text() for t in legend.get_texts()] == students  # one entry per student, no duplicates
        handles = legend.legend_handles
        assert all(h.get_visible() for h in handles)
        styles = {(h.get_marker(), h.get_linestyle(), h.get_color()) for h in handles}
        assert len(styles) == len(students)  # each student told apart by marker, line style and colour
        assert len({h.get_marker() for h in handles}) == len(students)
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in axes)  # never over a line
        for ax in axes:  # the coinciding lines: hollow markers of different sizes, so each ring shows
            lines = ax.get_lines()
            assert len({ln.get_markersize() for ln in lines}) == len(students)
            assert all(ln.get_markerfacecolor() == "none" for ln in lines)
    finally:
        plt.close(fig)


# --- units: the one formatter per unit ---------------------------------------------------------------------------
def test_fmt_floats_none_integers_and_nested_values():
    from ckaqad_cli.units import fmt

    assert [fmt(v) for v in (0.123456, 0.0, 12345.6, 0.000123, float("nan"), None)] == [
        "0.1235", "0.0000", "1.23e+04", "0.000123", "-", "-"]
    assert fmt(None, none="n/a") == "n/a" and fmt(4915200) == "4915200" and fmt(4915200, thousands=True) == "4,915,200"
    assert fmt(True, thousands=True) == "True" and fmt("w4a4") == "w4a4"
    assert fmt({"kl": 0.123456, "verify": {"ok": True, "err": 1e-7}, "files": [1, 0.5]}) == (
        "kl=0.1235, verify=(ok=True, err=1e-07), files=[1, 0.5000]")


def test_format_bytes_decimal_units():
    from ckaqad_cli.units import format_bytes

    assert [format_bytes(n) for n in (0, 999, 1500, 12_345_678, 10**9, 4.2e12)] == [
        "0 B", "999 B", "1.5 KB", "12.3 MB", "1.0 GB", "4.2 TB"]
