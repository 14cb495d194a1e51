"""`ckaqad plan`: spend a bit budget on the quantization units that drift most, keep them in BF16 or FP8."""

from __future__ import annotations

from pathlib import Path

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.cli.options import with_settings
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.plan import PlanConfig


@handle_errors
@with_settings(PlanConfig)
def plan(run: Path = RunOption, config: Path = ConfigOption, cfg: PlanConfig = None) -> None:
    """Measure what NVFP4 costs each quantization unit and put the most sensitive ones in BF16 (or FP8, --upgrade fp8)
    within a budget.

    Writes plan/quant_recipe.json (read by distill and pack), report.json, report.md and plan.png in the run
    directory and prints the tables.

    Examples:

      ckaqad plan --run runs/demo --budget-bits 5

      ckaqad plan --run runs/demo --budget-bits 5 --upgrade fp8

      ckaqad plan --teacher Qwen/Qwen3-4B --data calib.jsonl --budget-bits 5.5 --budget-over units --score kl \
        --run runs/qwen3   # 5.5 bits per unit weight, the BF16 head on top
    """
    from ckaqad_cli.stages.plan import run_plan  # torch: only once the arguments are good

    rundir = RunDir(run, on_message=lambda msg: console.print(f"[yellow]{msg}[/yellow]"))
    report = run_plan(cfg, rundir, console=console)
    console.print(f"wrote {run / 'plan' / 'quant_recipe.json'}, report.md and plan.png: {len(report['kept'])} units "
                  f"in {report['upgrade'].upper()}, {report['effective_bits']:.4f} bits per weight")
