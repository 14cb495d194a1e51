"""`ckaqad pipeline`: the whole chain (diagnose, distill, diagnose, pack, push dry run) over one run directory."""

from __future__ import annotations

from pathlib import Path

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.cli.options import with_settings
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.pipeline import PipelineConfig


@handle_errors
@with_settings(PipelineConfig)
def pipeline(run: Path = RunOption, cfg: PipelineConfig = None, config: Path = ConfigOption) -> None:
    """Run the whole chain on one run directory and print the comparison table.

    Stages: plan (with --budget-bits: which units stay BF16; every later stage follows it), diagnose of the NVFP4
    PTQ student, distill (CKA-QAD), distill-kl (the KL-only baseline, with
    --baseline), diagnose of the distilled students, pack (with verify), push as a dry run. Stages already done are
    skipped, so an interrupted pipeline continues when run again; a finished stage asked for with other settings is
    refused (--force redoes every stage). Every option of every stage is checked before the first one starts.
    Writes RUN/pipeline/comparison.{json,md} and cka.png.

    Examples:

      ckaqad pipeline --run runs/demo --baseline

      ckaqad pipeline --run runs/planned --budget-bits 5.5 --baseline

      ckaqad pipeline --run runs/qwen3 --teacher Qwen/Qwen3-0.6B --data corpus.jsonl --steps 2000
    """
    from ckaqad_cli.stages.pipeline import run_pipeline  # torch: only once the arguments are good

    run_pipeline(cfg, RunDir(run, on_message=lambda m: console.print(f"[yellow]{m}[/yellow]")), console=console)
