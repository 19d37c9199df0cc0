"""Every backend against the one reference, at the backends' own sizes (64/128-token tiles on
grids that straddle them, 3-D first, dilation with stride and per-dim causality, score terms on
permuted layouts), plus the non-finite isolation property on every backend.

The oracle and its tolerance rule are in ``oracle.py`` (ARCHITECTURE.md, "Testing").
"""
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import maskdsl as md
from maskdsl.kernels.flex import run_flex
from oracle import assert_close_by_rule, assert_matches_reference, inputs, triton_available
from strategies import grid_cases, grid_scores

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"


def _flex_score(s):
    """Flex cannot run sink_logit (or dropout): drop them; tensors detached (no CPU backward)."""
    terms = [t for t in md.dsl.score.score_terms(s)
             if not isinstance(t, (md.dsl.score.SinkLogit, md.dsl.score.Dropout))]
    out = []
    for t in terms:
        if isinstance(t, md.dsl.score.RelativeBias):
            t = md.relative_bias(t.table.detach())
        out.append(t)
    return sum(out, 0) or None


@settings(max_examples=300 if THOROUGH else 45)
@given(grid_cases(), st.data())
def test_tiles_matches_reference_at_production_sizes(case, data):
    shape, H, p = case
    s = data.draw(grid_scores(shape, H))
    attn = md.compile(p, shape, H, score=s, backend="tiles")
    q, k, v = inputs(2, H, math.prod(shape), 16, grad=True, seed=len(repr(p)))
    assert_matches_reference(attn, q, k, v)


@settings(max_examples=200 if THOROUGH else 25)
@given(grid_cases(max_tokens=1500), st.data())
def test_dense_matches_reference_at_production_sizes(case, data):
    shape, H, p = case
    s = data.draw(grid_scores(shape, H))
    attn = md.compile(p, shape, H, score=s, backend="dense")
    q, k, v = inputs(1, H, math.prod(shape), 16, grad=True)
    assert_matches_reference(attn, q, k, v)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=200 if THOROUGH else 30)
@given(grid_cases(max_tokens=1800), st.data())
def test_flex_program_matches_reference_at_production_sizes(case, data):
    """The flex backend's Program (its layout search, decode, mask_mod, score_mod and analytic
    BlockMask at 128-token blocks), run by eager flex_attention."""
    shape, H, p = case
    s = _flex_score(data.draw(grid_scores(shape, H, learnable=False)))
    attn = md.compile(p, shape, H, score=s, backend="flex")
    q, k, v = inputs(1, H, math.prod(shape), 16)
    out = run_flex(attn.program, q, k, v, 0.25, compiled=False)
    assert_matches_reference(attn, q, k, v, grads=False, scale=0.25, out=out)


# ----------------------------------------------------------------------------- regressions

def test_issue_3d_dilated_neighborhood_repro():
    """The issue's repro: tiles was off by 1.76 (a wrong layout decode, now test_layouts.py)."""
    shape = (8, 10, 24)
    p = md.neighborhood((3, 3, 7), stride=(2, 3, 3), dilation=(2, 2, 1))
    q, k, v = inputs(1, 2, 1920, 16, dtype=torch.float64)
    attn = md.compile(p, shape, 2, backend="tiles")
    assert_matches_reference(attn, q, k, v, grads=False)
    p2 = md.neighborhood((2, 2, 2), dilation=(2, 2, 1), causal=(True, True, False))
    attn = md.compile(p2, (8, 13, 12), 2, backend="tiles", score=md.distance_decay(0.3))
    q, k, v = inputs(1, 2, 8 * 13 * 12, 16, dtype=torch.float64)
    assert_matches_reference(attn, q, k, v, grads=False)


@pytest.mark.parametrize("causal", [(a, b, c) for a in (False, True) for b in (False, True)
                                    for c in (False, True)])
