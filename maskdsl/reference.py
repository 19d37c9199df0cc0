"""The dense reference: what every pattern and score *means*, written straight from the
rules in ARCHITECTURE.md (Semantics), one small function per node.

This module is the oracle every backend is tested against. It is deliberately simple and
slow (it materialises ``[H, N, N]``) and shares no code with :mod:`maskdsl.codegen`: it only
uses the DSL nodes' parameter binding (``node.bind``), never generated code.

Functions:
    mask(p, shape, heads)      -> bool [H, N, N]
    bias(s, shape, heads)      -> float [H, N, N]  (the additive score terms)
    attention(q, k, v, p, shape, score=None, scale=None, dropout_keep=None, rows=None,
              return_lse=False) -> [B, H, N, D] (and lse [B, H, N])
    dropout_mask(score, batch, heads, n)            -> bool [B, H, N, N]
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from maskdsl.dsl.inputs import check_count, check_device, check_qkv, check_scale
from maskdsl.dsl.node import call_user, check_heads, check_shape
from ._errors import MaskDSLError
from ._memory import check_allocation, guard, guarded
from maskdsl.dsl.pattern import (And, Block, Causal, Document, Empty, Full, Heads, MaskFn,
    Neighborhood, Not, Or, Pattern, Power, Radial, Sink, Window, check_key_range_result)
from maskdsl.dsl.score import (Alibi, DistanceDecay, Dropout, RelativeBias, Score, ScoreFn,
    SinkLogit, Softcap, check_params_device, check_tensor_params, geometric_slopes, score_terms)
from maskdsl.dsl.extent import check_extent
from maskdsl.dsl.values import _is_tensor

__all__ = ["mask", "bias", "attention", "dropout_mask"]


class _Grid:
    """Query/key coordinates of a grid, broadcast as [N, 1] (query) and [1, N] (key)."""

    def __init__(self, shape: tuple, heads: int, device, rows=None):
        self.shape, self.heads, self.device = shape, heads, device
        self.n = math.prod(shape)
        flat = torch.arange(self.n, device=device)
        qflat = flat if rows is None else rows.to(device)
        self.nq = len(qflat)
        self.flat_q, self.flat_k = qflat[:, None], flat[None, :]
        self.q = [c[:, None] for c in self._coords(qflat)]
        self.k = [c[None, :] for c in self._coords(flat)]
        self._bound = {}

    def _coords(self, flat):
        coords, rest = [], flat
        for size in reversed(self.shape):  # row-major: the last dim varies fastest
            coords.append(rest % size)
            rest = rest // size
        return coords[::-1]

    def full(self, value: bool) -> torch.Tensor:
        """bool [queries, N] filled with ``value``."""
        return torch.full((self.nq, self.n), value, dtype=torch.bool, device=self.device)

    def bound(self, node, h: int) -> dict:
        key = id(node)
        if key not in self._bound:
            self._bound[key] = (node, node.bind(self.shape, self.heads))
        return self._bound[key][1][h]


# ------------------------------------------------------------------------------ masks
# One rule per node type: ``_mask(node, h, grid)`` -> bool [queries, N]. A new pattern registers
# its rule here (the reference's own reading of ARCHITECTURE.md, shared with nothing else).

@functools.singledispatch
def _mask(p, h: int, g: "_Grid") -> torch.Tensor:
    raise MaskDSLError(f"mask: expected a pattern, got {p!r}")


def _leaf(cls):
    """Register a leaf rule ``rule(bound_params, grid)`` for ``cls`` (parameters bound per head)."""
    def deco(rule):
        _mask.register(cls)(lambda p, h, g: rule(g.bound(p, h), g))
        return rule
    return deco

@_leaf(Neighborhood)
def _neighborhood(p: dict, g: _Grid) -> torch.Tensor:
    allowed = g.full(True)
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


@_leaf(Window)
def _window(p: dict, g: _Grid) -> torch.Tensor:
    allowed = g.full(True)
    for dim in range(len(g.shape)):
        diff = g.k[dim] - g.q[dim]
        allowed &= (-p["left"][dim] <= diff) & (diff <= p["right"][dim])
    return allowed


@_leaf(Causal)
def _causal(p: dict, g: _Grid) -> torch.Tensor:
    allowed = g.full(True)
    for dim in p["dims"]:
        allowed &= g.k[dim] <= g.q[dim]
    return allowed


@_leaf(Block)
def _block(p: dict, g: _Grid) -> torch.Tensor:
    allowed = g.full(True)
    for dim, (size, shift) in enumerate(zip(p["size"], p["shift"])):
        allowed &= (g.q[dim] + size - shift) // size == (g.k[dim] + size - shift) // size
    return allowed


@_leaf(Sink)
def _sink(p: dict, g: _Grid) -> torch.Tensor:
    return (g.flat_k < p["n"]).expand(g.nq, g.n)


@_leaf(Document)
def _document(p: dict, g: _Grid) -> torch.Tensor:
    ids = p["ids"]
    ids = ids.to(g.device) if _is_tensor(ids) else torch.tensor(ids, device=g.device)
    return ids[g.flat_q[:, 0]][:, None] == ids[None, :]


@_leaf(Radial)
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


@_leaf(Power)
def _power(p: dict, g: _Grid) -> torch.Tensor:
    D = g.flat_q // p["block"] - g.flat_k // p["block"]
    return (D == 0) | ((D > 0) & ((D & (D - 1)) == 0))


@_mask.register(MaskFn)
def _mask_fn(p, h, g):
    """The user's function on the flat index grids: ``fn(0, h, q [queries, 1], k [1, N])``,
    broadcast int64 tensors on the grid's device. A ``key_range`` is a promise (a superset of
    each query's keys): an allowed pair outside it is an error, never silently dropped."""
    g.bound(p, h)                                   # binds and probes fn on a few tokens
    zero = torch.zeros((), dtype=torch.int64, device=g.device)
    head = torch.full((), h, dtype=torch.int64, device=g.device)
    out = call_user(p, "fn", p.fn, (zero, head, g.flat_q, g.flat_k),
                    f"on the flat index grids (head {h})")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise MaskDSLError(f"{p!r}: fn returned {got} on the flat index grids (head {h}); "
                           f"expected a bool tensor")
    try:
        allowed = out.to(g.device).expand(g.nq, g.n)
    except RuntimeError:
        raise MaskDSLError(f"{p!r}: fn returned shape {list(out.shape)} on the flat index grids "
                           f"(head {h}); expected a bool tensor broadcastable to "
                           f"[{g.nq}, {g.n}]") from None
    if p.key_range is not None:
        r = call_user(p, "key_range", p.key_range, (g.flat_q[:, 0],),
                      f"with the int64 tensor of flat query indices [{g.nq}]")
        lo, hi = (x[:, None] for x in check_key_range_result(p, r, g.flat_q[:, 0]))
        outside = allowed & ((g.flat_k < lo) | (g.flat_k >= hi))
        if bool(outside.any()):
            i, j = (int(x) for x in torch.nonzero(outside)[0])
            q = int(g.flat_q[i, 0])
            raise MaskDSLError(
                f"{p!r}: key_range is not a superset of fn's keys: fn allows query {q} -> key "
                f"{j} (head {h}) but key_range gives [{int(lo[i, 0])}, {int(hi[i, 0])}); widen "
                f"key_range or drop it")
    return allowed


