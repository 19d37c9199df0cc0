"""The symbolic IR: each pattern node lowered to sympy, per dimension where it can be.

Symbols are integer grid coordinates ``q0..q2`` / ``k0..k2`` of the query and key, their flat
row-major indices ``q_flat`` / ``kv_flat``, the head ``h`` and (for scores) ``score``.

IR nodes:

* :class:`Sep` — a *separable* predicate: an AND over dims of ``DimRange`` conditions
  ``lo(q_d) <= k_d < hi(q_d)`` and ``(k_d - q_d) % step == 0``. ``neighborhood``, ``window``,
  ``causal``, ``block`` and ``full`` lower to it, and an AND of separable nodes merges into one
  (ranges intersect: ``Max`` of the ``lo``s, ``Min`` of the ``hi``s). Separable predicates are
  what the analytic BlockMask classifies exactly, one dimension at a time. Each DimRange also
  keeps the *atoms* it was built from (:class:`NatAtom`, :class:`OffAtom`, :class:`BlockAtom`):
  the Triton kernel's per-head table is read off them, not off the DSL.
* :class:`Flat` subclasses — predicates on flat indices (:class:`SinkFlat`,
  :class:`DocumentFlat`, :class:`PowerFlat`, :class:`RadialFlat`, :class:`FnFlat`), each with
  the numbers its own tile classifier (``blockmask.classify_flat``) needs. ``FnFlat`` is a
  user's ``mask_fn``: a :class:`CallMask` of a captured Python function on ``q_flat``/``kv_flat``.
* :class:`AndN`, :class:`OrN`, :class:`NotN`, :class:`HeadsN`, :class:`Const` — the algebra.

Lowering is one rule per DSL node type (``lower_node.register``), and so is printing the IR as
one predicate (``_predicate.register``) and lowering score terms (``lower_term.register``):
adding a primitive adds its rules, it edits no ladder (ARCHITECTURE.md, "Adding a primitive").

Parameters that vary per head appear as table lookups ``NAME[h]`` (:class:`Tables` holds the
values and becomes captured tensors); when lowering for one head (``head=h``) they are plain
integers instead, which is what the BlockMask classifier and the kernels consume.
Simplification happens here, once, at compile time.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import sympy as sp
from sympy.logic.boolalg import BooleanFunction
import numpy as np

from maskdsl.dsl.node import SameForEveryHead
from maskdsl.dsl.pattern import (And, Block, Causal, Document, Empty, Full, Heads, MaskFn,
    Neighborhood, Not, Or, Pattern, Power, Radial, Sink, Window)
from maskdsl.dsl.score import (SCORE_MOD_ROLES, Alibi, DistanceDecay, RelativeBias,
                               geometric_slopes, terms_with_role)
from maskdsl.dsl.values import _is_tensor

__all__ = [
    "Q", "K", "QF", "KF", "H", "SCORE", "Tables", "DimRange", "NatAtom", "OffAtom", "BlockAtom",
    "Sep", "Flat", "SinkFlat", "DocumentFlat", "PowerFlat", "RadialFlat", "FnFlat", "CallMask", "CallScore",
    "AndN", "OrN",
    "NotN", "HeadsN", "Const", "lower_pattern", "lower_node", "lower_score", "lower_term",
    "IsPow2", "predicate", "simplify", "smin", "smax", "evaluate", "tighten",
]

Q = sp.symbols("q0 q1 q2", integer=True, nonnegative=True)
K = sp.symbols("k0 k1 k2", integer=True, nonnegative=True)
QF, KF = sp.symbols("q_flat kv_flat", integer=True, nonnegative=True)
H = sp.Symbol("h", integer=True, nonnegative=True)
SCORE = sp.Symbol("score", real=True)


class IsPow2(BooleanFunction):
    """True iff its (positive integer) argument is a power of two; printed as ``(x & (x - 1)) == 0``."""

    @classmethod
    def eval(cls, x):
        if x.is_Integer:
            v = int(x)
            return sp.true if v > 0 and v & (v - 1) == 0 else sp.false
        return None


class CallMask(BooleanFunction):
    """A user's mask function called on flat indices: ``CallMask(name, h, q_flat, kv_flat)``,
    printed ``name(b, h, q_flat, kv_flat)`` with ``b`` zero (``name``: a symbol naming the
    captured function in :class:`Tables`). Never evaluated symbolically."""

    @classmethod
    def eval(cls, *args):
        return None


class CallScore(sp.Function):
    """A user's score function on flat indices: ``CallScore(name, score, h, q_flat, kv_flat)``,
    printed ``name(score, b, h, q_flat, kv_flat)`` with ``b`` zero (``name``: a symbol naming the
    captured function in :class:`Tables`). Never evaluated symbolically."""

    @classmethod
    def eval(cls, *args):
        return None


class Tables:
    """Per-head parameter tables: ``lookup(name, values)`` gives a constant when every head
    agrees (or when lowering for a single head) and ``name[h]`` otherwise."""

    def __init__(self, head: Optional[int] = None):
        self.head = head
        self.values: Dict[str, list] = {}   # name -> per-head values (ints, floats or nested)
        self.tensors: Dict[str, object] = {}  # name -> tensors (document ids, bias tables)
        # name -> (term index, field, flatten): where a score tensor is read from at call time
        self.slots: Dict[str, tuple] = {}
        self.fns: Dict[str, object] = {}      # name -> a user's Python function (mask_fn)
        self.fn_nodes: Dict[str, object] = {}  # name -> its DSL node (messages)

    def lookup(self, name: str, values: list):
        if self.head is not None:
            return sp.sympify(values[self.head])
        if all(v == values[0] for v in values):
            return sp.sympify(values[0])
        name = self._fresh(name)
        self.values[name] = list(values)
        return sp.IndexedBase(name)[H]

    def table(self, name: str, values) -> sp.IndexedBase:
        """A table indexed by data (frame distance, token id), one row per head if 2-D."""
        name = self._fresh(name)
        self.values[name] = values
        return sp.IndexedBase(name)

    def tensor(self, name: str, t, slot: Optional[tuple] = None) -> sp.IndexedBase:
        """A captured tensor. ``slot``: (score term index, field, flatten), for a score tensor
        the generated score_mod reads from the caller's score at every call."""
        name = self._fresh(name)
        self.tensors[name] = t
        if slot is not None:
            self.slots[name] = slot
        return sp.IndexedBase(name)

    def function(self, name: str, fn, node=None) -> sp.Symbol:
        """A captured Python function (a user's ``mask_fn`` or ``score_fn``), passed to the
        generated code like a table; the symbol names it in :class:`CallMask`. ``node``: the DSL
        node it came from (for messages: ``fn_nodes``)."""
        name = self._fresh(name)
        self.fns[name] = fn
        self.fn_nodes[name] = node
        return sp.Symbol(name)

    def _fresh(self, name: str) -> str:
        n, i = name, 1
        while n in self.values or n in self.tensors or n in self.fns:
            n, i = f"{name}_{i}", i + 1
        return n