def test_issue_natten_extended_3d_mask_mod(causal):
    """NATTEN's extended 3-D problem: only attn.mask_mod was wrong here (tiles skip the tiles
    the broken decode misread). The mask_mod in the program's layout, read back through the
    layout's tokens, must equal the reference on every sampled query."""
    shape = (30, 48, 18)
    p = md.neighborhood((3, 2, 8), dilation=(8, 18, 2), causal=causal)
    attn = md.compile(p, shape, 1, backend="flex")
    prog = attn.program
    mask_mod, _ = prog.mods("cpu")
    tok = torch.from_numpy(prog.layout.tokens())
    real = tok >= 0
    pos = torch.arange(prog.layout.n_padded)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, prog.layout.n_padded, (48,), generator=gen)
    got = mask_mod(0, torch.tensor(0), rows[:, None], pos[None, :])
    users = tok[rows]
    ref = md.reference.mask(p, shape, 1, rows=users.clamp(min=0))[0]
    expected = torch.zeros(len(rows), prog.layout.n_padded, dtype=torch.bool)
    expected[:, real] = ref[:, tok[real]]
    expected[users < 0] = False
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- non-finite rows

def _triton_ok():
    return triton_available()




def _plant(x, rows, kind, gen):
    """x with a NaN / +inf / -inf written into one random column of each listed (b, h, n) row."""
    x = x.detach().clone()
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    for b, h, n in rows:
        x[b, h, n, int(torch.randint(0, x.shape[-1], (1,), generator=gen))] = value
    return x


@st.composite
def nan_cases(draw, max_tokens):
    shape, H, p = draw(grid_cases(max_tokens=max_tokens, max_heads=2))
    n = math.prod(shape)
    B = 2
    rows = draw(st.lists(st.tuples(st.integers(0, B - 1), st.integers(0, H - 1),
                                   st.integers(0, n - 1)), min_size=1, max_size=4, unique=True))
    where = draw(st.sampled_from(["k", "v", "q", "kv"]))
    kind = draw(st.sampled_from(["nan", "inf", "-inf"]))
    return shape, H, p, B, rows, where, kind


def _check_isolation(backend, case, grads):
    shape, H, p, B, rows, where, kind = case
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(3)
    attn = md.compile(p, shape, H, backend=backend)
    q, k, v = inputs(B, H, n, 16)
    dirty = {"q": q, "k": k, "v": v}
    for name in where:
        dirty[name] = _plant(dirty[name], rows, kind, gen)
    qs = [t.clone().requires_grad_(grads) for t in (q, k, v)]
    ds = [dirty[x].clone().requires_grad_(grads) for x in "qkv"]
    clean, out = attn(*qs), attn(*ds)
    m = md.reference.mask(p, shape, H)                       # [H, N, N]
    planted = torch.zeros(B, H, n, dtype=torch.bool)
    for b, h, i in rows:
        planted[b, h, i] = True
    attends = torch.zeros(B, H, n, dtype=torch.bool)
    if "k" in where or "v" in where:
        attends |= (m[None] & planted[:, :, None, :]).any(-1)
    if "q" in where:
        attends |= planted
    same = ~attends
    assert torch.equal(out[same], clean[same]), "rows that attend no planted key changed"
    assert torch.isnan(out[attends]).all(), "rows that attend a planted key must be NaN"
    if not grads:
        return
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, ds, g)
    exp = torch.autograd.grad(clean, qs, g)
    assert torch.equal(got[0][same], exp[0][same]), "dq changed in rows that attend no planted key"
    assert torch.isnan(got[0][attends]).all(), "a poisoned row's dq must be NaN"
    # dk, dv: a key's gradient is unchanged unless a poisoned query attends it (or it is planted)
    touched = (m[None] & attends[:, :, :, None]).any(-2) | planted
    for a, b in zip(got[1:], exp[1:]):
        assert torch.isfinite(a).all()
        assert torch.equal(a[~touched], b[~touched]), "dk/dv changed for keys no poisoned row attends"


@pytest.mark.parametrize("backend", ["dense", "tiles", "flex"])
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=100 if THOROUGH else 12)
@given(data=st.data())
def test_nonfinite_values_stay_in_the_rows_that_attend_them(backend, data):
    case = data.draw(nan_cases(max_tokens=1200))
    if backend == "flex":   # eager flex: the same mods and BlockMask, no compile per pattern
        import maskdsl.kernels.flex as flex
        from torch.nn.attention.flex_attention import flex_attention
        saved, flex._compiled = flex._compiled, flex_attention
        try:
            _check_isolation(backend, case, grads=False)
        finally:
            flex._compiled = saved
        return
    _check_isolation(backend, case, grads=True)


