"""md.compile and CompiledAttention (dense backend): output == reference, dropout modes,
validation happens once at compile time."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import maskdsl as md
from strategies import cases, literal_scores


def assert_matches_reference(attn, q, k, v, *, atol=1e-5, rtol=1e-5):
    """The one comparison every backend test goes through: compiled output vs the fp64 reference."""
    keep = None
    expected = md.reference.attention(q.double(), k.double(), v.double(), attn.pattern, attn.shape,
                                      score=attn.score, dropout_keep=keep)
    torch.testing.assert_close(attn(q, k, v).double(), expected, atol=atol, rtol=rtol)


@given(cases(max_tokens=100), st.data())
def test_dense_backend_matches_reference(case, data):
    shape, H, p = case
    score = data.draw(st.none() | literal_scores(shape, H))
    if score is not None:  # dropout is compared separately (it depends on the call count)
        score = sum((t for t in md._score.score_terms(score) if not isinstance(t, md._score.Dropout)), 0) or None
    attn = md.compile(p, shape, H, score=score, backend=data.draw(st.sampled_from(["auto", "dense"])))
    assert attn.backend == "dense" and attn.reason
    N = math.prod(shape)
    q, k, v = (torch.randn(2, H, N, 8) for _ in range(3))
    assert_matches_reference(attn, q, k, v)


def test_compiled_attention_reports_what_it_is():
    p = md.neighborhood((3, 3)) & md.causal(dims=(0,))
    attn = md.compile(p, shape=[6, 6], heads=2)
    assert attn.pattern == p and attn.shape == (6, 6) and attn.heads == 2 and attn.n == 36
    assert "dense" in repr(attn) and attn.reason
    assert attn.mask().shape == (2, 36, 36) and attn.mask() is attn.mask()  # built once


def test_dropout_follows_training_and_seed():
    s = md.dropout(0.5, seed=3)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    a, b = md.compile(md.full(), (16,), 2, score=s), md.compile(md.full(), (16,), 2, score=s)
    first_a, first_b = a(q, k, v), b(q, k, v)
    torch.testing.assert_close(first_a, first_b)               # same seed, same masks
    assert not torch.allclose(a(q, k, v), first_a)             # the generator advances
    keep = md.reference.dropout_mask(s, 1, 2, 16)              # call 1 == the reference's draw
    torch.testing.assert_close(
        first_a, md.reference.attention(q, k, v, md.full(), (16,), score=s, dropout_keep=keep))
    a.training = False
    torch.testing.assert_close(a(q, k, v), md.reference.attention(q, k, v, md.full(), (16,)))


def test_gradients_flow_through_the_dense_backend():
    table = torch.zeros(2, 7, 7, requires_grad=True)
    attn = md.compile(md.neighborhood(3), (4, 4), 2, score=md.relative_bias(table))
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    attn(q, k, v).square().sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0 and q.grad is not None


def test_too_many_tokens_for_dense():
    with pytest.raises(md.MaskDSLError, match=r"too many for the dense backend"):
        md.compile(md.window(8), (200, 200), backend="dense")


def test_public_surface():
    for name in md.__all__:
        assert hasattr(md, name), name
    for name in ("neighborhood", "window", "causal", "block", "sink", "full", "empty", "document",
                 "radial", "power", "heads", "per_head", "distance_decay", "alibi",
                 "relative_bias", "softcap", "sink_logit", "dropout", "compile", "parse",
                 "reference", "MaskDSLError", "CompiledAttention"):
        assert name in md.__all__, name
    import maskdsl.codegen, maskdsl.kernels  # noqa: F401  (installed inside maskdsl)
    import importlib.util
    assert importlib.util.find_spec("codegen") is None or "maskdsl" not in str(importlib.util.find_spec("codegen").origin)
