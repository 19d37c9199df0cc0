"""The analytic BlockMask: classify every (query tile, key tile) pair as empty, partial or full
without evaluating the mask over all N^2 token pairs.

Classes are int8: ``EMPTY = 0 < PARTIAL = 1 < FULL = 2``, plus ``UNDECIDED = 3`` while combining.
All classes are *restricted to real tokens*: padding positions are accounted for at the end.

* Separable IR (:class:`~maskdsl.codegen.ir.Sep`) is classified one dimension at a time. Per
  dim, the condition is evaluated on the dim's coordinates only (``L x L``, not ``N x N``) and
  reduced to tile intervals; an N-D pair is EMPTY if any dim is, FULL if all dims are, else
  PARTIAL — i.e. the minimum over dims, exact because the predicate is an AND over dims. For a
  long 1-D sequence the per-query key range ``[lo(q), hi(q))`` is used instead (O(N) work).
* Flat IR (sink, document, power, radial) has its own classifier over per-tile token sets.
* ``&``, ``|`` and ``~`` combine the three values; pairs whose class cannot be decided that way
  (e.g. PARTIAL & PARTIAL) are UNDECIDED and are *refined*: the mask is evaluated on those tile
  pairs only.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import numpy as np
import sympy as sp
import torch

from .ir import (K, KF, Q, QF, AndN, Const, DimRange, Flat, NotN, OrN, Sep, evaluate,
                 predicate)
from .printer_torch import emit_function
from .tiling import Layout

__all__ = ["EMPTY", "PARTIAL", "FULL", "UNDECIDED", "classify", "tile_classes", "DENSE_DIM_LIMIT"]

EMPTY, PARTIAL, FULL, UNDECIDED = 0, 1, 2, 3
DENSE_DIM_LIMIT = 4096        # per-dim L x L evaluation up to this length
REFINE_CHUNK = 1 << 22        # token pairs evaluated at once while refining


def _exec(src: str, name: str, env: dict) -> Callable:
    g = {"torch": torch, **env}
    exec(compile(src, f"<maskdsl:{name}>", "exec"), g)
    return g[name]


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
        self.tokens = layout.tokens().reshape(self.T, layout.block)    # -1 = padding
        self.valid = self.tokens >= 0
        self.n_valid = self.valid.sum(1)
        self._boxes = None

    # ------------------------------------------------------------ separable IR
    def sep(self, sep: Sep) -> np.ndarray:
        L = self.layout
        if L.tile is not None:
            out = None
            for d, dr in enumerate(sep.dims):
                cls = dim_tile_classes(dr, L, d)
                shape = [1] * (2 * L.rank)
                shape[d], shape[L.rank + d] = L.grid[d], L.grid[d]
                c = cls.reshape(shape)
                out = c if out is None else np.minimum(out, c)
            return np.broadcast_to(out, tuple(L.grid) * 2).reshape(self.T, self.T)
        if L.rank == 1:
            return self._dim_classes_1d(sep.dims[0], L.shape[0], L.block, self.T)
        return self._sep_boxes(sep)

    @staticmethod
    def _dim_classes_dense(dr: DimRange, order: np.ndarray, t: int) -> np.ndarray:
        """Tile-interval classes on one dim from the L x L condition (any coordinate order)."""
        m = dim_matrix(dr, np.maximum(order, 0))
        ok = order >= 0
        m = m & ok[:, None] & ok[None, :]
        n = len(order) // t
        cnt = m.reshape(n, t, n, t).sum((1, 3))
        v = ok.reshape(n, t).sum(1)
        return _classes_from_counts(cnt, v, v)

    @staticmethod
    def _dim_classes_1d(dr: DimRange, L: int, B: int, T: int) -> np.ndarray:
        """1-D row-major classes from per-query key ranges: O(N + candidate pairs)."""
        if L <= DENSE_DIM_LIMIT:
            order = np.arange(T * B)
            order[L:] = -1
            return _TileSets._dim_classes_dense(dr, order, B)
        x = np.arange(L)
        lo, hi = key_range(dr, x, L)
        steps = [int(s) for s in dr.steps]
        step = math.lcm(*steps) if steps else 1
        pad = T * B - L
        # padding queries get the empty range [L, 0): they never count (int32: L < 2**31)
        lo_t = np.pad(lo.astype(np.int32), (0, pad), constant_values=L).reshape(T, B)
        hi_t = np.pad(hi.astype(np.int32), (0, pad), constant_values=0).reshape(T, B)
        real = np.minimum(B, L - np.arange(T) * B)              # real tokens per tile
        has = hi_t > lo_t                                       # queries with any key
        big = np.iinfo(np.int64).max
        min_lo = np.where(has, lo_t, big).min(1)
        max_lo = np.where(has, lo_t, -1).max(1)
        min_hi = np.where(has, hi_t, big).min(1)
        max_hi = np.where(has, hi_t, 0).max(1)
        all_have = has.sum(1) == real
        out = np.zeros((T, T), dtype=np.int8)
        rows = np.nonzero(max_hi > 0)[0]
        if len(rows) == 0:
            return out
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
        # undecided boundary pairs: count exactly (a few per row for banded patterns)
        und = np.nonzero(~full & ~empty)[0]
        if len(und):
            ii = i_idx[und]
            bb0, bb1 = b0[und].astype(np.int32), b1[und].astype(np.int32)
            s_ = np.maximum(lo_t[ii], bb0[:, None])                     # [P, B]
            e_ = np.minimum(hi_t[ii], bb1[:, None])
            if step == 1:
                cnt = np.maximum(e_ - s_, 0).sum(1)
            else:
                q = (ii[:, None] * B + np.arange(B, dtype=np.int32)[None, :]).astype(np.int32)
                first = s_ + np.mod(q - s_, step)
                cnt = np.where(e_ > first, (e_ - first + step - 1) // step, 0).sum(1)
            size = real[ii] * (bb1 - bb0)
            cls[und] = np.where(cnt == 0, EMPTY, np.where(cnt == size, FULL, PARTIAL))
        out[i_idx, j_idx] = cls
        return out

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

    def _sep_boxes(self, sep: Sep) -> np.ndarray:
        """Row-major N-D tiles: each tile is a few boxes; a box pair's class is the min over
        dims of the per-dim interval classes (from 2-D prefix sums of the per-dim condition)."""
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
        out = np.empty((T, T), dtype=np.int8)
        rows = max(1, int(2e7 // max(1, T * nb * nb)))
        for i0 in range(0, T, rows):
            i1 = min(T, i0 + rows)
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
            out[i0:i1] = np.where(~any_real | (mx == EMPTY), EMPTY,
                                  np.where(mn == FULL, FULL, PARTIAL))
        return out

    # ------------------------------------------------------------ flat IR
    def flat(self, f: Flat, head: int) -> np.ndarray:
        tok, valid = self.tokens, self.valid
        T = self.T
        if f.kind == "sink":
            n = f.info["n"][head]
            cnt = ((tok < n) & valid).sum(1)
            cls = np.where(cnt == 0, EMPTY, np.where(cnt == self.n_valid, FULL, PARTIAL)).astype(np.int8)
            return np.broadcast_to(cls[None, :], (T, T))
        big = np.iinfo(np.int64).max
        if f.kind == "document":
            ids = f.info["ids"]
            ids = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
            v = np.where(valid, ids[np.maximum(tok, 0)], 0)
            mn = np.where(valid, v, big).min(1)
            mx = np.where(valid, v, -big).max(1)
            single = mn == mx
            disjoint = (mx[:, None] < mn[None, :]) | (mx[None, :] < mn[:, None])
            same = single[:, None] & single[None, :] & (mn[:, None] == mn[None, :])
            return np.where(disjoint, EMPTY, np.where(same, FULL, UNDECIDED)).astype(np.int8)
        if f.kind == "power":
            blk = f.info["block"][head]
            b = np.where(valid, np.maximum(tok, 0) // blk, 0)
            mn = np.where(valid, b, big).min(1)
            mx = np.where(valid, b, -big).max(1)
            sorted_b = np.sort(np.where(valid, b, big), 1)
            distinct = ((np.diff(sorted_b, axis=1) != 0) & (sorted_b[:, 1:] != big)).sum(1) + 1
            contiguous = (mx - mn + 1) == distinct
            dmin = mn[:, None] - mx[None, :]
            dmax = mx[:, None] - mn[None, :]
            allowed = _count_pow2_or_zero(dmin, dmax)
            total = dmax - dmin + 1
            both = contiguous[:, None] & contiguous[None, :]
            return np.where(allowed == 0, EMPTY,
                            np.where(both, np.where(allowed == total, FULL, PARTIAL), UNDECIDED)).astype(np.int8)
        if f.kind == "radial":
            per_frame = f.info["per_frame"]
            band = np.asarray(f.info["bands"][head], dtype=np.int64)
            sink_frames = f.info["sink_frames"][head]
            t0 = np.maximum(tok, 0)
            fr, a = t0 // per_frame, t0 % per_frame
            fmin, fmax = np.where(valid, fr, big).min(1), np.where(valid, fr, -big).max(1)
            amin, amax = np.where(valid, a, big).min(1), np.where(valid, a, -big).max(1)
            dmin = np.maximum(0, np.maximum(fmin[:, None] - fmax[None, :], fmin[None, :] - fmax[:, None]))
            dmax = np.maximum(fmax[:, None] - fmin[None, :], fmax[None, :] - fmin[:, None])
            gap = np.maximum(0, np.maximum(amin[:, None] - amax[None, :], amin[None, :] - amax[:, None]))
            span = np.maximum(amax[:, None] - amin[None, :], amax[None, :] - amin[:, None])
            F = len(band)
            lo_band, hi_band = _range_min_max(band)
            dmin_c, dmax_c = np.clip(dmin, 0, F - 1), np.clip(dmax, 0, F - 1)
            bmin, bmax = lo_band[dmin_c, dmax_c], hi_band[dmin_c, dmax_c]
            sink_all = (fmax < sink_frames)[None, :]
            sink_none = (fmin >= sink_frames)[None, :]
            full = sink_all | (bmin >= span)
            empty = sink_none & (bmax < gap)
            return np.where(empty, EMPTY, np.where(full, FULL, UNDECIDED)).astype(np.int8)
        raise AssertionError(f.kind)


_DIM_CACHE: Dict[tuple, np.ndarray] = {}


def dim_tile_classes(dr: DimRange, layout: Layout, d: int) -> np.ndarray:
    """Classes [n_d, n_d] of one dim's condition between the tile intervals of a tiled layout
    (cached: the layout search asks for the same (dim, tile side, grouping) many times)."""
    L, t, g = layout.shape[d], layout.tile[d], layout.groups[d]
    key = (dr, L, t, g, layout.padded[d])
    out = _DIM_CACHE.get(key)
    if out is None:
        if g == 1 and layout.padded[d] > DENSE_DIM_LIMIT:
            out = _TileSets._dim_classes_1d(dr, L, t, layout.grid[d])
        else:
            out = _TileSets._dim_classes_dense(dr, layout.dim_order(d), t)
        if len(_DIM_CACHE) > 4096:
            _DIM_CACHE.clear()
        _DIM_CACHE[key] = out
    return out


def separable_cost(ir: Sep, layout: Layout) -> int:
    """Non-empty tile pairs of a separable IR on a tiled layout, without any T x T array:
    a pair is non-empty iff it is non-empty on every dim, so the count is a product."""
    cost = 1
    for d, dr in enumerate(ir.dims):
        cost *= int((dim_tile_classes(dr, layout, d) != EMPTY).sum())
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


def _count_pow2_or_zero(dmin: np.ndarray, dmax: np.ndarray) -> np.ndarray:
    """How many D in [dmin, dmax] are 0 or a power of two."""
    zero = ((dmin <= 0) & (dmax >= 0)).astype(np.int64)
    lo = np.maximum(dmin, 1)
    hi = dmax
    ok = hi >= lo
    hi_bits = np.where(ok, np.floor(np.log2(np.maximum(hi, 1))).astype(np.int64), 0)
    lo_bits = np.where(ok, np.ceil(np.log2(np.maximum(lo, 1))).astype(np.int64), 0)
    # guard float rounding at exact powers of two
    hi_bits = np.where(ok & ((1 << (hi_bits + 1)) <= hi), hi_bits + 1, hi_bits)
    lo_bits = np.where(ok & (lo_bits > 0) & ((1 << (lo_bits - 1)) >= lo), lo_bits - 1, lo_bits)
    return zero + np.where(ok, np.maximum(0, hi_bits - lo_bits + 1), 0)


def key_range(dr: DimRange, x: np.ndarray, L: int):
    """Per query coordinate x: its key range [lo, hi) on the dim, clipped to [0, L)."""
    lo = np.zeros(x.shape, np.int64) if dr.lo is None else np.broadcast_to(evaluate(dr.lo, {Q[0]: x}), x.shape)
    hi = np.full(x.shape, L, np.int64) if dr.hi is None else np.broadcast_to(evaluate(dr.hi, {Q[0]: x}), x.shape)
    return np.clip(lo, 0, L).astype(np.int64), np.clip(hi, 0, L).astype(np.int64)


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

def _combine(cls: List[np.ndarray], kind) -> np.ndarray:
    stack = np.stack(np.broadcast_arrays(*cls))
    if kind is AndN:
        neutral, absorbing = FULL, EMPTY
    else:
        neutral, absorbing = EMPTY, FULL
    any_abs = (stack == absorbing).any(0)
    non_neutral = (stack != neutral).sum(0)
    single = np.where(stack != neutral, stack, -1).max(0)
    out = np.where(non_neutral == 0, neutral,
                   np.where(non_neutral == 1, single, UNDECIDED))
    return np.where(any_abs, absorbing, out).astype(np.int8)


def _classify_ir(ir, ts: _TileSets, head: int) -> np.ndarray:
    if isinstance(ir, Const):
        return np.full((ts.T, ts.T), FULL if ir.value else EMPTY, dtype=np.int8)
    if isinstance(ir, Sep):
        return ts.sep(ir)
    if isinstance(ir, Flat):
        return ts.flat(ir, head)
    if isinstance(ir, NotN):
        c = _classify_ir(ir.child, ts, head)
        return np.where(c == EMPTY, FULL, np.where(c == FULL, EMPTY, c)).astype(np.int8)
    if isinstance(ir, (AndN, OrN)):
        return _combine([_classify_ir(c, ts, head) for c in ir.children], type(ir))
    raise AssertionError(f"cannot classify {ir!r}")


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
    return _exec(src, "pred", env)


def _refine(cls: np.ndarray, ts: _TileSets, pred: Callable) -> int:
    qi, ki = np.nonzero(cls == UNDECIDED)
    if len(qi) == 0:
        return 0
    V = ts.layout.block
    chunk = max(1, REFINE_CHUNK // (V * V))
    tok = torch.from_numpy(ts.tokens)
    for s in range(0, len(qi), chunk):
        a, b = torch.from_numpy(qi[s:s + chunk]), torch.from_numpy(ki[s:s + chunk])
        q, k = tok[a][:, :, None], tok[b][:, None, :]
        ok = (q >= 0) & (k >= 0)
        m = pred(q.clamp(min=0), k.clamp(min=0)) & ok
        cnt = m.sum((1, 2))
        size = ok.sum((1, 2))
        c = torch.where(cnt == 0, EMPTY, torch.where(cnt == size, FULL, PARTIAL)).to(torch.int8)
        cls[qi[s:s + chunk], ki[s:s + chunk]] = c.numpy()
    return len(qi)


def classify(ir, tables, layout: Layout, head: int, ts: Optional[_TileSets] = None,
             refine: bool = True) -> np.ndarray:
    """int8 [T, T] classes of one head's (specialised) IR on a layout, padding included."""
    ts = ts or _TileSets(layout)
    cls = np.array(_classify_ir(ir, ts, head), dtype=np.int8, copy=True)
    if refine and (cls == UNDECIDED).any():
        _refine(cls, ts, flat_evaluator(ir, tables, layout.shape))
    # padding: a tile pair with padded tokens is never FULL; all-padding tiles are EMPTY
    if layout.pads:
        part = ts.n_valid < layout.block
        none = ts.n_valid == 0
        cls[(part[:, None] | part[None, :]) & (cls == FULL)] = PARTIAL
        cls[none[:, None] | none[None, :]] = EMPTY
    return cls


def tile_classes(pattern_irs, layout: Layout, refine: bool = True) -> np.ndarray:
    """Classes for each head: ``pattern_irs`` is a list of (ir, tables) per head; heads with the
    same IR share one classification. Returns int8 [H, T, T]."""
    from .._memory import check_allocation

    distinct = len({(ir, repr(t.values), tuple(sorted(t.tensors))) for ir, t in pattern_irs})
    check_allocation(f"tile classes of {distinct} x {layout.n_tiles} x {layout.n_tiles} tile pairs",
                     4 * (distinct + 1) * layout.n_tiles ** 2 + 16 * layout.n_padded,
                     "use a smaller grid")
    ts = _TileSets(layout)
    cache: Dict[str, np.ndarray] = {}
    out = []
    for h, (ir, tables) in enumerate(pattern_irs):
        key = (ir, repr(tables.values), tuple(sorted(tables.tensors))) if len(pattern_irs) > 1 else 0
        if key not in cache:
            cache[key] = classify(ir, tables, layout, h, ts, refine)
        out.append(cache[key])
    return np.stack(out)
