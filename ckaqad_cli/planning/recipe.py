"""A plan as the QuantRecipe that distill and pack read: uniform NVFP4 with the kept units excluded by exact name,
or (an FP8 plan) put in FP8 by exact name.

The recipe is what ``quant.apply_fake_quant`` makes with those exclusions and FP8 names, so ``distill`` or ``pack``
with :func:`plan_exclude`'s globs as ``--exclude`` and :func:`plan_fp8`'s as ``--fp8`` rebuild exactly the same
recipe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from ckaqad_cli.planning.units import UnitTable
from ckaqad_cli.quant import DEFAULT_EXCLUDE, QuantRecipe, apply_fake_quant
from ckaqad_kernels.nvfp4_spec import DEFAULT_ACTIVATION_ARITHMETIC, DEFAULT_SCALE_RULE
from ckaqad_cli.rundir import RunDir

STAGE = "plan"


def kept_exclude(table: UnitTable, kept: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """The user's ``exclude`` globs, then the globs that keep each of the ``kept`` units in BF16."""
    kept = set(kept)
    return [*exclude, *(pattern for u in table.units if u.name in kept for pattern in u.exclude)]


def fp8_members(table: UnitTable, chosen: Iterable[str]) -> list[str]:
    """The module names of the ``chosen`` units, in module order: an FP8 plan's ``--fp8``."""
    chosen = set(chosen)
    return [member for u in table.units if u.name in chosen for member in u.members]


def plan_recipe(config, scheme: str, exclude: Iterable[str], *, scale_rule: str = DEFAULT_SCALE_RULE,
                activation_arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC, fp8: Iterable[str] = (),
                trust_remote_code: bool = False) -> QuantRecipe:
    """The recipe of a model of transformers ``config`` quantized in ``scheme`` with ``exclude`` and ``fp8`` (built
    on the meta device: no weights are read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return apply_fake_quant(model, scheme=scheme, exclude=tuple(exclude), scale_rule=scale_rule,
                            activation_arithmetic=activation_arithmetic, fp8=tuple(fp8))


def plan_exclude(recipe: QuantRecipe) -> list[str]:
    """The globs beyond ``quant.DEFAULT_EXCLUDE`` that a plan's recipe was made with (``--exclude`` of distill and
    pack)."""
    return [p for p in recipe.exclude if p not in DEFAULT_EXCLUDE]


def plan_fp8(recipe: QuantRecipe) -> list[str]:
    """The ``--fp8`` globs a plan's recipe was made with."""
    return list(recipe.fp8_globs)


def recorded_plan(run: RunDir | None) -> QuantRecipe | None:
    """The recipe of the run's finished plan stage, None when it has none."""
    entry = run.stage_entry(STAGE) if run is not None else None
    if entry is None or entry.get("status") != "done":
        return None
    return QuantRecipe.load(run.stage_dir(STAGE))


class Selection(NamedTuple):
    """What a stage quantizes with: ``--exclude`` and ``--fp8`` globs, and whether they are the run's plan."""

    exclude: list[str]
    fp8: list[str]
    planned: bool


def exclude_or_plan(exclude: Iterable[str], run: RunDir | None, fp8: Iterable[str] = ()) -> Selection:
    """The ``--exclude`` and ``--fp8`` given, else (neither given) the run's plan's: distill, diagnose --ptq and a
    --model pack take the run's plan by default."""
    exclude, fp8 = list(exclude), list(fp8)
    plan = None if exclude or fp8 else recorded_plan(run)
    return Selection(exclude, fp8, False) if plan is None else Selection(plan_exclude(plan), plan_fp8(plan), True)
