"""The chooser: which units stay in BF16 under a budget of average bits per weight.

The budget in bytes is ``floor(bits * weights / 8)`` over every Linear weight of the model (units and the modules
that stay BF16 whatever the plan). Every unit starts in NVFP4; units are then kept in BF16 in the order of the score
they remove per byte they add (ties: module order), each one that still fits, until none fits: a greedy knapsack,
deterministic, whole units only (a fused group is never split). Raising the budget never lowers the bytes kept in
BF16 (at the first unit where two budgets decide differently, the larger keeps it and the smaller cannot afford it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.planning.units import UnitTable
from ckaqad_cli.settings import SettingError
from ckaqad_cli.settings.plan import check_budget_range


@dataclass(frozen=True)
class Choice:
    """The units kept in BF16 (in module order), the weight bytes of the plan and the budget's."""

    kept: tuple[str, ...]
    weight_bytes: int
    budget_bytes: int
    effective_bits: float


def budget_bytes(table: UnitTable, bits: float) -> int:
    """The largest number of weight bytes ``bits`` per weight allows (exact: no rounding up)."""
    return math.floor(Fraction(bits) * table.total_weights / 8)


def check_budget(table: UnitTable, bits: float) -> None:
    """One line for a budget this model cannot meet, or that leaves nothing to quantize."""
    check_budget_range(bits)
    lowest, highest = table.bytes_of(()), table.bytes_of(u.name for u in table.units)
    limit = budget_bytes(table, bits)
    if limit < lowest:
        fixed = sorted(table.fixed, key=lambda name: -table.fixed[name])
        shown = ", ".join(fixed[:3]) + (f" and {len(fixed) - 3} more" if len(fixed) > 3 else "")
        raise SettingError("budget_bits", (
            f"{bits:g} is below {table.bits(lowest):.4f}, what this model needs with every unit in NVFP4: the "
            f"{sum(table.fixed.values()):,} weights that stay BF16 whatever the plan ({shown}) count 16 bits each"
        ))
    if limit >= highest:
        raise SettingError("budget_bits", (
            f"{bits:g} keeps every unit in BF16 ({table.bits(highest):.4f} bits per weight): nothing would be "
            f"quantized; give a budget below {table.bits(highest):.4f}"
        ))


def choose(table: UnitTable, scores: Mapping[str, float], bits: float) -> Choice:
    """Keep the units that remove the most score per byte in BF16 within ``bits`` per weight."""
    check_budget(table, bits)
    bad = next((u.name for u in table.units if not math.isfinite(scores[u.name])), None)
    if bad is not None:
        raise CkaqadError(f"the score of {bad} is {scores[bad]}: more calibration tokens may give a finite one")
    order = {u.name: i for i, u in enumerate(table.units)}
    ranked = sorted(table.units, key=lambda u: (-scores[u.name] / u.extra_bytes, order[u.name]))
    limit = budget_bytes(table, bits)
    spent = table.bytes_of(())
    kept = set()
    for unit in ranked:
        if spent + unit.extra_bytes <= limit:
            kept.add(unit.name)
            spent += unit.extra_bytes
    names = tuple(u.name for u in table.units if u.name in kept)
    return Choice(names, spent, limit, table.bits(spent))