@_mask.register(Full)
def _full(p, h, g):
    return g.full(True)


@_mask.register(Empty)
def _empty(p, h, g):
    return g.full(False)


@_mask.register(And)
def _and(p, h, g):
    out = _mask(p.parts[0], h, g)
    for x in p.parts[1:]:         # a & b & c: the chain's parts, left to right
        out = out & _mask(x, h, g)
    return out


@_mask.register(Or)
def _or(p, h, g):
    out = _mask(p.parts[0], h, g)
    for x in p.parts[1:]:
        out = out | _mask(x, h, g)
    return out


@_mask.register(Not)
def _not(p, h, g):
    return ~_mask(p.a, h, g)


@_mask.register(Heads)
def _heads(p, h, g):
    g.bound(p, h)  # checks len(patterns) == heads
    return _mask(p.patterns[h], h, g)


def _mask_at(p: Pattern, h: int, g: _Grid) -> torch.Tensor:
    """bool [queries, N]: which keys each query of head ``h`` may attend to."""
    return _mask(p, h, g)


def mask(p: Pattern, shape, heads: int = 1, device="cpu", rows=None) -> torch.Tensor:
    """The boolean mask of a pattern: ``out[h, q, k]`` is True iff head ``h``'s query ``q`` may
    attend to key ``k`` (flat row-major token indices).

    Args:
        p: a pattern.
        shape: the token grid, 1 to 3 dims; N = prod(shape).
        heads: number of heads (per_head lists and heads([...]) must match it).
        device: where to build the mask.
        rows: only these queries (flat indices, a list or int tensor), in this order: the mask
            of a few rows of a large grid costs O(rows x N), not O(N^2).

    Returns:
        bool tensor [heads, N, N] (or [heads, len(rows), N]).
    """
    if not isinstance(p, Pattern):
        raise MaskDSLError(f"mask: expected a pattern, got {p!r}")
    shape = check_shape(shape)
    g = _Grid(shape, check_heads(heads), check_device(device), _check_rows(rows, shape))
    check_allocation(f"reference.mask of {g.heads} x {g.nq} x {g.n} pairs", 4 * g.heads * g.nq * g.n,
                     "ask for a few query rows with rows=[...], or use md.compile(...) (its "
                     "tile classes and BlockMask are O(tiles))")
    with guarded("reference.mask"):
        return torch.stack([_mask_at(p, h, g) for h in range(g.heads)])


