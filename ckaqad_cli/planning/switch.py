"""One model for every measurement of a plan: fake-quantized everywhere once, then switched unit by unit.

``apply_fake_quant`` wraps every quantizable module; with every switch off the model computes exactly as the BF16
teacher (an NVFP4Linear that quantizes nothing is ``F.linear``), so the teacher and any mix of NVFP4 and BF16 units
share one copy of the weights. An FP8 unit is an FP8Linear over the same weights, swapped in for the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

from ckaqad_cli.planning.units import Unit, UnitTable, quantization_units
from ckaqad_cli.quant import NVFP4Linear, QuantRecipe, apply_fake_quant
from ckaqad_cli.quant_fp8 import FP8Linear
from ckaqad_cli.quant_moe import NVFP4Experts
from ckaqad_kernels.nvfp4_spec import DEFAULT_ACTIVATION_ARITHMETIC, DEFAULT_SCALE_RULE


def prepare(model: nn.Module, scheme: str, exclude: Iterable[str], scale_rule: str = DEFAULT_SCALE_RULE,
            activation_arithmetic: str = DEFAULT_ACTIVATION_ARITHMETIC) -> tuple[UnitTable, QuantRecipe]:
    """Wrap ``model`` in place as uniform NVFP4 would, switch every unit off; its units and the uniform recipe. An
    mse-act model needs its channel weights (quant_calibration.fit_channel_weights) before a unit is switched on."""
    recipe = apply_fake_quant(model, scheme=scheme, exclude=tuple(exclude), scale_rule=scale_rule,
                              activation_arithmetic=activation_arithmetic)
    set_quantization(model.modules(), on=False, scheme=scheme)
    return quantization_units(model, recipe), recipe


def set_quantization(modules: Iterable[nn.Module], *, on: bool, scheme: str) -> None:
    """Switch the weight (and for w4a4 the input) fake quantization of the wrapped ``modules`` on or off."""
    for module in modules:
        if isinstance(module, (NVFP4Linear, NVFP4Experts)):
            module.quantize_weight = on
            module.quantize_input = on and scheme == "w4a4"


def unit_modules(model: nn.Module, units: Iterable[Unit]) -> list[nn.Module]:
    return [model.get_submodule(name) for unit in units for name in unit.modules]


@contextlib.contextmanager
def quantized(model: nn.Module, units: Iterable[Unit], scheme: str) -> Iterator[None]:
    """Within the block, ``units`` run in NVFP4 and every other unit in BF16."""
    modules = unit_modules(model, units)
    set_quantization(modules, on=True, scheme=scheme)
    try:
        yield
    finally:
        set_quantization(modules, on=False, scheme=scheme)


def nvfp4_units(table: UnitTable, kept: Iterable[str]) -> list[Unit]:
    """The units a plan quantizes: all but the ``kept`` ones."""
    kept = set(kept)
    return [u for u in table.units if u.name not in kept]


@contextlib.contextmanager
def planned(model: nn.Module, table: UnitTable, kept: Iterable[str], upgrade: str = "bf16") -> Iterator[None]:
    """Within the block, a plan runs: the ``kept`` units in ``upgrade`` (settings.plan.UPGRADES), every other in
    NVFP4."""
    kept = set(kept)
    names = [m for u in table.units if u.name in kept for m in u.modules] if upgrade == "fp8" else []
    originals = {name: FP8Linear.swap_in(model, name, quantize_input=table.scheme == "w4a4") for name in names}
    try:
        with quantized(model, nvfp4_units(table, kept), table.scheme):
            yield
    finally:
        for name, original in originals.items():
            model.set_submodule(name, original)
