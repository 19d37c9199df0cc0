"""Beyond square self-attention (ARCHITECTURE.md, "Extra tokens", "Sub-ranges and the KV
cache"): extra tokens beside the grid (``extra="all"`` and NATTEN-style ``extra="keys"``) and
sub-ranges of the global (query, key) problem, on every backend that runs them, against the
reference; the reference's own reading checked against definitions written here by hand; any
partition of the keys into sub-ranges, merged with ``md.merge``, equals the whole.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import maskdsl as md
from oracle import assert_close_by_rule, assert_matches_reference, triton_available
from strategies import cases, grid_cases, grid_scores


def _qkv(B, H, nq, nk, D=8, kv_heads=None, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    hk = H if kv_heads is None else kv_heads
    make = lambda h, n: torch.randn(B, h, n, D, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return [make(H, nq).requires_grad_(grad), make(hk, nk).requires_grad_(grad),
            make(hk, nk).requires_grad_(grad)]


def _scores(shape, H):
    return st.sampled_from([None, md.softcap(3.0), md.sink_logit(0.4),
                            md.distance_decay(0.2) + md.softcap(5.0), md.alibi()])


# ----------------------------------------------------------------------------- extra tokens

@settings(max_examples=30, deadline=None)
@given(cases(max_tokens=120, max_heads=4), st.integers(1, 12), st.sampled_from(["all", "keys"]),
       st.sampled_from(["tiles", "dense"]), st.data())
def test_extra_tokens_match_the_reference(case, E, mode, backend, data):
    shape, H, p = case
    score = data.draw(_scores(shape, H))
    kv = data.draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    attn = md.compile(p, shape, H, score=score, backend=backend, extra_tokens=E, extra=mode)
    n = math.prod(shape)
    q, k, v = _qkv(2, H, n + (E if mode == "all" else 0), n + E, kv_heads=kv, seed=n + E)
    assert_matches_reference(attn, q, k, v, lse=data.draw(st.booleans()))


@settings(max_examples=10, deadline=None)
@given(grid_cases(max_tokens=1200, max_heads=2), st.integers(1, 80), st.data())
def test_extra_tokens_at_production_sizes_on_tiles(case, E, data):
    shape, H, p = case
    s = data.draw(grid_scores(shape, H, learnable=True))
    attn = md.compile(p, shape, H, score=s, backend="tiles", extra_tokens=E)
    n = math.prod(shape)
    q, k, v = _qkv(1, H, n + E, n + E, D=16, dtype=torch.float32, seed=E)
    assert_matches_reference(attn, q, k, v, lse=True)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_extra_tokens_on_triton():
    p = md.neighborhood((3, 3)) & md.causal(dims=(0,))
    attn = md.compile(p, (6, 6), 2, backend="triton", extra_tokens=5, score=md.softcap(4.0))
    q, k, v = _qkv(1, 2, 41, 41, D=16, dtype=torch.float32)
    assert_matches_reference(attn, q, k, v, lse=True)


def test_the_references_extra_tokens_are_the_definition():
    """Written here from the definition: grid rows = softmax over (pattern's grid keys + every
    extra key) with distance terms on grid x grid only and softcap everywhere; extra rows =
    softmax over every key."""
    shape, H, E = (5, 6), 2, 4
    n = 30
    p = md.neighborhood((3, 3))
    score = md.distance_decay(0.3) + md.softcap(2.0)
    q, k, v = _qkv(1, H, n + E, n + E, grad=False)
    got = md.reference.attention(q, k, v, p, shape, score=score, extra_tokens=E, scale=0.5)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5
    logits[:, :, :n, :n] += md.reference.bias(md.distance_decay(0.3), shape, H, dtype=torch.float64)
    logits = 2.0 * torch.tanh(logits / 2.0)
    allowed = torch.ones(H, n + E, n + E, dtype=torch.bool)
    allowed[:, :n, :n] = md.reference.mask(p, shape, H)
    want = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(got, want)
    keys = md.reference.attention(q[:, :, :n], k, v, p, shape, score=score, extra_tokens=E,
                                  extra="keys", scale=0.5)
    torch.testing.assert_close(keys, want[:, :, :n])


def test_extra_tokens_cost_no_grid_by_grid_dense_work():
    """The grid part runs on the grid's own backend (its tile plan), the extra tokens as
    O(N x E) stripes: a 3-D 16x32x32 grid with 77 text tokens runs on tiles without any
    (N + E)^2 allocation (the reference would need 5 x 16384^2 x 4 bytes)."""
    shape, E = (16, 32, 32), 77
    n = math.prod(shape)
    attn = md.compile(md.neighborhood((3, 7, 7)), shape, 1, backend="tiles", extra_tokens=E)
    q, k, v = _qkv(1, 1, n + E, n + E, D=16, dtype=torch.float32, grad=False)
    with torch.no_grad():
        out = attn(q, k, v)
    assert out.shape == (1, 1, n + E, 16) and torch.isfinite(out).all()
    rows = torch.tensor([0, 5000, n - 1])
    ref = md.reference.attention(q[:, :, :n], k, v, md.neighborhood((3, 7, 7)), shape,
                                 extra_tokens=E, extra="keys")
    torch.testing.assert_close(out[:, :, rows], ref[:, :, rows], atol=2e-6, rtol=1e-5)


def test_nan_in_an_extra_key_poisons_every_row_and_in_a_grid_key_only_its_readers():
    p = md.causal() & md.window(3)
    attn = md.compile(p, (40,), 1, backend="tiles", extra_tokens=3)
    q, k, v = _qkv(1, 1, 43, 43, grad=False)
    k1 = k.clone()
    k1[0, 0, 10] = float("nan")
    out = attn(q, k1, v)
    bad = torch.isnan(out[0, 0, :, 0])
    want = torch.zeros(43, dtype=torch.bool)
    want[10:14] = True
    want[40:] = True                           # extra queries attend every key
    assert torch.equal(bad, want)
    k2 = k.clone()
    k2[0, 0, 41] = float("inf")
    assert torch.isnan(attn(q, k2, v)).all()


# ----------------------------------------------------------------------------- sub-ranges

@st.composite
def ranges(draw, n):
    q0 = draw(st.integers(0, n - 1))
    q1 = draw(st.integers(q0 + 1, n))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=4)))) if n > 1 else []
    bounds = [0] + cuts + [n]
    return (q0, q1), list(zip(bounds[:-1], bounds[1:]))


@settings(max_examples=25, deadline=None)
@given(grid_cases(max_tokens=1500, max_heads=2), st.data())
def test_any_partition_of_the_keys_merged_equals_the_whole(case, data):
    """The issue's property: queries q_range against every part of a partition of the keys
    into sub-ranges, merged with md.merge, equal the full attention's rows (and gradients)."""
    shape, H, p = case
    n = math.prod(shape)
    s = data.draw(grid_scores(shape, H, learnable=False))
    qr, parts = data.draw(ranges(n))
    q, k, v = _qkv(1, H, n, n, D=8, seed=n)
    pieces = []
    once = md.dsl.score.without(s, md.dsl.score.SinkLogit)   # a sink logit joins one part's softmax
    for i, (k0, k1) in enumerate(parts):
        attn = md.compile(p, shape, H, score=s if i == 0 else once, q_range=qr, kv_range=(k0, k1))
        assert attn.backend == "tiles"
        pieces.append(attn(q[:, :, qr[0]:qr[1]], k[:, :, k0:k1], v[:, :, k0:k1],
                           return_lse=True))
    out, lse = md.merge(pieces)
    ref, ref_lse = md.reference.attention(q, k, v, p, shape, score=s, return_lse=True)
    ref, ref_lse = ref[:, :, qr[0]:qr[1]], ref_lse[:, :, qr[0]:qr[1]]
    assert_close_by_rule(out, ref, ref, "merged output")
    assert_close_by_rule(lse, ref_lse, ref_lse, "merged lse")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), [q, k, v]),
                    torch.autograd.grad((ref * w).sum(), [q, k, v])):
        assert_close_by_rule(a, b, b, "merged gradient")


