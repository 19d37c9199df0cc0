"""The dense reference: what every pattern and score *means*, written straight from the
rules in DESIGN.md (Semantics), one small function per node.

This module is the oracle every backend is tested against. It is deliberately simple and
slow (it materialises ``[H, N, N]``) and shares no code with :mod:`maskdsl.codegen`: it only
uses the DSL nodes' parameter binding (``node.bind``), never generated code.

Functions:
    mask(p, shape, heads)      -> bool [H, N, N]
    bias(s, shape, heads)      -> float [H, N, N]  (the additive score terms)
    attention(q, k, v, p, shape, score=None, scale=None, dropout_keep=None) -> [B, H, N, D]
    dropout_mask(score, batch, heads, n)            -> bool [B, H, N, N]
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._errors import MaskDSLError
from ._inputs import check_qkv, check_scale
from ._node import check_heads, check_shape
from ._pattern import (And, Block, Causal, Document, Empty, Full, Heads, Neighborhood, Not, Or,
                       Pattern, Power, Radial, Sink, Window)
from ._score import (Alibi, DistanceDecay, Dropout, RelativeBias, Score, SinkLogit, Softcap,
                     geometric_slopes, score_terms)
from ._values import _is_tensor

__all__ = ["mask", "bias", "attention", "dropout_mask"]


class _Grid:
    """Query/key coordinates of a grid, broadcast as [N, 1] (query) and [1, N] (key)."""

    def __init__(self, shape: tuple, heads: int, device):
        self.shape, self.heads, self.device = shape, heads, device
        self.n = math.prod(shape)
        flat = torch.arange(self.n, device=device)
        self.flat_q, self.flat_k = flat[:, None], flat[None, :]
        coords, rest = [], flat
        for size in reversed(shape):  # row-major: the last dim varies fastest
            coords.append(rest % size)
            rest = rest // size
        coords.reverse()
        self.q = [c[:, None] for c in coords]
        self.k = [c[None, :] for c in coords]
        self._bound = {}

    def bound(self, node, h: int) -> dict:
        key = id(node)
        if key not in self._bound:
            self._bound[key] = (node, node.bind(self.shape, self.heads))
        return self._bound[key][1][h]


# ------------------------------------------------------------------------------ masks

def _neighborhood(p: dict, g: _Grid) -> torch.Tensor:
    allowed = torch.ones(g.n, g.n, dtype=torch.bool, device=g.device)
    for dim, length in enumerate(g.shape):
        K, s, d = p["kernel_size"][dim], p["stride"][dim], p["dilation"][dim]
        xq, xk = g.q[dim], g.k[dim]
        same_group = (xq % d) == (xk % d)
        i, j = xq // d, xk // d                       # in-group indices
        group_len = (length - xq % d + d - 1) // d    # ceil((L - g) / d)
        if p["causal"][dim]:
            leader = torch.minimum((i // s) * s + s - 1, group_len - 1)
            start = torch.clamp(leader - K + 1, min=0)
            ok = (start <= j) & (j <= i)
        else:
            wl = K // 2
            leader = torch.minimum((i // s) * s + s // 2, group_len - 1)
            start = torch.minimum(torch.clamp(leader - wl, min=0), group_len - K)
            ok = (start <= j) & (j < start + K)
        allowed &= same_group & ok
    return allowed


def _window(p: dict, g: _Grid) -> torch.Tensor:
    allowed = torch.ones(g.n, g.n, dtype=torch.bool, device=g.device)
    for dim in range(len(g.shape)):
        diff = g.k[dim] - g.q[dim]
        allowed &= (-p["left"][dim] <= diff) & (diff <= p["right"][dim])
    return allowed


def _causal(p: dict, g: _Grid) -> torch.Tensor:
    allowed = torch.ones(g.n, g.n, dtype=torch.bool, device=g.device)
    for dim in p["dims"]:
        allowed &= g.k[dim] <= g.q[dim]
    return allowed


def _block(p: dict, g: _Grid) -> torch.Tensor:
    allowed = torch.ones(g.n, g.n, dtype=torch.bool, device=g.device)
    for dim, size in enumerate(p["size"]):
        allowed &= (g.q[dim] // size) == (g.k[dim] // size)
    return allowed


def _sink(p: dict, g: _Grid) -> torch.Tensor:
    return (g.flat_k < p["n"]).expand(g.n, g.n)


def _document(p: dict, g: _Grid) -> torch.Tensor:
    ids = p["ids"]
    ids = ids.to(g.device) if _is_tensor(ids) else torch.tensor(ids, device=g.device)
    return ids[:, None] == ids[None, :]


def _radial(p: dict, g: _Grid) -> torch.Tensor:
    frames = g.shape[0]
    per_frame = math.prod(g.shape[1:])              # s: tokens per frame
    fq, fk = g.flat_q // per_frame, g.flat_k // per_frame
    a, b = g.flat_q % per_frame, g.flat_k % per_frame
    dist = (fq - fk).abs()
    # Per frame distance d: the band half-width w(d) and whether frame d is kept at all.
    width, kept = [0.0] * frames, [True] * frames
    for d in range(2, frames):
        base = 2 ** per_frame.bit_length() / 2 ** d.bit_length()
        width[d] = max(base * p["decay"], p["min_window"])
        kept[d] = base >= p["min_window"] or d % int(p["min_window"] / base) == 0
    width = torch.tensor(width, dtype=torch.float64, device=g.device)[dist]
    kept = torch.tensor(kept, dtype=torch.bool, device=g.device)[dist]
    near = (dist <= 1) | (fk < p["sink_frames"])
    return near | (((a - b).abs().double() <= width) & kept)


def _power(p: dict, g: _Grid) -> torch.Tensor:
    D = g.flat_q // p["block"] - g.flat_k // p["block"]
    return (D == 0) | ((D > 0) & ((D & (D - 1)) == 0))


_LEAF_RULES = {
    Neighborhood: _neighborhood, Window: _window, Causal: _causal, Block: _block, Sink: _sink,
    Document: _document, Radial: _radial, Power: _power,
}


def _mask_at(p: Pattern, h: int, g: _Grid) -> torch.Tensor:
    """bool [N, N]: which keys each query of head ``h`` may attend to."""
    if isinstance(p, Full):
        return torch.ones(g.n, g.n, dtype=torch.bool, device=g.device)
    if isinstance(p, Empty):
        return torch.zeros(g.n, g.n, dtype=torch.bool, device=g.device)
    if isinstance(p, And):
        return _mask_at(p.a, h, g) & _mask_at(p.b, h, g)
    if isinstance(p, Or):
        return _mask_at(p.a, h, g) | _mask_at(p.b, h, g)
    if isinstance(p, Not):
        return ~_mask_at(p.a, h, g)
    if isinstance(p, Heads):
        g.bound(p, h)  # checks len(patterns) == heads
        return _mask_at(p.patterns[h], h, g)
    rule = _LEAF_RULES.get(type(p))
    if rule is None:
        raise MaskDSLError(f"mask: expected a pattern, got {p!r}")
    return rule(g.bound(p, h), g)


def mask(p: Pattern, shape, heads: int = 1, device="cpu") -> torch.Tensor:
    """The boolean mask of a pattern: ``out[h, q, k]`` is True iff head ``h``'s query ``q`` may
    attend to key ``k`` (flat row-major token indices).

    Args:
        p: a pattern.
        shape: the token grid, 1 to 3 dims; N = prod(shape).
        heads: number of heads (per_head lists and heads([...]) must match it).
        device: where to build the mask.

    Returns:
        bool tensor [heads, N, N].
    """
    if not isinstance(p, Pattern):
        raise MaskDSLError(f"mask: expected a pattern, got {p!r}")
    g = _Grid(check_shape(shape), check_heads(heads), torch.device(device))
    return torch.stack([_mask_at(p, h, g) for h in range(g.heads)])


# ------------------------------------------------------------------------------ scores

def _value(v, h: int, like: torch.Tensor):
    """A score parameter for head h: a Python float, or an element of a (learnable) tensor."""
    if _is_tensor(v):
        flat = v.reshape(-1)
        return flat[h if flat.numel() > 1 else 0].to(like.dtype)
    return v


def _distance_decay(p: dict, h: int, g: _Grid, dtype) -> torch.Tensor:
    diffs = [(g.q[d] - g.k[d]).abs().to(dtype) for d in p["dims"]]
    metric = p["metric"]
    if metric == "euclidean":
        dist = torch.sqrt(sum(x * x for x in diffs))
    elif metric == "manhattan":
        dist = sum(diffs)
    else:
        dist = diffs[0]
        for x in diffs[1:]:
            dist = torch.maximum(dist, x)
    dist = dist.expand(g.n, g.n)
    return -_value(p["rate"], h, dist) * dist


def _alibi(p: dict, h: int, g: _Grid, dtype) -> torch.Tensor:
    dist = (g.flat_q - g.flat_k).abs().to(dtype)
    slope = geometric_slopes(g.heads)[h] if p["slopes"] == "geometric" else _value(p["slopes"], h, dist)
    return -slope * dist


def _relative_bias(p: dict, h: int, g: _Grid, dtype) -> torch.Tensor:
    table = p["table"] if p["shared"] else p["table"][h]
    index = tuple(
        torch.clamp(g.k[d] - g.q[d], -r, r).expand(g.n, g.n) + r for d, r in enumerate(p["radius"])
    )
    return table.to(device=g.device, dtype=dtype)[index]


_BIAS_RULES = {DistanceDecay: _distance_decay, Alibi: _alibi, RelativeBias: _relative_bias}


def _bias(s, g: _Grid, dtype) -> Optional[torch.Tensor]:
    out = None
    for term in score_terms(s):
        rule = _BIAS_RULES.get(type(term))
        if rule is None:
            continue  # softcap, sink_logit and dropout are not additive
        b = torch.stack([rule(g.bound(term, h), h, g, dtype) for h in range(g.heads)])
        out = b if out is None else out + b
    return out


def bias(s: Score, shape, heads: int = 1, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The additive part of a score: ``out[h, q, k]`` is what the terms ``distance_decay``,
    ``alibi`` and ``relative_bias`` add to head ``h``'s logit for (q, k). ``softcap``,
    ``sink_logit`` and ``dropout`` are applied by :func:`attention`, not here.

    Returns:
        float tensor [heads, N, N] (zeros when the score has no additive term);
        differentiable with respect to tensor-valued parameters.
    """
    if s is not None and not isinstance(s, Score):
        raise MaskDSLError(f"bias: expected a score term, got {s!r}")
    g = _Grid(check_shape(shape), check_heads(heads), torch.device(device))
    _bind_all(s, g)
    out = _bias(s, g, dtype)
    return torch.zeros(g.heads, g.n, g.n, dtype=dtype, device=g.device) if out is None else out


