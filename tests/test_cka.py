"""The CKA engine against float64 references written from the formulas, and its properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaqad_cli import cka_streaming
from ckaqad_cli.cka import (
    Standardizer,
    TokenFilter,
    cka_loss,
    debiased_cka,
    linear_cka,
    massive_token_mask,
)
from ckaqad_cli.cka_streaming import StreamingCKA, _add_upper_gram, _block_bounds, _full_gram


# -- references, straight from the papers (float64, explicit H, explicit sums) -----------------------------------
def ref_hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def ref_hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012, eq. 5."""
    n = k.shape[0]
    kt = k.clone()
    lt = l.clone()
    kt.fill_diagonal_(0)
    lt.fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    term = (
        torch.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ kt @ lt @ one)
    )
    return term / (n * (n - 3))


def ref_cka(k: torch.Tensor, l: torch.Tensor, hsic) -> float:
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def ref_linear(x, y, hsic=ref_hsic_biased) -> float:
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)  # both HSICs are shift-invariant; centering first keeps float64 exact
    return ref_cka(x @ x.T, y @ y.T, hsic)


def ref_feature_form(x, y) -> float:
    """Kornblith et al. feature form on explicitly centered float64 features."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def features(n: int, d1: int, d2: int, seed: int, *, related: bool = True, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64) * scale + 3.0
    if related:
        y = x @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, d2, generator=g,
                                                                                         dtype=torch.float64)
    else:
        y = torch.randn(n, d2, generator=g, dtype=torch.float64)
    return x, y


SHAPES = [(12, 40, 24), (64, 8, 16), (33, 33, 5), (200, 16, 16)]


@pytest.mark.parametrize("n,d1,d2", SHAPES)
@pytest.mark.parametrize("form", ["feature", "gram", "auto"])
def test_linear_and_debiased_match_reference(n, d1, d2, form):
    x, y = features(n, d1, d2, seed=n + d1)
    assert linear_cka(x, y, form=form).item() == pytest.approx(ref_linear(x, y), abs=1e-10)
    assert linear_cka(x, y, form=form).item() == pytest.approx(ref_feature_form(x, y), abs=1e-10)
    assert debiased_cka(x, y, form=form).item() == pytest.approx(ref_linear(x, y, ref_hsic1), abs=1e-10)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(5, 60),
    d=st.integers(1, 48),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_invariances(n, d, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    y, _ = features(n, d, 7, seed)
    for fn in (linear_cka, debiased_cka):
        assert fn(x, x @ q).item() == pytest.approx(1.0, abs=1e-8)
        assert fn(x, -2.5 * x).item() == pytest.approx(1.0, abs=1e-8)
        assert fn(x, y).item() == pytest.approx(fn(y, x).item(), abs=1e-10)
        assert fn(x, y, form="feature").item() == pytest.approx(fn(x, y, form="gram").item(), abs=1e-9)
    value = linear_cka(x, y).item()
    assert -1e-12 <= value <= 1 + 1e-12


def test_debiased_near_zero_for_independent_features_when_biased_is_not():
    n, d = 64, 512
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    biased, unbiased = linear_cka(x, y).item(), debiased_cka(x, y).item()
    assert biased > 0.8  # n << d: random features look alike to the biased estimator
    assert abs(unbiased) < 0.05


def test_bf16_scale_activations_do_not_overflow():
    x, y = features(50, 32, 32, seed=3, scale=3e4)
    xb, yb = x.bfloat16() * 100, y.bfloat16() * 100  # |x| ~ 3e6: 4th powers far beyond float32 range
    value = linear_cka(xb, yb)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(ref_linear(xb.double(), yb.double()), abs=1e-3)


@pytest.mark.parametrize("chunks", [[40], [10, 7, 23], [4] * 10])
def test_streaming_equals_one_batch(chunks):
    n = sum(chunks)
    x, y = features(n, 24, 12, seed=n)
    # a large common mean: the streamed shift must keep the centered moments exact; float32 batches, float64 sums
    x, y = (x + 1e3).float(), y.float()
    acc = StreamingCKA()
    start = 0
    for c in chunks:
        acc.update(x[start : start + c], y[start : start + c])
        start += c
    assert acc.tokens == n
    assert acc.linear() == pytest.approx(ref_linear(x, y), abs=1e-5)
    assert acc.debiased() == pytest.approx(ref_linear(x, y, ref_hsic1), abs=1e-5)
    exact = StreamingCKA()  # float64 batches: equal to the reference to rounding
    exact.update(x[:n // 2].double(), y[:n // 2].double())
    exact.update(x[n // 2:].double(), y[n // 2:].double())
    assert exact.debiased() == pytest.approx(ref_linear(x, y, ref_hsic1), abs=1e-11)


def test_streaming_several_students_share_the_teacher():
    x1, y = features(48, 16, 16, seed=1)
    x2, _ = features(48, 8, 16, seed=2)
    acc = StreamingCKA()
    for i in range(0, 48, 16):
        acc.update_teacher(y[i : i + 16])
        acc.update_student("a", x1[i : i + 16], y[i : i + 16])
        acc.update_student("b", x2[i : i + 16], y[i : i + 16])
    assert acc.students == ["a", "b"]
    assert acc.linear("a") == pytest.approx(ref_linear(x1, y), abs=1e-10)
    assert acc.debiased("b") == pytest.approx(ref_linear(x2, y, ref_hsic1), abs=1e-10)


def test_streaming_refuses_unequal_token_counts():
    x, y = features(16, 4, 4, seed=0)
    acc = StreamingCKA()
    acc.update_teacher(y)
    acc.update_teacher(y)
    acc.update_student("s", x, y)
    with pytest.raises(ValueError, match="tokens"):
        acc.linear("s")


@pytest.mark.parametrize("debiased", [False, True])
def test_loss_gradcheck_and_no_mutation(debiased):
    g = torch.Generator().manual_seed(0)
    s1 = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t1 = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    t2 = torch.randn(10, 7, generator=g, dtype=torch.float64)
    before = [s1.detach().clone(), s2.detach().clone()]
    assert torch.autograd.gradcheck(
        lambda a, b: cka_loss([a, b], [t1, t2], debiased=debiased), (s1, s2), eps=1e-6, atol=1e-6
    )
    loss = cka_loss([s1, s2], [t1, t2], debiased=debiased)
    want = 1 - ((linear_cka if not debiased else debiased_cka)(s1, t1) + (linear_cka if not debiased else
                                                                           debiased_cka)(s2, t2)) / 2
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    assert torch.equal(s1.detach(), before[0]) and torch.equal(s2.detach(), before[1])


def test_loss_bf16_inputs_compute_in_float32_with_gradient():
    s = (torch.randn(4, 8, 32) * 5e3).bfloat16().requires_grad_(True)
    t = (torch.randn(4, 8, 32) * 5e3).bfloat16()
    loss = cka_loss([s], [t])
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad.float()).all() and s.grad.abs().sum() > 0
    assert cka_loss([t.float()], [t.float()]).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_token_mask_selects_tokens():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 0] = False
    s_big = s.clone()
    s_big[:, 0] = 1e6  # an outlier at position 0 would dominate if it were kept
    assert cka_loss([s_big], [t], token_mask=mask).item() == pytest.approx(
        1 - linear_cka(s[:, 1:], t[:, 1:]).item(), abs=1e-12
    )


def test_token_filter_masks():
    ids = torch.tensor([[1, 5, 6, 1, 7], [1, 8, 9, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    keep = TokenFilter(drop_first=True).mask(ids, attn, bos_token_id=1)
    assert keep.tolist() == [[False, True, True, False, True], [False, True, True, False, False]]
    assert TokenFilter(drop_first=False).mask(ids, attn)[0].all()

    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    h[0, 2, 3] = 1e4  # a massive activation on one token
    massive = massive_token_mask([h], ratio=100.0)
    assert massive.tolist() == [[False, False, True, False, False], [False] * 5]
    keep = TokenFilter(drop_first=False, drop_massive=True).mask(ids, attn, [h])
    assert not keep[0, 2] and keep[0, 1]
    assert "massive" in " ".join(TokenFilter(drop_massive=True).describe())


def test_massive_token_hides_drift_and_filter_reveals_it():
    """A sink token with a huge dimension makes linear CKA read near 1; dropping it shows the real similarity."""
    x, y = features(200, 32, 32, seed=4, related=False)
    x[0, 0] = y[0, 0] = 1e4
    mask = torch.ones(200, dtype=torch.bool)
    mask[0] = False
    assert linear_cka(x, y).item() > 0.99
    assert linear_cka(x[mask], y[mask]).item() < 0.5


def test_standardizer_uses_teacher_scale():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(100, 4, generator=g) * torch.tensor([1.0, 10.0, 100.0, 1000.0])
    std = Standardizer()
    out = std(0, t, t)
    assert torch.allclose(out.std(dim=0), torch.ones(4), atol=1e-5)
    other = torch.ones(3, 4)
    assert torch.allclose(std(0, t * 5, other), other / t.std(dim=0))  # fitted once per layer


@pytest.mark.parametrize("d", [24, 64, 200, 1030])  # 1, 1, 3 uneven and 8 column blocks
def test_block_triangle_gram_is_the_full_symmetric_product(d):
    z = torch.randn(37, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    upper = _add_upper_gram(None, z)
    bounds = _block_bounds(d)
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # what the blocks skip is never computed: still exactly zero
        assert not upper[hi:, lo:hi].any()
    upper = _add_upper_gram(upper, 2 * z)  # accumulates: z^T z + 4 z^T z
    full = _full_gram(upper)
    assert torch.equal(full, full.T)
    torch.testing.assert_close(full, 5 * z.T @ z, rtol=1e-12, atol=1e-12)


def test_streaming_wide_features_over_several_column_blocks():
    x, y = features(300, 200, 136, seed=9)  # 3 and 2 column blocks; n > d
    acc = StreamingCKA()
    for i in range(0, 300, 100):
        acc.update(x[i : i + 100], y[i : i + 100])
    assert acc.linear() == pytest.approx(ref_linear(x, y), abs=1e-10)
    assert acc.debiased() == pytest.approx(ref_linear(x, y, ref_hsic1), abs=1e-10)


@pytest.mark.parametrize("flush_tokens", [1, 350, 10**9])  # every batch, every few batches, only when read
def test_streaming_float32_partials_flush_into_float64(monkeypatch, flush_tokens):
    """Many float32 batches with a large mean: the float32 partial sums and their flushes keep CKA exact."""
    monkeypatch.setattr(cka_streaming, "FLUSH_TOKENS", flush_tokens)
    x, y = features(1200, 48, 80, seed=3)
    x, y = (x + 300.0).float(), (y - 50.0).float()
    acc = StreamingCKA()
    for i in range(0, 1200, 100):
        acc.update_teacher(y[i : i + 100])
        acc.update_student("s", x[i : i + 100], y[i : i + 100])
    assert acc.linear("s") == pytest.approx(ref_linear(x, y), abs=2e-6)
    assert acc.debiased("s") == pytest.approx(ref_linear(x, y, ref_hsic1), abs=2e-6)
    # reading flushed the partials into the totals: batches after it add to the same totals
    acc.update_teacher(y[:250])
    acc.update_student("s", x[:250], y[:250])
    x2, y2 = torch.cat([x, x[:250]]), torch.cat([y, y[:250]])
    assert acc.linear("s") == pytest.approx(ref_linear(x2, y2), abs=2e-6)


# -- bf16 precision (docs/cka.md): bf16 operands, float32 products; on the CPU the exact emulation --------------------
def _streamed(precision: str, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[float, float]:
    acc = StreamingCKA(precision)
    for x, y in zip(xs, ys, strict=True):
        acc.update(x, y)
    return acc.linear(), acc.debiased()


def _float64(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[float, float]:
    exact = StreamingCKA()  # float64 features: equal to the references to rounding (tests above)
    exact.update(torch.cat(xs).double(), torch.cat(ys).double())
    return exact.linear(), exact.debiased()


@pytest.fixture(scope="module")
def builtin_features() -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per decoder layer, (student batches, teacher batches): the built-in teacher in bf16 against its W4A4 PTQ copy
    on the built-in test split, 16 x 128 tokens, position 0 dropped."""
    from ckaqad_cli import models
    from ckaqad_cli.data import load_texts, pack_sequences
    from ckaqad_cli.models import capture_residuals

    teacher, tok = models.load_model("builtin", dtype=torch.bfloat16)
    student, _ = models.ptq_student(teacher, "w4a4")
    ids = pack_sequences(load_texts("builtin", split="test"), tok, 128, max_tokens=16 * 128)
    layers: dict[int, tuple[list, list]] = {}
    with torch.no_grad(), capture_residuals(teacher) as ht, capture_residuals(student) as hs:
        for batch in ids.split(8):
            ht.clear(), hs.clear()
            teacher(input_ids=batch), student(input_ids=batch)
            for i, (s, t) in enumerate(zip(hs[1:-1], ht[1:-1], strict=True)):
                xs, ys = layers.setdefault(i, ([], []))
                xs.append(s[:, 1:].reshape(-1, s.shape[-1]))
                ys.append(t[:, 1:].reshape(-1, t.shape[-1]))
    return list(layers.values())