# ------------------------------------------------------------------------------ IR nodes

@dataclass(frozen=True)
class NatAtom:
    """NATTEN's window on one dim: kernel K, stride s, dilation d, causal (ARCHITECTURE.md)."""
    K: Any
    s: Any
    d: Any
    causal: bool


@dataclass(frozen=True)
class OffAtom:
    """Offsets ``q - left <= k <= q + right`` (None: unbounded); causal is ``right = 0``."""
    left: Any = None
    right: Any = None


@dataclass(frozen=True)
class BlockAtom:
    """The block of ``q``: ``(k + size - shift) // size == (q + size - shift) // size``."""
    size: Any
    shift: Any = 0


@dataclass(frozen=True)
class DimRange:
    """Allowed keys on one dim: ``lo <= k < hi`` and ``(k - q) % s == 0`` for each s in steps.
    ``lo``/``hi`` are sympy expressions of the query coordinate; None means unbounded.
    ``atoms``: the primitives it was built from (what the Triton kernel reads)."""

    lo: Optional[sp.Expr] = None
    hi: Optional[sp.Expr] = None
    steps: Tuple[sp.Expr, ...] = ()
    atoms: Tuple[Any, ...] = ()

    def __and__(self, other: "DimRange") -> "DimRange":
        lo = self.lo if other.lo is None else other.lo if self.lo is None else smax(self.lo, other.lo)
        hi = self.hi if other.hi is None else other.hi if self.hi is None else smin(self.hi, other.hi)
        steps = [s for s in self.steps + other.steps if s != 1]
        nums = [int(s) for s in steps if s.is_Integer]
        syms = tuple(dict.fromkeys(s for s in steps if not s.is_Integer))
        merged = (sp.Integer(math.lcm(*nums)),) if nums else ()
        return DimRange(lo, hi, tuple(s for s in merged if s != 1) + syms,
                        self.atoms + other.atoms)

    def condition(self, q, k) -> sp.Basic:
        with sp.evaluate(False):  # substituting must not re-run Min/Max simplification
            return self._condition(q, k)

    def _condition(self, q, k) -> sp.Basic:
        sub = {Q[0]: q}
        terms = []
        if self.lo is not None:
            terms.append(sp.Le(self.lo.xreplace(sub), k, evaluate=False))
        if self.hi is not None:
            terms.append(sp.Lt(k, self.hi.xreplace(sub), evaluate=False))
        for s in self.steps:
            terms.append(sp.Eq(sp.Mod(k - q, s), 0, evaluate=False))
        return AllOf(*terms)


