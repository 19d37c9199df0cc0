"""The symbolic IR: each pattern node lowered to sympy, per dimension where it can be.

Symbols are integer grid coordinates ``q0..q2`` / ``k0..k2`` of the query and key, their flat
row-major indices ``q_flat`` / ``kv_flat``, the head ``h`` and (for scores) ``score``.

IR nodes:

* :class:`Sep` — a *separable* predicate: an AND over dims of ``DimRange`` conditions
  ``lo(q_d) <= k_d < hi(q_d)`` and ``(k_d - q_d) % step == 0``. ``neighborhood``, ``window``,
  ``causal``, ``block`` and ``full`` lower to it, and an AND of separable nodes merges into one
  (ranges intersect: ``Max`` of the ``lo``s, ``Min`` of the ``hi``s). Separable predicates are
  what the analytic BlockMask classifies exactly, one dimension at a time.
* :class:`Flat` — a predicate on flat indices (``sink``, ``document``, ``power``, ``radial``),
  with the numbers its own tile classifier needs.
* :class:`AndN`, :class:`OrN`, :class:`NotN`, :class:`HeadsN`, :class:`Const` — the algebra.

Parameters that vary per head appear as table lookups ``NAME[h]`` (:class:`Tables` holds the
values and becomes captured tensors); when lowering for one head (``head=h``) they are plain
integers instead, which is what the BlockMask classifier and the kernels consume.
Simplification happens here, once, at compile time.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import sympy as sp
from sympy.logic.boolalg import BooleanFunction

from .._pattern import (And, Block, Causal, Document, Empty, Full, Heads, Neighborhood, Not, Or,
                        Pattern, Power, Radial, Sink, Window)
from .._values import _is_tensor

__all__ = [
    "Q", "K", "QF", "KF", "H", "SCORE", "Tables", "DimRange", "Sep", "Flat", "AndN", "OrN",
    "NotN", "HeadsN", "Const", "lower_pattern", "IsPow2", "predicate",
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


class Tables:
    """Per-head parameter tables: ``lookup(name, values)`` gives a constant when every head
    agrees (or when lowering for a single head) and ``name[h]`` otherwise."""

    def __init__(self, head: Optional[int] = None):
        self.head = head
        self.values: Dict[str, list] = {}   # name -> per-head values (ints, floats or nested)
        self.tensors: Dict[str, object] = {}  # name -> user tensors (document ids, bias tables)

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

    def tensor(self, name: str, t) -> sp.IndexedBase:
        name = self._fresh(name)
        self.tensors[name] = t
        return sp.IndexedBase(name)

    def _fresh(self, name: str) -> str:
        n, i = name, 1
        while n in self.values or n in self.tensors:
            n, i = f"{name}_{i}", i + 1
        return n


# ------------------------------------------------------------------------------ IR nodes

@dataclass(frozen=True)
class DimRange:
    """Allowed keys on one dim: ``lo <= k < hi`` and ``(k - q) % s == 0`` for each s in steps.
    ``lo``/``hi`` are sympy expressions of the query coordinate; None means unbounded."""

    lo: Optional[sp.Expr] = None
    hi: Optional[sp.Expr] = None
    steps: Tuple[sp.Expr, ...] = ()

    def __and__(self, other: "DimRange") -> "DimRange":
        lo = self.lo if other.lo is None else other.lo if self.lo is None else smax(self.lo, other.lo)
        hi = self.hi if other.hi is None else other.hi if self.hi is None else smin(self.hi, other.hi)
        steps = [s for s in self.steps + other.steps if s != 1]
        nums = [int(s) for s in steps if s.is_Integer]
        syms = tuple(dict.fromkeys(s for s in steps if not s.is_Integer))
        merged = (sp.Integer(math.lcm(*nums)),) if nums else ()
        return DimRange(lo, hi, tuple(s for s in merged if s != 1) + syms)

    def condition(self, q, k) -> sp.Basic:
        with sp.evaluate(False):  # substituting must not re-run Min/Max simplification
            return self._condition(q, k)

    def _condition(self, q, k) -> sp.Basic:
        sub = {Q[0]: q}
        terms = []
        if self.lo is not None:
            terms.append(sp.Le(self.lo.xreplace(sub), k))
        if self.hi is not None:
            terms.append(sp.Lt(k, self.hi.xreplace(sub)))
        for s in self.steps:
            terms.append(sp.Eq(sp.Mod(k - q, s), 0))
        return sp.And(*terms)


@dataclass(frozen=True)
class Sep:
    """AND over dims of DimRanges (written in terms of ``Q[0]``; substituted per dim)."""

    dims: Tuple[DimRange, ...]
    label: str = ""


@dataclass(frozen=True)
class Flat:
    kind: str            # "sink" | "document" | "power" | "radial"
    expr: sp.Basic       # predicate over q_flat, kv_flat (and tables)
    info: dict = field(default_factory=dict, compare=False, hash=False)
    label: str = ""


@dataclass(frozen=True)
class AndN:
    children: Tuple


@dataclass(frozen=True)
class OrN:
    children: Tuple


@dataclass(frozen=True)
class NotN:
    child: object


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
    import numpy as np

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
        import numpy as np

        q = np.arange(L, dtype=np.int64)
        vals = []
        for a in expr.args:
            v = evaluate(a, {Q[0]: q})
            vals.append(np.broadcast_to(np.asarray(v), q.shape))
        best = np.minimum.reduce(vals) if isinstance(expr, sp.Min) else np.maximum.reduce(vals)
        for a, v in zip(expr.args, vals):
            if np.array_equal(v, best):
                return a
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
    return DimRange(tighten(lo, L), tighten(hi, L), (sp.sympify(d),) if d != 1 else ())


def _lower_leaf(p, shape: tuple, heads: int, t: Tables, idx: List[int]):
    """One leaf -> IR, with per-head parameters as table lookups (or constants)."""
    b = p.bind(shape, heads)
    r = len(shape)
    tag = f"{p._name}{idx[0]}"
    idx[0] += 1
    q = Q[0]

    def param(key, dim=None, most=None):
        vals = [x[key] if dim is None else x[key][dim] for x in b]
        if most is not None:   # beyond ``most`` the value means the same: keep numbers small
            vals = [min(v, most) for v in vals]
        return t.lookup(f"{tag}_{key}" + ("" if dim is None else f"{dim}"), vals)

    if isinstance(p, Neighborhood):
        dims = []
        for d in range(r):
            causal = [x["causal"][d] for x in b]
            if t.head is not None:
                c = causal[t.head]
            elif all(c == causal[0] for c in causal):
                c = causal[0]
            else:
                raise AssertionError("causal is never per-head")
            dims.append(_neighborhood_dim(shape[d], param("kernel_size", d), param("stride", d),
                                          param("dilation", d), c))
        return Sep(tuple(dims), label=tag)
    if isinstance(p, Window):
        # |k - q| <= L - 1 on a dim of length L: larger offsets are clamped to L - 1
        return Sep(tuple(DimRange(q - param("left", d, shape[d] - 1),
                                  q + param("right", d, shape[d] - 1) + 1) for d in range(r)),
                   label=tag)
    if isinstance(p, Causal):
        dims = b[0]["dims"]
        return Sep(tuple(DimRange(None, q + 1) if d in dims else DimRange() for d in range(r)),
                   label=tag)
    if isinstance(p, Block):
        dims = []
        for d in range(r):
            size = param("size", d)
            lo = sp.floor(q / size) * size
            dims.append(DimRange(lo, lo + size))
        return Sep(tuple(dims), label=tag)
    if isinstance(p, Sink):
        n = param("n")
        return Flat("sink", sp.Lt(KF, n), {"n": [x["n"] for x in b]}, label=tag)
    if isinstance(p, Document):
        ids = b[0]["ids"]
        table = t.tensor(f"{tag}_ids", ids) if _is_tensor(ids) else t.table(f"{tag}_ids", list(ids))
        return Flat("document", sp.Eq(table[QF], table[KF]), {"ids": ids}, label=tag)
    if isinstance(p, Power):
        blk = param("block", most=math.prod(shape))   # one block holds every token already
        D = sp.floor(QF / blk) - sp.floor(KF / blk)
        expr = sp.Or(sp.Eq(D, 0), sp.And(sp.Gt(D, 0), IsPow2(D)))
        return Flat("power", expr, {"block": [x["block"] for x in b]}, label=tag)
    if isinstance(p, Radial):
        frames, per_frame = shape[0], math.prod(shape[1:])
        bands = [_radial_band(x, frames, per_frame) for x in b]
        if t.head is not None:
            band = t.table(f"{tag}_band", bands[t.head])
            lookup = lambda dist: band[dist]
        elif all(x == bands[0] for x in bands):
            band = t.table(f"{tag}_band", bands[0])
            lookup = lambda dist: band[dist]
        else:
            band = t.table(f"{tag}_band", bands)
            lookup = lambda dist: band[H, dist]
        sink_frames = param("sink_frames")
        fq, fk = sp.floor(QF / per_frame), sp.floor(KF / per_frame)
        a, bb = sp.Mod(QF, per_frame), sp.Mod(KF, per_frame)
        expr = sp.Or(sp.Lt(fk, sink_frames), sp.Le(sp.Abs(a - bb), lookup(sp.Abs(fq - fk))))
        return Flat("radial", expr, {"bands": bands, "sink_frames": [x["sink_frames"] for x in b],
                                     "per_frame": per_frame}, label=tag)
    raise AssertionError(f"no lowering for {p!r}")


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


def lower_pattern(p: Pattern, shape: tuple, heads: int, head: Optional[int] = None):
    """Lower a pattern to IR. ``head=None``: per-head values as table lookups (for printing);
    ``head=h``: everything specialised to head h (for the BlockMask and the kernels).
    Returns (ir, tables)."""
    t = Tables(head)
    idx = [0]

    def go(n):
        if isinstance(n, Full):
            return Sep(tuple(DimRange() for _ in shape), label="full")
        if isinstance(n, Empty):
            return Const(False)
        if isinstance(n, Not):
            return simplify(NotN(go(n.a)), shape)
        if isinstance(n, And):
            return simplify(AndN((go(n.a), go(n.b))), shape)
        if isinstance(n, Or):
            return simplify(OrN((go(n.a), go(n.b))), shape)
        if isinstance(n, Heads):
            n.bind(shape, heads)
            if head is not None:
                return go(n.patterns[head])
            kids = tuple(go(x) for x in n.patterns)
            return kids[0] if all(k == kids[0] for k in kids) else HeadsN(kids)
        return _lower_leaf(n, shape, heads, t, idx)

    return go(p), t


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
                    dims = tuple(DimRange(tighten(d.lo, L), tighten(d.hi, L), d.steps)
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


def predicate(n, coords_q, coords_k, qf, kf) -> sp.Basic:
    """The IR as one sympy boolean over the given coordinate/flat expressions (built
    unevaluated: the IR is already simplified, and boolean simplification is slow)."""
    with sp.evaluate(False):
        return _predicate(n, coords_q, coords_k, qf, kf)


def _predicate(n, coords_q, coords_k, qf, kf) -> sp.Basic:
    predicate = _predicate
    if isinstance(n, Const):
        return sp.true if n.value else sp.false
    if isinstance(n, Sep):
        return sp.And(*[d.condition(coords_q[i], coords_k[i]) for i, d in enumerate(n.dims)])
    if isinstance(n, Flat):
        return n.expr.xreplace({QF: qf, KF: kf})
    if isinstance(n, AndN):
        return sp.And(*[predicate(c, coords_q, coords_k, qf, kf) for c in n.children])
    if isinstance(n, OrN):
        return sp.Or(*[predicate(c, coords_q, coords_k, qf, kf) for c in n.children])
    if isinstance(n, NotN):
        return sp.Not(predicate(n.child, coords_q, coords_k, qf, kf))
    if isinstance(n, HeadsN):
        return sp.Or(*[sp.And(sp.Eq(H, i), predicate(c, coords_q, coords_k, qf, kf))
                       for i, c in enumerate(n.children)])
    raise AssertionError(n)


# ------------------------------------------------------------------------------ scores

def lower_score(score, shape: tuple, heads: int, t: Tables) -> Optional[sp.Expr]:
    """The score terms as one sympy expression of ``score``, grid coordinates, flat indices and
    the head (per-head and tensor parameters as table lookups). None when there is no additive
    term or softcap. ``sink_logit`` and ``dropout`` are skipped: they act on the softmax."""
    from .._score import (Alibi, DistanceDecay, Dropout, RelativeBias, SinkLogit, Softcap,
                          geometric_slopes, score_terms)

    terms = [t for t in score_terms(score) if not isinstance(t, (SinkLogit, Dropout))]
    if not terms:
        return None
    expr = SCORE
    cap = None
    for i, term in enumerate(terms):
        b = term.bind(shape, heads)
        tag = f"{term._name}{i}"

        def value(key):
            v = getattr(term, key)
            if _is_tensor(v):
                base = t.tensor(f"{tag}_{key}", v.reshape(-1))
                return base[H] if v.numel() > 1 else base[0]
            return t.lookup(f"{tag}_{key}", [float(x[key]) for x in b])

        if isinstance(term, (SinkLogit, Dropout)):
            continue  # not score terms: the runtime applies them (Flex cannot; see dispatch)
        if isinstance(term, DistanceDecay):
            dims = b[0]["dims"]
            diffs = [Q[d] - K[d] for d in dims]
            if term.metric == "euclidean":
                dist = sp.sqrt(sp.Add(*[x ** 2 for x in diffs]))
            elif term.metric == "manhattan":
                dist = sp.Add(*[sp.Abs(x) for x in diffs])
            else:
                dist = smax(*[sp.Abs(x) for x in diffs]) if len(diffs) > 1 else sp.Abs(diffs[0])
            expr = expr - value("rate") * dist
        elif isinstance(term, Alibi):
            if term.slopes == "geometric":
                slope = t.lookup(f"{tag}_slopes", geometric_slopes(heads))
            else:
                slope = value("slopes")
            expr = expr - slope * sp.Abs(QF - KF)
        elif isinstance(term, RelativeBias):
            info = b[0]
            base = t.tensor(f"{tag}_table", term.table)
            idx = [smin(smax(K[d] - Q[d], -R), R) + R for d, R in enumerate(info["radius"])]
            expr = expr + (base[tuple(idx)] if info["shared"] else base[(H, *idx)])
        elif isinstance(term, Softcap):
            cap = value("cap")
        else:
            raise AssertionError(term)
    if cap is not None:
        expr = cap * sp.tanh(expr / cap)
    return expr
