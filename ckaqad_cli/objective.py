"""The CKA-QAD objective: loss = KL(teacher || student) + lambda * mean over selected layers of (1 - CKA).

Decoder-layer outputs are captured with forward hooks. The CKA term uses ``cka_tokens`` positions per step, the same
for teacher and student, drawn per sequence from the tokens the CKA engine's :class:`~ckaqad_cli.cka.TokenFilter`
keeps (BOS / position 0 and padding dropped). Positions are drawn for the global batch from one seeded generator,
and under torchrun the sampled features of all ranks are gathered (with gradient) before CKA, so the loss is the one a
single process computes on the same global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ckaqad_cli import distributed as D
from ckaqad_cli.cka import Standardizer, TokenFilter, cka_loss, linear_cka
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.kl import chunked_kl

# lambda is balanced as factor * KL / CKA-term; a CKA term this small counts as zero (no blow-up at CKA = 1).
_MIN_CKA_TERM = 1e-8
TEACHER_MEMO_BYTES = 2 * 2**30
"""What a TeacherMemo holds at most: either built-in teacher's 300 preset steps take 0.63 GB."""


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Decoder-layer indices from ``--cka-layers``: ``all``; ``every:K`` (every K-th layer, ending at the last);
    a comma list of indices (negative counts from the end) and inclusive ranges ``a-b``; or a slice ``a:b:c``."""
    text = spec.strip().lower()
    if text == "all":
        return list(range(num_layers))
    if text.startswith("every:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise CkaqadError(f"--cka-layers {spec!r}: every:K needs a whole K >= 1")
        return [i for i in range(num_layers) if (num_layers - 1 - i) % k == 0]
    out: set[int] = set()
    try:
        if ":" in text:
            parts = [int(p) if p else None for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            out.update(range(num_layers)[slice(*parts)])
        else:
            for item in text.split(","):
                item = item.strip()
                if "-" in item.lstrip("-"):
                    first, last = item[0] + item[1:].split("-", 1)[0], item[1:].split("-", 1)[1]
                    lo, hi = _index(int(first), num_layers, spec), _index(int(last), num_layers, spec)
                    out.update(range(lo, hi + 1))
                else:
                    out.add(_index(int(item), num_layers, spec))
    except ValueError:
        raise CkaqadError(
            f"--cka-layers {spec!r} is not 'all', 'every:K', a list like '0,3,5-7' or a slice like '2:10:2'"
        ) from None
    if not out:
        raise CkaqadError(f"--cka-layers {spec!r} selects no layer of the {num_layers}")
    return sorted(out)


def _index(i: int, n: int, spec: str) -> int:
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise CkaqadError(f"--cka-layers {spec!r}: layer {i} is out of range (the model has {n} layers)")
    return j


class CausalLMBody(nn.Module):
    """A causal LM seen as body (embeddings + decoder, one module, so FSDP2 can root-shard it) plus output head.

    The head is applied by :func:`~ckaqad_cli.kl.chunked_kl` chunk by chunk, so full logits never exist at once.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits


