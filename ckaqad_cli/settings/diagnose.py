"""Settings of ``ckaqad diagnose``: the options, their defaults and help, and the checks that need no model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ckaqad_cli.settings import (
    ACTIVATION_ARITHMETIC_HELP,
    BUILTIN,
    CKA_PRECISIONS,
    DATA_HELP,
    MSE_ACT_CALIBRATION_TOKENS,
    SCALE_RULE_HELP,
    TEACHER_HELP,
    builtin_data,
    check_at_least,
    check_choice,
    check_scheme,
    same_as,
    setting,
)
from ckaqad_cli.settings.distill import DistillConfig, check_rules

_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_student(value: str) -> tuple[str, str]:
    """"LABEL=PATH" or "PATH" (label = the directory name)."""
    label, sep, spec = value.partition("=")
    if sep and _LABEL.match(label) and not Path(value).exists():
        return label, spec
    return Path(value).name or value, value


def _students(values: list[str]) -> list[tuple[str, str]]:
    return [parse_student(v) for v in values]


def _comma_separated(values: list[str]) -> list[str]:
    return [item for value in values for item in value.split(",") if item]


@dataclass
class DiagnoseConfig:
    """Options of ``ckaqad diagnose`` (what run.json records)."""

    teacher: str = setting(BUILTIN, TEACHER_HELP)
    students: list[tuple[str, str]] = setting(
        [], "A student to compare, LABEL=PATH or PATH (HF dir, packed NVFP4 dir, distilled dir); repeatable.",
        flags=("--student",), parse=_students, cli_type=list[str],
    )
    ptq: list[str] = setting([], "Add the teacher fake-quantized on the fly: w4a4 or w4a16; repeatable.", parse=list)
    scale_rule: str = same_as(DistillConfig, "scale_rule", help="Scale rule of the --ptq students. " + SCALE_RULE_HELP
                              + f" mse-act calibrates on the first {MSE_ACT_CALIBRATION_TOKENS} tokens of --data.")
    activation_arithmetic: str = same_as(DistillConfig, "activation_arithmetic",
                                         help="Of the --ptq students. " + ACTIVATION_ARITHMETIC_HELP)
    use_run_student: bool = setting(
        True, "Add the run's distilled student when the run has one.", flags=("--run-student/--no-run-student",)
    )
    data: str = setting(BUILTIN, "Text source: " + DATA_HELP)
    split: str = setting("test", "Split of the built-in data or of a datasets dir.")
    text_field: str = setting("text", "JSONL field / dataset column holding the text.")
    seq_len: int = setting(128, "Tokens per packed sequence.")
    max_tokens: int = setting(16384, "Tokens to stream through the models at most.")
    batch_size: int = setting(8, "Sequences per forward pass.")
    device: str = setting("auto", "cpu, cuda, cuda:1 or auto (CUDA when present).")
    dtype: str = setting("auto", "Model dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32.")
    sequential: bool = setting(False, "Keep models on the CPU and move them to the device in turn (small GPUs).")
    device_map: str | None = setting(
        None, "'auto': spread each model over the visible GPUs and the CPU with accelerate (not with --sequential)."
    )
    chunk_batches: int = setting(16, "Batches per turn with --sequential.")
    drop_first: bool = setting(True, "Drop position 0 and BOS tokens from CKA.", flags=("--drop-first/--keep-first",))
    drop_massive: bool = setting(False, "Drop tokens carrying massive activations from CKA.")
    massive_ratio: float = setting(100.0, "A token is massive above this x the layer's median |activation|.")
    standardize: bool = setting(False, "Scale features by the teacher's per-feature std before CKA.")
    task_problems: int = setting(
        256, "Built-in task problems for accuracy, greedy decoding scored by exact match of the final answer (a "
        "built-in teacher only; 0 = off)."
    )
    lm_eval_tasks: list[str] = setting(
        [], "lm-evaluation-harness task names, local task .yaml files or multiple-choice .jsonl files "
        "(query/choices/gold); repeatable or comma-separated; needs lm-eval.", parse=_comma_separated,
    )
    cka_precision: str = setting(
        "auto", "Arithmetic of the streaming CKA statistics: float32, or bf16 (bf16 operands, float32 products on a "
        "GPU; emulated exactly on the CPU; within 1e-6 of float64 CKA, docs/cka.md). auto: bf16 when the models run "
        "in bfloat16, else float32."
    )
    trust_remote_code: bool = setting(False, "Allow model code from the model's repo.")
    seed: int = setting(0, "Seed of the data shuffle and the task problems.")
    force: bool = setting(False, "Run again when the run already has a finished diagnose.")
    stage: str = setting(
        "diagnose", "Name of the stage in run.json and of its folder (the pipeline runs diagnose-ptq first).",
        cli=False,
    )

    def check(self) -> None:
        """The options that need no model, each error naming its option and value; --data builtin becomes the
        built-in teacher's own suite (:func:`builtin_data`)."""
        self.data = builtin_data(self.data, self.teacher)
        check_at_least(self, {"seq_len": 2, "batch_size": 1, "max_tokens": 1, "chunk_batches": 1, "task_problems": 0},
                       {"task_problems": " (0 = no task accuracy)"})
        for scheme in self.ptq:
            check_scheme(scheme, "ptq")
        check_choice(self.cka_precision, ("auto", *CKA_PRECISIONS), "cka_precision")
        check_rules(self.scale_rule, self.activation_arithmetic)
