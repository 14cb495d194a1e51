"""`ckaqad push` (not built yet: issue 7)."""

from __future__ import annotations

from pathlib import Path

from ckaqad_cli.cli.common import RunOption, handle_errors
from ckaqad_cli.config import ConfigOption
from ckaqad_cli.errors import CkaqadError


@handle_errors
def push(run: Path = RunOption, config: Path = ConfigOption) -> None:
    """Not built yet (issue 7)."""
    raise CkaqadError("ckaqad push is not built yet (issue 7)")
