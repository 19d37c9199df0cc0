"""``maskdsl.natten`` is a drop-in for ``natten.na1d/na2d/na3d`` (and ``maskdsl.nn`` for NATTEN's
modules): same heads-last layout [B, *spatial, H, D], same arguments, same outputs.

``tests/test_natten.py`` checks the pattern (``md.neighborhood``) against NATTEN; this module
checks the NATTEN-style API on top of it: argument spelling (ints broadcast to every dim, per-dim
tuples, ``is_causal`` as a bool or per-dim tuple), the layout permutations, the backends ``auto``
picks (dense for small grids, tiles above 256 tokens), CPU gradients (NATTEN's CPU backend has
none) and error messages. NATTEN runs with its pure-PyTorch ``flex-fna`` backend, fp32, head dim
a power of two in [8, 512]; 1-D causal with K == L has no CPU path in NATTEN and is never drawn.

Locally the module skips when NATTEN is not installed; in CI (CI=true) it must run.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import maskdsl as md
from maskdsl import natten as mdn
from maskdsl import nn as mdnn

from natten_oracle import MARKS, eager_flex_without_dynamo, natten  # noqa: F401 (fixture)

pytestmark = MARKS

_NATTEN = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}
_OURS = {1: mdn.na1d, 2: mdn.na2d, 3: mdn.na3d}


# ------------------------------------------------------------------------------ configurations

_MAX_SIZE = {1: 300, 2: 20, 3: 8}   # up to 400 (2-D) / 512 (3-D) tokens: auto picks tiles > 256
_MAX_KERNEL = {1: 13, 2: 7, 3: 5}


def _collapse(values: tuple, rng: random.Random):
    """NATTEN's spelling: a single value when every dim agrees (half the time), else a tuple."""
    return values[0] if len(set(values)) == 1 and rng.random() < 0.5 else values


