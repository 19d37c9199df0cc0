"""md.compile and CompiledAttention (dense backend): output == reference, dropout modes,
validation happens once at compile time."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import maskdsl as md
from maskdsl.kernels import sdpa
from strategies import cases, literal_scores


def assert_matches_reference(attn, q, k, v, *, atol=1e-5, rtol=1e-5):
    """The one comparison every backend test goes through: compiled output vs the fp64 reference."""
    keep = None
    expected = md.reference.attention(q.double(), k.double(), v.double(), attn.pattern, attn.shape,
                                      score=attn.score, dropout_keep=keep)
    torch.testing.assert_close(attn(q, k, v).double(), expected, atol=atol, rtol=rtol)


@given(cases(max_tokens=100), st.data())
def test_dense_and_auto_match_reference(case, data):
    shape, H, p = case
    score = data.draw(st.none() | literal_scores(shape, H))
    if score is not None:  # dropout is compared separately (it depends on the call count)
        score = sum((t for t in md.dsl.score.score_terms(score) if not isinstance(t, md.dsl.score.Dropout)), 0) or None
    attn = md.compile(p, shape, H, score=score, backend=data.draw(st.sampled_from(["auto", "dense"])))
    # auto takes torch's SDPA first where the pattern is exactly what it runs (tests/test_sdpa.py),
    # else tiles; the dense reference runs only when asked for
    plain = score is None and sdpa.kind(p, shape) is not None
    auto = "sdpa" if plain else "tiles"
    assert attn.backend == (auto if attn.requested == "auto" else "dense")
    assert attn.reason
    N = math.prod(shape)
    q, k, v = (torch.randn(2, H, N, 8) for _ in range(3))
    assert_matches_reference(attn, q, k, v)


def test_compiled_attention_reports_what_it_is():
    p = md.neighborhood((3, 3)) & md.causal(dims=(0,))
    attn = md.compile(p, shape=[6, 6], heads=2)
    assert attn.pattern == p and attn.shape == (6, 6) and attn.heads == 2 and attn.n == 36
    assert "tiles" in repr(attn) and attn.reason
    assert attn.mask().shape == (2, 36, 36) and attn.mask() is attn.mask()  # built once


def test_gradients_flow_through_the_dense_backend():
    table = torch.zeros(2, 7, 7, requires_grad=True)
    attn = md.compile(md.neighborhood(3), (4, 4), 2, score=md.relative_bias(table))
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    attn(q, k, v).square().sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0 and q.grad is not None


def test_public_surface():
    for name in md.__all__:
        assert hasattr(md, name), name
    for name in ("neighborhood", "window", "causal", "block", "sink", "full", "empty", "document",
                 "radial", "power", "heads", "per_head", "distance_decay", "alibi",
                 "relative_bias", "softcap", "sink_logit", "dropout", "parse",
                 "reference", "MaskDSLError", "CompiledAttention", "KVCache", "Lookback",
                 "FlexInputs", "Extent"):
        assert name in md.__all__, name
    # md.compile is public but not exported by `import *`, which must shadow no builtin
    import builtins

    assert callable(md.compile) and not set(md.__all__) & set(dir(builtins))
    namespace = {}
    exec("from maskdsl import *", namespace)
    assert namespace.get("compile", builtins.compile) is builtins.compile
    import maskdsl.codegen, maskdsl.kernels  # noqa: F401  (installed inside maskdsl)
    assert set(md.__all__) >= set(md.dsl.node.DSL_NAMES)     # every DSL name is public


@pytest.mark.parametrize("module", ["codegen", "kernels", "codegen.ir", "kernels.tiles"])
def test_top_level_imports_fail_clearly(module):
    """From the repository root ``import codegen`` finds the folder itself: it must refuse with a
    clear ImportError, not half-import (relative-import errors) or shadow PyPI's packages."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    top = module.split(".")[0]
    assert f"ImportError: '{top}' is maskdsl.{top}, which installs inside the maskdsl package" \
        in r.stderr, r.stderr[-1000:]
