"""``maskdsl.nn``: attention layers equal the manual composition they claim to be.

``PatternAttention(x) == proj(reference.attention(split(qkv(x))))`` with the q/k/v channels
ordered [3, heads, head_dim] (NATTEN's and timm's order, so checkpoints transfer), checked in
fp64 to a tight tolerance on both input layouts ([B, *shape, dim] and [B, N, dim]) and for the
backends ``auto`` picks (dense up to 256 tokens, tiles above). Also: the NATTEN-compatible
modules train on CPU, round-trip their state_dict, register learnable score tensors, respect
``train()``/``eval()`` for attention dropout, and reject bad arguments with MaskDSLError.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import maskdsl as md
from maskdsl.nn import (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D,
    PatternAttention)


def manual(layer, x, pattern, shape, score=None, scale=None):
    """The layer by hand: qkv Linear, split [3, H, Dh], reference attention, proj Linear."""
    B, n, dim, H = x.shape[0], math.prod(shape), layer.qkv.in_features, layer.heads
    qkv = F.linear(x.reshape(B, n, dim), layer.qkv.weight, layer.qkv.bias)
    qkv = qkv.reshape(B, n, 3, H, dim // H)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))          # [B, H, N, Dh]
    out = md.reference.attention(q, k, v, pattern, shape, score=score, scale=scale)
    out = F.linear(out.transpose(1, 2).reshape(B, n, dim), layer.proj.weight, layer.proj.bias)
    return out.reshape(B, *shape, dim)


CASES = [
    # (pattern, shape, heads, dim, score, backend, kwargs); N > 256 runs tiles under auto
    (md.neighborhood((3, 5), dilation=(1, 2)) & md.causal(dims=(0,)), (7, 12), 3, 24,
     md.distance_decay(0.3) + md.softcap(10.0), "auto", {}),
    (md.window(4) | md.sink(2), (300,), 2, 16, md.alibi(), "auto", dict(qkv_bias=False)),
    (md.neighborhood(3, stride=2), (4, 5, 6), 2, 8, None, "tiles", dict(scale=0.5)),
    (md.block((4, 4)), (8, 10), 4, 16, None, "dense", dict(proj_bias=False)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]!r}-{c[1]}-{c[5]}")
def test_pattern_attention_equals_manual_composition(case):
    pattern, shape, heads, dim, score, backend, kwargs = case
    layer = PatternAttention(dim, heads, pattern, shape, score=score, backend=backend,
                             **kwargs).double()
    x = torch.randn(2, *shape, dim, dtype=torch.float64, requires_grad=True)
    expected = manual(layer, x, pattern, shape, score, scale=kwargs.get("scale"))

    got = layer(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    flat = layer(x.reshape(2, -1, dim))                       # [B, N, dim] in, [B, N, dim] out
    assert flat.shape == (2, math.prod(shape), dim)
    torch.testing.assert_close(flat, expected.reshape(flat.shape), atol=1e-12, rtol=1e-10)

    # gradients to the input and to every weight match the manual composition's
    w = torch.randn(got.shape, dtype=torch.float64)
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad((got * w).sum(), params)
    ref_grads = torch.autograd.grad((expected * w).sum(), params)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("cls,shape,kwargs", [
    (NeighborhoodAttention1D, (20,), dict(kernel_size=5, dilation=2, is_causal=True)),
    (NeighborhoodAttention2D, (9, 17), dict(kernel_size=(3, 5), stride=(1, 2), is_causal=(True, False))),
    (NeighborhoodAttention3D, (4, 5, 6), dict(kernel_size=(2, 3, 3), dilation=(1, 1, 2))),
])
def test_neighborhood_modules_equal_manual_composition(cls, shape, kwargs):
    layer = cls(embed_dim=16, num_heads=2, **kwargs).double().eval()
    x = torch.randn(2, *shape, 16, dtype=torch.float64)
    pattern = md.neighborhood(kwargs["kernel_size"], stride=kwargs.get("stride", 1),
                              dilation=kwargs.get("dilation", 1),
                              causal=kwargs.get("is_causal", False))
    torch.testing.assert_close(layer(x), manual(layer, x, pattern, shape), atol=1e-12, rtol=1e-10)
    assert (layer.embed_dim, layer.num_heads, layer.head_dim) == (16, 2, 8)
    assert len(layer.kernel_size) == len(shape) and len(layer.is_causal) == len(shape)


def test_neighborhood_module_compiles_once_per_grid_shape():
    layer = NeighborhoodAttention2D(16, 2, kernel_size=3)
    for shape in [(6, 7), (6, 7), (8, 5), (6, 7)]:
        assert layer(torch.randn(1, *shape, 16)).shape == (1, *shape, 16)
    assert sorted(layer._compiled) == [(6, 7), (8, 5)]
    assert layer.attention((6, 7)) is layer.attention((6, 7))


def test_neighborhood_attention_2d_trains_on_cpu():
    """A few SGD steps fit a teacher layer's output (tiles backend: 12 x 24 = 288 tokens)."""
    torch.manual_seed(0)
    args = dict(embed_dim=16, num_heads=2, kernel_size=(3, 5), dilation=(1, 2))
    teacher, student = NeighborhoodAttention2D(**args), NeighborhoodAttention2D(**args)
    x = torch.randn(2, 12, 24, 16)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(student(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert student.attention((12, 24)).backend == "tiles"
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_state_dict_round_trip():
    torch.manual_seed(1)
    args = dict(embed_dim=16, num_heads=4, kernel_size=3, stride=(1, 3), is_causal=(False, True))
    a, b = NeighborhoodAttention2D(**args).eval(), NeighborhoodAttention2D(**args).eval()
    x = torch.randn(2, 7, 9, 16)
    assert not torch.equal(a(x), b(x))
    state = a.state_dict()
    assert list(state) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]   # NATTEN's names
    b.load_state_dict(state)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    c = copy.deepcopy(a)                                       # compiled attention is rebuilt
    torch.testing.assert_close(c(x), a(x), atol=0, rtol=0)


def test_learnable_score_tensors_are_parameters():
    """A relative_bias table given as nn.Parameter is registered, saved and trained."""
    def make():
        table = torch.nn.Parameter(torch.zeros(2, 5, 5))
        return PatternAttention(16, 2, md.neighborhood(3), (6, 7), score=md.relative_bias(table))

    torch.manual_seed(2)
    a, b = make(), make()
    assert "score_params.0" in dict(a.named_parameters())
    x = torch.randn(1, 6, 7, 16)
    a(x).square().sum().backward()
    assert a.score_params[0].grad is not None and a.score_params[0].grad.abs().sum() > 0
    with torch.no_grad():
        a.score_params[0].normal_()
    b.load_state_dict(a.state_dict())
    assert b.score.table is b.score_params[0]                # the score sees the loaded values
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


def test_dropout_score_follows_train_and_eval():
    torch.manual_seed(3)
    pattern, shape = md.neighborhood((3, 3)), (5, 6)
    layer = PatternAttention(16, 2, pattern, shape, score=md.dropout(0.5, seed=1))
    plain = PatternAttention(16, 2, pattern, shape)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, *shape, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), plain(x), atol=0, rtol=0)
    layer.train()
    assert not torch.allclose(layer(x), plain(x))


