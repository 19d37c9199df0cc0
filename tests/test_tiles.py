"""The tiles backend against the reference: outputs, gradients (q, k, v and learnable score
parameters), sinks, dropout given the same keep mask, fully masked rows, gradcheck."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import maskdsl as md
from maskdsl.codegen.program import Program
from maskdsl.kernels.tiles import plan_for, run_tiles
from strategies import cases, literal_scores, relative_table
from test_codegen import BLOCK, layouts_for


def _inputs(B, H, N, D, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def _no_dropout(s):
    if s is None:
        return None
    return sum([t for t in md._score.score_terms(s) if not isinstance(t, md._score.Dropout)], 0) or None


@given(cases(max_tokens=100), st.data())
def test_tiles_forward_and_gradients_match_reference(case, data):
    shape, H, p = case
    tile = data.draw(st.sampled_from(layouts_for(shape)))
    s = _no_dropout(data.draw(st.none() | literal_scores(shape, H)))
    prog = Program(p, s, shape, H, block=BLOCK, tile=tile)
    n = math.prod(shape)
    q, k, v = _inputs(2, H, n, 8, dtype=torch.float64, grad=True)
    sink = None
    sl = next((t for t in md._score.score_terms(s) if isinstance(t, md._score.SinkLogit)), None)
    if sl is not None:
        vals = sl.values.values if isinstance(sl.values, md._values.PerHead) else [sl.values] * H
        sink = torch.tensor(vals, dtype=torch.float64)
    out = run_tiles(prog, q, k, v, 0.3, sink=sink)
    ref = md.reference.attention(q, k, v, p, shape, score=s, scale=0.3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


def test_learnable_parameters_get_the_reference_gradients():
    shape, H = (6, 7), 2
    table = relative_table(shape, H, requires_grad=True)
    rate = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)
    cap = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    sl = torch.tensor([0.2, -0.5], dtype=torch.float64, requires_grad=True)
    s = md.relative_bias(table) + md.distance_decay(rate) + md.softcap(cap) + md.sink_logit(sl)
    p = md.neighborhood((3, 5)) | md.sink(2)
    attn = md.compile(p, shape, H, score=s, backend="tiles")
    q, k, v = _inputs(1, H, 42, 8, dtype=torch.float64, grad=True)
    params = (q, k, v, table, rate, cap, sl)
    got = torch.autograd.grad(attn(q, k, v).square().sum(), params)
    exp = torch.autograd.grad(md.reference.attention(q, k, v, p, shape, score=s).square().sum(), params)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)
    assert all(x.abs().sum() > 0 for x in got)


def test_gradcheck_float64():
    shape, H = (3, 5), 2
    table = relative_table(shape, H, requires_grad=True)
    sl = torch.tensor([0.2, -0.4], dtype=torch.float64, requires_grad=True)
    p = md.neighborhood((2, 3), causal=(True, False)) | md.sink(2)
    prog = Program(p, md.relative_bias(table) + md.softcap(3.0), shape, H, block=BLOCK, tile=(2, 8))
    q, k, v = _inputs(1, H, 15, 4, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, s: run_tiles(prog, q, k, v, 0.5, sink=s), (q, k, v, sl))


def test_fully_masked_rows_are_zero_with_finite_gradients():
    p = md.causal() & md.window(2) & ~md.sink(4)          # queries 0..3 see nothing
    attn = md.compile(p, (40,), 2, backend="tiles")
    q, k, v = _inputs(1, 2, 40, 8, grad=True)
    out = attn(q, k, v)
    assert (out[:, :, :4] == 0).all() and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    e = md.compile(md.empty(), (300,), backend="tiles")
    x = torch.randn(1, 1, 300, 8)
    assert (e(x, x, x) == 0).all()


def _dense_keep(prog, keep_g, B, H):
    """Scatter a keep mask in the gathered tile layout to the reference's [B, H, N, N]."""
    plan = plan_for(prog, torch.device("cpu"))
    tok = torch.from_numpy(prog.layout.tokens())
    qtok = tok[plan.q_pos.expand(plan.T, plan.V, 1)].expand(plan.T, plan.V, plan.K)
    ktok = tok[plan.k_pos[0]].expand(plan.T, plan.V, plan.K)
    ok = plan.allowed[0]
    n = prog.n
    dense = torch.zeros(B, H, n, n, dtype=torch.bool)
    dense[:, :, qtok[ok], ktok[ok]] = keep_g[:, :, ok]
    return dense


