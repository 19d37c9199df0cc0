"""The dense reference against the rules of ARCHITECTURE.md (Semantics).

``brute_allowed`` below re-reads every rule token by token in plain Python (no torch, no
vectorisation); the reference's vectorised masks must equal it exactly. Properties per primitive
and the algebra laws come after; NATTEN checks ``neighborhood`` in test_natten.py.
"""
import math

import torch
from hypothesis import given, strategies as st

import maskdsl as md
from maskdsl.dsl.pattern import (And, Block, Causal, Document, Empty, Full, Heads, Neighborhood,
    Not, Or, Power, Radial, Sink, Window)
from strategies import cases, leaves, shapes


def _coords(flat, shape):
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat //= s
    return out[::-1]


def brute_allowed(p, h, qf, kf, shape, bound):
    """allowed(h, q, k) for flat indices, straight from the written rules, one pair at a time."""
    q, k = _coords(qf, shape), _coords(kf, shape)
    if isinstance(p, Full):
        return True
    if isinstance(p, Empty):
        return False
    if isinstance(p, And):
        return brute_allowed(p.a, h, qf, kf, shape, bound) and brute_allowed(p.b, h, qf, kf, shape, bound)
    if isinstance(p, Or):
        return brute_allowed(p.a, h, qf, kf, shape, bound) or brute_allowed(p.b, h, qf, kf, shape, bound)
    if isinstance(p, Not):
        return not brute_allowed(p.a, h, qf, kf, shape, bound)
    if isinstance(p, Heads):
        return brute_allowed(p.patterns[h], h, qf, kf, shape, bound)
    if id(p) not in bound:
        bound[id(p)] = p.bind(shape, bound["H"])
    b = bound[id(p)][h]
    if isinstance(p, Neighborhood):
        for x in range(len(shape)):
            L, K, s, d = shape[x], b["kernel_size"][x], b["stride"][x], b["dilation"][x]
            if q[x] % d != k[x] % d:
                return False
            g = q[x] % d
            Lg = math.ceil((L - g) / d)
            i, j = q[x] // d, k[x] // d
            if b["causal"][x]:
                leader = min((i // s) * s + s - 1, Lg - 1)
                start = max(leader - K + 1, 0)
                if not start <= j <= i:
                    return False
            else:
                leader = min((i // s) * s + s // 2, Lg - 1)
                start = min(max(leader - K // 2, 0), Lg - K)
                if not start <= j < start + K:
                    return False
        return True
    if isinstance(p, Window):
        return all(-b["left"][x] <= k[x] - q[x] <= b["right"][x] for x in range(len(shape)))
    if isinstance(p, Causal):
        return all(k[x] <= q[x] for x in b["dims"])
    if isinstance(p, Block):
        sz, sh = b["size"], b["shift"]
        return all((q[x] + sz[x] - sh[x]) // sz[x] == (k[x] + sz[x] - sh[x]) // sz[x]
                   for x in range(len(shape)))
    if isinstance(p, Sink):
        return kf < b["n"]
    if isinstance(p, Document):
        return b["ids"][qf] == b["ids"][kf]
    if isinstance(p, Power):
        D = qf // b["block"] - kf // b["block"]
        return D == 0 or (D > 0 and (D & (D - 1)) == 0)
    if isinstance(p, Radial):
        s = math.prod(shape[1:])
        i, j, a, bb = qf // s, kf // s, qf % s, kf % s
        d = abs(i - j)
        if d <= 1 or j < b["sink_frames"]:
            return True
        g = d.bit_length()
        base = 2 ** s.bit_length() / 2 ** g
        w = max(base * b["decay"], b["min_window"])
        return abs(a - bb) <= w and (base >= b["min_window"] or d % int(b["min_window"] / base) == 0)
    raise AssertionError(f"no brute rule for {p!r}")


def brute_mask(p, shape, heads):
    n = math.prod(shape)
    bound = {"H": heads}
    return torch.tensor([[[brute_allowed(p, h, qf, kf, shape, bound) for kf in range(n)]
                          for qf in range(n)] for h in range(heads)])


@st.composite
def leaf_cases(draw, max_tokens=64):
    shape = draw(shapes(max_tokens))
    heads = draw(st.integers(1, 3))
    return shape, heads, draw(leaves(shape, heads))


@given(leaf_cases())
def test_every_primitive_matches_its_rule(case):
    shape, heads, p = case
    assert torch.equal(md.reference.mask(p, shape, heads), brute_mask(p, shape, heads)), repr(p)


@given(cases(max_tokens=48))
def test_random_pattern_trees_match_the_rules(case):
    shape, heads, p = case
    assert torch.equal(md.reference.mask(p, shape, heads), brute_mask(p, shape, heads)), repr(p)


# ----------------------------------------------------------------------------- per-primitive laws

@given(st.data())
def test_noncausal_neighborhood_gives_every_query_exactly_prod_kernel_keys(data):
    shape = data.draw(shapes(min_size=2, max_tokens=200))
    ks, ss, ds = [], [], []
    for L in shape:
        d = data.draw(st.integers(1, max(1, L // 2)))
        k = data.draw(st.integers(2, L // d))
        ks.append(k), ds.append(d), ss.append(data.draw(st.integers(1, k)))
    m = md.reference.mask(md.neighborhood(tuple(ks), tuple(ss), tuple(ds)), shape)
    assert (m.sum(-1) == math.prod(ks)).all()


@given(st.data())
def test_causal_neighborhood_sees_itself_and_at_most_prod_kernel_keys_behind(data):
    shape = data.draw(shapes(min_size=2, max_tokens=200))
    ks = tuple(data.draw(st.integers(2, L)) for L in shape)
    m = md.reference.mask(md.neighborhood(ks, causal=True), shape)[0]
    n = math.prod(shape)
    assert m.diagonal().all()
    assert (m.sum(-1) <= math.prod(ks)).all() and (m.sum(-1) >= 1).all()
    assert not (m & ~md.reference.mask(md.causal(), shape)[0]).any()  # nothing ahead on any dim
    assert m.shape == (n, n)


def test_neighborhood_pinned_rows():
    # 1-D, L=10, K=3: borders shift the window inward; always 3 keys.
    m = md.reference.mask(md.neighborhood(3), (10,))[0]
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert m[5].nonzero().flatten().tolist() == [4, 5, 6]
    assert m[9].nonzero().flatten().tolist() == [7, 8, 9]
    # dilation 2: only the query's residue class, shifted at the border of its group.
    m = md.reference.mask(md.neighborhood(3, dilation=2), (10,))[0]
    assert m[1].nonzero().flatten().tolist() == [1, 3, 5]
    assert m[8].nonzero().flatten().tolist() == [4, 6, 8]
    # stride 3: queries 3, 4, 5 share the window of their leader 4.
    m = md.reference.mask(md.neighborhood(3, stride=3), (10,))[0]
    assert [m[i].nonzero().flatten().tolist() for i in (3, 4, 5)] == [[3, 4, 5]] * 3
    # causal K=3: the two previous tokens and itself.
    m = md.reference.mask(md.neighborhood(3, causal=True), (10,))[0]
    assert m[6].nonzero().flatten().tolist() == [4, 5, 6]
    assert m[0].nonzero().flatten().tolist() == [0]


@given(st.data())
def test_window_is_symmetric_when_left_equals_right(data):
    shape = data.draw(shapes())
    left = tuple(data.draw(st.integers(0, L)) for L in shape)
    m = md.reference.mask(md.window(left), shape)[0]
    assert torch.equal(m, m.T)


@given(st.data())
def test_window_left_right_swap_is_the_transpose(data):
    shape = data.draw(shapes())
    left = tuple(data.draw(st.integers(0, L)) for L in shape)
    right = tuple(data.draw(st.integers(0, L)) for L in shape)
    a = md.reference.mask(md.window(left, right), shape)[0]
    b = md.reference.mask(md.window(right, left), shape)[0]
    assert torch.equal(a, b.T)


def test_1d_causal_is_lower_triangular_and_window_truncates():
    n = 9
    assert torch.equal(md.reference.mask(md.causal(), (n,))[0], torch.ones(n, n, dtype=torch.bool).tril())
    m = md.reference.mask(md.causal() & md.window(2, right=0), (n,))[0]
    assert m.sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3]


def test_block_sink_power_document_pinned():
    m = md.reference.mask(md.block(4), (10,))[0]
    assert m.sum(-1).tolist() == [4] * 8 + [2, 2]
    m = md.reference.mask(md.sink(3), (6,))[0]
    assert m[:, :3].all() and not m[:, 3:].any()
    m = md.reference.mask(md.power(), (10,))[0]
    assert m[9].nonzero().flatten().tolist() == [1, 5, 7, 8, 9]
    m = md.reference.mask(md.power(block=2), (10,))[0]   # blocks 0..4; query 9 is in block 4
    assert m[9].nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7, 8, 9]
    m = md.reference.mask(md.document([0, 0, 1, 1, 1, 2]), (6,))[0]
    assert m.sum(-1).tolist() == [2, 2, 3, 3, 3, 1]
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.equal(md.reference.mask(md.document(ids), (6,)), m[None])


def test_radial_pinned():
    # 8 frames of 4x4 tokens (s = 16, bit_length 5); min_window 4.
    p = md.radial(min_window=4)
    m = md.reference.mask(p, (8, 4, 4))[0].reshape(8, 16, 8, 16)
    assert m[3, :, 2:5, :].all()                     # frames within distance 1: dense
    # d = 2: base = 32 / 4 = 8 >= 4: band |a - b| <= 8, every such frame kept.
    assert m[5, 0, 3].nonzero().flatten().tolist() == list(range(9))
    # d = 4: base = 32 / 8 = 4 >= min_window: band 4.
    assert m[6, 8, 2].nonzero().flatten().tolist() == list(range(4, 13))
    # d = 5: bit_length 3, base 4 -> band 4; d = 7 too.
    assert m[7, 8, 0].nonzero().flatten().tolist() == list(range(4, 13))
    # min_window 8 at d = 4: base 4 < 8: keep only d % int(8 / 4) == 0 -> d = 4 kept, band 8.
    m = md.reference.mask(md.radial(min_window=8), (8, 4, 4))[0].reshape(8, 16, 8, 16)
    assert m[6, 0, 2].nonzero().flatten().tolist() == list(range(9))
    assert not m[7, 0, 2].any()                      # d = 5: 5 % 2 != 0, dropped
    m = md.reference.mask(md.radial(min_window=8, sink_frames=1), (8, 4, 4))[0].reshape(8, 16, 8, 16)
    assert m[7, :, 0].all()                          # sink frame 0 is fully visible


@given(cases())
def test_algebra_laws(case):
    shape, heads, p = case
    ref = md.reference.mask
    m = ref(p, shape, heads)
    assert not ref(p & ~p, shape, heads).any()
    assert ref(p | ~p, shape, heads).all()
    assert torch.equal(ref(p & md.full(), shape, heads), m)
    assert torch.equal(ref(p | md.empty(), shape, heads), m)
    assert torch.equal(ref(~~p, shape, heads), m)


@given(cases(max_heads=1), st.data())
def test_de_morgan(case, data):
    shape, heads, a = case
    b = data.draw(leaves(shape, heads))
    ref = md.reference.mask
    assert torch.equal(ref(~(a & b), shape, heads), ref(~a | ~b, shape, heads))


@given(st.data())
def test_per_head_values_equal_heads_of_single_values(data):
    shape = data.draw(shapes(min_size=2))
    H = data.draw(st.integers(2, 4))
    ks = [tuple(data.draw(st.integers(2, L)) for L in shape) for _ in range(H)]
    lefts = [data.draw(st.integers(0, 5)) for _ in range(H)]
    per = md.neighborhood(md.per_head(ks)) | md.window(md.per_head(lefts))
    each = md.heads([md.neighborhood(k) | md.window(w) for k, w in zip(ks, lefts)])
    assert torch.equal(md.reference.mask(per, shape, H), md.reference.mask(each, shape, H))
    for h in range(H):
        single = md.reference.mask(md.neighborhood(ks[h]) | md.window(lefts[h]), shape)[0]
        assert torch.equal(md.reference.mask(per, shape, H)[h], single)


def test_mask_is_built_on_the_requested_device():
    m = md.reference.mask(md.window(1), (5,), device="cpu")
    assert m.device.type == "cpu" and m.dtype == torch.bool and m.shape == (1, 5, 5)
