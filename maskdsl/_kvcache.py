"""A KV cache with analytic lookback: ``attn.kv_cache(...)``, ``cache.step(q, k, v)``
(ARCHITECTURE.md, "Sub-ranges and the KV cache").

From the pattern the compiler knows, for every key j, the last query that attends it
(``_rect.key_reach``: the row-major tile classes, token masks on partial tile pairs only). A
cache that has seen tokens ``[0, t)`` must keep exactly the keys some later query attends. It
keeps them as ``sinks`` (a prefix kept for good) plus the last ``window`` tokens (a ring
buffer), with ``sinks + window`` the smallest such split: ``causal() & (window(W) | sink(n))``
keeps n + W tokens, a time-causal 3-D neighborhood the last K_t frames. A pattern without
bounded lookback (plain ``causal()``) keeps everything and ``attn.lookback`` says so.

Steps go in *granules*: single tokens when no query attends a later token (1-D causal
patterns), whole slabs of dim 0 when queries attend later tokens of their own slab only (a
3-D neighborhood causal in time: autoregressive video, frame by frame). A pattern where a
query attends a key of a later granule cannot be decoded and is refused, naming such a pair.

``step`` appends the new tokens' keys and values and returns attention for the new queries at
their global positions (prefill and decode are the same call): ``_rect.rect_attention`` over
the sinks and the ring, the new queries a sub-chunk at a time with only the keys they can reach
(O(chunk x (sinks + window)) per step, never O(context)). It runs in PyTorch on the cache's
device, whatever backend ``attn`` runs; stored keys and values are detached (a cache is for
inference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._errors import MaskDSLError
from ._inputs import FLOATS, check_count, check_device, check_scale

__all__ = ["Lookback", "lookback_of", "KVCache"]


@dataclass(frozen=True)
class Lookback:
    """What a KV cache for a compiled pattern keeps.

    Attributes:
        tokens: keys held between steps (``sinks + window``; N when unbounded).
        sinks: the first ``sinks`` tokens, kept for good.
        window: plus the last ``window`` tokens seen.
        bounded: False when the pattern's lookback is not bounded (the cache keeps everything).
        granule: tokens per decoding step unit (1, or one slab of dim 0 for N-D grids).
        n: tokens of the whole grid.
    """

    tokens: int
    sinks: int
    window: int
    bounded: bool
    granule: int
    n: int

    def __int__(self) -> int:
        return self.tokens

    def __str__(self) -> str:
        unit = "steps of any number of tokens" if self.granule == 1 else \
            f"steps of whole slabs of dim 0 ({self.granule} tokens each)"
        if not self.bounded:
            return (f"unbounded lookback: queries attend keys arbitrarily far back, so the "
                    f"cache keeps every token (up to {self.n}); {unit}")
        return (f"keeps {self.tokens} of {self.n} tokens: {self.sinks} sink(s) and the last "
                f"{self.window}; {unit}")


def _coords(i: int, shape: tuple) -> tuple:
    out = []
    for L in reversed(shape):
        out.append(i % L)
        i //= L
    return tuple(reversed(out))


def lookback_of(attn) -> Lookback:
    """The cache layout of ``attn`` (computed once, from the pattern's reach)."""
    found = attn._states.get("lookback")
    if found is not None:
        return found
    from ._rect import key_reach, row_major

    reach = key_reach(row_major(attn))
    n, shape = attn.n, attn.shape
    idx = torch.arange(n)
    candidates = [1] if len(shape) == 1 or math.prod(shape[1:]) == 1 else \
        [1, math.prod(shape[1:])]
    granule = None
    for g in candidates:
        seen = reach.last_key >= 0
        if bool((reach.last_key[seen] // g <= idx[seen] // g).all()):
            granule = g
            break
    if granule is None:
        g = candidates[-1]
        bad = (reach.last_key >= 0) & (reach.last_key // g > idx // g)
        i = int(torch.nonzero(bad)[0])
        j = int(reach.last_key[i])
        unit = "token" if g == 1 else f"slab of dim 0 ({g} tokens)"
        raise MaskDSLError(
            f"kv_cache: {attn.pattern!r} cannot be decoded step by step: query {i} "
            f"{_coords(i, shape)} attends key {j} {_coords(j, shape)}, which comes in a later "
            f"{unit}; a decodable pattern attends no key of a later step (e.g. & causal())")
    # keep key j after a step boundary t (a multiple of the granule) while a query >= t
    # attends it: last_query[j] >= t. With a prefix of S sinks and a window of W: every
    # j >= S needs j >= t* - W for t* = the last boundary <= last_query[j]
    lq = reach.last_query
    t_star = torch.div(lq, granule, rounding_mode="floor") * granule
    span = torch.where(lq >= 0, t_star - idx, torch.full_like(idx, -1))
    suffix = torch.flip(torch.cummax(torch.flip(span, [0]), 0).values, [0]).clamp(min=0)
    suffix = torch.cat([suffix, torch.zeros(1, dtype=suffix.dtype)])        # S = n: W = 0
    cost = torch.arange(n + 1) + suffix
    S = int(torch.argmin(cost))                       # the first minimum: fewest sinks
    W = int(suffix[S])
    # bounded: the cache drops something before the last step (plain causal() keeps all but
    # the last granule, which is the same as keeping everything)
    bounded = S + W < n - granule
    if not bounded:
        S, W = n, 0
    found = attn._states["lookback"] = Lookback(S + W if bounded else n, S, W, bounded,
                                                granule, n)
    return found


class KVCache:
    """Keys and values of the tokens seen so far that a later query can still attend (see the
    module docstring). Made by ``attn.kv_cache(...)``.

    Attributes:
        position: tokens seen (the next step's first global position).
        lookback: the :class:`Lookback` (what is kept).
        held: tokens held now (at most ``lookback.tokens`` between steps).
        capacity: key/value slots allocated (sinks + ring; grows with the largest step).
    """

    def __init__(self, attn, batch: int, kv_heads: Optional[int], head_dim: int, dtype,
                 device, head_dim_v: Optional[int] = None):
        from ._score import Dropout, score_terms

        self.batch = check_count("kv_cache: batch", batch, 1)
        kv_heads = attn.heads if kv_heads is None else check_count("kv_cache: kv_heads",
                                                                   kv_heads, 1)
        if attn.heads % kv_heads:
            raise MaskDSLError(f"kv_cache: kv_heads={kv_heads} does not divide heads="
                               f"{attn.heads}; expected a divisor (grouped-query attention)")
        self.kv_heads = kv_heads
        self.head_dim = check_count("kv_cache: head_dim", head_dim, 1)
        self.head_dim_v = self.head_dim if head_dim_v is None else \
            check_count("kv_cache: head_dim_v", head_dim_v, 1)
        if dtype not in FLOATS:
            raise MaskDSLError(f"kv_cache: dtype={dtype!r}: expected one of "
                               f"{', '.join(str(d).replace('torch.', '') for d in FLOATS)}")
        self.dtype, self.device = dtype, check_device(device, "kv_cache: device")
        if attn.training and any(isinstance(t, Dropout) for t in score_terms(attn.score)):
            raise MaskDSLError("kv_cache: the score has a dropout term and attn.training is True; "
                               "decoding does not drop attention: set attn.training = False")
        self.attn = attn
        self.lookback = lookback_of(attn)
        self._program = None
        self.reset()

    def reset(self):
        """Forget every token (the next step starts at position 0)."""
        self.position = 0
        # one buffer: ``_scap`` sink slots (tokens 0 .. sinks, slot = position), then ``_ring``
        # slots for the last tokens (slot = _scap + (position - sinks) % _ring); ``_pos`` holds
        # each slot's global position (-1: empty)
        self._k = self._v = self._bad = None
        self._pos = torch.empty(0, dtype=torch.int64, device=self.device)
        self._scap = self._ring = 0

    @property
    def held(self) -> int:
        lb = self.lookback
        pos = self._pos
        return int(((pos >= 0) & ((pos < lb.sinks) | (pos >= self.position - lb.window))).sum())

    @property
    def capacity(self) -> int:
        return int(self._pos.numel())

    def __repr__(self):
        return (f"KVCache(position={self.position}, held={self.held}, capacity={self.capacity}, "
                f"{self.lookback})")

    # ------------------------------------------------------------------ storage
    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        S = self.lookback.sinks
        ring = self._scap + (pos - S) % max(1, self._ring)
        return torch.where(pos < S, pos, ring)

    def _ensure(self, sinks_needed: int, ring_needed: int):
        """Grow the buffer to hold ``sinks_needed`` sink slots and ``ring_needed`` ring slots,
        keeping every stored token at its new slot."""
        lb = self.lookback
        scap, ring = self._scap, self._ring
        if sinks_needed > scap:      # bounded patterns: all sinks at once; unbounded: doubling
            scap = lb.sinks if lb.bounded else min(lb.sinks, max(sinks_needed, 2 * scap, 64))
        ring = max(ring, ring_needed)
        if (scap, ring) == (self._scap, self._ring):
            return
        old_k, old_v, old_pos = self._k, self._v, self._pos
        total = scap + ring
        self._k = torch.zeros(self.batch, self.kv_heads, total, self.head_dim, dtype=self.dtype,
                              device=self.device)
        self._v = torch.zeros(self.batch, self.kv_heads, total, self.head_dim_v,
                              dtype=self.dtype, device=self.device)
        self._pos = torch.full((total,), -1, dtype=torch.int64, device=self.device)
        self._scap, self._ring = scap, ring
        self._bad = None                       # recomputed for the re-placed tokens
        if old_k is not None:
            keep = torch.nonzero(old_pos >= 0).reshape(-1)
            self._put(old_k.index_select(2, keep), old_v.index_select(2, keep), old_pos[keep])

    def _put(self, k, v, pos):
        """Store tokens at ``pos``; their non-finite rows are remembered per slot (``_bad``),
        so a step never rescans the whole buffer."""
        slot = self._slots(pos)
        self._k[:, :, slot] = k
        self._v[:, :, slot] = v
        self._pos[slot] = pos
        bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))     # [B, Hk, c]
        if bool(bad.any()) or self._bad is not None:
            if self._bad is None:
                self._bad = torch.zeros(self.batch, self.kv_heads, self._pos.numel(),
                                        dtype=torch.bool, device=self.device)
            self._bad[:, :, slot] = bad

    def _store(self, k, v, p0: int, room: int):
        """Tokens ``p0 .. p0 + c`` into their slots; ``room``: ring slots beyond the window
        this step needs (its queries see their whole window plus the step's own tokens)."""
        lb = self.lookback
        c = k.shape[2]
        n_sink = max(0, min(c, lb.sinks - p0))
        self._ensure(p0 + n_sink if n_sink else 0, (lb.window + room) if c > n_sink else 0)
        self._put(k, v, torch.arange(p0, p0 + c, device=self.device))

    # ------------------------------------------------------------------ the step
    def _check(self, q, k, v):
        H = self.attn.heads
        for name, t, heads, d in (("q", q, H, self.head_dim), ("k", k, self.kv_heads, self.head_dim),
                                  ("v", v, self.kv_heads, self.head_dim_v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise MaskDSLError(f"cache.step: {name}: expected a 4-D tensor [B, H, c, D], got "
                                   f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            want = [self.batch, heads, q.shape[2], d]
            if list(t.shape) != want:
                raise MaskDSLError(f"cache.step: {name}: shape {list(t.shape)}; expected {want} "
                                   f"(batch, {'heads' if name == 'q' else 'kv_heads'}, new "
                                   f"tokens, head dim of the cache)")
            if t.dtype != self.dtype or t.device != self.device:
                raise MaskDSLError(f"cache.step: {name}: {t.dtype} on {t.device}; the cache holds "
                                   f"{self.dtype} on {self.device}")
        c, lb = q.shape[2], self.lookback
        if c == 0:
            raise MaskDSLError("cache.step: q, k, v hold 0 new tokens; expected at least 1")
        if self.position + c > lb.n:
            raise MaskDSLError(f"cache.step: {c} new tokens at position {self.position} pass the "
                               f"grid's {lb.n} tokens {tuple(self.attn.shape)}")
        if c % lb.granule:
            raise MaskDSLError(
                f"cache.step: {c} new tokens: expected whole slabs of dim 0 ({lb.granule} "
                f"tokens each), since queries of {self.attn.pattern!r} attend later tokens "
                f"of their own slab")
        return c

    def append(self, k, v):
        """Store k, v [B, kv_heads, c, D] of the next c tokens without attending (a prompt
        whose outputs were computed elsewhere, e.g. by ``attn(q, k, v)`` on the prompt's grid
        rows); only what later queries can reach is kept, so appending a long prompt costs
        O(sinks + window)."""
        q = k.new_empty(k.shape[0], self.attn.heads, k.shape[2], self.head_dim)
        c = self._check(q, k, v)
        lb, t = self.lookback, self.position
        k, v = k.detach(), v.detach()
        n_sink = max(0, min(c, lb.sinks - t))
        if n_sink:
            self._store(k[:, :, :n_sink], v[:, :, :n_sink], t, 0)
        keep = min(c - n_sink, lb.window)           # the rest is out of every later reach
        if keep:
            self._store(k[:, :, c - keep:], v[:, :, c - keep:], t + c - keep, 0)
        self.position = t + c

    def step(self, q, k, v, *, scale: Optional[float] = None, return_lse: bool = False):
        """Append k, v [B, kv_heads, c, D] of the next c tokens and return the attention output
        [B, heads, c, Dv] of their queries q [B, heads, c, D] at global positions
        ``position .. position + c`` (and lse [B, heads, c] with ``return_lse``)."""
        from ._rect import rect_attention, row_major
        from ._score import score_extras

        c = self._check(q, k, v)
        scale = check_scale(scale, self.head_dim)
        lb, t = self.lookback, self.position
        self._store(k.detach(), v.detach(), t, c)
        self.position = t + c
        if self._program is None:
            self._program = row_major(self.attn)
        sink, _ = score_extras(self.attn.score, self.attn.heads, q.device, False)
        g = lb.granule
        sub = g * max(1, 2048 // g)                   # query rows per sub-chunk
        dev = self.device
        outs, lses = [], []
        for a in range(0, c, sub):
            b = min(c, a + sub)
            lo = (t + a) // g * g - lb.window        # the earliest non-sink key they can reach
            hi = -(-(t + b) // g) * g
            pos = self._pos
            reach = (pos >= 0) & ((pos < lb.sinks) | ((pos >= lo) & (pos < hi)))
            sel = torch.nonzero(reach).reshape(-1)
            bad = self._bad
            if 2 * sel.numel() < pos.numel():        # a few of many slots: gather them
                kk, vv, kpos = self._k.index_select(2, sel), self._v.index_select(2, sel), pos[sel]
                bad = bad.index_select(2, sel) if bad is not None else None
            else:                                    # most slots: mask the others, no copy
                kk, vv, kpos = self._k, self._v, torch.where(reach, pos, -1)
            res = rect_attention(self._program, q[:, :, a:b], kk, vv,
                                 torch.arange(t + a, t + b, device=dev), kpos,
                                 scale, sink=sink, return_lse=return_lse,
                                 kv_bad=bad if bad is not None else False)
            if return_lse:
                outs.append(res[0])
                lses.append(res[1])
            else:
                outs.append(res)
        out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        if return_lse:
            return out, torch.cat(lses, 2) if len(lses) > 1 else lses[0]
        return out
