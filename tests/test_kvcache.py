"""The KV cache with analytic lookback (ARCHITECTURE.md, "Sub-ranges and the KV cache"):
stepping through a grid in random chunk sizes equals the full computation row by row (outputs
and lse, against the reference), the cache keeps what ``attn.lookback`` says and no more, and
patterns that cannot be decoded are refused with a pair that shows why.
"""
import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import maskdsl as md
from maskdsl._rect import key_reach, row_major
from oracle import assert_close_by_rule, inputs
from strategies import cases, patterns, shapes


def _run(attn, q, k, v, chunks, append_first=0):
    """Step a cache through the grid in the given chunk sizes; returns (out, lse, max held)."""
    B, Hk, D = k.shape[0], k.shape[1], k.shape[3]
    cache = attn.kv_cache(B, Hk, D, q.dtype, q.device, head_dim_v=v.shape[3])
    outs, lses, held, t = [], [], 0, 0
    if append_first:
        cache.append(k[:, :, :append_first], v[:, :, :append_first])
        t = append_first
    for c in chunks:
        o, lse = cache.step(q[:, :, t:t + c], k[:, :, t:t + c], v[:, :, t:t + c], return_lse=True)
        outs.append(o)
        lses.append(lse)
        t += c
        held = max(held, cache.held)
        assert cache.held <= attn.lookback.tokens, (cache.held, attn.lookback)
    assert cache.position == t
    return torch.cat(outs, 2), torch.cat(lses, 2), held


def _chunks(rng, n, granule, start=0):
    out, t = [], start
    while t < n:
        c = min(n - t, granule * rng.choice([1, 1, 2, 3, 7, 30]))
        out.append(c)
        t += c
    return out


@st.composite
def decodable(draw):
    """A pattern with a causal factor (flat causal in 1-D, causal in time for N-D grids), so
    it decodes token by token or slab by slab, and whatever else the strategies draw."""
    shape = draw(shapes(max_tokens=160))
    heads = draw(st.sampled_from([1, 2, 4]))
    rest = draw(patterns(shape, heads, max_leaves=3))
    causal = md.causal() if len(shape) == 1 or draw(st.booleans()) else md.causal(dims=(0,))
    return shape, heads, causal & rest


