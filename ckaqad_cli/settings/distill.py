"""Settings of ``ckaqad distill``: the options, their defaults and help, the presets, and their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ckaqad_cli.settings import (
    ACTIVATION_ARITHMETIC_HELP,
    BUILTIN,
    BUILTIN_REASONER,
    DATA_HELP,
    FP8_HELP,
    SCALE_RULE_HELP,
    TEACHER_HELP,
    SettingError,
    builtin_data,
    check_at_least,
    check_choice,
    check_not_negative,
    check_positive,
    check_scheme,
    setting,
)
from ckaqad_kernels.nvfp4_spec import (
    ACTIVATION_ARITHMETICS,
    DEFAULT_ACTIVATION_ARITHMETIC,
    DEFAULT_SCALE_RULE,
    SCALE_RULES,
)

# Defaults for real models (NVIDIA's QAD recipe: lr 1e-5, cosine, 5% warmup) and for the small built-in teacher,
# which needs a much larger learning rate to move in a few hundred steps. Options left unset take these.
REAL_MODEL_PRESET = {
    "steps": 1000, "batch_size": 8, "seq_len": 2048, "lr": 1e-5,
    "eval_every": 100, "save_every": 200, "eval_sequences": 32, "cka_layers": "every:4",
}
BUILTIN_PRESET = {
    "steps": 300, "batch_size": 32, "seq_len": 128, "lr": 3e-4,
    "eval_every": 50, "save_every": 100, "eval_sequences": 64, "cka_layers": "all",
}
# The built-in reasoner's texts (prompt and trace) are 60-254 tokens, 152 on average: sequences twice as long, half as
# many, the same tokens a step.
PRESETS = {BUILTIN: BUILTIN_PRESET, BUILTIN_REASONER: {**BUILTIN_PRESET, "batch_size": 16, "seq_len": 256,
                                                         "eval_sequences": 32}}
def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` below 1 is a fraction of the run, 1 or more a whole number of steps, at most ``total_steps``."""
    if warmup < 0:
        raise SettingError("warmup", f"must be >= 0, got {warmup}")
    if warmup < 1:
        return int(round(warmup * total_steps))
    if warmup != int(warmup):
        raise SettingError("warmup", f"{warmup:g}: from 1 up it counts steps, so it must be a whole number "
                           "(below 1 it is a fraction of the run)")
    if warmup > total_steps:
        raise SettingError("warmup", f"{warmup:g} steps is longer than the run (--steps {total_steps}): give at "
                           f"most {total_steps} steps, or a fraction of the run below 1")
    return int(warmup)


def check_rules(scale_rule: str, activation_arithmetic: str) -> None:
    """--scale-rule and --activation-arithmetic (distill's, and diagnose's for its --ptq students)."""
    check_choice(scale_rule, SCALE_RULES, "scale_rule")
    check_choice(activation_arithmetic, ACTIVATION_ARITHMETICS, "activation_arithmetic")


_P = "Default: the built-in preset with a built-in teacher, else the real-model preset (docs/distill.md)."


