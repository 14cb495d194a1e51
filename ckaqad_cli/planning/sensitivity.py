"""The sensitivity of every quantization unit: what quantizing that unit alone costs, measured against the teacher.

Three scores per unit, streamed over the calibration batches in bounded memory (docs/plan.md):

- **cka**: the mean of 1 - CKA at the unit's own decoder layer output and at the last decoder layer, between the model
  with that unit alone in NVFP4 and the BF16 teacher (linear CKA, the streaming engine of ``diagnose``, position 0
  and BOS dropped as there);
- **kl**: the mean per-token KL(teacher || model with that unit alone in NVFP4) of the next-token distributions;
- **grad**: AutoQuantize's Fisher (Taylor) estimate, ``sum over tokens and features of (dL/dY * (Q(Y) - Y))^2`` for
  each member output Y, with L the next-token cross-entropy of the BF16 model and Q(Y) the member's output with its
  weights (and w4a4 inputs) in NVFP4, from one backward pass a batch.

Cost, for U units in L decoder layers and B batches: the cka and kl scores share their forwards, one teacher forward
a batch per decoder layer that holds units, and one forward a batch per unit that runs only the layers from the
unit's own on (the layers before it replay the teacher's outputs): at most B (L + U) forwards, linear in U. The grad
score adds one forward and one backward a batch, and one extra forward of each quantized module. Memory: one model,
the teacher's layer outputs of one batch, and two CKA accumulators (O(d^2) each) per unit of one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from ckaqad_cli import models
from ckaqad_cli.cka import TokenFilter
from ckaqad_cli.cka_streaming import StreamingCKA
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.kl import chunked_kl
from ckaqad_cli.planning.switch import quantized, set_quantization, unit_modules
from ckaqad_cli.planning.units import Unit, UnitTable
from ckaqad_cli.progress import make_progress


@dataclass
class Sensitivity:
    """Per unit (by name): CKA at its own layer and at the last layer, KL and the gradient score; and the cost."""

    cka_own: dict[str, float]
    cka_last: dict[str, float]
    kl: dict[str, float]
    grad: dict[str, float]
    forwards_per_batch: float
    """Whole-model forward passes a calibration batch costs (partial forwards counted by their share of layers)."""
    backwards_per_batch: int
    batches: int
    tokens: int

    def scores(self, kind: str) -> dict[str, float]:
        """The score the chooser ranks by: ``cka`` (mean drift of the two layers), ``kl`` or ``grad``."""
        if kind == "cka":
            return {n: 1 - (self.cka_own[n] + self.cka_last[n]) / 2 for n in self.cka_own}
        return dict(getattr(self, kind))


class _Pass(NamedTuple):
    outputs: list[Any]
    """What each decoder layer returned (replayed for the layers before a unit)."""
    hidden: list[torch.Tensor]
    """Each decoder layer's output hidden states."""
    final: torch.Tensor
    """The hidden states the output head reads (after the final norm)."""


