"""The one progress builder: a rich bar on a terminal, periodic plain-text lines in a log."""

from __future__ import annotations

import io

from rich.console import Console

from ckaqad_cli.progress import DEFAULT_INTERVAL, INTERVAL_ENV, default_interval, make_progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=80), out  # a file: not a terminal, as stderr redirected to a log


def test_plain_lines_every_interval_when_not_a_terminal():
    console, out = _log_console()
    clock = Clock()
    with make_progress(console, fields=("terms",), interval=30, get_time=clock) as progress:
        task = progress.add_task("distill", total=300, completed=100, terms="")  # resumed at step 100
        for step in range(101, 301):
            clock.now += 1.0  # one second a step
            progress.update(task, completed=step, terms=f"loss {1 / step:.3f}")
    lines = out.getvalue().splitlines()
    # one line each 30 s (steps 130, 160, ..., 280), and the last one when the task ends
    assert [ln.split(":")[1].split("/")[0].strip() for ln in lines] == [str(s) for s in range(130, 300, 30)] + ["300"]
    assert lines[0] == "distill: 130/300 (43%), elapsed 0:00:30, ETA 0:02:50, loss 0.008"
    assert lines[-1].startswith("distill: 300/300 (100%), elapsed 0:03:20") and "ETA" not in lines[-1]
    assert all(len(ln) <= 80 for ln in lines)


def test_bytes_and_label_and_a_short_task_prints_nothing():
    console, out = _log_console()
    clock = Clock()
    with make_progress(console, label="pack", unit="bytes", interval=30, get_time=clock) as progress:
        quick = progress.add_task("small", total=10)
        progress.advance(quick, 10)  # done before the first interval: no line
        task = progress.add_task("model", total=4_000_000_000)
        clock.now += 60
        progress.advance(task, 1_000_000_000)
    assert out.getvalue().splitlines() == ["pack model: 1.0 GB/4.0 GB (25%), elapsed 0:01:00, ETA 0:03:00"]


def test_nothing_when_disabled_and_no_plain_lines_on_a_terminal():
    for console, enabled in ((_log_console()[0], False), (Console(file=io.StringIO(), force_terminal=True), True)):
        clock = Clock()
        with make_progress(console, interval=0, enabled=enabled, get_time=clock) as progress:
            task = progress.add_task("diagnose", total=3)
            for _ in range(3):
                clock.now += 100
                progress.advance(task)
        assert "diagnose: " not in console.file.getvalue()


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "5")
    assert default_interval() == 5.0
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    assert default_interval() == DEFAULT_INTERVAL
    monkeypatch.setenv(INTERVAL_ENV, "0")  # every update
    console, out = _log_console()
    with make_progress(console) as progress:
        task = progress.add_task("diagnose", total=2)
        progress.advance(task)
        progress.advance(task)
    assert [ln.split(",")[0] for ln in out.getvalue().splitlines()] == ["diagnose: 1/2 (50%)", "diagnose: 2/2 (100%)"]
