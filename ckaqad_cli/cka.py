"""The CKA engine: linear and debiased CKA, a streaming accumulator, token filters and the loss.

Notation (docs/cka.md): X (n x d1) and Y (n x d2) are the features of the same n tokens, one row per token.
Linear CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on features centered over tokens (Kornblith et al. 2019).
Debiased CKA puts the unbiased HSIC estimator (HSIC1, Song et al. 2012) in numerator and denominator.

Every function computes in float32, or float64 when an input is float64, whatever the model's dtype (and with
autocast off: an autocast region does not turn its products into bf16 ones); features are scaled to unit Frobenius
norm before any fourth-power term, so bf16-scale activations cannot overflow. The streaming statistics also have a
bf16 arithmetic for the GPU (:data:`CKA_PRECISIONS`). Nothing detaches or changes the caller's tensors in place, so
all of it is differentiable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.settings import CKA_PRECISIONS

_EPS = 1e-12
FORMS = ("auto", "feature", "gram")


# -- helpers ---------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _flatten(x: Tensor) -> Tensor:
    """[..., d] -> [n, d] (tokens from all leading dimensions)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def _prepare(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten, upcast, center over tokens and scale to unit Frobenius norm (none of it in place)."""
    x, y = _flatten(x), _flatten(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same tokens on both sides: got {x.shape[0]} and {y.shape[0]} rows")
    dtype = _compute_dtype(x, y)
    out = []
    for z in (x, y):
        z = z.to(dtype)
        z = z - z.mean(dim=0, keepdim=True)
        out.append(z / z.norm().clamp_min(_EPS))
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
    return xy / torch.sqrt((xx * yy).clamp_min(_EPS * _EPS))


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
# product of two bf16 numbers is exact in float32).
_SHIFT_STDS = 4.0  # bf16 precision shifts a channel whose |mean| is above this many standard deviations ...
_SHIFT_REACH = 3.0  # ... by a multiple of the bf16 spacing at |mean| + this many standard deviations
_MIN_BLOCK = 64  # columns per block of a symmetric product; narrower blocks lose more GEMM speed than they save
_MAX_BLOCKS = 8  # 8 blocks compute 36 of 64 blocks (56%) of a Gram matrix
FLUSH_TOKENS = 8192  # on the CPU, tokens summed in the compute dtype before they go into the float64 totals


def _block_bounds(d: int) -> list[int]:
    blocks = max(1, min(_MAX_BLOCKS, d // _MIN_BLOCK))
    return [round(i * d / blocks) for i in range(blocks + 1)]


def _bf16_shift(z: Tensor) -> Tensor:
    """Per-channel shift of bf16 precision, from a first batch ``z`` [n, d]: exact in bf16, and such that shifted
    bf16 values stay exact in bf16 (docs/cka.md, "bf16 precision").

    A channel whose |mean| is above 4 standard deviations is shifted by its mean rounded to a multiple of the bf16
    spacing at |mean| + 3 standard deviations: its values and the shift are then multiples of that spacing and their
    differences, small against |mean|, need no more than bf16's 8 significant bits. Other channels are not shifted:
    their bf16 values are exact as they are, while a shift would add low bits to them.
    """
    z = z.float()
    mean, std = z.mean(dim=0), z.std(dim=0, correction=0)
    reach = (mean.abs() + _SHIFT_REACH * std).clamp_min(torch.finfo(torch.float32).tiny)
    spacing = torch.exp2(torch.floor(torch.log2(reach)) - 7)  # 2^(e - 7) for values in [2^e, 2^(e+1))
    return torch.where(mean.abs() > _SHIFT_STDS * std, torch.round(mean / spacing) * spacing, 0.0)


def _bf16_products(device: torch.device) -> bool:
    """Whether torch multiplies bf16 operands into a float32 product on ``device`` (``torch.mm(..., out_dtype=)``:
    CUDA only in torch 2.13)."""
    return device.type == "cuda"


def _mm_into(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``, accumulated inside the GEMM; bf16 operands (CUDA only) give a float32 product."""
    if a.dtype == torch.bfloat16:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a, b)


