"""The analytic tile classes: every (query tile, key tile) pair of a layout is EMPTY, PARTIAL or
FULL, decided without evaluating the mask over all N^2 token pairs, and stored sparsely
(:class:`~maskdsl.codegen.tileclasses.TileClasses`: O(non-empty pairs), never [T, T]).

All classes are *restricted to real tokens*: padding positions are accounted for at the end.

* Separable IR (:class:`~maskdsl.codegen.ir.Sep`) on a tiled layout: each dimension's classes
  between its tile intervals (``L x L`` work per dim, not ``N x N``), combined by a Kronecker-
  style product (a pair is non-empty iff it is on every dim; its class the minimum: exact, the
  predicate is an AND over dims). On a long 1-D sequence the per-query key range ``[lo(q),
  hi(q))`` gives the candidate pairs directly (O(N + pairs)).
* Flat IR has one classifier per kind (``classify_flat.register``): sinks directly; document,
  power and radial row chunk by row chunk (O(chunk x T) memory). A user's ``mask_fn`` cannot be
  reasoned about: its candidate pairs (every pair, or those its ``key_range`` meets) are
  UNDECIDED and refinement evaluates the function on them (at most ``MASK_FN_MAX_PAIRS``
  token pairs at compile time).
* ``&``, ``|`` combine three-valued on the entries (``tileclasses.combine``), ``~`` row chunk by
  row chunk; pairs that cannot be decided that way (e.g. PARTIAL & PARTIAL) are UNDECIDED and
  *refined*: the mask is evaluated on those tile pairs only (``pair_counts``).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional

import numpy as np
import sympy as sp
import torch

from maskdsl._caching import LRU, function_key
from maskdsl._errors import MaskDSLError
from maskdsl.dsl.pattern import check_key_range_result, check_mask_result
from .ir import (CHUNK, K, KF, Q, QF, AndN, Const, DimRange, DocumentFlat, Flat, FnFlat,
    NotN, OrN, PowerFlat, RadialFlat, Sep, SinkFlat, contains, evaluate, predicate)
from .printer_torch import emit_function, exec_source
from .tileclasses import EMPTY, FULL, PARTIAL, UNDECIDED, TileClasses, combine, kron
from .tiling import Layout

__all__ = ["EMPTY", "PARTIAL", "FULL", "UNDECIDED", "classify", "tile_classes", "HeadClasses",
           "DENSE_DIM_LIMIT", "classify_flat", "pair_counts", "flat_evaluator",
           "MASK_FN_MAX_PAIRS", "UNCLASSIFIED_MAX_PAIRS"]

DENSE_DIM_LIMIT = 512         # per-dim L x L evaluation up to this length (then key ranges)
PAIR_CHUNK = 1 << 22          # token pairs evaluated at once (refining, exact counts)
MASK_FN_MAX_PAIRS = 1 << 28   # token pairs a mask_fn may be evaluated on to classify one head
UNCLASSIFIED_MAX_PAIRS = 1 << 24   # the same for a flat kind with no classifier (the default)
                              # (~16K tokens without key_range; a few seconds per simple fn)


def _classes_from_counts(cnt, vq, vk):
    size = vq[:, None] * vk[None, :]
    out = np.full(cnt.shape, PARTIAL, dtype=np.int8)
    out[cnt == size] = FULL
    out[cnt == 0] = EMPTY          # also where size == 0 (no real tokens): padding decides later
    return out


class _TileSets:
    """The tiles of a layout: their user tokens, and per-dim structure for separable IR."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.T = layout.n_tiles
        self._boxes = self._tokens = self._n_valid = None

    @property
    def tokens(self) -> np.ndarray:
        """int64 [T, block]: each tile's user tokens (-1 = padding), built on first use (a
        separable pattern on a tiled layout never needs them)."""
        if self._tokens is None:
            self._tokens = self.layout.tokens().reshape(self.T, self.layout.block)
        return self._tokens

    @property
    def valid(self) -> np.ndarray:
        return self.tokens >= 0

    @property
    def n_valid(self) -> np.ndarray:
        """Real tokens per tile: per-dim counts multiplied out (no token table)."""
        if self._n_valid is None:
            L = self.layout
            if L.tile is None:
                self._n_valid = np.clip(L.n - np.arange(self.T) * L.block, 0, L.block)
            else:
                out = np.ones(1, np.int64)
                for d in range(L.rank):
                    c = (L.dim_order(d).reshape(L.grid[d], L.tile[d]) >= 0).sum(1)
                    out = (out[:, None] * c[None, :]).reshape(-1)
                self._n_valid = out
        return self._n_valid

    # ------------------------------------------------------------ separable IR
    def sep(self, sep: Sep) -> TileClasses:
        L = self.layout
        if L.tile is not None:
            return kron([dim_tile_classes(dr, L, d) for d, dr in enumerate(sep.dims)], L.grid)
        if L.rank == 1:
            return self._dim_classes_1d(sep.dims[0], L.shape[0], L.block, self.T)
        return TileClasses.from_row_chunks(self.T, self.T, lambda a, b: self._sep_boxes(sep, a, b))

    @staticmethod
    def _dim_classes_dense(dr: DimRange, order: np.ndarray, t: int) -> np.ndarray:
        """Tile-interval classes on one dim from the L x L condition (any coordinate order)."""
        m = _dim_matrix_cached(dr, order)
        ok = order >= 0
        m = m & ok[:, None] & ok[None, :]
        n = len(order) // t
        cnt = m.reshape(n, t, n, t).sum((1, 3))
        v = ok.reshape(n, t).sum(1)
        return _classes_from_counts(cnt, v, v)

    @staticmethod
    def _dim_classes_1d(dr: DimRange, L: int, B: int, T: int) -> TileClasses:
        """1-D row-major classes from per-query key ranges: O(N + candidate pairs) (short
        sequences: the L x L condition, which is as cheap there)."""
        if L <= DENSE_DIM_LIMIT:
            order = np.arange(T * B)
            order[L:] = -1
            return TileClasses.from_dense(_TileSets._dim_classes_dense(dr, order, B))
        steps = [int(s) for s in dr.steps]
        step = math.lcm(*steps) if steps else 1
        # per-tile summaries of the key ranges, a chunk of tiles at a time: O(T) memory beside
        # chunk-sized arrays (small arrays are reused by the allocator; token-sized ones would be
        # fresh pages every time: most of the cost at 65,536 tokens)
        min_lo, max_lo = np.empty(T, np.int64), np.empty(T, np.int64)
        min_hi, max_hi = np.empty(T, np.int64), np.empty(T, np.int64)
        all_have = np.empty(T, bool)
        big = np.iinfo(np.int64).max
        ct = max(1, CHUNK // B)
        for t0 in range(0, T, ct):
            t1 = min(T, t0 + ct)
            lo_t, hi_t = _tile_ranges(dr, np.arange(t0, t1), B, L)
            has = hi_t > lo_t                                   # queries with any key
            real = np.minimum(B, L - np.arange(t0, t1) * B)     # real tokens per tile
            min_lo[t0:t1] = np.where(has, lo_t, big).min(1)
            max_lo[t0:t1] = np.where(has, lo_t, -1).max(1)
            min_hi[t0:t1] = np.where(has, hi_t, big).min(1)
            max_hi[t0:t1] = np.where(has, hi_t, 0).max(1)
            all_have[t0:t1] = has.sum(1) == real
        real = np.minimum(B, L - np.arange(T) * B)
        rows = np.nonzero(max_hi > 0)[0]
        if len(rows) == 0:
            return TileClasses.empty(T, T)
        j0 = min_lo[rows] // B
        j1 = (max_hi[rows] - 1) // B + 1
        # candidate (tile, key tile) pairs, all rows at once
        width = j1 - j0
        i_idx = np.repeat(rows, width)
        j_idx = np.arange(width.sum()) - np.repeat(np.cumsum(width) - width - j0, width)
        b0, b1 = j_idx * B, np.minimum(j_idx * B + B, L)
        full = (step == 1) & all_have[i_idx] & (max_lo[i_idx] <= b0) & (min_hi[i_idx] >= b1)
        empty = (b1 <= min_lo[i_idx]) | (b0 >= max_hi[i_idx])
        cls = np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)
        # undecided boundary pairs: count exactly (a few per row for banded patterns), a chunk
        # of pairs at a time
        und = np.nonzero(~full & ~empty)[0]
        cp = max(1, CHUNK // B)
        for u0 in range(0, len(und), cp):
            u = und[u0:u0 + cp]
            ii = i_idx[u]
            lo_t, hi_t = _tile_ranges(dr, ii, B, L)
            bb0, bb1 = b0[u], b1[u]
            s_ = np.maximum(lo_t, bb0[:, None])                         # [P, B]
            e_ = np.minimum(hi_t, bb1[:, None])
            if step == 1:
                cnt = np.maximum(e_ - s_, 0).sum(1)
            else:
                q = ii[:, None] * B + np.arange(B)[None, :]
                first = s_ + np.mod(q - s_, step)
                cnt = np.where(e_ > first, (e_ - first + step - 1) // step, 0).sum(1)
            size = real[ii] * (bb1 - bb0)
            cls[u] = np.where(cnt == 0, EMPTY, np.where(cnt == size, FULL, PARTIAL))
        return TileClasses.from_pairs(T, T, i_idx, j_idx, cls, sort=False)

    def boxes(self):
        """Each row-major tile as <= 2r-1 boxes: (lo, hi) arrays [T, nb, r] (empty boxes lo=hi)."""
        if self._boxes is None:
            L, per = self.layout, []
            for i in range(self.T):
                a, b = i * L.block, min((i + 1) * L.block, L.n)
                per.append(_flat_range_boxes(a, b, L.shape) if a < b else [])
            nb = max(1, max(len(x) for x in per))
            lo = np.zeros((self.T, nb, L.rank), dtype=np.int64)
            hi = np.zeros((self.T, nb, L.rank), dtype=np.int64)
            for i, bx in enumerate(per):
                for j, (l, h) in enumerate(bx):
                    lo[i, j], hi[i, j] = l, h
            self._boxes = (lo, hi)
        return self._boxes

    def _sep_boxes(self, sep: Sep, t0: int, t1: int) -> np.ndarray:
        """Rows t0..t1 of a row-major N-D layout's classes: each tile is a few boxes; a box
        pair's class is the min over dims of the per-dim interval classes (from 2-D prefix sums
        of the per-dim condition)."""
        L = self.layout
        lo, hi = self.boxes()
        prefix = []
        for d, dr in enumerate(sep.dims):
            n = L.shape[d]
            m = dim_matrix(dr, np.arange(n))
            c = np.zeros((n + 1, n + 1), dtype=np.int64)
            c[1:, 1:] = m.cumsum(0).cumsum(1)
            prefix.append(c)
        T, nb = lo.shape[0], lo.shape[1]
        out = np.empty((t1 - t0, T), dtype=np.int8)
        rows = max(1, int(2e7 // max(1, T * nb * nb)))
        for i0 in range(t0, t1, rows):
            i1 = min(t1, i0 + rows)
            cls = None
            nonempty = None
            for d in range(L.rank):
                a0, a1 = lo[i0:i1, :, d][:, None, :, None], hi[i0:i1, :, d][:, None, :, None]
                b0, b1 = lo[None, :, None, :, d], hi[None, :, None, :, d]
                c = prefix[d]
                cnt = c[a1, b1] - c[a0, b1] - c[a1, b0] + c[a0, b0]
                size = (a1 - a0) * (b1 - b0)
                cd = np.where(cnt == 0, EMPTY, np.where(cnt == size, FULL, PARTIAL)).astype(np.int8)
                cls = cd if cls is None else np.minimum(cls, cd)
                ne = size > 0
                nonempty = ne if nonempty is None else nonempty & ne
            # over the boxes of each tile pair: EMPTY if all empty, FULL if all full
            cls = np.where(nonempty, cls, -1)
            any_real = nonempty.any((2, 3))
            mx = cls.max((2, 3))
            mn = np.where(nonempty, cls, FULL).min((2, 3))
            out[i0 - t0:i1 - t0] = np.where(~any_real | (mx == EMPTY), EMPTY,
                                            np.where(mn == FULL, FULL, PARTIAL))
        return out

    # ------------------------------------------------------------ per-tile token summaries
    def summary(self, values: np.ndarray):
        """(min, max) over each tile's real tokens of a per-token array (tiles with no real
        token: min = +big, max = -big)."""
        big = np.iinfo(np.int64).max
        v = values[np.maximum(self.tokens, 0)]
        return np.where(self.valid, v, big).min(1), np.where(self.valid, v, -big).max(1)


# ---------------------------------------------------------------------- flat classifiers

@functools.singledispatch
def classify_flat(f: Flat, ts: _TileSets) -> TileClasses:
    """One rule per flat IR kind (registered below). The default, for a kind with no rule of
    its own: every pair of tiles with real tokens is UNDECIDED, and refinement evaluates the
    mask on them, within ``UNCLASSIFIED_MAX_PAIRS`` token pairs per head; beyond, MaskDSLError
    names the kind. A new primitive works before it has a classifier, and never silently
    costs O(N^2) past the budget."""
    T = ts.T
    real = ts.n_valid > 0
    pairs = int(real.sum()) ** 2 * ts.layout.block ** 2
    if pairs > UNCLASSIFIED_MAX_PAIRS:
        raise MaskDSLError(
            f"{type(f).__name__}: this flat kind has no tile classifier, so classifying its "
            f"tiles would evaluate the mask on {pairs} token pairs, beyond "
            f"UNCLASSIFIED_MAX_PAIRS = 2**{UNCLASSIFIED_MAX_PAIRS.bit_length() - 1} "
            f"({ts.layout.n} tokens); register one with codegen.blockmask.classify_flat")
    return TileClasses.from_row_chunks(
        T, T, lambda a, b: np.where(real[a:b, None] & real[None, :], UNDECIDED, EMPTY
                                    ).astype(np.int8))


@classify_flat.register(SinkFlat)
def _(f, ts):
    cnt = ((ts.tokens < f.n) & ts.valid).sum(1)
    cls = np.where(cnt == 0, EMPTY, np.where(cnt == ts.n_valid, FULL, PARTIAL)).astype(np.int8)
    cols = np.nonzero(cls)[0]                    # the key tiles holding sink tokens
    T = ts.T
    rows = np.repeat(np.arange(T), len(cols))
    return TileClasses.from_pairs(T, T, rows, np.tile(cols, T), np.tile(cls[cols], T), sort=False)


@classify_flat.register(DocumentFlat)
def _(f, ts):
    ids = f.ids
    ids = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
    mn, mx = ts.summary(ids.astype(np.int64))
    single = mn == mx

    def rows(a, b):
        disjoint = (mx[a:b, None] < mn[None, :]) | (mx[None, :] < mn[a:b, None])
        same = single[a:b, None] & single[None, :] & (mn[a:b, None] == mn[None, :])
        return np.where(disjoint, EMPTY, np.where(same, FULL, UNDECIDED)).astype(np.int8)

    return TileClasses.from_row_chunks(ts.T, ts.T, rows)


@classify_flat.register(PowerFlat)
def _(f, ts):
    big = np.iinfo(np.int64).max
    b = np.where(ts.valid, np.maximum(ts.tokens, 0) // f.block, 0)
    mn = np.where(ts.valid, b, big).min(1)
    mx = np.where(ts.valid, b, -big).max(1)
    sorted_b = np.sort(np.where(ts.valid, b, big), 1)
    distinct = ((np.diff(sorted_b, axis=1) != 0) & (sorted_b[:, 1:] != big)).sum(1) + 1
    contiguous = (mx - mn + 1) == distinct

    def rows(a, b_):
        dmin = mn[a:b_, None] - mx[None, :]
        dmax = mx[a:b_, None] - mn[None, :]
        allowed = _count_pow2_or_zero(dmin, dmax)
        total = dmax - dmin + 1
        both = contiguous[a:b_, None] & contiguous[None, :]
        return np.where(allowed == 0, EMPTY,
                        np.where(both, np.where(allowed == total, FULL, PARTIAL), UNDECIDED)
                        ).astype(np.int8)

    return TileClasses.from_row_chunks(ts.T, ts.T, rows)


@classify_flat.register(RadialFlat)
def _(f, ts):
    per_frame = f.per_frame
    band = np.asarray(f.bands, dtype=np.int64)
    t0 = np.maximum(ts.tokens, 0)
    big = np.iinfo(np.int64).max
    fr, a_ = t0 // per_frame, t0 % per_frame
    fmin, fmax = np.where(ts.valid, fr, big).min(1), np.where(ts.valid, fr, -big).max(1)
    amin, amax = np.where(ts.valid, a_, big).min(1), np.where(ts.valid, a_, -big).max(1)
    F = len(band)
    lo_band, hi_band = _range_min_max(band)

    def rows(a, b):
        dmin = np.maximum(0, np.maximum(fmin[a:b, None] - fmax[None, :], fmin[None, :] - fmax[a:b, None]))
        dmax = np.maximum(fmax[a:b, None] - fmin[None, :], fmax[None, :] - fmin[a:b, None])
        gap = np.maximum(0, np.maximum(amin[a:b, None] - amax[None, :], amin[None, :] - amax[a:b, None]))
        span = np.maximum(amax[a:b, None] - amin[None, :], amax[None, :] - amin[a:b, None])
        dmin_c, dmax_c = np.clip(dmin, 0, F - 1), np.clip(dmax, 0, F - 1)
        bmin, bmax = lo_band[dmin_c, dmax_c], hi_band[dmin_c, dmax_c]
        sink_all = (fmax < f.sink_frames)[None, :]
        sink_none = (fmin >= f.sink_frames)[None, :]
        full = sink_all | (bmin >= span)
        empty = sink_none & (bmax < gap)
        return np.where(empty, EMPTY, np.where(full, FULL, UNDECIDED)).astype(np.int8)

    return TileClasses.from_row_chunks(ts.T, ts.T, rows)


@classify_flat.register(FnFlat)
def _(f, ts):
    """A user's function: no pair is decided here. Without ``key_range`` every pair of tiles
    with real tokens is UNDECIDED; with it, the pairs where some query's [lo, hi) hull meets the
    key tile's span of flat indices (a superset of the pairs fn can allow; the rest are EMPTY).
    Refinement then evaluates fn on the UNDECIDED pairs."""
    T = ts.T
    real = ts.n_valid > 0
    if f.key_range is None:
        return TileClasses.from_row_chunks(
            T, T, lambda a, b: np.where(real[a:b, None] & real[None, :], UNDECIDED, EMPTY
                                        ).astype(np.int8))
    check_key_range(f)
    lo, hi = fn_key_range(f)
    big = np.iinfo(np.int64).max
    tok = ts.tokens
    t0 = np.maximum(tok, 0)
    has = ts.valid & (hi[t0] > lo[t0])                  # queries with a non-empty range
    a_ = np.where(has, lo[t0], big).min(1)              # per query tile: the hull [a_, b_)
    b_ = np.where(has, hi[t0], -1).max(1)
    kmin = np.where(ts.valid, tok, big).min(1)          # per key tile: its flat span
    kmax = np.where(ts.valid, tok, -1).max(1)

    def rows(a, b):
        meet = (kmin[None, :] < b_[a:b, None]) & (kmax[None, :] >= a_[a:b, None])
        return np.where(meet, UNDECIDED, EMPTY).astype(np.int8)

    return TileClasses.from_row_chunks(T, T, rows)


def fn_key_range(f: FnFlat):
    """``key_range`` on every flat query index: (lo, hi) int64 numpy arrays [n], clipped to
    [0, n]; MaskDSLError naming key_range when it fails, returns something else or gives
    lo > hi for some query."""
    n = f.n
    q = torch.arange(n, dtype=torch.int64)
    with torch.no_grad():
        try:
            r = f.key_range(q)
        except MaskDSLError:
            raise
        except Exception as e:
            raise MaskDSLError(f"{f.node!r}: key_range raised {type(e).__name__}: {e} when "
                               f"called with the int64 tensor of all {n} flat query indices"
                               ) from None
        lo, hi = check_key_range_result(f.node, r, q)
    return np.clip(lo.cpu().numpy(), 0, n), np.clip(hi.cpu().numpy(), 0, n)


KEY_RANGE_EXACT_PAIRS = 1 << 24   # grids up to 4096 tokens: every pair outside key_range checked
KEY_RANGE_SAMPLE = 1 << 16        # beyond: the keys next to each range + this many random pairs
_KEY_RANGE_CHECKED = LRU(1024)    # (fn, key_range, head, n) already checked


def check_key_range(f: FnFlat) -> None:
    """Hold ``key_range`` to its promise on the pairs the tile classes skip (ARCHITECTURE.md,
    "Semantics", mask_fn): tile pairs outside every query's range are EMPTY and ``fn`` is never
    called on them, so a range narrower than ``fn``'s keys would drop keys without a word.
    Up to ``KEY_RANGE_EXACT_PAIRS`` token pairs (n * n) ``fn`` is evaluated on every pair, in
    row chunks; beyond, on the key just below and just above every query's range (where an
    off-by-one lives) and on ``KEY_RANGE_SAMPLE`` pairs drawn with a fixed seed. A pair that
    ``fn`` allows outside the range raises MaskDSLError naming it (``_CheckedFn``). Checked once
    per function, range function, head and grid size."""
    key = (function_key(f.fn), function_key(f.key_range), f.head, f.n)
    if _KEY_RANGE_CHECKED.get(key) is not None:
        return
    n = f.n
    check = _CheckedFn(f)
    lo, hi = (torch.from_numpy(np.ascontiguousarray(x)) for x in fn_key_range(f))
    check._range = (lo, hi)
    h = 0 if f.head is None else f.head
    zero = torch.zeros((), dtype=torch.int64)
    head = torch.full((), h, dtype=torch.int64)
    if n * n <= KEY_RANGE_EXACT_PAIRS:
        k = torch.arange(n, dtype=torch.int64)[None, :]
        rows = max(1, PAIR_CHUNK // max(1, n))
        for a in range(0, n, rows):
            q = torch.arange(a, min(n, a + rows), dtype=torch.int64)[:, None]
            check(zero + q * 0, head + q * 0, q, k)
    else:
        g = torch.Generator().manual_seed(0)
        qs = torch.arange(n, dtype=torch.int64)
        rq = torch.randint(0, n, (KEY_RANGE_SAMPLE,), generator=g, dtype=torch.int64)
        rk = torch.randint(0, n, (KEY_RANGE_SAMPLE,), generator=g, dtype=torch.int64)
        below, above = lo > 0, hi < n
        q = torch.cat([qs[below], qs[above], rq])
        k = torch.cat([lo[below] - 1, hi[above], rk])
        out = (k < lo[q]) | (k >= hi[q])                 # only the skipped pairs
        q, k = q[out], k[out]
        for a in range(0, q.numel(), PAIR_CHUNK):
            qq, kk = q[a:a + PAIR_CHUNK], k[a:a + PAIR_CHUNK]
            check(zero + qq * 0, head + qq * 0, qq, kk)
    _KEY_RANGE_CHECKED.put(key, True)


class _CheckedFn:
    """A user's mask function as compile-time evaluation calls it: its result is checked (a
    bool tensor of the broadcast shape) and its errors become MaskDSLError naming it. The
    generated mods call the function itself (traceable by torch.compile)."""

    def __init__(self, f: FnFlat):
        self.f = f
        self._range = None

    def _outside(self, out, q, k) -> None:
        """A key_range is a promise: an allowed pair outside it is an error here (the pairs
        outside every candidate tile are never evaluated: the reference checks all of them)."""
        if self._range is None:
            self._range = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in fn_key_range(self.f))
        lo, hi = self._range
        bad = out & ((k < lo[q]) | (k >= hi[q]))
        if bool(bad.any()):
            idx = torch.nonzero(bad)[0].tolist()
            qq = int(q.expand(bad.shape)[tuple(idx)])
            kk = int(k.expand(bad.shape)[tuple(idx)])
            raise MaskDSLError(
                f"{self.f.node!r}: key_range is not a superset of fn's keys: fn allows query "
                f"{qq} -> key {kk} but key_range gives [{int(lo[qq])}, {int(hi[qq])}); widen "
                f"key_range or drop it")

    def __call__(self, b, h, q, k):
        where = (f"when called with int64 tensors q_idx {list(q.shape)}, kv_idx "
                 f"{list(k.shape)} (tile classification)")
        try:
            out = self.f.fn(b, h, q, k)
        except MaskDSLError:
            raise
        except Exception as e:
            raise MaskDSLError(f"{self.f.node!r}: fn raised {type(e).__name__}: {e} {where}"
                               ) from None
        check_mask_result(self.f.node, out, tuple(torch.broadcast_shapes(q.shape, k.shape)), where)
        if self.f.key_range is not None:
            self._outside(out, q, k)
        return out


def _fn_leaves(ir) -> list:
    if isinstance(ir, FnFlat):
        return [ir]
    kids = getattr(ir, "children", None)
    if kids is None:
        kids = (ir.child,) if isinstance(ir, NotN) else ()
    return [x for c in kids for x in _fn_leaves(c)]


_DIM_CACHE = LRU(4096)   # (dim range, side, tile, groups, padded) -> TileClasses


def dim_tile_classes(dr: DimRange, layout: Layout, d: int) -> TileClasses:
    """Classes of one dim's condition between the tile intervals of a tiled layout (n_d x n_d,
    sparse; cached: the layout search asks for the same (dim, tile side, grouping) often)."""
    L, t, g = layout.shape[d], layout.tile[d], layout.groups[d]
    key = (dr, L, t, g, layout.padded[d])
    out = _DIM_CACHE.get(key)
    if out is None:
        if g == 1 and layout.padded[d] > DENSE_DIM_LIMIT:
            out = _TileSets._dim_classes_1d(dr, L, t, layout.grid[d])
        else:
            out = TileClasses.from_dense(_TileSets._dim_classes_dense(dr, layout.dim_order(d), t))
        out = _DIM_CACHE.put(key, out)
    return out


def separable_cost(ir: Sep, layout: Layout) -> int:
    """Non-empty tile pairs of a separable IR on a tiled layout, without any T x T array:
    a pair is non-empty iff it is non-empty on every dim, so the count is a product."""
    cost = 1
    for d, dr in enumerate(ir.dims):
        cost *= dim_tile_classes(dr, layout, d).nnz
    return cost


def _range_min_max(band: np.ndarray):
    """min/max of band[d0..d1] for all d0 <= d1 (frames is small: a frames x frames table)."""
    F = len(band)
    lo = np.empty((F, F), dtype=np.int64)
    hi = np.empty((F, F), dtype=np.int64)
    for d0 in range(F):
        lo[d0, d0:] = np.minimum.accumulate(band[d0:])
        hi[d0, d0:] = np.maximum.accumulate(band[d0:])
        lo[d0, :d0] = band[d0]
        hi[d0, :d0] = band[d0]
    return lo, hi


def _floor_log2(x: np.ndarray) -> np.ndarray:
    """floor(log2(x)) of int64 x >= 1, exact: float64's log2 can be one off either way from
    2**53 up (2**60 - 1 rounds to 2**60), so the estimate is corrected in both directions."""
    b = np.clip(np.floor(np.log2(x.astype(np.float64))).astype(np.int64), 0, 62)
    one = np.int64(1)
    b = np.where((b > 0) & ((one << b) > x), b - 1, b)
    return np.where((b < 62) & ((one << np.minimum(b + 1, 62)) <= x), b + 1, b)


def _count_pow2_or_zero(dmin: np.ndarray, dmax: np.ndarray) -> np.ndarray:
    """How many D in [dmin, dmax] are 0 or a power of two: with f(x) = floor(log2(x)) and
    f(0) = -1, the powers of two in [lo, hi] (lo >= 1) number f(hi) - f(lo - 1)."""
    dmin, dmax = np.asarray(dmin, np.int64), np.asarray(dmax, np.int64)
    zero = ((dmin <= 0) & (dmax >= 0)).astype(np.int64)
    lo = np.maximum(dmin, 1)
    ok = dmax >= lo
    f_hi = _floor_log2(np.maximum(dmax, 1))
    f_below = np.where(lo > 1, _floor_log2(np.maximum(lo - 1, 1)), -1)
    return zero + np.where(ok, f_hi - f_below, 0)


def _tile_ranges(dr: DimRange, tiles: np.ndarray, B: int, L: int):
    """Key ranges [lo, hi) of every query of the given B-token tiles, [len(tiles), B]; padding
    queries past L get the empty range [L, 0) (they never count)."""
    x = tiles[:, None] * B + np.arange(B)[None, :]
    lo, hi = key_range(dr, x, L)
    pad = x >= L
    if pad.any():
        lo, hi = np.where(pad, L, lo), np.where(pad, 0, hi)
    return lo, hi


def key_range(dr: DimRange, x: np.ndarray, L: int):
    """Per query coordinate x: its key range [lo, hi) on the dim, clipped to [0, L)."""
    lo = np.zeros(x.shape, np.int64) if dr.lo is None else np.broadcast_to(evaluate(dr.lo, {Q[0]: x}), x.shape)
    hi = np.full(x.shape, L, np.int64) if dr.hi is None else np.broadcast_to(evaluate(dr.hi, {Q[0]: x}), x.shape)
    return np.clip(lo, 0, L).astype(np.int64), np.clip(hi, 0, L).astype(np.int64)


_MATRICES = LRU(256)   # (dim range, length) -> bool [L, L], L <= 512 (at most 64 MB)


def _dim_matrix_cached(dr: DimRange, order: np.ndarray) -> np.ndarray:
    """``dim_matrix`` on a dim's coordinate order, via the natural-order matrix (computed once
    per (dim range, length): the layout search asks for it under many orders)."""
    L = int(order.max()) + 1 if len(order) else 0
    if L > 512:                      # only small matrices are worth keeping
        return dim_matrix(dr, np.maximum(order, 0))
    key = (dr, L)
    m = _MATRICES.get(key)
    if m is None:
        m = _MATRICES.put(key, dim_matrix(dr, np.arange(L)))
    x = np.maximum(order, 0)
    return m[x[:, None], x[None, :]]


def dim_matrix(dr: DimRange, x: np.ndarray) -> np.ndarray:
    """bool [len(x), len(x)]: the dim condition between every pair of the coordinates x."""
    n = len(x)
    if dr.lo is None and dr.hi is None and not dr.steps:
        return np.ones((n, n), dtype=bool)
    big = np.iinfo(np.int64).max // 4
    lo = np.full(n, -big) if dr.lo is None else np.broadcast_to(evaluate(dr.lo, {Q[0]: x}), (n,))
    hi = np.full(n, big) if dr.hi is None else np.broadcast_to(evaluate(dr.hi, {Q[0]: x}), (n,))
    k = x[None, :]
    m = (lo[:, None] <= k) & (k < hi[:, None])
    for s in dr.steps:
        m &= np.mod(k - x[:, None], int(s)) == 0
    return m


def _flat_range_boxes(a: int, b: int, shape: tuple) -> List[tuple]:
    """Split the row-major flat range [a, b) into boxes (lo, hi) of grid coordinates."""
    if a >= b:
        return []
    if len(shape) == 1:
        return [((a,), (b,))]
    inner = math.prod(shape[1:])
    r0, r1 = a // inner, (b - 1) // inner
    if r0 == r1:
        return [((r0,) + lo, (r0 + 1,) + hi)
                for lo, hi in _flat_range_boxes(a - r0 * inner, b - r0 * inner, shape[1:])]
    out = []
    first_full = r0 if a % inner == 0 else r0 + 1
    last_full = r1 if b == (r1 + 1) * inner else r1 - 1
    if first_full != r0:
        out += _flat_range_boxes(a, (r0 + 1) * inner, shape)
    if last_full >= first_full:
        out.append(((first_full,) + (0,) * (len(shape) - 1), (last_full + 1,) + tuple(shape[1:])))
    if last_full != r1:
        out += _flat_range_boxes(r1 * inner, b, shape)
    return out


# ------------------------------------------------------------------ combining and refining

@functools.singledispatch
def _classify_ir(ir, ts: _TileSets) -> TileClasses:
    raise TypeError(f"cannot classify {ir!r}")


@_classify_ir.register(Const)
def _(ir, ts):
    if not ir.value:
        return TileClasses.empty(ts.T, ts.T)
    return TileClasses.from_row_chunks(ts.T, ts.T, lambda a, b: np.full((b - a, ts.T), FULL, np.int8))


@_classify_ir.register(Sep)
def _(ir, ts):
    return ts.sep(ir)


@_classify_ir.register(Flat)
def _(ir, ts):
    return classify_flat(ir, ts)


@_classify_ir.register(NotN)
def _(ir, ts):
    c = _classify_ir(ir.child, ts)
    flip = np.array([FULL, PARTIAL, EMPTY, UNDECIDED], dtype=np.int8)   # EMPTY <-> FULL
    return TileClasses.from_row_chunks(ts.T, ts.T, lambda a, b: flip[c.rows_dense(a, b)])


@_classify_ir.register(AndN)
def _(ir, ts):
    return combine([_classify_ir(c, ts) for c in ir.children], "and")


@_classify_ir.register(OrN)
def _(ir, ts):
    return combine([_classify_ir(c, ts) for c in ir.children], "or")


def flat_evaluator(ir, tables, shape: tuple) -> Callable:
    """A torch function ``pred(q_flat, kv_flat)`` for a head-specialised IR (for refinement)."""
    qf, kf = sp.Symbol("q_flat", integer=True, nonnegative=True), sp.Symbol("kv_flat", integer=True, nonnegative=True)
    rm = Layout(shape)
    prologue = [x for x in rm.decode(qf, "q") if not x[0].endswith("_flat")]
    prologue += [x for x in rm.decode(kf, "k") if not x[0].endswith("_flat")]
    expr = predicate(ir, Q, K, QF, KF)
    src = emit_function("pred", ["q_flat", "kv_flat"], prologue, expr, true_like="(q_flat + kv_flat)")
    env = {name: torch.as_tensor(np.asarray(v)) for name, v in tables.values.items()}
    env.update({name: torch.as_tensor(t).cpu() for name, t in tables.tensors.items()})
    if tables.fns:
        leaves = {str(f.expr.args[0]): f for f in _fn_leaves(ir)}   # by the captured name
        env.update({name: _CheckedFn(leaves[name]) if name in leaves else fn
                    for name, fn in tables.fns.items()})
    return exec_source(src, env)


def pair_counts(rows: np.ndarray, cols: np.ndarray, tokens: np.ndarray, pred: Callable):
    """For tile pairs (rows[i], cols[i]) of a layout's ``tokens`` [T, V] (-1 = padding): how
    many real token pairs the predicate allows, and how many real pairs there are. The one
    loop that evaluates a mask on tile pairs (refinement, exact densities), in chunks of
    ``PAIR_CHUNK`` token pairs."""
    V = tokens.shape[1]
    chunk = max(1, PAIR_CHUNK // (V * V))
    tok = torch.from_numpy(tokens)
    allowed = np.zeros(len(rows), np.int64)
    size = np.zeros(len(rows), np.int64)
    for s in range(0, len(rows), chunk):
        a, b = torch.from_numpy(rows[s:s + chunk]), torch.from_numpy(cols[s:s + chunk])
        q, k = tok[a][:, :, None], tok[b][:, None, :]
        ok = (q >= 0) & (k >= 0)
        m = pred(q.clamp(min=0), k.clamp(min=0)) & ok
        allowed[s:s + chunk] = m.sum((1, 2)).numpy()
        size[s:s + chunk] = ok.sum((1, 2)).numpy()
    return allowed, size


def _refine(cls: TileClasses, ts: _TileSets, pred: Callable, ir=None) -> TileClasses:
    und = np.nonzero(cls.cls == UNDECIDED)[0]
    if len(und) == 0:
        return cls
    fns = _fn_leaves(ir) if ir is not None and contains(ir, FnFlat) else []
    pairs = len(und) * ts.layout.block ** 2
    if fns and pairs > MASK_FN_MAX_PAIRS:
        open_ = [f for f in fns if f.key_range is None]
        what = repr(open_[0].node if open_ else fns[0].node)
        fix = ("pass key_range=lambda q_idx: (lo, hi), a superset [lo, hi) of each query's flat "
               "keys, so only the tiles it meets are evaluated" if open_ else
               "tighten its key_range (or AND it with a bounded pattern such as window(w))")
        raise MaskDSLError(
            f"{what}: classifying its tiles would evaluate the function on {pairs} token pairs, "
            f"beyond MASK_FN_MAX_PAIRS = 2**{MASK_FN_MAX_PAIRS.bit_length() - 1} "
            f"({ts.layout.n} tokens); {fix}")
    cnt, size = pair_counts(cls.rows()[und], cls.indices[und], ts.tokens, pred)
    new = cls.cls.copy()
    new[und] = np.where(cnt == 0, EMPTY, np.where(cnt == size, FULL, PARTIAL))
    return cls.with_classes(new)


def classify(ir, tables, layout: Layout, ts: Optional[_TileSets] = None,
             refine: bool = True) -> TileClasses:
    """Sparse classes of one head's (specialised) IR on a layout, padding included."""
    ts = ts or _TileSets(layout)
    cls = _classify_ir(ir, ts)
    if refine and (cls.cls == UNDECIDED).any():
        cls = _refine(cls, ts, flat_evaluator(ir, tables, layout.shape), ir)
    # padding: a tile pair with padded tokens is never FULL; all-padding tiles are EMPTY
    if layout.pads:
        part = ts.n_valid < layout.block
        none = ts.n_valid == 0
        rows, cols = cls.rows(), cls.indices
        keep = ~(none[rows] | none[cols])
        new = np.where((part[rows] | part[cols]) & (cls.cls == FULL), PARTIAL, cls.cls)
        cls = cls.with_classes(np.where(keep, new, EMPTY).astype(np.int8))
    return cls


class HeadClasses:
    """Tile classes for every head: heads with the same IR share one ``TileClasses`` (O(H)
    bookkeeping, O(distinct heads x non-empty pairs) memory)."""

    def __init__(self, per_head: List[int], distinct: List[TileClasses]):
        self.per_head, self.distinct = list(per_head), list(distinct)
        self.H = len(self.per_head)
        self.T = distinct[0].Tq

    def head(self, h: int) -> TileClasses:
        return self.distinct[self.per_head[h]]

    @property
    def shared(self) -> bool:
        return len(self.distinct) == 1

    def nonempty(self) -> int:
        """Non-empty tile pairs summed over heads."""
        return int(sum(self.distinct[i].nnz for i in self.per_head))

    def count(self, which) -> int:
        return int(sum(self.distinct[i].count(which) for i in self.per_head))

    def dense(self) -> np.ndarray:
        """int8 [H, T, T] (tests and small pictures)."""
        tabs = [d.dense() for d in self.distinct]
        return np.stack([tabs[i] for i in self.per_head])

    def nbytes(self) -> int:
        return sum(d.nbytes() for d in self.distinct)


def tile_classes(pattern_irs, layout: Layout, refine: bool = True) -> HeadClasses:
    """Classes for each head: ``pattern_irs`` is a list of (ir, tables) per head; heads with the
    same IR share one classification."""
    ts = _TileSets(layout)
    index: Dict[object, int] = {}
    distinct: List[TileClasses] = []
    per_head = []
    for ir, tables in pattern_irs:
        key = (ir, repr(tables.values), tuple(sorted(tables.tensors)))
        if key not in index:
            made = classify(ir, tables, layout, ts, refine)
            same = next((i for i, d in enumerate(distinct) if d.same_as(made)), None)
            if same is None:
                same = len(distinct)
                distinct.append(made)
            index[key] = same
        per_head.append(index[key])
    return HeadClasses(per_head, distinct)