@settings(max_examples=60, deadline=None)
@given(decodable(), st.data())
def test_stepping_in_random_chunks_equals_the_full_attention(case, data):
    shape, H, p = case
    kv = data.draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    score = data.draw(st.sampled_from([None, md.sink_logit(0.5), md.softcap(4.0),
                                       md.distance_decay(0.3) + md.alibi()]))
    attn = md.compile(p, shape, H, score=score)
    n = attn.n
    q, k, v = inputs(2, H, n, 8, dtype=torch.float64, seed=n, kv_heads=kv)
    rng = random.Random(data.draw(st.integers(0, 2 ** 16)))
    lb = attn.lookback
    first = data.draw(st.sampled_from([0, lb.granule * (n // lb.granule // 2)]))
    out, lse, _ = _run(attn, q, k, v, _chunks(rng, n, lb.granule, first), append_first=first)
    ref, ref_lse = md.reference.attention(q, k, v, p, shape, score=score, return_lse=True)
    assert_close_by_rule(out, ref[:, :, first:], ref[:, :, first:], "stepped output")
    assert_close_by_rule(lse, ref_lse[:, :, first:], ref_lse[:, :, first:], "stepped lse")


@pytest.mark.parametrize("W, sinks, n", [(16, 2, 200), (5, 0, 64), (40, 3, 41)])
def test_window_plus_sinks_keeps_sinks_and_the_last_window(W, sinks, n):
    p = md.causal() & (md.window(W) | md.sink(sinks)) if sinks else md.causal() & md.window(W)
    attn = md.compile(p, (n,), 2)
    lb = attn.lookback
    bounded = sinks + W < n - 1
    assert lb.bounded == bounded
    if bounded:
        assert (lb.sinks, lb.window, lb.tokens, lb.granule) == (sinks, W, sinks + W, 1)
    q, k, v = inputs(1, 2, n, 8, dtype=torch.float64)
    out, _, held = _run(attn, q, k, v, [1] * n)
    assert held == (sinks + W if bounded else n)
    torch.testing.assert_close(out, md.reference.attention(q, k, v, p, (n,)))


def test_lookback_is_what_the_reach_needs():
    """The reach (from tile classes and partial-pair token masks) equals the reference mask's
    last query per key and last key per query."""
    for p, shape, H in [
        (md.causal() & (md.window(9) | md.sink(3)), (300,), 2),
        (md.neighborhood((3, 5, 5), causal=(True, False, False)), (5, 6, 7), 2),
        (md.heads([md.window(3), md.causal() & md.window(20)]), (200,), 2),
        (md.neighborhood((3, 3), dilation=2, stride=(1, 2)), (20, 20), 1),
        (md.document([0] * 50 + [1] * 77 + [2] * 100) & md.causal(), (227,), 1),
    ]:
        attn = md.compile(p, shape, H)
        reach = key_reach(row_major(attn))
        M = md.reference.mask(p, shape, H).any(0)
        idx = torch.arange(M.shape[0])
        assert torch.equal(reach.last_query, torch.where(M, idx[:, None], -1).amax(0))
        assert torch.equal(reach.last_key, torch.where(M, idx[None, :], -1).amax(1))


def test_time_causal_3d_neighborhood_decodes_frame_by_frame():
    """Autoregressive video: a neighborhood causal in time steps whole frames and keeps the
    K_t - 1 frames a later frame's queries still reach."""
    shape = (6, 5, 7)
    p = md.neighborhood((3, 3, 3), causal=(True, False, False))
    attn = md.compile(p, shape, 2)
    lb = attn.lookback
    assert lb.granule == 35 and lb.bounded and lb.tokens == 2 * 35 and lb.sinks == 0
    q, k, v = inputs(1, 2, 210, 8, dtype=torch.float64, kv_heads=1)
    out, lse, held = _run(attn, q, k, v, [35] * 6)
    assert held <= 70
    torch.testing.assert_close(out, md.reference.attention(q, k, v, p, shape))
    cache = attn.kv_cache(1, 1, 8, torch.float64)
    with pytest.raises(md.MaskDSLError, match=r"whole slabs of dim 0 \(35 tokens each\)"):
        cache.step(q[:, :, :10], k[:, :, :10], v[:, :, :10])


def test_plain_causal_is_unbounded_and_says_so():
    attn = md.compile(md.causal(), (50,), 1)
    assert not attn.lookback.bounded and attn.lookback.tokens == 50
    assert "unbounded" in str(attn.lookback)
    q, k, v = inputs(1, 1, 50, 4, dtype=torch.float64)
    out, _, held = _run(attn, q, k, v, [3] * 16 + [2])
    assert held == 50
    torch.testing.assert_close(out, md.reference.attention(q, k, v, md.causal(), (50,)))


@pytest.mark.parametrize("p, shape, pair", [
    (md.window(2), (20,), r"query 0 \(0,\) attends key 2 \(2,\)"),
    (md.causal() & md.window(3) | md.sink(2), (20,), r"query 0 \(0,\) attends key 1 \(1,\)"),
    (md.neighborhood((3, 3)), (5, 5), r"query 0 \(0, 0\) attends key 12 \(2, 2\)"),
])
def test_patterns_that_see_later_steps_are_refused_with_a_pair(p, shape, pair):
    attn = md.compile(p, shape, 1)
    with pytest.raises(md.MaskDSLError, match=r"cannot be decoded step by step: " + pair):
        attn.lookback
    with pytest.raises(md.MaskDSLError, match="cannot be decoded"):
        attn.kv_cache(1, 1, 8)


def test_bad_steps_and_arguments_are_refused():
    attn = md.compile(md.causal() & md.window(4), (16,), 4)
    cache = attn.kv_cache(1, 2, 8)
    x = torch.randn(1, 4, 2, 8)
    kv = torch.randn(1, 2, 2, 8)
    with pytest.raises(md.MaskDSLError, match=r"cache.step: k: shape \[1, 4, 2, 8\]; expected \[1, 2, 2, 8\]"):
        cache.step(x, x, x)
    with pytest.raises(md.MaskDSLError, match=r"float64 on cpu; the cache holds torch.float32"):
        cache.step(x.double(), kv.double(), kv.double())
    with pytest.raises(md.MaskDSLError, match="0 new tokens"):
        cache.step(x[:, :, :0], kv[:, :, :0], kv[:, :, :0])
    cache.step(torch.randn(1, 4, 15, 8), torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8))
    with pytest.raises(md.MaskDSLError, match=r"2 new tokens at position 15 pass the grid's 16"):
        cache.step(x, kv, kv)
    with pytest.raises(md.MaskDSLError, match=r"kv_heads=3 does not divide heads=4"):
        attn.kv_cache(1, 3, 8)
    with pytest.raises(md.MaskDSLError, match=r"dtype=torch.int64"):
        attn.kv_cache(1, 2, 8, torch.int64)
    with pytest.raises(md.MaskDSLError, match=r"batch=0"):
        attn.kv_cache(0, 2, 8)
    drop = md.compile(md.causal() & md.window(4), (16,), 1, score=md.dropout(0.1))
    with pytest.raises(md.MaskDSLError, match="set attn.training = False"):
        drop.kv_cache(1, 1, 8)
    drop.training = False
    drop.kv_cache(1, 1, 8)


def test_a_nan_key_poisons_only_the_rows_that_attend_it():
    p = md.causal() & (md.window(4) | md.sink(1))
    attn = md.compile(p, (40,), 1)
    q, k, v = inputs(1, 1, 40, 8, dtype=torch.float64)
    k = k.clone()
    k[0, 0, 10] = float("nan")
    out, lse, _ = _run(attn, q, k, v, [1] * 40)
    ref, ref_lse = md.reference.attention(q, k, v, p, (40,), return_lse=True)
    assert_close_by_rule(out, ref, ref, "output")
    assert_close_by_rule(lse, ref_lse, ref_lse, "lse")
    assert torch.isnan(out[0, 0, 10:15]).all() and torch.isfinite(out[0, 0, 15:]).all()


def test_decode_cost_and_memory_do_not_grow_with_the_context():
    """O(window): the cache of a long grid holds sinks + window slots after a long prompt is
    appended, the same as for a short grid (timings live in benchmarks/run.py, ``decode``)."""
    p = md.causal() & (md.window(256) | md.sink(4))
    for n in (1024, 65536):
        attn = md.compile(p, (n,), 2)
        cache = attn.kv_cache(1, 1, 16)
        cache.append(torch.randn(1, 1, n - 8, 16), torch.randn(1, 1, n - 8, 16))
        assert cache.capacity == 260 and cache.held == 260
        for _ in range(8):
            cache.step(torch.randn(1, 2, 1, 16), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16))
        assert cache.held == 260 and cache.capacity == 261


@settings(max_examples=20, deadline=None)
@given(cases(max_tokens=100, max_heads=2))
def test_lookback_is_refused_or_keeps_enough_for_any_pattern(case):
    """Any drawn pattern: either refused with a pair (which the reference mask confirms is a
    later-step key) or the retained set covers every key a later query attends."""
    shape, H, p = case
    attn = md.compile(p, shape, H)
    M = md.reference.mask(p, shape, H).any(0)
    n = M.shape[0]
    try:
        lb = attn.lookback
    except md.MaskDSLError as e:
        import re

        i, j = map(int, re.search(r"query (\d+) .* attends key (\d+)", str(e)).groups())
        g = 1 if len(shape) == 1 else math.prod(shape[1:])
        assert M[i, j] and j // g > i // g
        return
    for t in range(lb.granule, n, lb.granule):
        needed = M[t:, :t].any(0)                 # keys before t some later query attends
        kept = torch.zeros(t, dtype=torch.bool)
        kept[:min(lb.sinks, t)] = True
        kept[max(0, t - lb.window):] = True
        assert not (needed & ~kept).any(), (t, lb)