@dataclass(frozen=True)
class Sep:
    """AND over dims of DimRanges (written in terms of ``Q[0]``; substituted per dim)."""

    dims: Tuple[DimRange, ...]
    label: str = ""


@dataclass(frozen=True)
class Flat:
    """A predicate over flat indices (q_flat, kv_flat); subclasses carry what their tile
    classifier needs (for the head the IR was lowered for). ``node`` is the DSL node (messages)."""

    expr: sp.Basic
    label: str = ""
    node: Any = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class SinkFlat(Flat):
    n: int = 0


@dataclass(frozen=True)
class DocumentFlat(Flat):
    ids: Any = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class PowerFlat(Flat):
    block: int = 1


@dataclass(frozen=True)
class RadialFlat(Flat):
    bands: tuple = ()
    sink_frames: int = 0
    per_frame: int = 1


@dataclass(frozen=True)
class FnFlat(Flat):
    """A user's ``mask_fn``: ``fn`` and ``key_range`` compare by identity (two functions never
    share an IR, a classification or a cache entry); ``head``: the head lowered for (None: the
    table form, ``h`` symbolic); ``n``: the grid's tokens."""
    fn: Any = None
    key_range: Any = None
    head: Optional[int] = None
    n: int = 0


@dataclass(frozen=True)
class AndN:
    children: Tuple


@dataclass(frozen=True)
class OrN:
    children: Tuple


@dataclass(frozen=True)
class NotN:
    child: object
    node: Any = field(default=None, compare=False, hash=False)   # the DSL node (messages)


@dataclass(frozen=True)
class HeadsN:
    children: Tuple


@dataclass(frozen=True)
class Const:
    value: bool


# ------------------------------------------------------------------------------ lowering

def _minmax(cls, *args):
    """Min/Max without sympy's (slow) pairwise simplification: numbers are folded, repeated
    arguments dropped; ``tighten`` later removes arguments that never win."""
    flat = []
    for a in map(sp.sympify, args):
        flat.extend(a.args if isinstance(a, cls) else [a])
    nums = [a for a in flat if a.is_number]
    rest = list(dict.fromkeys(a for a in flat if not a.is_number))
    if nums:
        rest.append(min(nums) if cls is sp.Min else max(nums))
    return rest[0] if len(rest) == 1 else cls(*rest, evaluate=False)


def smin(*args):
    return _minmax(sp.Min, *args)


def smax(*args):
    return _minmax(sp.Max, *args)


def evaluate(expr, env: dict):
    """Evaluate an integer IR expression with numpy arrays bound to its symbols (the fast
    numeric path used at compile time: key ranges over every coordinate, tightening)."""
    def ev(e):
        if e.is_Symbol:
            return env[e]
        if e.is_Integer:
            return int(e)
        if e.is_Rational:
            return float(e)
        if isinstance(e, sp.Add):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out + ev(a)
            return out
        if isinstance(e, sp.Mul):
            num, den = e.as_numer_denom()
            if den != 1:
                return ev(num) / ev(den)
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out * ev(a)
            return out
        if isinstance(e, sp.floor):
            num, den = e.args[0].as_numer_denom()
            return np.floor_divide(ev(num), ev(den))
        if isinstance(e, sp.Mod):
            return np.mod(ev(e.args[0]), ev(e.args[1]))
        if isinstance(e, sp.Min):
            return np.minimum.reduce(np.broadcast_arrays(*[np.asarray(ev(a)) for a in e.args]))
        if isinstance(e, sp.Max):
            return np.maximum.reduce(np.broadcast_arrays(*[np.asarray(ev(a)) for a in e.args]))
        if isinstance(e, sp.Abs):
            return np.abs(ev(e.args[0]))
        if isinstance(e, sp.Pow) and e.args[1].is_Integer and e.args[1] > 0:
            return ev(e.args[0]) ** int(e.args[1])
        raise TypeError(f"cannot evaluate {type(e).__name__}: {e}")

    return ev(sp.sympify(expr))


