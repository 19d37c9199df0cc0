"""Pattern nodes: the predicates ``allowed(h, q, k)`` of the DSL and their algebra.

The exact semantics of every node are written in ARCHITECTURE.md (Semantics) and implemented,
independently of the compiler, in :mod:`maskdsl.reference`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Tuple
import torch

from maskdsl._errors import MaskDSLError
from .node import Node, broadcasts_to, call_user, check_user_fn, dsl, probe_indices
from .score import Score
from .values import (Check, PerHead, _fmt, _is_tensor, at_head, check_dims,
    dims_in_shape, per_dim)

__all__ = [
    "Pattern", "Neighborhood", "Window", "Causal", "Block", "Sink", "Full", "Empty",
    "Document", "Radial", "Power", "MaskFn", "And", "Or", "Not", "Heads",
    "neighborhood", "window", "causal", "block", "sink", "full", "empty", "document",
    "radial", "power", "mask_fn", "heads",
]

def _int(lo: int, *, per_dim=False, per_head=True) -> Check:
    return Check("int", lo, per_dim=per_dim, per_head=per_head)


class Pattern(Node):
    """Base class of the locality patterns; combine them with ``&``, ``|`` and ``~``."""

    _prec: ClassVar[int] = 4  # binding strength in repr: | = 1, & = 2, ~ = 3, atoms = 4

    def __and__(self, other):
        return And(self, _as_pattern(other, "&"))

    def __rand__(self, other):
        return And(_as_pattern(other, "&"), self)

    def __or__(self, other):
        return Or(self, _as_pattern(other, "|"))

    def __ror__(self, other):
        return Or(_as_pattern(other, "|"), self)

    def __invert__(self):
        return Not(self)

    def __add__(self, other):
        raise MaskDSLError(
            f"+ combines score terms, got the pattern {self!r}; combine patterns with & or |"
        )

    __radd__ = __add__


def _as_pattern(x, op: str) -> Pattern:
    if not isinstance(x, Pattern):
        if isinstance(x, Score):
            raise MaskDSLError(
                f"{op} combines patterns, got the score term {x!r}; pass scores as score=... "
                f"and combine them with +"
            )
        raise MaskDSLError(f"{op} expects a pattern on both sides, got {x!r}")
    return x


# ----------------------------------------------------------------------------- leaves

@dataclass(frozen=True, eq=False, repr=False)
class Neighborhood(Pattern):
    """NATTEN's generalized neighborhood attention, per dimension, AND-ed across dims.

    Args:
        kernel_size: window size K per dim (2 <= K, K * dilation <= shape).
        stride: queries in groups of ``stride`` share a window (1 <= stride <= K).
        dilation: attend within the residue class ``x % dilation``.
        causal: a bool, or one bool per dim.
    """

    kernel_size: Any
    stride: Any = 1
    dilation: Any = 1
    causal: Any = False

    _name: ClassVar[str] = "neighborhood"
    _checks: ClassVar = {
        "kernel_size": _int(2, per_dim=True),
        "stride": _int(1, per_dim=True),
        "dilation": _int(1, per_dim=True),
    }

    def _check(self):
        c = self.causal
        if isinstance(c, list):
            c = tuple(c)
        if isinstance(c, tuple):
            if not 1 <= len(c) <= 3 or not all(isinstance(x, bool) for x in c):
                raise MaskDSLError(
                    f"neighborhood: causal={c!r}: expected a bool or one bool per dimension"
                )
            named = [len(x) for x in (self.kernel_size, self.stride, self.dilation)
                     if isinstance(x, tuple)]
            if named and named[0] != len(c):
                raise MaskDSLError(
                    f"neighborhood: causal={_fmt(c)} has {len(c)} entries but kernel_size/stride/"
                    f"dilation name {named[0]} dimensions"
                )
        elif not isinstance(c, bool):
            raise MaskDSLError(f"neighborhood: causal={c!r}: expected a bool or one bool per dimension")
        object.__setattr__(self, "causal", c)
        rank = self._rank_hint()
        for h in range(self._head_count()):
            k = per_dim("neighborhood", "kernel_size", at_head(self.kernel_size, h), rank)
            s = per_dim("neighborhood", "stride", at_head(self.stride, h), rank)
            for i in range(rank):
                if s[i] > k[i]:
                    raise MaskDSLError(
                        f"neighborhood: stride[{i}]={s[i]} exceeds kernel_size[{i}]={k[i]}; "
                        f"expected 1 <= stride <= kernel_size"
                    )

    def _bind_head(self, p, shape, heads, where):
        r = len(shape)
        k = per_dim(self._name, "kernel_size", p["kernel_size"], r)
        s = per_dim(self._name, "stride", p["stride"], r)
        d = per_dim(self._name, "dilation", p["dilation"], r)
        c = per_dim(self._name, "causal", p["causal"], r)
        for i in range(r):
            if k[i] * d[i] > shape[i]:
                with_d = f" with dilation {d[i]}" if d[i] > 1 else ""
                raise MaskDSLError(
                    f"neighborhood: kernel_size[{i}]={k[i]}{with_d} needs shape[{i}] >= "
                    f"{k[i] * d[i]}, got {shape[i]}{where}"
                )
        return {"kernel_size": k, "stride": s, "dilation": d, "causal": c}


@dataclass(frozen=True, eq=False, repr=False)
class Window(Pattern):
    """Truncated sliding window: allowed iff ``-left <= k - q <= right`` on every dim.
    No shifting at the borders (FlashAttention's ``window_size``)."""

    left: Any
    right: Any = None

    _name: ClassVar[str] = "window"
    _npos: ClassVar[int] = 1
    _checks: ClassVar = {
        "left": _int(0, per_dim=True),
        "right": _int(0, per_dim=True),
    }

    def __post_init__(self):
        if self.right is None:
            object.__setattr__(self, "right", self.left)
        super().__post_init__()

    def __repr__(self):
        if self.right == self.left:
            return f"window({_fmt_any(self.left)})"
        return f"window({_fmt_any(self.left)}, right={_fmt_any(self.right)})"

    def _bind_head(self, p, shape, heads, where):
        r = len(shape)
        return {"left": per_dim(self._name, "left", p["left"], r),
                "right": per_dim(self._name, "right", p["right"], r)}


def _clip_repr(v, n: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def _fmt_any(v):
    return repr(v) if isinstance(v, PerHead) else _fmt(v)


@dataclass(frozen=True, eq=False, repr=False)
class Causal(Pattern):
    """``k <= q`` on each listed dim (all dims by default; 1-D: the usual causal mask)."""

    dims: Any = None

    _name: ClassVar[str] = "causal"

    def _check(self):
        object.__setattr__(self, "dims", check_dims("causal", self.dims))

    def _bind_head(self, p, shape, heads, where):
        return {"dims": dims_in_shape("causal", self.dims, shape)}


@dataclass(frozen=True, eq=False, repr=False)
class Block(Pattern):
    """Windows of ``size`` tokens per dim, shifted by ``shift``: allowed iff
    ``(q + size - shift) // size == (k + size - shift) // size`` on every dim.

    ``shift=0`` is Swin's window attention; ``shift=size // 2`` is exactly Swin's shifted windows
    (cyclic roll by ``-shift``, window partition, region mask), in the user's coordinates and
    without rolling any tensor.
    """

    size: Any
    shift: Any = 0

    _name: ClassVar[str] = "block"
    _npos: ClassVar[int] = 1
    _checks: ClassVar = {"size": _int(1, per_dim=True), "shift": _int(0, per_dim=True)}

    def _check(self):
        rank = self._rank_hint()
        for h in range(self._head_count()):
            size = per_dim("block", "size", at_head(self.size, h), rank)
            shift = per_dim("block", "shift", at_head(self.shift, h), rank)
            for i in range(rank):
                if shift[i] >= size[i]:
                    raise MaskDSLError(
                        f"block: shift[{i}]={shift[i]} is not below size[{i}]={size[i]}; "
                        f"expected 0 <= shift < size"
                    )

    def _bind_head(self, p, shape, heads, where):
        size = per_dim(self._name, "size", p["size"], len(shape))
        shift = per_dim(self._name, "shift", p["shift"], len(shape))
        for i, (b, n) in enumerate(zip(size, shape)):
            if b > n:
                raise MaskDSLError(
                    f"block: size[{i}]={b} exceeds shape[{i}]={n}; expected 1 <= size <= {n}{where}"
                )
        return {"size": size, "shift": shift}


@dataclass(frozen=True, eq=False, repr=False)
class Sink(Pattern):
    """The first ``n`` tokens (flat index) are visible to every query."""

    n: Any

    _name: ClassVar[str] = "sink"
    _npos: ClassVar[int] = 1
    _checks: ClassVar = {"n": _int(0)}

    def _bind_head(self, p, shape, heads, where):
        total = math.prod(shape)
        if p["n"] > total:
            raise MaskDSLError(
                f"sink: n={p['n']} exceeds the {total} tokens of shape {shape}; "
                f"expected 0 <= n <= {total}{where}"
            )
        return {"n": p["n"]}


@dataclass(frozen=True, eq=False, repr=False)
class Full(Pattern):
    """Every key is visible (the identity of ``&``)."""

    _name: ClassVar[str] = "full"


@dataclass(frozen=True, eq=False, repr=False)
class Empty(Pattern):
    """No key is visible (the identity of ``|``)."""

    _name: ClassVar[str] = "empty"


@dataclass(frozen=True, eq=False, repr=False)
class Document(Pattern):
    """Sequence packing: allowed iff ``ids[q] == ids[k]``; ``ids`` has one int per token."""

    ids: Any

    _name: ClassVar[str] = "document"
    _npos: ClassVar[int] = 1

    def _check(self):
        ids = self.ids
        if _is_tensor(ids):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise MaskDSLError(
                    f"document: ids: expected a 1-D integer tensor, got dtype {ids.dtype} "
                    f"shape {list(ids.shape)}"
                )
            return
        if isinstance(ids, list):
            ids = tuple(ids)
        if (not isinstance(ids, tuple) or len(ids) == 0
                or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in ids)):
            raise MaskDSLError(
                f"document: ids={_clip_repr(self.ids)}: expected a non-empty list of ints (one "
                f"per token) or a 1-D integer tensor"
            )
        for i, x in enumerate(ids):   # ids become int64 tables in generated code
            if not -2**63 <= x < 2**63:
                raise MaskDSLError(
                    f"document: ids[{i}]={x} is out of range: expected an int in "
                    f"[-2**63, 2**63) (int64)"
                )
        object.__setattr__(self, "ids", tuple(int(x) for x in ids))

    def _fmt_field(self, name, v):
        if isinstance(v, tuple):
            return "[" + ", ".join(map(str, v)) + "]"
        return super()._fmt_field(name, v)

    def _bind_head(self, p, shape, heads, where):
        n = math.prod(shape)
        length = self.ids.shape[0] if _is_tensor(self.ids) else len(self.ids)
        if length != n:
            raise MaskDSLError(
                f"document: ids has {length} entries but shape {shape} has {n} tokens; "
                f"expected one id per token"
            )
        return {"ids": self.ids}


@dataclass(frozen=True, eq=False, repr=False)
class Radial(Pattern):
    """Radial Attention's token mask for video: dim 0 is time, the rest is one frame.

    Frames ``d <= 1`` apart (or keys in the first ``sink_frames`` frames) see each other
    fully; farther frames see a spatial band that halves with each doubling of ``d``, and
    once the band would drop below ``min_window`` only every ``min_window / band``-th frame
    is kept. Token-exact (no 128x128 coarsening).
    """

    decay: Any = 1.0
    min_window: Any = 128
    sink_frames: Any = 0

    _name: ClassVar[str] = "radial"
    _checks: ClassVar = {
        "decay": Check("float", 0),
        "min_window": Check("float", 0, lo_open=True),
        "sink_frames": _int(0),
    }

    def _bind_head(self, p, shape, heads, where):
        if p["sink_frames"] > shape[0]:
            raise MaskDSLError(
                f"radial: sink_frames={p['sink_frames']} exceeds the {shape[0]} frames of "
                f"shape {shape} (dim 0 is time){where}"
            )
        return dict(p)


@dataclass(frozen=True, eq=False, repr=False)
class Power(Pattern):
    """PowerAttention: key block ``D`` blocks back is visible iff ``D == 0`` or ``D`` is a
    power of two (blocks of ``block`` tokens on the flat index)."""

    block: Any = 1

    _name: ClassVar[str] = "power"
    _checks: ClassVar = {"block": _int(1)}


@dataclass(frozen=True, eq=False, repr=False)
class MaskFn(Pattern):
    """A user-written mask_mod as a leaf: ``fn(b, h, q_idx, kv_idx) -> bool tensor``, flex's
    signature, on *flat row-major* token indices of the user's grid (whatever layout a backend
    runs, the generated code converts positions to flat indices before calling ``fn``).

    ``fn`` is called with broadcast integer tensors (it must be broadcast-safe, as under flex's
    ``create_mask``): ``b`` is always 0 (maskdsl masks never vary per batch), ``h`` the head.
    ``key_range``: optional ``key_range(q_idx) -> (lo, hi)``, per query a superset half-open
    interval ``[lo, hi)`` of the flat keys ``fn`` may allow; the tile classifier then evaluates
    ``fn`` only on tile pairs that meet it. Without it every tile pair is evaluated (O(N^2) work,
    bounded memory, refused beyond ``codegen.blockmask.MASK_FN_MAX_PAIRS`` token pairs). A
    range with lo > hi is an error; one narrower than ``fn``'s keys is found on the skipped pairs
    exactly up to 4096 tokens, by the keys next to each range and a seeded sample beyond
    (``codegen.blockmask.check_key_range``; ARCHITECTURE.md, "Semantics").

    Equality and cache keys are by the function object (``fn`` and ``key_range`` identity, and
    ``name``): two different functions never share a compiled structure. ``fn`` must be pure:
    what it returns for the same indices must not change after the pattern is compiled.
    """

    fn: Any
    name: Any = None
    key_range: Any = None

    _name: ClassVar[str] = "mask_fn"

    def _check(self):
        name = check_user_fn("mask_fn", self.fn, self.name,
                             "fn(b, h, q_idx, kv_idx) -> bool tensor (flex's mask_mod signature)")
        object.__setattr__(self, "name", name)
        if self.key_range is not None and (isinstance(self.key_range, Node)
                                           or not callable(self.key_range)):
            raise MaskDSLError(
                f"mask_fn: key_range={_clip_repr(self.key_range)}: expected None or a callable "
                f"key_range(q_idx) -> (lo, hi), a superset [lo, hi) of each query's flat keys")

    def __repr__(self):
        text = f"mask_fn(name={self.name!r}"
        if self.key_range is not None:
            text += f", key_range={getattr(self.key_range, '__name__', 'fn')}"
        return text + ")"

    def bind(self, shape, heads):
        out = super().bind(shape, heads)
        self.probe(tuple(shape))
        return out

    def probe(self, shape: tuple) -> None:
        """Call ``fn`` (and ``key_range``) once on a few tokens of ``shape`` and check what they
        return: a MaskDSLError naming the field, at compile time, instead of a failure deep in
        a backend."""
        idx = probe_indices(shape)
        P = len(idx)
        # one query fewer than keys: a mask returned transposed ([kv, q]) cannot pass
        qi = idx[: max(1, P - 1)]
        zero = torch.zeros((), dtype=torch.int64)
        where = (f"when called with b=0, h=0 and int64 tensors q_idx [{len(qi)}, 1], kv_idx "
                 f"[1, {P}] (fn must be broadcast-safe)")
        out = call_user(self, "fn", self.fn, (zero, zero, qi[:, None], idx[None, :]), where)
        check_mask_result(self, out, (len(qi), P), where)
        if self.key_range is not None:
            r = call_user(self, "key_range", self.key_range, (idx,),
                          f"when called with an int64 tensor q_idx [{P}]")
            check_key_range_result(self, r, idx)


def check_mask_result(node, out, shape: tuple, where: str) -> None:
    """``fn``'s result must be a bool tensor that broadcasts to ``shape`` (q x kv)."""
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        got = (f"a {out.dtype} tensor" if isinstance(out, torch.Tensor)
               else f"{type(out).__name__} {_clip_repr(out, 40)}")
        raise MaskDSLError(f"{node!r}: fn returned {got} {where}; expected a bool tensor")
    if not broadcasts_to(out, shape):
        raise MaskDSLError(
            f"{node!r}: fn returned shape {list(out.shape)} {where}; expected a bool tensor "
            f"broadcastable to {list(shape)} (the broadcast of q_idx and kv_idx)")


def check_key_range_result(node, r, q) -> tuple:
    """``key_range(q)``'s result for the int64 query indices ``q`` [P]: (lo, hi), ints or
    integer tensors broadcastable to q, with lo <= hi for every query (lo == hi: no key).
    Returns them as int64 tensors [P] on q's device; MaskDSLError naming key_range otherwise."""
    P = q.numel()
    ok = isinstance(r, (tuple, list)) and len(r) == 2
    for x in (r if ok else ()):
        if isinstance(x, torch.Tensor):
            ok = ok and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
            ok = ok and broadcasts_to(x, (P,))
        else:
            ok = ok and isinstance(x, numbers.Integral) and not isinstance(x, bool)
    if not ok:
        raise MaskDSLError(
            f"{node!r}: key_range returned {_clip_repr(r, 60)} for an int64 tensor q_idx [{P}]; "
            f"expected (lo, hi): ints or integer tensors broadcastable to q_idx")
    lo, hi = (torch.as_tensor(x).to(device=q.device, dtype=torch.int64).expand(P) for x in r)
    bad = lo > hi
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise MaskDSLError(
            f"{node!r}: key_range gives lo={int(lo[i])} > hi={int(hi[i])} for query "
            f"{int(q[i])}; expected lo <= hi: a half-open interval [lo, hi) of flat keys "
            f"(lo == hi for a query that sees no key)")
    return lo, hi


# ----------------------------------------------------------------------------- algebra

MAX_NESTING = 60    # & | ~ heads inside one another (every pass recurses; the parser reads 64 levels)


def _nesting(p) -> int:
    """How many operators (``&``/``|`` chains, ``~``, ``heads``) nest above p's deepest leaf."""
    return getattr(p, "_nest", 0)


def _nest_to(node: Pattern, depth: int) -> None:
    """Record ``node``'s nesting depth; MaskDSLError beyond ``MAX_NESTING`` (a chain of one
    operator, ``a | b | c | ...``, is one level however long: combine thousands of patterns
    that way, e.g. ``functools.reduce(operator.or_, patterns)``)."""
    if depth > MAX_NESTING:
        raise MaskDSLError(
            f"{node._name}: the pattern nests {depth} levels deep (&, | and ~ inside one another, "
            f"or heads([...])); expected at most {MAX_NESTING} levels. A chain of one operator "
            f"is one level however long: combine many patterns as a | b | c | ... "
            f"(functools.reduce(operator.or_, patterns)), not as a | (b | (c | ...))")
    object.__setattr__(node, "_nest", depth)


@dataclass(frozen=True, eq=False, repr=False, init=False)
class _Chain(Pattern):
    """``a & b & c ...`` (or ``|``): the left-associative chain ``(a & b) & c`` stored flat in
    ``parts``, so a union of thousands of patterns is one node, not thousands of nested ones.
    ``And(a, b, c)`` is ``(a & b) & c``; a right operand of the same operator stays one part
    (``a & (b & c)`` keeps its parentheses: structure and repr are those of the binary tree)."""

    parts: Tuple[Pattern, ...]

    def __init__(self, *parts):
        if len(parts) < 2:
            raise MaskDSLError(f"{self._name} combines at least two patterns, got {len(parts)}")
        first, rest = parts[0], parts[1:]
        for x in (first,) + rest:
            _as_pattern(x, self._name)
        if type(first) is type(self):   # (a & b) & c: one chain
            flat, depth = first.parts + rest, first._nest
        else:
            flat, depth = parts, 1 + _nesting(first)
        for x in rest:
            depth = max(depth, 1 + _nesting(x))
        object.__setattr__(self, "parts", tuple(flat))
        _nest_to(self, depth)
        self.__post_init__()

    @property
    def a(self) -> Pattern:
        """The left operand of the binary form ``a & b`` (the chain without its last part)."""
        return self.parts[0] if len(self.parts) == 2 else type(self)(*self.parts[:-1])

    @property
    def b(self) -> Pattern:
        """The right operand of the binary form ``a & b`` (the last part)."""
        return self.parts[-1]

    def children(self) -> tuple:
        return self.parts

    def __repr__(self):
        texts = []
        for i, x in enumerate(self.parts):
            text = repr(x)
            # left-associative: a & (b & c) keeps its parentheses
            if x._prec < self._prec or (i > 0 and x._prec == self._prec):
                text = f"({text})"
            texts.append(text)
        return f" {self._name} ".join(texts)

    def __reduce__(self):
        return (type(self), self.parts)


@dataclass(frozen=True, eq=False, repr=False, init=False)
class And(_Chain):
    _name: ClassVar[str] = "&"
    _prec: ClassVar[int] = 2


@dataclass(frozen=True, eq=False, repr=False, init=False)
class Or(_Chain):
    _name: ClassVar[str] = "|"
    _prec: ClassVar[int] = 1


@dataclass(frozen=True, eq=False, repr=False)
class Not(Pattern):
    a: Pattern
    _name: ClassVar[str] = "~"
    _prec: ClassVar[int] = 3

    def _check(self):
        _as_pattern(self.a, "~")
        _nest_to(self, 1 + _nesting(self.a))

    def children(self) -> tuple:
        return (self.a,)

    def __repr__(self):
        inner = repr(self.a)
        return "~" + (f"({inner})" if self.a._prec < self._prec else inner)


@dataclass(frozen=True, eq=False, repr=False)
class Heads(Pattern):
    """A different pattern on each head: ``heads([p0, p1, ...])`` (length == heads)."""

    patterns: Tuple[Pattern, ...]

    _name: ClassVar[str] = "heads"

    def _check(self):
        ps = self.patterns
        if isinstance(ps, list):
            ps = tuple(ps)
        if not isinstance(ps, tuple) or len(ps) == 0:
            raise MaskDSLError(
                f"heads: patterns={self.patterns!r}: expected a non-empty list of patterns, "
                f"one per head"
            )
        for i, x in enumerate(ps):
            if not isinstance(x, Pattern):
                raise MaskDSLError(f"heads: patterns[{i}]={x!r}: expected a pattern")
        object.__setattr__(self, "patterns", ps)
        _nest_to(self, 1 + max(_nesting(x) for x in ps))

    def children(self) -> tuple:
        return self.patterns

    def __repr__(self):
        return "heads([" + ", ".join(repr(x) for x in self.patterns) + "])"

    def _bind_head(self, p, shape, heads, where):
        if len(self.patterns) != heads:
            raise MaskDSLError(
                f"heads: got {len(self.patterns)} patterns but heads={heads}; give one pattern per head"
            )
        return p


# ----------------------------------------------------------------------------- constructors

@dsl
def neighborhood(kernel_size, stride=1, dilation=1, causal=False) -> Neighborhood:
    """Neighborhood attention exactly as NATTEN defines it (see :class:`Neighborhood`)."""
    return Neighborhood(kernel_size, stride, dilation, causal)


@dsl
def window(left, right=None) -> Window:
    """Sliding window ``-left <= k - q <= right`` per dim; ``right`` defaults to ``left``."""
    return Window(left, right)


@dsl
def causal(dims=None) -> Causal:
    """``k <= q`` on the listed dims (default: all)."""
    return Causal(dims)


@dsl
def block(size, shift=0) -> Block:
    """Tokens attend within their own block of ``size`` per dim, blocks shifted by ``shift``
    (``shift=size // 2``: Swin's shifted windows); see :class:`Block`."""
    return Block(size, shift)


@dsl
def sink(n) -> Sink:
    """The first ``n`` tokens are visible to all queries."""
    return Sink(n)


@dsl
def full() -> Full:
    """Every key is visible."""
    return Full()


@dsl
def empty() -> Empty:
    """No key is visible."""
    return Empty()


@dsl
def document(ids) -> Document:
    """Packed sequences: a query sees only keys with the same document id."""
    return Document(ids)


@dsl
def radial(decay=1.0, min_window=128, sink_frames=0) -> Radial:
    """Radial Attention's video mask (see :class:`Radial`)."""
    return Radial(decay, min_window, sink_frames)


@dsl
def power(block=1) -> Power:
    """PowerAttention: blocks a power-of-two distance back (see :class:`Power`)."""
    return Power(block)


@dsl
def mask_fn(fn, name=None, key_range=None) -> MaskFn:
    """A user-written mask_mod ``fn(b, h, q_idx, kv_idx) -> bool tensor`` (flex's signature, flat
    row-major indices) as a pattern leaf; ``key_range(q_idx) -> (lo, hi)`` optionally bounds
    each query's keys for the tile classes. Python only: the parser refuses it (code is never
    parsed from text). See :class:`MaskFn`."""
    return MaskFn(fn, name, key_range)


mask_fn._takes_code = True    # the parser refuses it: code is never parsed from text


@dsl
def heads(patterns) -> Heads:
    """One pattern per head."""
    return Heads(tuple(patterns) if isinstance(patterns, list) else patterns)
