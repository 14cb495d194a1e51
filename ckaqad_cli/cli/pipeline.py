"""`ckaqad pipeline`: the whole chain (diagnose, distill, diagnose, pack, push dry run) over one run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.rundir import RunDir


@handle_errors
def pipeline(
    run: Path = RunOption,
    teacher: str = typer.Option("builtin", "--teacher", help="Teacher: 'builtin', a local HF dir or a hub id."),
    data: str = typer.Option("builtin", "--data", help="Text source: 'builtin', a .txt / .jsonl file or a datasets dir."),
    scheme: str = typer.Option("w4a4", "--scheme", help="NVFP4 scheme of the student: w4a4 or w4a16."),
    baseline: bool = typer.Option(
        False, "--baseline", help="Also run KL-only QAD (lambda 0) on the same budget, for the comparison."
    ),
    steps: int = typer.Option(None, "--steps", help="Distill steps (default: the teacher's preset, 300 for builtin)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Distill sequences per step (default: preset)."),
    seq_len: int = typer.Option(None, "--seq-len", help="Distill tokens per sequence (default: preset)."),
    lr: float = typer.Option(None, "--lr", help="Distill learning rate (default: preset, 3e-4 builtin, 1e-5 else)."),
    lambda_cka: float = typer.Option(
        None, "--lambda-cka", help="Fixed CKA weight (default: balanced each step to the KL magnitude)."
    ),
    cka_layers: str = typer.Option(None, "--cka-layers", help="Layers in the CKA term (default: distill's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order, sampling and evaluation problems."),
    diagnose_tokens: int = typer.Option(16384, "--diagnose-tokens", help="Tokens streamed by each diagnose."),
    diagnose_seq_len: int = typer.Option(128, "--diagnose-seq-len", help="Sequence length of diagnose."),
    task_problems: int = typer.Option(256, "--task-problems", help="Built-in task problems scored per model."),
    format: str = typer.Option(
        "compressed-tensors", "--format", help="Packed format: compressed-tensors or modelopt."
    ),
    repo_id: str = typer.Option(
        "your-org/ckaqad-nvfp4", "--repo-id", help="Hub repository named in the dry-run push and the model card."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (CUDA when present)."),
    force: bool = typer.Option(
        False, "--force", help="Redo every stage, finished or not (needed to change the settings of a finished run)."
    ),
    config: Path = ConfigOption,
) -> None:
    """Run the whole chain on one run directory and print the comparison table.

    Stages: diagnose of the NVFP4 PTQ student, distill (CKA-QAD), distill-kl (the KL-only baseline, with
    --baseline), diagnose of the distilled students, pack (with verify), push as a dry run. Stages already done are
    skipped, so an interrupted pipeline continues when run again; a finished stage asked for with other settings is
    refused (--force redoes every stage). Every option of every stage is checked before the first one starts.
    Writes RUN/pipeline/comparison.{json,md} and cka.png.

    Examples:

      ckaqad pipeline --run runs/demo --baseline

      ckaqad pipeline --run runs/qwen3 --teacher Qwen/Qwen3-0.6B --data corpus.jsonl --steps 2000
    """
    from ckaqad_cli.stages.pipeline import PipelineConfig, run_pipeline  # torch: only once the arguments are good

    cfg = PipelineConfig(
        teacher=teacher, data=data, scheme=scheme, baseline=baseline, steps=steps, batch_size=batch_size,
        seq_len=seq_len, lr=lr, lambda_cka=lambda_cka, cka_layers=cka_layers, seed=seed,
        diagnose_tokens=diagnose_tokens, diagnose_seq_len=diagnose_seq_len, task_problems=task_problems,
        format=format, repo_id=repo_id, device=device, force=force,
    )
    run_pipeline(cfg, RunDir(run, on_message=lambda m: console.print(f"[yellow]{m}[/yellow]")), console=console)