CHUNK = 8192     # numeric compile-time work over coordinates in pieces of this many (64 KB
                 # int64 arrays the allocator reuses; token-sized ones cost fresh pages each time)


def _affine(e) -> bool:
    """Whether ``e`` is c0 + c1 * Q[0] with integer c0, c1 (nothing else free)."""
    if not isinstance(e, sp.Expr) or not e.free_symbols <= {Q[0]}:
        return False
    if e.is_Integer or e == Q[0]:
        return True
    try:
        poly = sp.Poly(e, Q[0])
    except sp.PolynomialError:
        return False
    return poly.degree() <= 1 and all(c.is_Integer for c in poly.all_coeffs())


def tighten(expr, L: int):
    """Drop the arguments of Min/Max that never win for q in [0, L) (checked numerically, once,
    at compile time): e.g. ``Min(15, q0)`` on a dim of length 16 is ``q0``."""
    if expr is None or not isinstance(expr, sp.Basic) or expr.has(sp.Indexed):
        return expr
    if not expr.args:
        return expr
    args = [tighten(a, L) for a in expr.args]
    if isinstance(expr, (sp.Min, sp.Max)):
        expr = _minmax(expr.func, *args)
        if not isinstance(expr, (sp.Min, sp.Max)):
            return expr
    else:
        expr = expr.func(*args)
    if isinstance(expr, (sp.Min, sp.Max)):
        # the arguments that win everywhere, checked over q a CHUNK at a time
        winners = list(range(len(expr.args)))
        reduce = np.minimum.reduce if isinstance(expr, sp.Min) else np.maximum.reduce
        # affine arguments (q + c, c, 2q ...): the winner over [0, L) is the winner at both ends
        ends = None
        if all(_affine(a) for a in expr.args):
            ends = np.array([0, L - 1], dtype=np.int64)
        for q0 in (range(0, L, CHUNK) if ends is None else (0,)):
            q = np.arange(q0, min(L, q0 + CHUNK), dtype=np.int64) if ends is None else ends
            vals = [np.broadcast_to(np.asarray(evaluate(a, {Q[0]: q})), q.shape)
                    for a in expr.args]
            best = reduce(vals)
            winners = [i for i in winners if np.array_equal(vals[i], best)]
            if not winners:
                break
        if winners:
            return expr.args[winners[0]]
    return expr


@functools.lru_cache(maxsize=4096)
def _neighborhood_dim(L, K, s, d, causal: bool) -> DimRange:
    q = Q[0]
    g = sp.Mod(q, d)
    i = sp.floor(q / d)
    group_len = sp.floor((L - g + d - 1) / d)
    if causal:
        leader = smin(sp.floor(i / s) * s + s - 1, group_len - 1)
        start = smax(leader - K + 1, 0)
        lo, hi = start * d + g, q + 1
    else:
        leader = smin(sp.floor(i / s) * s + sp.floor(s / 2), group_len - 1)
        start = smin(smax(leader - sp.floor(K / 2), 0), group_len - K)
        lo = start * d + g
        hi = lo + (K - 1) * d + 1
    return DimRange(tighten(lo, L), tighten(hi, L), (sp.sympify(d),) if d != 1 else (),
                    (NatAtom(K, s, d, causal),))


