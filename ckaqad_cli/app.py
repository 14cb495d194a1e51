"""The ``ckaqad`` command: one thin Typer command per stage, registered from ``ckaqad_cli.cli``.

Nothing heavy is imported here or in ``ckaqad_cli.cli``: --help and argument errors answer before torch,
transformers or a stage is loaded (each command imports its stage when it runs).
"""

from __future__ import annotations

import os
import sys

import typer

from ckaqad_cli import __version__
from ckaqad_cli.cli import common
from ckaqad_cli.cli.diagnose import diagnose
from ckaqad_cli.cli.distill import distill
from ckaqad_cli.cli.pack import pack
from ckaqad_cli.cli.pipeline import pipeline
from ckaqad_cli.cli.plan import plan
from ckaqad_cli.cli.push import push
from ckaqad_cli.cli.status import status

app = typer.Typer(
    name="ckaqad",
    help=(
        "CKA-QAD: distill a BF16 LLM into a deployable NVFP4 model without losing its internal geometry.\n\n"
        "Stages chain over one run directory (--run DIR): diagnose -> distill -> pack -> push; `pipeline` runs them "
        "all.\n\n"
        "Examples: ckaqad pipeline --run runs/demo --baseline;  "
        "ckaqad distill --run runs/demo && ckaqad pack --run runs/demo && ckaqad status --run runs/demo"
    ),
    no_args_is_help=True,
    cls=common.Group,  # usage errors: one line, exit 1
    add_completion=False,
    pretty_exceptions_enable=False,  # never print locals: they can hold tokens
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckaqad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    common.state.debug = debug


for _command in (diagnose, plan, distill, pack, push, pipeline, status):
    app.command(cls=common.Command)(_command)


def main() -> None:
    if not sys.stderr.isatty():  # a log file: our progress prints plain lines; transformers' and the Hub's bars would
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # print a bar line per update
    app()


if __name__ == "__main__":
    main()