def _random_calls(count: int, seed: int = 20250311) -> list:
    """(shape, kwargs, batch, heads, dim) per call; kwargs spelled the way NATTEN users do."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        rank = (1, 2, 3)[len(out) % 3]
        shape, kernel, stride, dilation, causal = [], [], [], [], []
        for _ in range(rank):
            L = rng.randint(3, _MAX_SIZE[rank] if rng.random() < 0.3 else 12)
            d = rng.choice([x for x in (1, 1, 2, 3) if 2 * x <= L])
            K = rng.randint(2, min(L // d, _MAX_KERNEL[rank]))
            shape.append(L), kernel.append(K), dilation.append(d)
            stride.append(rng.randint(1, K))
            causal.append(rng.random() < 0.35)
        if rank == 1 and kernel[0] == shape[0] and causal[0]:
            continue   # NATTEN has no CPU path for 1-D causal with K == L
        kwargs = dict(kernel_size=_collapse(tuple(kernel), rng), stride=_collapse(tuple(stride), rng),
                      dilation=_collapse(tuple(dilation), rng),
                      is_causal=_collapse(tuple(causal), rng))
        if rng.random() < 0.3:
            kwargs["scale"] = round(rng.uniform(0.2, 1.5), 2)
        out.append((tuple(shape), kwargs, rng.randint(1, 2), rng.randint(1, 3), rng.choice((8, 16))))
    return out


CALLS = _random_calls(36)


def _ids(calls):
    return [f"{i:02d}-{'x'.join(map(str, c[0]))}-"
            + "-".join(f"{k[0]}{v}".replace(" ", "") for k, v in c[1].items()) for i, c in enumerate(calls)]


def _heads_last(batch, shape, heads, dim, seed, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, heads, dim, generator=g, dtype=dtype,
                        requires_grad=requires_grad) for _ in range(3)]


def _to_bhnd(x):   # [B, *shape, H, D] -> [B, H, N, D]
    return x.reshape(x.shape[0], -1, *x.shape[-2:]).transpose(1, 2)


# ------------------------------------------------------------------------------ vs NATTEN

@pytest.mark.parametrize("call", CALLS, ids=_ids(CALLS))
def test_na_matches_natten(call):
    shape, kwargs, batch, heads, dim = call
    rank = len(shape)
    q, k, v = _heads_last(batch, shape, heads, dim, seed=len(shape) * 1000 + sum(shape))
    expected = _NATTEN[rank](q, k, v, **kwargs, backend="flex-fna", torch_compile=False)
    got = _OURS[rank](q, k, v, **kwargs)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5,
                               msg=lambda m: f"maskdsl.natten vs NATTEN, {call}:\n{m}")


def test_random_calls_cover_the_api():
    """Guards the generator: spellings and backends the comparison above must keep covering."""
    ranks = [len(c[0]) for c in CALLS]
    kw = [c[1] for c in CALLS]
    n_tokens = [math.prod(c[0]) for c in CALLS]
    counts = {
        "rank 1": ranks.count(1), "rank 2": ranks.count(2), "rank 3": ranks.count(3),
        "int kernel_size (rank > 1)": sum(isinstance(k["kernel_size"], int) and r > 1
                                          for k, r in zip(kw, ranks)),
        "tuple kernel_size": sum(isinstance(k["kernel_size"], tuple) for k in kw),
        "stride > 1": sum(max((k["stride"],) if isinstance(k["stride"], int) else k["stride"]) > 1
                          for k in kw),
        "dilation > 1": sum(max((k["dilation"],) if isinstance(k["dilation"], int)
                                else k["dilation"]) > 1 for k in kw),
        "bool is_causal=True": sum(k["is_causal"] is True for k in kw),
        "per-dim causal, mixed": sum(isinstance(k["is_causal"], tuple) and len(set(k["is_causal"])) > 1
                                     for k in kw),
        "explicit scale": sum("scale" in k for k in kw),
        "tiles (N > 256)": sum(n > 256 for n in n_tokens),
        "dense (N <= 256)": sum(n <= 256 for n in n_tokens),
    }
    assert len(CALLS) >= 30
    thin = {name: n for name, n in counts.items() if n < 3}
    assert not thin, f"random calls cover these cases fewer than 3 times: {thin}"


@pytest.mark.parametrize("rank,shape,kwargs", [
    (1, (300,), dict(kernel_size=7, stride=2, dilation=3, is_causal=True)),
    (2, (17, 19), dict(kernel_size=(5, 3), stride=(2, 1), dilation=(1, 2), is_causal=(True, False))),
    (3, (7, 8, 6), dict(kernel_size=(3, 4, 2), stride=(1, 2, 2), dilation=(2, 1, 3),
                        is_causal=(False, True, False))),
])
@pytest.mark.parametrize("backend", ["dense", "tiles"])
def test_explicit_backends_match_natten(rank, shape, kwargs, backend):
    q, k, v = _heads_last(2, shape, 2, 8, seed=rank)
    expected = _NATTEN[rank](q, k, v, **kwargs, backend="flex-fna", torch_compile=False)
    got = _OURS[rank](q, k, v, **kwargs, backend=backend)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_per_head_kernels_match_natten_head_by_head():
    """``kernel_size=md.per_head([...])``: head h equals NATTEN run on head h with its kernel."""
    kernels, dilations = [(3, 3), (5, 3), (7, 7)], [(1, 2), (2, 1), (1, 1)]
    q, k, v = _heads_last(2, (14, 15), 3, 8, seed=7)
    got = mdn.na2d(q, k, v, kernel_size=md.per_head(kernels), dilation=md.per_head(dilations),
                   is_causal=(False, True))
    for h, (kh, dh) in enumerate(zip(kernels, dilations)):
        sl = slice(h, h + 1)
        expected = natten.na2d(q[..., sl, :], k[..., sl, :], v[..., sl, :], kernel_size=kh,
                               dilation=dh, is_causal=(False, True), backend="flex-fna")
        torch.testing.assert_close(got[..., sl, :], expected, atol=2e-5, rtol=1e-5,
                                   msg=lambda m: f"head {h}:\n{m}")


def test_module_loads_a_natten_checkpoint_and_matches():
    """maskdsl.nn.NeighborhoodAttention2D takes NATTEN's module arguments and state_dict."""
    args = dict(embed_dim=32, num_heads=4, kernel_size=(5, 3), stride=(1, 2), dilation=(2, 1),
                is_causal=(False, True))
    torch.manual_seed(3)
    theirs = natten.NeighborhoodAttention2D(**args).eval()
    ours = mdnn.NeighborhoodAttention2D(**args).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 12, 11, 32)
    with torch.no_grad():   # NATTEN has no backward on CPU
        expected = theirs(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ beyond NATTEN

@pytest.mark.parametrize("shape,backend", [((17, 19), "auto"), ((9, 10), "auto"), ((9, 10), "tiles")])
def test_na2d_gradients_on_cpu_match_reference(shape, backend):
    """CPU training: gradients flow through na2d (tiles above 256 tokens, dense below) and equal
    the dense reference's, in fp64 to a tight tolerance."""
    kwargs = dict(kernel_size=(5, 3), stride=(2, 1), dilation=(1, 2), is_causal=(True, False))
    score = md.distance_decay(0.2) + md.softcap(8.0)
    q, k, v = _heads_last(2, shape, 2, 6, seed=11, dtype=torch.float64, requires_grad=True)
    out = mdn.na2d(q, k, v, **kwargs, score=score, backend=backend)
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))

    p = md.neighborhood(kwargs["kernel_size"], stride=kwargs["stride"],
                        dilation=kwargs["dilation"], causal=kwargs["is_causal"])
    ref = md.reference.attention(*(_to_bhnd(t) for t in (q, k, v)), p, shape, score=score)
    ref_grads = torch.autograd.grad((ref * _to_bhnd(w)).sum(), (q, k, v))
    torch.testing.assert_close(_to_bhnd(out), ref, atol=1e-10, rtol=1e-10)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name}:\n{m}")