def _add_upper_gram(acc: Tensor | None, z: Tensor) -> Tensor:
    """``acc`` (created as zeros when None: float32 for bf16 ``z``, else ``z``'s dtype) plus the upper block
    triangle of ``z^T z``, in place.

    A Gram matrix is symmetric, so only the column blocks on and right of the diagonal are multiplied (about 56% of
    the arithmetic at 8 blocks); the blocks left of the diagonal stay zero until :func:`_full_gram`. The products
    accumulate inside the GEMM (``addmm_``), with no temporary d x d result (bf16 operands: one block at a time).
    """
    d = z.shape[1]
    if acc is None:
        acc = torch.zeros(d, d, dtype=torch.float32 if z.dtype == torch.bfloat16 else z.dtype, device=z.device)
    bounds = _block_bounds(d)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        _mm_into(acc[lo:hi, lo:], z[:, lo:hi].T, z[:, lo:])
    return acc


def _full_gram(upper: Tensor) -> Tensor:
    """The symmetric matrix from its upper triangle (see :func:`_add_upper_gram`)."""
    return torch.triu(upper) + torch.triu(upper, 1).T


class _Sum:
    """A sum of per-batch terms kept in float64, fed through a partial sum in the compute dtype.

    Each batch is added to the partial (for a product, inside the GEMM, see :meth:`partial`). On the CPU the partial
    goes into the float64 total every :data:`FLUSH_TOKENS` tokens: a float32 partial then sums no more tokens than
    one large batch, and the conversion of the d x d products to float64, about 5% of the statistics' time, is paid
    once per flush. On a GPU that conversion costs little against the products, while a partial per layer kept
    between batches would add half again to the statistics' memory (gigabytes at 8B scale), so it flushes every
    batch.
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self._partial: Tensor | None = None
        self._tokens = 0

    def partial(self, like: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The partial sum to add this batch's term to (zeros of ``like``'s dtype and device after a flush)."""
        if self._partial is None:
            self._partial = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._partial

    def add(self, term: Tensor) -> None:
        self.partial(term, tuple(term.shape)).add_(term)

    def counted(self, tokens: int) -> None:
        """Record that this batch's ``tokens`` were added; flush when the partial has summed enough of them."""
        self._tokens += tokens
        if self._tokens >= FLUSH_TOKENS or self._partial.device.type != "cpu":
            self.value()

    def value(self) -> Tensor:
        """The float64 total so far (the partial flushed into it)."""
        if self._partial is not None:
            partial = self._partial.to(torch.float64)
            self.total = partial if self.total is None else self.total.add_(partial)
            self._partial, self._tokens = None, 0
        if self.total is None:
            raise ValueError("no batch was added")
        return self.total


class _Rows(NamedTuple):
    """One batch of one side, as the statistics take it."""

    rows: Tensor  # [n, d] shifted, float32 (float64 for float64 features)
    operand: Tensor  # the rows as the d x d products take them (bf16 precision: rounded to bf16, and bf16 on CUDA)
    norms: Tensor  # squared row norms a_i = ||rows_i||^2


