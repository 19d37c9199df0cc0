"""Log-sum-exp outputs and grouped-query attention on every backend, against the reference
(ARCHITECTURE.md, "Log-sum-exp" and "GQA"), plus merging backend outputs over disjoint key sets.

The reference reads GQA by repeating k and v (``repeat_interleave``, the obviously right
definition); the backends must not need that copy (benchmarks/run.py, section ``gqa``, measures
it). lse is compared with the oracle's tolerance rule, -inf (rows with no key) and NaN
(poisoned rows) exactly, and its gradient through a random cotangent.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import maskdsl as md
from maskdsl.kernels.flex import run_flex
from oracle import assert_close_by_rule, assert_matches_reference, inputs, triton_available
from strategies import cases, grid_cases, grid_scores


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@settings(max_examples=40)
@given(cases(max_tokens=100, max_heads=4), st.data())
def test_dense_lse_and_gqa_match_the_reference(case, data):
    shape, H, p = case
    kv = data.draw(st.sampled_from(_divisors(H)))
    attn = md.compile(p, shape, H, backend="dense")
    q, k, v = inputs(2, H, math.prod(shape), 8, grad=True, kv_heads=kv)
    assert_matches_reference(attn, q, k, v, lse=True)


@settings(max_examples=30, deadline=None)
@given(grid_cases(max_tokens=1500, max_heads=4), st.data())
def test_tiles_lse_and_gqa_match_the_reference_at_production_sizes(case, data):
    shape, H, p = case
    kv = data.draw(st.sampled_from(_divisors(H)))
    s = data.draw(grid_scores(shape, H))
    lse = data.draw(st.booleans())
    attn = md.compile(p, shape, H, score=s, backend="tiles")
    q, k, v = inputs(2, H, math.prod(shape), 16, grad=True, seed=len(repr(p)), kv_heads=kv)
    assert_matches_reference(attn, q, k, v, lse=lse)


@settings(max_examples=30, deadline=None)
@given(cases(max_tokens=144, max_heads=4), st.data())
def test_tiles_lse_and_gqa_on_small_grids_with_every_primitive(case, data):
    """Small grids draw every primitive (document, power, radial, empty rows under ~ and &)."""
    shape, H, p = case
    kv = data.draw(st.sampled_from(_divisors(H)))
    attn = md.compile(p, shape, H, score=data.draw(st.sampled_from(
        [None, md.sink_logit(0.5), md.softcap(5.0), md.distance_decay(0.2)])), backend="tiles")
    q, k, v = inputs(1, H, math.prod(shape), 8, grad=True, dtype=torch.float64, kv_heads=kv)
    assert_matches_reference(attn, q, k, v, lse=True)


@pytest.mark.parametrize("score", [md.sink_logit(md.per_head([0.0, 1.0, -1.0, 2.0])), None,
                                   md.alibi()], ids=["sink: per-head gather", "folded", "folded+bias"])
def test_tiles_lse_on_the_chunked_path(monkeypatch, score):
    """Grids whose gathered k/v exceed the gather budget run a chunk of query tiles at a time;
    the lse chunks must line up with the output's (GQA folded into the tiles, or per head)."""
    from maskdsl.kernels import tiles

    monkeypatch.setattr(tiles, "_GATHER_BYTES", 1 << 12)
    p = md.neighborhood((5, 7), dilation=(1, 2)) & md.causal(dims=(0,)) | md.sink(3)
    attn = md.compile(p, (20, 30), 4, score=score, backend="tiles")
    q, k, v = inputs(1, 4, 600, 8, grad=True, kv_heads=2)
    assert_matches_reference(attn, q, k, v, lse=True)
    with torch.no_grad():
        assert_matches_reference(attn, q.detach(), k.detach(), v.detach(), grads=False, lse=True)


def test_tiles_gqa_without_grad_uses_the_per_head_gather():
    """The no-grad fast path (preallocated buffers) is for H_kv == H; GQA takes the per-head
    gather and must still match."""
    attn = md.compile(md.neighborhood((7, 7)), (24, 24), 8, backend="tiles")
    q, k, v = inputs(2, 8, 576, 16, kv_heads=1)
    with torch.no_grad():
        assert_matches_reference(attn, q, k, v, grads=False)
        assert_matches_reference(attn, q, k, v, grads=False, lse=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=20, deadline=None)
@given(grid_cases(max_tokens=1200, max_heads=4), st.data())
def test_flex_lse_and_gqa_match_the_reference(case, data):
    """Flex's own enable_gqa and lse, with the program's (tiled, permuted) layout, run eagerly
    (torch's compiled CPU flex has no lse: the backend refuses that, tested below)."""
    shape, H, p = case
    kv = data.draw(st.sampled_from(_divisors(H)))
    attn = md.compile(p, shape, H, backend="flex")
    q, k, v = inputs(1, H, math.prod(shape), 16, kv_heads=kv)
    res = run_flex(attn.program, q, k, v, 0.25, compiled=False, return_lse=True)
    assert_matches_reference(attn, q, k, v, grads=False, scale=0.25, out=res, lse=True)


