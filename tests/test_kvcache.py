"""The KV cache with analytic lookback (ARCHITECTURE.md, "Sub-ranges and the KV cache"):
stepping through a grid in random chunk sizes equals the full computation row by row (outputs
and lse, against the reference), the cache keeps what ``attn.lookback`` says and no more, and
patterns that cannot be decoded are refused with a pair that shows why. Issue 21: extra keys are
served (``cache.set_extra``), extra queries and sub-ranges refused by name, document ids changed
in place read at the next step (or refused, naming the dropped key), learnable score tensors
checked as ``attn()`` checks them, allocations checked against the memory budget and the ring
shrunk back after a long prefill.
"""
import math
import random

import pytest
import torch
from hypothesis import event, given, settings, strategies as st

import maskdsl as md
from maskdsl.kernels.rect import key_reach
from maskdsl.runtime.rect import row_major
from oracle import assert_close_by_rule, inputs, magnitude
from strategies import cases, patterns, relative_table, shapes


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


# ----------------------------------------------------------------------------------------------
# Everything md.compile accepts is served exactly by the cache or refused by name (issue 21:
# extra tokens, sub-ranges, document ids changed in place, learnable score tensors, allocations).

def _stepped(cache, q, k, v, chunks, t=0):
    """(out, lse) of stepping ``cache`` through q, k, v in ``chunks`` from position t."""
    outs, lses = [], []
    for c in chunks:
        o, lse = cache.step(q[:, :, t:t + c], k[:, :, t:t + c], v[:, :, t:t + c],
                            return_lse=True)
        outs.append(o)
        lses.append(lse)
        t += c
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _assert_exact(got, want, what):
    got, want = got.detach(), want.detach()
    assert_close_by_rule(got, want, want, what, m=magnitude(want))