class _Moments:
    """Streaming moments of one side: count, shifted sum and Gram, and row-norm statistics for the debiased term.

    Rows are shifted before the products (covariance does not change under a shift), by the first batch's mean in
    float32 precision, so per-batch products in float32 stay accurate when the mean is large, and by
    :func:`_bf16_shift` in bf16 precision. The sums are kept in float64. Scalars stay tensors on the features'
    device, so a GPU never waits for them.
    """

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.n = 0
        self.shift: Tensor | None = None
        self.sum = _Sum()  # sum of shifted rows z'
        self.upper_gram = _Sum()  # upper block triangle of Z'^T Z'
        self.sum_a = _Sum()  # sum of a_i = ||z'_i||^2
        self.sum_aa = _Sum()  # sum of a_i^2
        self.sum_az = _Sum()  # sum of a_i z'_i

    def prepared(self, z: Tensor) -> _Rows:
        """The rows of a batch shifted by this side's reference (set on first use), as the statistics take them."""
        z = _flatten(z.detach())
        dtype = _compute_dtype(z)
        if self.shift is None:
            self.shift = _bf16_shift(z) if self.precision == "bf16" else z.to(dtype).mean(dim=0)
        zs = torch.sub(z, self.shift.to(z.device)).to(dtype)  # one pass: the subtraction promotes bf16 rows to float32
        operand = zs
        if self.precision == "bf16":
            operand = zs.to(torch.bfloat16)
            operand = operand if _bf16_products(operand.device) else operand.to(dtype)
        return _Rows(zs, operand, torch.linalg.vector_norm(zs, dim=1).square())

    def update(self, z: _Rows) -> None:
        d = z.rows.shape[1]
        _add_upper_gram(self.upper_gram.partial(z.rows, (d, d)), z.operand)
        self.sum.add(z.rows.sum(dim=0))
        self.sum_az.add(z.norms @ z.rows)
        self.sum_a.add(z.norms.sum())
        self.sum_aa.add(z.norms.square().sum())
        for part in (self.upper_gram, self.sum, self.sum_az, self.sum_a, self.sum_aa):
            part.counted(z.rows.shape[0])
        self.n += z.rows.shape[0]


class _Cross:
    """Streaming cross terms of a (student, teacher) pair."""

    def __init__(self) -> None:
        self.n = 0
        self.cross = _Sum()  # X'^T Y'
        self.sum_ab = _Sum()
        self.sum_ay = _Sum()  # sum of a_i y'_i
        self.sum_bx = _Sum()  # sum of b_i x'_i

    def update(self, x: _Rows, y: _Rows) -> None:
        ys, b = y.rows.to(x.rows.dtype), y.norms.to(x.rows.dtype)  # a float64 student against a float32 teacher
        partial = self.cross.partial(x.rows, (x.rows.shape[1], ys.shape[1]))
        _mm_into(partial, x.operand.T, y.operand.to(x.operand.dtype))
        self.sum_ay.add(x.norms @ ys)
        self.sum_bx.add(b @ x.rows)
        self.sum_ab.add(x.norms @ b)
        for part in (self.cross, self.sum_ab, self.sum_ay, self.sum_bx):
            part.counted(x.rows.shape[0])
        self.n += x.rows.shape[0]


def _centered_row_norm_dot(
    n: int, mx: Tensor, my: Tensor, cross: Tensor, sum_ab: float, sum_ay: Tensor, sum_bx: Tensor, sum_a: float,
    sum_b: float,
) -> float:
    """sum_i ||x_i - mean x||^2 ||y_i - mean y||^2 from shifted-row statistics (mx, my: means of shifted rows)."""
    mx2, my2 = float(mx @ mx), float(my @ my)
    return (
        sum_ab
        - 2 * float(my @ sum_ay)
        - 2 * float(mx @ sum_bx)
        + my2 * sum_a
        + mx2 * sum_b
        + 4 * float(mx @ cross @ my)
        - 3 * n * mx2 * my2
    )


def _hsic_pair(n: int, cxy: Tensor, rxry: float, tx: float, ty: float) -> tuple[float, float]:
    """(biased, unbiased*n(n-3)) HSIC numerators from centered cross-covariance, row-norm dot and traces."""
    fro = float(cxy.square().sum())
    unbiased = fro - n / (n - 2) * rxry + tx * ty / ((n - 1) * (n - 2)) if n >= 4 else math.nan
    return fro, unbiased


