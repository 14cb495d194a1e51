"""What every command shares: the stderr console, the --run option, one-line errors, and the help layout.

Kept light on purpose: ``ckaqad CMD --help`` and argument errors are answered from this module, ``app`` and the
``cli`` modules alone; torch, transformers and the stages are imported inside the command functions, after the
arguments are parsed.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from ckaqad_cli.errors import CkaqadError

# Progress bars, tables and messages go to stderr so that stdout stays clean for --json output.
console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class _State:
    debug = False


state = _State()


def debug_enabled() -> bool:
    return state.debug or os.environ.get("CKAQAD_DEBUG", "") not in ("", "0")


def handle_errors(fn: F) -> F:
    """Turn exceptions into one line on stderr and exit code 1; ``--debug`` (or CKAQAD_DEBUG=1) re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except CkaqadError as e:
            if debug_enabled():
                traceback.print_exc(file=sys.stderr)
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as e:  # an unexpected failure: still one line unless --debug
            if debug_enabled():
                traceback.print_exc(file=sys.stderr)
            else:
                console.print(
                    f"[red]error:[/red] {type(e).__name__}: {e} (run with --debug for the traceback)",
                    highlight=False,
                    soft_wrap=True,
                )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


DEFAULT_RUN = Path("runs/default")
# --run-dir: the same option under a name that torchrun's parser leaves alone (it takes `--run` and `--run=X` for an
# abbreviation of its own --run-path, even after the script), see docs/distributed.md.
RUN_OPTION_NAMES = ("--run", "--run-dir")
RunOption = typer.Option(
    DEFAULT_RUN,
    *RUN_OPTION_NAMES,
    help="Run directory shared by all stages (holds run.json and one folder per stage). --run-dir is the same "
    "option: use it under torchrun, which takes --run for its own --run-path.",
    file_okay=False,
)

# typer.BadParameter is a click (or typer's vendored click) exception: find the base class through it, whichever.
ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def print_usage_error(e: Exception, prog: str = "ckaqad") -> None:
    """One line on stderr for a click usage error (unknown option, bad value, missing argument), with a hint."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else prog
    message = " ".join(e.format_message().split())  # type: ignore[attr-defined]
    console.print(f"[red]error:[/red] {escape(message)} (see '{where} --help')", highlight=False, soft_wrap=True)


def _tidy_help(params: list[Any]) -> None:
    """Help layout: a flag shows no value placeholder (typer prints `<bool>`), and a flag that is off by default
    shows no `[default: no-X]` (its help may say "Default: off"). Every other literal default is shown once, by
    typer's `[default: X]`, so help texts say "Default: ..." only where the default is computed (None)."""
    for param in params:
        if getattr(param, "is_flag", False):
            if param.metavar is None:
                param.metavar = ""
            if param.default is False:
                param.show_default = False


def _with_context(parse_args: Callable[..., Any], ctx: Any, args: list[str]) -> Any:
    """Parse, tagging a usage error with the command it is about (click's parser raises some without a context)."""
    try:
        return parse_args(ctx, args)
    except ClickException as e:
        if getattr(e, "ctx", False) is None:
            e.ctx = ctx  # type: ignore[attr-defined]
        raise


class _TidyHelp:
    """The help layout of :func:`_tidy_help`, and usage errors tagged with their command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_help(self.params)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return _with_context(super().parse_args, ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _tidy_help(self.get_params(ctx))
        return super().format_help(ctx, formatter)


class Command(_TidyHelp, TyperCommand):
    """Every subcommand."""


class Group(_TidyHelp, TyperGroup):
    """The ``ckaqad`` group: usage errors of any subcommand print one line and exit 1, as the CkaqadErrors do."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `ckaqad`: the help (and click's exit code 2)
                typer.echo(e.ctx.get_help())  # type: ignore[attr-defined]
                sys.exit(e.exit_code)  # type: ignore[attr-defined]
            print_usage_error(e, prog_name or "ckaqad")
            sys.exit(1)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
