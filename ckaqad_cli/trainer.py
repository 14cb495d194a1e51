"""The distill training loop in its parts: setup, one optimizer step, the held-out evaluation and the checkpoint.

:meth:`Trainer.setup` builds the state of a run from the models, the data and the resolved config (the objective's
hooks, FSDP2 sharding under torchrun, optimizer and schedule, the token-sampling generator) and resumes it from the
latest complete checkpoint; :meth:`Trainer.fit` runs the steps, evaluating and saving on their schedule, and
returns the summary metrics. Which rows a step reads (:func:`train_rows`) and which random numbers it draws depend
on the step alone, so a resumed run is byte-identical to an uninterrupted one. The stage (``stages/distill.py``)
loads the models and data, calls these, and saves the final student.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ckaqad_cli import checkpoints
from ckaqad_cli import distributed as D
from ckaqad_cli.cka import Standardizer, TokenFilter
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.objective import CausalLMBody, Objective, ObjectiveSettings, TeacherMemo, parse_layers
from ckaqad_cli.progress import make_progress
from ckaqad_cli.settings.distill import warmup_steps
from ckaqad_cli.training import (
    MetricsLog,
    StopRequest,
    build_optimizer,
    check_finite,
    peak_memory_bytes,
)


@dataclass
class Models:
    """What training needs, built by ``stages.distill.build_models`` (or by a test)."""

    student: torch.nn.Module  # the HF causal LM with fake quantization, float32 master weights, trainable
    teacher: torch.nn.Module  # frozen
    tokenizer: Any
    recipe: Any  # quant.QuantRecipe
    second_moments: dict[str, torch.Tensor] | None = None
    """The mse-act channel weights the student was calibrated with (saved beside it for pack)."""


# -- data order ------------------------------------------------------------------------------------------------
def train_rows(step: int, micro: int, *, n_train: int, batch: int, grad_accum: int, seed: int) -> torch.Tensor:
    """Training-row indices of a micro-batch: a fresh seeded permutation per pass over the data, read in order.

    A function of the step alone, so a resumed run reads exactly the rows the uninterrupted run would have.
    """
    start = (step * grad_accum + micro) * batch
    out = []
    for pos in range(start, start + batch):
        epoch, offset = divmod(pos, n_train)
        out.append(int(_permutation(epoch, n_train, seed)[offset]))
    return torch.tensor(out, dtype=torch.long)


_PERM_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(epoch: int, n: int, seed: int) -> torch.Tensor:
    key = (epoch, n, seed)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return _PERM_CACHE[key]


def _eval_batch_size(batch_size: int, world: int) -> int:
    """An eval batch size that splits evenly over ranks (every rank runs every forward: FSDP needs that)."""
    return max(world, (batch_size // world) * world)


def objective_settings(cfg: Any, num_layers: int) -> ObjectiveSettings:
    """The objective's settings from a resolved ``DistillConfig``."""
    return ObjectiveSettings(
        temperature=cfg.temperature,
        kl_topk=cfg.kl_topk,
        kl_chunk_tokens=cfg.kl_chunk_tokens,
        lambda_cka=cfg.lambda_cka,
        cka_balance=cfg.cka_balance,
        cka_layers=tuple(parse_layers(cfg.cka_layers, num_layers)),
        cka_tokens=cfg.cka_tokens,
        cka_debiased=cfg.cka_debiased,
        token_filter=TokenFilter(drop_first=True, drop_massive=cfg.cka_drop_massive, standardize=cfg.cka_standardize),
    )


