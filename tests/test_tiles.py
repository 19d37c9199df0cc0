"""The tiles backend against the reference: outputs, gradients (q, k, v and learnable score
parameters), sinks, dropout given the same keep mask, fully masked rows, gradcheck."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import maskdsl as md
from maskdsl.codegen.program import Program
from maskdsl.kernels import band, tiles
from maskdsl.kernels.tiles import plan_for, run_tiles
from oracle import assert_matches_reference, inputs
from strategies import cases, literal_scores, relative_table
from test_codegen import BLOCK, layouts_for


def _inputs(B, H, N, D, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def _no_dropout(s):
    if s is None:
        return None
    return sum([t for t in md.dsl.score.score_terms(s) if not isinstance(t, md.dsl.score.Dropout)], 0) or None


class _Whole:
    """Force the tiles backend's whole-grid SDPA call on (``True``: wherever its mask fits) or
    off (``False``: always gather), so small test grids run both paths."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = tiles.WHOLE_FRACTION
        tiles.WHOLE_FRACTION = 0.0 if self.on else float("inf")

    def __exit__(self, *exc):
        tiles.WHOLE_FRACTION = self.saved


class _Band:
    """Force the band path on (wherever it applies) or off."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = band.BAND_COPY, tiles.BAND_OVER_WHOLE
        band.BAND_COPY = tiles.BAND_OVER_WHOLE = float("inf") if self.on else -1e9

    def __exit__(self, *exc):
        band.BAND_COPY, tiles.BAND_OVER_WHOLE = self.saved


@given(cases(max_tokens=100), st.data())
def test_tiles_forward_and_gradients_match_reference(case, data):
    path = data.draw(st.sampled_from(["gathered", "whole", "band"]), label="path")
    with _Whole(path == "whole"), _Band(path == "band"):
        _forward_and_gradients_match_reference(case, data)


@pytest.mark.parametrize("p, n, kv_heads", [
    (md.causal() & md.window(100), 700, None),                  # several query blocks
    (md.causal() & md.window(100), 700, 1),                     # GQA
    (md.causal() & md.window(8) & ~md.sink(4), 300, None),      # rows with no key
    (md.neighborhood(33) | md.sink(2), 600, 2),
    (md.window(1), 520, None),
])
@pytest.mark.parametrize("shape_2d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lse", [False, True])
def test_band_path_matches_the_reference_and_the_gathered_path(p, n, kv_heads, dtype, lse,
                                                               shape_2d):
    """Query blocks against views of their contiguous key spans (no gather): outputs, lse and
    gradients against the reference, outputs equal to the gathered path's; 1-D, and the same
    sizes as 2-D grids of whole rows (a 2-D neighborhood there)."""
    H = 4
    shape = (n,)
    if shape_2d:
        shape, p = (n // 20, 20), md.neighborhood((5, 3)) & md.causal(dims=(0,))
    attn = md.compile(p, shape, H, backend="tiles")
    plan = plan_for(attn.tiles_program, "cpu")
    assert plan.band(attn.tiles_program) is not None
    q, k, v = inputs(2, H, n, 8, dtype=dtype, grad=True, kv_heads=kv_heads)
    with _Band(True):
        got = assert_matches_reference(attn, q, k, v, lse=lse)
        with torch.no_grad():                                    # the no-grad buffer path
            torch.testing.assert_close(attn(q, k, v, return_lse=lse), got, equal_nan=True)
    with _Band(False), _Whole(False):
        gathered = attn(q, k, v, return_lse=lse)
    for a, b in zip(*(x if lse else (x,) for x in (got, gathered))):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_band_path_applies_only_to_contiguous_spans_with_one_mask_for_every_head():
    one_d = md.compile(md.causal() & md.window(64), (1024,), 2, backend="tiles")
    assert plan_for(one_d.tiles_program, "cpu").band(one_d.tiles_program) is not None
    per_head = md.compile(md.heads([md.window(8), md.window(16)]), (1024,), 2, backend="tiles")
    assert plan_for(per_head.tiles_program, "cpu").band(per_head.tiles_program) is None
    grid = md.compile(md.neighborhood((13, 13)), (64, 64), 2, backend="tiles")  # 8x8 tiles
    assert not grid.tiles_program.layout.row_major_order
    assert plan_for(grid.tiles_program, "cpu").band(grid.tiles_program) is None
    rows = md.compile(md.neighborhood((7, 7)), (64, 64), 2, backend="tiles")   # runs of rows
    assert rows.tiles_program.layout.row_major_order
    assert plan_for(rows.tiles_program, "cpu").band(rows.tiles_program) is not None


def _forward_and_gradients_match_reference(case, data):
    shape, H, p = case
    tile = data.draw(st.sampled_from(layouts_for(shape)))
    s = _no_dropout(data.draw(st.none() | literal_scores(shape, H)))
    prog = Program(p, s, shape, H, block=BLOCK, tile=tile)
    n = math.prod(shape)
    q, k, v = _inputs(2, H, n, 8, dtype=torch.float64, grad=True)
    sink = None
    sl = next((t for t in md.dsl.score.score_terms(s) if isinstance(t, md.dsl.score.SinkLogit)), None)
    if sl is not None:
        vals = sl.values.values if isinstance(sl.values, md.dsl.values.PerHead) else [sl.values] * H
        sink = torch.tensor(vals, dtype=torch.float64)
    out = run_tiles(prog, q, k, v, 0.3, sink=sink)
    ref = md.reference.attention(q, k, v, p, shape, score=s, scale=0.3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p, shape, H, kv_heads", [
    (md.causal() & md.window(16), (96,), 2, 1),                      # GQA
    (md.heads([md.empty(), md.causal() & md.window(2) & ~md.sink(4)]), (40,), 2, None),
    (md.neighborhood((3, 5), dilation=(1, 2)) & md.causal(dims=(0,)), (7, 11), 4, 2),
    (md.block(4, shift=2) | md.sink(3), (6, 8), 2, None),
    (md.document(torch.tensor([0] * 30 + [1] * 34)) & md.causal(), (64,), 2, None),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lse", [False, True])
def test_whole_grid_call_matches_the_reference_and_the_gathered_path(p, shape, H, kv_heads,
                                                                     dtype, lse):
    """The whole-grid SDPA call (a materialised mask scattered from the plan's token masks):
    per-head masks, rows with no key (zeros, lse -inf, finite gradients), GQA, N-D layouts,
    lse, both dtypes; outputs equal the gathered path's."""
    attn = md.compile(p, shape, H, backend="tiles")
    n = math.prod(shape)
    q, k, v = inputs(2, H, n, 8, dtype=dtype, grad=True, kv_heads=kv_heads)
    with _Whole(True), _Band(False):
        assert plan_for(attn.tiles_program, "cpu").whole
        whole = assert_matches_reference(attn, q, k, v, lse=lse)
    with _Whole(False), _Band(False):
        assert not plan_for(attn.tiles_program, "cpu").whole
        gathered = attn(q, k, v, return_lse=lse)
    for a, b in zip(*(x if lse else (x,) for x in (whole, gathered))):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_whole_grid_call_is_taken_only_where_gathering_would_cover_half_the_pairs():
    dense_ish = md.compile(md.causal() & md.window(128), (256,), 2, backend="tiles")
    sparse = md.compile(md.causal() & md.window(64), (4096,), 2, backend="tiles")
    assert plan_for(dense_ish.tiles_program, "cpu").whole
    assert not plan_for(sparse.tiles_program, "cpu").whole
    big = md.compile(md.causal() & md.window(8192), (16384,), 1, backend="tiles")
    assert not plan_for(big.tiles_program, "cpu").whole        # its mask would not fit


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


def test_peak_memory_is_keys_per_query_not_n_squared():
    prog = Program(md.neighborhood((3, 7, 7)), None, (16, 32, 32), 1)
    plan = plan_for(prog, torch.device("cpu"))
    n = prog.n
    keys_per_query = plan.K
    assert plan.allowed.numel() == plan.T * plan.V * keys_per_query
    assert keys_per_query * 8 < n          # far below N keys per query


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
