"""Score nodes: terms added to ``q . k * scale`` before the softmax, combined with ``+``,
plus the two softmax extras FlexAttention cannot express (``sink_logit``, ``dropout``)."""
from __future__ import annotations

import numbers
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Tuple
import torch

from maskdsl._caching import LRU, function_key
from maskdsl._errors import MaskDSLError
from .node import Node, broadcasts_to, call_user, check_user_fn, dsl, probe_indices
from .values import (Check, _is_tensor, check_dims, check_tensor_values, dims_in_shape,
    fmt_value)
from .values import PerHead

__all__ = [
    "Score", "DistanceDecay", "Alibi", "RelativeBias", "Softcap", "SinkLogit", "Dropout",
    "ScoreSum", "ScoreFn", "distance_decay", "alibi", "relative_bias", "softcap", "sink_logit",
    "dropout", "score_fn",
    "score_terms", "score_varies_per_head", "per_head_tensor", "check_tensor_params",
    "score_extras", "without",
]

METRICS = ("euclidean", "manhattan", "chebyshev")


class Score(Node):
    """Base class of score terms; combine them with ``+``."""

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:
            return self  # lets sum([...]) work
        if not isinstance(other, Score):
            raise MaskDSLError(f"+ expects score terms on both sides, got {other!r}")
        return ScoreSum(score_terms(self) + score_terms(other))

    def __radd__(self, other):
        if isinstance(other, numbers.Number) and other == 0:
            return self
        if not isinstance(other, Score):
            raise MaskDSLError(f"+ expects score terms on both sides, got {other!r}")
        return ScoreSum(score_terms(other) + score_terms(self))

    def _refuse(self, op):
        raise MaskDSLError(
            f"{op} combines patterns, got the score term {self!r}; pass scores as score=... "
            f"and combine them with +"
        )

    def __and__(self, other):
        self._refuse("&")

    __rand__ = __and__

    def __or__(self, other):
        self._refuse("|")

    __ror__ = __or__

    def __invert__(self):
        self._refuse("~")

    #: what the term does to attention (ARCHITECTURE.md, "Adding a score term"): "additive"
    #: (a bias added to q.k * scale before the softmax), "function" (score_fn: any function of
    #: the score, after the additive terms), "nonlinear" (softcap: wraps the score last),
    #: "denominator" (sink_logit: joins only the softmax's sum), "dropout" (drops
    #: probabilities), "sum" (several terms). Backends decide by role, never by type.
    role: ClassVar[str] = ""

    def tensors(self) -> dict:
        """The term's tensor-valued parameters, ``{field: tensor}`` in field order (learnable
        rates, slopes, caps, sink logits, bias tables): read at call time, never baked in."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if _is_tensor(getattr(self, f.name))}

    def varies_per_head(self) -> bool:
        """Whether this term may give one head other values than another, or other values
        when bound to another head count (see :func:`score_varies_per_head`): a per_head or
        tensor parameter. Terms with parameters derived from the head count override it."""
        for v in vars(self).values():
            for x in (v if isinstance(v, tuple) else (v,)):
                if isinstance(x, PerHead) or _is_tensor(x):
                    return True
        return False

    def _bind_head(self, p, shape, heads, where):
        for name, check in self._checks.items():
            v = p.get(name)
            if check.tensor and _is_tensor(v) and v.numel() not in (1, heads):
                raise MaskDSLError(
                    f"{self._name}: {name} is a tensor of shape {list(v.shape)}; expected shape [] "
                    f"or [{heads}] (one value per head)"
                )
        return p


def score_varies_per_head(score) -> bool:
    """Whether any head of ``score`` may differ from another, or change when the score is
    bound to another head count (Ulysses rebinds it to H/W heads): the one place that decides
    it for score terms (``codegen.recipe.varies_per_head(pattern, score)`` adds the pattern).
    Per-head: a ``per_head`` value; a tensor parameter (it may hold one value per head, and is
    read at call time); a parameter derived from the head count (``alibi()``'s geometric
    slopes ``2 ** (-8 (h + 1) / H)``); a ``score_fn`` (called with the head)."""
    return any(t.varies_per_head() for t in score_terms(score))


ROLES = ("additive", "function", "nonlinear", "denominator", "dropout")
#: the roles a generated score_mod holds (the others act on the softmax: the runtime applies them)
SCORE_MOD_ROLES = ("additive", "function", "nonlinear")


def terms_with_role(score, *roles) -> tuple:
    """The terms of ``score`` whose role is one of ``roles``."""
    return tuple(t for t in score_terms(score) if t.role in roles)


def score_tensors(score) -> tuple:
    """Every tensor parameter of ``score``'s terms, in term and field order."""
    return tuple(v for t in score_terms(score) for v in t.tensors().values())