def test_dropout_matches_reference_given_the_same_keep_mask():
    shape, H, B = (10, 9), 2, 2
    p = md.neighborhood((3, 3))
    s = md.dropout(md.per_head([0.2, 0.5]), seed=3) + md.alibi()
    prog = Program(p, s, shape, H, block=BLOCK, tile=(4, 4))
    plan = plan_for(prog, torch.device("cpu"))
    keep = torch.rand(B, H, plan.T, plan.V, plan.K, generator=torch.Generator().manual_seed(1)) > 0.3
    q, k, v = _inputs(B, H, 90, 8, dtype=torch.float64, grad=True)
    out = run_tiles(prog, q, k, v, 0.35, dropout_p=torch.tensor([0.2, 0.5]), keep=keep)
    ref = md.reference.attention(q, k, v, p, shape, score=s, scale=0.35,
                                 dropout_keep=_dense_keep(prog, keep, B, H))
    torch.testing.assert_close(out, ref)


def test_dropout_is_reproducible_has_the_right_rate_and_turns_off():
    s = md.dropout(0.25, seed=11)
    q, k, v = _inputs(1, 2, 512, 8)
    a, b = (md.compile(md.window(64), (512,), 2, score=s, backend="tiles") for _ in range(2))
    first = a(q, k, v)
    torch.testing.assert_close(first, b(q, k, v))             # same seed, same draws
    assert not torch.allclose(a(q, k, v), first)              # the generator advances
    a.training = False
    torch.testing.assert_close(a(q, k, v), md.reference.attention(q, k, v, md.window(64), (512,)),
                               atol=1e-5, rtol=1e-5)
    # keep rate: with v = 1 every output row is (kept probability mass) / (1 - p); averaged over
    # 512 x 2 rows of ~129 keys it is 1 within sampling noise
    ones = torch.ones_like(v)
    b.training = True
    mean = b(q, k, ones).mean().item()
    assert mean == pytest.approx(1.0, abs=0.02)


def test_peak_memory_is_keys_per_query_not_n_squared():
    prog = Program(md.neighborhood((3, 7, 7)), None, (16, 32, 32), 1)
    plan = plan_for(prog, torch.device("cpu"))
    n = prog.n
    keys_per_query = plan.K
    assert plan.allowed.numel() == plan.T * plan.V * keys_per_query
    assert keys_per_query * 8 < n          # far below N keys per query


def test_auto_picks_tiles_on_cpu_and_says_why():
    attn = md.compile(md.neighborhood((7, 7)), (64, 64), heads=2)
    assert attn.backend == "tiles" and attn.reason.startswith("tiles: on cpu")
    sl = md.compile(md.window(4), (1000,), score=md.sink_logit(0.5))
    assert sl.backend == "tiles"
    q, k, v = _inputs(1, 2, 4096, 8, grad=True)
    out = attn(q, k, v)
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("score", [
    md.distance_decay(md.per_head([0.1, 0.3])),
    md.distance_decay(0.1, metric="manhattan") + md.alibi(md.per_head([0.05, 0.2])),
    md.distance_decay(0.1, metric="chebyshev") + md.softcap(5.0),
])
def test_float64_scores_are_computed_in_float64(score):
    # int coordinate distances times Python floats, and per-head float tables, must not drop
    # a float64 score to float32 (generated score_mods cast them to score.dtype)
    attn = md.compile(md.neighborhood((5, 5)), (20, 20), 2, score=score, backend="tiles")
    q, k, v = _inputs(1, 2, 400, 8, dtype=torch.float64)
    ref = md.reference.attention(q, k, v, attn.pattern, (20, 20), score=score)
    torch.testing.assert_close(attn(q, k, v), ref, atol=1e-12, rtol=1e-12)