def test_value_head_dim_and_dtype_follow_the_inputs():
    q, k, _ = _heads_last(1, (6, 7), 2, 8, seed=0, dtype=torch.float64)
    v = torch.randn(1, 6, 7, 2, 5, dtype=torch.float64)
    out = mdn.na2d(q, k, v, kernel_size=3)
    assert out.shape == (1, 6, 7, 2, 5) and out.dtype == torch.float64
    p = md.neighborhood(3)
    ref = md.reference.attention(_to_bhnd(q), _to_bhnd(k), _to_bhnd(v), p, (6, 7))
    torch.testing.assert_close(_to_bhnd(out), ref)


def test_compiled_attention_is_cached_per_configuration():
    q, k, v = _heads_last(1, (9, 8), 2, 8, seed=0)
    mdn.na2d(q, k, v, kernel_size=3, dilation=(1, 2))
    before = len(mdn._CACHE)
    mdn.na2d(q, k, v, kernel_size=(3, 3), dilation=(1, 2), is_causal=False)   # same config
    assert len(mdn._CACHE) == before
    mdn.na2d(q, k, v, kernel_size=(3, 3), dilation=(1, 2), is_causal=True)    # a new one
    assert len(mdn._CACHE) == before + 1


# ------------------------------------------------------------------------------ errors

def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("fn,args,kwargs,match", [
    (mdn.na2d, (_t(1, 8, 2, 8), _t(1, 8, 2, 8), _t(1, 8, 2, 8)), dict(kernel_size=3),
     r"na2d: query has shape \[1, 8, 2, 8\] \(4-D\); expected a 5-D tensor \[B, X, Y, H, D\].*try na1d"),
    (mdn.na1d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3),
     r"na1d: query .* expected a 4-D tensor \[B, L, H, D\]"),
    (mdn.na3d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3),
     r"na3d: query .* expected a 6-D tensor"),
    (mdn.na2d, ([[0.0]], _t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8)), dict(kernel_size=3),
     r"na2d: query: expected a torch.Tensor \[B, X, Y, H, D\], got list"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8), _t(1, 8, 9, 2, 8), _t(1, 8, 8, 2, 8)), dict(kernel_size=3),
     r"na2d: key has shape \[1, 8, 9, 2, 8\] but query has \[1, 8, 8, 2, 8\]"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8), _t(1, 8, 8, 2, 8), _t(1, 8, 8, 3, 8)), dict(kernel_size=3),
     r"na2d: value has shape \[1, 8, 8, 3, 8\] .* expected the same \[B, X, Y, heads_kv\]"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8, dtype=torch.int64),) * 3, dict(kernel_size=3),
     r"na2d: query has dtype torch.int64; expected a floating-point dtype"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=(3, 3, 3)),
     r"na2d: kernel_size=\(3, 3, 3\) has 3 entries; expected an int or a tuple of 2 ints"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=(3, 9)),
     r"na2d: neighborhood: kernel_size\[1\]=9 needs shape\[1\] >= 9, got 8"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3, dilation=(1, 3)),
     r"na2d: neighborhood: kernel_size\[1\]=3 with dilation 3 needs shape\[1\] >= 9, got 8"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3, stride=(1, 4)),
     r"na2d: neighborhood: stride\[1\]=4 exceeds kernel_size\[1\]=3"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=1),
     r"na2d: neighborhood: kernel_size\[0\]=1 is out of range: expected an int in \[2, 2\*\*31 - 1\]"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3.5),
     r"na2d: kernel_size=3.5: expected an int or a tuple of 2 ints"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3, is_causal=1),
     r"na2d: is_causal=1: expected a bool or a tuple of 2 bools"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3, is_causal=(True, 0)),
     r"na2d: is_causal\[1\]=0: expected a bool or a tuple of 2 bools"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=md.per_head([3, 5, 7])),
     r"na2d: neighborhood: kernel_size=per_head\(\[3, 5, 7\]\) has 3 values but heads=2"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3, scale="x"),
     r"na2d: scale=.x.: expected a finite number"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3, score=md.neighborhood(3)),
     r"na2d: score=neighborhood\(kernel_size=3\): expected score terms"),
    (mdn.na2d, (_t(1, 8, 8, 2, 8),) * 3, dict(kernel_size=3, backend="cutlass-fna"),
     r"na2d: backend='cutlass-fna': expected one of 'auto', 'dense', 'flex', 'tiles'"),
])
def test_errors_name_the_argument(fn, args, kwargs, match):
    with pytest.raises(md.MaskDSLError, match=match):
        fn(*args, **kwargs)