def _check_rows(rows, shape):
    if rows is None:
        return None
    n = math.prod(shape)
    t = torch.as_tensor(rows) if not _is_tensor(rows) else rows
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise MaskDSLError("mask: rows: expected a 1-D list or tensor of flat query indices")
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= n):
        raise MaskDSLError(f"mask: rows: indices must lie in [0, {n}), got "
                           f"{int(t.min())}..{int(t.max())}")
    return t.long().cpu()


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
    dist = dist.expand(g.nq, g.n)
    return -_value(p["rate"], h, dist) * dist


def _alibi(p: dict, h: int, g: _Grid, dtype) -> torch.Tensor:
    dist = (g.flat_q - g.flat_k).abs().to(dtype)
    slope = geometric_slopes(g.heads)[h] if p["slopes"] == "geometric" else _value(p["slopes"], h, dist)
    return -slope * dist


def _relative_bias(p: dict, h: int, g: _Grid, dtype) -> torch.Tensor:
    table = p["table"] if p["shared"] else p["table"][h]
    index = tuple(
        torch.clamp(g.k[d] - g.q[d], -r, r).expand(g.nq, g.n) + r for d, r in enumerate(p["radius"])
    )
    return table.to(device=g.device, dtype=dtype)[index]


#: the additive score terms' rules: ``rule(bound_params, h, grid, dtype)`` -> [queries, N]
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
    g = _Grid(check_shape(shape), check_heads(heads), check_device(device))
    _bind_all(s, g)
    check_allocation(f"reference.bias of {g.heads} x {g.n} x {g.n} pairs", 24 * g.heads * g.n * g.n)
    with guarded("reference.bias"):
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
    if score is not None and not isinstance(score, Score):
        raise MaskDSLError(f"dropout_mask: score={score!r}: expected score terms or None")
    batch = check_count("dropout_mask: batch", batch)
    heads = check_heads(heads)
    n = check_count("dropout_mask: n", n, lo=1)
    device = check_device(device, "dropout_mask: device")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise MaskDSLError(f"dropout_mask: generator={generator!r}: expected a torch.Generator or None")
    term = _find(score, Dropout)
    if term is None:
        return None
    g = generator if generator is not None else torch.Generator().manual_seed(term.seed)
    u = torch.rand(batch, heads, n, n, generator=g)
    p = torch.tensor([b["p"] for b in term.bind((n,), heads)], dtype=torch.float64)
    return (u.double() >= p[None, :, None, None]).to(device)