def score_terms(s) -> tuple:
    """The terms of a score (a single term or a ScoreSum) as a flat tuple."""
    if s is None:
        return ()
    if isinstance(s, ScoreSum):
        return s.terms
    return (s,)


_REAL = Check("float", tensor=True)


@dataclass(frozen=True, eq=False, repr=False)
class DistanceDecay(Score):
    """``score - rate_h * dist(q, k)`` on grid coordinates (the radial-decay bias)."""

    rate: Any
    metric: str = "euclidean"
    dims: Any = None

    _name: ClassVar[str] = "distance_decay"
    role: ClassVar[str] = "additive"
    _npos: ClassVar[int] = 1
    _checks: ClassVar = {"rate": _REAL}

    def _check(self):
        if self.metric not in METRICS:
            raise MaskDSLError(
                f"distance_decay: metric={self.metric!r}: expected one of {', '.join(map(repr, METRICS))}"
            )
        object.__setattr__(self, "dims", check_dims("distance_decay", self.dims))

    def _bind_head(self, p, shape, heads, where):
        p = super()._bind_head(p, shape, heads, where)
        return dict(p, dims=dims_in_shape("distance_decay", self.dims, shape))


@dataclass(frozen=True, eq=False, repr=False)
class Alibi(Score):
    """``score - slope_h * |q - k|`` on the flat index. ``slopes="geometric"`` gives the ALiBi
    paper's per-head slopes ``2 ** (-8 (h + 1) / H)`` (with its rule for H not a power of 2)."""

    slopes: Any = "geometric"

    _name: ClassVar[str] = "alibi"
    role: ClassVar[str] = "additive"
    _checks: ClassVar = {"slopes": _REAL}

    def __post_init__(self):
        if isinstance(self.slopes, str):
            if self.slopes != "geometric":
                raise MaskDSLError(
                    f"alibi: slopes={self.slopes!r}: expected 'geometric', a number, per_head([...]) "
                    f"or a tensor"
                )
            return
        super().__post_init__()

    def varies_per_head(self) -> bool:
        # geometric slopes are derived from the head count: head h of H heads gets
        # 2 ** (-8 (h + 1) / H), so no two heads share one and another H changes them all
        return isinstance(self.slopes, str) or super().varies_per_head()


def geometric_slopes(heads: int) -> list:
    """ALiBi's slopes for ``heads`` heads (Press et al., 2022)."""
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 1 << (heads.bit_length() - 1)  # the largest power of two <= heads
    if p == heads:
        return pow2(heads)
    return pow2(p) + pow2(2 * p)[0::2][: heads - p]


