"""Plans side by side against the BF16 teacher: per-layer CKA, output KL and top-1 (as ``diagnose`` measures a PTQ
student), and the built-in task accuracy, each plan run by switching its units on in the one prepared model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from rich.console import Console
from torch import nn

from ckaqad_cli.cka import TokenFilter
from ckaqad_cli.cka_streaming import StreamingCKA
from ckaqad_cli.kl import token_kl
from ckaqad_cli.planning.switch import planned
from ckaqad_cli.planning.units import UnitTable
from ckaqad_cli.progress import make_progress
from ckaqad_cli.quant import freeze_quantized_weights
from ckaqad_cli.models import capture_residuals


@torch.no_grad()
def compare(model: nn.Module, table: UnitTable, plans: Mapping[str, Collection[str]], sequences: torch.Tensor, *,
            batch_size: int, bos_token_id: int | None, console: Console, upgrade: str = "bf16") -> dict[str, dict]:
    """{label: {linear_cka (embeddings, then every decoder layer), mean_cka, min_cka, kl, top1}} of each plan
    (label -> the units it upgrades to ``upgrade``) against the teacher."""
    device = next(model.parameters()).device
    batches = [b.to(device) for b in torch.split(sequences, batch_size)]
    token_filter = TokenFilter()
    acc: list[StreamingCKA] = []
    sums = {label: {"kl": 0.0, "top1": 0.0} for label in plans}
    tokens = 0
    with make_progress(console, transient=True) as progress:
        task = progress.add_task("plan comparison", total=len(batches) * (len(plans) + 1))
        for ids in batches:
            with capture_residuals(model) as teacher:
                teacher_logits = model(input_ids=ids, use_cache=False).logits
            acc = acc or [StreamingCKA() for _ in teacher[:-1]]
            keep = token_filter.mask(ids, None, (), bos_token_id)
            for a, t in zip(acc, teacher[:-1], strict=True):
                a.update_teacher(t[keep])
            progress.advance(task)
            for label, kept in plans.items():
                with planned(model, table, kept, upgrade), capture_residuals(model) as student:
                    logits = model(input_ids=ids, use_cache=False).logits
                for a, s, t in zip(acc, student[:-1], teacher[:-1], strict=True):
                    a.update_student(label, s[keep], t[keep])
                sums[label]["kl"] += float(token_kl(logits, teacher_logits).sum())
                sums[label]["top1"] += float((logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
                progress.advance(task)
            tokens += ids.numel()
    out = {}
    for label in plans:
        linear = [a.linear(label) for a in acc]
        out[label] = {"linear_cka": linear, "mean_cka": sum(linear[1:]) / len(linear[1:]), "min_cka": min(linear[1:]),
                      "kl": sums[label]["kl"] / tokens, "top1": sums[label]["top1"] / tokens}
    return out


def task_accuracy(model: nn.Module, tokenizer, table: UnitTable, plans: Mapping[str, Collection[str]],
                  problems: Sequence, evaluate: Callable[..., dict], upgrade: str = "bf16") -> dict[str, float]:
    """Built-in task accuracy (``evaluate``: the suite's exact-match scorer) of the teacher (label ``teacher``) and of
    each plan, each plan on a copy whose NVFP4 weights are quantized once (``quant.freeze_quantized_weights``) rather
    than at every decoding step."""
    out = {"teacher": evaluate(model, tokenizer, problems)["overall"]}
    for label, kept in plans.items():
        with planned(model, table, kept, upgrade):
            student = copy.deepcopy(model)
        freeze_quantized_weights(student)
        out[label] = evaluate(student, tokenizer, problems)["overall"]
        del student
    return out