@settings(max_examples=30, deadline=None)
@given(cases(max_tokens=144, max_heads=4), st.sampled_from(["tiles", "dense"]), st.data())
def test_sub_ranges_match_the_reference(case, backend, data):
    shape, H, p = case
    n = math.prod(shape)
    (q0, q1), _ = data.draw(ranges(n))
    k0 = data.draw(st.integers(0, n - 1))
    k1 = data.draw(st.integers(k0 + 1, n))
    score = data.draw(_scores(shape, H))
    kv = data.draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    attn = md.compile(p, shape, H, score=score, backend=backend, q_range=(q0, q1),
                      kv_range=(k0, k1))
    q, k, v = _qkv(2, H, q1 - q0, k1 - k0, kv_heads=kv, seed=n)
    assert_matches_reference(attn, q, k, v, lse=True)


@pytest.mark.parametrize("score", [None, md.sink_logit(md.per_head([0.5, -1.0, 0.2, 2.0]))])
def test_the_flash_rectangle_keeps_empty_rows_empty_with_gqa(score):
    """The rectangle path's CPU flash branch (no score term but a sink logit): queries whose
    keys all lie outside kv_range get zeros and -inf (or the sink alone), gradients finite."""
    shape, H = (64,), 4
    p = md.causal() & md.window(3)
    attn = md.compile(p, shape, H, score=score, backend="tiles", q_range=(0, 40),
                      kv_range=(20, 64))
    q, k, v = _qkv(2, H, 40, 44, kv_heads=2, seed=5)
    out, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))   # rows 0..19: no key
    empty = torch.full_like(lse[:, :, :20], float("-inf")) if score is None else \
        torch.tensor([0.5, -1.0, 0.2, 2.0], dtype=lse.dtype).reshape(1, H, 1).expand(2, H, 20)
    assert torch.equal(lse[:, :, :20], empty)
    assert_matches_reference(attn, q, k, v, lse=True)


