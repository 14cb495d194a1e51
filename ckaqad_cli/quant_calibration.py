"""Calibration of the fake-quantized modules: what each NVFP4Linear and fused experts module sees as input, recorded
over calibration text. The largest |input| becomes a static input scale (quant.set_input_amax); the per-channel mean
square is the mse-act scale rule's channel weights (quant.set_channel_weights), kept beside a student in
SECOND_MOMENTS_FILE so that pack quantizes with the weights distill trained with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckaqad_cli.atomic import atomic_write_bytes
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.quant import NVFP4Linear, set_channel_weights
from ckaqad_cli.quant_moe import NVFP4Experts, expert_module_names, num_experts
from ckaqad_kernels.nvfp4_ref import tensor_amax

SECOND_MOMENTS_FILE = "input_second_moments.safetensors"
"""Beside quant_recipe.json when the recipe's scale rule is mse-act: {module: float32 [in_features] E[x^2]}."""


def save_second_moments(directory: str | Path, moments: dict[str, torch.Tensor]) -> Path:
    """Write {module: E[x^2] per input channel} as float32 tensors to SECOND_MOMENTS_FILE in ``directory``."""
    from safetensors.torch import save

    tensors = {name: m.detach().to("cpu", torch.float32).clone() for name, m in moments.items()}  # none shared
    return atomic_write_bytes(Path(directory) / SECOND_MOMENTS_FILE, save(tensors))


def load_second_moments(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read SECOND_MOMENTS_FILE from ``directory``; a missing or unreadable file is a CkaqadError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / SECOND_MOMENTS_FILE
    if not path.is_file():
        raise CkaqadError(f"no {SECOND_MOMENTS_FILE} in {directory}: the mse-act scale rule needs the calibration "
                          f"inputs' second moments")
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise CkaqadError(f"cannot read {path}: {e}") from None


class InputRecord:
    """What record_inputs collects: ``amax`` {module: max |input|} and the per-channel sums behind
    :meth:`second_moments`."""

    def __init__(self) -> None:
        self.amax: dict[str, float] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}
        self._aliases: dict[str, str] = {}
        """Per-expert name -> the key its layer's projection is accumulated under (one input for all experts)."""

    def add(self, key: str, x: torch.Tensor) -> None:
        """Account one input of ``key`` (its rows, last dimension the input channels)."""
        seen = float(tensor_amax(x))
        self.amax[key] = max(self.amax.get(key, seen), seen)
        rows = x.detach().reshape(-1, x.shape[-1])
        square_sum = rows.float().square().sum(0).double()  # float32 per call, float64 across calls
        if key in self._sums:
            self._sums[key] += square_sum
        else:
            self._sums[key] = square_sum
        self._rows[key] = self._rows.get(key, 0) + rows.shape[0]

    def alias(self, names: Iterable[str], key: str) -> None:
        self._aliases.update(dict.fromkeys(names, key))

    def second_moments(self) -> dict[str, torch.Tensor]:
        """{module: E[x^2] per input channel, float32 [in_features]} over every recorded input (mse-act's weights)."""
        means = {key: (total / max(self._rows[key], 1)).to(torch.float32).cpu() for key, total in self._sums.items()}
        out = {key: m for key, m in means.items() if key not in self._aliases.values()}
        out.update({name: means[key].clone() for name, key in self._aliases.items() if key in means})
        return out


@contextlib.contextmanager
def record_inputs(model: nn.Module) -> Iterator[InputRecord]:
    """Within the block, collect what each NVFP4Linear and fused experts module sees as input: the largest |input|
    (``record.amax``, the static input scale) and its per-channel mean square (``record.second_moments()``, the
    mse-act channel weights).

    Fused experts are recorded under their per-expert names, every expert of a module with the module's values (over
    all routed tokens): their inputs share one global scale per projection. During the block, mse-act weights
    without channel weights yet are quantized with mse.
    """
    record = InputRecord()
    handles = []
    observed: list[nn.Module] = []

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            record.add(name, args[0])

        return hook

    def observer_for(name: str, module: NVFP4Experts):
        members = expert_module_names(name, num_experts(module))
        by_projection = {"gate_up": [m for m in members if not m.endswith(".down_proj")], "down": members[2::3]}
        for projection, names in by_projection.items():
            record.alias(names, f"{name}:{projection}")

        def observe(projection: str, x: torch.Tensor) -> None:
            if x.numel():
                record.add(f"{name}:{projection}", x)

        return observe

    for name, module in model.named_modules():
        if isinstance(module, NVFP4Linear):
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        elif isinstance(module, NVFP4Experts):
            module.input_observer = observer_for(name, module)
        else:
            continue
        module.calibrating = True
        observed.append(module)
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        for module in observed:
            module.calibrating = False
            if isinstance(module, NVFP4Experts):
                module.input_observer = None
        for name, key in record._aliases.items():
            if key in record.amax:
                record.amax[name] = record.amax[key]
        for key in set(record._aliases.values()):
            record.amax.pop(key, None)


@contextlib.contextmanager
def record_input_amax(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block, collect the largest |input| each NVFP4Linear sees: {module name: amax}, for calibration
    (record_inputs' ``amax``, filled in when the block ends)."""
    with record_inputs(model) as record:
        yield record.amax


def record_over(model: nn.Module, sequences: torch.Tensor, *, batch_size: int = 8):
    """What every fake-quantized module of ``model`` sees over ``sequences`` (token ids), without gradients: a
    :class:`InputRecord` (``.amax``, ``.second_moments()``)."""
    device = next(model.parameters()).device
    with torch.no_grad(), record_inputs(model) as record:
        for row in range(0, sequences.shape[0], batch_size):
            model(input_ids=sequences[row : row + batch_size].to(device))
    return record


def fit_channel_weights(model: nn.Module, sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mse-act scale rule's calibration: every quantized module's per-input-channel E[x^2] over ``sequences``
    (token ids), installed as its channel weights, and returned (to be saved beside the model,
    :func:`save_second_moments`, for pack)."""
    moments = record_over(model, sequences).second_moments()
    set_channel_weights(model, moments)
    return moments
