"""Choosing a token layout: the candidate with the fewest non-empty tile pairs.

Candidates (``candidates``): the row-major order (or the tiling that equals it), then every N-D
tile shape of ``block`` tokens, each with and without residue grouping by the dilation every head
shares. Separable patterns are scored per dimension (a product of per-dim counts, no tile table);
others by classifying each candidate without refinement (undecided pairs count as work) as long
as that stays below ``MAX_SEARCH_PAIRS`` tile pairs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .blockmask import HeadClasses, separable_cost, tile_classes
from .ir import Sep
from .tiling import Layout, candidate_tiles

__all__ = ["choose_layout", "candidates", "row_major_tile", "MAX_SEARCH_PAIRS"]

MAX_SEARCH_PAIRS = 4e8   # skip classifying candidates beyond this many tile pairs


def row_major_tile(shape: tuple, block: int) -> Optional[tuple]:
    """A tile shape whose tiled layout is exactly row-major order (no permutation), if any."""
    tile, rest = [1] * len(shape), block
    for d in reversed(range(len(shape))):
        if rest == 1:
            break
        if shape[d] <= rest and rest % shape[d] == 0:
            tile[d], rest = shape[d], rest // shape[d]
        elif shape[d] % rest == 0:
            tile[d], rest = rest, 1
        else:
            return None
    return tuple(tile) if rest == 1 else None


def row_major(shape: tuple, block: int) -> Layout:
    rm = row_major_tile(shape, block) if len(shape) > 1 else None
    return Layout(shape, rm) if rm is not None else Layout(shape, block=block)


def _group_options(irs, rank: int) -> List[tuple]:
    """Residue groupings worth trying: the numeric dilation steps shared by every head."""
    per_dim = []
    for d in range(rank):
        steps = set()
        for ir, _ in irs:
            if isinstance(ir, Sep) and ir.dims[d].steps:
                steps |= {int(s) for s in ir.dims[d].steps if s.is_Integer}
            else:
                steps.add(1)
        per_dim.append(steps.pop() if len(steps) == 1 else 1)
    options = [(1,) * rank]
    if any(g > 1 for g in per_dim):
        options.append(tuple(per_dim))
    return options


def candidates(irs, shape: tuple, block: int, tile="auto") -> List[Layout]:
    """The layouts to try: ``tile=None`` row-major only, a Layout or tile tuple exactly that."""
    if tile is None:
        return [Layout(shape, block=block)]
    if isinstance(tile, Layout):
        return [tile]
    if tile != "auto":
        return [Layout(shape, tuple(tile), block=block)]
    rm = row_major_tile(shape, block) if len(shape) > 1 else None
    out = [row_major(shape, block)]
    if len(shape) > 1:
        for groups in _group_options(irs, len(shape)):
            for t in candidate_tiles(shape, block):
                if t == rm and all(g == 1 for g in groups):
                    continue
                out.append(Layout(shape, t, groups))
    return out


def choose_layout(irs, shape: tuple, block: int, tile="auto"
                  ) -> Tuple[Layout, HeadClasses, Dict[str, int]]:
    """(layout, refined tile classes, {layout description: non-empty pairs}) for the per-head
    IRs ``irs``: the candidate with the fewest non-empty tile pairs (ties: the earlier one)."""
    layouts = candidates(irs, shape, block, tile)
    tried: Dict[str, int] = {}
    if len(layouts) == 1:
        classes = tile_classes(irs, layouts[0], refine=True)
        tried[layouts[0].describe()] = classes.nonempty()
        return layouts[0], classes, tried
    separable = all(isinstance(ir, Sep) for ir, _ in irs)
    best = None
    for i, lay in enumerate(layouts):
        classes = None
        if separable and lay.tile is not None:
            cost = sum(separable_cost(ir, lay) for ir, _ in irs)
        elif lay.n_tiles ** 2 * len(irs) > MAX_SEARCH_PAIRS and (i > 0 or separable):
            continue     # too many pairs to classify just to compare (a tiled one will do)
        else:
            classes = tile_classes(irs, lay, refine=False)
            cost = classes.nonempty()
        tried[lay.describe()] = cost
        if best is None or cost < best[0]:
            best = (cost, lay, classes)
    if best is None:       # nothing affordable to compare: the row-major layout, as is
        best = (0, layouts[0], None)
    _, lay, classes = best
    if classes is None or classes.count(3) > 0:       # 3: UNDECIDED pairs left to refine
        classes = tile_classes(irs, lay, refine=True)
    return lay, classes, tried