def attention(q, k, v, p: Pattern, shape, score: Optional[Score] = None, scale=None,
              dropout_keep: Optional[torch.Tensor] = None, rows=None, return_lse: bool = False,
              extra_tokens: int = 0, extra: str = "all", q_range=None, kv_range=None):
    """Dense masked attention, the definition every backend must reproduce.

    ``softmax(q k^T * scale + bias, masked by p)``, then ``softcap`` (applied after the additive
    terms), ``sink_logit`` (one extra logit per head in the denominator) and ``dropout`` (on the
    probabilities, kept entries scaled by 1/(1-p)). A query with no allowed key gets zeros.

    Args:
        q, k, v: [B, H, N, D] (v may have its own head dim), one dtype and device; computed in
            float64 for float64 inputs and float32 otherwise, returned in the input dtype. k and
            v may have H_kv heads dividing H (grouped-query attention): query head i reads
            key/value head i // (H // H_kv).
        p: the pattern; shape: the token grid (N = prod(shape)).
        score: score terms, or None.
        scale: logit scale, default 1/sqrt(D).
        dropout_keep: bool [B, H, N, N] keep mask for the score's dropout term; default: drawn
            by :func:`dropout_mask` from the term's seed. Ignored without a dropout term.
        rows: only these query rows (flat indices, in this order): the output is
            [B, H, len(rows), Dv] and costs O(rows x N) memory, computed a few rows at a time.
        return_lse: also return the log-sum-exp [B, H, Nq]: the natural log of each row's
            softmax denominator (sink logits included, dropout not), -inf for a row with no key,
            NaN for a poisoned row; float64 for float64 inputs, float32 otherwise.
            :func:`maskdsl.merge` combines such pairs over disjoint key sets.
        extra_tokens, extra: E tokens after the grid's (q, k, v hold N + E tokens; with
            ``extra="keys"`` only k and v do): every grid query attends its pattern's grid
            keys and every extra key, every extra query attends every key; the additive score
            terms apply to grid x grid pairs only, softcap and sink_logit to every row.
        q_range, kv_range: (start, end) flat ranges of the global grid: q holds the queries
            ``start..end``, k and v the keys of theirs; the pattern and score are evaluated at
            global coordinates.

    Returns:
        [B, H, N, Dv] (or [B, H, len(rows), Dv]) in q's dtype; differentiable in q, k, v and
        tensor-valued score parameters.
    """
    if not isinstance(p, Pattern):
        raise MaskDSLError(f"attention: p={p!r}: expected a pattern")
    if score is not None and not isinstance(score, Score):
        raise MaskDSLError(f"attention: score={score!r}: expected score terms or None")
    shape = check_shape(shape)
    ext = check_extent(shape, extra_tokens, extra, q_range, kv_range, score)
    B, H, N, D = check_qkv(q, k, v, shape, extent=ext)
    if k.shape[1] != H:        # GQA: query head i reads key/value head i // (H // H_kv)
        k, v = (x.repeat_interleave(H // k.shape[1], dim=1) for x in (k, v))
    rows = _check_rows(rows, shape)
    check_params_device(score, q.device)
    check_tensor_params(score)
    if not ext.square:
        if rows is not None:
            raise MaskDSLError(f"attention: rows= with {ext.describe()}: expected one or the "
                               f"other")
        out, lse = _attention_extent(q, k, v, p, shape, score, check_scale(scale, D), ext)
        return (out, lse) if return_lse else out
    if _find(score, Dropout) is not None and dropout_keep is None:
        if rows is not None:
            raise MaskDSLError("attention: rows= with a dropout term needs dropout_keep= (the "
                               "keep mask of all N x N pairs the rows are taken from)")
        dropout_keep = dropout_mask(score, B, H, N, q.device)
    if dropout_keep is not None and _find(score, Dropout) is not None and (
            dropout_keep.dtype != torch.bool or dropout_keep.shape != (B, H, N, N)):
        raise MaskDSLError(f"dropout_keep: expected a bool tensor of shape {[B, H, N, N]}, got "
                           f"{dropout_keep.dtype} {list(dropout_keep.shape)}")
    scale = check_scale(scale, D)
    # Non-finite inputs (ARCHITECTURE.md, "Non-finite inputs"): a query is poisoned (its row is
    # NaN) when its q row, or the k or v row of a key it attends, holds a NaN or inf; every
    # other row is computed from finite values only.
    bad_q = ~torch.isfinite(q).all(-1)
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    q, k, v = (torch.where(bad[..., None], zero, x) if x.is_meta or bool(bad.any()) else x
               for bad, x in ((bad_q, q), (bad_kv, k), (bad_kv, v)))
    if rows is None:
        check_dense_size("reference.attention", B, H, N, q.dtype)
        out, lse = _attention_rows(q, k, v, p, shape, score, scale, dropout_keep, None, bad_q,
                                   bad_kv)
        return (out, lse) if return_lse else out
    chunk = max(1, 2 ** 22 // max(1, B * H * N))       # rows per step: ~4M logits at a time
    parts = [_attention_rows(q, k, v, p, shape, score, scale, dropout_keep, rows[i:i + chunk],
                             bad_q, bad_kv) for i in range(0, len(rows), chunk)]
    if not parts:
        out = q.new_zeros(B, H, 0, v.shape[3])
        lse = torch.zeros(B, H, 0, dtype=torch.float64 if q.dtype == torch.float64
                          else torch.float32, device=q.device)
    else:
        out, lse = torch.cat([o for o, _ in parts], 2), torch.cat([x for _, x in parts], 2)
    return (out, lse) if return_lse else out


def _attention_extent(q, k, v, p, shape, score, scale, ext):
    """attention() with extra tokens or sub-ranges, read straight from their definition: the
    mask and bias over the whole (queries x keys) rectangle, built from the grid's."""
    H, dev = q.shape[1], q.device
    N = ext.n
    if ext.extra:
        g = _Grid(shape, H, dev)
        grid = torch.stack([_mask_at(p, h, g) for h in range(H)])         # [H, N, N]
        nq, nk = ext.nq, ext.nk
        allowed = torch.ones(H, nq, nk, dtype=torch.bool, device=dev)
        allowed[:, :N, :N] = grid                                         # the rest: every key

        def bias_fn(dt):
            b = _bias(score, g, dt)
            if b is None:
                return None
            out = torch.zeros(H, nq, nk, dtype=b.dtype, device=dev)
            out[:, :N, :N] = b                                            # grid x grid only
            return out
        flat = None
    else:
        q0, q1 = ext.q if ext.q is not None else (0, N)
        k0, k1 = ext.kv if ext.kv is not None else (0, N)
        g = _Grid(shape, H, dev, rows=torch.arange(q0, q1))
        allowed = torch.stack([_mask_at(p, h, g) for h in range(H)])[:, :, k0:k1]

        def bias_fn(dt):
            b = _bias(score, g, dt)
            return None if b is None else b[:, :, k0:k1]
        flat = (g.flat_q, g.flat_k[:, k0:k1])
    _bind_all(score, g)
    check_allocation(f"reference.attention on {q.shape[0]} x {H} x {allowed.shape[1]} x "
                     f"{allowed.shape[2]} logits",
                     5 * 8 * q.shape[0] * H * allowed.shape[1] * allowed.shape[2],
                     "use a smaller batch or grid")
    bad_q = ~torch.isfinite(q).all(-1)
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    zero = torch.zeros((), dtype=q.dtype, device=dev)
    q, k, v = (torch.where(bad[..., None], zero, x) for bad, x in ((bad_q, q), (bad_kv, k),
                                                                  (bad_kv, v)))
    out, lse = masked_attention(q, k, v, allowed, bias_fn, score, scale, flat=flat,
                                return_lse=True)
    poisoned = bad_q | (allowed[None] & bad_kv[:, :, None, :]).any(-1)
    return (out.masked_fill(poisoned[..., None], float("nan")),
            lse.masked_fill(poisoned, float("nan")))


def _attention_rows(q, k, v, p, shape, score, scale, keep, rows, bad_q, bad_kv):
    """attention() for the query ``rows`` (None: all) on sanitised q, k, v."""
    H = q.shape[1]
    g = _Grid(shape, H, q.device, rows)
    with guarded("reference.attention"):
        allowed = torch.stack([_mask_at(p, h, g) for h in range(H)])
    _bind_all(score, g)
    if rows is not None:
        rows = rows.to(q.device)
        q, bad_q = q[:, :, rows], bad_q[:, :, rows]
        keep = keep[:, :, rows] if keep is not None else None
    out, lse = masked_attention(q, k, v, allowed, lambda dt: _bias(score, g, dt), score, scale,
                                keep, flat=(g.flat_q, g.flat_k), return_lse=True)
    poisoned = bad_q | (allowed[None] & bad_kv[:, :, None, :]).any(-1)
    return (out.masked_fill(poisoned[..., None], float("nan")),
            lse.masked_fill(poisoned, float("nan")))


def check_dense_size(what: str, B: int, H: int, N: int, dtype) -> None:
    """Dense attention holds about five [B, H, N, N] tensors (logits, bias, exponentials,
    probabilities, masks): refuse what cannot fit, before allocating any of it."""
    item = 8 if dtype == torch.float64 else 4
    check_allocation(f"{what} on {B} x {H} x {N} x {N} logits", 5 * item * B * H * N * N,
                     "use a smaller batch or grid, or backend='tiles' (O(N x keys per query))")


@guard("dense attention")
def _score_fns(score, logits, flat):
    """Each ``score_fn`` term in the order written, on the logits [B, H, R, N] with the queries'
    and keys' flat indices ``flat`` = ([R, 1], [1, N]), b = 0 and the head broadcast."""
    for term in score_terms(score):
        if isinstance(term, ScoreFn):
            B, H = logits.shape[:2]
            qf, kf = flat
            zero = torch.zeros((), dtype=torch.int64, device=logits.device)
            h = torch.arange(H, device=logits.device).reshape(1, H, 1, 1)
            args = (logits, zero, h, qf.to(logits.device)[None, None],
                    kf.to(logits.device)[None, None])
            out = call_user(term, "fn", term.fn, args, lambda a: (
                f"when called with score {list(a[0].shape)}, q_idx {list(a[3].shape)}, kv_idx "
                f"{list(a[4].shape)} (the reference)"), grad=True)   # fn may hold learnable tensors
            logits = out.to(logits.dtype).expand(logits.shape)
    return logits


def masked_attention(q, k, v, allowed, bias_fn, score, scale: float, keep=None, flat=None,
                     return_lse: bool = False):
    """Softmax attention given the bool mask ``allowed`` [H, N, N]; ``bias_fn(dtype)`` returns the
    additive bias [H, N, N] or None. Shared by :func:`attention` and the dense backend."""
    B, H, N, _ = q.shape
    Nk = k.shape[2]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = torch.einsum("bhqd,bhkd->bhqk", q.to(dt), k.to(dt)) * scale
    b = bias_fn(dt)
    if b is not None:
        logits = logits + b
    if flat is not None:
        logits = _score_fns(score, logits, flat)
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
    # a row with no key divides 0 by 1; a NaN (sink logit) stays NaN, never becomes 1
    probs = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    drop = _find(score, Dropout)
    if drop is not None and keep is not None:
        if keep.dtype != torch.bool or keep.shape != (B, H, N, Nk):
            raise MaskDSLError(
                f"dropout_keep: expected a bool tensor of shape {[B, H, N, Nk]}, got "
                f"{keep.dtype} {list(keep.shape)}"
            )
        ps = torch.tensor([b["p"] for b in drop.bind((N,), H)], dtype=dt, device=q.device)
        probs = probs * keep.to(q.device) / (1 - ps)[None, :, None, None]
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v.to(dt))
    if not return_lse:
        return out.to(q.dtype)
    # log of the softmax denominator (sink logits included): -inf for a row with no key
    lse = (m + torch.log(denom)).squeeze(-1)
    return out.to(q.dtype), lse
