"""The compiler against the reference: generated mask_mod/score_mod, the analytic BlockMask
(exact empty/partial/full classes), token layouts, and the flex backend's output."""
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

import maskdsl as md
from maskdsl.codegen.blockmask import EMPTY, FULL, PARTIAL
from maskdsl.codegen.program import Program
from maskdsl.codegen.tiling import Layout, candidate_tiles
from strategies import cases, literal_scores

BLOCK = 16   # small blocks: many tiles on small grids


def layouts_for(shape):
    """Row-major plus every candidate N-D tiling (with and without residue grouping)."""
    out = [None]
    if len(shape) > 1:
        out += candidate_tiles(shape, BLOCK)
    return out


def reference_classes(p, shape, heads, layout):
    """Block reduction of the reference mask in a layout: the oracle for the analytic classes."""
    m = md.reference.mask(p, shape, heads)
    tok = torch.from_numpy(layout.tokens())
    T, V = layout.n_tiles, layout.block
    valid = tok >= 0
    idx = tok.clamp(min=0)
    mp = m[:, idx][:, :, idx] & valid[None, :, None] & valid[None, None, :]
    cnt = mp.reshape(heads, T, V, T, V).sum((2, 4))
    return torch.where(cnt == 0, EMPTY, torch.where(cnt == V * V, FULL, PARTIAL)).numpy()


def mask_in_user_order(program, device="cpu"):
    """Evaluate the generated mask_mod on every (q, kv) position pair and map back to user order."""
    mask_mod, _ = program.mods(device)
    lay = program.layout
    P = lay.n_padded
    pos = torch.arange(P)
    H = program.heads
    m = torch.stack([mask_mod(0, torch.tensor(h), pos[:, None], pos[None, :]).expand(P, P)
                     for h in range(H)])
    inv = lay.scatter_index()
    return m[:, inv][:, :, inv], m, torch.from_numpy(lay.tokens())


@st.composite
def program_cases(draw, max_tokens=100):
    shape, heads, p = draw(cases(max_tokens=max_tokens))
    tile = draw(st.sampled_from(layouts_for(shape)))
    return shape, heads, p, tile


@given(program_cases())
def test_generated_mask_mod_equals_reference(case):
    shape, heads, p, tile = case
    prog = Program(p, None, shape, heads, block=BLOCK, tile=tile)
    user, raw, tok = mask_in_user_order(prog)
    assert torch.equal(user, md.reference.mask(p, shape, heads)), prog.mask_source
    assert not raw[:, tok < 0].any() and not raw[:, :, tok < 0].any()   # padding never attends


@given(program_cases(max_tokens=120))
def test_analytic_classes_equal_block_reduction_of_reference(case):
    shape, heads, p, tile = case
    prog = Program(p, None, shape, heads, block=BLOCK, tile=tile)
    expected = reference_classes(p, shape, heads, prog.layout)
    assert np.array_equal(prog.classes.dense(), expected), (repr(p), prog.layout)


@pytest.mark.parametrize("p,shape,tile", [
    (md.neighborhood((3, 5), dilation=(1, 2)) & md.causal(dims=(0,)), (10, 12), (4, 4)),
    (md.neighborhood((3, 3, 3), stride=(1, 2, 3), causal=(True, False, False)), (5, 6, 7), (2, 2, 4)),
    (md.neighborhood(5, dilation=3), (40,), None),
    (md.window(3) & ~md.sink(4) | md.power(2), (9, 7), (2, 8)),
    (md.document([0] * 10 + [1] * 20 + [2] * 15), (45,), None),
    (md.document(torch.tensor([0, 1] * 20)), (40,), None),           # interleaved: refined
    (md.radial(min_window=4), (6, 4, 4), (1, 2, 8)),
    (md.radial(min_window=2, sink_frames=1), (6, 4, 4), None),
    (md.heads([md.window(2), md.block(4)]) & md.neighborhood(md.per_head([3, 5])), (12, 8), (4, 4)),
    # row-major N-D layouts: each 16-token tile is a few boxes of the grid (FULL pairs included)
    (md.neighborhood((9, 9)), (12, 12), None),
    (md.neighborhood((3, 5, 5)) & md.causal(dims=(0,)), (3, 5, 5), None),     # FULL and PARTIAL
    (md.neighborhood((3, 7), dilation=(1, 2), stride=(1, 2)), (7, 20), None),
    (md.block((2, 16)) | md.window(3) & md.causal(), (6, 16), None),         # FULL and PARTIAL
])
def test_analytic_classes_on_hand_picked_cases(p, shape, tile):
    H = 2 if "heads" in repr(p) else 1
    prog = Program(p, None, shape, H, block=BLOCK, tile=tile)
    assert np.array_equal(prog.classes.dense(), reference_classes(p, shape, H, prog.layout))


def test_long_1d_uses_key_ranges_and_is_exact():
    # above the per-dim dense limit: classes from per-query key ranges
    from maskdsl.codegen import blockmask
    p = md.causal() & md.window(300) | md.neighborhood(9, dilation=7)
    old = blockmask.DENSE_DIM_LIMIT
    blockmask.DENSE_DIM_LIMIT = 64
    try:
        prog = Program(p, None, (1000,), 1, block=BLOCK)
    finally:
        blockmask.DENSE_DIM_LIMIT = old
    assert np.array_equal(prog.classes.dense(), reference_classes(p, (1000,), 1, prog.layout))


