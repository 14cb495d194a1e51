"""Training checkpoints: ``checkpoints/step-N/`` with a complete-marker, keep-last-N pruning and exact resume.

A checkpoint is written under ``.step-N.partial/``; the ``COMPLETE`` marker is written (and fsynced) last, then the
folder is renamed to ``step-N``. A process killed at any point leaves either a ``.partial`` folder, which is never
read and is removed by the next save, or a complete checkpoint. Contents::

    step-N/
      student.safetensors      master weights (one process), or dcp/ (torch.distributed.checkpoint, under torchrun)
      optimizer.safetensors    AdamW moments, flattened by parameter name (one process)
      state.json               step, data position, scheduler state, optimizer hyper-parameters, tied-weight aliases
      rng-rank<R>.safetensors  + rng-rank<R>.json: every random generator of rank R
      quant_recipe.json        the student's quantization recipe
      COMPLETE                 written last

No pickle anywhere: tensors are safetensors (or DCP's own format), everything else JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ckaqad_cli import distributed as D
from ckaqad_cli.atomic import atomic_write_json, atomic_write_text, fsync_dir
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.training import capture_rng_state, restore_rng_state

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / COMPLETE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_complete(root: Path) -> Path | None:
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def prune(root: Path, keep: int) -> None:
    """Keep the last ``keep`` complete checkpoints; remove older ones and any leftover partial folders."""
    root = Path(root)
    for child in root.glob(".step-*.partial"):
        shutil.rmtree(child, ignore_errors=True)
    steps = complete_steps(root)
    for step in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)


def _untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return {dropped: kept} to put them back."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out, aliases = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            out[name] = tensor.detach().contiguous()
    return out, aliases


def _split_optimizer(flat: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
    return tensors, values


def _join_optimizer(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(tensors)
    out.update({k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    return out


def save(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
    recipe: Any,
    ctx: D.DistContext,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` (all ranks call this) and prune to the last ``keep``; returns its folder."""
    root = Path(root)
    partial = root / f".step-{step}.partial"
    with D.main_first(ctx):
        if ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
    meta: dict[str, Any] = {
        "step": step,
        "world_size": ctx.world_size,
        "scheduler": scheduler.state_dict(),
        **state,
    }
    if ctx.distributed:
        D.save_dcp(partial / "dcp", model, optimizer, ctx)
        meta["format"] = "dcp"
    else:
        weights, aliases = _untie(D.full_model_state(model, ctx))
        save_file(weights, partial / "student.safetensors")
        opt_tensors, opt_values = _split_optimizer(D.full_optimizer_state(model, optimizer, ctx))
        save_file(opt_tensors, partial / "optimizer.safetensors")
        meta.update(format="safetensors", tied=aliases, optimizer=opt_values)
    rng_tensors, rng_extras = capture_rng_state(generators)
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, partial / f"rng-rank{ctx.rank}.safetensors")
    atomic_write_json(partial / f"rng-rank{ctx.rank}.json", rng_extras)
    if ctx.is_main:
        atomic_write_json(partial / "state.json", meta)
        recipe.save(partial)
    D.barrier(ctx)
    final = step_dir(root, step)
    if ctx.is_main:
        for f in partial.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        atomic_write_text(partial / COMPLETE, f"step {step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_dir(root)
        prune(root, keep)
    D.barrier(ctx)
    return final


def load(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generators: dict[str, torch.Generator],
    ctx: D.DistContext,
) -> dict[str, Any]:
    """Restore a complete checkpoint into the run's model, optimizer, scheduler and generators; returns state.json."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CkaqadError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); it cannot be resumed")
    meta = json.loads((path / "state.json").read_text())
    if meta["format"] == "dcp":
        D.load_dcp(path / "dcp", model, optimizer, ctx)
    else:
        weights = load_file(path / "student.safetensors")
        for alias, name in meta.get("tied", {}).items():
            weights[alias] = weights[name]
        optim = _join_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"])
        D.load_full_state(model, optimizer, weights, optim, ctx)
    scheduler.load_state_dict(meta["scheduler"])
    rank_file = path / f"rng-rank{ctx.rank}.safetensors"
    if not rank_file.exists():  # resumed on more ranks than were saved: rank 0's shared generators are what matter
        rank_file = path / "rng-rank0.safetensors"
    extras = json.loads(rank_file.with_suffix(".json").read_text())
    restore_rng_state(load_file(rank_file), extras, generators)
    return meta