@dataclass(frozen=True, eq=False, repr=False)
class RelativeBias(Score):
    """A learnable relative-position bias ``table[h, o_0 + R_0, ..., o_{r-1} + R_{r-1}]`` indexed
    by the per-dim offset ``o_i = k_i - q_i``. The table has shape ``[heads, 2R_0+1, ...]``
    (or no heads dim: shared); offsets beyond ``R_i`` use the edge entry (clipped), so a
    ``(2K-1)``-wide table serves a K-neighborhood and a ``(2S-1)``-wide one covers the grid."""

    table: Any

    _name: ClassVar[str] = "relative_bias"
    role: ClassVar[str] = "additive"
    _npos: ClassVar[int] = 1

    def _check(self):
        t = self.table
        if not _is_tensor(t) or not t.is_floating_point():
            raise MaskDSLError(
                f"relative_bias: table={fmt_value(t)}: expected a floating-point tensor of shape "
                f"[heads, 2*R0+1, ...] or [2*R0+1, ...]"
            )

    def _bind_head(self, p, shape, heads, where):
        t, r = self.table, len(shape)
        if t.dim() == r + 1:
            if t.shape[0] != heads:
                raise MaskDSLError(
                    f"relative_bias: table has shape {list(t.shape)}: its first dim is {t.shape[0]} "
                    f"but heads={heads}"
                )
            sizes = tuple(t.shape[1:])
        elif t.dim() == r:
            sizes = tuple(t.shape)
        else:
            raise MaskDSLError(
                f"relative_bias: table has shape {list(t.shape)}: expected {r} or {r + 1} dims for "
                f"a {r}-D shape {shape} ([heads,] then one odd size 2*R+1 per dim)"
            )
        for i, n in enumerate(sizes):
            if n % 2 == 0:
                raise MaskDSLError(
                    f"relative_bias: table size {n} on grid dim {i} is even; expected an odd size "
                    f"2*R+1 (e.g. {2 * shape[i] - 1} to cover every offset of shape[{i}]={shape[i]})"
                )
        return {"table": t, "radius": tuple(n // 2 for n in sizes), "shared": t.dim() == r}


@dataclass(frozen=True, eq=False, repr=False)
class Softcap(Score):
    """``cap * tanh(score / cap)``, applied after every additive term."""

    cap: Any

    _name: ClassVar[str] = "softcap"
    role: ClassVar[str] = "nonlinear"
    _npos: ClassVar[int] = 1
    _checks: ClassVar = {"cap": Check("float", 0, lo_open=True, tensor=True)}


@dataclass(frozen=True, eq=False, repr=False)
class SinkLogit(Score):
    """A per-head logit that joins the softmax denominator only (no value row)."""

    values: Any

    _name: ClassVar[str] = "sink_logit"
    role: ClassVar[str] = "denominator"
    _npos: ClassVar[int] = 1
    _checks: ClassVar = {"values": _REAL}


@dataclass(frozen=True, eq=False, repr=False)
class Dropout(Score):
    """Attention dropout on the probabilities (kept ones scaled by ``1 / (1 - p)``),
    reproducible from ``seed``."""

    p: Any
    seed: int = 0

    _name: ClassVar[str] = "dropout"
    role: ClassVar[str] = "dropout"
    _npos: ClassVar[int] = 1
    _checks: ClassVar = {
        "p": Check("float", 0, 1, hi_open=True, what="a probability"),
        "seed": Check("int", 0, 2**63, hi_open=True, per_head=False),
    }


_IGNORES = LRU(1024)          # (score_fn's function, shape) -> ignores_score(shape)


@dataclass(frozen=True, eq=False, repr=False)
class ScoreFn(Score):
    """A user-written score_mod as a score term: ``fn(score, b, h, q_idx, kv_idx) -> tensor``,
    flex's signature, on *flat row-major* token indices of the user's grid (ARCHITECTURE.md,
    "Semantics"). It is applied to the score after every additive term and before ``softcap``;
    several apply in the order written. ``fn`` is called with broadcast tensors (it must be
    broadcast-safe) and must return a floating tensor broadcastable to ``score``; ``b`` is
    always 0 (maskdsl scores do not vary per batch), ``h`` the head. Cache keys are by the
    function object (and ``name``), as for ``mask_fn``; ``fn`` must be pure."""

    fn: Any
    name: Any = None

    _name: ClassVar[str] = "score_fn"
    role: ClassVar[str] = "function"

    def _check(self):
        name = check_user_fn("score_fn", self.fn, self.name,
                             "fn(score, b, h, q_idx, kv_idx) -> tensor (flex's score_mod signature)")
        object.__setattr__(self, "name", name)

    def __repr__(self):
        return f"score_fn(name={self.name!r})"

    def varies_per_head(self) -> bool:
        return True          # fn is called with the head and may use it

    def bind(self, shape, heads):
        out = super().bind(shape, heads)
        self.probe(tuple(shape))
        return out

    def _call(self, score, shape: tuple):
        idx = probe_indices(shape)
        P = len(idx)
        zero = torch.zeros((), dtype=torch.int64)
        where = (f"when called with score float32 [{P}, {P}], b=0, h=0 and int64 tensors q_idx "
                 f"[{P}, 1], kv_idx [1, {P}] (fn must be broadcast-safe)")
        return call_user(self, "fn", self.fn, (score, zero, zero, idx[:, None], idx[None, :]),
                         where), where

    def probe(self, shape: tuple) -> None:
        """Call ``fn`` once on a few tokens and check what it returns (a MaskDSLError naming the
        term at compile time, not a failure deep in a backend): a floating tensor (every
        backend casts it to the dtype the score is computed in, as the reference does),
        broadcastable to the score, with the score argument left as it was (flex refuses a
        score_mod that writes its input)."""
        P = len(probe_indices(shape))
        score = torch.randn(P, P, generator=torch.Generator().manual_seed(0))
        before = score.clone()
        out, where = self._call(score, shape)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
            raise MaskDSLError(f"{self!r}: fn returned {got} {where}; expected a floating tensor")
        if not broadcasts_to(out, (P, P)):
            raise MaskDSLError(f"{self!r}: fn returned shape {list(out.shape)} {where}; expected "
                               f"a tensor broadcastable to the score's shape {[P, P]}")
        if not torch.equal(score, before):
            raise MaskDSLError(f"{self!r}: fn changed its score argument in place {where}; "
                               f"expected a new tensor (e.g. score * 0.5, not score.mul_(0.5))")

    def ignores_score(self, shape: tuple) -> bool:
        """Whether ``fn``'s result is the same for two different scores (it replaces the score
        rather than modifying it: a constant, a bias of the indices, the head)."""
        key = (function_key(self.fn), tuple(shape))
        found = _IGNORES.get(key)
        if found is not None:
            return found
        P = len(probe_indices(shape))
        a = torch.randn(P, P, generator=torch.Generator().manual_seed(1))
        out_a, _ = self._call(a, shape)
        out_b, _ = self._call(a * 2 + 1, shape)
        same = bool(torch.equal(torch.broadcast_to(out_a, (P, P)), torch.broadcast_to(out_b, (P, P))))
        _IGNORES.put(key, same)
        return same


@dataclass(frozen=True, eq=False, repr=False)
class ScoreSum(Score):
    """Several score terms; built by ``+``."""

    terms: Tuple[Score, ...]

    _name: ClassVar[str] = "+"
    role: ClassVar[str] = "sum"

    def _check(self):
        seen = {}
        for t in self.terms:
            if not isinstance(t, Score) or isinstance(t, ScoreSum):
                raise MaskDSLError(f"+: expected score terms, got {t!r}")
            if isinstance(t, (Softcap, SinkLogit, Dropout)):
                if type(t) in seen:
                    raise MaskDSLError(
                        f"+: {t._name} appears twice ({seen[type(t)]!r} and {t!r}); "
                        f"expected at most one"
                    )
                seen[type(t)] = t

    def children(self) -> tuple:
        return self.terms

    def __repr__(self):
        return " + ".join(repr(t) for t in self.terms)


@dsl
def distance_decay(rate, metric="euclidean", dims=None) -> DistanceDecay:
    """Subtract ``rate_h * dist(q, k)`` (euclidean, manhattan or chebyshev on grid coords)."""
    return DistanceDecay(rate, metric, dims)


@dsl
def alibi(slopes="geometric") -> Alibi:
    """ALiBi: subtract ``slope_h * |q - k|`` on the flat index."""
    return Alibi(slopes)


@dsl
def relative_bias(table) -> RelativeBias:
    """Add a learnable bias indexed by the per-dim offset ``k - q``."""
    return RelativeBias(table)


@dsl
def softcap(cap) -> Softcap:
    """``cap * tanh(score / cap)`` (applied last)."""
    return Softcap(cap)


@dsl
def sink_logit(values) -> SinkLogit:
    """A learnable per-head logit in the softmax denominator."""
    return SinkLogit(values)


@dsl
def dropout(p, seed=0) -> Dropout:
    """Attention dropout with probability ``p``, reproducible from ``seed``."""
    return Dropout(p, seed)


@dsl
def score_fn(fn, name=None) -> ScoreFn:
    """A user-written score_mod ``fn(score, b, h, q_idx, kv_idx) -> tensor`` (flex's signature,
    flat row-major indices) as a score term, applied after the additive terms and before
    ``softcap``. Python only: the parser refuses it (code is never parsed from text)."""
    return ScoreFn(fn, name)


score_fn._takes_code = True    # the parser refuses it: code is never parsed from text


def check_tensor_params(score) -> None:
    """Range-check every tensor-valued parameter of ``score`` as it is now (tensors are read at
    call time, so a value changed after compile is checked too). NaN passes: it propagates."""
    for term in score_terms(score):
        for name, check in term._checks.items():
            v = getattr(term, name)
            if check.tensor and _is_tensor(v):
                check_tensor_values(term._name, name, v, check)


def per_head_tensor(value, term, field: str, heads: int, device, shape=(1,)):
    """A score parameter as a tensor [heads]: a tensor value keeps its graph (a learnable one
    stays learnable; one value is expanded to every head), numbers become float64 on
    ``device``. ``shape``: the grid the term binds to (terms with dims need the real one)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).expand(heads) if value.numel() == 1 else value
    vals = [b[field] for b in term.bind(shape, heads)]
    return torch.tensor(vals, dtype=torch.float64, device=device)


def score_extras(score, heads: int, device, training: bool = True):
    """The softmax extras every backend reads the same way: per-head sink logits and dropout
    probabilities, tensors [heads] (None when absent; dropout also None when not training)."""
    sink = drop_p = None
    for t in score_terms(score):
        if isinstance(t, SinkLogit):
            sink = per_head_tensor(t.values, t, "values", heads, device)
        elif isinstance(t, Dropout) and training:
            drop_p = per_head_tensor(t.p, t, "p", heads, device)
    return sink, drop_p


def without(score, kind):
    """``score`` without its terms of type ``kind`` (None when nothing is left)."""
    terms = [t for t in score_terms(score) if not isinstance(t, kind)]
    return sum(terms, 0) or None


def check_params_device(score, device):
    for term in score_terms(score):
        for name, v in term.tensors().items():
            if v.device != device:
                raise MaskDSLError(
                    f"{term._name}: {name} is on {v.device} but q is on {device}; move it with "
                    f".to({str(device)!r})"
                )
