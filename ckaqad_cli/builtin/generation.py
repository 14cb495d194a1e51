"""Batched decoding with a KV cache: greedy for evaluation, sampled (seeded) for the reasoner's RL.

Prompts are left-padded with explicit ``position_ids``, so a prompt's reply does not depend on the prompts batched
with it (up to floating-point rounding). The prompt is run once; then each step feeds only the new token against the
cache, which makes a 200-token trace cost about as much as its prompt, where re-running the whole sequence (as
``tasks.greedy_answers`` does for any module) would cost 100 times more.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from rich.console import Console
from transformers import DynamicCache

from ckaqad_cli.progress import make_progress


def _cache_keyword(model) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_padded(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of ``BOS prompt`` for each prompt, left-padded to the longest, on ``device``."""
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _decode_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float,
                  generator: torch.Generator | None) -> list[str | None]:
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    ids, mask = left_padded(tokenizer, prompts, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = {_cache_keyword(model): DynamicCache()}
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **cache).logits[:, -1, :].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device)
        else:
            token = logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, eos), token)
        generated.append(token)
        finished |= token == eos
        if bool(finished.all()):
            break
        ids, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    replies: list[str | None] = []
    for row in torch.stack(generated, dim=1).tolist():
        replies.append(tokenizer.decode(row[: row.index(eos)], skip_special_tokens=False) if eos in row else None)
    return replies


def decode(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64,
           temperature: float = 0.0, generator: torch.Generator | None = None,
           progress: bool = False) -> list[str | None]:
    """The reply to each prompt, up to (not including) EOS, or None where no EOS came within ``max_new_tokens``.

    Greedy when ``temperature`` is 0, else sampled from the softmax at that temperature with ``generator`` (a CPU
    generator; the draws depend on the batching, so a seeded run repeats only with the same ``batch_size``). Prompts
    are batched in order of length (less padding) and the replies returned in the order given. ``progress`` shows a
    bar (plain lines in a log) on stderr. The model is put in eval mode and its mode restored.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with make_progress(Console(stderr=True), label="generate", enabled=progress) as bar:
            task = bar.add_task("decode", total=len(prompts))
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = _decode_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, temperature,
                                      generator)
                for i, reply in zip(chunk, batch):
                    replies[i] = reply
                bar.update(task, advance=len(chunk))
    finally:
        model.train(was_training)
    return replies
