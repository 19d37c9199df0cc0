"""Compact BlockMasks (ARCHITECTURE.md, "Flex interop"): index tables as wide as the longest row,
with the shape torch's kernels and methods read. Checked against block tables derived from the
reference mask, through compiled flex on CPU, and through every BlockMask method that reads the
tables (to_dense, _adjust, __getitem__, to)."""
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import maskdsl as md
from maskdsl import reference
from maskdsl.kernels.compact import CompactBlockMask
from maskdsl.kernels.flex import compiled_flex
from conftest import requires_cuda

B = 128

CASES = [
    # name, pattern, shape, heads: wide enough that the compact width is far below the key blocks
    ("1-D causal & window", md.causal() & md.window(200), (2000,), 1),
    ("1-D window + sinks", md.causal() & md.window(100) | md.sink(4), (1500,), 1),
    ("2-D per-head", md.neighborhood(md.per_head([(3, 3), (21, 21)])), (40, 48), 2),
]


def _truth(p, shape, heads):
    """[H, R, C] classes per 128-block from the reference mask: 0 empty, 1 partial, 2 full
    (full: every (query, key) pair of the block allowed, the last blocks partial in length)."""
    m = reference.mask(p, shape, heads)
    n = m.shape[-1]
    R = -(-n // B)
    pad = torch.zeros(heads, R * B, R * B, dtype=torch.int32)
    pad[:, :n, :n] = m.int()
    cnt = pad.reshape(heads, R, B, R, B).sum((2, 4))
    size = torch.tensor([min(B, n - i * B) for i in range(R)])
    whole = size[:, None] * size[None, :]
    return torch.where(cnt == 0, 0, torch.where(cnt == whole, 2, 1))


def _dense(num, idx, C):
    """[..., R, C] 0/1 from a table, reading only the first num entries of each row."""
    out = torch.zeros(*num.shape, C, dtype=torch.int32)
    W = int(num.max()) if num.numel() else 0
    for at in (torch.arange(W) < num[..., None]).nonzero().tolist():
        out[(*at[:-1], idx[tuple(at)])] = 1
    return out


def _check_tables(bm, truth):
    R, C = truth.shape[-2:]
    part, full = (truth == 1).int(), (truth == 2).int()
    assert torch.equal(_dense(bm.kv_num_blocks[0], bm.kv_indices[0], C), part)
    assert torch.equal(_dense(bm.full_kv_num_blocks[0], bm.full_kv_indices[0], C), full)
    assert torch.equal(_dense(bm.q_num_blocks[0], bm.q_indices[0], R), part.transpose(-1, -2))
    assert torch.equal(_dense(bm.full_q_num_blocks[0], bm.full_q_indices[0], R), full.transpose(-1, -2))


def _storage(t):
    return t.untyped_storage().nbytes()


@pytest.mark.parametrize("name,p,shape,heads", CASES, ids=[c[0] for c in CASES])
def test_compact_tables_equal_the_reference_blocks(name, p, shape, heads):
    attn = md.compile(p, shape, heads)
    bm = attn.block_mask()
    truth = _truth(p, shape, heads)
    R, C = truth.shape[-2:]
    assert isinstance(bm, BlockMask) and isinstance(bm, CompactBlockMask)
    assert bm.kv_indices.shape == (1, heads, R, C) and bm.q_indices.shape == (1, heads, C, R)
    _check_tables(bm, truth)
    # torch's own reading of the tables agrees (to_dense sizes itself by the shape)
    assert torch.equal(bm.to_dense()[0].bool(), truth > 0)
    # compact: the buffer holds the longest row's width, not C columns per row
    W = int(torch.maximum(bm.kv_num_blocks, bm.full_kv_num_blocks).max())
    assert _storage(bm.kv_indices) < 4 * (heads * R * W + C + 1) + 64 < 4 * heads * R * C


@pytest.mark.parametrize("name,p,shape,heads", CASES, ids=[c[0] for c in CASES])
def test_compact_block_mask_through_compiled_flex_on_cpu(name, p, shape, heads):
    attn = md.compile(p, shape, heads)
    n = attn.n
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 16, generator=g) for _ in range(3))
    want = reference.attention(q.double(), k.double(), v.double(), p, shape)
    with torch.no_grad():
        out = compiled_flex()(q, k, v, block_mask=attn.block_mask())
    assert (out.double() - want).abs().max() < 1e-4