@pytest.mark.parametrize("make,match", [
    (lambda: PatternAttention(10, 3, md.full(), (4,)),
     r"PatternAttention: dim=10 is not divisible by heads=3; expected dim = heads \* head_dim"),
    (lambda: PatternAttention(8, 0, md.full(), (4,)), r"PatternAttention: heads=0: expected a positive int"),
    (lambda: PatternAttention(8.0, 2, md.full(), (4,)), r"PatternAttention: dim=8.0: expected a positive int"),
    (lambda: PatternAttention(8, 2, "neighborhood(3)", (4,)),
     r"PatternAttention: pattern='neighborhood\(3\)': expected a pattern"),
    (lambda: PatternAttention(8, 2, md.full(), (4,), score=md.full()),
     r"PatternAttention: score=full\(\): expected score terms"),
    (lambda: PatternAttention(8, 2, md.neighborhood(5), (4, 4)),
     r"PatternAttention: neighborhood: kernel_size\[0\]=5 needs shape\[0\] >= 5, got 4"),
    (lambda: PatternAttention(8, 2, md.full(), (0, 4)), r"PatternAttention: shape\[0\]=0: expected a positive int"),
    (lambda: PatternAttention(8, 2, md.full(), (4,), backend="cuda"),
     r"PatternAttention: backend='cuda': expected one of 'auto', 'dense', 'flex', 'tiles'"),
    (lambda: PatternAttention(8, 2, md.full(), (4,), proj_drop=1.5),
     r"PatternAttention: proj_drop=1.5: expected a number in \[0, 1\)"),
    (lambda: NeighborhoodAttention2D(10, 4, 3),
     r"NeighborhoodAttention2D: embed_dim=10 is not divisible by num_heads=4"),
    (lambda: NeighborhoodAttention2D(8, 2, (3, 3, 3)),
     r"NeighborhoodAttention2D: kernel_size=\(3, 3, 3\) has 3 entries; expected an int or a tuple of 2 ints"),
    (lambda: NeighborhoodAttention1D(8, 2, 3, stride=4),
     r"NeighborhoodAttention1D: neighborhood: stride\[0\]=4 exceeds kernel_size\[0\]=3"),
])
def test_bad_arguments_raise(make, match):
    with pytest.raises(md.MaskDSLError, match=match):
        make()


@pytest.mark.parametrize("layer,x,match", [
    (PatternAttention(8, 2, md.neighborhood(3), (4, 5)), torch.zeros(1, 4, 5, 6),
     r"PatternAttention: x has shape \[1, 4, 5, 6\]; expected the last dim to be dim=8"),
    (PatternAttention(8, 2, md.neighborhood(3), (4, 5)), torch.zeros(1, 5, 4, 8),
     r"PatternAttention: x has shape \[1, 5, 4, 8\]; expected \[B, 4, 5, 8\] or \[B, 20, 8\]"),
    (PatternAttention(8, 2, md.neighborhood(3), (4, 5)), torch.zeros(1, 21, 8),
     r"expected \[B, 4, 5, 8\] or \[B, 20, 8\] for shape=\(4, 5\)"),
    (NeighborhoodAttention2D(8, 2, 3), torch.zeros(1, 20, 8),
     r"NeighborhoodAttention2D: x has shape \[1, 20, 8\] \(3-D\); expected a 4-D tensor \[B, X, Y, 8\]"),
    (NeighborhoodAttention2D(8, 2, 3), torch.zeros(1, 2, 6, 8),
     r"NeighborhoodAttention2D: neighborhood: kernel_size\[0\]=3 needs shape\[0\] >= 3, got 2"),
    (PatternAttention(8, 2, md.neighborhood(3), (4, 5)), [[0.0]],
     r"PatternAttention: x: expected a torch.Tensor"),
])
def test_bad_inputs_raise(layer, x, match):
    with pytest.raises(md.MaskDSLError, match=match):
        layer(x)
