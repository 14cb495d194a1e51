"""`ckaqad status`: the stages of a run, their state, key metrics and outputs."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.units import fmt

_STYLE = {"done": "green", "running": "yellow", "failed": "red", "interrupted": "red"}


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _times(started: str | None, ended: str | None) -> str:
    """``started -> ended (duration)``, the end's date left out when it is the start's."""
    if not started:
        return ""
    if not ended:
        return f"since {started}"
    try:
        a, b = datetime.fromisoformat(started), datetime.fromisoformat(ended)
    except (TypeError, ValueError):
        return f"{started} -> {ended}"
    end = ended.split("T", 1)[1] if "T" in ended and a.date() == b.date() else ended
    return f"{started} -> {end} ({_duration((b - a).total_seconds())})"


def _details(entry: dict) -> Text:
    """The second column of a stage: state and times, the error, the metrics, the outputs; one item a line."""
    st = entry.get("status", "?")
    text = Text(st, style=_STYLE.get(st, "white"))
    if times := _times(entry.get("started"), entry.get("ended")):
        text.append(f"  {times}")
    if st in ("failed", "interrupted") and entry.get("error"):
        text.append(f"\nerror: {entry['error']}")
    metrics = entry.get("metrics") or {}
    flat = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    if flat:
        text.append("\n" + fmt(flat))
    for key, value in metrics.items():
        if isinstance(value, dict):
            text.append(f"\n{key}: {fmt(value)}")
    if entry.get("outputs"):
        text.append(f"\noutputs: {fmt(entry['outputs'])}")
    return text


@handle_errors
def status(
    run: Path = RunOption,
    json_output: bool = typer.Option(False, "--json", help="Print the run's stages as JSON on stdout."),
) -> None:
    """Show each stage of a run: state, times, key metrics and outputs.

    A stage recorded as running whose process is gone (killed) shows as interrupted; the next stage command that
    runs in the run directory records it as failed.

    Examples:

      ckaqad status --run runs/qwen3-4b

      ckaqad status --run runs/qwen3-4b --json | jq .stages.pack.outputs
    """
    rundir = RunDir(run)
    if not rundir.manifest_path.exists():
        raise CkaqadError(f"{run} is not a run directory (no run.json); a stage command creates it")
    data = {**rundir.read(), "stages": rundir.shown_stages()}
    if json_output:
        typer.echo(json.dumps(data, indent=2))
        return
    # two columns, the details one item a line and wrapped at spaces: readable at 80 columns (a log file) as well
    table = Table(title=f"run {run}", show_lines=True)
    table.add_column("stage", overflow="fold")
    table.add_column("status, times, key metrics, outputs", overflow="fold")
    for name, entry in data["stages"].items():
        table.add_row(name, _details(entry))
    console.print(table)