@pytest.mark.parametrize("score", [None, md.softcap(3.0) + md.sink_logit(0.5) + md.alibi()])
def test_extra_keys_are_attended_by_every_step(score):
    """``extra_tokens=E, extra="keys"`` (NATTEN's additional KV, registers, MM-DiT text keys):
    the E extra keys are given once with ``cache.set_extra`` and every step's queries attend
    them beside their window, as ``attn(q, k, v)`` does (it ignored them: error 0.71)."""
    p, E = md.causal() & md.window(3), 4
    attn = md.compile(p, (16,), 2, score=score, extra_tokens=E, extra="keys")
    q = inputs(1, 2, 16, 8, dtype=torch.float64, seed=1)[0]
    _, k, v = inputs(1, 2, 16 + E, 8, dtype=torch.float64, seed=2, kv_heads=1)
    cache = attn.kv_cache(1, 1, 8, torch.float64)
    with pytest.raises(md.MaskDSLError, match=r"extra_tokens=4.*cache.set_extra\(k, v\)"):
        cache.step(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    cache.set_extra(k[:, :, 16:], v[:, :, 16:])
    out, lse = _stepped(cache, q, k, v, [1, 3, 5, 7])
    ref, ref_lse = md.reference.attention(q, k, v, p, (16,), score=score, extra_tokens=E,
                                          extra="keys", return_lse=True)
    _assert_exact(out, ref, "stepped output")
    _assert_exact(lse, ref_lse, "stepped lse")
    _assert_exact(out, attn(q, k, v), "stepped output vs attn()")


def test_extra_keys_of_the_wrong_shape_or_on_an_attention_without_them_are_refused():
    attn = md.compile(md.causal() & md.window(3), (16,), 2, extra_tokens=4, extra="keys")
    cache = attn.kv_cache(1, 2, 8)
    with pytest.raises(md.MaskDSLError, match=r"cache.set_extra: k: shape \[1, 2, 3, 8\]; "
                                              r"expected \[1, 2, 4, 8\]"):
        cache.set_extra(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    plain = md.compile(md.causal() & md.window(3), (16,), 2).kv_cache(1, 2, 8)
    with pytest.raises(md.MaskDSLError, match=r"cache.set_extra: this attention has no extra "
                                              r"tokens"):
        plain.set_extra(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_extra_queries_and_sub_ranges_are_refused_by_name():
    """``extra="all"`` (extra queries attend every grid key) and ``q_range``/``kv_range`` (a
    cache decodes the whole grid from position 0) are refused, saying what to do instead; the
    cache used to step without them (wrong answers)."""
    p = md.causal() & md.window(3)
    with pytest.raises(md.MaskDSLError, match=r"kv_cache: extra_tokens=4 with extra='all'.*"
                                              r"extra='keys'"):
        md.compile(p, (16,), 2, extra_tokens=4).kv_cache(1, 2, 8)
    for kw, name in [(dict(q_range=(8, 16)), r"q_range=\(8, 16\)"),
                     (dict(kv_range=(0, 8)), r"kv_range=\(0, 8\)"),
                     (dict(q_range=(0, 16), kv_range=(0, 16)), r"q_range=\(0, 16\), kv_range")]:
        with pytest.raises(md.MaskDSLError, match=r"kv_cache: this attention has " + name
                                                  + r".*decodes the whole grid"):
            md.compile(p, (16,), 2, **kw).kv_cache(1, 2, 8)


def test_document_ids_changed_in_place_are_served_at_the_next_step():
    """``ids[:] = 0`` after 8 tokens: the next steps serve the new ids (the cache kept every key
    the new pattern needs), as ``attn()`` does; it served the old ids (error 0.92)."""
    ids = torch.tensor([0] * 8 + [1] * 8)
    p = md.document(ids) & md.causal()
    attn = md.compile(p, (16,), 1)
    q, k, v = inputs(1, 1, 16, 8, dtype=torch.float64, seed=3)
    cache = attn.kv_cache(1, 1, 8, torch.float64)
    before, _ = _stepped(cache, q, k, v, [8])
    ids[:] = 0
    after, lse = _stepped(cache, q, k, v, [3, 5], t=8)
    ref, ref_lse = md.reference.attention(q, k, v, md.document(ids) & md.causal(), (16,),
                                          return_lse=True)
    _assert_exact(after, ref[:, :, 8:], "output after the ids changed")
    _assert_exact(lse, ref_lse[:, :, 8:], "lse after the ids changed")
    assert attn.lookback.window == 0 and not attn.lookback.bounded        # the new ids' lookback
    assert cache.lookback == attn.lookback


def test_document_ids_that_need_dropped_keys_are_refused():
    """Short documents keep the last 3 keys; ``ids[:] = 0`` makes query 12 attend key 0, which
    the cache dropped: a MaskDSLError naming the pair, not a wrong answer. Setting the ids back
    serves again; ``reset()`` starts over with the new ids."""
    ids = torch.arange(16) // 4
    attn = md.compile(md.document(ids) & md.causal(), (16,), 1)
    assert (attn.lookback.sinks, attn.lookback.window) == (0, 3)
    q, k, v = inputs(1, 1, 16, 8, dtype=torch.float64, seed=4)
    cache = attn.kv_cache(1, 1, 8, torch.float64)
    _stepped(cache, q, k, v, [1] * 12)
    ids[:] = 0
    with pytest.raises(md.MaskDSLError, match=r"document ids\) changed in place after 12 tokens: "
                                              r"query 12 \(12,\) now attends key 0 \(0,\), which "
                                              r"this cache no longer holds.*cache.reset\(\)"):
        cache.step(q[:, :, 12:13], k[:, :, 12:13], v[:, :, 12:13])
    assert cache.position == 12
    ids[:] = torch.arange(16) // 4
    out, _ = _stepped(cache, q, k, v, [4], t=12)
    p = md.document(torch.arange(16) // 4) & md.causal()
    _assert_exact(out, md.reference.attention(q, k, v, p, (16,))[:, :, 12:], "ids set back")
    ids[:] = 0
    cache.reset()
    out, _ = _stepped(cache, q, k, v, [16])
    _assert_exact(out, md.reference.attention(q, k, v, md.causal(), (16,)), "after reset()")


def test_learnable_score_tensors_are_checked_as_attn_checks_them():
    """One validation path: a learnable softcap set to 0 or a sink logit set to inf raises the
    same MaskDSLError from ``step`` as from ``attn()`` (step gave a finite wrong output, and a
    non-finite one); a value changed in range is read at the next step."""
    p = md.causal() & md.window(3)
    q, k, v = inputs(1, 2, 16, 8, dtype=torch.float64, seed=5)
    cap = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    sink = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    attn = md.compile(p, (16,), 2, score=md.softcap(cap) + md.sink_logit(sink))
    cache = attn.kv_cache(1, 2, 8, torch.float64)
    _stepped(cache, q, k, v, [5])
    for t, value, message in [(cap, 0.0, r"softcap: cap=0.0 \(a tensor value\) is out of range"),
                              (sink, float("inf"), r"sink_logit: values\[0\]=inf \(a tensor "
                                                   r"value\) is out of range")]:
        old = t.detach().clone()
        with torch.no_grad():
            t.fill_(value)
        with pytest.raises(md.MaskDSLError, match=message):
            attn(q, k, v)
        with pytest.raises(md.MaskDSLError, match=message):
            cache.step(q[:, :, 5:6], k[:, :, 5:6], v[:, :, 5:6])
        with torch.no_grad():
            t.copy_(old)
    with torch.no_grad():
        cap.fill_(1.5)
        sink.mul_(2)
    out, _ = _stepped(cache, q, k, v, [11], t=5)
    ref = md.reference.attention(q, k, v, p, (16,), score=md.softcap(1.5) + md.sink_logit(
        sink.detach()))
    _assert_exact(out, ref[:, :, 5:], "after the learnable values changed")


def test_meta_device_none_keys_and_a_non_bool_return_lse_are_refused():
    attn = md.compile(md.causal() & md.window(3), (16,), 2)
    with pytest.raises(md.MaskDSLError, match=r"kv_cache: device='meta'.*expected a device "
                                              r"with storage"):
        attn.kv_cache(1, 2, 8, device="meta")
    cache = attn.kv_cache(1, 2, 8)
    with pytest.raises(md.MaskDSLError, match=r"cache.append: k: expected a 4-D tensor "
                                              r"\[B, H, c, D\], got NoneType"):
        cache.append(None, None)
    with pytest.raises(md.MaskDSLError, match=r"cache.append: v: expected a 4-D tensor"):
        cache.append(torch.randn(1, 2, 3, 8), None)
    x, kv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(md.MaskDSLError, match=r"return_lse='yes': expected True or False"):
        cache.step(x, kv, kv, return_lse="yes")
    assert cache.position == 0


def test_the_ring_shrinks_back_after_a_long_prefill():
    """A long prefill step no longer leaves its size in slots: the step stores its tokens a
    sub-chunk at a time (sinks + window + 2048 at most) and the next decode step brings the
    capacity back to sinks + window + 1 (a 4096-token prefill left 4164 slots)."""
    p = md.causal() & (md.window(64) | md.sink(4))
    attn = md.compile(p, (4200,), 2)
    q, k, v = inputs(1, 2, 4200, 8, dtype=torch.float64, seed=6, kv_heads=1)
    cache = attn.kv_cache(1, 1, 8, torch.float64)
    out, _ = _stepped(cache, q, k, v, [4096])
    assert cache.capacity <= 4 + 64 + 2048
    outs = [out]
    for t in range(4096, 4100):
        outs.append(_stepped(cache, q, k, v, [1], t=t)[0])
        assert cache.capacity == 4 + 64 + 1
    rows = torch.arange(4000, 4100)          # the prefill's last rows and the decoded ones
    ref = md.reference.attention(q, k, v, p, (4200,), rows=rows)
    _assert_exact(torch.cat(outs, 2)[:, :, 4000:], ref, "prefill and decode")


def test_buffers_beyond_the_memory_budget_are_refused(monkeypatch):
    """The cache's buffers are checked before they are allocated: at ``kv_cache()`` for the
    sinks + window + one step it always needs, and when a step grows the ring."""
    import maskdsl._memory as memory

    attn = md.compile(md.causal() & md.window(1000), (5000,), 2)
    cache = attn.kv_cache(1, 2, 64)
    cache.step(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    monkeypatch.setattr(memory, "budget", lambda: 300_000)
    with pytest.raises(md.MaskDSLError, match=r"kv_cache: key/value buffers of 1002 tokens .* "
                                              r"would need about 1009\.8 KB, more than the "
                                              r"293\.0 KB this process can allocate; .*smaller "
                                              r"steps"):
        cache.step(torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64))
    assert cache.position == 1
    with pytest.raises(md.MaskDSLError, match=r"kv_cache: key/value buffers of 1001 tokens"):
        attn.kv_cache(1, 2, 64)


def test_a_cache_too_big_for_the_address_space_is_refused_in_a_subprocess():
    """Finding 9's repro scaled down: ``causal() & window(2**14)`` on 2**15 tokens, 32 heads,
    D = 1024 (4.3 GB of keys and values) with 3 GB of address space left: a MaskDSLError, not a raw
    allocator error (tests/test_adversarial.py's resource bombs run the same way)."""
    from limited import run_limited

    r = run_limited("""
        attn = md.compile(md.causal() & md.window(2 ** 14), (2 ** 15,), 32)
        try:
            cache = attn.kv_cache(1, 32, 1024)
            x = torch.zeros(1, 32, 1, 1024)
            cache.step(x, x, x)
            print("NO ERROR")
        except md.MaskDSLError as e:
            print("MaskDSLError:", e)
    """, limit_gb=3.0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MaskDSLError: kv_cache: key/value buffers of 16385 tokens" in r.stdout, r.stdout


# ----------------------------------------------------------------------------------------------
# The property: everything md.compile accepts, stepped in random chunks, equals attn(...) and
# the reference, or is refused by name.

def _doc_ids(draw, n: int) -> list:
    cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4)))
    return [sum(c <= i for c in cuts) for i in range(n)]


@st.composite
def cache_requests(draw):
    """A decodable pattern (a causal factor, maybe a document whose ids are a tensor the test
    changes in place), GQA, score terms with learnable tensors, and an extent: square, extra
    keys (served), extra queries or sub-ranges (refused by name)."""
    shape = draw(shapes(max_tokens=80))
    H = draw(st.sampled_from([1, 2, 4]))
    n = math.prod(shape)
    causal = md.causal() if len(shape) == 1 or draw(st.booleans()) else md.causal(dims=(0,))
    base = causal & draw(patterns(shape, H, max_leaves=2))
    ids = torch.tensor(_doc_ids(draw, n)) if draw(st.integers(0, 2)) else None
    terms = draw(st.lists(st.sampled_from(["softcap", "sink", "alibi", "decay", "table"]),
                          max_size=3, unique=True))
    score = []
    for t in terms:
        if t == "softcap":
            score.append(md.softcap(torch.tensor(draw(st.sampled_from([0.5, 3.0])),
                                                 dtype=torch.float64, requires_grad=True)))
        elif t == "sink":
            score.append(md.sink_logit(torch.linspace(-1.0, 1.0, H, dtype=torch.float64)
                                       .requires_grad_(True)))
        elif t == "alibi":
            score.append(md.alibi())
        elif t == "decay":
            score.append(md.distance_decay(0.3))
        else:
            score.append(md.relative_bias(relative_table(shape, H, requires_grad=True,
                                                         radius=2)))
    extent = draw(st.sampled_from(["square"] * 7 + ["keys"] * 3 + ["all", "q_range",
                                                                 "kv_range"]))
    kw = {}
    if extent in ("keys", "all"):
        kw = dict(extra_tokens=draw(st.integers(1, 3)), extra=extent)
    elif extent != "square":
        a = draw(st.integers(0, n - 1))
        kw = {extent: (a, draw(st.integers(a + 1, n)))}
    return shape, H, base, ids, sum(score, 0) or None, kw


def _pattern(base, ids):
    return base if ids is None else base & md.document(ids)


def _kept(lb, t: int) -> torch.Tensor:
    """bool [t]: the keys before t a cache with lookback ``lb`` is sure to hold."""
    kept = torch.zeros(t, dtype=torch.bool)
    kept[:min(lb.sinks, t)] = True
    kept[max(0, t - lb.window):] = True
    return kept


@settings(max_examples=40, deadline=None)
@given(cache_requests(), st.data())
def test_a_cache_stepped_in_random_chunks_equals_attn_or_is_refused_by_name(request, data):
    """Issue 21, deliverable 2: whatever md.compile accepts, a cache stepped in random chunks
    (a prompt maybe appended first) gives attn()'s rows and the reference's, outputs and lse.
    At one step boundary the document ids change in place (to one document or others), a
    learnable score tensor changes in range, or is set out of range (0 for a softcap, inf
    otherwise: the step must raise attn()'s own MaskDSLError, or give attn()'s rows when attn()
    accepts it). A refusal after new ids must name a pair (i, j) the new mask attends with j
    dropped by the cache, and only when the keys the old lookback is sure to keep did not
    suffice. extra="all" and q_range/kv_range must be refused by name at kv_cache()."""
    shape, H, base, ids, score, kw = request
    p = _pattern(base, ids)
    attn = md.compile(p, shape, H, score=score, **kw)
    n, E = attn.n, kw.get("extra_tokens", 0)
    kv = data.draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    if kw and kw.get("extra") != "keys":
        what = (r"extra_tokens=\d+ with extra='all'" if E else
                r"this attention has (q_range|kv_range)=.*decodes the whole grid")
        with pytest.raises(md.MaskDSLError, match=r"kv_cache: " + what):
            attn.kv_cache(1, kv, 8, torch.float64)
        event("refused by name: " + ("extra='all'" if E else "a sub-range"))
        return
    q = inputs(1, H, n, 8, dtype=torch.float64, seed=n)[0]
    _, k, v = inputs(1, H, n + E, 8, dtype=torch.float64, seed=n + 1, Dv=6, kv_heads=kv)
    cache = attn.kv_cache(1, kv, 8, torch.float64, head_dim_v=6)
    if E:
        cache.set_extra(k[:, :, n:], v[:, :, n:])
    ref_kw = dict(extra_tokens=E, extra="keys") if E else {}

    def truth(pattern):
        """(reference out, lse, attn() out) on the whole grid, with the tensors as they are."""
        r, lse = md.reference.attention(q, k, v, pattern, shape, score=score, return_lse=True,
                                        **ref_kw)
        return r, lse, attn(q, k, v)

    lb = cache.lookback
    g = lb.granule
    rng = random.Random(data.draw(st.integers(0, 2 ** 16)))
    t = g * rng.randrange(0, n // g) if data.draw(st.booleans()) else 0
    if t:
        cache.append(k[:, :, :t], v[:, :, :t])
    change = data.draw(st.sampled_from(["none", "ids", "ids", "values", "bad value"]))
    at = g * data.draw(st.integers(t // g, max(t // g, n // g - 1)))    # where it happens
    frozen = _pattern(base, ids.clone()) if ids is not None else p
    want = truth(frozen)
    while t < n:
        if t == at and change != "none":
            if change == "ids" and ids is not None:     # one document, or others
                ids[:] = 0 if data.draw(st.booleans()) else torch.tensor(_doc_ids(data.draw, n))
            held = [(term, x) for term in md.dsl.score.score_terms(score)
                    for x in vars(term).values() if isinstance(x, torch.Tensor)]
            tensors = [x for _, x in held]
            if change == "bad value" and tensors:       # both calls refuse alike, or agree
                term, x = held[0]
                old = x.detach().clone()
                with torch.no_grad():
                    x.fill_(0.0 if isinstance(term, md.dsl.score.Softcap) else float("inf"))
                try:
                    by_attn = attn(q, k, v)
                except md.MaskDSLError as e:
                    with pytest.raises(md.MaskDSLError) as by_step:
                        cache.step(q[:, :, t:t + g], k[:, :, t:t + g], v[:, :, t:t + g])
                    assert str(by_step.value) == str(e)
                    event("an out-of-range tensor value refused alike")
                else:      # accepted: the step's rows are attn()'s, non-finite ones included
                    o = cache.step(q[:, :, t:t + g], k[:, :, t:t + g], v[:, :, t:t + g])
                    _assert_exact(o, by_attn[:, :, t:t + g], "a step vs attn() on the value")
                    event("an extreme tensor value accepted alike")
                    return
                with torch.no_grad():
                    x.copy_(old)
            elif change == "values" and tensors:          # in range: read at the next step
                with torch.no_grad():
                    tensors[-1].mul_(0.5)
            want = truth(p)
            M = md.reference.mask(p, shape, H).any(0)
            needed = M[t:, :t].any(0) if t else torch.zeros(0, dtype=torch.bool)
            try:
                o, lse = cache.step(q[:, :, t:t + g], k[:, :, t:t + g], v[:, :, t:t + g],
                                    return_lse=True)
            except md.MaskDSLError as e:
                import re

                found = re.search(r"query (\d+) .* now attends key (\d+) .*no longer holds",
                                  str(e))
                assert found, e
                i, j = map(int, found.groups())
                assert i >= t > j and M[i, j] and j not in cache._pos.tolist(), (i, j, t)
                assert (needed & ~_kept(lb, t)).any(), "refused though the keys were kept"
                event("new ids need dropped keys: refused with the pair")
                return
            lb = cache.lookback
            assert lb == attn.lookback
            event(f"served after a change of {change}" + (" (extra keys)" if E else ""))
        else:
            c = min(n - t, g * rng.choice([1, 1, 2, 3, 7]))
            if t < at < t + c:
                c = at - t
            o, lse = cache.step(q[:, :, t:t + c], k[:, :, t:t + c], v[:, :, t:t + c],
                                return_lse=True)
        c = o.shape[2]
        ref, ref_lse, by_attn = want
        _assert_exact(o, ref[:, :, t:t + c], f"rows {t}..{t + c}")
        _assert_exact(lse, ref_lse[:, :, t:t + c], f"lse of rows {t}..{t + c}")
        _assert_exact(o, by_attn[:, :, t:t + c], f"rows {t}..{t + c} vs attn()")
        t += c
        assert cache.position == t and cache.held <= cache.lookback.tokens


def _qkv_seq(B, H, Hk, n, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hk, n, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hk, n, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("p", [md.causal() & (md.window(8) | md.sink(2)), md.causal()],
                         ids=["window+sinks", "causal (unbounded)"])
def test_crop_serves_steps_as_if_the_later_tokens_never_came(p):
    """Assisted decoding: 40 tokens stepped, the last 4 rejected (crop(36)), 4 others stepped:
    the outputs are the rows of attn() over the sequence with those 4 replaced."""
    n, H, Hk, D = 48, 4, 2, 8
    attn = md.compile(p, (n,), H)
    q, k, v = _qkv_seq(2, H, Hk, n, D, seed=0)
    q2, k2, v2 = _qkv_seq(2, H, Hk, n, D, seed=1)
    cache = attn.kv_cache(2, Hk, D, torch.float64)
    for t in range(0, 40, 5):
        cache.step(q[:, :, t:t + 5], k[:, :, t:t + 5], v[:, :, t:t + 5])
    cache.crop(36)
    assert cache.position == 36
    got = torch.cat([cache.step(q2[:, :, t:t + 1], k2[:, :, t:t + 1], v2[:, :, t:t + 1])
                     for t in range(36, 40)], 2)
    qf, kf, vf = (torch.cat([a[:, :, :36], b[:, :, 36:]], 2) for a, b in ((q, q2), (k, k2), (v, v2)))
    want = attn(qf, kf, vf)[:, :, 36:40]
    torch.testing.assert_close(got, want)
    cache.crop(40)                  # nothing beyond the position: a no-op at it
    assert cache.position == 40


def test_crop_further_back_than_the_ring_and_bad_n_are_refused():
    attn = md.compile(md.causal() & (md.window(8) | md.sink(2)), (64,), 2)
    q, k, v = _qkv_seq(1, 2, 2, 64, 8, seed=2)
    cache = attn.kv_cache(1, 2, 8, torch.float64)
    for t in range(40):             # token by token: the ring holds the last 8 + 1
        cache.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    with pytest.raises(md.MaskDSLError, match=r"cache.crop: n=20: a query at position 20 attends "
                                              r"key 19, which this cache dropped.*expected "
                                              r"39 <= n <= 40 or n <= 2"):
        cache.crop(20)
    assert cache.position == 40     # a refusal changes nothing
    for bad, msg in [(41, r"n=41: expected 0 <= n <= position \(40\)"), (-1, r"n=-1"),
                     (3.5, r"n=3.5: expected an int"), (True, r"n=True: expected an int")]:
        with pytest.raises(md.MaskDSLError, match=msg):
            cache.crop(bad)
    cache.crop(39)                  # the ring's own span
    assert cache.position == 39


def test_reorder_follows_beams():
    """Beam search: rows reordered as [2, 0, 0] after 20 tokens, then stepped on: each row's
    outputs are attn() over its beam's history followed by its own new tokens."""
    n, H, Hk, D = 32, 2, 1, 8
    p = md.causal() & (md.window(6) | md.sink(1))
    attn = md.compile(p, (n,), H)
    q, k, v = _qkv_seq(3, H, Hk, n, D, seed=3)
    cache = attn.kv_cache(3, Hk, D, torch.float64)
    cache.step(q[:, :, :20], k[:, :, :20], v[:, :, :20])
    order = torch.tensor([2, 0, 0])
    cache.reorder(order)
    got = cache.step(q[:, :, 20:26], k[:, :, 20:26], v[:, :, 20:26])
    qf, kf, vf = (torch.cat([x[order, :, :20], x[:, :, 20:]], 2) for x in (q, k, v))
    torch.testing.assert_close(got, attn(qf, kf, vf)[:, :, 20:26])
    for bad, msg in [([0, 1], r"shape \[2\].*expected 3 ints in \[0, 3\)"),
                     ([0, 1, 3], r"indices\[2\]=3: expected a batch row in \[0, 3\)"),
                     (torch.tensor([0.0, 1.0, 2.0]), r"dtype float32"), ("abc", r"indices='abc'")]:
        with pytest.raises(md.MaskDSLError, match=msg):
            cache.reorder(bad)
