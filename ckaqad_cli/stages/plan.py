"""The plan stage: spend a bit budget on the quantization units whose NVFP4 drift hurts most.

Load the teacher, wrap it as uniform NVFP4 would and switch every unit off (:mod:`ckaqad_cli.planning.switch`),
measure each unit's sensitivity (:mod:`~ckaqad_cli.planning.sensitivity`), upgrade the units of most score per byte
to BF16 or FP8 (``--upgrade``) within ``--budget-bits`` (:mod:`~ckaqad_cli.planning.budget`), compare uniform NVFP4
with the plan (:mod:`~ckaqad_cli.planning.evaluate`), and write RUN/plan/: quant_recipe.json (what distill and pack
read), report.json, report.md and plan.png.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from rich.console import Console

from ckaqad_cli import models
from ckaqad_cli.data import load_texts, pack_sequences
from ckaqad_cli.distributed import pick_device
from ckaqad_cli.errors import CkaqadError, StageDoneError
from ckaqad_cli.planning import sensitivity
from ckaqad_cli.planning.budget import check_budget, choose
from ckaqad_cli.planning.evaluate import compare, task_accuracy
from ckaqad_cli.planning.recipe import STAGE, fp8_members, kept_exclude, plan_recipe
from ckaqad_cli.planning.report import write_plan_report
from ckaqad_cli.planning.switch import prepare
from ckaqad_cli.planning.units import UnitTable
from ckaqad_cli.quant_calibration import fit_channel_weights
from ckaqad_cli.rundir import RunDir, describe_input
from ckaqad_cli.safetensors_write import ensure_writable
from ckaqad_cli.settings import BUILTIN_TEACHERS, MSE_ACT_CALIBRATION_TOKENS
from ckaqad_cli.settings.plan import PlanConfig


def unit_rows(table: UnitTable, measured: sensitivity.Sensitivity, kept: tuple[str, ...]) -> list[dict]:
    """The report's row of each unit: where it lives, its bytes in each format, its scores, whether it is kept."""
    cka = measured.scores("cka")
    return [{"name": u.name, "layer": u.layer, "members": list(u.members), "weights": u.weights,
             "nvfp4_bytes": u.nvfp4_bytes, "bf16_bytes": u.bf16_bytes, "fp8_bytes": u.fp8_bytes,
             "cka_own": measured.cka_own[u.name],
             "cka_last": measured.cka_last[u.name], "cka": cka[u.name], "kl": measured.kl[u.name],
             "grad": measured.grad[u.name], "kept": u.name in kept} for u in table.units]


