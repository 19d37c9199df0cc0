"""Token layouts: the generated decode (position -> grid coordinates, flat index, validity),
printed and exec'd exactly as in every mask_mod/score_mod, against ``Layout.tokens()`` for every
candidate layout: 1-D to 3-D, tile shapes, residue groups (dilation), padding, block sizes.

The 3-D decode bug (ARCHITECTURE.md, "Token layouts") lived here: a layout with tile size 1 on
dim 1, the last dim in one tile and a residue group >= 3 decoded ``(t % 14)`` as
``(t % 14)**2``. This test walks the candidates that case came from."""

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given, strategies as st

from maskdsl.codegen.printer_torch import emit_function
from maskdsl.codegen.printer_torch import exec_source
from maskdsl.codegen.tiling import Layout, candidate_tiles


def decoded(layout: Layout):
    """{name: int64 [n_padded]} for every line of the generated decode, evaluated on every
    position through the torch printer and exec (the path the mask_mods take)."""
    idx = sp.Symbol("q_idx", integer=True, nonnegative=True)
    pro = layout.decode(idx, "q")
    pos = torch.arange(layout.n_padded)
    out = {}
    for name, _ in pro:
        src = emit_function("decode_line", ["q_idx"], pro, sp.Symbol(name, integer=True),
                            true_like="q_idx")
        out[name] = torch.as_tensor(exec_source(src)(pos)).expand(layout.n_padded).numpy()
    return out


def check_decode(layout: Layout):
    tok = layout.tokens()
    got = decoded(layout)
    real = tok >= 0
    coords = np.unravel_index(np.maximum(tok, 0), layout.shape)
    for d in range(layout.rank):
        assert np.array_equal(got[f"q{d}"][real], coords[d][real]), (layout, d)
    assert np.array_equal(got["q_flat"][real], tok[real]), layout
    if "q_valid" in got:
        assert np.array_equal(got["q_valid"].astype(bool), real), layout
        assert got["q_flat"].min() >= 0 and got["q_flat"].max() <= layout.n - 1
    else:
        assert real.all(), f"{layout} pads but its decode has no q_valid"


def all_layouts(shape, groups, block):
    out = [Layout(shape, block=block)]
    for t in candidate_tiles(shape, block):
        out.append(Layout(shape, t, block=block))
        if any(g > 1 for g in groups):
            out.append(Layout(shape, t, groups, block=block))
    return out


@st.composite
def layout_cases(draw):
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, {1: 300, 2: 40, 3: 30}[rank])) for _ in range(rank))
    groups = tuple(draw(st.integers(1, max(1, min(8, L // 2)))) for L in shape)
    block = draw(st.sampled_from([8, 16, 32, 128]))
    return shape, groups, block


@given(layout_cases())
def test_every_candidate_layout_decodes_to_its_tokens(case):
    shape, groups, block = case
    for layout in all_layouts(shape, groups, block):
        check_decode(layout)


@pytest.mark.parametrize("shape,tile,groups", [
    ((8, 10, 24), (4, 1, 32), (2, 2, 1)),      # the repro: tile 1 on dim 1, dilation 2
    ((8, 13, 12), (8, 1, 16), (2, 2, 1)),
    ((30, 48, 18), (4, 1, 32), (8, 18, 2)),    # NATTEN's extended 3-D problem
    ((30, 48, 18), (2, 2, 32), (8, 18, 2)),
    ((5, 7), (1, 128), (1, 3)),
])
def test_decode_regressions(shape, tile, groups):
    check_decode(Layout(shape, tile, groups))


def test_decode_source_has_no_squares_or_trivial_terms():
    lay = Layout((8, 10, 24), (4, 1, 32), (2, 2, 1))
    idx = sp.Symbol("q_idx", integer=True, nonnegative=True)
    pro = lay.decode(idx, "q")
    src = emit_function("f", ["q_idx"], pro, sp.Symbol("q_flat"), true_like="q_idx")
    assert "**" not in src and "(0 * " not in src and "% 1)" not in src, src


@pytest.mark.parametrize("shape", [(6, 16, 16), (64, 64), (32, 128, 128), (8, 16), (20, 37), (16, 8, 4)])
def test_row_major_order_is_exactly_the_identity_permutation(shape):
    """``Layout.row_major_order`` (flex skips its permutation, and the public artefacts reuse
    the program, when it holds) is True exactly when positions are the flat token indices."""
    for t in [None] + list(candidate_tiles(shape, 128)):
        for groups in (None, (2,) * len(shape)):
            lay = Layout(shape, t, groups) if t is not None else Layout(shape)
            truth = lay.n_padded == lay.n and bool((lay.tokens() == np.arange(lay.n)).all())
            assert lay.row_major_order == truth, (shape, t, groups)
