"""Settings of ``ckaqad pipeline``: distill's, diagnose's and pack's own options where the pipeline passes them on."""

from __future__ import annotations

from dataclasses import dataclass

from ckaqad_cli.settings import SettingError, check_at_least, check_choice, check_scheme, same_as, setting
from ckaqad_cli.settings.diagnose import DiagnoseConfig
from ckaqad_cli.settings.distill import DistillConfig
from ckaqad_cli.settings.pack import PackConfig
from ckaqad_cli.settings.plan import BUDGET_SCOPES, SCORES, UPGRADES, PlanConfig, check_budget_range


@dataclass
class PipelineConfig:
    """Options of ``ckaqad pipeline``; None leaves the distill preset for the teacher in force."""

    teacher: str = same_as(DistillConfig, "teacher")
    data: str = same_as(DistillConfig, "data")
    scheme: str = same_as(DistillConfig, "scheme")
    scale_rule: str = same_as(DistillConfig, "scale_rule")
    activation_arithmetic: str = same_as(DistillConfig, "activation_arithmetic")
    baseline: bool = setting(False, "Also run KL-only QAD (lambda 0) on the same budget, for the comparison.")
    budget_bits: float | None = same_as(
        PlanConfig, "budget_bits", default=None,
        help="Run `ckaqad plan` first with this budget (average bits per Linear weight, 4.5 to 16): distill, diagnose "
        "and pack then take the plan's units in BF16 (or FP8, --plan-upgrade). Default: none (uniform NVFP4, no plan "
        "stage). docs/plan.md.",
    )
    plan_upgrade: str = same_as(PlanConfig, "upgrade", help="With --budget-bits: what the plan's units become, bf16 "
                                "or fp8 (packed in the compressed-tensors format only).")
    plan_budget_over: str = same_as(PlanConfig, "budget_over", help="With --budget-bits: what it averages over, "
                                    "linear (every Linear weight) or units (the plan's units only).")
    plan_score: str = same_as(PlanConfig, "score", help="With --budget-bits: the score the plan ranks units by: cka, "
                              "kl or grad.")
    steps: int | None = same_as(DistillConfig, "steps")
    batch_size: int | None = same_as(DistillConfig, "batch_size")
    seq_len: int | None = same_as(DistillConfig, "seq_len")
    lr: float | None = same_as(DistillConfig, "lr")
    lambda_cka: float | None = same_as(DistillConfig, "lambda_cka")
    cka_layers: str | None = same_as(DistillConfig, "cka_layers")
    seed: int = same_as(DistillConfig, "seed", help="Seed of data order, sampling and evaluation problems.")
    diagnose_tokens: int = same_as(DiagnoseConfig, "max_tokens", help="Tokens streamed by each diagnose (and the plan).")
    diagnose_seq_len: int = same_as(DiagnoseConfig, "seq_len", help="Sequence length of diagnose (and the plan).")
    task_problems: int = same_as(DiagnoseConfig, "task_problems", help="Built-in task problems scored per model.")
    format: str = same_as(PackConfig, "format")
    repo_id: str = setting("your-org/ckaqad-nvfp4", "Hub repository named in the dry-run push and the model card.")
    device: str = same_as(DistillConfig, "device")
    dry_run: bool = same_as(DistillConfig, "dry_run", help="Print distill's memory estimate (docs/distributed.md) "
                            "and whether it fits the visible devices; run nothing. Default: off.")
    force: bool = setting(
        False, "Redo every stage, finished or not (needed to change the settings of a finished run)."
    )

    def __post_init__(self) -> None:
        check_scheme(self.scheme)
        if self.budget_bits is not None:
            check_budget_range(self.budget_bits)
        check_choice(self.plan_score, SCORES, "plan_score")
        check_choice(self.plan_upgrade, UPGRADES, "plan_upgrade")
        check_choice(self.plan_budget_over, BUDGET_SCOPES, "plan_budget_over")
        if self.plan_upgrade == "fp8" and self.format != "compressed-tensors":
            raise SettingError("plan_upgrade", f"fp8 units are packed in the compressed-tensors format only, not "
                               f"--format {self.format}")
        check_at_least(self, {"diagnose_tokens": 1, "task_problems": 1, "diagnose_seq_len": 2})