class StreamingCKA:
    """Exact linear and debiased CKA between a teacher and any number of students, streamed batch by batch.

    Memory is O(d^2) per student whatever the number of tokens (X^T X, Y^T Y, Y^T X and O(d) sums, in float64).
    Per batch call :meth:`update_teacher` with the teacher's features, then :meth:`update_student` for each student
    with its features of the same tokens and the same teacher features; :meth:`update` does both for one pair.
    ``precision`` is one of :data:`CKA_PRECISIONS`.
    """

    def __init__(self, precision: str = "float32") -> None:
        if precision not in CKA_PRECISIONS:
            raise CkaqadError(f"--cka-precision must be one of {', '.join(CKA_PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.teacher = _Moments(precision)
        self._students: dict[str, tuple[_Moments, _Cross]] = {}

    @property
    def students(self) -> list[str]:
        return list(self._students)

    def update_teacher(self, y: Tensor) -> None:
        self.teacher.update(self.teacher.prepared(y))

    def update_student(self, name: str, x: Tensor, y: Tensor) -> None:
        if self.teacher.n == 0:
            raise ValueError("update_teacher must see a batch before update_student")
        self._update_student(name, x, self.teacher.prepared(y))

    def update(self, x: Tensor, y: Tensor, name: str = "student") -> None:
        teacher = self.teacher.prepared(y)
        self.teacher.update(teacher)
        self._update_student(name, x, teacher)

    def _update_student(self, name: str, x: Tensor, teacher: _Rows) -> None:
        moments, cross = self._students.setdefault(name, (_Moments(self.precision), _Cross()))
        student = moments.prepared(x)
        if student.rows.shape[0] != teacher.rows.shape[0]:
            raise ValueError(f"student and teacher batches differ in tokens: {student.rows.shape[0]} vs "
                             f"{teacher.rows.shape[0]}")
        moments.update(student)
        cross.update(student, teacher)

    def _terms(self, name: str) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        if name not in self._students:
            raise KeyError(f"no statistics for student {name!r}")
        sx, cr = self._students[name]
        ty = self.teacher
        n = sx.n
        if n != ty.n or n != cr.n:
            raise ValueError(f"student {name!r} saw {n} tokens but the teacher saw {ty.n}")
        if n < 2:
            raise ValueError(f"CKA needs at least 2 tokens, got {n}")
        mx, my = sx.sum.value() / n, ty.sum.value() / n
        gx, gy = _full_gram(sx.upper_gram.value()), _full_gram(ty.upper_gram.value())
        cross = cr.cross.value()
        cxx = gx - n * torch.outer(mx, mx)
        cyy = gy - n * torch.outer(my, my)
        cxy = cross - n * torch.outer(mx, my)
        tx, ty_ = float(torch.trace(cxx)), float(torch.trace(cyy))
        sum_a_x, sum_a_y = float(sx.sum_a.value()), float(ty.sum_a.value())
        rxry = _centered_row_norm_dot(n, mx, my, cross, float(cr.sum_ab.value()), cr.sum_ay.value(),
                                      cr.sum_bx.value(), sum_a_x, sum_a_y)
        rxrx = _centered_row_norm_dot(n, mx, mx, gx, float(sx.sum_aa.value()), sx.sum_az.value(), sx.sum_az.value(),
                                      sum_a_x, sum_a_x)
        ryry = _centered_row_norm_dot(n, my, my, gy, float(ty.sum_aa.value()), ty.sum_az.value(), ty.sum_az.value(),
                                      sum_a_y, sum_a_y)
        return _hsic_pair(n, cxy, rxry, tx, ty_), _hsic_pair(n, cxx, rxrx, tx, tx), _hsic_pair(n, cyy, ryry, ty_, ty_)

    def linear(self, name: str = "student") -> float:
        (xy, _), (xx, _), (yy, _) = self._terms(name)
        return xy / max(math.sqrt(xx * yy), _EPS * _EPS)

    def debiased(self, name: str = "student") -> float:
        (_, xy), (_, xx), (_, yy) = self._terms(name)
        return xy / max(math.sqrt(max(xx * yy, 0.0)), _EPS * _EPS)

    @property
    def tokens(self) -> int:
        return self.teacher.n


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
        median = vals.float().median().clamp_min(_EPS)
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
            t = _flatten(teacher.detach()).float()
            self.inv_std[layer] = 1.0 / t.std(dim=0).clamp_min(1e-6)
        return feats * self.inv_std[layer].to(device=feats.device, dtype=feats.dtype)
