"""A KV cache with analytic lookback: ``attn.kv_cache(...)``, ``cache.step(q, k, v)``
(ARCHITECTURE.md, "Sub-ranges and the KV cache").

From the pattern the compiler knows, for every key j, the last query that attends it
(``rect.key_reach``: the row-major tile classes, token masks on partial tile pairs only). A
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
their global positions (prefill and decode are the same call): ``rect.rect_attention`` over
the sinks and the ring, the new queries a sub-chunk at a time with only the keys they can reach
(O(chunk x (sinks + window)) per step, never O(context)). It runs in PyTorch on the cache's
device, whatever backend ``attn`` runs; stored keys and values are detached (a cache is for
inference).

A step gives the rows ``attn(q, k, v)`` gives, or a MaskDSLError: the same argument checks
(``compiled.check_call``), document ids changed in place read anew (refused, naming the pair,
when a later query needs a key already dropped), the extra keys of ``extra="keys"`` merged in
through the lse; ``extra="all"`` and sub-ranges are refused by ``attn.kv_cache``. Buffers are
checked against the memory budget before they are allocated (``_memory``), and the ring shrinks
back after a long step.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch

from maskdsl._errors import MaskDSLError
from maskdsl._memory import check_allocation, guarded
from maskdsl.dsl.inputs import FLOATS, check_call, check_count, check_device
from maskdsl.dsl.score import Dropout, score_extras, score_terms
from maskdsl.kernels.isolate import all_finite
from maskdsl.kernels.softmax import combine
from maskdsl.kernels.rect import dense_stripe, rect_attention, softcap_values
from .rect import reach_of, row_major

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
    """The cache layout of ``attn`` (computed once per structure, from the pattern's reach;
    document ids changed in place since are read anew): kept with attn's prepared state."""
    return attn.prepared("lookback", lambda: _lookback(attn))


def _lookback(attn) -> Lookback:
    reach = reach_of(attn)
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
    return Lookback(S + W if bounded else n, S, W, bounded, granule, n)