class LowerCtx:
    """What a lowering rule needs: the grid, the head count, the head lowered for (None: every
    head, per-head values as table lookups), the tables, and a counter for unique names."""

    def __init__(self, shape: tuple, heads: int, head: Optional[int], checked: bool = False):
        self.shape, self.heads, self.head = tuple(shape), heads, head
        self.checked = checked
        self.tables = Tables(head)
        self._n = 0

    def tag(self, node) -> str:
        tag = f"{node._name}{self._n}"
        self._n += 1
        return tag

    def bound(self, node):
        """The node's bound parameters, indexed by head (``Node.bind``). Lowering one head of a
        pattern whose every head was bound already (``checked``: the recipe lowers the table
        form first) binds only that head (``Node.bind_head``, O(1) per node), so lowering each
        of H heads costs O(H) in all, not O(H^2)."""
        if self.head is None or not self.checked:
            return node.bind(self.shape, self.heads)
        return {self.head: node.bind_head(self.shape, self.heads, self.head)}

    def one(self, b) -> dict:
        """The bound parameters of the head lowered for (head 0 when lowering for all heads:
        the leaf's numbers are then the same on every head, or looked up from tables)."""
        return b[self.head if self.head is not None else 0]

    def param(self, b, tag: str, key: str, dim=None, most=None):
        if self.head is not None:
            v = b[self.head][key] if dim is None else b[self.head][key][dim]
            return sp.sympify(v if most is None else min(v, most))
        if isinstance(b, SameForEveryHead):    # every head alike: one value, no O(H) loop
            b = b[:1]
        vals = [x[key] if dim is None else x[key][dim] for x in b]
        if most is not None:   # beyond ``most`` the value means the same: keep numbers small
            vals = [min(v, most) for v in vals]
        return self.tables.lookup(f"{tag}_{key}" + ("" if dim is None else f"{dim}"), vals)


@functools.singledispatch
def lower_node(node, ctx: LowerCtx):
    """One DSL node -> IR (registered per node type below)."""
    raise TypeError(f"no lowering rule for {node!r}")


@lower_node.register(Neighborhood)
def _neighborhood(p, ctx):
    b, tag = ctx.bound(p), ctx.tag(p)
    dims = []
    for d in range(len(ctx.shape)):
        causal = ctx.one(b)["causal"][d]     # causal is never per-head (not a numeric field)
        dims.append(_neighborhood_dim(ctx.shape[d], ctx.param(b, tag, "kernel_size", d),
                                      ctx.param(b, tag, "stride", d),
                                      ctx.param(b, tag, "dilation", d), causal))
    return Sep(tuple(dims), label=tag)


@lower_node.register(Window)
def _window(p, ctx):
    b, tag, q = ctx.bound(p), ctx.tag(p), Q[0]
    dims = []
    for d, L in enumerate(ctx.shape):
        # |k - q| <= L - 1 on a dim of length L: larger offsets are clamped to L - 1
        left, right = ctx.param(b, tag, "left", d, L - 1), ctx.param(b, tag, "right", d, L - 1)
        dims.append(DimRange(q - left, q + right + 1, (), (OffAtom(left, right),)))
    return Sep(tuple(dims), label=tag)


@lower_node.register(Causal)
def _causal(p, ctx):
    dims, tag = ctx.one(ctx.bound(p))["dims"], ctx.tag(p)
    return Sep(tuple(DimRange(None, Q[0] + 1, (), (OffAtom(None, 0),)) if d in dims else DimRange()
                     for d in range(len(ctx.shape))), label=tag)


@lower_node.register(Block)
def _block(p, ctx):
    # block index (x + size - shift) // size; its keys are [index * size - size + shift, + size)
    b, tag, q = ctx.bound(p), ctx.tag(p), Q[0]
    dims = []
    for d in range(len(ctx.shape)):
        size, shift = ctx.param(b, tag, "size", d), ctx.param(b, tag, "shift", d)
        lo = sp.floor((q + size - shift) / size) * size - size + shift
        dims.append(DimRange(lo, lo + size, (), (BlockAtom(size, shift),)))
    return Sep(tuple(dims), label=tag)


@lower_node.register(Full)
def _full(p, ctx):
    return Sep(tuple(DimRange() for _ in ctx.shape), label="full")


@lower_node.register(Empty)
def _empty(p, ctx):
    return Const(False)


@lower_node.register(Sink)
def _sink(p, ctx):
    b, tag = ctx.bound(p), ctx.tag(p)
    n = ctx.param(b, tag, "n")
    return SinkFlat(sp.Lt(KF, n), label=tag, node=p, n=ctx.one(b)["n"])


@lower_node.register(Document)
def _document(p, ctx):
    ids, tag = ctx.one(ctx.bound(p))["ids"], ctx.tag(p)
    t = ctx.tables
    table = t.tensor(f"{tag}_ids", ids) if _is_tensor(ids) else t.table(f"{tag}_ids", list(ids))
    return DocumentFlat(sp.Eq(table[QF], table[KF]), label=tag, node=p, ids=ids)