def run_plan(cfg: PlanConfig, run: RunDir, *, console: Console | None = None) -> dict:
    """Measure, choose, compare; write RUN/plan/ and record the stage. The report."""
    console = console or Console(stderr=True)
    cfg.check()
    done = run.stage_entry(STAGE)
    if done and done.get("status") == "done" and not cfg.force:  # fail before loading any model
        raise StageDoneError(f"stage {STAGE} already finished in {run.path}; pass --force to run it again")
    models.check_spec(cfg.teacher, "--teacher")
    texts = load_texts(cfg.data, split=cfg.split, seed=cfg.seed, text_field=cfg.text_field)
    ensure_writable(run.path, "--run")
    if run.stage_dir(STAGE).exists():
        ensure_writable(run.stage_dir(STAGE), "--run")
    device = pick_device(cfg.device)
    dtype = models.compute_dtype(cfg.dtype, device)
    model, tokenizer = models.load_model(cfg.teacher, device=device, dtype=dtype,
                                         trust_remote_code=cfg.trust_remote_code)
    table, _ = prepare(model, cfg.scheme, cfg.exclude, cfg.scale_rule, cfg.activation_arithmetic)
    check_budget(table, cfg.budget_bits, cfg.upgrade, cfg.budget_over)  # before the measurement
    limit = models.max_positions(model)
    if limit is not None and cfg.seq_len > limit:
        raise CkaqadError(f"--seq-len {cfg.seq_len} is over the teacher's limit of {limit} positions")
    sequences = pack_sequences(texts, tokenizer, cfg.seq_len, max_tokens=cfg.max_tokens, seed=cfg.seed)
    inputs = {"teacher": describe_input(cfg.teacher), "data": describe_input(cfg.data)}
    config = {**asdict(cfg), "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    with run.stage(STAGE, config=config, inputs=inputs, force=cfg.force) as rec:
        start = time.perf_counter()
        if cfg.scale_rule == "mse-act":  # channel weights from the teacher's inputs, before any unit is on
            fit_channel_weights(model, sequences[: max(1, MSE_ACT_CALIBRATION_TOKENS // cfg.seq_len)])
        measured = sensitivity.measure(model, table, sequences, batch_size=cfg.batch_size,
                                       bos_token_id=tokenizer.bos_token_id, console=console)
        seconds = time.perf_counter() - start
        choice = choose(table, measured.scores(cfg.score), cfg.budget_bits, cfg.upgrade, cfg.budget_over)
        fp8 = fp8_members(table, choice.kept) if cfg.upgrade == "fp8" else []
        exclude = list(cfg.exclude) if fp8 else kept_exclude(table, choice.kept, cfg.exclude)
        recipe = plan_recipe(model.config, cfg.scheme, exclude, scale_rule=cfg.scale_rule, fp8=fp8,
                             activation_arithmetic=cfg.activation_arithmetic, trust_remote_code=cfg.trust_remote_code)
        plans = {"uniform": (), "plan": choice.kept}
        report = {
            "teacher": cfg.teacher, "data": cfg.data, "scheme": cfg.scheme, "scale_rule": cfg.scale_rule,
            "score": cfg.score, "upgrade": cfg.upgrade,
            "budget_bits": cfg.budget_bits, "budget_over": cfg.budget_over, "budget_bytes": choice.budget_bytes,
            "weight_bytes": choice.weight_bytes,
            "effective_bits": choice.effective_bits, "uniform_bits": table.bits(table.bytes_of(())),
            "total_weights": table.total_weights, "fixed": table.fixed, "kept": list(choice.kept),
            "exclude": exclude, "fp8": fp8, "units": unit_rows(table, measured, choice.kept), "tokens": measured.tokens,
            "cost": {"forwards_per_batch": measured.forwards_per_batch,
                     "backwards_per_batch": measured.backwards_per_batch, "batches": measured.batches,
                     "units": len(table.units), "sensitivity_seconds": seconds},
            "layers": ["embeddings"] + [f"layer {i}" for i in range(1, len(models.decoder_layers(model)) + 1)],
            "comparison": compare(model, table, plans, sequences, batch_size=cfg.batch_size,
                                  bos_token_id=tokenizer.bos_token_id, console=console, upgrade=cfg.upgrade),
            "task_accuracy": {},
        }
        if cfg.teacher in BUILTIN_TEACHERS and cfg.task_problems > 0:
            from ckaqad_cli.builtin import suite

            tasks = suite(cfg.teacher)
            report["task_accuracy"] = task_accuracy(model, tokenizer, table, plans,
                                                    tasks.generate("test", cfg.task_problems, cfg.seed), tasks.evaluate,
                                                    cfg.upgrade)
        paths = {"recipe": recipe.save(run.stage_dir(STAGE)),
                 **write_plan_report(report, run.stage_dir(STAGE), console=console)}
        rec.outputs.update({key: run.relpath(p) for key, p in paths.items()})
        rec.metrics.update(effective_bits=choice.effective_bits, kept=len(choice.kept), units=len(table.units),
                           exclude=exclude, fp8=fp8, uniform_kl=report["comparison"]["uniform"]["kl"],
                           plan_kl=report["comparison"]["plan"]["kl"], sensitivity_seconds=seconds)
    return report
