"""The ``sdpa`` backend: torch's own scaled_dot_product_attention for the patterns it runs exactly
(the whole grid, the plain causal mask over the flat order) with no score terms
(ARCHITECTURE.md, "Backends"). Its claim "this pattern is that mask" is checked against the
reference mask for named cases and for random patterns; its outputs, lse and gradients against
the reference; ``auto`` takes it first and every other request is refused by name."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import maskdsl as md
from maskdsl.kernels import sdpa
from oracle import assert_matches_reference, inputs
from strategies import cases


@pytest.mark.parametrize("p, shape, expected", [
    (md.causal(), (40,), "causal"),
    (md.full(), (40,), "full"),
    (md.full(), (4, 5), "full"),
    (md.causal() & md.causal(), (40,), "causal"),               # simplified to one
    (md.causal() | md.empty(), (40,), "causal"),
    (md.heads([md.causal(), md.causal()]), (40,), "causal"),    # every head alike
    (md.causal(dims=(1,)), (1, 40), "causal"),                  # one dim longer than 1
    (md.causal(), (1, 1, 40), "causal"),
    (md.causal(dims=(0,)), (1, 40), "full"),                    # k0 <= q0 on a 1-long dim
    (md.causal(), (1,), "full"),
    (md.causal(), (4, 10), None),                               # per-dim, not flat
    (md.causal(dims=(0,)), (4, 10), None),                      # frame-causal
    (md.heads([md.causal(), md.full()]), (40,), None),
    (md.causal() & md.window(8), (40,), None),
    (md.neighborhood(3), (40,), None),
])
def test_kind_names_exactly_the_mask_it_claims(p, shape, expected):
    assert sdpa.kind(p, shape) == expected
    if expected is not None:
        n = md.reference.mask(p, shape, 2).shape[-1]
        want = torch.ones(n, n, dtype=torch.bool)
        if expected == "causal":
            want = want.tril()
        assert torch.equal(md.reference.mask(p, shape, 2), want.expand(2, n, n))


@settings(max_examples=150, deadline=None)
@given(cases(max_tokens=64))
def test_kind_is_sound_on_random_patterns(case):
    """Whenever ``kind`` names a mask, the reference mask is that mask (no false claim)."""
    shape, heads, p = case
    k = sdpa.kind(p, shape)
    if k is None:
        return
    m = md.reference.mask(p, shape, heads)
    n = m.shape[-1]
    want = torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(m, (want.tril() if k == "causal" else want).expand_as(m))


@pytest.mark.parametrize("p, shape", [(md.causal(), (70,)), (md.full(), (7, 9)),
                                      (md.causal(dims=(1,)), (1, 70))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kv_heads", [None, 1])
@pytest.mark.parametrize("lse", [False, True])
def test_sdpa_matches_the_reference(p, shape, dtype, kv_heads, lse):
    """Outputs, lse and gradients of q, k, v, with GQA (no copy without the lse) and a scale."""
    attn = md.compile(p, shape, 2, backend="sdpa")
    n = attn.n
    q, k, v = inputs(2, 2, n, 16, dtype=dtype, grad=True, kv_heads=kv_heads)
    assert_matches_reference(attn, q, k, v, lse=lse)
    assert_matches_reference(attn, q, k, v, scale=0.3, lse=lse)


def test_auto_takes_sdpa_for_full_and_causal_and_says_why():
    attn = md.compile(md.causal(), (4096,), 4)
    assert attn.backend == "sdpa"
    assert "is_causal=True" in attn.reason
    assert md.compile(md.full(), (300,), 2).backend == "sdpa"
    assert md.compile(md.causal(), (64,), 2).backend == "sdpa"      # tiny N too
    # anything else goes on down the list, naming why sdpa did not take it
    other = md.compile(md.causal() & md.window(64), (4096,), 4)
    assert other.backend == "tiles" and "sdpa: torch's SDPA runs only full()" in other.reason
    scored = md.compile(md.causal(), (4096,), 4, score=md.alibi())
    assert scored.backend == "tiles" and "takes no score terms" in scored.reason
    ranged = md.compile(md.causal(), (4096,), 4, q_range=(0, 128))
    assert ranged.backend == "tiles"


@pytest.mark.parametrize("kwargs, words", [
    (dict(p=md.causal() & md.window(8)), "runs only full() and the plain causal mask"),
    (dict(score=md.softcap(30.0)), "takes no score terms"),
    (dict(q_range=(0, 8)), "q_range=(0, 8): torch's SDPA runs the whole grid"),
])
def test_sdpa_refusals_name_what_it_cannot_do(kwargs, words):
    p = kwargs.pop("p", md.causal())
    with pytest.raises(md.MaskDSLError, match=r"backend='sdpa': .*" + words.replace("(", r"\(")
                       .replace(")", r"\)")):
        md.compile(p, (64,), 2, backend="sdpa", **kwargs)


def test_nonfinite_rows_stay_isolated_on_sdpa():
    """A NaN in one key row poisons exactly the causal rows that attend it; a NaN query row only
    itself (the same rule as every backend)."""
    attn = md.compile(md.causal(), (32,), 2, backend="sdpa")
    q, k, v = inputs(1, 2, 32, 8, grad=True)
    with torch.no_grad():
        k[0, 1, 20] = float("nan")
        q[0, 0, 5] = float("inf")
    out = attn(q, k, v)
    bad = torch.zeros(1, 2, 32, dtype=torch.bool)
    bad[0, 1, 20:] = True
    bad[0, 0, 5] = True
    assert torch.equal(torch.isnan(out).any(-1), bad)
    ref = md.reference.attention(q, k, v, md.causal(), (32,))
    torch.testing.assert_close(out[~bad], ref[~bad])
    out.masked_fill(bad[..., None], 0).sum().backward()
    assert torch.isfinite(k.grad[0, 0]).all() and torch.isnan(q.grad[0, 0, 5]).all()


def test_sdpa_under_torch_compile_and_grad_mode_off():
    attn = md.compile(md.causal(), (48,), 2)
    q, k, v = inputs(1, 2, 48, 8)
    ref = md.reference.attention(q, k, v, md.causal(), (48,))
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v), ref)
    compiled = torch.compile(lambda a, b, c: attn(a, b, c), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), ref)
