"""Statistics of a recipe: token density (exact), block density before and after token tiling,
the ideal speedup (dense time x fraction of non-empty tile pairs), the layouts tried."""
from __future__ import annotations

import math

import numpy as np

from maskdsl._caching import LRU
from maskdsl._memory import guard
from .blockmask import (FULL, PARTIAL, _TileSets, flat_evaluator, key_range,
    pair_counts, tile_classes)
from .ir import Const, Sep
from .layout_search import MAX_SEARCH_PAIRS, row_major
from .recipe import Recipe

__all__ = ["stats"]

_STATS = LRU(256)


@guard("stats()")
def stats(r: Recipe) -> dict:
    out = _STATS.get(r.key)
    if out is None:
        T = r.layout.n_tiles
        pairs = r.heads * T * T
        nonempty = r.classes.nonempty() / pairs
        rm = row_major(r.shape, r.block)
        if rm.key == r.layout.key:
            before = nonempty
        elif rm.n_tiles ** 2 * r.heads <= MAX_SEARCH_PAIRS:
            before = tile_classes(r.irs, rm).nonempty() / (r.heads * rm.n_tiles ** 2)
        else:
            before = float("nan")
        out = _STATS.put(r.key, {
            "tokens": r.n,
            "layout": r.layout.describe(),
            "block_size": r.block,
            "token_density": token_density(r),
            "block_density_row_major": before,
            "block_density": nonempty,
            "ideal_speedup": 1.0 / nonempty if nonempty > 0 else float("inf"),
            "partial_blocks": r.classes.count(PARTIAL) / pairs,
            "full_blocks": r.classes.count(FULL) / pairs,
            "layouts_tried": dict(r.tried),
        })
    return dict(out)


def token_density(r: Recipe) -> float:
    """Exact allowed-pair fraction: per-dim counts for separable IR, else the partial tiles are
    evaluated (full tiles count whole)."""
    total = 0.0
    ts = None
    for h, (ir, tables) in enumerate(r.irs):
        if isinstance(ir, Const):
            total += r.n * r.n if ir.value else 0
        elif isinstance(ir, Sep):
            total += math.prod(_dim_pairs(dr, L) for dr, L in zip(ir.dims, r.shape))
        else:
            ts = ts or _TileSets(r.layout)
            cls = r.classes.head(h)
            rows, cols = cls.rows(), cls.indices
            full = cls.cls == FULL
            total += float((ts.n_valid[rows[full]] * ts.n_valid[cols[full]]).sum())
            part = cls.cls == PARTIAL
            allowed, _ = pair_counts(rows[part], cols[part], ts.tokens,
                                     flat_evaluator(ir, tables, r.shape))
            total += float(allowed.sum())
    return total / (r.heads * r.n * r.n)


def _dim_pairs(dr, L: int) -> int:
    """Allowed (q, k) coordinate pairs on one dim of a separable IR, in O(L) from the per-query
    key ranges: for each q, the k in [lo, hi) with (k - q) % step == 0."""
    x = np.arange(L)
    lo, hi = key_range(dr, x, L)
    steps = [int(s) for s in dr.steps]
    step = math.lcm(*steps) if steps else 1
    first = lo + np.mod(x - lo, step)
    return int(np.where(hi > first, (hi - first + step - 1) // step, 0).sum())