def _first_query(attn, j: int, t: int, last: int) -> int:
    """The first query at or after ``t`` (and at most ``last``, which does) that attends key
    ``j`` on some head: the pair a refusal names."""
    mask_mod, _ = row_major(attn).mods("cpu")
    heads = torch.arange(attn.heads).reshape(-1, 1, 1, 1)
    key = torch.tensor(j).reshape(1, 1, 1, 1)
    step = max(1, (1 << 22) // attn.heads)
    for a in range(t, last + 1, step):
        qs = torch.arange(a, min(last + 1, a + step)).reshape(1, 1, -1, 1)
        hit = torch.nonzero(mask_mod(0, heads, qs, key).expand(attn.heads, 1, -1, 1)
                            .any(0).reshape(-1))
        if hit.numel():
            return a + int(hit[0])
    return last


_HINT = ("use a smaller batch, fewer kv_heads (grouped-query attention), a smaller dtype, or "
         "smaller steps (a step holds sinks + window + up to 2048 of its tokens)")


class KVCache:
    """Keys and values of the tokens seen so far that a later query can still attend (see the
    module docstring). Made by ``attn.kv_cache(...)``.

    Attributes:
        position: tokens seen (the next step's first global position).
        lookback: the :class:`Lookback` (what is kept; read anew when document ids change).
        held: tokens held now (at most ``lookback.tokens`` between steps).
        capacity: key/value slots allocated: sinks + ring, the ring ``window`` + the step's
            tokens (up to a sub-chunk of 2048), shrunk back when later steps are smaller.
    """

    def __init__(self, attn, batch: int, kv_heads: Optional[int], head_dim: int, dtype,
                 device, head_dim_v: Optional[int] = None):
        ext = attn.extent
        if ext.q is not None or ext.kv is not None:
            raise MaskDSLError(
                f"kv_cache: this attention has {ext.describe()}; a KV cache decodes the whole "
                f"grid from position 0 (its steps are the ranges): compile the same pattern "
                f"without q_range/kv_range and step through the tokens in order")
        if ext.extra and ext.mode == "all":
            raise MaskDSLError(
                f"kv_cache: extra_tokens={ext.extra} with extra='all': the extra tokens' "
                f"queries attend every grid key, which a cache that drops keys cannot serve; "
                f"decode the grid with md.compile(..., extra_tokens={ext.extra}, "
                f"extra='keys').kv_cache(...) (the grid queries' outputs are the same, the "
                f"extra keys given by cache.set_extra) and run the extra queries with attn()")
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
        if self.device.type == "meta":
            raise MaskDSLError(f"kv_cache: device={device!r}: a cache stores real keys and "
                               f"values; expected a device with storage such as 'cpu' or 'cuda'")
        self.attn = attn
        self._no_dropout("kv_cache")
        self.lookback = lookback_of(attn)
        self._generation = attn.generation           # the structure the lookback was read from
        lb = self.lookback
        if lb.bounded:                    # what every step needs: sinks, window, one granule
            self._check_bytes(lb.tokens + lb.granule)
        self.reset()

    def _no_dropout(self, where: str):
        if self.attn.training and any(isinstance(t, Dropout)
                                      for t in score_terms(self.attn.score)):
            raise MaskDSLError(f"{where}: the score has a dropout term and attn.training is "
                               f"True; decoding does not drop attention: set attn.training = "
                               f"False")

    def reset(self):
        """Forget every token and the extra keys (the next step starts at position 0)."""
        self.position = 0
        # one buffer: ``_scap`` sink slots (tokens 0 .. sinks, slot = position), then ``_ring``
        # slots for the last tokens (slot = _scap + (position - sinks) % _ring); ``_pos`` holds
        # each slot's global position (-1: empty)
        self._k = self._v = self._bad = None
        self._pos = torch.empty(0, dtype=torch.int64, device=self.device)
        self._scap = self._ring = 0
        self._extra = None

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
    def _slot_bytes(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return self.batch * self.kv_heads * (self.head_dim + self.head_dim_v) * item + 8

    def _what(self, slots: int) -> str:
        return (f"kv_cache: key/value buffers of {slots} tokens x batch {self.batch} x "
                f"{self.kv_heads} kv heads x head dims {self.head_dim} + {self.head_dim_v} "
                f"({str(self.dtype).replace('torch.', '')})")

    def _check_bytes(self, slots: int):
        """MaskDSLError before allocating ``slots`` key/value slots that cannot fit (host memory
        is checked for a CPU cache; an accelerator's out-of-memory error is caught by
        ``_realloc``'s guard)."""
        if self.device.type == "cpu":
            check_allocation(self._what(slots), slots * self._slot_bytes(), _HINT)

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        S = self.lookback.sinks
        ring = self._scap + (pos - S) % max(1, self._ring)
        return torch.where(pos < S, pos, ring)

    def _ensure(self, sinks_needed: int, ring_needed: int, keep_from: int):
        """Make room for ``sinks_needed`` sink slots and ``ring_needed`` ring slots (0: leave the
        ring as it is). The ring grows to what is needed and shrinks back to it when it holds
        much more (after a long prefill); a re-placement keeps the sinks and the tokens at
        positions >= ``keep_from`` (all a step from ``keep_from + window`` on can attend)."""
        lb = self.lookback
        scap, ring = self._scap, self._ring
        if sinks_needed > scap:      # bounded patterns: all sinks at once; unbounded: doubling
            scap = lb.sinks if lb.bounded else min(lb.sinks, max(sinks_needed, 2 * scap, 64))
        if ring_needed > ring or (ring_needed and ring - ring_needed > max(64, ring_needed // 8)):
            ring = ring_needed
        if (scap, ring) != (self._scap, self._ring):
            self._realloc(scap, ring, keep_from)

    def _realloc(self, scap: int, ring: int, keep_from: int):
        """New buffers of ``scap`` sink and ``ring`` ring slots (checked against the memory
        budget first: on refusal nothing changes), holding the stored sinks and the stored
        tokens at positions >= ``keep_from`` (at most ``ring`` of them)."""
        total = scap + ring
        self._check_bytes(total)
        with guarded(self._what(total), _HINT):
            k = torch.zeros(self.batch, self.kv_heads, total, self.head_dim, dtype=self.dtype,
                            device=self.device)
            v = torch.zeros(self.batch, self.kv_heads, total, self.head_dim_v,
                            dtype=self.dtype, device=self.device)
            pos = torch.full((total,), -1, dtype=torch.int64, device=self.device)
        old_k, old_v, old_pos = self._k, self._v, self._pos
        self._k, self._v, self._pos = k, v, pos
        self._scap, self._ring = scap, ring
        self._bad = None                       # recomputed for the re-placed tokens
        if old_k is not None:
            lb = self.lookback
            keep = torch.nonzero((old_pos >= 0) & ((old_pos < lb.sinks)
                                                   | (old_pos >= keep_from))).reshape(-1)
            if keep.numel():
                self._put(old_k.index_select(2, keep), old_v.index_select(2, keep),
                          old_pos[keep])

    def _put(self, k, v, pos):
        """Store tokens at ``pos``; their non-finite rows are remembered per slot (``_bad``),
        so a step never rescans the whole buffer."""
        slot = self._slots(pos)
        self._k[:, :, slot] = k
        self._v[:, :, slot] = v
        self._pos[slot] = pos
        if self._bad is None and all_finite(k, v):
            return                            # the common case: nothing to remember
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
        self._ensure(p0 + n_sink if n_sink else 0, (lb.window + room) if c > n_sink else 0,
                     p0 - lb.window)
        self._put(k, v, torch.arange(p0, p0 + c, device=self.device))

    def _held_before(self, t: int) -> torch.Tensor:
        """bool [t] on the host: which of the positions 0 .. t - 1 have a slot."""
        held = torch.zeros(t, dtype=torch.bool)
        pos = self._pos.cpu()
        held[pos[(pos >= 0) & (pos < t)]] = True
        return held

    # ------------------------------------------------------------------ the structure now
    def _sync(self, where: str):
        """Serve the pattern as it is now: when document ids changed in place since the last
        step (``attn.refresh()``, the version counters ``attn()`` reads), read the lookback
        anew and re-place what is held; a MaskDSLError, naming a pair, when a query from here
        on attends a key this cache already dropped (or the new pattern cannot be decoded)."""
        attn = self.attn
        if attn.refresh() == self._generation:
            return
        t, old = self.position, self.lookback
        why = (f"{where}: the pattern's structure (document ids) changed in place after {t} "
               f"tokens")
        try:
            new = lookback_of(attn)
        except MaskDSLError as e:
            raise MaskDSLError(f"{why}, and {e}") from None
        if t % new.granule:
            raise MaskDSLError(
                f"{why}: the new pattern decodes whole slabs of dim 0 ({new.granule} tokens "
                f"each), and {t} is not a slab boundary; call cache.reset() and step again from "
                f"position 0")
        if t:
            last_query = reach_of(attn).last_query[:t]
            missing = torch.nonzero((last_query >= t) & ~self._held_before(t)).reshape(-1)
            if missing.numel():
                j = int(missing[0])
                i = _first_query(attn, j, t, int(last_query[j]))
                raise MaskDSLError(
                    f"{why}: query {i} {_coords(i, attn.shape)} now attends key {j} "
                    f"{_coords(j, attn.shape)}, which this cache no longer holds (under the old "
                    f"ids it {str(old).replace('keeps', 'kept', 1)}); call cache.reset() and "
                    f"step again from position 0")
        self.lookback = new
        if self._k is not None:
            scap = 0 if not min(t, new.sinks) else new.sinks if new.bounded else \
                min(new.sinks, max(t, 64))
            self._realloc(scap, new.window if t > new.sinks else 0, t - new.window)
        self._generation = attn.generation

    # ------------------------------------------------------------------ checks
    def _tensor(self, where: str, name: str, t, heads: int, c: Optional[int], d: int):
        """Check ``t`` is [batch, heads, c, d] (c None: any) in the cache's dtype and device;
        returns its token count."""
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise MaskDSLError(f"{where}: {name}: expected a 4-D tensor [B, H, c, D], got "
                               f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        want = [self.batch, heads, t.shape[2] if c is None else c, d]
        if list(t.shape) != want:
            what = "extra tokens" if where.endswith("set_extra") else "new tokens"
            raise MaskDSLError(f"{where}: {name}: shape {list(t.shape)}; expected {want} "
                               f"(batch, {'heads' if name == 'q' else 'kv_heads'}, {what}, head "
                               f"dim of the cache)")
        if t.dtype != self.dtype or t.device != self.device:
            raise MaskDSLError(f"{where}: {name}: {t.dtype} on {t.device}; the cache holds "
                               f"{self.dtype} on {self.device}")
        return t.shape[2]

    def _check(self, where: str, q, k, v) -> int:
        """Check q (None: ``append``), k, v of the next tokens; returns their count."""
        c = None
        if q is not None:
            c = self._tensor(where, "q", q, self.attn.heads, None, self.head_dim)
        c = self._tensor(where, "k", k, self.kv_heads, c, self.head_dim)
        self._tensor(where, "v", v, self.kv_heads, c, self.head_dim_v)
        if c == 0:
            raise MaskDSLError(f"{where}: {'q, ' if q is not None else ''}k, v hold 0 new "
                               f"tokens; expected at least 1")
        return c

    def _check_count(self, where: str, c: int):
        lb = self.lookback
        if self.position + c > lb.n:
            raise MaskDSLError(f"{where}: {c} new tokens at position {self.position} pass the "
                               f"grid's {lb.n} tokens {tuple(self.attn.shape)}")
        if c % lb.granule:
            raise MaskDSLError(
                f"{where}: {c} new tokens: expected whole slabs of dim 0 ({lb.granule} "
                f"tokens each), since queries of {self.attn.pattern!r} attend later tokens "
                f"of their own slab")

    # ------------------------------------------------------------------ the API
    def set_extra(self, k, v):
        """The E extra tokens' keys and values [B, kv_heads, E, D] of an attention compiled
        with ``extra_tokens=E, extra="keys"`` (the last E tokens of ``attn``'s k and v:
        registers, a text prompt beside a video grid): every query of every later step
        attends them beside its pattern's keys, as ``attn(q, k, v)`` does. Set them before the
        first step; setting them again replaces them for the steps that follow."""
        E = self.attn.extent.extra
        if not E:
            raise MaskDSLError("cache.set_extra: this attention has no extra tokens (compiled "
                               "with extra_tokens=0); its queries attend the grid's keys only")
        self._tensor("cache.set_extra", "k", k, self.kv_heads, E, self.head_dim)
        self._tensor("cache.set_extra", "v", v, self.kv_heads, E, self.head_dim_v)
        self._extra = (k.detach(), v.detach())

    def crop(self, n: int):
        """Forget the tokens from position ``n`` on (assisted decoding's rejected draft tokens, a
        retried step): the cache then serves steps from ``n`` as one that saw tokens ``[0, n)``
        only. ``n`` must lie in ``[0, position]``, be a whole number of granules, and need no key
        the cache already dropped (a window's ring holds the last ``window`` tokens of the
        position it reached: cropping further back than that is refused, naming the key)."""
        self._sync("cache.crop")
        t, lb = self.position, self.lookback
        try:
            if isinstance(n, bool):
                raise TypeError
            n = operator.index(n)
        except TypeError:
            raise MaskDSLError(f"cache.crop: n={n!r}: expected an int in [0, {t}] (the "
                               f"position)") from None
        if not 0 <= n <= t:
            raise MaskDSLError(f"cache.crop: n={n}: expected 0 <= n <= position ({t})")
        if n % lb.granule:
            raise MaskDSLError(f"cache.crop: n={n}: expected a whole number of slabs of dim 0 "
                               f"({lb.granule} tokens each), as steps are")
        if n == t:
            return
        held = self._held_before(t)
        need = torch.arange(n)
        if lb.bounded:
            lo = n // lb.granule * lb.granule - lb.window
            need = need[(need < lb.sinks) | (need >= lo)]
        missing = need[~held[need]]
        if missing.numel():
            j = int(missing[-1])
            gaps = torch.nonzero(~held).reshape(-1)
            m = int(gaps[-1]) + 1                      # [m, t) is held without a gap
            g = lb.granule
            least = -(-(m + lb.window) // g) * g
            raise MaskDSLError(
                f"cache.crop: n={n}: a query at position {n} attends key {j}, which this cache "
                f"dropped when it moved on to position {t} (it {lb}); expected {least} <= n <= "
                f"{t}{f' or n <= {lb.sinks // g * g}' if lb.sinks >= g else ''}, or reset() "
                f"and step again")
        self._pos[self._pos >= n] = -1
        self.position = n

    def reorder(self, indices):
        """Batch row ``i`` becomes the old row ``indices[i]`` (beam search: transformers'
        ``reorder_cache(beam_idx)``); the extra keys of ``set_extra`` too. ``indices``: B ints in
        ``[0, B)`` (a list, or an integer tensor on any device)."""
        B = self.batch
        try:
            idx = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError):
            raise MaskDSLError(f"cache.reorder: indices={indices!r}: expected {B} ints in "
                               f"[0, {B})") from None
        if idx.dim() != 1 or idx.numel() != B or idx.dtype.is_floating_point or \
                idx.dtype.is_complex or idx.dtype == torch.bool:
            raise MaskDSLError(f"cache.reorder: indices of shape {list(idx.shape)} and dtype "
                               f"{str(idx.dtype).replace('torch.', '')}: expected {B} ints in "
                               f"[0, {B}) (one per batch row)")
        idx = idx.to(torch.int64).cpu()
        bad = (idx < 0) | (idx >= B)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise MaskDSLError(f"cache.reorder: indices[{i}]={int(idx[i])}: expected a batch "
                               f"row in [0, {B})")
        idx = idx.to(self.device)
        if self._k is not None:
            self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)
            if self._bad is not None:
                self._bad = self._bad.index_select(0, idx)
        if self._extra is not None:
            self._extra = tuple(x.index_select(0, idx) for x in self._extra)

    def append(self, k, v):
        """Store k, v [B, kv_heads, c, D] of the next c tokens without attending (a prompt
        whose outputs were computed elsewhere, e.g. by ``attn(q, k, v)`` on the prompt's grid
        rows); only what later queries can reach is kept, so appending a long prompt costs
        O(sinks + window)."""
        c = self._check("cache.append", None, k, v)
        self._sync("cache.append")
        self._check_count("cache.append", c)
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
        ``position .. position + c`` (and lse [B, heads, c] with ``return_lse``), as
        ``attn(q, k, v)`` gives those rows: the same argument checks (``compiled.check_call``:
        scale, return_lse, the score's tensors as they are now), the document ids as they
        are now, the extra keys of ``set_extra``."""
        c = self._check("cache.step", q, k, v)
        attn = self.attn
        scale = check_call(attn.score, q.device, scale, self.head_dim, return_lse)
        self._no_dropout("cache.step")
        E = attn.extent.extra
        if E and self._extra is None:
            raise MaskDSLError(
                f"cache.step: this attention has {attn.extent.describe()}: every query also "
                f"attends the {E} extra keys; give them first with cache.set_extra(k, v) (the "
                f"last {E} tokens of attn's k and v)")
        self._sync("cache.step")
        self._check_count("cache.step", c)
        lb, t = self.lookback, self.position
        program = row_major(attn)
        sink, _ = score_extras(attn.score, attn.heads, q.device, False)
        cap = softcap_values(attn.score, attn.heads, q.device) if E else None
        g = lb.granule
        sub = g * max(1, 2048 // g)                   # query rows per sub-chunk
        dev = self.device
        outs, lses = [], []
        with guarded(f"cache.step of {c} tokens", _HINT):
            for a in range(0, c, sub):
                b = min(c, a + sub)
                # store a sub-chunk at a time: the ring holds window + sub slots at most
                self._store(k[:, :, a:b].detach(), v[:, :, a:b].detach(), t + a, min(c, sub))
                lo = (t + a) // g * g - lb.window        # the earliest non-sink key they reach
                hi = -(-(t + b) // g) * g
                pos = self._pos
                reach = (pos >= 0) & ((pos < lb.sinks) | ((pos >= lo) & (pos < hi)))
                sel = torch.nonzero(reach).reshape(-1)
                bad = self._bad
                if 2 * sel.numel() < pos.numel():        # a few of many slots: gather them
                    kk, vv, kpos = (self._k.index_select(2, sel), self._v.index_select(2, sel),
                                    pos[sel])
                    bad = bad.index_select(2, sel) if bad is not None else None
                else:                                    # most slots: mask the others, no copy
                    kk, vv, kpos = self._k, self._v, torch.where(reach, pos, -1)
                qa = q[:, :, a:b]
                res = rect_attention(program, qa, kk, vv, torch.arange(t + a, t + b, device=dev),
                                     kpos, scale, sink=sink, return_lse=return_lse or bool(E),
                                     kv_bad=bad if bad is not None else False)
                if E:          # the extra keys: a dense stripe merged through the lse, as attn()
                    res = combine([res, dense_stripe(qa, *self._extra, scale, cap, None)])
                    res = res if return_lse else res[0]
                if return_lse:
                    outs.append(res[0])
                    lses.append(res[1])
                else:
                    outs.append(res)
        self.position = t + c
        out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        if return_lse:
            return out, torch.cat(lses, 2) if len(lses) > 1 else lses[0]
        return out
