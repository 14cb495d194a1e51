"""Forward KL(teacher || student) on next-token distributions, computed in token chunks.

The full-vocabulary float32 logits of a long batch (tokens x vocab x 4 bytes: 20 GB for 32k tokens of a 151k
vocabulary) never sit in memory at once: :func:`chunked_kl` takes the final hidden states and the two output heads,
and each chunk's logits are made inside an activation checkpoint, so they are freed after the chunk and made again
in the backward pass.

Conventions (NVIDIA QAD / Hinton distillation): per token, sum over the vocabulary of
``p_T * (log p_T - log p_S)`` at temperature ``T`` on both sides, times ``T**2`` so gradient magnitudes do not depend
on ``T``; the loss is the mean over real (unmasked) tokens. ``topk=K`` keeps the teacher's K most likely tokens and
renormalizes both distributions over them (Megatron's top-k logit distillation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_CHUNK_TOKENS = 1024


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    topk: int | None = None,
) -> torch.Tensor:
    """Per-token KL(teacher || student), float32, shape ``logits.shape[:-1]``; T**2 scaled; top-k renormalized."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if topk is not None and topk < t.shape[-1]:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        t, index = t.topk(topk, dim=-1)
        s = s.gather(-1, index)
    log_p_t = F.log_softmax(t, dim=-1)
    log_p_s = F.log_softmax(s, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2


def _chunk_kl_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    temperature: float,
    topk: int | None,
) -> torch.Tensor:
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    return token_kl(student_head(student_hidden), teacher_logits, temperature=temperature, topk=topk).sum()


def chunked_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    topk: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Masked mean over tokens of KL(teacher || student), from final hidden states ``[..., d]`` and output heads.

    ``mask`` (same shape as the hidden states without the last dimension, nonzero = real token) selects the tokens
    that count. Differentiable with respect to ``student_hidden`` and the student head's parameters; the teacher side
    runs without gradient. Peak extra memory is a few ``chunk_tokens x vocab`` float32 tensors.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student and teacher hidden states cover different tokens: {tuple(student_hidden.shape[:-1])} vs "
            f"{tuple(teacher_hidden.shape[:-1])}"
        )
    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    n = s.shape[0]
    if n == 0:
        raise ValueError("the mask selects no tokens")
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        args = (s[start : start + chunk_tokens], t[start : start + chunk_tokens], student_head, teacher_head)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_kl_sum, *args, temperature, topk, use_reentrant=False)
        else:
            total = total + _chunk_kl_sum(*args, temperature, topk)
    return total / n
