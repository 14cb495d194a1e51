"""The one progress display of every long loop: a rich bar on a terminal, a plain-text line now and then elsewhere.

On a terminal, :func:`make_progress` gives a rich bar (description, bar, done/total or bytes, extra fields, elapsed
time, time left). Where the console is not a terminal (stderr redirected to a log file, CI), rich draws nothing, so
the same object prints a plain-text line instead, **every 30 seconds** (``interval``; the environment variable
``CKAQAD_PROGRESS_INTERVAL`` sets another number of seconds, 0 = at every update): the first line 30 s after the task
starts, then at the first update 30 s after the last line, and a last line when a task that has printed one
finishes. A line reads::

    distill: 120/300 (40%), elapsed 0:13:30, ETA 0:20:15, loss 0.31  kl 0.29
    pack model: 1.2 GB/4.0 GB (30%), elapsed 0:01:00, ETA 0:02:20

The ETA is the time left at the mean rate since the task was added (work already done when it was added, a resumed
run's steps, does not count). Lines are printed at updates only: a single step longer than the interval delays its
line to the end of that step.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ckaqad_cli.units import format_bytes

DEFAULT_INTERVAL = 30.0
INTERVAL_ENV = "CKAQAD_PROGRESS_INTERVAL"


def default_interval() -> float:
    """Seconds between two plain-text lines: ``CKAQAD_PROGRESS_INTERVAL`` when it is a number >= 0, else 30."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


@dataclass
class _Plain:
    started: float
    start_completed: float
    next_at: float
    printed: bool = False
    finished: bool = False


class LoggedProgress(Progress):
    """A rich Progress that, when ``plain`` is on, prints a plain-text line every ``interval`` seconds per task."""

    def __init__(self, *columns: str | ProgressColumn, plain: bool, interval: float, label: str = "",
                 unit: Literal["count", "bytes"] = "count", fields: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.plain, self.interval, self.label, self.unit, self.fields = plain, interval, label, unit, tuple(fields)
        self._plain: dict[TaskID, _Plain] = {}

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        task_id = super().add_task(description, start=start, total=total, completed=completed, visible=visible,
                                   **fields)
        now = self.get_time()
        self._plain[task_id] = _Plain(started=now, start_completed=completed, next_at=now + self.interval)
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        state = self._plain.get(task_id)
        if not self.plain or state is None or state.finished:
            return
        with self._lock:
            task = self._tasks[task_id]
        now = self.get_time()
        finished = task.total is not None and task.completed >= task.total
        if now >= state.next_at or (finished and state.printed):
            self.console.print(self.line(task, now), markup=False, highlight=False, soft_wrap=True)
            state.printed, state.next_at, state.finished = True, now + self.interval, finished

    def line(self, task: Task, now: float) -> str:
        """The plain-text progress line of ``task`` at time ``now``."""
        state = self._plain[task.id]
        name = f"{self.label} {task.description}" if self.label else task.description
        show = format_bytes if self.unit == "bytes" else (lambda v: f"{v:g}")
        parts = [f"{show(task.completed)}/{show(task.total)}" if task.total is not None else show(task.completed)]
        if task.total:
            parts[0] += f" ({100 * task.completed / task.total:.0f}%)"
        elapsed = now - state.started
        parts.append(f"elapsed {_duration(elapsed)}")
        rate = (task.completed - state.start_completed) / elapsed if elapsed > 0 else 0.0
        if task.total is not None and task.completed < task.total:
            parts.append(f"ETA {_duration((task.total - task.completed) / rate)}" if rate > 0 else "ETA ?")
        parts += [str(task.fields[f]) for f in self.fields if task.fields.get(f)]
        return f"{name}: " + ", ".join(parts)


def make_progress(
    console: Console,
    *,
    label: str = "",
    unit: Literal["count", "bytes"] = "count",
    fields: Sequence[str] = (),
    transient: bool = False,
    enabled: bool = True,
    interval: float | None = None,
    get_time: Callable[[], float] | None = None,
) -> LoggedProgress:
    """The progress display of a loop: a rich bar when ``console`` is a terminal, else plain-text lines (see the
    module docstring); nothing at all when ``enabled`` is false (a non-zero rank, a nested run).

    ``label`` precedes each task's description (in bold on the bar); ``unit="bytes"`` shows sizes instead of counts;
    ``fields`` names task fields (``add_task(..., terms="")``) shown after the counts. ``interval`` (seconds between
    plain lines; default :func:`default_interval`) and ``get_time`` (default ``time.monotonic``) are for tests.
    """
    head = f"[bold]{label}[/bold] {{task.description}}" if label else "[bold]{task.description}"
    columns: list[str | ProgressColumn] = [
        TextColumn(head), BarColumn(), DownloadColumn() if unit == "bytes" else MofNCompleteColumn(),
        *[TextColumn(f"{{task.fields[{f}]}}") for f in fields], TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    return LoggedProgress(
        *columns, plain=enabled and not console.is_terminal,
        interval=default_interval() if interval is None else interval, label=label, unit=unit, fields=fields,
        console=console, disable=not (enabled and console.is_terminal), transient=transient,
        get_time=get_time or time.monotonic,
    )
