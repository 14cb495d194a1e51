"""What every command shares: the stderr console, the --run option, and one-line error handling."""

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
RunOption = typer.Option(
    DEFAULT_RUN,
    "--run",
    help="Run directory shared by all stages (holds run.json and one folder per stage).",
    file_okay=False,
)
