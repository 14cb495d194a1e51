"""The CKA engine for one batch: linear and debiased CKA, the loss, and the token filters shared with the
streaming statistics (:mod:`ckaqad_cli.cka_streaming`).

Notation (docs/cka.md): X (n x d1) and Y (n x d2) are the features of the same n tokens, one row per token.
Linear CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on features centered over tokens (Kornblith et al. 2019).
Debiased CKA puts the unbiased HSIC estimator (HSIC1, Song et al. 2012) in numerator and denominator.

Every function computes in float32, or float64 when an input is float64, whatever the model's dtype (and with
autocast off: an autocast region does not turn its products into bf16 ones); features are scaled to unit Frobenius
norm before any fourth-power term, so bf16-scale activations cannot overflow. Nothing detaches or changes the
caller's tensors in place, so all of it is differentiable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ckaqad_cli.errors import CkaqadError

EPS = 1e-12
"""The floor of every norm and denominator (so zero features give CKA 0, not NaN)."""
FORMS = ("auto", "feature", "gram")


# -- helpers ---------------------------------------------------------------------------------------------------
def cka_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when an input is float64, else float32: the arithmetic of every CKA statistic."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def token_rows(x: Tensor) -> Tensor:
    """[..., d] -> [n, d] (tokens from all leading dimensions)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def _prepare(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten, upcast, center over tokens and scale to unit Frobenius norm (none of it in place)."""
    x, y = token_rows(x), token_rows(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same tokens on both sides: got {x.shape[0]} and {y.shape[0]} rows")
    dtype = cka_dtype(x, y)
    out = []
    for z in (x, y):
        z = z.to(dtype)
        z = z - z.mean(dim=0, keepdim=True)
        out.append(z / z.norm().clamp_min(EPS))
    return out[0], out[1]


def _pick_form(form: str, n: int, d1: int, d2: int) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form != "auto":
        return form
    feature_cost = n * (d1 * d1 + d2 * d2 + d1 * d2)
    gram_cost = n * n * (d1 + d2 + 2)
    return "gram" if gram_cost < feature_cost else "feature"


def _zero_diagonal(k: Tensor) -> Tensor:
    return k - torch.diag_embed(torch.diagonal(k))


def u_center(k: Tensor) -> Tensor:
    """U-centering of a Gram matrix (Szekely & Rizzo 2014): <u_center(K), u_center(L)> / (n(n-3)) = HSIC1(K, L)."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 tokens, got {n}")
    k = _zero_diagonal(k)
    means = k.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    k = k - means[:, None] - means[None, :]
    return _zero_diagonal(k)


def _autocast_off(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``fn(x, y, ...)`` with autocast off on ``x``'s device: under distill's bf16 autocast on a GPU its matmuls
    would otherwise take bf16 operands and round their products to bf16."""

    @functools.wraps(fn)
    def wrapper(x: Tensor, y: Tensor, **kwargs) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, y, **kwargs)

    return wrapper


def _cka_from_hsic(xy: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    return xy / torch.sqrt((xx * yy).clamp_min(EPS * EPS))


# -- linear CKA ------------------------------------------------------------------------------------------------
@_autocast_off
def linear_cka(x: Tensor, y: Tensor, *, form: str = "auto") -> Tensor:
    """Linear CKA of two feature matrices [n, d1], [n, d2] (or [..., d]); a 0-d tensor in [0, 1].

    ``form`` "feature" costs O(n d^2), "gram" O(n^2 d); "auto" picks the cheaper (the value is the same).
    """
    x, y = _prepare(x, y)
    if _pick_form(form, x.shape[0], x.shape[1], y.shape[1]) == "feature":
        xy = (y.T @ x).square().sum()
        xx = (x.T @ x).square().sum()
        yy = (y.T @ y).square().sum()
    else:  # columns are centered, so X X^T is already H K H
        k, l = x @ x.T, y @ y.T
        xy, xx, yy = (k * l).sum(), k.square().sum(), l.square().sum()
    return _cka_from_hsic(xy, xx, yy)


def _hsic1_feature(x: Tensor, y: Tensor) -> Tensor:
    """n(n-3) * HSIC1 of linear kernels, from centered features (no n x n matrix)."""
    n = x.shape[0]
    rx, ry = x.square().sum(dim=1), y.square().sum(dim=1)
    return (y.T @ x).square().sum() - n / (n - 2) * (rx @ ry) + rx.sum() * ry.sum() / ((n - 1) * (n - 2))


@_autocast_off
def debiased_cka(x: Tensor, y: Tensor, *, form: str = "auto") -> Tensor:
    """Debiased linear CKA (HSIC1 in numerator and denominator); about 0 for independent features, can be < 0."""
    x, y = _prepare(x, y)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 tokens, got {n}")
    if _pick_form(form, n, x.shape[1], y.shape[1]) == "feature":
        return _cka_from_hsic(_hsic1_feature(x, y), _hsic1_feature(x, x), _hsic1_feature(y, y))
    ku, lu = u_center(x @ x.T), u_center(y @ y.T)
    return _cka_from_hsic((ku * lu).sum(), ku.square().sum(), lu.square().sum())


# -- the loss --------------------------------------------------------------------------------------------------
def cka_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    *,
    debiased: bool = False,
    token_mask: Tensor | None = None,
) -> Tensor:
    """Mean over layers of (1 - CKA(student, teacher)); differentiable, float32 (float64 inputs stay float64).

    Each feature is [batch, seq, d] (or [n, d]); ``token_mask`` (bool, the leading shape) keeps the tokens to use.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"cka_loss needs matching non-empty layer lists: {len(student_feats)} vs {len(teacher_feats)}")
    fn = debiased_cka if debiased else linear_cka
    terms = []
    for s, t in zip(student_feats, teacher_feats, strict=True):
        if token_mask is not None:
            s, t = s[token_mask], t[token_mask]
        terms.append(1.0 - fn(s, t))
    return torch.stack(terms).mean()