@lower_node.register(Power)
def _power(p, ctx):
    b, tag = ctx.bound(p), ctx.tag(p)
    n = math.prod(ctx.shape)
    blk = ctx.param(b, tag, "block", most=n)          # one block holds every token already
    D = sp.floor(QF / blk) - sp.floor(KF / blk)
    expr = sp.Or(sp.Eq(D, 0), sp.And(sp.Gt(D, 0), IsPow2(D)))
    return PowerFlat(expr, label=tag, node=p, block=min(ctx.one(b)["block"], n))


@lower_node.register(Radial)
def _radial(p, ctx):
    b, tag, t = ctx.bound(p), ctx.tag(p), ctx.tables
    frames, per_frame = ctx.shape[0], math.prod(ctx.shape[1:])
    bands = ({ctx.head: _radial_band(b[ctx.head], frames, per_frame)} if ctx.head is not None
             else [_radial_band(x, frames, per_frame) for x in b])
    if ctx.head is not None or all(x == bands[0] for x in bands):
        band = t.table(f"{tag}_band", bands[ctx.head if ctx.head is not None else 0])
        lookup = lambda dist: band[dist]
    else:
        band = t.table(f"{tag}_band", bands)
        lookup = lambda dist: band[H, dist]
    sink_frames = ctx.param(b, tag, "sink_frames")
    fq, fk = sp.floor(QF / per_frame), sp.floor(KF / per_frame)
    a, bb = sp.Mod(QF, per_frame), sp.Mod(KF, per_frame)
    expr = sp.Or(sp.Lt(fk, sink_frames), sp.Le(sp.Abs(a - bb), lookup(sp.Abs(fq - fk))))
    one = ctx.one(b)
    return RadialFlat(expr, label=tag, node=p,
                      bands=tuple(bands[ctx.head if ctx.head is not None else 0]),
                      sink_frames=one["sink_frames"], per_frame=per_frame)


@lower_node.register(MaskFn)
def _mask_fn(p, ctx):
    ctx.bound(p)                                   # binds and probes fn (MaskFn.probe)
    tag = ctx.tag(p)
    name = ctx.tables.function(f"{tag}_fn", p.fn, p)
    head = H if ctx.head is None else sp.Integer(ctx.head)
    return FnFlat(CallMask(name, head, QF, KF), label=tag, node=p, fn=p.fn,
                  key_range=p.key_range, head=ctx.head, n=math.prod(ctx.shape))


@lower_node.register(Not)
def _not(p, ctx):
    return simplify(NotN(lower_node(p.a, ctx), node=p), ctx.shape)


@lower_node.register(And)
def _and(p, ctx):
    return _and_chain([lower_node(x, ctx) for x in p.parts], ctx.shape)


@lower_node.register(Or)
def _or(p, ctx):
    # one pass over the chain's parts: the same IR as simplifying (a | b) | c pairwise
    return simplify(OrN(tuple(lower_node(x, ctx) for x in p.parts)), ctx.shape)


def _and_chain(kids: list, shape: tuple):
    """``simplify`` of the left-associative chain ``((k0 & k1) & k2) & ...`` in one pass over
    its parts (O(parts), not O(parts^2)), with the result of simplifying it pair by pair: each
    separable member is merged into the Sep so far (and tightened) in order."""
    if len(kids) == 2:
        return simplify(AndN(tuple(kids)), shape)
    sep, rest = None, []
    for c in kids:
        for x in (c.children if isinstance(c, AndN) else (c,)):
            if isinstance(x, Const):
                if not x.value:
                    return Const(False)
            elif isinstance(x, Sep):
                sep = x if sep is None else simplify(AndN((sep, x)), shape)
            else:
                rest.append(x)
    flat = ([sep] if sep is not None else []) + rest
    if not flat:
        return Const(True)
    return flat[0] if len(flat) == 1 else AndN(tuple(flat))


@lower_node.register(Heads)
def _heads(p, ctx):
    ctx.bound(p)                                   # len(patterns) == heads
    if ctx.head is not None:
        return lower_node(p.patterns[ctx.head], ctx)
    kids = tuple(lower_node(x, ctx) for x in p.patterns)
    return kids[0] if all(k == kids[0] for k in kids) else HeadsN(kids)


def _radial_band(p: dict, frames: int, per_frame: int) -> list:
    """Per frame distance d: the largest allowed |a - b| (or -1: frame dropped). Radial
    Attention's rule: d <= 1 sees everything; else width max(base * decay, min_window) where
    base = 2**bit_length(s) / 2**bit_length(d), kept iff base >= min_window or
    d % int(min_window / base) == 0."""
    out = []
    for d in range(frames):
        if d <= 1:
            out.append(per_frame)  # every |a - b| < per_frame
            continue
        base = 2 ** per_frame.bit_length() / 2 ** d.bit_length()
        width = max(base * p["decay"], p["min_window"])
        kept = base >= p["min_window"] or d % int(p["min_window"] / base) == 0
        out.append(min(int(math.floor(width)), per_frame) if kept else -1)
    return out


