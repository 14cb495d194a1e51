"""`ckaqad distill` (not built yet: issue 6)."""

from __future__ import annotations

from pathlib import Path

from ckaqad_cli.cli.common import RunOption, handle_errors
from ckaqad_cli.config import ConfigOption
from ckaqad_cli.errors import CkaqadError


@handle_errors
def distill(run: Path = RunOption, config: Path = ConfigOption) -> None:
    """Not built yet (issue 6)."""
    raise CkaqadError("ckaqad distill is not built yet (issue 6)")
