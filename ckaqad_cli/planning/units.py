"""Quantization units: what must share one format, found from a model that ``quant.apply_fake_quant`` wrapped.

A unit is a fused group (q/k/v, gate/up, w1/w3: engines run them as one GEMM), the experts of one MoE layer (fused
3-D experts, or per-expert Linears), or a single Linear otherwise. Every Linear weight of the model counts in the
budget: a unit's in NVFP4 (4.5 bits), FP8 (8 bits and a float32 scale per output channel) or BF16 (16 bits), and
the modules that stay BF16 whatever the plan (the output head, ``DEFAULT_EXCLUDE`` and ``--exclude`` matches, widths
blocks cannot tile) at 16 bits, as ModelOpt's AutoQuantize counts them. Embedding tables are not Linear layers and
do not count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ckaqad_cli import models
from ckaqad_cli.quant import NVFP4Linear, QuantRecipe
from ckaqad_cli.quant_moe import NVFP4Experts, expert_of
from ckaqad_kernels import fp8_ref, nvfp4_spec

BF16_BYTES = 2
_EXPERT_LINEAR = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.[^.]+$")
"""A per-expert nn.Linear (``...experts.3.w1``): all experts of one MoE layer form one unit."""


@dataclass(frozen=True)
class Unit:
    """One quantization unit: its members (the recipe's module names), the modules that switch its fake
    quantization, the globs that keep it in BF16, its weight count, the decoder layer it lives in, and its output
    channels when it can be FP8 (Linears; None for MoE experts, which are NVFP4 or BF16)."""

    name: str
    members: tuple[str, ...]
    modules: tuple[str, ...]
    exclude: tuple[str, ...]
    weights: int
    layer: int | None
    rows: int | None = None

    @property
    def nvfp4_bytes(self) -> int:
        return nvfp4_spec.stored_bytes(self.weights)

    @property
    def bf16_bytes(self) -> int:
        return self.weights * BF16_BYTES

    @property
    def fp8_bytes(self) -> int | None:
        """A byte a weight and a float32 scale per output channel; None when the unit cannot be FP8."""
        return None if self.rows is None else fp8_ref.stored_bytes(self.rows, self.weights // self.rows)

    def upgraded_bytes(self, upgrade: str) -> int | None:
        """The unit's bytes in ``upgrade`` (settings.plan.UPGRADES); None when it cannot take it."""
        return self.bf16_bytes if upgrade == "bf16" else self.fp8_bytes

    def extra_bytes(self, upgrade: str = "bf16") -> int | None:
        """What ``upgrade`` costs over NVFP4 (None when the unit cannot take it)."""
        size = self.upgraded_bytes(upgrade)
        return None if size is None else size - self.nvfp4_bytes


@dataclass(frozen=True)
class UnitTable:
    """The units of a model in module order, and the weights that stay BF16 whatever the plan."""

    units: tuple[Unit, ...]
    fixed: dict[str, int]
    """Module -> weights of every Linear (or experts module) left unquantized by the uniform recipe."""
    scheme: str

    @property
    def fixed_weights(self) -> int:
        return sum(self.fixed.values())

    @property
    def total_weights(self) -> int:
        return sum(u.weights for u in self.units) + self.fixed_weights

    def bytes_of(self, kept: Iterable[str], upgrade: str = "bf16") -> int:
        """Weight bytes with the units named in ``kept`` in ``upgrade`` and the others in NVFP4."""
        kept = set(kept)
        units = sum(u.upgraded_bytes(upgrade) if u.name in kept else u.nvfp4_bytes for u in self.units)
        return units + BF16_BYTES * self.fixed_weights

    def upgradable(self, upgrade: str) -> tuple[Unit, ...]:
        """The units that can take ``upgrade``, in module order."""
        return tuple(u for u in self.units if u.upgraded_bytes(upgrade) is not None)

    def bits(self, weight_bytes: int) -> float:
        """Average bits per weight of ``weight_bytes``."""
        return 8 * weight_bytes / self.total_weights

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)


def _layer_of(name: str, prefix: str) -> int | None:
    rest = name.removeprefix(prefix + ".") if prefix else name
    head = rest.split(".", 1)[0]
    return int(head) if rest != name and head.isdigit() else None


def _unit_key(model: nn.Module, name: str, grouped: dict[str, str]) -> tuple[str, str]:
    """(unit name, the module that switches this member's quantization)."""
    experts = expert_of(name)
    if experts is not None and isinstance(model.get_submodule(experts), NVFP4Experts):
        return experts, experts
    match = _EXPERT_LINEAR.match(name)
    if match:
        return match["experts"], name
    return grouped.get(name, name), name


def _group_names(recipe: QuantRecipe) -> dict[str, str]:
    """Member -> the unit name of its fused group: the parent and the leaves, ``a.b.q_proj+k_proj+v_proj``."""
    out = {}
    for group in recipe.fused_groups:
        parent = group[0].rpartition(".")[0]
        name = parent + "." + "+".join(n.rpartition(".")[2] for n in group)
        out.update({member: name for member in group})
    return out


def _weights(module: nn.Module) -> int:
    if isinstance(module, NVFP4Experts):
        return sum(module._parameters[p].numel() for p in ("gate_up_proj", "down_proj"))
    if isinstance(module, nn.Linear):
        return module.weight.numel()
    return sum(p.numel() for p in module.parameters(recurse=False) if p.ndim == 3)


def quantization_units(model: nn.Module, recipe: QuantRecipe) -> UnitTable:
    """The units of ``model``, wrapped by ``apply_fake_quant`` into ``recipe`` (its fused groups, its experts)."""
    prefix = next(n for n, m in model.named_modules() if m is models.decoder_layers(model))
    grouped = _group_names(recipe)
    members: dict[str, list[str]] = {}
    switches: dict[str, list[str]] = {}
    for name in recipe.quantized:
        unit, module = _unit_key(model, name, grouped)
        members.setdefault(unit, []).append(name)
        if module not in switches.setdefault(unit, []):
            switches[unit].append(module)
    units = []
    for name, names in members.items():
        fused_experts = switches[name] == [name]
        exclude = (name,) if fused_experts else (f"{name}.*",) if _EXPERT_LINEAR.match(names[0]) else tuple(names)
        modules = [model.get_submodule(m) for m in switches[name]]
        weights = sum(_weights(m) for m in modules)
        rows = sum(m.out_features for m in modules) if all(isinstance(m, nn.Linear) for m in modules) else None
        units.append(Unit(name, tuple(names), tuple(switches[name]), exclude, weights, _layer_of(name, prefix), rows))
    fixed = {}
    for name, module in model.named_modules():
        if isinstance(module, (NVFP4Linear, NVFP4Experts)):
            continue
        if isinstance(module, nn.Linear) or (name in recipe.skipped and _weights(module)):
            fixed[name] = _weights(module)
    return UnitTable(tuple(units), fixed, recipe.scheme)
