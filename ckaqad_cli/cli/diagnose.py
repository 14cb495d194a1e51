"""`ckaqad diagnose`: layerwise CKA drift of students against their BF16 teacher, beside KL / top-1 / perplexity."""

from __future__ import annotations

from pathlib import Path

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.cli.options import with_settings
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.diagnose import DiagnoseConfig

@handle_errors
@with_settings(DiagnoseConfig, skip=("stage",))
def diagnose(run: Path = RunOption, config: Path = ConfigOption, cfg: DiagnoseConfig = None) -> None:
    """Measure how far each student's hidden-state geometry drifted from the teacher, layer by layer.

    Writes diagnose/report.json, report.md and cka.png in the run directory and prints the tables.

    Examples:

      ckaqad diagnose --ptq w4a4 --ptq w4a16 --run runs/demo

      ckaqad diagnose --teacher Qwen/Qwen3-0.6B --student nvfp4=out/qwen3-nvfp4 --data val.jsonl --max-tokens 65536

      ckaqad diagnose --teacher Qwen/Qwen3-32B --ptq w4a4 --device-map auto --lm-eval-tasks my_tasks/qa.yaml
    """
    from ckaqad_cli.stages.diagnose import run_diagnose  # torch: only once the arguments are good

    rundir = RunDir(run, on_message=lambda msg: console.print(f"[yellow]{msg}[/yellow]"))
    run_diagnose(cfg, rundir, console=console)
    console.print(f"wrote {run / 'diagnose' / 'report.md'} and cka.png")
