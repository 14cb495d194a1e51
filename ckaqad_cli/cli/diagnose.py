"""`ckaqad diagnose`: layerwise CKA drift of students against their BF16 teacher, beside KL / top-1 / perplexity."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from ckaqad_cli.cli.common import RunOption, console, handle_errors
from ckaqad_cli.cli.config import ConfigOption
from ckaqad_cli.rundir import RunDir

_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_student(value: str) -> tuple[str, str]:
    """"LABEL=PATH" or "PATH" (label = the directory name)."""
    label, sep, spec = value.partition("=")
    if sep and _LABEL.match(label) and not Path(value).exists():
        return label, spec
    return Path(value).name or value, value


@handle_errors
def diagnose(
    teacher: str = typer.Option(
        "builtin", "--teacher",
        help="Teacher: 'builtin', a local HF dir or a hub id.",
    ),
    student: list[str] = typer.Option(
        [], "--student",
        help="A student to compare, LABEL=PATH or PATH (HF dir, packed NVFP4 dir, distilled dir); repeatable.",
    ),
    ptq: list[str] = typer.Option(
        [], "--ptq",
        help="Add the teacher fake-quantized on the fly: w4a4 or w4a16; repeatable.",
    ),
    run_student: bool = typer.Option(
        True, "--run-student/--no-run-student", help="Add the run's distilled student when the run has one."
    ),
    data: str = typer.Option(
        "builtin", "--data",
        help="Text source: 'builtin', a .txt file, a .jsonl file or a saved datasets dir.",
    ),
    split: str = typer.Option(
        "test", "--split",
        help="Split of the built-in data or of a datasets dir.",
    ),
    text_field: str = typer.Option(
        "text", "--text-field",
        help="JSONL field / dataset column holding the text.",
    ),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per packed sequence."),
    max_tokens: int = typer.Option(
        16384, "--max-tokens",
        help="Tokens to stream through the models at most.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    device: str = typer.Option(
        "auto", "--device",
        help="cpu, cuda, cuda:1 or auto (CUDA when present).",
    ),
    dtype: str = typer.Option(
        "auto", "--dtype",
        help="Model dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32.",
    ),
    sequential: bool = typer.Option(
        False, "--sequential", help="Keep models on the CPU and move them to the device in turn (small GPUs)."
    ),
    device_map: str | None = typer.Option(
        None, "--device-map",
        help="'auto': spread each model over the visible GPUs and the CPU with accelerate (not with --sequential).",
    ),
    chunk_batches: int = typer.Option(16, "--chunk-batches", help="Batches per turn with --sequential."),
    drop_first: bool = typer.Option(
        True, "--drop-first/--keep-first",
        help="Drop position 0 and BOS tokens from CKA.",
    ),
    drop_massive: bool = typer.Option(
        False, "--drop-massive",
        help="Drop tokens carrying massive activations from CKA.",
    ),
    massive_ratio: float = typer.Option(
        100.0, "--massive-ratio",
        help="A token is massive above this x the layer's median |activation|.",
    ),
    standardize: bool = typer.Option(
        False, "--standardize",
        help="Scale features by the teacher's per-feature std before CKA.",
    ),
    task_problems: int = typer.Option(
        256, "--task-problems",
        help="Built-in task problems for accuracy (built-in teacher only; 0 = off).",
    ),
    lm_eval_tasks: list[str] = typer.Option(
        [], "--lm-eval-tasks",
        help="lm-evaluation-harness task names, local task .yaml files or multiple-choice .jsonl files "
        "(query/choices/gold); repeatable or comma-separated; needs lm-eval.",
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code",
        help="Allow model code from the model's repo.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the data shuffle and the task problems."),
    force: bool = typer.Option(
        False, "--force",
        help="Run again when the run already has a finished diagnose.",
    ),
    run: Path = RunOption,
    config: Path = ConfigOption,
) -> None:
    """Measure how far each student's hidden-state geometry drifted from the teacher, layer by layer.

    Writes diagnose/report.json, report.md and cka.png in the run directory and prints the tables.

    Examples:

      ckaqad diagnose --ptq w4a4 --ptq w4a16 --run runs/demo

      ckaqad diagnose --teacher Qwen/Qwen3-0.6B --student nvfp4=out/qwen3-nvfp4 --data val.jsonl --max-tokens 65536

      ckaqad diagnose --teacher Qwen/Qwen3-32B --ptq w4a4 --device-map auto --lm-eval-tasks my_tasks/qa.yaml
    """
    from ckaqad_cli.stages.diagnose import DiagnoseConfig, run_diagnose  # torch: only once the arguments are good

    cfg = DiagnoseConfig(
        teacher=teacher, students=[parse_student(s) for s in student], ptq=list(ptq), use_run_student=run_student,
        data=data, split=split, text_field=text_field, seq_len=seq_len, max_tokens=max_tokens,
        batch_size=batch_size, device=device, dtype=dtype, sequential=sequential, device_map=device_map,
        chunk_batches=chunk_batches, drop_first=drop_first, drop_massive=drop_massive, massive_ratio=massive_ratio,
        standardize=standardize,
        task_problems=task_problems, lm_eval_tasks=[t for item in lm_eval_tasks for t in item.split(",") if t],
        trust_remote_code=trust_remote_code, seed=seed, force=force,
    )
    rundir = RunDir(run, on_message=lambda msg: console.print(f"[yellow]{msg}[/yellow]"))
    run_diagnose(cfg, rundir, console=console)
    console.print(f"wrote {run / 'diagnose' / 'report.md'} and cka.png")
