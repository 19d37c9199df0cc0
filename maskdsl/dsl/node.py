"""The base of every DSL node: frozen dataclass, checked fields, constructor-call repr,
structural equality (tensors compare by identity) and per-head binding."""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Sequence
from typing import ClassVar, Dict, List
import torch
import contextlib

from maskdsl._errors import MaskDSLError
from .values import (Check, _is_tensor, at_head, dim_count, fmt_value, head_counts,
    normalize, per_head)

__all__ = ["Node", "walk", "dsl", "DSL_NAMES", "check_shape", "check_heads"]

#: Every DSL constructor by name (``neighborhood``, ``softcap``, ``per_head``, ...): the parser's
#: whitelist and the public names of ``maskdsl`` come from here, filled by ``@dsl``.
DSL_NAMES: Dict[str, object] = {}


def dsl(fn):
    """Register a DSL constructor (its ``__name__`` is its name in the text form)."""
    DSL_NAMES[fn.__name__] = fn
    return fn


dsl(per_head)


def walk(node):
    """Every node of a tree, parents first, children left to right (one walk for every pass:
    ``Node.children``). Iterative: a wide ``heads([...])`` or ``&``/``|`` of thousands of
    patterns costs no Python stack."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.children()))


class SameForEveryHead(Sequence):
    """What ``Node.bind`` returns for a node whose heads all bind alike: a read-only sequence of
    ``heads`` times the same dict, in O(1) memory (a pattern of many heads, ``heads([...])``,
    binds each of its leaves for every head without an O(heads) list per leaf)."""

    __slots__ = ("one", "heads")

    def __init__(self, one: dict, heads: int):
        self.one, self.heads = one, heads

    def __len__(self) -> int:
        return self.heads

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.one] * len(range(*i.indices(self.heads)))
        if not -self.heads <= i < self.heads:
            raise IndexError(f"head {i} out of range for {self.heads} heads")
        return self.one

    def __iter__(self):
        return itertools.repeat(self.one, self.heads)

    def __repr__(self) -> str:
        return f"SameForEveryHead({self.one!r}, heads={self.heads})"


def _key_of(v):
    if _is_tensor(v):
        return ("<tensor>", id(v))
    if isinstance(v, tuple):
        return tuple(_key_of(x) for x in v)
    return v


class Node:
    """Base class of pattern and score nodes.

    Subclasses are frozen dataclasses (``eq=False``: equality is defined here) and set

    * ``_name``: the DSL constructor name used by ``repr`` and the parser,
    * ``_checks``: ``{field: Check}`` for numeric fields, normalised in ``__post_init__``,
    * ``_npos``: how many leading fields ``repr`` prints positionally,
    * ``_bind_head(p, shape, heads, where)`` for the checks that need the grid shape.
    """

    _name: ClassVar[str] = "?"
    _checks: ClassVar[Dict[str, Check]] = {}
    _npos: ClassVar[int] = 0

    # ---------------------------------------------------------------- construction
    def __post_init__(self):
        for name, check in self._checks.items():
            v = getattr(self, name)
            object.__setattr__(self, name, normalize(self._name, name, v, check))
        counts = set()
        for name in self._checks:
            counts |= head_counts(getattr(self, name))
        if len(counts) > 1:
            shown = ", ".join(
                f"{n} has {c.pop()}" for n in self._checks
                if (c := head_counts(getattr(self, n)))
            )
            raise MaskDSLError(
                f"{self._name}: per_head lists must all have the same length; {shown}"
            )
        dims = {
            n: dim_count(getattr(self, n)) for n, c in self._checks.items() if c.per_dim
        }
        for n, d in dims.items():
            if d == -1:
                raise MaskDSLError(
                    f"{self._name}: {n}={fmt_value(getattr(self, n))}: per_head tuples must all "
                    f"have the same number of entries"
                )
        named = {n: d for n, d in dims.items() if d is not None}
        if len(set(named.values())) > 1:
            shown = ", ".join(f"{n} has {d}" for n, d in named.items())
            raise MaskDSLError(
                f"{self._name}: per-dimension parameters disagree on the number of dimensions: {shown}"
            )
        self._check()

    def _check(self) -> None:
        """Cross-field checks that need no shape (override)."""

    def children(self) -> tuple:
        """The nodes below this one (leaves: none)."""
        return ()

    def _head_count(self) -> int:
        counts = set()
        for name in self._checks:
            counts |= head_counts(getattr(self, name))
        return counts.pop() if counts else 1

    def _rank_hint(self) -> int:
        ranks = [
            d for n, c in self._checks.items() if c.per_dim
            and (d := dim_count(getattr(self, n))) is not None
        ]
        return ranks[0] if ranks else 1

    # ---------------------------------------------------------------- binding
    def bind(self, shape: tuple, heads: int) -> List[dict]:
        """Resolve this node's parameters for every head of a grid ``shape``.

        Returns one dict per head with every per_head value resolved and every per-dim
        value broadcast to ``len(shape)`` entries: a list, or for a node without per_head
        values a ``SameForEveryHead`` sequence (one dict, resolved once, for every head; the
        dicts are read-only). Raises MaskDSLError for a per_head list whose length is not
        ``heads`` and for parameters the shape cannot hold.
        """
        varies = self._check_head_counts(heads)
        shape = tuple(shape)
        if not varies:     # every head alike: resolved once, O(1) time and memory per node
            return SameForEveryHead(self._bind_one(shape, heads, 0, False), heads)
        return [self._bind_one(shape, heads, h, True) for h in range(heads)]

    def bind_head(self, shape: tuple, heads: int, h: int) -> dict:
        """``bind(shape, heads)[h]`` with only head ``h``'s shape checks, in O(1) per node: for
        passes that run once per head (lowering each head of ``heads([...])``) after the whole
        node has been bound once (``bind``), so every head's errors were raised already."""
        varies = self._check_head_counts(heads)
        return self._bind_one(tuple(shape), heads, h, varies)

    def _check_head_counts(self, heads: int) -> bool:
        """MaskDSLError for a per_head list whose length is not ``heads``; whether any field
        has per_head values."""
        varies = False
        for name in self._checks:
            v = getattr(self, name)
            for c in head_counts(v):
                varies = True
                if c != heads:
                    raise MaskDSLError(
                        f"{self._name}: {name}={fmt_value(v)} has {c} values but heads={heads}; "
                        f"give one value per head"
                    )
        return varies

    def _bind_one(self, shape: tuple, heads: int, h: int, varies: bool) -> dict:
        if varies:
            p = {f.name: at_head(getattr(self, f.name), h) for f in dataclasses.fields(self)}
        else:
            p = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return self._bind_head(p, shape, heads, f" (head {h})" if varies else "")

    def _bind_head(self, p: dict, shape: tuple, heads: int, where: str) -> dict:
        return p

    # ---------------------------------------------------------------- identity
    def _key(self):
        return tuple(_key_of(getattr(self, f.name)) for f in dataclasses.fields(self))

    def __eq__(self, other):
        if type(self) is not type(other):
            return NotImplemented
        return self._key() == other._key()

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self):
        return hash((type(self).__name__, self._key()))

    def __repr__(self) -> str:
        args = []
        for i, f in enumerate(dataclasses.fields(self)):
            v = getattr(self, f.name)
            if i >= self._npos and f.default is not dataclasses.MISSING and _same(v, f.default):
                continue
            text = self._fmt_field(f.name, v)
            args.append(text if i < self._npos else f"{f.name}={text}")
        return f"{self._name}({', '.join(args)})"

    def _repr_pretty_(self, printer, cycle):  # IPython / Hypothesis show the DSL spelling
        printer.text(repr(self))

    def _fmt_field(self, name: str, v) -> str:
        return fmt_value(v)

    def __reduce__(self):
        # Pickle keeps only the spec: the constructor and its arguments.
        return (type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self)))