def lower_pattern(p: Pattern, shape: tuple, heads: int, head: Optional[int] = None,
                  checked: bool = False):
    """Lower a pattern to IR. ``head=None``: per-head values as table lookups (for printing);
    ``head=h``: everything specialised to head h (for the tile classes and the kernels).
    ``checked``: every head of ``p`` was bound already (by a table-form lowering), so only
    head ``h``'s parameters are bound (O(1) per node instead of O(heads)). Returns (ir, tables)."""
    ctx = LowerCtx(shape, heads, head, checked)
    return lower_node(p, ctx), ctx.tables


def simplify(n, shape: Optional[tuple] = None):
    """Flatten AND/OR chains, merge separable AND members into one Sep, fold constants."""
    if isinstance(n, NotN):
        c = n.child
        if isinstance(c, Const):
            return Const(not c.value)
        if isinstance(c, NotN):
            return c.child
        return n
    if isinstance(n, (AndN, OrN)):
        kind = type(n)
        flat = []
        for c in n.children:
            flat.extend(c.children if isinstance(c, kind) else [c])
        if kind is AndN:
            if any(isinstance(c, Const) and not c.value for c in flat):
                return Const(False)
            flat = [c for c in flat if not (isinstance(c, Const) and c.value)]
            seps = [c for c in flat if isinstance(c, Sep)]
            rest = [c for c in flat if not isinstance(c, Sep)]
            if len(seps) > 1:
                dims = tuple(_and_dims(ds) for ds in zip(*(s.dims for s in seps)))
                if shape is not None:
                    dims = tuple(DimRange(tighten(d.lo, L), tighten(d.hi, L), d.steps, d.atoms)
                                 for d, L in zip(dims, shape))
                seps = [Sep(dims, label="&".join(s.label for s in seps))]
            flat = seps + rest
            if not flat:
                return Const(True)
        else:
            if any(isinstance(c, Const) and c.value for c in flat):
                return Const(True)
            flat = [c for c in flat if not (isinstance(c, Const) and not c.value)]
            if not flat:
                return Const(False)
        return flat[0] if len(flat) == 1 else kind(tuple(flat))
    return n


def _and_dims(ds) -> DimRange:
    out = ds[0]
    for d in ds[1:]:
        out = out & d
    return out


def contains(n, cls) -> bool:
    """Whether the IR ``n`` has a node of type ``cls``."""
    if isinstance(n, cls):
        return True
    kids = getattr(n, "children", None)
    if kids is None:
        kids = (n.child,) if isinstance(n, NotN) else ()
    return any(contains(c, cls) for c in kids)


def _as_given(cls, args, unit, absorbing):
    """``cls`` over ``args`` kept in order: ``unit`` arguments dropped, an ``absorbing`` one
    decides, none left is ``unit``, one left is itself."""
    args = [a for a in args if a is not unit]
    if any(a is absorbing for a in args):
        return absorbing
    if not args:
        return unit
    return args[0] if len(args) == 1 else sp.Basic.__new__(cls, *args)


class AllOf(sp.And):
    """An And that keeps its arguments as given: sympy's And canonicalises and sorts every
    relational argument to drop duplicates, most of a small mask_mod's generation time; the IR
    is simplified already. Prints, substitutes and compares like And."""

    def __new__(cls, *args):
        return _as_given(cls, args, sp.true, sp.false)


class AnyOf(sp.Or):
    """An Or that keeps its arguments as given (see :class:`AllOf`)."""

    def __new__(cls, *args):
        return _as_given(cls, args, sp.false, sp.true)


def predicate(n, coords_q, coords_k, qf, kf) -> sp.Basic:
    """The IR as one sympy boolean over the given coordinate/flat expressions (built
    unevaluated: the IR is already simplified, and boolean simplification is slow)."""
    with sp.evaluate(False):
        return _predicate(n, (coords_q, coords_k, qf, kf))


@functools.singledispatch
def _predicate(n, at) -> sp.Basic:
    raise TypeError(f"no predicate rule for {n!r}")