def test_bf16_precision_matches_float64_on_the_builtin_teacher(builtin_features):
    for xs, ys in builtin_features:
        assert xs[0].dtype == torch.bfloat16
        want = _float64(xs, ys)
        assert _streamed("bf16", xs, ys) == pytest.approx(want, abs=1e-6)


def test_bf16_precision_matches_float64_with_channel_means_100x_the_spread():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4096, 192, generator=g) + 100 * torch.randn(192, generator=g)
    x = y + 0.3 * torch.randn(4096, 192, generator=g)
    x[::97, :3] += 1e3  # a few massive activations on top
    xs, ys = list(x.bfloat16().split(1016)), list(y.bfloat16().split(1016))
    want = _float64(xs, ys)
    assert _streamed("bf16", xs, ys) == pytest.approx(want, abs=1e-5)
    # the shift keeps the shifted rows exact in bf16, so the products round nothing
    shift = cka_streaming._bf16_shift(xs[0])
    shifted = xs[1].float() - shift
    assert (shifted.bfloat16().float() == shifted).float().mean() > 0.999
    assert torch.equal(shift.bfloat16().float(), shift)


def test_bf16_precision_multiplies_bf16_values():
    """On the CPU the products take the shifted rows rounded to bf16, as float32 (the exact emulation of a bf16 GEMM
    with a float32 product); the O(n d) sums take the unrounded rows."""
    x = features(300, 40, 24, seed=5)[0].float()
    rows = cka_streaming._Moments("bf16").prepared(x)
    assert rows.operand.dtype == torch.float32 and torch.equal(rows.operand, rows.rows.bfloat16().float())
    assert not torch.equal(rows.operand, rows.rows)
    plain = cka_streaming._Moments("float32").prepared(x)
    assert plain.operand is plain.rows


