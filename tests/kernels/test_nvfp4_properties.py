"""Hypothesis properties of the NVFP4 definition (reference implementation), and the STE gradients."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaqad_kernels import nvfp4_ref as ref
from ckaqad_kernels.fake_quant import fake_quantize_ste

from .nvfp4_cases import assert_same_bits

_magnitudes = st.one_of(
    st.just(0.0),
    st.floats(min_value=2.0**-20, max_value=2.0**20, allow_nan=False, allow_infinity=False, width=32),
)


@st.composite
def tensors(draw, max_rows: int = 3, max_blocks: int = 3) -> torch.Tensor:
    rows = draw(st.integers(1, max_rows))
    width = 16 * draw(st.integers(1, max_blocks))
    mags = draw(st.lists(_magnitudes, min_size=rows * width, max_size=rows * width))
    signs = draw(st.lists(st.booleans(), min_size=rows * width, max_size=rows * width))
    values = [-m if s else m for m, s in zip(mags, signs, strict=True)]
    return torch.tensor(values, dtype=torch.float32).reshape(rows, width)


global_scales = st.one_of(st.none(), st.floats(min_value=2.0**-27, max_value=2.0**10, width=32))

SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(tensors(), global_scales)
def test_fake_quantize_is_idempotent_at_a_fixed_global_scale(x, global_scale):
    g = ref.resolve_global_scale(x, global_scale)
    once = ref.fake_quantize(x, g)
    assert torch.equal(ref.fake_quantize(once, g), once)  # by value: a -0.0 output re-encodes as +0.0


@SETTINGS
@given(tensors())
def test_error_is_at_most_half_a_grid_step_times_the_scale(x):
    codes, scales, g = ref.quantize(x)
    d = (scales.double() * g.double()).repeat_interleave(16, dim=-1)
    r = x.double() / d
    # half the spacing of the E2M1 grid around |r|: 0.25 below 2, 0.5 below 4, 1 above (saturation included)
    half_step = torch.where(r.abs() < 2, 0.25, torch.where(r.abs() < 4, 0.5, 1.0))
    err = (ref.fake_quantize(x).double() - x.double()).abs()
    assert (err <= half_step * d * (1 + 1e-6)).all()


@SETTINGS
@given(tensors(), global_scales)
def test_sign_symmetry(x, global_scale):
    g = ref.resolve_global_scale(x, global_scale)
    codes, scales, _ = ref.quantize(x, g)
    neg_codes, neg_scales, _ = ref.quantize(-x, g)
    assert_same_bits(neg_scales, scales)
    nonzero = x != 0
    assert torch.equal(neg_codes[nonzero], codes[nonzero] ^ 8)
    assert (codes[~nonzero] == 0).all() and (neg_codes[~nonzero] == 0).all()
    assert torch.equal(ref.fake_quantize(-x, g), -ref.fake_quantize(x, g))


def test_ste_gradient_is_the_identity():
    torch.manual_seed(7)
    x = torch.randn(3, 32, requires_grad=True)
    upstream = torch.randn(3, 32)
    out = fake_quantize_ste(x)
    assert_same_bits(out.detach(), ref.fake_quantize(x.detach()))
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_ste_zeroes_the_gradient_where_the_input_was_clipped():
    x = torch.tensor([[100.0, 1.0, -50.0, 0.5] + [0.0] * 12], requires_grad=True)
    g = 1e-3  # static scale: s = 100 / 0.006 clamps to 448, so |x| > 6 * 448 * 1e-3 = 2.688 saturates
    fake_quantize_ste(x, g, zero_grad_clipped=True).sum().backward()
    assert x.grad[0, :4].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert (x.grad[0, 4:] == 1).all()