@given(st.data())
def test_layout_round_trip(data):
    shape = data.draw(st.sampled_from([(7,), (5, 6), (9, 4), (3, 5, 7), (4, 4, 4)]))
    tile = data.draw(st.sampled_from(layouts_for(shape)))
    groups = tuple(data.draw(st.integers(1, max(1, L // 2))) for L in shape) if tile else None
    lay = Layout(shape, tile, groups, block=BLOCK)
    tok = lay.tokens()
    assert sorted(tok[tok >= 0].tolist()) == list(range(math.prod(shape)))
    x = torch.randn(2, 3, math.prod(shape), 4)
    laid = torch.cat([x, x.new_zeros(2, 3, 1, 4)], 2).index_select(2, lay.gather_index())
    assert torch.equal(laid.index_select(2, lay.scatter_index()), x)
    assert (laid[:, :, torch.from_numpy(tok < 0)] == 0).all()


@given(cases(max_tokens=64), st.data())
def test_score_mod_equals_reference_bias(case, data):
    shape, heads, p = case
    s = data.draw(literal_scores(shape, heads))
    terms = [t for t in md.dsl.score.score_terms(s)
             if not isinstance(t, (md.dsl.score.SinkLogit, md.dsl.score.Dropout))]
    assume(terms)
    s = sum(terms)
    prog = Program(md.full(), s, shape, heads, block=BLOCK, tile=None)
    _, score_mod = prog.mods("cpu")
    n = math.prod(shape)
    pos = torch.arange(n)
    base = torch.randn(heads, n, n, dtype=torch.float32)
    got = torch.stack([score_mod(base[h], 0, torch.tensor(h), pos[:, None], pos[None, :])
                       for h in range(heads)])
    expected = base.double() + md.reference.bias(s, shape, heads, dtype=torch.float64)
    cap = next((t for t in terms if isinstance(t, md.dsl.score.Softcap)), None)
    if cap is not None:
        expected = cap.cap * torch.tanh(expected / cap.cap)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)


def test_relative_bias_score_mod_gets_gradients():
    table = torch.randn(2, 7, 9, requires_grad=True)
    prog = Program(md.full(), md.relative_bias(table), (4, 5), 2, block=BLOCK, tile=None)
    _, score_mod = prog.mods("cpu")
    pos = torch.arange(20)
    out = score_mod(torch.zeros(20, 20), 0, torch.tensor(1), pos[:, None], pos[None, :])
    out.sum().backward()
    assert table.grad[1].sum() == 400 and table.grad[0].abs().sum() == 0
    torch.testing.assert_close(out, md.reference.bias(md.relative_bias(table), (4, 5), 2)[1].detach())


def test_generated_source_is_pinned_and_named():
    prog = Program(md.window(2) & md.causal(), None, (64,), 1, block=BLOCK, tile=None)
    assert prog.mask_source == (
        'def mask_window_2__and__causal(b, h, q_idx, kv_idx):\n'
        '    """window(2) & causal() on 64, layout: row-major, 16-token blocks"""\n'
        '    q0 = q_idx\n'
        '    k0 = kv_idx\n'
        '    return (((q0 - 2) <= k0) & (k0 < (q0 + 1)))\n')
    mask_mod, _ = prog.mods("cpu")
    assert mask_mod.__name__ == "mask_window_2__and__causal"
    attn = md.compile(md.neighborhood((7, 7), dilation=(1, 2)) & md.causal(dims=(0,)), (16, 16))
    assert attn.mask_mod.__name__ == "mask_neighborhood_7x7_d1x2__and__causal_0"
    assert "def mask_neighborhood_7x7_d1x2__and__causal_0(b, h, q_idx, kv_idx):" in attn.source


def test_per_head_parameters_are_captured_tables_not_floats():
    prog = Program(md.window(md.per_head([1, 2, 3])), md.alibi(md.per_head([0.5, 0.25, 0.125])),
                   (32,), 3, block=BLOCK, tile=None)
    assert "[h]" in prog.mask_source and "[h]" in prog.score_source
    mask_mod, score_mod = prog.mods("cpu")
    for fn in (mask_mod, score_mod):
        cells = [c.cell_contents for c in fn.__closure__]
        assert cells and all(isinstance(c, torch.Tensor) for c in cells)   # no Python floats
    # another program of the same pattern (another layer, another score) runs the same code
    # object (torch.compile guards on it: nothing recompiles); its score_mod is rebuilt per call
    # from one code object too
    again, s2 = Program(md.window(md.per_head([1, 2, 3])), md.alibi(md.per_head([0.5, 0.25, 0.125])),
                        (32,), 3, block=BLOCK, tile=None).mods("cpu")
    assert again.__code__ is mask_mod.__code__ and s2.__code__ is score_mod.__code__
    other, _ = Program(md.window(md.per_head([2, 2, 4])), None, (32,), 3, block=BLOCK, tile=None).mods("cpu")
    assert other.__closure__[0].cell_contents.tolist() == [2, 2, 4]


def test_tiling_pays_on_a_2d_neighborhood():
    prog = Program(md.neighborhood((13, 13)), None, (128, 128), 1)
    st_ = prog.stats()
    assert st_["block_density"] <= 0.65 * st_["block_density_row_major"]
    assert st_["block_density"] * prog.layout.n_tiles ** 2 == min(st_["layouts_tried"].values())
    assert st_["layout"] == "8x16 tiles"


def test_stats_token_density_is_exact():
    for p, shape, H in [(md.neighborhood((5, 3)), (9, 8), 1),
                        (md.window(2) | md.sink(3), (30,), 1),
                        (md.heads([md.causal(), md.block(4)]), (20,), 2)]:
        prog = Program(p, None, shape, H, block=BLOCK)
        assert prog.stats()["token_density"] == pytest.approx(
            md.reference.mask(p, shape, H).float().mean().item())


# ----------------------------------------------------------------------------- flex

def _flex_inputs(shape, heads, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return [torch.randn(1, heads, n, D, generator=g) for _ in range(3)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@given(program_cases(max_tokens=80), st.data())
def test_eager_flex_matches_reference(case, data):
    from maskdsl.kernels.flex import run_flex

    shape, heads, p, tile = case
    s = data.draw(st.none() | literal_scores(shape, heads))
    if s is not None:
        s = sum([t for t in md.dsl.score.score_terms(s)
                 if not isinstance(t, (md.dsl.score.SinkLogit, md.dsl.score.Dropout))], 0) or None
    prog = Program(p, s, shape, heads, block=BLOCK, tile=tile)
    q, k, v = _flex_inputs(shape, heads)
    out = run_flex(prog, q, k, v, scale=0.25, compiled=False)
    ref = md.reference.attention(q.double(), k.double(), v.double(), p, shape, score=s, scale=0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


COMPILED_CASES = [
    # one shared set of compiled programs (each distinct compile costs seconds on CPU)
    (md.neighborhood((7, 7), dilation=(1, 2)) & md.causal(dims=(0,)), (20, 24), 2,
     md.distance_decay(md.per_head([0.1, 0.2])) + md.softcap(30.0)),
    (md.causal() & md.window(100) | md.sink(4), (700,), 2, md.alibi()),
    (md.neighborhood((3, 5, 5), stride=(1, 2, 2)) & ~md.block((1, 4, 4)), (6, 10, 12), 1, None),
]


@pytest.fixture(scope="module")
def compiled_attns():
    return [md.compile(p, shape, H, score=s, backend="flex") for p, shape, H, s in COMPILED_CASES]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("i", range(len(COMPILED_CASES)))
def test_compiled_flex_matches_reference(compiled_attns, i):
    p, shape, H, s = COMPILED_CASES[i]
    attn = compiled_attns[i]
    q, k, v = _flex_inputs(shape, H, D=32, seed=i)
    out = attn(q, k, v)
    ref = md.reference.attention(q.double(), k.double(), v.double(), p, shape, score=s)
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=5e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_same_pattern_reuses_one_compile(compiled_attns):
    from torch._dynamo.utils import counters

    p, shape, H, s = COMPILED_CASES[0]
    q, k, v = _flex_inputs(shape, H, D=32)
    compiled_attns[0](q, k, v)                      # warm
    before = counters["stats"]["unique_graphs"]
    again = md.compile(p, shape, H, score=s, backend="flex")   # a second "layer"
    assert again.program.recipe is compiled_attns[0].program.recipe
    for _ in range(3):
        again(q, k, v)
        compiled_attns[0](q, k, v)
    assert counters["stats"]["unique_graphs"] == before


# ----------------------------------------------------------------------------- units
# Fast, exact checks of the classifier's pieces (the mutation-testing subset leans on these):
# the unrefined classes are sound (a FULL/EMPTY claim is never wrong) and as tight as pinned.

from maskdsl.codegen import blockmask as _bm  # noqa: E402
from maskdsl.codegen import ir as _ir  # noqa: E402
from maskdsl.codegen.tileclasses import TileClasses, combine, kron  # noqa: E402


def _unrefined(p, shape, block=8, tile=None):
    lay = Layout(shape, tile, block=block) if tile else Layout(shape, block=block)
    ir, tables = _ir.lower_pattern(p, shape, 1, head=0)
    return _bm.classify(ir, tables, lay, refine=False).dense(), lay


@pytest.mark.parametrize("p,shape,tile,undecided", [
    (md.document([0] * 12 + [1] * 20 + [2] * 8), (40,), None, 7),      # pairs with the mixed tile
    (md.document([0] * 12 + [1] * 20 + [2] * 13), (45,), None, 7),     # a padded last tile
    (md.power(1), (40,), None, 0),                                      # contiguous blocks: exact
    (md.power(4), (48,), None, 0),
    (md.sink(5), (40,), None, 0),                                       # sinks are always exact
    (md.radial(min_window=4), (6, 4, 4), (1, 2, 4), None),
    (md.radial(min_window=2, sink_frames=1), (6, 4, 4), None, None),
    (md.sink(3) | md.window(2), (40,), None, None),
    (~md.sink(4), (40,), None, 0),
])
def test_unrefined_classes_are_sound_and_tight(p, shape, tile, undecided):
    got, lay = _unrefined(p, shape, tile=tile)
    expected = reference_classes(p, shape, 1, lay)[0]
    decided = got != 3
    assert np.array_equal(got[decided], expected[decided])     # sound
    if undecided is not None:
        assert int((got == 3).sum()) == undecided              # tight
    assert (got == 3).sum() < got.size                          # the classifier decides things


def test_count_pow2_or_zero_against_brute_force():
    lo = np.arange(-20, 41)[:, None]
    hi = lo + np.arange(0, 40)[None, :]
    got = _bm._count_pow2_or_zero(np.broadcast_to(lo, hi.shape), hi)
    def brute(a, b):
        return sum(1 for d in range(a, b + 1) if d == 0 or (d > 0 and d & (d - 1) == 0))
    exp = np.vectorize(brute)(np.broadcast_to(lo, hi.shape), hi)
    assert np.array_equal(got, exp)
    # near and beyond 2**53, where float64's log2 is one off (2**60 - 1 rounds to 2**60)
    def brute_big(a, b):
        return int(a <= 0 <= b) + sum(1 for e in range(63) if a <= 1 << e <= b)
    edges = [0, 1, 2, 3, 2**31 - 1, 2**53 - 1, 2**53, 2**53 + 1, 2**59 + 1, 2**60 - 1, 2**60,
             2**60 + 1, 2**62 - 1, 2**62, 2**63 - 1]
    pairs = [(a, b) for a in edges for b in edges if a <= b]
    a = np.array([x for x, _ in pairs], np.int64)
    b = np.array([y for _, y in pairs], np.int64)
    assert _bm._count_pow2_or_zero(a, b).tolist() == [brute_big(x, y) for x, y in pairs]


def test_is_pow2_evaluates_integers_only():
    import sympy as sp
    for v in range(-3, 70):
        want = v > 0 and v & (v - 1) == 0
        assert _ir.IsPow2(sp.Integer(v)) == (sp.true if want else sp.false), v
    assert isinstance(_ir.IsPow2(_ir.QF), _ir.IsPow2)


def test_ir_simplify_folds_and_merges():
    s = _ir.Sep((_ir.DimRange(),))
    t = _ir.Sep((_ir.DimRange(_ir.Q[0] - 2, _ir.Q[0] + 3),))
    f = _ir.SinkFlat(_ir.KF < 3, n=3)
    assert _ir.simplify(_ir.NotN(_ir.Const(True))) == _ir.Const(False)
    assert _ir.simplify(_ir.NotN(_ir.NotN(f))) == f
    assert _ir.simplify(_ir.AndN((f, _ir.Const(False)))) == _ir.Const(False)
    assert _ir.simplify(_ir.AndN((f, _ir.Const(True)))) == f
    assert _ir.simplify(_ir.OrN((f, _ir.Const(True)))) == _ir.Const(True)
    assert _ir.simplify(_ir.OrN((f, _ir.Const(False)))) == f
    assert _ir.simplify(_ir.AndN((_ir.Const(True),))) == _ir.Const(True)
    assert _ir.simplify(_ir.OrN((_ir.Const(False),))) == _ir.Const(False)
    merged = _ir.simplify(_ir.AndN((s, t, f)), (10,))
    assert isinstance(merged, _ir.AndN) and merged.children[1] == f
    assert merged.children[0].dims[0].lo is not None and merged.children[0].dims[0].hi is not None
    nested = _ir.simplify(_ir.OrN((_ir.OrN((f, t)), s)))
    assert isinstance(nested, _ir.OrN) and len(nested.children) == 3


def test_dim_range_and_merges_steps_by_lcm():
    import sympy as sp
    a = _ir.DimRange(None, _ir.Q[0] + 1, (sp.Integer(2),))
    b = _ir.DimRange(_ir.Q[0] - 4, None, (sp.Integer(3), sp.Integer(1)))
    c = a & b
    assert c.steps == (sp.Integer(6),) and c.lo == _ir.Q[0] - 4 and c.hi == _ir.Q[0] + 1
    assert (a & _ir.DimRange()).steps == (sp.Integer(2),)
    assert (_ir.DimRange(None, None, (sp.Integer(1),)) & _ir.DimRange()).steps == ()
    assert (_ir.DimRange() & _ir.DimRange()).steps == ()
    tagged = _ir.DimRange(atoms=("a",)) & _ir.DimRange(atoms=("b", "c"))
    assert tagged.atoms == ("a", "b", "c")


@pytest.mark.parametrize("p,L", [(md.neighborhood(5, stride=2, dilation=3), 40),
                                 (md.neighborhood(4, causal=True, dilation=2), 30),
                                 (md.window(3, right=1), 20), (md.block(6, shift=2), 25),
                                 (md.causal() & md.window(4), 33)])
def test_key_range_equals_the_dim_matrix(p, L):
    ir, _ = _ir.lower_pattern(p, (L,), 1, head=0)
    dr = ir.dims[0]
    x = np.arange(L)
    lo, hi = _bm.key_range(dr, x, L)
    m = _bm.dim_matrix(dr, x)
    steps = [int(s) for s in dr.steps]
    step = math.lcm(*steps) if steps else 1
    for q in range(L):
        keys = set(np.nonzero(m[q])[0].tolist())
        assert keys == {k for k in range(lo[q], hi[q]) if (k - q) % step == 0}, q
    assert torch.equal(torch.from_numpy(m), md.reference.mask(p, (L,))[0])


def test_sparse_kron_and_combine_match_dense():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 3, (rng.integers(1, 5), rng.integers(1, 5))).astype(np.int8)
        b = rng.integers(0, 3, (rng.integers(1, 5), rng.integers(1, 5))).astype(np.int8)
        got = kron([TileClasses.from_dense(a), TileClasses.from_dense(b)], None).dense()
        exp = np.minimum(a[:, None, :, None], b[None, :, None, :]).reshape(
            a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
        assert np.array_equal(got, exp)
        c = rng.integers(0, 4, a.shape).astype(np.int8)
        for kind in ("and", "or"):
            d = combine([TileClasses.from_dense(a), TileClasses.from_dense(c)], kind).dense()
            for i in range(a.shape[0]):
                for j in range(a.shape[1]):
                    x, y = int(a[i, j]), int(c[i, j])
                    if kind == "and":
                        want = 0 if 0 in (x, y) else (y if x == 2 else x if y == 2 else 3)
                    else:
                        want = 2 if 2 in (x, y) else (y if x == 0 else x if y == 0 else 3)
                    assert d[i, j] == want, (kind, x, y, d[i, j])
        assert np.array_equal(TileClasses.from_dense(a).transpose().dense(), a.T)


def test_pair_counts_count_real_token_pairs():
    lay = Layout((10,), block=4)                       # 3 tiles, the last with 2 real tokens
    ts = _bm._TileSets(lay)
    pred = lambda q, k: (k <= q)
    rows, cols = np.array([0, 2, 2, 1]), np.array([0, 2, 0, 2])
    allowed, size = _bm.pair_counts(rows, cols, ts.tokens, pred)
    assert size.tolist() == [16, 4, 8, 8]
    assert allowed.tolist() == [10, 3, 8, 0]
    assert ts.n_valid.tolist() == [4, 4, 2]
    tiled = _bm._TileSets(Layout((5, 6), (2, 4), block=8))
    assert tiled.n_valid.tolist() == (tiled.tokens >= 0).sum(1).tolist()


def test_tile_classes_operations_match_numpy():
    rng = np.random.default_rng(1)
    for _ in range(40):
        Tq, Tk = int(rng.integers(1, 7)), int(rng.integers(1, 7))
        a = rng.integers(0, 3, (Tq, Tk)).astype(np.int8)
        # unsorted pairs with EMPTY entries among them: dropped, then sorted row by row
        r, c = np.meshgrid(np.arange(Tq), np.arange(Tk), indexing="ij")
        order = rng.permutation(Tq * Tk)
        tc = TileClasses.from_pairs(Tq, Tk, r.ravel()[order], c.ravel()[order], a.ravel()[order])
        assert np.array_equal(tc.dense(), a) and tc.nnz == int((a != 0).sum())
        assert tc.same_as(TileClasses.from_dense(a))
        assert tc.same_as(TileClasses.empty(Tq, Tk)) == (not a.any())
        assert tc.counts().tolist() == (a != 0).sum(1).tolist()
        for which in (1, 2):
            assert tc.counts(which).tolist() == (a == which).sum(1).tolist()
            assert tc.count(which) == int((a == which).sum())
        assert np.array_equal(tc.transpose().dense(), a.T)
        keep = tc.cls == 2
        assert np.array_equal(tc.where(keep).dense(), np.where(a == 2, a, 0))
        t0 = int(rng.integers(0, Tq)); t1 = int(rng.integers(t0, Tq + 1))
        assert np.array_equal(tc.rows_dense(t0, t1), a[t0:t1])
        chunked = TileClasses.from_row_chunks(Tq, Tk, lambda i, j: a[i:j], chunk_pairs=1)
        assert chunked.same_as(tc)
        assert tc.nbytes() == tc.indptr.nbytes + tc.indices.nbytes + tc.cls.nbytes
    empty = TileClasses.from_row_chunks(3, 4, lambda i, j: np.zeros((j - i, 4), np.int8))
    assert empty.nnz == 0 and empty.same_as(TileClasses.empty(3, 4))
    assert combine([tc], "and") is tc                     # one operand: itself


def test_tile_classification_beyond_reach_is_refused():
    from maskdsl.codegen import tileclasses as _tc
    with pytest.raises(md.MaskDSLError, match=r"classifying this pattern's 200000 x 200000 tile pairs"):
        TileClasses.from_row_chunks(200_000, 200_000, lambda i, j: None)
    assert 200_000 ** 2 > _tc.MAX_ROW_CHUNK_PAIRS


def test_printer_rules_compute_what_sympy_computes():
    import sympy as sp
    from maskdsl.codegen.printer_torch import FloorDiv, PosMod, emit_function, exec_source
    a, b = sp.symbols("a b", integer=True, positive=True)
    exprs = [sp.Rational(3, 2) * a, sp.S.Half * b, sp.floor(a / 3), sp.floor(a), FloorDiv(a, 1),
             FloorDiv(a + b, 4), PosMod(a, 3), sp.Mod(a - b, 5), sp.Min(a, b), sp.Max(a, 3),
             sp.Abs(a - b), sp.sqrt(a), sp.tanh(a - b), a ** 2, 1 / a, sp.Ge(a, b), sp.Gt(a, b),
             sp.Le(a, b), sp.Lt(a, b), sp.Eq(a, b), sp.Ne(a, b), sp.And(a < 4, b >= 2),
             sp.Or(a < 2, sp.Not(b < 5)), 3 * a - 2 * b + 7, (a + b) * (a - b) + (a + b),
             sp.true, sp.false]
    grid = torch.arange(1, 9)
    A, B = torch.meshgrid(grid, grid, indexing="ij")
    for e in exprs:
        fn = exec_source(emit_function("f", ["a", "b"], [], e, true_like="a"))
        got = fn(A, B)
        value = (lambda v: float(bool(v))) if isinstance(
            e, (sp.core.relational.Relational, sp.logic.boolalg.BooleanFunction,
                sp.logic.boolalg.BooleanAtom)) else float
        plain = e.replace(FloorDiv, lambda x, y: sp.floor(x / y)).replace(PosMod, sp.Mod)
        want = torch.tensor([[value(plain.subs({a: int(x), b: int(y)})) for y in grid] for x in grid],
                            dtype=torch.float64)
        assert torch.allclose(got.double(), want, rtol=1e-6), e


def test_printer_refuses_nodes_without_a_rule():
    import sympy as sp
    from maskdsl.codegen.printer_torch import TorchPrinter, UnsupportedNode, _balanced, identifier
    a = sp.Symbol("a", integer=True)
    for e in (sp.sin(a), sp.pi, sp.oo, a ** sp.Rational(1, 3), sp.Piecewise((a, a > 0), (0, True))):
        with pytest.raises(UnsupportedNode, match="no torch printing rule"):
            TorchPrinter().doprint(e)
    assert TorchPrinter().doprint(sp.floor(a / 3)) == "(a // 3)"   # printed directly, not via FloorDiv
    assert TorchPrinter().doprint(sp.floor(a)) == "a"
    assert not _balanced(")(") and _balanced("(a)(b)") and not _balanced("(a")
    assert [identifier(t) for t in ("3x", "class", "+++", "a b", "x" * 120)] == \
        ["f_3x", "f_class", "fn", "a_b", "x" * 96]


@pytest.mark.parametrize("make", [
    lambda r: md.distance_decay(r),
    lambda r: md.distance_decay(r, metric="manhattan"),
    lambda r: md.alibi(r),
])
@pytest.mark.parametrize("per_head,heads", [(False, 3), (True, 3), (True, 2)])
def test_tensor_parameters_are_read_per_call_with_gradients(make, per_head, heads):
    shape = (3, 4)
    rate = (torch.tensor([0.1, 0.3, 0.7][:heads]) if per_head else torch.tensor(0.4)).requires_grad_()
    s = make(rate)
    _, score_mod = Program(md.full(), s, shape, heads, block=BLOCK, tile=None).mods("cpu")
    pos = torch.arange(12)
    outs = [score_mod(torch.zeros(12, 12), 0, torch.tensor(h), pos[:, None], pos[None, :])
            for h in range(heads)]
    got = torch.stack(outs)
    torch.testing.assert_close(got, md.reference.bias(s, shape, heads).detach())
    got[heads - 1].sum().backward()               # only the last head's entry (or the scalar)
    grad = rate.grad.reshape(-1)
    assert grad[-1] < 0 and (not per_head or grad[:-1].abs().sum() == 0)
    with torch.no_grad():
        rate.mul_(2)                              # changed in place: the next call reads it
    again = score_mod(torch.zeros(12, 12), 0, torch.tensor(1), pos[:, None], pos[None, :])
    torch.testing.assert_close(again, 2 * got[1].detach())


def test_key_range_of_open_and_empty_dim_ranges():
    import sympy as sp
    q, L = _ir.Q[0], 12
    x = np.arange(L)
    for dr in (_ir.DimRange(None, q - 5), _ir.DimRange(q + 5, None), _ir.DimRange(None, None, (sp.Integer(3),)),
               _ir.DimRange(q - 40, q + 40), _ir.DimRange(q + 2, q - 2)):
        lo, hi = _bm.key_range(dr, x, L)
        assert lo.dtype == hi.dtype == np.int64
        assert ((0 <= lo) & (lo <= L) & (0 <= hi) & (hi <= L)).all(), dr   # clipped to the dim
        m = _bm.dim_matrix(dr, x)
        step = math.lcm(*[int(s) for s in dr.steps]) if dr.steps else 1
        for i in range(L):
            assert set(np.nonzero(m[i])[0].tolist()) == \
                {k for k in range(lo[i], hi[i]) if (k - i) % step == 0}, (dr, i)


@pytest.mark.parametrize("decay,min_window,shape", [
    (1.0, 2, (9, 3, 4)), (0.5, 3, (9, 3, 4)), (2.0, 5, (9, 4, 4)), (0.25, 1, (6, 2, 8)),
    (1.0, 16, (9, 4, 4)), (1.5, 6, (9, 4, 5))])
def test_radial_mask_mod_equals_reference_across_decays_and_windows(decay, min_window, shape):
    p = md.radial(decay=decay, min_window=min_window)
    got, _, _ = mask_in_user_order(Program(p, None, shape, 1, block=BLOCK, tile=None))
    assert torch.equal(got, md.reference.mask(p, shape, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_score_mod_computes_in_the_score_dtype(dtype):
    shape = (5, 7)
    s = md.distance_decay(0.3, metric="euclidean") + md.relative_bias(torch.randn(1, 9, 13, dtype=torch.float64))
    _, score_mod = Program(md.full(), s, shape, 1, block=BLOCK, tile=None).mods("cpu")
    pos = torch.arange(35)
    got = score_mod(torch.zeros(35, 35, dtype=dtype), 0, torch.tensor(0), pos[:, None], pos[None, :])
    assert got.dtype == dtype
    want = md.reference.bias(s, shape, 1, dtype=torch.float64)[0]
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), want.to(dtype).double(), atol=tol, rtol=tol)


def test_head_classes_count_each_class_over_heads():
    p = md.heads([md.window(3), md.block(16), md.window(3)])
    prog = Program(p, None, (64,), 3, block=BLOCK, tile=None)
    dense = prog.classes.dense()                       # [H, T, T]
    assert prog.classes.per_head == [0, 1, 0] and len(prog.classes.distinct) == 2   # shared
    for which in (PARTIAL, FULL):
        assert prog.classes.count(which) == int((dense == which).sum())
    assert prog.classes.nonempty() == int((dense != EMPTY).sum())
    st = prog.stats()
    assert st["full_blocks"] == pytest.approx((dense == FULL).sum() / dense.size)
    assert st["partial_blocks"] == pytest.approx((dense == PARTIAL).sum() / dense.size)


def test_ir_contains_finds_nodes_at_any_depth():
    def ir(p, shape=(16,), heads=2):
        return _ir.lower_pattern(p, shape, heads)[0]
    heads = md.heads([md.window(2), md.block(4)])
    assert _ir.contains(ir(heads), _ir.HeadsN)
    assert _ir.contains(ir(~(md.sink(2) | heads) & md.causal()), _ir.HeadsN)     # under & ~ |
    assert not _ir.contains(ir(md.window(2) & ~md.sink(3)), _ir.HeadsN)
    assert _ir.contains(ir(md.window(2) & ~md.sink(3)), _ir.NotN)
    assert not _ir.contains(ir(md.window(2)), _ir.NotN)


def test_layout_repr_names_tile_and_groups():
    assert repr(Layout((64,), block=16)) == "Layout(row-major, blocks of 16)"
    assert repr(Layout((8, 8), (4, 4), block=16)) == "Layout(tile=4x4)"
    assert repr(Layout((6, 40), (2, 8), (1, 2), block=16)) == "Layout(tile=2x8, groups=(1, 2))"


def test_ir_evaluate_agrees_with_sympy_on_every_node_it_knows():
    import sympy as sp
    q, k = _ir.Q[0], _ir.K[0]
    x = np.arange(0, 13)                  # Q and K are non-negative symbols
    y = np.arange(1, 14)[::-1].copy()
    exprs = [q + 2 * k - 3, q * k, sp.Rational(3, 2) * q, q / 4, (q + 1) / (k + 2), sp.floor(q / 3),
             sp.floor((q - 1) / k), sp.Mod(q, 4), sp.Mod(q - k, k), sp.Min(q, 2, k), sp.Max(q, -1, k - 5),
             sp.Abs(q - k), sp.Abs(q) + sp.Abs(k), q ** 2, (q - k) ** 3, sp.Integer(5),
             q + sp.Rational(1, 2)]
    for e in exprs:
        got = np.broadcast_to(_ir.evaluate(e, {q: x, k: y}), x.shape)
        want = np.array([float(e.subs({q: int(a), k: int(b)})) for a, b in zip(x, y)])
        assert np.allclose(got, want), e
    for bad in (sp.sqrt(q), q ** -2, sp.sin(q)):
        with pytest.raises(TypeError, match=r"cannot evaluate (Pow|sin): "):
            _ir.evaluate(bad, {q: x})


def test_candidate_tiles_are_every_power_of_two_box_that_fits():
    import itertools

    def next_pow2(n):
        p = 1
        while p < n:
            p *= 2
        return p

    rng = np.random.default_rng(3)
    for _ in range(60):
        r = int(rng.integers(1, 4))
        shape = tuple(int(x) for x in rng.integers(1, 40, r))
        block = int(rng.choice([8, 16, 64, 128]))
        pows = [1 << i for i in range(block.bit_length())]
        want = [t for t in itertools.product(pows, repeat=r)
                if math.prod(t) == block and all(s <= next_pow2(2 * L) for s, L in zip(t, shape))]
        assert candidate_tiles(shape, block) == (want if r > 1 else []), (shape, block)
    assert candidate_tiles((50, 50)) == candidate_tiles((50, 50), 128)


@pytest.mark.parametrize("p,shape", [
    (md.neighborhood(5, dilation=3), (40,)),
    (md.neighborhood((3, 5), dilation=(2, 3), stride=(1, 2)), (9, 16)),
    (md.neighborhood((2, 3, 3), dilation=(1, 2, 2), causal=(True, False, True)), (4, 6, 7)),
    (md.window(3) & md.block(4, shift=1), (30,)),
])
def test_mask_mod_equals_reference_with_steps(p, shape):
    for tile in (None, *candidate_tiles(shape, BLOCK)[:2]):
        got, _, _ = mask_in_user_order(Program(p, None, shape, 1, block=BLOCK, tile=tile))
        assert torch.equal(got, md.reference.mask(p, shape, 1)), tile


def test_layout_describe_and_padding_sentinel():
    assert Layout((64,), block=16).describe() == "row-major, 16-token blocks"
    assert Layout((6, 40), (2, 8), (1, 2), block=16).describe() == \
        "2x8 tiles, tokens grouped by residue mod 1x2"
    lay = Layout((5, 6), (2, 4), block=8)
    assert lay.describe() == "2x4 tiles, padded 30 -> 48 tokens"
    tok = lay.tokens()
    assert sorted(tok[tok >= 0].tolist()) == list(range(30))
    assert set(tok[tok < 0].tolist()) == {-1}                      # padding is exactly -1
    for d in range(2):
        order = lay.dim_order(d)
        assert set(order[order < 0].tolist()) <= {-1}
    grouped = Layout((6, 40), (2, 8), (1, 2), block=16).dim_order(1)
    assert grouped[:8].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]       # residue 0 first


def test_tables_give_each_parameter_a_fresh_name():
    t = _ir.Tables()
    names = [str(t.lookup("a", [1.0, 2.0])), str(t.lookup("a", [3.0, 4.0])),
             str(t.tensor("a", torch.zeros(2))), str(t.lookup("a", [5.0, 6.0]))]
    assert names == ["a[h]", "a_1[h]", "a_2", "a_3[h]"]


def test_smin_smax_fold_numbers_flatten_and_dedupe():
    import sympy as sp
    q, k = _ir.Q[0], _ir.K[0]
    assert _ir.smin(q, 3, 5) == sp.Min(q, 3) and _ir.smax(q, 3, 5) == sp.Max(q, 5)
    assert set(_ir.smin(_ir.smin(q, 2), k, q).args) == {q, k, 2}             # flattened, deduped
    assert set(_ir.smax(_ir.smax(q, 2), k, 7).args) == {q, k, 7}
    assert _ir.smin(q, q) == q and _ir.smax(4, 9) == 9 and _ir.smin(4, 9) == 4
    assert isinstance(_ir.smin(q, k), sp.Min) and isinstance(_ir.smax(q, k), sp.Max)


def test_flat_range_boxes_tile_the_range_exactly():
    rng = np.random.default_rng(4)
    for _ in range(200):
        shape = tuple(int(x) for x in rng.integers(1, 6, int(rng.integers(1, 4))))
        n = math.prod(shape)
        a, b = sorted(int(x) for x in rng.integers(0, n + 1, 2))
        covered = []
        for lo, hi in _bm._flat_range_boxes(a, b, shape):
            box = np.zeros(shape, bool)
            box[tuple(slice(l, h) for l, h in zip(lo, hi))] = True
            assert box.any(), (shape, a, b, lo, hi)                   # no empty boxes
            covered += np.nonzero(box.reshape(-1))[0].tolist()
        assert sorted(covered) == list(range(a, b)), (shape, a, b)     # exact and disjoint


@pytest.mark.parametrize("p,shape,tile", [
    (md.window(7), (203,), None),
    (md.window(40), (203,), None),                                   # FULL pairs too
    (md.causal() & md.window(40), (517,), None),
    (md.neighborhood(9, dilation=7), (203,), None),
    (md.neighborhood(5, stride=3), (150,), None),
    (md.neighborhood(7, causal=True, dilation=2), (161,), None),
    (md.block(24, shift=5), (203,), None),
    (md.window(0, right=40), (203,), None),
    (md.window(0, 0), (100,), None),
    (md.neighborhood((5, 7), dilation=(1, 3)), (20, 70), (4, 4)),
    (md.neighborhood((3, 9), causal=(False, True), stride=(1, 2)), (12, 75), (2, 8)),
])
def test_key_range_classes_beyond_the_dense_limit_are_exact(p, shape, tile, monkeypatch):
    # the classifier's O(N) path (per-query key ranges), forced on small dims
    from maskdsl import _caching
    monkeypatch.setattr(_bm, "DENSE_DIM_LIMIT", 8)
    _caching.clear_all()
    try:
        prog = Program(p, None, shape, 1, block=BLOCK, tile=tile)
        got = prog.classes.dense()
    finally:
        _caching.clear_all()
    assert np.array_equal(got, reference_classes(p, shape, 1, prog.layout))
