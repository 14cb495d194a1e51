"""Forward KL: chunking is exact, top-k renormalizes, T**2 scaling, masked mean, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ckaqad_cli.kl import chunked_kl, token_kl


def _heads(d, v, seed):
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    wt = ws + 0.3 * torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return ws.requires_grad_(), wt


def test_token_kl_matches_definition_and_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g, dtype=torch.float64)
    p_t = t.softmax(-1)
    by_hand = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(token_kl(s, t), by_hand.float())
    ref = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(s, t), ref.float())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.25, 4.0))
def test_token_kl_nonnegative_zero_on_equal_and_t2_scaled(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(4, 32, generator=g), 3 * torch.randn(4, 32, generator=g)
    kl = token_kl(s, t, temperature=temperature)
    assert (kl >= -1e-6).all()
    assert token_kl(t, t, temperature=temperature).abs().max() < 1e-5
    # KL at temperature T of (s, t) == T^2 * KL at temperature 1 of (s/T, t/T)
    torch.testing.assert_close(kl, temperature**2 * token_kl(s / temperature, t / temperature), rtol=1e-4, atol=1e-6)


def test_topk_renormalizes_over_teacher_topk():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    k = 5
    idx = t.topk(k, -1).indices
    ts, ss = t.gather(-1, idx), s.gather(-1, idx)
    p = ts.softmax(-1)
    expected = (p * (p.log() - ss.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(token_kl(s, t, topk=k), expected)
    # matching the teacher on its top-k logits (up to a constant) gives zero top-k KL whatever the other logits
    s_match = s.clone()
    s_match.scatter_(-1, idx, ts + 2.0)
    assert token_kl(s_match, t, topk=k).abs().max() < 1e-5
    assert token_kl(s_match, t).min() > 1e-3
    torch.testing.assert_close(token_kl(s, t, topk=20), token_kl(s, t))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 40),
    chunk=st.integers(1, 50),
    topk=st.one_of(st.none(), st.integers(1, 12)),
    temperature=st.sampled_from([1.0, 2.0]),
)
def test_chunked_equals_unchunked_value_and_gradient(seed, n, chunk, topk, temperature):
    d, v = 8, 12
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(n, d, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) < 0.7
    mask[0] = True
    ws, wt = _heads(d, v, seed)

    full = token_kl(hs @ ws.T, ht @ wt.T, temperature=temperature, topk=topk)
    ref = (full * mask).sum() / mask.sum()
    ref_gh, ref_gw = torch.autograd.grad(ref, (hs, ws))

    out = chunked_kl(
        hs, ht, lambda x: x @ ws.T, lambda x: x @ wt.T, mask, temperature=temperature, topk=topk, chunk_tokens=chunk
    )
    gh, gw = torch.autograd.grad(out, (hs, ws))
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw)


def test_masked_mean_ignores_masked_tokens_and_batched_shapes():
    d, v = 6, 10
    ws, wt = _heads(d, v, 3)
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    ht = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    base = chunked_kl(hs, ht, lambda x: x @ ws.T, lambda x: x @ wt.T, mask, chunk_tokens=3)
    hs2 = hs.clone()
    hs2[1, 3:] = 100.0  # garbage at padding must not change the loss
    assert chunked_kl(hs2, ht, lambda x: x @ ws.T, lambda x: x @ wt.T, mask, chunk_tokens=3).item() == pytest.approx(
        base.item()
    )
    per_token = token_kl(hs @ ws.T, ht @ wt.T)
    assert base.item() == pytest.approx(per_token[mask.bool()].mean().item())


def test_chunked_kl_rejects_bad_input():
    h = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="different tokens"):
        chunked_kl(h, torch.zeros(2, 4), lambda x: x, lambda x: x)
    with pytest.raises(ValueError, match="no tokens"):
        chunked_kl(h, h, lambda x: x, lambda x: x, torch.zeros(3))
    with pytest.raises(ValueError, match="temperature"):
        token_kl(h, h, temperature=0.0)
