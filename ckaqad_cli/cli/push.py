"""`ckaqad push`: upload the run's packed model and its model card to the Hugging Face Hub.

The Hub options are defined once here (``PrivateOption`` ... ``CommitMessageOption``) and reused by
``ckaqad pack --push-to-hub``; :func:`push_config` turns their values into a :class:`PushConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from ckaqad_cli.cli.common import DEFAULT_RUN, RUN_OPTION_NAMES, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.units import format_bytes

if TYPE_CHECKING:  # the stage (huggingface_hub, httpx) is imported when a command runs
    from ckaqad_cli.stages.push import PushConfig

PrivateOption = typer.Option(False, "--private", help="Create the repository as private (default: public).")
RevisionOption = typer.Option(
    "main", "--revision", help="Branch to push to; created from main if missing."
)
EndpointOption = typer.Option(
    None,
    "--endpoint",
    help="Hub endpoint URL (default: HF_ENDPOINT, else https://huggingface.co).",
)
TokenOption = typer.Option(
    None,
    "--token",
    help="Hugging Face token with write access (default: HF_TOKEN, then the login stored by `hf auth login`). "
    "Never printed or recorded; prefer HF_TOKEN over this flag, which shows in the shell history.",
)
CommitMessageOption = typer.Option(
    None,
    "--commit-message",
    help="Commit message (default: names the NVFP4 scheme, the format, the base model and the run).",
)
CardOption = typer.Option(
    "merge",
    "--card",
    help="What to do with an existing README.md in the folder: keep it as is, replace it, or merge (keep its "
    "prose and metadata, refresh ckaqad's sections).",
)
BaseModelOption = typer.Option(
    None,
    "--base-model",
    help="Hub id of the BF16 model this was made from, for the card (default: the run's teacher).",
)


def push_config(
    repo_id: str,
    *,
    private: bool = False,
    revision: str = "main",
    endpoint: str | None = None,
    commit_message: str | None = None,
    card: str = "merge",
    base_model: str | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> PushConfig:
    """The PushConfig for the shared options' values (used by push and by pack --push-to-hub)."""
    from ckaqad_cli.stages.push import PushConfig

    return PushConfig(
        repo_id=repo_id,
        private=private,
        revision=revision,
        endpoint=endpoint,
        commit_message=commit_message,
        card=card,  # type: ignore[arg-type]
        base_model=base_model,
        dry_run=dry_run,
        force=force,
    )


@handle_errors
def push(
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository ORG/NAME to push to (created if missing)."),
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
    private: bool = PrivateOption,
    revision: str = RevisionOption,
    endpoint: str | None = EndpointOption,
    token: str | None = TokenOption,
    commit_message: str | None = CommitMessageOption,
    card: str = CardOption,
    base_model: str | None = BaseModelOption,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List the files and their sizes and print the card; no network (default: off)."
    ),
    force: bool = typer.Option(False, "--force", help="Push again when the run already recorded a push."),
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
    cfg = push_config(
        repo_id,
        private=private,
        revision=revision,
        endpoint=endpoint,
        commit_message=commit_message,
        card=card,
        base_model=base_model,
        dry_run=dry_run,
        force=force,
    )
    result = push_folder(folder, cfg, token=token, run=rundir)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    if dry_run:
        # the destination as a line above the table, wrapped at spaces: a long repo id as a title would be broken
        console.print(f"would push to {repo_id}@{revision} in {result['commits']} commit(s):", highlight=False)
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
