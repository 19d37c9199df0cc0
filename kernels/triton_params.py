"""What the Triton kernel needs to know about a pattern: a few integers per dim and head, read off
the IR (``codegen.ir``), never off the DSL.

The kernel has no BlockMask. It evaluates each query's key range in-kernel from these numbers,
so the metadata is O(heads x dims) whatever the sequence length. Per head, the IR it runs is

    core | sink(n) | ...     where core is a separable IR (Sep: an AND over dims of range atoms),
                             or a constant (full / empty)

and per dim the core's atoms are at most one NATTEN window (:class:`NatAtom`), any number of
offset limits (:class:`OffAtom`: windows, causal; they intersect) and at most one block
(:class:`BlockAtom`, with its shift). The key set of a query at coordinate ``x`` is then the keys
``k`` with ``k % d == x % d`` (``d``: the NATTEN window's dilation) whose in-group index lies in
``[jlo(x), jhi(x)]``, the intersection of the three; both ends are non-decreasing in ``x``, which
lets the backward kernel find a key tile's queries by binary search.

The table's layout is ``FIELDS``: the packer here and the kernel's field offsets both come from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch

from maskdsl._errors import MaskDSLError
from maskdsl.codegen.ir import (AndN, BlockAtom, Const, Flat, NatAtom, NotN, OffAtom, OrN, Sep,
    SinkFlat, lower_pattern as lower)
from maskdsl.codegen.recipe import varies_per_head
from maskdsl.codegen.simplify import simplify
from maskdsl.dsl.score import (Alibi, DistanceDecay, Dropout, RelativeBias, SinkLogit, Softcap,
    score_terms)

__all__ = ["FIELDS", "NO_LIMIT", "DimParams", "HeadParams", "lower_pattern", "check_score",
           "pack", "group_tiles"]

#: the per-(head, dim) table's columns, in order (the kernel's F_* offsets are their indices)
FIELDS = ("kernel", "stride", "dilation", "causal", "left", "right", "block", "shift")
NO_LIMIT = 1 << 28     # "no limit" for window offsets (int32-safe when added to a coordinate)


@dataclass
class DimParams:
    kernel: int = 0        # 0: no neighborhood on this dim
    stride: int = 1
    dilation: int = 1
    causal: int = 0
    left: int = NO_LIMIT   # keys k with x - left <= k <= x + right
    right: int = NO_LIMIT
    block: int = 0         # 0: no block
    shift: int = 0         # the block's shift (0 <= shift < block)

    def as_list(self) -> list:
        return [getattr(self, f) for f in FIELDS]


@dataclass
class HeadParams:
    dims: List[DimParams] = field(default_factory=lambda: [DimParams() for _ in range(3)])
    sink: int = 0          # always 3 dims, leading dims padded for 1-D/2-D grids


def _refuse(what: str) -> MaskDSLError:
    return MaskDSLError(
        f"backend='triton': the Triton kernel cannot express {what}; it runs an & of "
        f"neighborhood, window, causal, block (optionally | sink(n), per head via heads([...])); "
        f"use backend='flex' or backend='tiles'"
    )


def _empty(hp: HeadParams) -> None:
    for d in hp.dims:            # an empty key interval on every dim
        d.left, d.right = -1, -1


def _dim(atoms, S: int, d: DimParams) -> None:
    for a in atoms:
        if isinstance(a, NatAtom):
            new = (int(a.K), int(a.s), int(a.d), int(bool(a.causal)))
            if d.kernel and (d.kernel, d.stride, d.dilation, d.causal) != new:
                raise _refuse("two neighborhoods AND-ed on the same dim")
            d.kernel, d.stride, d.dilation, d.causal = new
        elif isinstance(a, OffAtom):
            # offsets beyond S - 1 mean "no limit": clamp (int32 coordinates in the kernel)
            if a.left is not None:
                d.left = min(d.left, int(a.left), S)
            if a.right is not None:
                d.right = min(d.right, int(a.right), S)
        elif isinstance(a, BlockAtom):
            new = (int(a.size), int(a.shift))
            if d.block and (d.block, d.shift) != new:
                raise _refuse("two block sizes AND-ed on the same dim")
            d.block, d.shift = new
        else:  # pragma: no cover - every separable primitive states its atoms
            raise _refuse(f"the range atom {a!r}")


def _core(ir, shape: tuple, hp: HeadParams) -> None:
    off = 3 - len(shape)
    if isinstance(ir, Const):
        if not ir.value:
            _empty(hp)
        return
    if not isinstance(ir, Sep):
        raise _refuse(_describe(ir))
    for i, dr in enumerate(ir.dims):
        _dim(dr.atoms, shape[i], hp.dims[off + i])


def _describe(ir) -> str:
    if isinstance(ir, Flat):
        return repr(ir.node) if ir.node is not None else type(ir).__name__
    if isinstance(ir, NotN):
        return repr(ir.node) if ir.node is not None else "a negation (~)"
    if isinstance(ir, OrN):
        return "a union of two non-sink patterns"
    if isinstance(ir, AndN):
        return " & ".join(_describe(c) for c in ir.children if not _separable(c)) or "this &"
    return type(ir).__name__


def _separable(ir) -> bool:
    return isinstance(ir, (Sep, Const))


def head_params(ir, shape: tuple) -> HeadParams:
    """One head's (specialised) IR -> its table row, or MaskDSLError naming what the kernel
    cannot run."""
    hp = HeadParams()
    terms = list(ir.children) if isinstance(ir, OrN) else [ir]
    sinks = [t for t in terms if isinstance(t, SinkFlat)]
    cores = [t for t in terms if not isinstance(t, SinkFlat)]
    if len(cores) > 1:
        raise _refuse("a union of two non-sink patterns")
    if cores:
        _core(cores[0], shape, hp)
    else:
        _empty(hp)
    hp.sink = max([s.n for s in sinks], default=0)
    return hp


def lower_pattern(p, shape: tuple, heads: int) -> List[HeadParams]:
    """One :class:`HeadParams` per head from the pattern's (simplified) per-head IR, or
    MaskDSLError naming the node the kernel cannot run."""
    if max(shape) > 2**30:
        raise MaskDSLError(
            f"backend='triton': shape {tuple(shape)} has a dim longer than 2**30; the kernel's "
            f"int32 coordinates need every dim <= 2**30 (use backend='tiles')")
    p = simplify(p)
    if varies_per_head(p):
        return [head_params(lower(p, shape, heads, head=h)[0], shape) for h in range(heads)]
    one = head_params(lower(p, shape, heads, head=0)[0], shape)
    return [one] * heads


def check_score(score) -> dict:
    """The score terms by type, or MaskDSLError for what the kernel cannot run (one term of
    each kind)."""
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
    """(int32 [H, 3, len(FIELDS)] per-dim table, int32 [H] sink counts) on ``device``."""
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