def test_bf16_operands_take_the_cuda_path(monkeypatch):
    """The CUDA branch on the CPU: operands kept bf16 and multiplied by torch.mm(..., out_dtype=torch.float32)
    (emulated here, as CPU torch lacks it); the same CKA as the CPU's emulation, to float32 rounding."""
    real_mm = torch.mm
    calls = []

    def mm(a, b, *, out_dtype=None):
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
        calls.append(a.shape)
        return real_mm(a.float(), b.float())

    x, y = features(600, 200, 72, seed=4)
    x, y = (x + 50).bfloat16(), y.bfloat16()
    emulated = _streamed("bf16", list(x.split(200)), list(y.split(200)))
    monkeypatch.setattr(cka_streaming, "_bf16_products", lambda device: True)
    monkeypatch.setattr(torch, "mm", mm)
    assert _streamed("bf16", list(x.split(200)), list(y.split(200))) == pytest.approx(emulated, abs=1e-6)
    assert len(calls) == 3 * (3 + 1 + 1)  # per batch: 3 + 1 column blocks of the two Grams (200 and 72 wide), the cross


def test_unknown_precision_is_one_line_error():
    from ckaqad_cli.errors import CkaqadError

    with pytest.raises(CkaqadError, match="--cka-precision must be one of float32, bf16"):
        StreamingCKA("fp8")


def test_cka_under_autocast_stays_float32():
    """Distill runs its objective under bf16 autocast on a GPU: the CKA products must not become bf16 ones there."""
    x, y = features(64, 48, 40, seed=2)
    x, y = x.float(), y.float()
    want = linear_cka(x, y), debiased_cka(x, y), cka_loss([x], [y])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cka(x, y), debiased_cka(x, y), cka_loss([x], [y])
        assert (x.T @ y).dtype == torch.bfloat16  # what autocast does to a plain product
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)