TRITON_NAN_CASES = [   # the interpreter is slow: fixed small cases, forward and backward
    ((40,), 1, md.causal() & md.window(5) | md.sink(2), 1, [(0, 0, 0), (0, 0, 17)], "kv", "nan"),
    ((6, 7), 2, md.neighborhood((3, 3), dilation=(2, 1)), 1, [(0, 1, 9)], "v", "inf"),
    ((4, 4, 4), 1, md.neighborhood((2, 3, 3), causal=(True, False, False)), 1, [(0, 0, 21)],
     "k", "-inf"),
]


@pytest.mark.parametrize("case", TRITON_NAN_CASES, ids=["1d-sinks", "2d-dilated", "3d-causal"])
def test_nonfinite_values_stay_in_the_rows_that_attend_them_triton(case):
    if not _triton_ok():
        pytest.skip("triton is not installed")
    _check_isolation("triton", case, grads=True)


def test_issue_nan_examples():
    """The issue's examples: tiles' padding slots pointed at token 0 (360 rows poisoned where
    101 attend it) and a NaN at token 500 under window(2) poisoned 64 rows instead of 5; the
    reference and dense made every row NaN from one NaN value row."""
    N = 1000
    for p, token in [(md.causal() & md.window(100), 0), (md.window(2), 500)]:
        for backend in ("tiles", "dense"):
            attn = md.compile(p, (N,), 1, backend=backend)
            q, k, v = inputs(1, 1, N, 16)
            k[0, 0, token, 3] = float("inf")
            v[0, 0, token, 5] = float("nan")
            out = attn(q, k, v)
            expected = md.reference.mask(p, (N,), 1)[0, :, token]
            assert torch.equal(torch.isnan(out[0, 0]).any(-1), expected), (p, backend)
            ref = md.reference.attention(q.double(), k.double(), v.double(), p, (N,))
            assert torch.equal(torch.isnan(ref[0, 0]).any(-1), expected)
            assert_close_by_rule(out, ref, md.reference.attention(q, k, v, p, (N,)), "output")


