"""Test-wide settings: offline Hub, Triton kernels in interpreter mode on the CPU, stable CLI rendering."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("TERMINAL_WIDTH", "3000")
os.environ.setdefault("_TYPER_FORCE_DISABLE_TERMINAL", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Rich sizes non-terminal output to 80 columns; tests read whole lines, so widen the CLI's stderr console.
from ckaqad_cli.cli.common import console  # noqa: E402

console.width = 3000
