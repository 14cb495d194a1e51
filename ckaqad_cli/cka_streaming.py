"""Streaming CKA statistics: :class:`StreamingCKA` accumulates, batch by batch, what linear CKA between a teacher
layer and each student needs (float64 totals), so diagnose's and plan's memory does not grow with the tokens.

The statistics have a float32 arithmetic and a bf16 one for the GPU (:data:`CKA_PRECISIONS`; docs/cka.md, "bf16
precision"); features are handled as in :mod:`ckaqad_cli.cka` (rows of tokens, float64 when an input is float64).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ckaqad_cli.cka import EPS, cka_dtype, token_rows
from ckaqad_cli.errors import CkaqadError
from ckaqad_cli.settings import CKA_PRECISIONS

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
        z = token_rows(z.detach())
        dtype = cka_dtype(z)
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
        return xy / max(math.sqrt(xx * yy), EPS * EPS)

    def debiased(self, name: str = "student") -> float:
        (_, xy), (_, xx), (_, yy) = self._terms(name)
        return xy / max(math.sqrt(max(xx * yy, 0.0)), EPS * EPS)

    @property
    def tokens(self) -> int:
        return self.teacher.n