def test_adjust_crops_entry_by_entry():
    """_adjust(q_len, kv_len) keeps the entries whose key block is below the new count (torch's
    own compares indices with counts, which is right only for its argsort-padded causal tables);
    a causal window cropped to its first tokens is the same pattern on fewer tokens."""
    p, n, short = md.causal() & md.window(200), 2000, 700
    bm = md.compile(p, (n,)).block_mask()
    adj = bm._adjust(short, short)
    assert isinstance(adj, CompactBlockMask) and adj.seq_lengths == (short, short)
    # the same non-empty blocks as the pattern on 700 tokens; a block partial on 2000 tokens may
    # be full on 700 (the cropped rows were the ones that broke it): kept partial, which is safe
    truth = _truth(p, (short,), 1)
    part = _dense(adj.kv_num_blocks[0], adj.kv_indices[0], truth.shape[-1])
    full = _dense(adj.full_kv_num_blocks[0], adj.full_kv_indices[0], truth.shape[-1])
    assert torch.equal((part + full).bool(), truth > 0) and not (full.bool() & (truth != 2)).any()
    assert torch.equal(_dense(adj.q_num_blocks[0], adj.q_indices[0], truth.shape[-2]),
                       part.transpose(-1, -2))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, short, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention(q, k, v, block_mask=adj)
    assert (out - reference.attention(q, k, v, p, (short,))).abs().max() < 1e-5


def test_getitem_selects_heads_and_query_blocks():
    p, shape = CASES[2][1], CASES[2][2]
    bm = md.compile(p, shape, 2).block_mask()
    truth = _truth(p, shape, 2)
    one = bm[:, 1]
    assert one.kv_num_blocks.shape == (1, 1, truth.shape[1])
    _check_tables(one, truth[1:2])
    rows = torch.tensor([0, 3, 7])
    sub = bm[0, 0, rows]
    got = _dense(sub.full_kv_num_blocks[0, 0], sub.full_kv_indices[0, 0], truth.shape[2])
    assert torch.equal(got, (truth[0, rows] == 2).int())
    # like torch's, a sliced mask's mask_mod refuses to run (its b/h changed meaning)
    with pytest.raises(RuntimeError):
        sub.mask_mod(0, 0, torch.tensor(0), torch.tensor(0))


def test_to_moves_the_compact_buffer():
    bm = md.compile(md.causal() & md.window(200), (2000,)).block_mask()
    moved = bm.to("meta")
    assert isinstance(moved, CompactBlockMask)
    for a in ("kv_indices", "full_kv_indices", "q_indices", "full_q_indices"):
        src, dst = getattr(bm, a), getattr(moved, a)
        assert dst.device.type == "meta" and dst.shape == src.shape and dst.stride() == src.stride()
        assert _storage(dst) == _storage(src)
    assert bm.to("cpu") is not None


def test_four_million_token_window_block_mask_is_small():
    """1-D 4,194,304-token causal() & window(1024): 32,768 x 32,768 blocks, 4 GB per index
    table at full width; compact, the four tables together hold under 4 MB."""
    n = 4_194_304
    bm = md.compile(md.causal() & md.window(1024), (n,)).block_mask()
    assert bm.seq_lengths == (n, n) and bm.kv_indices.shape[-2:] == (n // B, n // B)
    total = sum(_storage(t) for t in (bm.kv_indices, bm.full_kv_indices, bm.q_indices,
                                      bm.full_q_indices))
    assert total < 4 << 20
    # row 100 (tokens 12,800..12,927) sees keys 11,777..12,927: blocks 92..100, 92 and 100 partial
    assert bm.kv_indices[0, 0, 100, :int(bm.kv_num_blocks[0, 0, 100])].tolist() == [92, 100]
    assert bm.full_kv_indices[0, 0, 100, :int(bm.full_kv_num_blocks[0, 0, 100])].tolist() == \
        list(range(93, 100))


@requires_cuda
@pytest.mark.parametrize("name,p,shape,heads", CASES, ids=[c[0] for c in CASES])
def test_compact_block_mask_through_compiled_flex_on_cuda(name, p, shape, heads):
    """The Triton flex templates read the tables by their strides (the GPU kit runs this)."""
    attn = md.compile(p, shape, heads)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, heads, attn.n, 64, generator=g) for _ in range(3))
    want = reference.attention(q.double(), k.double(), v.double(), p, shape)
    qc, kc, vc = (x.cuda().requires_grad_() for x in (q, k, v))
    out = compiled_flex()(qc, kc, vc, block_mask=attn.block_mask("cuda"))
    assert (out.double().cpu() - want).abs().max() < 1e-3
    # the backward reads the query-side tables: against the reference's gradients
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    reference.attention(qd, kd, vd, p, shape).square().sum().backward()
    out.square().sum().backward()
    for mine, ref in ((qc, qd), (kc, kd), (vc, vd)):
        assert (mine.grad.double().cpu() - ref.grad).abs().max() < 1e-2
