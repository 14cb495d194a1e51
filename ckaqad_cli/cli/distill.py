"""`ckaqad distill`: CKA-regularized QAD of an NVFP4 fake-quantized student (options -> DistillConfig -> stage)."""

from __future__ import annotations

from pathlib import Path

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.cli.options import with_settings
from ckaqad_cli.rundir import RunDir
from ckaqad_cli.settings.distill import DistillConfig


@handle_errors
@with_settings(DistillConfig)
def distill(run: Path = RunOption, config: Path = ConfigOption, cfg: DistillConfig = None) -> None:
    """Distill the teacher into an NVFP4 fake-quantized student with KL + lambda * (1 - layer CKA).

    Writes distill/metrics.jsonl, distill/checkpoints/step-N/ and distill/student/ (for pack and diagnose).

    Examples:

      ckaqad distill --run runs/demo                      # built-in teacher and data, built-in preset

      ckaqad distill --run runs/q3 --teacher Qwen/Qwen3-4B --data corpus.jsonl --steps 2000

      ckaqad distill --run runs/q3 --resume               # after a crash or Ctrl-C

      torchrun --nproc-per-node 8 -m ckaqad_cli.app distill --run-dir runs/q3 --teacher Qwen/Qwen3-4B --data c.jsonl
    """
    from ckaqad_cli.stages.distill import run_distill  # torch: only once the arguments are good

    rundir = RunDir(run, on_message=lambda msg: console.print(msg, highlight=False))
    summary = run_distill(cfg, rundir, console=console)
    if not summary:  # a non-zero rank under torchrun: rank 0 reports
        return
    from ckaqad_cli.report import FitTable, fmt

    keys = ("eval_kl", "mean_cka", "min_cka")
    rows = [["PTQ (step 0)", *(fmt(summary[f"ptq_{k}"]) for k in keys)]] if "ptq_eval_kl" in summary else []
    rows.append(["student", *(fmt(summary[k]) for k in keys)])
    console.print(FitTable(f"distill ({summary['mode']}, {summary['steps']} steps)",
                           ["", "held-out KL", "mean layer CKA", "min layer CKA"], rows))
    console.print(f"student: {rundir.path / 'distill' / 'student'}", highlight=False)