def _autocast(on_gpu: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()


# -- the trainer -----------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """The state of one training run; build it with :meth:`setup`.

    ``cfg`` is a resolved ``stages.distill.DistillConfig``; ``fingerprint`` holds the settings a resumed run must
    share with its checkpoint. ``on_save(checkpoint)`` runs after every checkpoint is complete.
    """

    cfg: Any
    models: Models
    train_ids: torch.Tensor
    eval_ids: torch.Tensor
    ctx: D.DistContext
    console: Console
    student: CausalLMBody
    settings: ObjectiveSettings
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: torch.Generator  # the CKA token positions of every step
    metrics: MetricsLog
    ckpt_root: Path
    fingerprint: dict[str, Any]
    local: slice  # this rank's rows of the global batch
    eval_batch: int
    on_save: Callable[[Path], None] | None = None
    start_step: int = 0
    last_saved: Path | None = None

    # -- setup ---------------------------------------------------------------------------------------------------
    @classmethod
    def setup(
        cls,
        cfg: Any,
        models: Models,
        train_ids: torch.Tensor,
        eval_ids: torch.Tensor,
        out_dir: Path,
        ctx: D.DistContext,
        *,
        fingerprint: dict[str, Any],
        console: Console,
        on_save: Callable[[Path], None] | None = None,
        teacher_memo: TeacherMemo | None = None,
    ) -> Trainer:
        """Hook, shard and optimize the student against the frozen teacher; resume from the latest complete
        checkpoint under ``out_dir/checkpoints`` (with ``cfg.resume``), or start over there. ``teacher_memo`` is used
        in a single CPU process only (elsewhere the teacher's forward is cheap, or collective)."""
        from ckaqad_cli.models import decoder_layers

        student_model, teacher_model = models.student, models.teacher
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        if cfg.grad_checkpointing:  # activation_checkpointing_enable where transformers has it (the old name warns)
            enable = getattr(student_model, "activation_checkpointing_enable", None)
            (enable or student_model.gradient_checkpointing_enable)({"use_reentrant": False})
        student_layers, teacher_layers = decoder_layers(student_model), decoder_layers(teacher_model)
        student, teacher = CausalLMBody(student_model), CausalLMBody(teacher_model)
        settings = objective_settings(cfg, len(teacher_layers))
        objective = Objective(
            student, teacher, student_layers, teacher_layers, settings, ctx,
            bos_token_id=getattr(models.tokenizer, "bos_token_id", None),
            standardizer=Standardizer() if cfg.cka_standardize else None,
            teacher_memo=teacher_memo if ctx.device.type == "cpu" and not ctx.distributed else None,
        )
        D.shard(student, student_layers, ctx)  # no-ops in one process
        D.shard(teacher, teacher_layers, ctx, offload=cfg.teacher_offload)

        if cfg.batch_size % ctx.world_size:
            raise CkaqadError(f"--batch-size {cfg.batch_size} must be a multiple of the process count "
                              f"({ctx.world_size})")
        per_rank = cfg.batch_size // ctx.world_size
        optimizer, scheduler = build_optimizer(
            student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=cfg.steps,
            warmup=warmup_steps(cfg.warmup, cfg.steps),
        )
        trainer = cls(
            cfg=cfg, models=models, train_ids=train_ids, eval_ids=eval_ids, ctx=ctx, console=console,
            student=student, settings=settings, objective=objective, optimizer=optimizer, scheduler=scheduler,
            sampler=torch.Generator().manual_seed(cfg.seed), metrics=MetricsLog(Path(out_dir) / "metrics.jsonl"),
            ckpt_root=Path(out_dir) / "checkpoints", fingerprint=fingerprint,
            local=slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank),
            eval_batch=_eval_batch_size(cfg.eval_batch_size, ctx.world_size), on_save=on_save,
        )
        trainer.resume()
        if cfg.cka_standardize:
            objective.fit_standardizer(eval_ids[: trainer.eval_batch])
        trainer.last_saved = checkpoints.latest_complete(trainer.ckpt_root)
        return trainer

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The explicit generators a checkpoint saves and restores."""
        return {"cka_tokens": self.sampler}

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.train_ids.shape[1]

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            self.console.print(message)

    def resume(self) -> None:
        """Load the latest complete checkpoint when asked (its settings must match), else clear the run's old
        metrics and checkpoints; sets ``start_step``."""
        cfg, ctx = self.cfg, self.ctx
        latest = checkpoints.latest_complete(self.ckpt_root)
        if cfg.resume and latest is not None:
            meta = checkpoints.load(latest, model=self.student, optimizer=self.optimizer, scheduler=self.scheduler,
                                    generators=self.generators, ctx=ctx)
            saved = meta["config"]  # a key it lacks was added to the fingerprint after that checkpoint was written
            changed = {k: (saved[k], v) for k, v in self.fingerprint.items() if k in saved and saved[k] != v}
            if changed:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise CkaqadError(f"cannot resume {latest}: the run's settings changed ({shown})")
            self.start_step = meta["step"]
            if self.start_step > cfg.steps:
                raise CkaqadError(f"cannot resume {latest} with --steps {cfg.steps}: it is already at step "
                                  f"{self.start_step}; pass --steps {self.start_step} or more")
            if ctx.is_main:  # the final evaluation (after the last step) runs again: its line goes too
                self.metrics.truncate_after(self.start_step, drop_evals_at_step=self.start_step == cfg.steps)
            self.say(f"resumed from {latest} (step {self.start_step} of {cfg.steps})")
            return
        if latest is not None and not cfg.resume and not cfg.force:
            raise CkaqadError(
                f"{self.ckpt_root} holds checkpoints of an earlier run (latest {latest.name}): pass --resume to "
                "continue it, or --force to start over"
            )
        if cfg.resume:
            self.say("no complete checkpoint to resume from: starting from step 0")
        if ctx.is_main:
            self.metrics.reset()
            checkpoints.prune(self.ckpt_root, 0)
        D.barrier(ctx)

    # -- step, evaluation, checkpoint ----------------------------------------------------------------------------
    def _last_good(self) -> str | None:
        return str(self.last_saved) if self.last_saved else None

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches (0-based ``step``); returns its metrics line, which
        rank 0 writes to metrics.jsonl. Stops the run (NonFiniteLossError) on a NaN or Inf loss or gradient."""
        cfg, ctx = self.cfg, self.ctx
        on_gpu = ctx.device.type == "cuda"
        t0 = time.perf_counter()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        lr = self.optimizer.param_groups[0]["lr"]
        sums = {"loss": 0.0, "kl": 0.0, "cka_term": 0.0, "lambda": 0.0}
        for micro in range(cfg.grad_accum):
            rows = train_rows(step, micro, n_train=self.train_ids.shape[0], batch=cfg.batch_size,
                              grad_accum=cfg.grad_accum, seed=cfg.seed)
            scores = torch.rand(cfg.batch_size, self.train_ids.shape[1], generator=self.sampler)
            with _autocast(on_gpu):
                terms = self.objective(self.train_ids[rows], self.local, scores)
            loss_value = float(D.all_reduce_mean(terms.loss.detach(), ctx))
            check_finite(step + 1, "the loss", loss_value,
                         {"kl": terms.kl, "cka_term": terms.cka_term, "lambda": terms.lambda_cka}, self._last_good())
            (terms.loss / cfg.grad_accum).backward()
            sums["loss"] += loss_value / cfg.grad_accum
            sums["kl"] += terms.kl / cfg.grad_accum
            sums["cka_term"] += (terms.cka_term or 0.0) / cfg.grad_accum
            sums["lambda"] += terms.lambda_cka / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.student.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        )
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        check_finite(step + 1, "the gradient norm", grad_norm, {"loss": sums["loss"]}, self._last_good())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        record = {
            "step": step + 1, "type": "train", "loss": sums["loss"], "kl": sums["kl"],
            "cka_term": sums["cka_term"] if self.settings.uses_cka else None, "lambda": sums["lambda"], "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": self.tokens_per_step / elapsed, "step_time_s": elapsed,
            "peak_mem_mb": peak_memory_bytes(ctx.device) / 2**20,
        }
        if ctx.is_main:
            self.metrics.write(record)
        return record

    def evaluate(self, step: int) -> dict[str, Any]:
        """The held-out KL and per-layer CKA after ``step`` steps; rank 0 writes the line to metrics.jsonl."""
        self.student.eval()
        with _autocast(self.ctx.device.type == "cuda"):
            result = self.objective.evaluate(self.eval_ids, self.eval_batch, self.cfg.eval_tokens, seed=self.cfg.seed)
        self.student.train()
        record = {"step": step, "type": "eval", **result}
        if self.ctx.is_main:
            self.metrics.write(record)
        return record

    def save(self, step: int) -> Path:
        """The step-N checkpoint (model, optimizer, schedule, generators, data position, settings), keep-last-N."""
        state = {"data_position": step * self.cfg.grad_accum * self.cfg.batch_size, "config": self.fingerprint}
        self.last_saved = checkpoints.save(
            self.ckpt_root, step, model=self.student, optimizer=self.optimizer, scheduler=self.scheduler,
            generators=self.generators, state=state, recipe=self.models.recipe, ctx=self.ctx, keep=self.cfg.keep,
        )
        if self.on_save is not None:
            self.on_save(self.last_saved)
        return self.last_saved

    # -- the loop ------------------------------------------------------------------------------------------------
    def fit(self, *, on_step: Callable[[int], None] | None = None, show_progress: bool = True) -> dict[str, Any]:
        """Train from ``start_step`` to ``cfg.steps``, evaluating every ``eval_every`` and saving every
        ``save_every`` steps; the summary metrics. ``on_step(step)`` runs after every step. A first Ctrl-C or SIGTERM
        finishes the step, saves a checkpoint and raises KeyboardInterrupt."""
        cfg = self.cfg
        if self.start_step == 0:
            first_eval = self.evaluate(0)
        else:  # the PTQ numbers were logged by the run this one resumes
            first_eval = next((r for r in self.metrics.read() if r.get("type") == "eval" and r["step"] == 0), None)
        stop = StopRequest()
        last: dict[str, Any] = {}
        started = time.perf_counter()
        enabled = show_progress and self.ctx.is_main
        with stop.installed(), make_progress(self.console, fields=("terms",), enabled=enabled) as progress:
            task = progress.add_task("distill", total=cfg.steps, completed=self.start_step, terms="")
            for step in range(self.start_step, cfg.steps):
                last = self.step(step)
                done = step + 1
                terms_text = f"loss {last['loss']:.4g}  kl {last['kl']:.4g}"
                if self.settings.uses_cka:
                    terms_text += f"  1-cka {last['cka_term']:.3g}  λ {last['lambda']:.3g}"
                progress.update(task, completed=done, terms=terms_text)
                if done % cfg.eval_every == 0 and done != cfg.steps:
                    self.evaluate(done)
                interrupted = D.any_rank(stop.requested, self.ctx)
                if done % cfg.save_every == 0 or (interrupted and done != cfg.steps):
                    self.save(done)
                if on_step is not None:
                    on_step(done)
                if interrupted and done != cfg.steps:
                    self.say(f"interrupted: saved {self.last_saved}; continue with --resume")
                    raise KeyboardInterrupt
        final_eval = self.evaluate(cfg.steps)
        return self.summary(last, first_eval, final_eval, time.perf_counter() - started)

    def summary(self, last: dict[str, Any], first_eval: dict[str, Any] | None, final_eval: dict[str, Any],
                seconds: float) -> dict[str, Any]:
        """The run's summary metrics: the last training step, the final and (when logged) the PTQ evaluation, and
        the CKA weight averaged over all the run's steps (read from metrics.jsonl, so a resumed run counts the steps
        before the resume too; rank 0 only)."""
        lambdas = [r["lambda"] for r in self.metrics.read() if r.get("type") == "train"] if self.ctx.is_main else []
        out = {
            "steps": self.cfg.steps,
            "tokens_seen": self.cfg.steps * self.tokens_per_step,
            "mode": "kl-only" if not self.settings.uses_cka else "cka-qad",
            "cka_layers": list(self.settings.cka_layers),
            "cka_filters": self.settings.token_filter.describe(),
            "final_kl": last.get("kl"),
            "mean_lambda_cka": sum(lambdas) / len(lambdas) if lambdas else None,
            "eval_kl": final_eval["eval_kl"],
            "mean_cka": final_eval["eval_cka_mean"],
            "min_cka": final_eval["eval_cka_min"],
            "layer_cka": final_eval["eval_cka"],
            "train_seconds": seconds,
        }
        if first_eval:
            out.update(ptq_eval_kl=first_eval["eval_kl"], ptq_mean_cka=first_eval["eval_cka_mean"],
                       ptq_min_cka=first_eval["eval_cka_min"])
        return out
