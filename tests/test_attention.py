"""reference.attention: the softmax, the score terms, sinks, dropout, empty rows, gradients.

Each test compares against a second, naive formula (torch.softmax on explicitly built logits)
so the reference's own numerics (running max, guarded denominator) are checked too.
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import maskdsl as md
from maskdsl.dsl.score import geometric_slopes
from strategies import cases, literal_scores, relative_table


def qkv(B, H, N, D, dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def naive(q, k, v, allowed, bias=None, cap=None, sink=None, keep=None, p=0.0, scale=None):
    """Softmax attention the plain way; rows with no allowed key give zeros."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        sink_col = torch.as_tensor(sink, dtype=s.dtype).reshape(1, -1, 1, 1).expand(*s.shape[:3], 1)
        w = torch.softmax(torch.cat([s, sink_col], -1), -1)[..., :-1]
    else:
        w = torch.softmax(s, -1)
    w = torch.nan_to_num(w, nan=0.0)
    if keep is not None:
        w = w * keep / (1 - p)
    return w @ v


@given(cases(max_tokens=64))
def test_attention_matches_naive_softmax(case):
    shape, H, p = case
    N = math.prod(shape)
    q, k, v = qkv(2, H, N, 8)
    out = md.reference.attention(q, k, v, p, shape)
    torch.testing.assert_close(out, naive(q, k, v, md.reference.mask(p, shape, H)))


@given(cases(max_tokens=48), st.data())
def test_literal_scores_match_naive(case, data):
    shape, H, p = case
    s = data.draw(literal_scores(shape, H))
    N = math.prod(shape)
    q, k, v = qkv(1, H, N, 8)
    out = md.reference.attention(q, k, v, p, shape, score=s, scale=0.7)
    terms = md.dsl.score.score_terms(s)
    get = lambda cls: next((t for t in terms if isinstance(t, cls)), None)
    per_head = lambda v: torch.tensor([b for b in (v.values if isinstance(v, md.dsl.values.PerHead) else [v] * H)],
                                      dtype=torch.float64)
    cap, sink, drop = get(md.dsl.score.Softcap), get(md.dsl.score.SinkLogit), get(md.dsl.score.Dropout)
    keep = md.reference.dropout_mask(s, 1, H, N) if drop else None
    expected = naive(q, k, v, md.reference.mask(p, shape, H), bias=md.reference.bias(s, shape, H, dtype=torch.float64),
                     cap=cap.cap if cap else None, sink=per_head(sink.values) if sink else None,
                     keep=keep, p=drop.p if drop else 0.0, scale=0.7)
    torch.testing.assert_close(out, expected)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    shape = (12,)
    p = md.causal() & md.window(2) & ~md.sink(4)        # queries 0..3 see nothing
    q, k, v = qkv(1, 2, 12, 8, requires_grad=True)
    rate = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    sl = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    out = md.reference.attention(q, k, v, p, shape, score=md.distance_decay(rate) + md.sink_logit(sl))
    assert torch.isfinite(out).all()
    assert (out[:, :, :4] == 0).all() and (out[:, :, 4:] != 0).any()
    out.square().sum().backward()
    for t in (q, k, v, rate, sl):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, :4] == 0).all()
    out = md.reference.attention(q, k, v, md.empty(), shape)
    assert (out == 0).all()


def test_distance_decay_and_alibi_values():
    shape = (3, 4)
    b = md.reference.bias(md.distance_decay(0.5), shape, dtype=torch.float64)[0]
    # q = (0, 0) = flat 0; k = (2, 3) = flat 11
    assert b[0, 11].item() == pytest.approx(-0.5 * math.sqrt(4 + 9))
    b = md.reference.bias(md.distance_decay(0.5, metric="manhattan"), shape)[0]
    assert b[0, 11].item() == pytest.approx(-2.5)
    b = md.reference.bias(md.distance_decay(0.5, metric="chebyshev", dims=(0,)), shape)[0]
    assert b[0, 11].item() == pytest.approx(-1.0)
    assert geometric_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    assert geometric_slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    b = md.reference.bias(md.alibi(), (10,), heads=8)
    assert b[2, 9, 1].item() == pytest.approx(-8 * 2 ** -3)
    b = md.reference.bias(md.alibi(md.per_head([1.0, 2.0])), (10,), heads=2)
    assert b[1, 0, 3].item() == -6.0


