"""The distill stage: CKA-regularized quantization-aware distillation of an NVFP4 fake-quantized student.

Student = a copy of the teacher with NVFP4 fake quantization (``models.ptq_student``), trained in float32 master
weights against the frozen teacher with ``KL + lambda * mean(1 - CKA)`` (see :mod:`ckaqad_cli.objective`).
Writes ``distill/metrics.jsonl``, ``distill/checkpoints/step-N/`` and the final ``distill/student/`` HF directory;
the loop itself is :class:`ckaqad_cli.trainer.Trainer`.
Runs in one process or under torchrun (FSDP2); see docs/distill.md and docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ckaqad_cli import distributed as D
from ckaqad_cli.atomic import atomic_directory
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.models import check_spec, resolve_spec
from ckaqad_cli.objective import CausalLMBody, TeacherMemo, parse_layers
from ckaqad_cli.planning.recipe import exclude_or_plan
from ckaqad_cli.quant_calibration import fit_channel_weights, save_second_moments
from ckaqad_cli.records import DistillRecord
from ckaqad_cli.rundir import RunDir, describe_input
from ckaqad_cli.safetensors_write import ensure_writable
from ckaqad_cli.settings import MSE_ACT_CALIBRATION_TOKENS, SettingError
from ckaqad_cli.settings.distill import DistillConfig
from ckaqad_cli.trainer import Models, Trainer

STAGE = "distill"

# Fields that must match when a run is resumed (the others, like --steps or --eval-every, may change).
_RESUME_MUST_MATCH = (
    "teacher", "data", "text_field", "scheme", "scale_rule", "activation_arithmetic", "exclude", "batch_size",
    "grad_accum", "seq_len", "lr", "seed", "warmup", "weight_decay", "temperature", "kl_topk", "lambda_cka", "cka_balance", "cka_layers", "cka_tokens",
    "cka_debiased", "cka_drop_massive", "cka_standardize", "max_tokens", "eval_sequences", "max_grad_norm",
    "eval_tokens",
)


def split_heldout(sequences: torch.Tensor, eval_sequences: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last ``eval_sequences`` packed rows (a multiple of the world size) are held out."""
    n_eval = (min(eval_sequences, sequences.shape[0] // 4) // world_size) * world_size
    if n_eval < world_size or sequences.shape[0] - n_eval < 1:
        raise CkaqadError(
            f"the data give only {sequences.shape[0]} sequences of the chosen --seq-len: too few for training and "
            "a held-out slice; use more data or a shorter --seq-len"
        )
    return sequences[:-n_eval], sequences[-n_eval:]


def build_models(cfg: DistillConfig, ctx: D.DistContext) -> Models:
    """Load the teacher (bf16 on GPU, float32 on the CPU) and make the fake-quantized float32 student from it."""
    from ckaqad_cli.models import load_model, ptq_student

    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    load_device = "cpu" if ctx.distributed else ctx.device  # FSDP moves each shard to its device
    teacher, tokenizer = load_model(cfg.teacher, device=load_device, dtype=dtype,
                                    trust_remote_code=cfg.trust_remote_code)
    student, recipe = ptq_student(teacher, cfg.scheme, exclude=cfg.exclude, fp8=cfg.fp8, dtype=torch.float32,
                                  scale_rule=cfg.scale_rule, activation_arithmetic=cfg.activation_arithmetic)
    student.requires_grad_(True)
    student.train()
    return Models(student=student, teacher=teacher, tokenizer=tokenizer, recipe=recipe)


def check_models(cfg: DistillConfig, models: Models) -> None:
    """The options that depend on the teacher, checked before the stage is recorded as started."""
    from ckaqad_cli.models import decoder_layers, max_positions

    limit = max_positions(models.teacher)
    if limit is not None and cfg.seq_len > limit:
        raise CkaqadError(f"--seq-len {cfg.seq_len} is over the teacher's limit of {limit} positions")
    parse_layers(cfg.cka_layers, len(decoder_layers(models.teacher)))


def read_texts(cfg: DistillConfig) -> list[str]:
    """The training texts of ``--data``, read before any model loads (a bad source fails at once)."""
    from ckaqad_cli.data import load_texts

    return load_texts(cfg.data, split="train", seed=cfg.seed, text_field=cfg.text_field)


def load_sequences(cfg: DistillConfig, tokenizer, texts: list[str] | None = None) -> torch.Tensor:
    from ckaqad_cli.data import pack_sequences

    if texts is None:
        texts = read_texts(cfg)
    return pack_sequences(texts, tokenizer, cfg.seq_len, max_tokens=cfg.max_tokens, seed=cfg.seed)


def train(
    cfg: DistillConfig,
    models: Models,
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor,
    out_dir: Path,
    ctx: D.DistContext,
    *,
    console: Console | None = None,
    on_step: Callable[[int], None] | None = None,
    on_save: Callable[[Path], None] | None = None,
    show_progress: bool = True,
    teacher_memo: TeacherMemo | None = None,
) -> dict[str, Any]:
    """The training loop; ``cfg`` must be resolved. Returns the summary metrics; writes under ``out_dir``.

    :class:`~ckaqad_cli.trainer.Trainer` sets the run up (or resumes it) and runs its steps, evaluations and
    checkpoints; the final student is saved here. ``on_step(step)`` runs after every step, ``on_save(checkpoint)``
    after every checkpoint is complete.
    """
    out_dir = Path(out_dir)
    fingerprint = {k: _jsonable(getattr(cfg, k)) for k in _RESUME_MUST_MATCH}
    trainer = Trainer.setup(cfg, models, train_ids, eval_ids, out_dir, ctx, fingerprint=fingerprint,
                            console=console or Console(stderr=True), on_save=on_save, teacher_memo=teacher_memo)
    summary = trainer.fit(on_step=on_step, show_progress=show_progress)
    _save_student(trainer.student, models, out_dir / "student", ctx)
    return summary


def _save_student(student: CausalLMBody, models: Models, target: Path, ctx: D.DistContext) -> None:
    """The final student as a HF directory: float32 master weights, tokenizer, quant_recipe.json."""
    state = D.full_model_state(student, ctx)
    if ctx.is_main:
        state = {k.removeprefix("model."): v for k, v in state.items()}
        model = models.student
        model.config.dtype = torch.float32
        with atomic_directory(target, overwrite=True) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            models.tokenizer.save_pretrained(tmp)
            models.recipe.save(tmp)
            if models.second_moments is not None:
                save_second_moments(tmp, models.second_moments)
    D.barrier(ctx)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def memory_estimate(cfg: DistillConfig, device: torch.device, world_size: int) -> dict[str, Any]:
    """``--dry-run``: the estimated peak memory per device of ``cfg`` (resolved) on ``world_size`` processes, as
    {"estimate", "fits", "what_to_change", "table", "verdict"}; loads the teacher's config, not its weights."""
    from transformers import AutoConfig

    from ckaqad_cli import memory
    source = resolve_spec(cfg.teacher)
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    sizes = memory.model_sizes(config, cfg.scheme, exclude=cfg.exclude, device_type=device.type, name=cfg.teacher)
    settings = memory.Settings.of(cfg, len(parse_layers(cfg.cka_layers, config.num_hidden_layers)))
    est = memory.estimate(sizes, settings, world_size=world_size, device_type=device.type)
    devices = memory.device_memory(device.type)
    return {"estimate": dataclasses.asdict(est), "fits": memory.fits(est, devices),
            "what_to_change": memory.what_to_change(sizes, est, devices), "table": memory.table(est, devices),
            "verdict": memory.verdict(sizes, est, devices)}


def check_launch(cfg: DistillConfig) -> None:
    """The settings that depend on how the process was started."""
    if cfg.teacher_offload and not D.launched_by_torchrun():
        raise SettingError(
            "teacher_offload", "streams the teacher with FSDP2, which needs torchrun: launch with "
            "`torchrun --nproc-per-node N -m ckaqad_cli.app distill ...` (N = 1 is fine)"
        )


def run_distill(
    cfg: DistillConfig,
    run: RunDir,
    *,
    console: Console | None = None,
    on_step: Callable[[int], None] | None = None,
    show_progress: bool = True,
    stage: str = STAGE,
    teacher_memo: TeacherMemo | None = None,
) -> dict[str, Any]:
    """Run the stage in ``run`` (one process, or every rank under torchrun); returns the summary metrics.

    ``stage`` names the record in run.json and the folder (the pipeline's KL-only baseline is "distill-kl", which
    reads the teacher's outputs from the CKA-QAD run's ``teacher_memo``).
    """
    console = console or Console(stderr=True)
    check_launch(cfg)
    ctx = D.setup(cfg.device)
    finished = False
    try:
        summary = _distill(cfg, run, ctx, console=console, on_step=on_step, show_progress=show_progress,
                           stage=stage, teacher_memo=teacher_memo)
        finished = True  # _distill's models are released by now: the process group is left with nothing using it
        return summary
    finally:
        D.teardown(ctx, finished=finished)


def _distill(
    cfg: DistillConfig,
    run: RunDir,
    ctx: D.DistContext,
    *,
    console: Console,
    on_step: Callable[[int], None] | None,
    show_progress: bool,
    stage: str,
    teacher_memo: TeacherMemo | None,
) -> dict[str, Any]:
    """:func:`run_distill` inside the process group."""
    cfg = cfg.resolved()
    selection = exclude_or_plan(cfg.exclude, run, cfg.fp8)
    if selection.planned:
        cfg.exclude, cfg.fp8 = tuple(selection.exclude), tuple(selection.fp8)
        if ctx.is_main:
            console.print(f"the run's plan keeps {len(cfg.exclude)} module pattern(s) in BF16 and puts "
                          f"{len(cfg.fp8)} in FP8 (plan/quant_recipe.json)")
    if cfg.dry_run:  # nothing loads but the teacher's config, nothing is written
        estimate = memory_estimate(cfg, ctx.device, ctx.world_size)
        if ctx.is_main:
            console.print(estimate["table"])
            console.print(estimate["verdict"], highlight=False)
        return {}
    entry = run.stage_entry(stage)
    if entry and entry.get("status") == "done" and not cfg.force:
        raise CkaqadError(f"stage {stage} already finished in {run.path}; pass --force to run it again")
    check_spec(cfg.teacher, "--teacher")  # before anything loads or the run directory is touched
    texts = read_texts(cfg)
    ensure_writable(run.path, "--run")
    if run.stage_dir(stage).exists():
        ensure_writable(run.stage_dir(stage), "--run")
    torch.manual_seed(cfg.seed)
    models = build_models(cfg, ctx)
    check_models(cfg, models)
    sequences = load_sequences(cfg, models.tokenizer, texts)
    train_ids, eval_ids = split_heldout(sequences, cfg.eval_sequences, ctx.world_size)
    if cfg.scale_rule == "mse-act":  # the channel weights, from training text the held-out slice never sees
        rows = max(1, MSE_ACT_CALIBRATION_TOKENS // cfg.seq_len)
        models.second_moments = fit_channel_weights(models.student, train_ids[:rows])
    record_config = {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()}
    record_config["world_size"] = ctx.world_size
    inputs = {"teacher": describe_input(cfg.teacher), "data": describe_input(cfg.data)}
    out_dir = run.stage_dir(stage)
    if not ctx.is_main:  # rank 0 alone records the stage; the others train alongside it and report nothing
        train(cfg, models, train_ids, eval_ids, out_dir, ctx, console=console, on_step=on_step,
              show_progress=False)
        return {}
    def saved(checkpoint: Path) -> None:  # `ckaqad status` shows how far a running distill has come
        run.record_progress(stage, outputs={"latest_checkpoint": run.relpath(checkpoint)})

    with run.stage(stage, config=record_config, inputs=inputs, force=True) as rec:
        summary = train(cfg, models, train_ids, eval_ids, out_dir, ctx, console=console, on_step=on_step,
                        on_save=saved, show_progress=show_progress, teacher_memo=teacher_memo)
        summary.update(train_sequences=int(train_ids.shape[0]), eval_sequences=int(eval_ids.shape[0]))
        DistillRecord.write(rec, student=run.relpath(out_dir / "student"),
                            metrics_file=run.relpath(out_dir / "metrics.jsonl"), summary=summary)
    return summary