# -- streaming (exact over any number of tokens) ---------------------------------------------------------------
# CKA_PRECISIONS (ckaqad_cli.settings), the arithmetic of the streaming statistics' d x d products
# (--cka-precision). float32: rows shifted by the first batch's mean, float32 products. bf16: rows shifted so that
# they stay exact in bf16 (_bf16_shift), then bf16 operands with a float32 product on CUDA
# (torch.mm(..., out_dtype=torch.float32)); elsewhere the same bf16 values in float32 GEMMs, an exact emulation (the


# -- token filters ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenFilter:
    """Which tokens enter CKA. Shared by diagnose and distill; the report lists the active filters.

    drop_first: drop position 0 of every sequence and every BOS token (attention sinks).
    drop_massive: drop tokens whose largest |activation| in any teacher layer exceeds ``massive_ratio`` times that
        layer's median |activation| (massive activations, Sun et al. 2024, make linear CKA read near 1).
    standardize: divide features by the teacher's per-feature standard deviation (see :class:`Standardizer`).
    Padding (attention mask 0) is always dropped.
    """

    drop_first: bool = True
    drop_massive: bool = False
    massive_ratio: float = 100.0
    standardize: bool = False

    def __post_init__(self) -> None:
        if not self.massive_ratio > 1:
            raise CkaqadError(f"--massive-ratio must be > 1 (times the median |activation|), got {self.massive_ratio}")

    def describe(self) -> list[str]:
        out = ["padding"]
        if self.drop_first:
            out.append("position 0 / BOS")
        if self.drop_massive:
            out.append(f"massive activations (> {self.massive_ratio:g} x median)")
        if self.standardize:
            out.append("standardized by teacher per-feature std")
        return out

    def mask(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        teacher_hidden: Sequence[Tensor] = (),
        bos_token_id: int | None = None,
    ) -> Tensor:
        """Bool [batch, seq]: the tokens to keep. ``teacher_hidden`` is only read when ``drop_massive`` is on."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is not None:
            keep &= attention_mask.bool()
        if self.drop_first:
            keep[:, 0] = False
            if bos_token_id is not None:
                keep &= input_ids != bos_token_id
        if self.drop_massive:
            keep &= ~massive_token_mask(teacher_hidden, self.massive_ratio, keep)
        return keep


def massive_token_mask(hidden: Sequence[Tensor], ratio: float, valid: Tensor | None = None) -> Tensor:
    """Bool [batch, seq]: tokens whose max |h| exceeds ``ratio`` x the layer's median |h| in any layer."""
    if not hidden:
        raise ValueError("drop_massive needs the teacher's hidden states")
    out = None
    for h in hidden:
        peak = h.detach().abs().amax(dim=-1).float()
        vals = h.detach().abs()[valid] if valid is not None and valid.any() else h.detach().abs()
        median = vals.float().median().clamp_min(EPS)
        hit = peak > ratio * median
        out = hit if out is None else out | hit
    return out


class Standardizer:
    """Per-feature scaling by the teacher's standard deviation, fitted once (e.g. on the first batch) per layer.

    Linear CKA is invariant to a common shift, so only the scale matters; the same scale goes to teacher and
    students, as the standardization is meant to stop a few huge teacher dimensions from dominating.
    """

    def __init__(self) -> None:
        self.inv_std: dict[int, Tensor] = {}

    def __call__(self, layer: int, teacher: Tensor, feats: Tensor) -> Tensor:
        if layer not in self.inv_std:
            t = token_rows(teacher.detach()).float()
            self.inv_std[layer] = 1.0 / t.std(dim=0).clamp_min(1e-6)
        return feats * self.inv_std[layer].to(device=feats.device, dtype=feats.dtype)