def test_flex_on_cpu_refuses_return_lse_and_auto_runs_tiles():
    q, k, v = inputs(1, 2, 64, 16)
    flex = md.compile(md.window(3), (64,), 2, backend="flex")
    with torch.no_grad(), pytest.raises(md.MaskDSLError, match=r"backend='flex'.*log-sum-exp"):
        flex(q, k, v, return_lse=True)
    out, lse = md.compile(md.window(3), (64,), 2)(q, k, v, return_lse=True)
    ref, ref_lse = md.reference.attention(q, k, v, md.window(3), (64,), return_lse=True)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
@pytest.mark.parametrize("p, shape, H, kv, score", [
    (md.neighborhood((3, 3)) & md.causal(dims=(0,)), (6, 6), 2, 1, None),
    (md.causal() & md.window(5) | md.sink(2), (40,), 4, 2, md.sink_logit(0.5)),
    (md.neighborhood(5, dilation=2) & md.block(8), (24,), 2, 2, md.distance_decay(0.3)),
])
def test_triton_lse_and_gqa_match_the_reference(p, shape, H, kv, score):
    attn = md.compile(p, shape, H, score=score, backend="triton")
    q, k, v = inputs(1, H, math.prod(shape), 16, grad=True, kv_heads=kv)
    assert_matches_reference(attn, q, k, v, lse=True)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_gqa_reads_k_and_v_in_place_in_every_kernel(monkeypatch):
    """GQA on the Triton kernels without repeating k and v: every launch gets the caller's
    H_kv-head tensors (same storage), and the forward, dq, dk/dv (box and sink keys) and the
    relative_bias table kernels all read kv head h // (H / H_kv): per-head patterns and tables,
    a learnable slope, lse, against the reference."""
    from maskdsl.kernels import triton_attn

    seen = []
    for name in ("_launch_fwd", "_launch_bwd"):
        real = getattr(triton_attn, name)

        def spy(plan, consts, sc, q, k, v, *rest, _real=real):
            seen.append((k.data_ptr(), v.data_ptr(), k.shape[1], v.shape[1]))
            return _real(plan, consts, sc, q, k, v, *rest)
        monkeypatch.setattr(triton_attn, name, spy)
    H, kv, shape = 4, 2, (4, 10)
    p = md.heads([md.neighborhood((3, 3)), md.neighborhood((3, 5), dilation=(1, 2)),
                  md.neighborhood((3, 3)) & md.causal(dims=(0,)), md.window((1, 2))]) | md.sink(2)
    table = torch.randn(H, 5, 5, requires_grad=True)            # per head, radius (2, 2)
    slope = torch.tensor(0.05, requires_grad=True)
    attn = md.compile(p, shape, H, score=md.relative_bias(table) + md.alibi(slope),
                      backend="triton")
    q, k, v = inputs(1, H, 40, 16, grad=True, kv_heads=kv)
    assert_matches_reference(attn, q, k, v, lse=True)
    assert len(seen) == 2 and all(s == (k.data_ptr(), v.data_ptr(), kv, kv) for s in seen)


def test_lse_of_rows_without_keys_is_minus_inf_with_zero_gradients():
    p = md.window(2) & ~md.block(4) & md.causal()          # two rows of each block see none
    for backend in ("dense", "tiles"):
        attn = md.compile(p, (32,), 1, backend=backend)
        q, k, v = inputs(1, 1, 32, 8, grad=True)
        out, lse = attn(q, k, v, return_lse=True)
        empty = ~attn.mask()[0].any(-1)
        assert int(empty.sum()) == 18           # rows 0-3 and two of every later block
        assert torch.isneginf(lse[0, 0, empty]).all() and torch.isfinite(lse[0, 0, ~empty]).all()
        assert (out[0, 0, empty] == 0).all()
        g = torch.autograd.grad((out.sum() + lse.where(lse.isfinite(), 0).sum()), [q, k, v])
        assert all(torch.isfinite(x).all() for x in g)
        assert (g[0][0, 0, empty] == 0).all()


def test_poisoned_rows_have_nan_lse_and_others_are_untouched():
    p = md.causal() & md.window(3)
    for backend in ("dense", "tiles"):
        attn = md.compile(p, (300,), 2, backend=backend) if backend == "tiles" else \
            md.compile(p, (300,), 2, backend="dense")
        q, k, v = inputs(1, 2, 300, 8, grad=True, kv_heads=1)
        kk = k.detach().clone()
        kk[0, 0, 100] = float("nan")                  # kv head 0: both query heads read it
        kk.requires_grad_(True)
        assert_matches_reference(attn, q, kk, v, grads=False, lse=True)
        _, lse = attn(q, kk, v, return_lse=True)
        assert torch.isnan(lse[0, :, 100:104]).all()
        assert torch.isfinite(lse[0, :, :100]).all() and torch.isfinite(lse[0, :, 104:]).all()


