"""What a compiled attention covers beyond square self-attention over one grid, as asked and
checked (ARCHITECTURE.md, "Extra tokens" and "Sub-ranges and the KV cache"): ``extra_tokens``
(tokens after the grid's, attended by every query; ``extra="all"``: they are queries too,
attending every key; ``extra="keys"``: keys/values only, NATTEN's additional KV) and
``q_range`` / ``kv_range`` (queries and keys are the global grid's tokens with flat index in the
range). The reference reads it in its own words; the backends take a sub-range in their
``Spec``; ``runtime.extent`` composes extra tokens."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

from maskdsl._errors import MaskDSLError
from .score import Dropout, ScoreFn, score_terms

__all__ = ["Extent", "check_extent", "EXTRA_MODES"]

EXTRA_MODES = ("all", "keys")


@dataclass(frozen=True)
class Extent:
    """``n``: grid tokens; ``extra``: extra tokens E; ``mode``: "all" or "keys"; ``q`` and
    ``kv``: the (start, end) flat ranges of the queries and keys."""

    n: int
    extra: int = 0
    mode: str = "all"
    q: Optional[Tuple[int, int]] = None
    kv: Optional[Tuple[int, int]] = None

    @property
    def square(self) -> bool:
        return self.extra == 0 and self.q is None and self.kv is None

    @property
    def ranged(self) -> bool:
        """A sub-range request (``q_range`` or ``kv_range``)."""
        return self.q is not None or self.kv is not None

    @property
    def nq(self) -> int:
        """Query tokens a call passes."""
        if self.q is not None:
            return self.q[1] - self.q[0]
        return self.n + (self.extra if self.mode == "all" else 0)

    @property
    def nk(self) -> int:
        """Key/value tokens a call passes."""
        if self.kv is not None:
            return self.kv[1] - self.kv[0]
        return self.n + self.extra

    @property
    def q0(self) -> int:
        return 0 if self.q is None else self.q[0]

    @property
    def k0(self) -> int:
        return 0 if self.kv is None else self.kv[0]

    def key(self) -> tuple:
        return (self.extra, self.mode, self.q, self.kv)

    def describe(self) -> str:
        parts = []
        if self.extra:
            parts.append(f"extra_tokens={self.extra}" + (", extra='keys'" if self.mode == "keys"
                                                         else ""))
        if self.q is not None:
            parts.append(f"q_range={self.q}")
        if self.kv is not None:
            parts.append(f"kv_range={self.kv}")
        return ", ".join(parts)


def _range(name: str, r, n: int):
    if r is None:
        return None
    if (not isinstance(r, (tuple, list)) or len(r) != 2
            or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in r)):
        raise MaskDSLError(f"{name}={r!r}: expected a pair (start, end) of ints with "
                           f"0 <= start < end <= {n}")
    a, b = int(r[0]), int(r[1])
    if not 0 <= a < b <= n:
        raise MaskDSLError(f"{name}={r!r}: expected 0 <= start < end <= {n} (the grid's tokens)")
    return (a, b)


def check_extent(shape: tuple, extra_tokens=0, extra="all", q_range=None, kv_range=None,
                 score=None) -> Extent:
    """The checked request for a grid of ``shape``; MaskDSLError names the field, the value and
    the legal range."""
    n = math.prod(shape)
    if (isinstance(extra_tokens, bool) or not isinstance(extra_tokens, numbers.Integral)
            or not 0 <= extra_tokens <= 2 ** 31 - 1 - n):
        raise MaskDSLError(f"extra_tokens={extra_tokens!r}: expected an int in "
                           f"[0, {2 ** 31 - 1 - n}]")
    if extra not in EXTRA_MODES:
        raise MaskDSLError(f"extra={extra!r}: expected 'all' (extra tokens are queries and keys) "
                           f"or 'keys' (keys and values only)")
    q, kv = _range("q_range", q_range, n), _range("kv_range", kv_range, n)
    ext = Extent(n, int(extra_tokens), extra, q, kv)
    if ext.extra and (q is not None or kv is not None):
        raise MaskDSLError("extra_tokens with q_range/kv_range: expected one or the other "
                           "(split the extra tokens off and merge with md.merge)")
    if not ext.square:
        for t in score_terms(score):
            if isinstance(t, Dropout):
                raise MaskDSLError(f"{ext.describe()}: dropout is not supported beyond square "
                                   f"self-attention; drop the dropout term")
            if isinstance(t, ScoreFn) and ext.extra:
                raise MaskDSLError(f"{ext.describe()}: score_fn {t.name!r} is defined on grid "
                                   f"indices; extra tokens take softcap, sink_logit and the "
                                   f"grid-distance terms only")
    return ext