class LayerTap:
    """Forward hooks on decoder layers; inside :meth:`capture` they record the chosen layers' outputs, either whole
    or only at given (row, column) positions (so a student keeps just those rows in its graph)."""

    def __init__(self, layers: nn.ModuleList):
        self._active: frozenset[int] = frozenset()
        self._positions: tuple[torch.Tensor, torch.Tensor] | None = None
        self.out: dict[int, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if index not in self._active:
                return  # also skips the re-run of a layer by gradient checkpointing, which comes after the capture
            h = output[0] if isinstance(output, (tuple, list)) else output
            if self._positions is not None:
                rows, cols = self._positions
                h = h[rows.to(h.device), cols.to(h.device)]
            self.out[index] = h

        return hook

    @contextlib.contextmanager
    def capture(
        self, indices: list[int], positions: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> Iterator[dict[int, torch.Tensor]]:
        """Record the outputs of the layers ``indices`` of the forwards run in the block (at ``positions`` if given).

        With autograd on, the positions are picked when the block ends, outside the forward: a hook may run inside an
        activation checkpoint (older transformers releases checkpoint a layer's ``__call__``, hooks included), and an
        op added there would be missing from the recompute, which runs after the capture (a CheckpointError). Holding
        the whole output until then costs no memory: autograd keeps it for the next layer anyway. Without autograd
        they are picked at once, so an evaluation never holds every layer's whole output.
        """
        self.out = {}
        defer = positions is not None and torch.is_grad_enabled()
        self._active, self._positions = frozenset(indices), None if defer else positions
        try:
            yield self.out
        finally:
            self._active, self._positions = frozenset(), None
        if defer:
            rows, cols = positions
            for i, h in self.out.items():
                self.out[i] = h[rows.to(h.device), cols.to(h.device)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def sample_positions(
    keep: torch.Tensor, per_sequence: int, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``per_sequence`` kept positions of each row, chosen by the smallest ``scores`` (uniform draws).

    Returns (rows, cols), row-major and sorted by column within a row.
    """
    scores = scores.masked_fill(~keep.cpu(), math.inf)
    k = min(per_sequence, keep.shape[1])
    values, cols = scores.topk(k, dim=1, largest=False)
    cols, order = cols.sort(dim=1)
    valid = values.gather(1, order).isfinite()
    rows = torch.arange(keep.shape[0]).unsqueeze(1).expand_as(cols)
    return rows[valid], cols[valid]


class TeacherMemo:
    """The teacher's last hidden states of training micro-batches, kept in memory for a later run over the same rows.

    The pipeline's KL-only baseline reads the rows its CKA-QAD run read, in the same order, from the same teacher: with
    the memo that run's teacher forward is a lookup (about a fifth of a step on the CPU), and its results are bit for
    bit those without, the tensors being the ones the same forward gave. Keyed by the token ids themselves; storing
    stops at ``max_bytes`` (the later steps then run the teacher).
    """

    def __init__(self, max_bytes: int = TEACHER_MEMO_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._hidden: dict[tuple[tuple[int, ...], bytes], torch.Tensor] = {}

    @staticmethod
    def _key(ids: torch.Tensor) -> tuple[tuple[int, ...], bytes]:
        return tuple(ids.shape), ids.cpu().numpy().tobytes()

    def get(self, ids: torch.Tensor) -> torch.Tensor | None:
        hidden = self._hidden.get(self._key(ids))
        self.hits += hidden is not None
        return hidden

    def put(self, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        key = self._key(ids)
        if key not in self._hidden and self.bytes + size <= self.max_bytes:
            self._hidden[key] = hidden.detach()
            self.bytes += size

    def clear(self) -> None:
        self._hidden.clear()
        self.bytes = 0


@dataclass
class ObjectiveSettings:
    temperature: float = 1.0
    kl_topk: int | None = None
    kl_chunk_tokens: int = 1024
    lambda_cka: float | None = None  # fixed lambda; None = balanced
    cka_balance: float = 1.0  # lambda = cka_balance * KL / CKA-term (both detached) when lambda_cka is None
    cka_layers: tuple[int, ...] = ()
    cka_tokens: int = 512
    cka_debiased: bool = False
    token_filter: TokenFilter = TokenFilter()

    @property
    def uses_cka(self) -> bool:
        return self.lambda_cka != 0.0


@dataclass
class Terms:
    loss: torch.Tensor  # this rank's differentiable loss
    kl: float  # global mean KL (all ranks)
    cka_term: float | None  # mean over layers of (1 - CKA); None when lambda is 0
    lambda_cka: float


class Objective:
    """Computes the loss terms of one micro-batch for a student/teacher pair (both :class:`CausalLMBody`)."""

    def __init__(
        self,
        student: CausalLMBody,
        teacher: CausalLMBody,
        student_layers: nn.ModuleList,
        teacher_layers: nn.ModuleList,
        settings: ObjectiveSettings,
        ctx: D.DistContext,
        *,
        bos_token_id: int | None = None,
        standardizer: Standardizer | None = None,
        teacher_memo: TeacherMemo | None = None,
    ):
        self.student, self.teacher = student, teacher
        self.teacher_memo = teacher_memo
        self.student_tap, self.teacher_tap = LayerTap(student_layers), LayerTap(teacher_layers)
        self.s = settings
        self.ctx = ctx
        self.bos = bos_token_id
        self.standardizer = standardizer
        self.num_layers = len(teacher_layers)

    def _keep(self, input_ids: torch.Tensor, teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
        return self.s.token_filter.mask(input_ids, None, teacher_hidden, self.bos)

    def _gathered(self, feats: dict[int, torch.Tensor], layers: list[int]) -> list[torch.Tensor]:
        """Per-layer features of all ranks: one collective for all layers (concatenated, then split)."""
        width = feats[layers[0]].shape[-1]
        joint = D.gather_rows(torch.cat([feats[i] for i in layers], dim=-1), self.ctx)
        return list(joint.split(width, dim=-1))

    def __call__(self, global_ids: torch.Tensor, local_rows: slice, scores: torch.Tensor) -> Terms:
        """Loss of this rank's rows ``global_ids[local_rows]``; ``scores`` [global batch, seq] picks CKA tokens."""
        s = self.s
        ids = global_ids[local_rows].to(self.ctx.device)
        layers = list(s.cka_layers) if s.uses_cka else []
        memo = self.teacher_memo
        t_hidden = memo.get(ids) if memo is not None and not layers else None  # a CKA run needs the layers too
        if t_hidden is None:
            with torch.no_grad(), self.teacher_tap.capture(layers) as t_out:
                t_hidden = self.teacher(ids)
            if memo is not None:
                memo.put(ids, t_hidden)
        positions = None
        if layers:
            keep = self._keep(ids, [t_out[i] for i in layers])
            per_seq = math.ceil(s.cka_tokens / global_ids.shape[0])
            positions = sample_positions(keep, per_seq, scores[local_rows])
            t_feats = {i: t_out[i][positions[0].to(ids.device), positions[1].to(ids.device)] for i in layers}
            t_out.clear()
        with self.student_tap.capture(layers, positions) as s_out:
            s_hidden = self.student(ids)
        kl = chunked_kl(
            s_hidden, t_hidden, self.student.head, self.teacher.head,
            temperature=s.temperature, topk=s.kl_topk, chunk_tokens=s.kl_chunk_tokens,
        )
        kl_global = float(D.all_reduce_mean(kl.detach(), self.ctx))
        if not layers:
            return Terms(loss=kl, kl=kl_global, cka_term=None, lambda_cka=0.0)
        s_list, t_list = self._gathered(s_out, layers), self._gathered(t_feats, layers)
        if self.standardizer is not None:
            s_list = [self.standardizer(i, t, f) for i, t, f in zip(layers, t_list, s_list)]
            t_list = [self.standardizer(i, t, t) for i, t in zip(layers, t_list)]
        cka_term = cka_loss(s_list, t_list, debiased=s.cka_debiased)
        cka_value = float(cka_term.detach())
        if s.lambda_cka is not None:
            lam = s.lambda_cka
        else:
            lam = s.cka_balance * kl_global / cka_value if cka_value > _MIN_CKA_TERM else 0.0
        return Terms(loss=kl + lam * cka_term, kl=kl_global, cka_term=cka_value, lambda_cka=lam)

    @torch.no_grad()
    def fit_standardizer(self, ids: torch.Tensor) -> None:
        """Fit the per-feature scales once, on held-out rows, so that a resumed run uses the same ones."""
        if self.standardizer is None or not self.s.uses_cka:
            return
        layers = list(self.s.cka_layers)
        ids = ids.to(self.ctx.device)
        with self.teacher_tap.capture(layers) as t_out:
            self.teacher(ids)
        keep = self._keep(ids, [t_out[i] for i in layers])
        for i in layers:
            self.standardizer(i, t_out[i][keep], t_out[i][keep])

    @torch.no_grad()
    def evaluate(self, eval_ids: torch.Tensor, batch_size: int, max_tokens: int, seed: int) -> dict:
        """Held-out KL (mean over all tokens) and linear CKA of every decoder layer on up to ``max_tokens`` filtered
        positions (the same positions every time: drawn from a generator seeded with ``seed``)."""
        ctx = self.ctx
        all_layers = list(range(self.num_layers))
        gen = torch.Generator().manual_seed(seed)
        n_seq = eval_ids.shape[0]
        per_seq = max(1, math.ceil(max_tokens / n_seq))
        kl_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        tokens = torch.zeros((), dtype=torch.float64, device=ctx.device)
        s_feats: dict[int, list[torch.Tensor]] = {i: [] for i in all_layers}
        t_feats: dict[int, list[torch.Tensor]] = {i: [] for i in all_layers}
        for start in range(0, n_seq, batch_size):
            batch = eval_ids[start : start + batch_size]
            scores = torch.rand(batch.shape, generator=gen)
            rows = _rank_rows(batch.shape[0], ctx)
            ids = batch[rows].to(ctx.device)  # the stage makes every eval batch split evenly over ranks
            with self.teacher_tap.capture(all_layers) as t_out:
                t_hidden = self.teacher(ids)
            keep = self._keep(ids, [t_out[i] for i in all_layers])
            r, c = sample_positions(keep, per_seq, scores[rows])
            r, c = r.to(ctx.device), c.to(ctx.device)
            for i in all_layers:
                t_feats[i].append(t_out[i][r, c].float().cpu())
            t_out.clear()
            with self.student_tap.capture(all_layers, (r, c)) as s_out:
                s_hidden = self.student(ids)
            for i in all_layers:
                s_feats[i].append(s_out[i].float().cpu())
            kl = chunked_kl(
                s_hidden, t_hidden, self.student.head, self.teacher.head,
                temperature=self.s.temperature, topk=self.s.kl_topk, chunk_tokens=self.s.kl_chunk_tokens,
            )
            n = ids.shape[0] * ids.shape[1]
            kl_sum += kl.double() * n
            tokens += n
        if ctx.distributed:
            torch.distributed.all_reduce(kl_sum)
            torch.distributed.all_reduce(tokens)
        cka = []
        for i in all_layers:
            x = D.gather_rows(torch.cat(s_feats[i]).to(ctx.device), ctx)
            y = D.gather_rows(torch.cat(t_feats[i]).to(ctx.device), ctx)
            cka.append(float(linear_cka(x, y)))
        return {
            "eval_kl": float(kl_sum / tokens),
            "eval_cka_mean": sum(cka) / len(cka),
            "eval_cka_min": min(cka),
            "eval_cka": cka,
            "eval_cka_tokens": int(x.shape[0]),
        }


def _rank_rows(n: int, ctx: D.DistContext) -> slice:
    """This rank's contiguous share of ``n`` rows (the first ranks take one more when n does not divide)."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (ctx.rank < extra))
