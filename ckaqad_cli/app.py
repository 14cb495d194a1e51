"""The ``ckaqad`` command: one thin Typer command per stage, registered from ``ckaqad_cli.cli``."""

from __future__ import annotations

import typer

from ckaqad_cli import __version__
from ckaqad_cli.cli import common
from ckaqad_cli.cli.diagnose import diagnose
from ckaqad_cli.cli.distill import distill
from ckaqad_cli.cli.pack import pack
from ckaqad_cli.cli.pipeline import pipeline
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


app.command()(diagnose)
app.command()(distill)
app.command()(pack)
app.command()(push)
app.command()(pipeline)
app.command()(status)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
