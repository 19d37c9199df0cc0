"""Flex interop (ARCHITECTURE.md, "Flex interop"): the public artefacts are in the user's row-major
token order, so a Flex user passing them to ``flex_attention`` with ordinary q, k, v gets the
reference's answer; the tiled form comes with its permutation."""
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import maskdsl as md
from maskdsl import reference

# grids where the flex backend's tiling permutes the tokens (64x64: 8x8 tiles; 3-D: N-D tiles),
# dilated and non-square ones that pad, and a 1-D window with sinks
CASES = [
    ("2-D 64x64 13x13", md.neighborhood((13, 13)), (64, 64), None),
    ("2-D 20x37 dilated", md.neighborhood((5, 7), dilation=(2, 3)), (20, 37), md.alibi()),
    ("2-D 48x40 dilated, causal rows", md.neighborhood((7, 5), dilation=(2, 1)) & md.causal(dims=(0,)),
     (48, 40), None),
    ("3-D 6x16x16 causal in time", md.neighborhood((3, 5, 5)) & md.causal(dims=(0,)), (6, 16, 16),
     md.distance_decay(0.1)),
    ("1-D window + sinks", md.causal() & md.window(100) | md.sink(4), (1000,), md.softcap(20.0)),
]


def _eager_flex(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # "called without torch.compile"
        return flex_attention(*args, **kw)


def _qkv(n, heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("name,p,shape,score", CASES, ids=[c[0] for c in CASES])
def test_row_major_artefacts_give_the_reference_answer(name, p, shape, score):
    attn = md.compile(p, shape, heads=2, score=score)
    q, k, v = _qkv(attn.n)
    ref = reference.attention(q.double(), k.double(), v.double(), p, shape, score=score)
    bm = attn.block_mask()
    assert bm.seq_lengths == (attn.n, attn.n)
    out = _eager_flex(q, k, v, score_mod=attn.score_mod, block_mask=bm)
    assert (out.double() - ref).abs().max() < 1e-5
    # the mask_mod alone, on every (query, key) pair of the user's flat indices
    idx = torch.arange(attn.n)
    want = reference.mask(p, shape, 2)
    for h in range(2):
        got = attn.mask_mod(torch.tensor(0), torch.tensor(h), idx[:, None], idx[None, :])
        assert torch.equal(got, want[h])
    # the source says which order it decodes
    assert "layout: row-major" in attn.source


@pytest.mark.parametrize("name,p,shape,score", CASES, ids=[c[0] for c in CASES])
def test_tiled_flex_inputs_with_their_permutation(name, p, shape, score):
    attn = md.compile(p, shape, heads=2, score=score)
    q, k, v = _qkv(attn.n, seed=1)
    ref = reference.attention(q.double(), k.double(), v.double(), p, shape, score=score)
    fi = attn.flex_inputs(layout="tiled")
    assert fi.layout == "tiled" and fi.n == attn.n
    assert fi.block_mask.seq_lengths == (fi.n_padded, fi.n_padded)
    out = _eager_flex(fi.to_layout(q), fi.to_layout(k), fi.to_layout(v), score_mod=fi.score_mod,
                      block_mask=fi.block_mask)
    assert (fi.from_layout(out).double() - ref).abs().max() < 1e-5
    # gather and scatter are inverse on the real tokens
    assert torch.equal(fi.gather[fi.scatter], torch.arange(attn.n))


def test_the_tiled_form_really_permutes_where_the_backend_tiles():
    """The case the issue reported (max error 1.18 before): 64x64 13x13, where the flex backend
    runs 8x8 tiles. Its tiled mask_mod with row-major q, k, v is wrong, which is why the
    public one is row-major."""
    p, shape = md.neighborhood((13, 13)), (64, 64)
    attn = md.compile(p, shape, backend="flex")
    fi = attn.flex_inputs("tiled")
    assert fi.gather is not None and not torch.equal(fi.gather, torch.arange(attn.n))
    q, k, v = _qkv(attn.n, heads=1)
    ref = reference.attention(q, k, v, p, shape)
    wrong = _eager_flex(q, k, v, block_mask=fi.block_mask)
    assert (wrong - ref).abs().max() > 0.1
    right = _eager_flex(q, k, v, block_mask=attn.block_mask())
    assert (right - ref).abs().max() < 1e-5


def test_row_major_flex_inputs_and_fewer_blocks_tiled():
    p, shape = md.neighborhood((13, 13)), (64, 64)
    attn = md.compile(p, shape)
    rm, tiled = attn.flex_inputs(), attn.flex_inputs("tiled")
    assert rm.layout == "row-major" and rm.gather is None and rm.scatter is None
    q = torch.randn(1, 1, attn.n, 8)
    assert rm.to_layout(q) is q and rm.from_layout(q) is q
    # the point of the tiled form: fewer non-empty blocks
    assert tiled.block_mask.kv_num_blocks.sum() < rm.block_mask.kv_num_blocks.sum()


def test_flex_inputs_bad_input():
    attn = md.compile(md.window(3), (300,))
    with pytest.raises(md.MaskDSLError, match="layout='blocked'.*'row-major', 'tiled'"):
        attn.flex_inputs("blocked")
    fi = attn.flex_inputs("tiled")
    with pytest.raises(md.MaskDSLError, match=r"to_layout: expected a \[B, H, 300, D\]"):
        fi.to_layout(torch.randn(1, 1, 299, 4))
    with pytest.raises(md.MaskDSLError, match="from_layout"):
        fi.from_layout(torch.randn(300, 4))
    with pytest.raises(md.MaskDSLError, match="device"):
        attn.flex_inputs(device="tpu")


def test_row_major_artefacts_follow_in_place_document_changes():
    ids = torch.tensor([0] * 100 + [1] * 156)
    attn = md.compile(md.document(ids), (256,))
    idx = torch.arange(256)
    before = attn.mask_mod(0, 0, idx[:, None], idx[None, :])
    assert torch.equal(before, reference.mask(md.document(ids.clone()), (256,))[0])
    ids[:200] = 0
    after = attn.mask_mod(0, 0, idx[:, None], idx[None, :])
    assert torch.equal(after, reference.mask(md.document(ids.clone()), (256,))[0])
    q, k, v = _qkv(256, heads=1)
    out = _eager_flex(q, k, v, block_mask=attn.block_mask())
    assert (out - reference.attention(q, k, v, md.document(ids.clone()), (256,))).abs().max() < 1e-5


def test_row_major_block_mask_is_cheap_on_a_large_3d_grid():
    """3-D 32x128x128 (524,288 tokens): the row-major BlockMask comes from the per-dimension
    classes of the tiling equal to row-major order (1x1x128), not from T x T pairs."""
    attn = md.compile(md.neighborhood((3, 13, 13)), (32, 128, 128))
    prog = attn.row_major_program()
    assert prog.layout.tile == (1, 1, 128) and prog.layout.row_major_order
    bm = attn.block_mask()
    assert bm.seq_lengths == (attn.n, attn.n)
    # every query block (one row of 128 tokens) sees 3 frames x 13 rows of key blocks
    assert int(bm.kv_num_blocks.max() + bm.full_kv_num_blocks.max()) <= 3 * 13