class _Replay(nn.Module):
    """Stands in for a decoder layer whose output is already known: returns it without computing."""

    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _forward(model: nn.Module, ids: torch.Tensor, replay: Sequence[Any] = ()) -> _Pass:
    """One forward of the decoder, the first ``len(replay)`` layers replaying those outputs."""
    layers = models.decoder_layers(model)
    outputs: list[Any] = list(replay) + [None] * (len(layers) - len(replay))

    def store(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            outputs[index] = output

        return hook

    originals = [layers[i] for i in range(len(replay))]
    handles = [layers[i].register_forward_hook(store(i)) for i in range(len(replay), len(layers))]
    for i, output in enumerate(replay):
        layers[i] = _Replay(output)
    try:
        final = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for handle in handles:
            handle.remove()
    return _Pass(outputs, [_hidden(o) for o in outputs], final)


def _by_layer(table: UnitTable) -> dict[int | None, list[Unit]]:
    out: dict[int | None, list[Unit]] = {}
    for unit in table.units:
        out.setdefault(unit.layer, []).append(unit)
    return out


@torch.no_grad()
def _drift(model: nn.Module, table: UnitTable, batches: list[torch.Tensor], bos_token_id: int | None,
           advance: Callable[[], None]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(CKA at each unit's own layer, CKA at the last layer, KL) with each unit alone in NVFP4."""
    n_layers = len(models.decoder_layers(model))
    head = model.get_output_embeddings()
    token_filter = TokenFilter()
    own_cka: dict[str, float] = {}
    last_cka: dict[str, float] = {}
    kl: dict[str, float] = {}
    for layer, units in _by_layer(table).items():
        start = 0 if layer is None else layer
        at = n_layers - 1 if layer is None else layer
        own = StreamingCKA()
        last = own if at == n_layers - 1 else StreamingCKA()
        kl_sums = dict.fromkeys((u.name for u in units), 0.0)
        tokens = 0
        for ids in batches:
            teacher = _forward(model, ids)
            keep = token_filter.mask(ids, None, (), bos_token_id)
            pairs = [(own, at)] if last is own else [(own, at), (last, n_layers - 1)]
            for acc, index in pairs:
                acc.update_teacher(teacher.hidden[index][keep])
            advance()
            for unit in units:
                with quantized(model, [unit], table.scheme):
                    student = _forward(model, ids, teacher.outputs[:start])
                for acc, index in pairs:
                    acc.update_student(unit.name, student.hidden[index][keep], teacher.hidden[index][keep])
                kl_sums[unit.name] += float(chunked_kl(student.final, teacher.final, head, head)) * ids.numel()
                advance()
            tokens += ids.numel()
        for unit in units:
            own_cka[unit.name], last_cka[unit.name] = own.linear(unit.name), last.linear(unit.name)
            kl[unit.name] = kl_sums[unit.name] / tokens
    return own_cka, last_cka, kl


def _gradient(model: nn.Module, table: UnitTable, batches: list[torch.Tensor],
              advance: Callable[[], None]) -> dict[str, float]:
    """AutoQuantize's score: sum of (dL/dY * (Q(Y) - Y))^2 over every member output Y of each unit."""
    device = batches[0].device
    totals = {u.name: torch.zeros((), dtype=torch.float64, device=device) for u in table.units}
    owner = {id(m): u.name for u in table.units for m in unit_modules(model, [u])}

    def score_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        with torch.no_grad():
            set_quantization([module], on=True, scheme=table.scheme)
            try:
                delta = module.forward(*args, **kwargs) - output
            finally:
                set_quantization([module], on=False, scheme=table.scheme)
        name = owner[id(module)]

        def on_grad(grad: torch.Tensor) -> None:
            totals[name] += (grad.float() * delta.float()).square().sum().double()

        output.register_hook(on_grad)

    def track(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)  # gradients reach the activations, never the weights

    handles = [m.register_forward_hook(score_hook, with_kwargs=True) for u in table.units
               for m in unit_modules(model, [u])]
    handles.append(model.get_input_embeddings().register_forward_hook(track))
    try:
        with torch.enable_grad():
            for ids in batches:
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                advance()
    finally:
        for handle in handles:
            handle.remove()
    return {name: float(total) for name, total in totals.items()}


def measure(model: nn.Module, table: UnitTable, sequences: torch.Tensor, *, batch_size: int,
            bos_token_id: int | None, console: Console) -> Sensitivity:
    """Every unit's three scores on ``sequences`` (packed token ids), ``model`` prepared by ``switch.prepare``."""
    if not table.units:
        raise CkaqadError("the model has no quantization unit to plan: every Linear is excluded or too narrow")
    device = next(model.parameters()).device
    batches = [b.to(device) for b in torch.split(sequences, batch_size)]
    groups = _by_layer(table)
    n_layers = len(models.decoder_layers(model))
    total = len(batches) * (len(groups) + len(table.units) + 1)
    with make_progress(console, transient=True) as progress:
        task = progress.add_task("plan sensitivity", total=total)

        def advance() -> None:
            progress.advance(task)

        own, last, kl = _drift(model, table, batches, bos_token_id, advance)
        grad = _gradient(model, table, batches, advance)
    partial = sum((n_layers - (u.layer or 0)) / n_layers for u in table.units)
    return Sensitivity(own, last, kl, grad, forwards_per_batch=len(groups) + partial + 1, backwards_per_batch=1,
                       batches=len(batches), tokens=int(sequences.numel()))