def _same(a, b) -> bool:
    if _is_tensor(a) or _is_tensor(b):
        return a is b
    return type(a) is type(b) and a == b or (
        isinstance(a, numbers.Real) and isinstance(b, numbers.Real) and a == b
        and not isinstance(a, bool) and not isinstance(b, bool)
    )


def check_shape(shape) -> tuple:
    """Normalise and check a grid shape: 1 to 3 positive ints."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= 3:
        raise MaskDSLError(
            f"shape={shape!r}: expected a tuple of 1 to 3 positive ints, e.g. (64, 64)"
        )
    out = []
    for i, s in enumerate(shape):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise MaskDSLError(f"shape[{i}]={s!r}: expected a positive int")
        out.append(int(s))
    if math.prod(out) > 2**31 - 1:
        raise MaskDSLError(f"shape={tuple(out)}: {math.prod(out)} tokens exceeds 2**31 - 1")
    return tuple(out)


MAX_HEADS = 65536   # per-head parameters are bound and lowered once per head: keep it finite


def check_heads(heads) -> int:
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1:
        raise MaskDSLError(f"heads={heads!r}: expected a positive int")
    if heads > MAX_HEADS:
        raise MaskDSLError(f"heads={heads}: expected an int in [1, {MAX_HEADS}]")
    return int(heads)


def check_user_fn(where: str, fn, name, signature: str) -> str:
    """A user's Python function (``mask_fn``, ``score_fn``): MaskDSLError unless ``fn`` is
    callable; returns its name (``name``, else ``fn.__name__`` when an identifier, else "fn")."""
    if isinstance(fn, Node) or not callable(fn):
        text = repr(fn)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise MaskDSLError(f"{where}: fn={text}: expected a callable {signature}")
    out = name
    if out is None:
        out = getattr(fn, "__name__", None)
        if not isinstance(out, str) or not out.isidentifier():
            out = "fn"                                # lambdas, partials, callable objects
    if not isinstance(out, str) or not out.strip() or len(out) > 100:
        text = repr(name)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise MaskDSLError(f"{where}: name={text}: expected a non-empty string of at most 100 "
                           f"characters")
    return out


def probe_indices(shape: tuple):
    """int64 [P]: the few flat token indices a user's function is first called on (the first
    and last two, the middle), so a wrong result fails at compile time, naming the function."""
    n = math.prod(shape)
    return torch.tensor(sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n))), dtype=torch.int64)


def call_user(node, what: str, fn, args: tuple, where, grad: bool = False):
    """``fn(*args)`` (without autograd unless ``grad``: a score_fn's captured tensors may
    learn); any exception from the user's code becomes one MaskDSLError line naming ``node``,
    ``what`` raised it and how it was called (``where``: a string, or a function of ``args``
    that makes it, only on failure)."""
    with contextlib.nullcontext() if grad else torch.no_grad():
        try:
            return fn(*args)
        except MaskDSLError:
            raise
        except Exception as e:   # the user's code: any error becomes one line naming it
            said = where(args) if callable(where) else where
            raise MaskDSLError(f"{node!r}: {what} raised {type(e).__name__}: {e} {said}") from None


def broadcasts_to(t, shape: tuple) -> bool:
    """Whether tensor ``t`` broadcasts to exactly ``shape``."""
    try:
        return tuple(torch.broadcast_shapes(tuple(t.shape), tuple(shape))) == tuple(shape)
    except RuntimeError:
        return False