@_predicate.register(Const)
def _(n, at):
    return sp.true if n.value else sp.false


@_predicate.register(Sep)
def _(n, at):
    coords_q, coords_k, _, _ = at
    return AllOf(*[d.condition(coords_q[i], coords_k[i]) for i, d in enumerate(n.dims)])


@_predicate.register(Flat)
def _(n, at):
    return n.expr.xreplace({QF: at[2], KF: at[3]})


@_predicate.register(AndN)
def _(n, at):
    return AllOf(*[_predicate(c, at) for c in n.children])


@_predicate.register(OrN)
def _(n, at):
    return AnyOf(*[_predicate(c, at) for c in n.children])


@_predicate.register(NotN)
def _(n, at):
    return sp.Not(_predicate(n.child, at))


@_predicate.register(HeadsN)
def _(n, at):
    return AnyOf(*[AllOf(sp.Eq(H, i, evaluate=False), _predicate(c, at))
                   for i, c in enumerate(n.children)])


# ------------------------------------------------------------------------------ scores

class _TermCtx:
    def __init__(self, term, index: int, tag: str, shape: tuple, heads: int, tables: Tables):
        self.term, self.index, self.tag, self.tables = term, index, tag, tables
        self.bound = term.bind(shape, heads)
        self.heads = heads

    def value(self, key):
        """A parameter: a captured tensor (read per call) or a per-head table / constant."""
        v = getattr(self.term, key)
        if _is_tensor(v):
            base = self.tables.tensor(f"{self.tag}_{key}", v.reshape(-1), (self.index, key, True))
            return base[H] if v.numel() > 1 else base[0]
        return self.tables.lookup(f"{self.tag}_{key}", [float(x[key]) for x in self.bound])


@functools.singledispatch
def lower_term(term, ctx: _TermCtx, expr):
    """One additive score term: ``expr`` (the score so far) -> the new score."""
    raise TypeError(f"no score rule for {term!r}")


@lower_term.register(DistanceDecay)
def _(term, ctx, expr):
    diffs = [Q[d] - K[d] for d in ctx.bound[0]["dims"]]
    if term.metric == "euclidean":
        dist = sp.sqrt(sp.Add(*[x ** 2 for x in diffs]))
    elif term.metric == "manhattan":
        dist = sp.Add(*[sp.Abs(x) for x in diffs])
    else:
        dist = smax(*[sp.Abs(x) for x in diffs]) if len(diffs) > 1 else sp.Abs(diffs[0])
    return expr - ctx.value("rate") * dist


@lower_term.register(Alibi)
def _(term, ctx, expr):
    if term.slopes == "geometric":
        slope = ctx.tables.lookup(f"{ctx.tag}_slopes", geometric_slopes(ctx.heads))
    else:
        slope = ctx.value("slopes")
    return expr - slope * sp.Abs(QF - KF)


@lower_term.register(RelativeBias)
def _(term, ctx, expr):
    info = ctx.bound[0]
    base = ctx.tables.tensor(f"{ctx.tag}_table", term.table, (ctx.index, "table", False))
    idx = [smin(smax(K[d] - Q[d], -R), R) + R for d, R in enumerate(info["radius"])]
    return expr + (base[tuple(idx)] if info["shared"] else base[(H, *idx)])


def lower_score(score, shape: tuple, heads: int, t: Tables) -> Optional[sp.Expr]:
    """The score terms as one sympy expression of ``score``, grid coordinates, flat indices and
    the head (per-head and tensor parameters as table lookups). None when there is no additive
    term or softcap. ``sink_logit`` and ``dropout`` act on the softmax (the runtime applies
    them; Flex cannot) and ``softcap`` wraps the sum last."""
    terms = terms_with_role(score, *SCORE_MOD_ROLES)
    if not terms:
        return None
    expr = SCORE
    cap = None
    fns = []
    for i, term in enumerate(terms):
        ctx = _TermCtx(term, i, f"{term._name}{i}", shape, heads, t)
        if term.role == "nonlinear":           # softcap: wraps the sum last
            cap = ctx.value("cap")
        elif term.role == "function":        # after every additive term, in the order written
            fns.append(t.function(f"{ctx.tag}_fn", term.fn, term))
        else:
            expr = lower_term(term, ctx, expr)
    for name in fns:
        expr = CallScore(name, expr, H, QF, KF)
    if cap is not None:
        expr = cap * sp.tanh(expr / cap)
    return expr
