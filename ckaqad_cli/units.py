"""How ckaqad writes numbers, one function per unit: plain values (``fmt``) and byte counts (``format_bytes``).

Imports nothing heavy: ``ckaqad status`` and every ``--help`` use it without loading torch.
"""

from __future__ import annotations

import math


def fmt(value: object, *, none: str = "-", thousands: bool = False) -> str:
    """A value as printed in tables, reports, the model card and ``ckaqad status``.

    Floats with 4 decimals (3 significant digits from 1e4 up, or below 1e-3 where 4 decimals would show 0.0000);
    NaN and None as ``none``; integers with thousands separators when ``thousands`` (1,200); lists and mappings
    element by element (``[a, b]``, ``k=v, k2=(nested)``); anything else as ``str``.
    """
    if isinstance(value, float):
        if math.isnan(value):
            return none
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"
    if value is None:
        return none
    if thousands and isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}=({fmt(v, none=none, thousands=thousands)})" if isinstance(v, dict) else
                         f"{k}={fmt(v, none=none, thousands=thousands)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, none=none, thousands=thousands) for v in value) + "]"
    return str(value)


def format_bytes(n: float) -> str:
    """A byte count in decimal units, as ``--max-shard-size`` reads them: ``512 B``, ``1.5 KB``, ``1.0 GB``."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
