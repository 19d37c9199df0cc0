"""``maskdsl.natten`` against NATTEN 0.21.7 itself beyond the window: GQA/MQA key/value heads,
``additional_keys``/``additional_values`` and ``return_lse`` (ARCHITECTURE.md, "Extra tokens"),
on 1-D to 3-D configurations with dilation, stride and per-dim causality.

NATTEN runs its CPU flex backend eagerly (forward only); maskdsl runs its own backends.
"""
from __future__ import annotations

import pytest
import torch

import maskdsl as md
from maskdsl import natten as mdn

from natten_oracle import MARKS, eager_flex_without_dynamo, natten  # noqa: F401 (fixture)

pytestmark = MARKS

CONFIGS = [
    # shape, heads, kv heads, kernel, stride, dilation, causal, additional tokens
    ((40,), 4, 1, 7, 2, 3, True, 3),
    ((6, 7), 4, 2, (3, 5), (1, 2), (2, 1), (True, False), 5),
    ((9, 8), 2, 2, 3, 1, (1, 2), False, 0),
    ((4, 5, 6), 2, 1, (3, 3, 3), (1, 1, 2), 1, (True, False, False), 9),
    ((3, 8, 8), 4, 4, (2, 5, 3), 1, (1, 1, 2), (False, True, False), 1),
]


def _tensors(shape, H, Hk, extra, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, *shape, H, D, generator=g)
    k = torch.randn(2, *shape, Hk, D, generator=g)
    v = torch.randn(2, *shape, Hk, D, generator=g)
    ak = torch.randn(2, extra, Hk, D, generator=g) if extra else None
    av = torch.randn(2, extra, Hk, D, generator=g) if extra else None
    return q, k, v, ak, av


@pytest.mark.parametrize("backend", ["auto", "tiles"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{len(c[0])}-D {c[0]} H={c[1]}/{c[2]} +{c[7]}")
def test_gqa_additional_kv_and_lse_match_natten(cfg, backend):
    shape, H, Hk, kernel, stride, dilation, causal, extra = cfg
    q, k, v, ak, av = _tensors(shape, H, Hk, extra, seed=len(shape) + extra)
    rank = len(shape)
    kw = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal, scale=0.3)
    want, want_lse = getattr(natten, f"na{rank}d")(q, k, v, **kw, additional_keys=ak,
                                                   additional_values=av, return_lse=True)
    got, lse = getattr(mdn, f"na{rank}d")(q, k, v, **kw, additional_keys=ak,
                                          additional_values=av, return_lse=True, backend=backend)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)
    plain = getattr(mdn, f"na{rank}d")(q, k, v, **kw, additional_keys=ak, additional_values=av,
                                       backend=backend)
    torch.testing.assert_close(plain, got)


def test_additional_kv_trains_on_cpu():
    """NATTEN has no CPU backward; maskdsl's additional-KV path does (gradients against the
    reference with extra='keys')."""
    shape, H, Hk, E = (6, 7), 4, 2, 5
    q, k, v, ak, av = (t.double().requires_grad_(True) for t in _tensors(shape, H, Hk, E))
    out, lse = mdn.na2d(q, k, v, kernel_size=3, additional_keys=ak, additional_values=av,
                        return_lse=True)
    loss = (out * out).sum() + lse.sum()
    got = torch.autograd.grad(loss, [q, k, v, ak, av])

    def bhnd(t):
        return t.reshape(2, -1, t.shape[-2], t.shape[-1]).transpose(1, 2)

    ref, ref_lse = md.reference.attention(
        bhnd(q), torch.cat([bhnd(k), ak.transpose(1, 2)], 2), torch.cat([bhnd(v), av.transpose(1, 2)], 2),
        md.neighborhood((3, 3)), shape, extra_tokens=E, extra="keys", return_lse=True)
    loss_ref = (ref * ref).sum() + ref_lse.sum()
    for a, b in zip(got, torch.autograd.grad(loss_ref, [q, k, v, ak, av])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make, message", [
    (lambda q, k, v, a: mdn.na2d(q, torch.randn(2, 6, 7, 3, 16), torch.randn(2, 6, 7, 3, 16), 3),
     r"na2d: key has shape .* expected the same shape, or heads_kv dividing query's 4 heads"),
    (lambda q, k, v, a: mdn.na2d(q, k, v, 3, additional_keys=a),
     r"na2d: additional_keys and additional_values: expected both tensors or both None"),
    (lambda q, k, v, a: mdn.na2d(q, k, v, 3, additional_keys=a[:, :, :1], additional_values=a),
     r"na2d: additional_keys has shape \[2, 5, 1, 16\]; expected \[2, 5, 2, 16\]"),
    (lambda q, k, v, a: mdn.na2d(q, k, v, 3, additional_keys=a, additional_values=a[:1]),
     r"na2d: additional_values has shape \[1, 5, 2, 16\]; expected \[2, 5, 2, Dv\]"),
    (lambda q, k, v, a: mdn.na2d(q, k, v, 3, return_lse=1),
     r"na2d: return_lse=1: expected True or False"),
])
def test_bad_gqa_and_additional_kv_inputs_are_refused(make, message):
    q, k, v, ak, _ = _tensors((6, 7), 4, 2, 5)
    with pytest.raises(md.MaskDSLError, match=message):
        make(q, k, v, ak)


def test_gqa_additional_kv_and_lse_under_torch_compile_fullgraph():
    import torch._dynamo

    q, k, v, ak, av = (t.requires_grad_(True) for t in _tensors((6, 7), 4, 2, 5))

    def f(q, k, v, ak, av):
        out, lse = mdn.na2d(q, k, v, kernel_size=3, dilation=(2, 1), additional_keys=ak,
                            additional_values=av, return_lse=True)
        return (out * out).sum() + lse.sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v, ak, av)
    exp = f(q, k, v, ak, av)
    torch.testing.assert_close(got, exp)
    ins = [q, k, v, ak, av]
    for a, b in zip(torch.autograd.grad(got, ins), torch.autograd.grad(exp, ins)):
        torch.testing.assert_close(a, b)
