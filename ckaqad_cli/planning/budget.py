"""The chooser: which units leave NVFP4 (for BF16, or FP8 with ``upgrade="fp8"``) under a budget of average bits
per weight.

The budget in bytes is ``floor(bits * weights / 8)`` over every Linear weight of the model (units and the modules
that stay BF16 whatever the plan), or with ``over="units"`` over the units' weights, the fixed modules' 16 bits a
weight on top. Every unit starts in NVFP4; units are then upgraded in the order of the score
they remove per byte they add (ties: module order), each one that still fits, until none fits: a greedy knapsack,
deterministic, whole units only (a fused group is never split). Raising the budget never lowers the bytes upgraded
(at the first unit where two budgets decide differently, the larger takes it and the smaller cannot afford it). A
unit's score is what quantizing it alone in NVFP4 costs: for FP8 that ranks units by the damage an upgrade can at
most undo, per byte (docs/plan.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.planning.units import BF16_BYTES, UnitTable
from ckaqad_cli.settings import SettingError
from ckaqad_cli.settings.plan import check_budget_range


@dataclass(frozen=True)
class Choice:
    """The units upgraded (in module order) and to what, the weight bytes of the plan and the budget's."""

    kept: tuple[str, ...]
    weight_bytes: int
    budget_bytes: int
    effective_bits: float
    """Average bits per Linear weight (every one, whatever the budget averages over)."""
    upgrade: str = "bf16"


def budget_bytes(table: UnitTable, bits: float, over: str = "linear") -> int:
    """The largest number of Linear weight bytes ``bits`` per weight allows, averaged ``over`` every Linear weight
    or only the units' (settings.plan.BUDGET_SCOPES; exact: no rounding up)."""
    if over == "units":
        fixed = table.fixed_weights
        return math.floor(Fraction(bits) * (table.total_weights - fixed) / 8) + BF16_BYTES * fixed
    return math.floor(Fraction(bits) * table.total_weights / 8)


def average_bits(table: UnitTable, weight_bytes: int, over: str = "linear") -> float:
    """Average bits per weight of ``weight_bytes`` of Linear weights, counted as a budget ``over`` them counts."""
    if over == "units":
        fixed = table.fixed_weights
        return 8 * (weight_bytes - BF16_BYTES * fixed) / (table.total_weights - fixed)
    return table.bits(weight_bytes)


def check_budget(table: UnitTable, bits: float, upgrade: str = "bf16", over: str = "linear") -> None:
    """One line for a budget this model cannot meet, or that upgrades every unit it can."""
    check_budget_range(bits)
    lowest, highest = table.bytes_of(()), table.bytes_of((u.name for u in table.upgradable(upgrade)), upgrade)
    limit = budget_bytes(table, bits, over)
    if limit < lowest:  # only over every Linear weight: over the units, 4.5 bits afford uniform NVFP4
        fixed = sorted(table.fixed, key=lambda name: -table.fixed[name])
        shown = ", ".join(fixed[:3]) + (f" and {len(fixed) - 3} more" if len(fixed) > 3 else "")
        raise SettingError("budget_bits", (
            f"{bits:g} is below {table.bits(lowest):.4f}, what this model needs with every unit in NVFP4: the "
            f"{table.fixed_weights:,} weights that stay BF16 whatever the plan ({shown}) count 16 bits each "
            "(--budget-over units counts them on top)"
        ))
    if limit >= highest:
        what = "nothing would be quantized" if upgrade == "bf16" else "nothing would be NVFP4"
        raise SettingError("budget_bits", (
            f"{bits:g} puts every unit it can in {upgrade.upper()} ({average_bits(table, highest, over):.4f} bits per "
            f"weight): {what}; give a budget below {average_bits(table, highest, over):.4f}"
        ))


def choose(table: UnitTable, scores: Mapping[str, float], bits: float, upgrade: str = "bf16",
           over: str = "linear") -> Choice:
    """Upgrade the units that remove the most score per byte to ``upgrade`` (settings.plan.UPGRADES) within ``bits``
    per weight averaged ``over`` (settings.plan.BUDGET_SCOPES)."""
    check_budget(table, bits, upgrade, over)
    bad = next((u.name for u in table.units if not math.isfinite(scores[u.name])), None)
    if bad is not None:
        raise CkaqadError(f"the score of {bad} is {scores[bad]}: more calibration tokens may give a finite one")
    order = {u.name: i for i, u in enumerate(table.units)}
    extra = {u.name: u.extra_bytes(upgrade) for u in table.upgradable(upgrade)}
    ranked = sorted(table.upgradable(upgrade), key=lambda u: (-scores[u.name] / extra[u.name], order[u.name]))
    limit = budget_bytes(table, bits, over)
    spent = table.bytes_of(())
    kept = set()
    for unit in ranked:
        if spent + extra[unit.name] <= limit:
            kept.add(unit.name)
            spent += extra[unit.name]
    names = tuple(u.name for u in table.units if u.name in kept)
    return Choice(names, spent, limit, table.bits(spent), upgrade)
