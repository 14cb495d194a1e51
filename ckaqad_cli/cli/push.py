"""`ckaqad push`: upload the run's packed model and its model card to the Hugging Face Hub.

The options are PushConfig's settings (ckaqad_cli/settings/push.py); ``ckaqad pack --push-to-hub`` takes the Hub
options among them (:data:`HUB_OPTIONS`) and the token option declared here.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ckaqad_cli.cli.common import DEFAULT_RUN, RUN_OPTION_NAMES, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.cli.options import with_settings
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.push import PushConfig
from ckaqad_cli.units import format_bytes

TokenOption = typer.Option(
    None,
    "--token",
    help="Hugging Face token with write access (default: HF_TOKEN, then the login stored by `hf auth login`). "
    "Never printed or recorded; prefer HF_TOKEN over this flag, which shows in the shell history.",
)
"""Not a setting: a token is never recorded in run.json."""
HUB_OPTIONS = ("private", "revision", "endpoint", "commit_message")
"""The Hub options of push that ``pack --push-to-hub`` takes too."""


@handle_errors
@with_settings(PushConfig)
def push(
    cfg: PushConfig = None,
    run: Path | None = typer.Option(
        None,
        *RUN_OPTION_NAMES,
        help="Run directory whose packed model, numbers and plot to push, where the push is recorded (default: "
        "runs/default; with --folder, no run unless given). --run-dir is the same option.",
        file_okay=False,
    ),
    folder: Path | None = typer.Option(
        None,
        "--folder",
        help="Packed model directory to push (default: the run's pack output, pack/model).",
        file_okay=False,
    ),
    token: str | None = TokenOption,
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    config: Path = ConfigOption,
) -> None:
    """Upload a packed NVFP4 model and its model card to the Hugging Face Hub, resumably.

    Examples:

      ckaqad push --run runs/qwen3-4b --repo-id my-org/Qwen3-4B-NVFP4-CKA-QAD --private

      ckaqad push --folder out/model --repo-id my-org/model-nvfp4 --revision nvfp4 --dry-run
    """
    from ckaqad_cli.stages.push import push_folder

    rundir = None
    if run is not None or folder is None:  # --folder alone pushes that folder without reading any run
        run = run or DEFAULT_RUN
        rundir = RunDir(run, on_message=lambda m: console.print(m))
        if not rundir.manifest_path.exists():
            if folder is None:
                raise CkaqadError(f"{run} is not a run directory (no run.json): give --run of a packed run, or --folder")
            rundir = None
    result = push_folder(folder, cfg, token=token, run=rundir)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    if cfg.dry_run:
        # the destination as a line above the table, wrapped at spaces: a long repo id as a title would be broken
        console.print(f"would push to {cfg.repo_id}@{cfg.revision} in {result['commits']} commit(s):", highlight=False)
        table = Table()
        table.add_column("file", overflow="fold")
        table.add_column("size", justify="right", overflow="fold")
        for name, size in result["files"].items():
            table.add_row(name, format_bytes(size))
        table.add_row("[bold]total[/bold]", format_bytes(sum(result["files"].values())))
        console.print(table)
        typer.echo(result["card"])
        return
    console.print(
        f"pushed {result['files_uploaded']} file(s) ({result['files_skipped']} already there) to {result['url']} "
        f"at commit {result['commit_oid']}",
        highlight=False,
        soft_wrap=True,
    )
