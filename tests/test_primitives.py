"""Primitives against implementations written from scratch elsewhere's recipe, and the pieces
every primitive goes through: Swin's shifted windows (roll + window partition + region mask),
the simplifier, and the Triton kernel's in-kernel key range against the IR's key range."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import maskdsl as md
from maskdsl.codegen.simplify import simplify
from oracle import assert_matches_reference, inputs, triton_available


# ----------------------------------------------------------------------------- Swin

def swin_shifted_window_mask(H: int, W: int, M: int, s: int) -> torch.Tensor:
    """Swin Transformer's shifted-window attention, the way its code computes it (from the
    paper's description): roll the feature map by (-s, -s), partition it into M x M windows,
    and inside each window mask the pairs whose tokens came from different regions of the
    shifted map (regions: [0, L-M), [L-M, L-s), [L-s, L) per axis). Returns bool [N, N] in the
    *user's* (unrolled) row-major coordinates."""
    assert H % M == 0 and W % M == 0
    def regions(L):
        r = torch.zeros(L, dtype=torch.long)
        if s > 0:
            r[L - M:L - s] = 1
            r[L - s:] = 2
        return r
    region = regions(H)[:, None] * 3 + regions(W)[None, :]          # in rolled coordinates
    # rolled position (i, j) holds the user's token ((i + s) % H, (j + s) % W)
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    user = ((ii + s) % H) * W + (jj + s) % W
    window = (ii // M) * (W // M) + jj // M
    n = H * W
    win_of, reg_of = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    win_of[user.reshape(-1)] = window.reshape(-1)
    reg_of[user.reshape(-1)] = region.reshape(-1)
    return (win_of[:, None] == win_of[None, :]) & (reg_of[:, None] == reg_of[None, :])


@pytest.mark.parametrize("H,W,M,s", [(8, 8, 4, 2), (12, 8, 4, 2), (14, 21, 7, 3), (8, 8, 4, 0),
                                     (9, 6, 3, 1), (16, 16, 8, 4)])
def test_shifted_block_is_swins_shifted_windows(H, W, M, s):
    p = md.block(M, shift=s)
    assert torch.equal(md.reference.mask(p, (H, W))[0], swin_shifted_window_mask(H, W, M, s))


@pytest.mark.parametrize("backend", ["tiles", "dense", "flex", "triton"])
def test_shifted_blocks_on_every_backend(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    p = md.block(md.per_head([(4, 4), (4, 2)]), shift=md.per_head([(2, 2), (1, 0)])) \
        & md.causal(dims=(0,))
    shape = (8, 12)
    attn = md.compile(p, shape, 2, backend=backend,
                      score=None if backend == "flex" else md.distance_decay(0.2))
    q, k, v = inputs(1, 2, 96, 16, grad=backend != "flex")
    assert_matches_reference(attn, q, k, v, grads=backend != "flex")


def test_shift_is_checked():
    with pytest.raises(md.MaskDSLError, match=r"block: shift\[1\]=4 is not below size\[1\]=4"):
        md.block((4, 4), shift=(0, 4))
    with pytest.raises(md.MaskDSLError, match=r"block: shift=-1 is out of range"):
        md.block(4, shift=-1)
    assert md.parse("block(4, shift=2)") == md.block(4, shift=2)
    assert repr(md.block(4)) == "block(4)"


# ----------------------------------------------------------------------------- simplifier

@pytest.mark.parametrize("p,expected", [
    (md.window(2) & md.full(), md.window(2)),
    (md.full() & md.window(2), md.window(2)),
    (md.window(2) | md.empty(), md.window(2)),
    (md.window(2) & md.empty(), md.empty()),
    (md.sink(3) | md.full(), md.full()),
    (~md.full(), md.empty()),
    (~md.empty(), md.full()),
    (~~md.window(2), md.window(2)),
    (md.window(2) & md.window(2), md.window(2)),
    (md.window(2) | md.window(2), md.window(2)),
    (md.window(2) & ~md.window(2), md.empty()),
    (md.window(2) | ~md.window(2), md.full()),
    (md.window(0, 0) & ~md.full(), md.empty()),
    (md.heads([md.window(1), md.window(1)]), md.window(1)),
    (md.heads([md.window(1) & md.full(), md.sink(2)]), md.heads([md.window(1), md.sink(2)])),
])
def test_simplifier_rules(p, expected):
    assert simplify(p) == expected
    assert torch.equal(md.reference.mask(p, (12,), 2), md.reference.mask(expected, (12,), 2))


@given(st.data())
def test_simplifier_keeps_the_mask(data):
    from strategies import cases
    shape, heads, p = data.draw(cases(max_tokens=48))
    assert torch.equal(md.reference.mask(simplify(p), shape, heads), md.reference.mask(p, shape, heads))


@pytest.mark.parametrize("backend", ["dense", "tiles", "flex", "triton"])
def test_empty_after_simplifying_runs_everywhere(backend):
    """window(0, 0) & ~full() is the empty pattern: zeros and finite gradients (Triton has no
    ~; the simplifier removes it before lowering)."""
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    attn = md.compile(md.window(0, 0) & ~md.full(), (300,), backend=backend)
    q, k, v = inputs(1, 1, 300, 16, grad=backend != "flex")
    out = attn(q, k, v)
    assert (out == 0).all()
    if backend != "flex":
        out.square().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ----------------------------------------------------------------------------- Triton vs the IR

@st.composite
def range_cases(draw):
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(2, 24)) for _ in range(rank))
    parts = []
    if draw(st.booleans()):
        ks, ss, ds, cs = [], [], [], []
        for L in shape:
            d = draw(st.integers(1, max(1, L // 2)))
            k = draw(st.integers(2, max(2, L // d)))
            ks.append(k), ss.append(draw(st.integers(1, k))), ds.append(d), cs.append(draw(st.booleans()))
        parts.append(md.neighborhood(tuple(ks), stride=tuple(ss), dilation=tuple(ds), causal=tuple(cs)))
    if draw(st.booleans()):
        parts.append(md.window(tuple(draw(st.integers(0, L)) for L in shape),
                               right=tuple(draw(st.integers(0, L)) for L in shape)))
    if draw(st.booleans()):
        sizes = tuple(draw(st.integers(1, L)) for L in shape)
        parts.append(md.block(sizes, shift=tuple(draw(st.integers(0, b - 1)) for b in sizes)))
    if draw(st.booleans()):
        parts.append(md.causal(dims=(draw(st.integers(0, rank - 1)),)))
    p = parts[0] if parts else md.full()
    for x in parts[1:]:
        p = p & x
    return shape, p


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@given(range_cases())
def test_triton_key_range_equals_the_ir_key_range(case):
    """The kernel's in-kernel key range (one probe kernel calling _key_range) equals the IR's
    per-dim key range (blockmask.key_range, the one the tile classes are built from) for every
    coordinate: the kernel's table is read off the IR, and both read NATTEN's rule the same way."""
    from maskdsl.codegen.blockmask import key_range
    from maskdsl.codegen.ir import Sep, lower_pattern
    from maskdsl.kernels.triton_attn import TritonPlan
    from maskdsl.kernels.triton_tools import key_ranges

    shape, p = case
    plan = TritonPlan(p, None, shape, 1)
    ir, _ = lower_pattern(simplify(p), shape, 1, head=0)
    assert isinstance(ir, Sep)
    off = 3 - len(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for d, (dr, L) in enumerate(zip(ir.dims, shape)):
        x = np.arange(L)
        lo, hi = key_range(dr, x, L)
        steps = [int(s) for s in dr.steps]
        step = math.lcm(*steps) if steps else 1
        got = key_ranges(plan, 0, off + d, torch.arange(L, device=device)).cpu().numpy()
        dil = plan.params[0].dims[off + d].dilation
        for xi in range(L):
            ir_keys = {kk for kk in range(lo[xi], hi[xi]) if (kk - xi) % step == 0}
            g = xi % dil
            kernel_keys = {g + j * dil for j in range(got[xi, 0], got[xi, 1] + 1)}
            assert ir_keys == kernel_keys, (p, shape, d, xi, sorted(ir_keys), sorted(kernel_keys))
