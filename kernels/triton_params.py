"""What the Triton kernel needs to know about a pattern: a few integers per dim and head.

The kernel has no BlockMask. It evaluates each query's key range in-kernel from these numbers,
so the metadata is O(heads x dims) whatever the sequence length. A pattern lowers when it is

    core | sink(n) | ...        where core is an ``&`` of neighborhood, window, causal, block,
                                full (or empty), and heads([...]) may pick a different one per head.

Per dim, the key set of a query at coordinate ``x`` is the keys ``k`` with ``k % d == x % d``
(``d``: the neighborhood's dilation, 1 without one) whose in-group index lies in
``[jlo(x), jhi(x)]``, the intersection of NATTEN's window (kernel, stride, dilation, causal), the
window offsets ``[x - left, x + right]`` (causal is ``right = 0``) and the block of ``x``. Both
ends are non-decreasing in ``x``, which is what lets the backward kernel find a key tile's
queries by binary search. All of that is in the kernel; this module only collects the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch

from .._errors import MaskDSLError
from .._pattern import And, Block, Causal, Empty, Full, Heads, Neighborhood, Or, Sink, Window

__all__ = ["DimParams", "HeadParams", "lower_pattern", "check_score", "pack", "OFF", "FIELDS"]

OFF = 1 << 28          # "no limit" for window offsets (int32-safe when added to a coordinate)
FIELDS = ("kernel", "stride", "dilation", "causal", "left", "right", "block")


@dataclass
class DimParams:
    kernel: int = 0        # 0: no neighborhood on this dim
    stride: int = 1
    dilation: int = 1
    causal: int = 0
    left: int = OFF        # keys k with x - left <= k <= x + right
    right: int = OFF
    block: int = 0         # 0: no block

    def as_list(self) -> list:
        return [getattr(self, f) for f in FIELDS]


@dataclass
class HeadParams:
    dims: List[DimParams]  # always 3, leading dims padded for 1-D/2-D grids
    sink: int = 0


def _unsupported(node, why: str = "") -> MaskDSLError:
    return MaskDSLError(
        f"backend='triton': the Triton kernel cannot express {node!r}{why}; it runs an & of "
        f"neighborhood, window, causal, block (optionally | sink(n), per head via heads([...])); "
        f"use backend='flex' or backend='tiles'"
    )


def _merge_leaf(node, bound: dict, dims: List[DimParams], off: int, shape: tuple):
    """AND one leaf into the per-dim parameters (``off``: padded leading dims)."""
    if isinstance(node, Full):
        return
    if isinstance(node, Empty):
        for d in dims:            # an empty key interval on every dim
            d.left, d.right = -1, -1
        return
    if isinstance(node, Neighborhood):
        for i, K in enumerate(bound["kernel_size"]):
            d = dims[off + i]
            new = (K, bound["stride"][i], bound["dilation"][i], int(bool(bound["causal"][i])))
            if d.kernel and (d.kernel, d.stride, d.dilation, d.causal) != new:
                raise _unsupported(node, " AND-ed with another neighborhood on the same dim")
            d.kernel, d.stride, d.dilation, d.causal = new
        return
    if isinstance(node, Window):
        for i, (lft, rgt) in enumerate(zip(bound["left"], bound["right"])):
            d = dims[off + i]
            S = shape[i]   # offsets beyond S - 1 mean "no limit": clamp (int32 in the kernel)
            d.left, d.right = min(d.left, lft, S), min(d.right, rgt, S)
        return
    if isinstance(node, Causal):
        for i in bound["dims"]:
            dims[off + i].right = min(dims[off + i].right, 0)
        return
    if isinstance(node, Block):
        for i, size in enumerate(bound["size"]):
            d = dims[off + i]
            if d.block and d.block != size:
                raise _unsupported(node, " AND-ed with another block size on the same dim")
            d.block = size
        return
    raise _unsupported(node)


def _core(node, h: int, bound, dims, off, shape):
    if isinstance(node, And):
        _core(node.a, h, bound, dims, off, shape)
        _core(node.b, h, bound, dims, off, shape)
    elif isinstance(node, Heads):
        _core(node.patterns[h], h, bound, dims, off, shape)
    else:
        _merge_leaf(node, bound(node, h), dims, off, shape)


def _head(p, h: int, bound, shape: tuple) -> HeadParams:
    off = 3 - len(shape)
    if isinstance(p, Heads):
        return _head(p.patterns[h], h, bound, shape)
    # split a top-level union into sinks and at most one core
    terms, stack = [], [p]
    while stack:
        x = stack.pop()
        if isinstance(x, Or):
            stack += [x.b, x.a]
        elif isinstance(x, Heads):
            stack.append(x.patterns[h])
        else:
            terms.append(x)
    sinks = [t for t in terms if isinstance(t, Sink)]
    cores = [t for t in terms if not isinstance(t, Sink)]
    if len(cores) > 1:
        raise _unsupported(p, " (a union of two non-sink patterns)")
    dims = [DimParams() for _ in range(3)]
    if cores:
        _core(cores[0], h, bound, dims, off, shape)
    else:
        _merge_leaf(Empty(), {}, dims, off, shape)
    n_sink = max([bound(s, h)["n"] for s in sinks], default=0)
    return HeadParams(dims, n_sink)


def lower_pattern(p, shape: tuple, heads: int) -> List[HeadParams]:
    """One :class:`HeadParams` per head, or MaskDSLError naming the node the kernel cannot run."""
    cache = {}

    def bound(node, h):
        if id(node) not in cache:
            cache[id(node)] = (node, node.bind(shape, heads))
        return cache[id(node)][1][h]

    if max(shape) > 2**30:
        raise MaskDSLError(
            f"backend='triton': shape {tuple(shape)} has a dim longer than 2**30; the kernel's "
            f"int32 coordinates need every dim <= 2**30 (use backend='tiles')")

    return [_head(p, h, bound, tuple(shape)) for h in range(heads)]


def check_score(score) -> dict:
    """The score terms by type, or MaskDSLError for what the kernel cannot run (one term of
    each kind)."""
    from .._score import Alibi, DistanceDecay, Dropout, RelativeBias, SinkLogit, Softcap, score_terms

    terms = {}
    for t in score_terms(score):
        kind = type(t)
        if kind not in (Alibi, DistanceDecay, RelativeBias, Softcap, SinkLogit, Dropout):
            raise MaskDSLError(f"backend='triton': the Triton kernel cannot run {t!r}")
        if kind in terms:
            raise MaskDSLError(
                f"backend='triton': the Triton kernel runs one {t._name} term, got a second "
                f"({t!r}); merge them or use backend='tiles'")
        terms[kind] = t
    return terms


def pack(params: List[HeadParams], device) -> tuple:
    """(int32 [H, 3, 7] per-dim table, int32 [H] sink counts) on ``device``."""
    table = torch.tensor([[d.as_list() for d in hp.dims] for hp in params], dtype=torch.int32)
    sinks = torch.tensor([hp.sink for hp in params], dtype=torch.int32)
    return table.to(device), sinks.to(device)


def group_tiles(params: List[HeadParams], shape3: tuple, tile: tuple) -> tuple:
    """Per dim, how many query (or key) tiles the launch grid needs: max over heads of
    dilation x tiles per residue group."""
    out = []
    for dim, (S, T) in enumerate(zip(shape3, tile)):
        out.append(max(hp.dims[dim].dilation * math.ceil(math.ceil(S / hp.dims[dim].dilation) / T)
                       for hp in params))
    return tuple(out)
