"""`ckaqad pack`: write the distilled student (or any local HF model) as a real NVFP4 checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.cli.options import with_settings
from ckaqad_cli.cli.push import HUB_OPTIONS, TokenOption
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.pack import PackConfig
from ckaqad_cli.settings.push import PushConfig


@handle_errors
@with_settings(PackConfig)
@with_settings(PushConfig, into="hub", only=HUB_OPTIONS, build=False)
def pack(
    run: Path = RunOption,
    config: Path = ConfigOption,
    cfg: PackConfig = None,
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", help="Then push the output to this ORG/NAME repo. Default: no push."
    ),
    hub: dict = None,
    token: str | None = TokenOption,
) -> None:
    """Write an NVFP4 checkpoint (compressed-tensors or ModelOpt) that vLLM, TensorRT-LLM and transformers load.

    Tensors are streamed one at a time (bounded memory); the output appears only when complete.

    Examples:

      ckaqad pack --run runs/qwen3-4b

      ckaqad pack --model ./Llama-3.2-1B --out ./llama-nvfp4 --scheme w4a16 --format modelopt
    """
    # the stages (torch, huggingface_hub) only once the arguments are good
    from ckaqad_cli.stages.pack import run_pack, summary_rows

    push_cfg = None
    if push_to_hub:  # check the Hub options now, not after a long pack (huggingface_hub only then)
        from ckaqad_cli.stages.push import check_repo_id, push_folder, resolve_endpoint, resolve_token

        push_cfg = PushConfig(repo_id=push_to_hub, force=cfg.force, **hub)
        check_repo_id(push_cfg.repo_id)
        resolve_endpoint(push_cfg.endpoint)
        token = resolve_token(token)
    rundir = RunDir(run, on_message=lambda msg: console.print(f"[yellow]{msg}[/yellow]"))
    result = run_pack(cfg, rundir)
    # the output path as a line above the table, wrapped at spaces: a long path as a title would be broken
    console.print(f"pack -> {result.out} ({result.format}, {result.scheme})", highlight=False)
    table = Table(show_header=False)
    table.add_column("", overflow="fold")  # fold, never an ellipsis: readable at 80 columns in a log
    table.add_column("", overflow="fold")
    for label, value in summary_rows(result.summary):
        table.add_row(label, value)
    console.print(table)
    if push_cfg is not None:
        try:
            pushed = push_folder(result.out, push_cfg, token=token, run=rundir)
        except CkaqadError as e:
            retry = f"ckaqad push --run {run} --repo-id {push_to_hub}"
            retry += (f" --revision {push_cfg.revision}" if push_cfg.revision != "main" else "") + (
                f" --endpoint {push_cfg.endpoint}" if push_cfg.endpoint else ""
            )
            raise CkaqadError(f"packed {result.out}, but the push failed: {e}. Retry only the push: {retry}") from None
        console.print(f"pushed to {pushed['url']} (commit {pushed['commit_oid']})")