def _bind_all(s, g: _Grid):
    for term in score_terms(s):
        g.bound(term, 0)


def _find(s, cls):
    for t in score_terms(s):
        if isinstance(t, cls):
            return t
    return None


# ------------------------------------------------------------------------------ attention

def dropout_mask(score: Optional[Score], batch: int, heads: int, n: int, device="cpu",
                 generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """The keep mask of the score's ``dropout`` term: bool [B, H, N, N], True = kept, drawn on
    the CPU from ``generator`` (default: a generator seeded with the term's ``seed``), so the
    same seed gives the same mask on every device. None when there is no dropout term."""
    term = _find(score, Dropout)
    if term is None:
        return None
    g = generator if generator is not None else torch.Generator().manual_seed(term.seed)
    u = torch.rand(batch, heads, n, n, generator=g)
    p = torch.tensor([b["p"] for b in term.bind((n,), heads)], dtype=torch.float64)
    return (u.double() >= p[None, :, None, None]).to(device)


def attention(q, k, v, p: Pattern, shape, score: Optional[Score] = None, scale=None,
              dropout_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense masked attention, the definition every backend must reproduce.

    ``softmax(q k^T * scale + bias, masked by p)``, then ``softcap`` (applied after the additive
    terms), ``sink_logit`` (one extra logit per head in the denominator) and ``dropout`` (on the
    probabilities, kept entries scaled by 1/(1-p)). A query with no allowed key gets zeros.

    Args:
        q, k, v: [B, H, N, D] (v may have its own head dim), one dtype and device; computed in
            float64 for float64 inputs and float32 otherwise, returned in the input dtype.
        p: the pattern; shape: the token grid (N = prod(shape)).
        score: score terms, or None.
        scale: logit scale, default 1/sqrt(D).
        dropout_keep: bool [B, H, N, N] keep mask for the score's dropout term; default: drawn
            by :func:`dropout_mask` from the term's seed. Ignored without a dropout term.

    Returns:
        [B, H, N, Dv] in q's dtype; differentiable in q, k, v and tensor-valued score parameters.
    """
    if not isinstance(p, Pattern):
        raise MaskDSLError(f"attention: p={p!r}: expected a pattern")
    if score is not None and not isinstance(score, Score):
        raise MaskDSLError(f"attention: score={score!r}: expected score terms or None")
    shape = check_shape(shape)
    B, H, N, D = check_qkv(q, k, v, shape)
    g = _Grid(shape, H, q.device)
    allowed = torch.stack([_mask_at(p, h, g) for h in range(H)])
    _bind_all(score, g)
    check_params_device(score, q.device)
    if _find(score, Dropout) is not None and dropout_keep is None:
        dropout_keep = dropout_mask(score, B, H, N, q.device)
    return masked_attention(q, k, v, allowed, lambda dt: _bias(score, g, dt), score,
                            check_scale(scale, D), dropout_keep)


def check_params_device(score, device):
    for term in score_terms(score):
        for name, v in vars(term).items():
            if _is_tensor(v) and v.device != device:
                raise MaskDSLError(
                    f"{term._name}: {name} is on {v.device} but q is on {device}; move it with "
                    f".to({str(device)!r})"
                )


def masked_attention(q, k, v, allowed, bias_fn, score, scale: float, keep=None):
    """Softmax attention given the bool mask ``allowed`` [H, N, N]; ``bias_fn(dtype)`` returns the
    additive bias [H, N, N] or None. Shared by :func:`attention` and the dense backend."""
    B, H, N, _ = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bhqd,bhkd->bhqk", q.to(dt), k.to(dt)) * scale
    b = bias_fn(dt)
    if b is not None:
        logits = logits + b
    cap = _find(score, Softcap)
    if cap is not None:
        caps = torch.stack([torch.as_tensor(_value(c["cap"], h, logits), dtype=dt, device=q.device)
                            for h, c in enumerate(cap.bind((N,), H))])[None, :, None, None]
        logits = caps * torch.tanh(logits / caps)
    logits = logits.masked_fill(~allowed, float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    sink = _find(score, SinkLogit)
    if sink is not None:
        sinks = torch.stack([torch.as_tensor(_value(s["values"], h, logits), dtype=dt, device=q.device)
                             for h, s in enumerate(sink.bind((N,), H))])[None, :, None, None]
        m = torch.maximum(m, sinks)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(logits - m)                           # masked entries: exp(-inf) = 0
    denom = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sinks - m)
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    drop = _find(score, Dropout)
    if drop is not None and keep is not None:
        if keep.dtype != torch.bool or keep.shape != (B, H, N, N):
            raise MaskDSLError(
                f"dropout_keep: expected a bool tensor of shape {[B, H, N, N]}, got "
                f"{keep.dtype} {list(keep.shape)}"
            )
        ps = torch.tensor([b["p"] for b in drop.bind((N,), H)], dtype=dt, device=q.device)
        probs = probs * keep.to(q.device) / (1 - ps)[None, :, None, None]
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v.to(dt))
    return out.to(q.dtype)