def test_relative_bias_indexes_by_offset_and_clips():
    H, shape = 2, (4, 5)
    full_table = relative_table(shape, H)              # [2, 7, 9]: every offset
    b = md.reference.bias(md.relative_bias(full_table), shape, H, dtype=torch.float64)
    # q = (1, 1) flat 6, k = (3, 0) flat 15: offset (2, -1) -> index (2 + 3, -1 + 4)
    assert b[1, 6, 15] == full_table[1, 5, 3]
    small = relative_table(shape, H, radius=1, shared=True)   # [3, 3]: offsets clip to +-1
    b = md.reference.bias(md.relative_bias(small), shape, H, dtype=torch.float64)
    assert b[0, 6, 15] == small[2, 0] and b[1, 0, 19] == small[2, 2]


def test_gradients_reach_learnable_score_parameters():
    shape, H = (5, 5), 2
    table = relative_table(shape, H, requires_grad=True)
    rate = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)
    cap = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    sl = torch.zeros(H, dtype=torch.float64, requires_grad=True)
    s = md.relative_bias(table) + md.distance_decay(rate) + md.softcap(cap) + md.sink_logit(sl)
    q, k, v = qkv(1, H, 25, 8, requires_grad=True)
    md.reference.attention(q, k, v, md.neighborhood(3), shape, score=s).sum().backward()
    for t in (table, rate, cap, sl, q, k, v):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_gradcheck_float64():
    shape, H = (3, 4), 2
    table = relative_table(shape, H, requires_grad=True)
    rate = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)
    sl = torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)
    p = md.neighborhood((2, 3), causal=(True, False)) | md.sink(2)
    q, k, v = qkv(1, H, 12, 4, requires_grad=True)

    def f(q, k, v, table, rate, sl):
        s = md.relative_bias(table) + md.distance_decay(rate) + md.softcap(3.0) + md.sink_logit(sl)
        return md.reference.attention(q, k, v, p, shape, score=s)

    assert torch.autograd.gradcheck(f, (q, k, v, table, rate, sl))


def test_sink_logit_joins_the_denominator_only():
    q, k, v = qkv(1, 1, 4, 8)
    out = md.reference.attention(q, k, v, md.full(), (4,), score=md.sink_logit(100.0))
    assert out.abs().max() < 1e-30                    # a huge sink soaks up all the mass
    out = md.reference.attention(q, k, v, md.full(), (4,), score=md.sink_logit(-1e4))
    torch.testing.assert_close(out, md.reference.attention(q, k, v, md.full(), (4,)))


def test_dropout_is_reproducible_and_keeps_the_right_fraction():
    s = md.dropout(0.3, seed=7)
    a = md.reference.dropout_mask(s, 2, 3, 64)
    assert torch.equal(a, md.reference.dropout_mask(s, 2, 3, 64))
    assert not torch.equal(a, md.reference.dropout_mask(md.dropout(0.3, seed=8), 2, 3, 64))
    assert a.float().mean().item() == pytest.approx(0.7, abs=0.01)   # 24,576 draws
    keep = md.reference.dropout_mask(md.dropout(md.per_head([0.0, 0.9]), seed=1), 1, 2, 128)
    assert keep[:, 0].all() and keep[:, 1].float().mean().item() == pytest.approx(0.1, abs=0.01)
    q, k, v = qkv(2, 3, 64, 8)
    out = md.reference.attention(q, k, v, md.full(), (64,), score=s)
    torch.testing.assert_close(out, naive(q, k, v, torch.ones(64, 64, dtype=torch.bool), keep=a, p=0.3))
    mine = torch.ones(2, 3, 64, 64, dtype=torch.bool)
    torch.testing.assert_close(md.reference.attention(q, k, v, md.full(), (64,), score=s, dropout_keep=mine) * 0.7,
                               md.reference.attention(q, k, v, md.full(), (64,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_round_trip(dtype):
    q, k, v = qkv(1, 2, 16, 8, dtype=dtype)
    out = md.reference.attention(q, k, v, md.window(2), (4, 4))
    assert out.dtype == dtype and torch.isfinite(out).all()