@pytest.mark.parametrize("backend", ["dense", "tiles", "triton"])
def test_nan_sink_logit_propagates_on_every_backend(backend):
    """A NaN sink_logit gave unnormalised finite outputs (5e5) on tiles, dense and the reference
    (``where(denom > 0, denom, 1)`` turned NaN into 1); Triton returned NaN. All agree now: the
    NaN head is NaN, the other head exact."""
    if backend == "triton" and not _triton_ok():
        pytest.skip("triton is not installed")
    s = md.sink_logit(torch.tensor([float("nan"), 0.5]))
    attn = md.compile(md.window(3), (64,), 2, score=s, backend=backend)
    q, k, v = inputs(1, 2, 64, 16)
    out = attn(q, k, v)
    ref = md.reference.attention(q.double(), k.double(), v.double(), md.window(3), (64,), score=s)
    assert torch.isnan(out[:, 0]).all() and torch.isnan(ref[:, 0]).all()
    torch.testing.assert_close(out[:, 1].double(), ref[:, 1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- every backend
# One parametrized copy of what each backend used to test on its own: fully masked rows,
# dropout (reproducible, keep rate, training off, the reference given the backend's own keep
# mask) and dispatch.

ALL = ["dense", "tiles", "flex", "triton"]
GRAD = {"dense", "tiles", "triton"}          # flex has no backward on CPU


def _skip_missing(backend):
    if backend == "triton" and not _triton_ok():
        pytest.skip("triton is not installed")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fully_masked_rows_are_zero_with_finite_gradients(backend):
    """Rows with no key output zeros (never NaN) with finite gradients, with and without a sink
    logit; the cases are built so that empty rows exist (checked)."""
    _skip_missing(backend)
    second = md.neighborhood(3) if backend == "triton" else md.causal() & md.window(2) & ~md.sink(4)
    p = md.heads([md.empty(), second])          # Triton has no ~: head 1 then has no empty row
    shape, H = (40,), 2
    m = md.reference.mask(p, shape, H)
    empty = ~m.any(-1)
    assert empty[0].all() and (backend == "triton" or empty[1, :4].all()) and not empty[1, 4:].any()
    sink = torch.tensor([1.0, 0.0], requires_grad=backend in GRAD)
    for score in (None, md.sink_logit(sink)):
        if backend == "flex" and score is not None:
            continue
        attn = md.compile(p, shape, H, score=score, backend=backend)
        q, k, v = inputs(1, H, 40, 16, grad=backend in GRAD)
        out = assert_matches_reference(attn, q, k, v, grads=backend in GRAD)
        assert torch.isfinite(out).all()
        if score is None:
            assert (out[0][empty] == 0).all()


def _keep_of(backend, attn, B, H, n, call_index_generator):
    """The dropout keep mask [B, H, N, N] the backend's first call draws, in the reference's
    layout: the dense path draws it with the reference's own function; tiles in its gathered
    tile layout (scattered back here); Triton in-kernel (its keep_mask tool)."""
    if backend == "dense":
        return md.reference.dropout_mask(attn.score, B, H, n, generator=call_index_generator)
    if backend == "tiles":
        from maskdsl.kernels.tiles import plan_for

        prog = attn.tiles_program
        plan = plan_for(prog, torch.device("cpu"))
        _, drop_p = md.dsl.score.score_extras(attn.score, H, "cpu")
        u = torch.rand((B, H, plan.T, plan.V, plan.K), generator=call_index_generator,
                       dtype=torch.float64)
        keep_g = u >= drop_p.double().reshape(1, H, 1, 1, 1)
        tok = torch.from_numpy(prog.layout.tokens())
        qtok = tok[plan.q_pos.expand(plan.T, plan.V, 1)].expand(plan.T, plan.V, plan.K)
        out = torch.zeros(B, H, n, n, dtype=torch.bool)
        for h in range(H):
            ok = plan.allowed[h if plan.allowed.shape[0] > 1 else 0]
            ktok = tok[plan.k_pos[h if plan.Hc > 1 else 0]].expand(plan.T, plan.V, plan.K)
            out[:, h, qtok[ok], ktok[ok]] = keep_g[:, h, ok]
        return out
    from maskdsl.kernels.triton_attn import keep_mask

    plan, _ = attn.backend_state("triton")
    seed = int(torch.randint(0, 2**31 - 1, (), generator=call_index_generator))
    _, drop_p = md.dsl.score.score_extras(attn.score, H, "cpu")
    return keep_mask(plan, B, drop_p, seed, "cpu")


@pytest.mark.parametrize("backend", ["dense", "tiles", "triton"])
def test_dropout_matches_the_reference_given_the_backends_keep_mask(backend):
    _skip_missing(backend)
    p, shape, H, B = md.neighborhood((3, 3)), (6, 7), 2, 2
    table = torch.randn(2, 3, 3, requires_grad=True)
    s = md.dropout(md.per_head([0.2, 0.5]), seed=3) + md.alibi() + md.relative_bias(table)
    attn = md.compile(p, shape, H, score=s, backend=backend)
    gen = torch.Generator().manual_seed(3)                    # the term's seed: call 1's draws
    keep = _keep_of(backend, attn, B, H, 42, gen)
    q, k, v = inputs(B, H, 42, 16, grad=True, kv_heads=1)     # GQA: both heads read kv head 0
    assert_matches_reference(attn, q, k, v, keep=keep)
    rate = keep.float().mean((0, 2, 3))                       # of all pairs; allowed pairs only:
    allowed = md.reference.mask(p, shape, H)[None].expand(B, H, 42, 42)
    kept = (keep & allowed).sum((0, 2, 3)).float() / allowed.sum((0, 2, 3))
    torch.testing.assert_close(kept, torch.tensor([0.8, 0.5]), atol=0.08, rtol=0)
    assert rate.numel() == H


@pytest.mark.parametrize("backend", ["dense", "tiles", "triton"])
def test_dropout_is_reproducible_advances_and_turns_off(backend):
    _skip_missing(backend)
    s = md.dropout(0.3, seed=5)
    q, k, v = inputs(1, 2, 64, 16)
    a, b = (md.compile(md.window(8), (64,), 2, score=s, backend=backend) for _ in range(2))
    first = a(q, k, v)
    torch.testing.assert_close(first, b(q, k, v))             # same seed, same draws
    assert not torch.allclose(a(q, k, v), first)              # the generator advances
    a.training = False
    torch.testing.assert_close(a(q, k, v), md.reference.attention(q, k, v, md.window(8), (64,)),
                               atol=2e-5, rtol=2e-5)
    # kept mass: with v = 1 every row is (kept probability) / (1 - p): 1 on average
    ones = torch.ones_like(v)
    mean = torch.stack([b(q, k, ones).mean() for _ in range(8)]).mean().item()
    assert mean == pytest.approx(1.0, abs=0.03)


def _choice(p, shape, heads, score, device):
    from maskdsl.kernels import backends
    c = backends.choose(backends.Spec(p, score, shape, heads), torch.device(device))
    return c.backend, c.reason


def test_dispatch_reasons_on_every_device():
    p = md.neighborhood((7, 7))
    assert _choice(md.window(4), (100,), 1, None, "cpu")[0] == "tiles"   # dense: only asked for
    backend, reason = _choice(md.causal(), (100,), 1, None, "cpu")
    assert backend == "sdpa" and "is_causal=True" in reason
    backend, reason = _choice(p, (64, 64), 2, None, "cpu")
    assert backend == "tiles" and reason.startswith("tiles: on cpu") and "not sdpa" in reason
    backend, reason = _choice(p, (64, 64), 2, None, "cuda")
    assert backend == "flex" and reason.startswith("flex: on CUDA")
    assert "not triton: flex runs this pattern" in reason     # the refusals ahead are named
    doc = md.document(torch.arange(1000) // 100)
    backend, reason = _choice(doc, (1000,), 1, md.sink_logit(0.5), "cuda")
    assert backend == "tiles" and "cannot express sink_logit" in reason
    assert "cannot express document" in reason
    assert _choice(p, (64, 64), 2, md.dropout(0.1), "cpu")[0] == "tiles"
    if _triton_ok():                         # Triton's place on CUDA
        from maskdsl.kernels.triton_attn import TRITON_MIN_TOKENS as BIG
        assert _choice(p, (64, 64), 2, md.dropout(0.1), "cuda")[0] == "triton"
        backend, reason = _choice(p, (64, 64), 2, md.sink_logit(0.5), "cuda")
        assert backend == "triton" and "cannot express sink_logit" in reason
        backend, reason = _choice(md.causal() & md.window(2048), (BIG,), 2, None, "cuda")
        assert backend == "triton" and "in-kernel" in reason
        assert _choice(md.power(), (BIG,), 2, None, "cuda")[0] == "flex"
        assert _choice(md.power(), (4096,), 2, md.dropout(0.1), "cuda")[0] == "tiles"
    with pytest.raises(md.MaskDSLError, match=r"backend='flex': FlexAttention cannot express "
                                             r"dropout\(0.1\)"):
        md.compile(md.window(4), (100,), score=md.dropout(0.1), backend="flex")
    with pytest.raises(md.MaskDSLError, match=r"backend='dense': 40000 tokens is too many"):
        md.compile(md.window(8), (200, 200), backend="dense")


def test_auto_falls_back_per_call_and_says_so():
    attn = md.compile(md.neighborhood((7, 7)), (64, 64), device="cuda")
    assert attn.backend == "flex"
    q = torch.randn(1, 1, 4096, 8, requires_grad=True)
    attn(q, q, q).sum().backward()          # called on CPU with a backward: re-decided
    assert attn.backend == "tiles" and q.grad is not None
    e = md.compile(md.neighborhood((7, 7)), (64, 64), backend="flex")
    with pytest.raises(md.MaskDSLError, match=r"backend='flex': flex has no backward on CPU"):
        e(q, q, q)
    x = torch.randn(1, 1, 4096, 8, dtype=torch.float64)
    with pytest.raises(md.MaskDSLError, match=r"flex does not support torch.float64"):
        e(x, x, x)