@dataclass
class DistillConfig:
    """Options of ``ckaqad distill`` (what run.json records); None takes the teacher's preset (:meth:`resolved`)."""

    teacher: str = setting(BUILTIN, TEACHER_HELP)
    data: str = setting(BUILTIN, "Training text: " + DATA_HELP)
    text_field: str = setting("text", "Field of a .jsonl / dataset that holds the text.")
    scheme: str = setting("w4a4", "w4a4 (weights and activations NVFP4) or w4a16 (weights only).")
    exclude: tuple[str, ...] = setting(
        (), "Glob of module names left in high precision, on top of lm_head/embeddings/norms/routers. Repeatable.",
        parse=tuple,
    )
    fp8: tuple[str, ...] = setting((), FP8_HELP, parse=tuple)
    scale_rule: str = setting(DEFAULT_SCALE_RULE, SCALE_RULE_HELP + " The student trains with the scales it is "
                              "packed with.")
    activation_arithmetic: str = setting(DEFAULT_ACTIVATION_ARITHMETIC, ACTIVATION_ARITHMETIC_HELP)
    steps: int | None = setting(None, f"Optimizer steps. Real models 1000, built-in 300. {_P}")
    batch_size: int | None = setting(
        None, f"Sequences per micro-batch over all processes. 8 / built-in 32 (builtin-reasoner 16). {_P}"
    )
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    seq_len: int | None = setting(None, f"Tokens per packed sequence. 2048 / built-in 128 (builtin-reasoner 256). {_P}")
    lr: float | None = setting(None, f"Peak learning rate (AdamW). 1e-5 (NVIDIA's QAD) / built-in 3e-4. {_P}")
    warmup: float = setting(0.05, "Warmup: below 1 a fraction of --steps, else steps.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 = none).")
    grad_checkpointing: bool = setting(
        False, "Activation checkpointing of the student's decoder layers: their activations are recomputed in the "
        "backward pass instead of kept (less memory, one more student forward per step, the same losses). "
        "Default: off."
    )
    seed: int = setting(0, "Seed of data order and CKA token sampling.")
    temperature: float = setting(1.0, "KL temperature T (loss scaled by T^2).")
    kl_topk: int | None = setting(
        None, "KL over the teacher's K most likely tokens only, both distributions renormalized over them (top-k "
        "logit distillation; also the held-out KL). K >= vocabulary = full KL. Default: full vocabulary."
    )
    kl_chunk_tokens: int = setting(1024, "Tokens per KL chunk (bounds logits memory).")
    lambda_cka: float | None = setting(
        None, "Fixed CKA weight lambda; 0 = KL-only QAD (the baseline). Default: balanced (--cka-balance)."
    )
    cka_balance: float = setting(0.5, "Balanced lambda = this factor x KL / CKA-term each step (detached).")
    cka_layers: str | None = setting(
        None, f"Decoder layers of the CKA term: all, every:K, '0,3,5-7' or '2:10:2'. every:4 / built-in all. {_P}"
    )
    cka_tokens: int = setting(
        512, "Token positions per step for the CKA term, spread over the batch's sequences, the same for student "
        "and teacher (never BOS / position 0 or padding)."
    )
    cka_debiased: bool = setting(
        False, "Debiased CKA (unbiased HSIC) in the loss instead of linear CKA; the held-out metric stays linear "
        "CKA. Default: off."
    )
    cka_drop_massive: bool = setting(
        False, "Leave out of the CKA term (and the held-out CKA) every token whose largest teacher activation "
        "exceeds 100 x that layer's median |activation| in a layer used (massive activations). Default: off."
    )
    cka_standardize: bool = setting(
        False, "Divide student and teacher features by the teacher's per-feature std (fitted once on held-out rows) "
        "before CKA in the loss, so a few huge teacher dimensions do not dominate it. Default: off."
    )
    max_tokens: int | None = setting(None, "Cap on the packed training + held-out tokens. Default: all data.")
    eval_every: int | None = setting(None, f"Held-out KL / layer CKA every N steps. 100 / built-in 50. {_P}")
    eval_sequences: int | None = setting(None, f"Held-out sequences. 32 / built-in 64 (builtin-reasoner 32). {_P}")
    eval_batch_size: int | None = setting(None, "Held-out sequences per forward; None = --batch-size.", cli=False)
    eval_tokens: int = setting(2048, "Held-out token positions for the per-layer CKA metric.")
    save_every: int | None = setting(None, f"Checkpoint every N steps. 200 / built-in 100. {_P}")
    keep: int = setting(2, "Checkpoints kept (the latest ones).")
    resume: bool = setting(False, "Continue from the latest complete checkpoint of this run.")
    force: bool = setting(False, "Run again even if distill finished, discarding old checkpoints.")
    device: str = setting("auto", "auto (the GPU when there is one), cpu, cuda or cuda:N.")
    teacher_offload: bool = setting(
        False, "Under torchrun: keep the teacher's FSDP2 shards in CPU memory and copy each layer to the GPU for its "
        "forward (FSDP2 CPUOffloadPolicy), for a teacher that does not fit beside the student. Needs torchrun "
        "(--nproc-per-node 1 for one GPU); a plain single process refuses it. Default: off."
    )
    trust_remote_code: bool = setting(
        False, "Run model code from the teacher's repository (off: only transformers' own architectures)."
    )
    dry_run: bool = setting(
        False, "Print the estimated peak memory per device (weights, gradients and optimizer state sharded by the "
        "world size, activations, CKA statistics, KL chunks), whether it fits the visible devices and what to change; "
        "train nothing. docs/distributed.md. Default: off."
    )

    def resolved(self) -> DistillConfig:
        """A copy with the preset filled in for every option left unset (the built-in preset for the built-in
        teacher), validated."""
        preset = PRESETS.get(self.teacher, REAL_MODEL_PRESET)
        values = {k: (preset[k] if getattr(self, k) is None and k in preset else getattr(self, k))
                  for k in (f.name for f in dataclasses.fields(self))}
        values["data"] = builtin_data(self.data, self.teacher)
        cfg = DistillConfig(**values)
        cfg.exclude, cfg.fp8 = tuple(cfg.exclude), tuple(cfg.fp8)
        if cfg.eval_batch_size is None:
            cfg.eval_batch_size = cfg.batch_size
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """The checks of a resolved config (every preset value filled in)."""
        check_at_least(self, dict.fromkeys(
            ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "eval_sequences",
             "eval_batch_size", "eval_tokens", "keep", "kl_chunk_tokens", "cka_tokens", "kl_topk", "max_tokens"), 1))
        check_positive(self, ("lr", "temperature", "cka_balance"))
        check_not_negative(self, ("lambda_cka", "warmup", "weight_decay", "max_grad_norm"), {
            "warmup": " (a fraction of the run below 1, steps from 1)", "max_grad_norm": " (0 = no clipping)"})
        check_scheme(self.scheme)
        check_rules(self.scale_rule, self.activation_arithmetic)
        warmup_steps(self.warmup, self.steps)  # a whole number of steps, no longer than the run