@settings(max_examples=15, deadline=None)
@given(grid_cases(max_tokens=900, max_heads=2), st.integers(2, 4), st.integers(0, 2 ** 16))
def test_merging_backend_parts_over_disjoint_keys_equals_the_whole(case, n_parts, seed):
    """Split every query's keys into random disjoint parts (flat-index stripes, compiled as
    ``pattern & part``), run each part on the tiles backend with return_lse, merge: the whole
    pattern's rows, with gradients."""
    shape, H, p = case
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, n_parts, (n,), generator=g)
    q, k, v = inputs(1, H, n, 8, grad=True, dtype=torch.float64, seed=seed)
    pieces = []
    for i in range(n_parts):
        part = md.mask_fn(lambda b, h, qi, kj, i=i, owner=owner: owner[kj] == i, name=f"part{i}")
        pieces.append(md.compile(p & part, shape, H, backend="tiles")(q, k, v, return_lse=True))
    out, lse = md.merge(pieces)
    ref, ref_lse = md.reference.attention(q, k, v, p, shape, return_lse=True)
    assert_close_by_rule(out, ref, ref, "merged output")
    assert_close_by_rule(lse, ref_lse, ref_lse, "merged lse")
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), [q, k, v])
    exp = torch.autograd.grad((ref * w).sum(), [q, k, v])
    for a, b in zip(got, exp):
        assert_close_by_rule(a, b, b, "merged gradient")


@pytest.mark.parametrize("shapes, message", [
    (((1, 4, 16, 8), (1, 3, 16, 8), (1, 3, 16, 8)), r"k: shape \[1, 3, 16, 8\].*H_kv dividing q's 4 heads"),
    (((1, 4, 16, 8), (1, 2, 16, 8), (1, 4, 16, 8)), r"v: shape \[1, 4, 16, 8\] differs from k's"),
    (((1, 4, 16, 8), (1, 8, 16, 8), (1, 8, 16, 8)), r"k: shape \[1, 8, 16, 8\].*heads"),
    (((1, 4, 16, 8), (1, 2, 16, 4), (1, 2, 16, 8)), r"k: .*head dim"),
])
def test_gqa_head_counts_that_do_not_divide_are_refused(shapes, message):
    attn = md.compile(md.window(2), (16,), 4)
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(md.MaskDSLError, match=message):
        attn(q, k, v)


def test_return_lse_must_be_a_bool():
    attn = md.compile(md.window(2), (16,), 1)
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(md.MaskDSLError, match=r"return_lse='yes': expected True or False"):
        attn(q, q, q, return_lse="yes")


def test_lse_and_gqa_under_torch_compile_fullgraph_match_eager():
    import torch._dynamo

    attn = md.compile(md.causal() & md.window(8) | md.sink(2), (300,), 4,
                      score=md.sink_logit(0.25), backend="tiles")

    def f(q, k, v):
        out, lse = attn(q, k, v, return_lse=True)
        return (out * out).sum() + (lse * 0.3).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    q, k, v = inputs(2, 4, 300, 8, grad=True, kv_heads=2)
    got = cf(q, k, v)
    exp = f(q, k, v)
    torch.testing.assert_close(got, exp)
    for a, b in zip(torch.autograd.grad(got, [q, k, v]), torch.autograd.grad(exp, [q, k, v])):
        torch.testing.assert_close(a, b)


def test_nn_modules_take_kv_heads():
    from maskdsl.nn import NeighborhoodAttention2D, PatternAttention

    torch.manual_seed(0)
    p = md.neighborhood((3, 3))
    layer = PatternAttention(32, 4, p, (6, 6), kv_heads=2).double()
    assert layer.qkv.out_features == (4 + 2 * 2) * 8 and "kv_heads=2" in repr(layer)
    x = torch.randn(2, 6, 6, 32, dtype=torch.float64)
    qkv = layer.qkv(x.reshape(2, 36, 32))
    q, k, v = qkv.split([32, 16, 16], -1)
    q, k, v = (t.reshape(2, 36, -1, 8).transpose(1, 2) for t in (q, k, v))
    ref = md.reference.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), p, (6, 6),
                                 scale=8 ** -0.5)
    ref = layer.proj(ref.transpose(1, 2).reshape(2, 36, 32)).reshape(x.shape)
    torch.testing.assert_close(layer(x), ref)
    na = NeighborhoodAttention2D(16, 4, 3, kv_heads=1)
    assert na(torch.randn(1, 5, 5, 16)).shape == (1, 5, 5, 16)
    with pytest.raises(md.MaskDSLError, match=r"kv_heads=3 does not divide heads=4"):
        PatternAttention(32, 4, p, (6, 6), kv_heads=3)
    with pytest.raises(md.MaskDSLError, match=r"kv_heads=0: expected a positive int"):
        PatternAttention(32, 4, p, (6, 6), kv_heads=0)
