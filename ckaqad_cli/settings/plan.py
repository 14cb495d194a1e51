"""Settings of ``ckaqad plan``: the options, their defaults and help, and the checks that need no model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ckaqad_cli.settings import (
    ACTIVATION_ARITHMETIC_HELP,
    REQUIRED,
    SCALE_RULE_HELP,
    SettingError,
    builtin_data,
    check_at_least,
    check_choice,
    check_scheme,
    same_as,
    setting,
)
from ckaqad_cli.settings.diagnose import DiagnoseConfig
from ckaqad_cli.settings.distill import DistillConfig, check_rules

SCORES = ("cka", "kl", "grad")
"""Sensitivity scores the chooser can rank units by (docs/plan.md)."""
DEFAULT_SCORE = "cka"
NVFP4_BITS = 4.5
"""Bits per NVFP4 weight: a 4-bit E2M1 code plus one 8-bit E4M3 scale per block of 16."""
BF16_BITS = 16
"""Bits per weight kept in BF16."""
UPGRADES = ("bf16", "fp8")
"""What a plan's chosen units become (planning.units.UPGRADES; declared here, where no model is needed)."""
BUDGET_SCOPES = ("linear", "units")
"""What --budget-bits averages over (planning.budget.budget_bytes)."""


@dataclass
class PlanConfig:
    """Options of ``ckaqad plan`` (what run.json records)."""

    budget_bits: float = setting(
        REQUIRED, "Average bits per weight of the model's Linear layers (NVFP4 counts 4.5, BF16 16; the output head "
        "and other modules that stay BF16 count too, unless --budget-over units), between 4.5 and 16."
    )
    budget_over: str = setting(
        "linear", "What --budget-bits averages over: linear (every Linear weight, the output head and --exclude'd "
        "modules at 16 bits included, as ModelOpt's AutoQuantize counts) or units (the weights a plan chooses for, "
        "those others' 16 bits on top: bits per quantizable weight). The report's bits count every Linear weight."
    )
    score: str = setting(
        DEFAULT_SCORE, "Sensitivity the chooser ranks units by: cka (drift of the unit's layer and the last layer), kl "
        "(output KL) or grad (AutoQuantize's Fisher estimate)."
    )
    upgrade: str = setting(
        "bf16", "What the chosen units become instead of NVFP4: bf16 (kept unquantized, 16 bits) or fp8 (FP8 E4M3 "
        "weights with a scale per output channel, inputs per token in w4a4: 8 bits and the scales; vLLM loads it "
        "beside NVFP4 in compressed-tensors checkpoints, docs/fp8.md). MoE experts take bf16 only."
    )
    teacher: str = same_as(DiagnoseConfig, "teacher")
    scheme: str = setting("w4a4", "NVFP4 scheme the units are measured in: w4a4 or w4a16.")
    scale_rule: str = same_as(DistillConfig, "scale_rule", help="Scale rule the units are measured with (use the one "
                              "distill and pack will use). " + SCALE_RULE_HELP)
    activation_arithmetic: str = same_as(DistillConfig, "activation_arithmetic",
                                         help="Of the measured W4A4 units. " + ACTIVATION_ARITHMETIC_HELP)
    exclude: list[str] = setting(
        [], "Extra fnmatch globs of modules to keep in BF16 whatever the plan (they count in the budget); repeatable.",
        parse=list,
    )
    data: str = same_as(DiagnoseConfig, "data")
    split: str = same_as(DiagnoseConfig, "split", default="train")
    text_field: str = same_as(DiagnoseConfig, "text_field")
    seq_len: int = same_as(DiagnoseConfig, "seq_len")
    max_tokens: int = setting(8192, "Calibration tokens streamed through the model for each unit.")
    batch_size: int = same_as(DiagnoseConfig, "batch_size")
    device: str = same_as(DiagnoseConfig, "device")
    dtype: str = same_as(DiagnoseConfig, "dtype")
    task_problems: int = same_as(DiagnoseConfig, "task_problems")
    trust_remote_code: bool = same_as(DiagnoseConfig, "trust_remote_code")
    seed: int = same_as(DiagnoseConfig, "seed")
    force: bool = setting(False, "Run again when the run already has a finished plan.")

    def check(self) -> None:
        """The options that need no model, each error naming its option and value; --data builtin becomes the
        built-in teacher's own suite (:func:`builtin_data`)."""
        self.data = builtin_data(self.data, self.teacher)
        check_budget_range(self.budget_bits)
        check_choice(self.score, SCORES, "score")
        check_choice(self.upgrade, UPGRADES, "upgrade")
        check_choice(self.budget_over, BUDGET_SCOPES, "budget_over")
        check_scheme(self.scheme)
        check_rules(self.scale_rule, self.activation_arithmetic)
        check_at_least(self, {"seq_len": 2, "batch_size": 1, "max_tokens": 1, "task_problems": 0},
                       {"task_problems": " (0 = no task accuracy)"})


def check_budget_range(bits: float) -> None:
    """One line for a budget that no model can meet: not a number, below NVFP4's 4.5 bits or above BF16's 16."""
    if not math.isfinite(bits) or not NVFP4_BITS <= bits <= BF16_BITS:
        raise SettingError("budget_bits", f"must be a number from {NVFP4_BITS:g} (every weight NVFP4) to "
                           f"{BF16_BITS} (every weight BF16), got {bits:g}")
