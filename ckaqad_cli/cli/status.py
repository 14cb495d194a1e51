"""`ckaqad status`: the stages of a run, their state, key metrics and outputs."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir

_STYLE = {"done": "green", "running": "yellow", "failed": "red", "interrupted": "red"}


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


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
    table = Table(title=f"run {run}")
    for col in ("stage", "status", "started", "ended", "key metrics", "outputs"):
        table.add_column(col, overflow="fold")
    for name, entry in data["stages"].items():
        st = entry.get("status", "?")
        shown = f"[{_STYLE.get(st, 'white')}]{st}[/]"
        if st in ("failed", "interrupted") and entry.get("error"):
            shown += f"\n{entry['error']}"
        table.add_row(
            name,
            shown,
            str(entry.get("started") or ""),
            str(entry.get("ended") or ""),
            _fmt(entry.get("metrics") or {}),
            _fmt(entry.get("outputs") or {}),
        )
    console.print(table)