def test_the_references_sub_range_is_the_global_problem_cut():
    """Written here: the full reference over the whole grid with keys outside kv_range masked
    out by a mask_fn, rows q_range."""
    shape, H = (6, 7), 2
    p = md.neighborhood((3, 3), dilation=(1, 2)) | md.sink(3)
    score = md.distance_decay(0.25)
    q, k, v = _qkv(1, H, 42, 42, grad=False)
    (q0, q1), (k0, k1) = (5, 30), (2, 37)
    got, lse = md.reference.attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], p, shape,
                                      score=score, q_range=(q0, q1), kv_range=(k0, k1),
                                      return_lse=True)
    cut = md.mask_fn(lambda b, h, qi, kj: (kj >= k0) & (kj < k1), name="cut")
    want, want_lse = md.reference.attention(q, k, v, p & cut, shape, score=score,
                                            return_lse=True)
    torch.testing.assert_close(got, want[:, :, q0:q1])
    torch.testing.assert_close(lse, want_lse[:, :, q0:q1])


def test_a_decode_row_against_its_window_costs_its_window():
    """One query at the end of a long 1-D grid against the keys of its window: the rectangle
    path touches those keys only (no O(N) plan: 1M tokens)."""
    n = 1 << 20
    p = md.causal() & (md.window(64) | md.sink(2))
    attn = md.compile(p, (n,), 2, q_range=(n - 1, n), kv_range=(n - 200, n))
    q, k, v = _qkv(1, 2, 1, 200, grad=False)
    out, lse = attn(q, k, v, return_lse=True)
    ref = torch.softmax((q @ k[:, :, -65:].transpose(-1, -2)) / math.sqrt(8), -1) @ v[:, :, -65:]
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(extra_tokens=-1), r"extra_tokens=-1: expected an int in \[0, "),
    (dict(extra_tokens=2.5), r"extra_tokens=2.5: expected an int"),
    (dict(extra_tokens=3, extra="text"), r"extra='text': expected 'all'"),
    (dict(q_range=(5, 5)), r"q_range=\(5, 5\): expected 0 <= start < end <= 16"),
    (dict(kv_range=(0, 17)), r"kv_range=\(0, 17\): expected 0 <= start < end <= 16"),
    (dict(q_range=[1]), r"q_range=\[1\]: expected a pair \(start, end\) of ints"),
    (dict(extra_tokens=2, q_range=(0, 4)), r"extra_tokens with q_range/kv_range"),
    (dict(q_range=(0, 4), backend="flex"), r"backend='flex': q_range=\(0, 4\): the flex kernels"),
    (dict(extra_tokens=2, score=md.dropout(0.1)), r"extra_tokens=2: dropout is not supported"),
    (dict(extra_tokens=2, score=md.score_fn(lambda s, b, h, q, k: s, name="id")),
     r"score_fn 'id' is defined on grid indices"),
])
def test_bad_extent_arguments_are_refused(kwargs, message):
    with pytest.raises(md.MaskDSLError, match=message):
        md.compile(md.window(2), (16,), 1, **kwargs)


def test_wrong_token_counts_name_the_extent():
    attn = md.compile(md.window(2), (16,), 1, extra_tokens=3, extra="keys")
    q, k, v = _qkv(1, 1, 16, 19, grad=False)
    attn(q, k, v)
    with pytest.raises(md.MaskDSLError, match=r"q: shape \[1, 1, 19, 8\] has 19 tokens; expected "
                                              r"\[B, H, 16, D\] for shape \(16,\) with "
                                              r"extra_tokens=3, extra='keys'"):
        attn(k, k, v)


def test_extent_survives_pickling_and_torch_compile():
    import pickle

    import torch._dynamo

    attn = md.compile(md.causal() & md.window(4), (32,), 2, extra_tokens=3)
    again = pickle.loads(pickle.dumps(attn))
    assert again.extent == attn.extent and "extra_tokens=3" in repr(again)
    sub = md.compile(md.causal() & md.window(4), (32,), 2, q_range=(8, 20), kv_range=(0, 20))
    q, k, v = _qkv(2, 2, 35, 35, dtype=torch.float32)
    qs, ks, vs = _qkv(2, 2, 12, 20, dtype=torch.float32)

    def f(q, k, v, qs, ks, vs):
        a, la = attn(q, k, v, return_lse=True)
        return a.square().sum() + la.sum() + sub(qs, ks, vs).square().sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    got, exp = cf(q, k, v, qs, ks, vs), f(q, k, v, qs, ks, vs)
    torch.testing.assert_close(got, exp)
    ins = [q, k, v, qs, ks, vs]
    for a, b in zip(torch.autograd.grad(got, ins), torch.autograd.grad(exp, ins)):
        torch.testing.assert_close(a, b)


def test_grid_artefacts_are_refused_beyond_the_square_problem():
    for kw in (dict(extra_tokens=3), dict(q_range=(0, 8), kv_range=(0, 16))):
        attn = md.compile(md.window(2), (16,), 1, **kw)
        for get in (lambda a: a.mask_mod, lambda a: a.block_mask(), lambda a: a.source,
                    lambda a: a.flex_inputs(), lambda a: a.mask()):
            with pytest.raises(md.MaskDSLError, match=r"describes the square 16-token grid"):
                get(attn)
