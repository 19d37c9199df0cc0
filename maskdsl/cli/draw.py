"""Pictures of masks, in the terminal (this module) and in a PNG (``png.py``), from one scene.

A scene never holds an N x N mask: per head it keeps the tile classes of the row-major layout
(sparse, O(non-empty tile pairs)) for the overview of the whole mask, and the one query row it
draws (``reference.mask(..., rows=[q])``, O(N)), plus that row's score bias when asked for.

* the overview: queries down, keys across, each cell a square of tile pairs that is full
  (every pair allowed), empty or partial; downsampled from the sparse classes without a dense
  table;
* the keys one query sees, at a scale that reads: 1-D the band of keys around the query (one
  character per token when it fits) and a line for the keys far from it (sinks); 2-D the grid,
  or the part of it around the keys; 3-D one 2-D panel per frame of the query's key range,
  labelled ``t=...``. The query is marked exactly once.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from maskdsl import reference
from maskdsl._errors import MaskDSLError
from maskdsl.codegen.layout_search import row_major
from maskdsl.codegen.program import Program
from maskdsl.dsl.pattern import Heads, Sink
from maskdsl.codegen.blockmask import (FULL as F, PARTIAL as P, _TileSets, flat_evaluator,
    pair_counts)
from maskdsl.codegen.ir import Const, Sep
from maskdsl.codegen.stats import _dim_pairs
from maskdsl.codegen.tileclasses import TileClasses

__all__ = ["picture", "scene", "draw_classes", "FULL", "PARTIAL", "EMPTY", "QUERY"]

FULL, PARTIAL, EMPTY, QUERY = "█", "▒", "·", "◆"

OVERVIEW_BLOCK = 128   # the largest tile side of the overview's row-major layout
EXACT_PAIRS = 1.5e8    # token pairs evaluated at most for an exact allowed-pair count (~5 s)
MAX_FRAMES = 8         # 3-D: frames drawn at most (the nearest to the query's)
MAX_LINES = 8          # 1-D: lines of the band at most before it is downsampled
MARGIN = 1             # tokens drawn around the keys when a picture shows part of a grid


# ------------------------------------------------------------------------------ the scene

@dataclass
class Group:
    """Heads that draw the same: equal tile classes and equal query row (and bias row)."""

    heads: List[int]
    row: torch.Tensor                   # bool [N]: the keys the query sees
    bias: Optional[torch.Tensor]        # float [N] or None
    cells: np.ndarray                   # int8 [C, C] overview: 0 empty, 1 partial, 2 full
    pairs: tuple                        # (lo, hi) allowed pairs; lo == hi when exact
    sinks: int                          # the pattern's sink count for this head (0: none)

    @property
    def label(self) -> str:
        return ("head " if len(self.heads) == 1 else "heads ") + _ranges(self.heads, ",")


@dataclass
class Scene:
    pattern: object
    shape: tuple
    heads: int
    query: tuple
    flat: int
    cell_tokens: int                    # tokens per overview cell side
    groups: List[Group] = field(default_factory=list)

    @property
    def n(self) -> int:
        return math.prod(self.shape)


def check_query(shape: tuple, heads: int, only_head, query) -> tuple:
    """(query coordinates, flat index); the query defaults to the grid's centre."""
    if query is None:
        query = tuple(s // 2 for s in shape)
    if len(query) != len(shape) or any(not 0 <= c < s for c, s in zip(query, shape)):
        raise MaskDSLError(
            f"--query={','.join(map(str, query))}: expected {len(shape)} coordinates within shape {shape}"
        )
    if only_head is not None and not 0 <= only_head < heads:
        raise MaskDSLError(f"--head={only_head}: expected 0 <= head < {heads}")
    flat = 0
    for c, s in zip(query, shape):
        flat = flat * s + c
    return tuple(query), flat


def scene(p, shape: tuple, heads: int, only_head, query, cells: int, score=None) -> Scene:
    """Everything a picture draws, for the heads shown, with an overview of at most ``cells``
    cells a side. Memory: O(tile pairs + cells^2 + heads x N)."""
    shape = tuple(shape)
    query, flat = check_query(shape, heads, only_head, query)
    n = math.prod(shape)
    block = max(1, min(OVERVIEW_BLOCK, -(-n // max(1, cells))))
    prog = Program(p, None, shape, heads, tile=row_major(shape, block))
    layout = prog.layout
    per_cell = -(-layout.n_tiles // max(1, cells))            # tiles per overview cell
    rows = reference.mask(p, shape, heads, rows=[flat])[:, 0]  # bool [H, N]
    bias = _bias_rows(score, shape, heads, flat) if score is not None else None
    out = Scene(p, shape, heads, query, flat, per_cell * layout.block)
    seen = {}
    for h in ([only_head] if only_head is not None else range(heads)):
        key = prog.classes.per_head[h]
        same = next((g for g in seen.get(key, [])
                     if torch.equal(g.row, rows[h])
                     and (bias is None or torch.equal(g.bias, bias[h]))), None)
        if same is not None:
            same.heads.append(h)
            continue
        cls = _exact_edges(prog.recipe, h)
        g = Group([h], rows[h], None if bias is None else bias[h], _overview(cls, per_cell),
                  _allowed_pairs(prog.recipe, h, cls), _sink_count(p, shape, heads, h))
        seen.setdefault(key, []).append(g)
        out.groups.append(g)
    return out


def _bias_rows(score, shape, heads, flat) -> Optional[torch.Tensor]:
    """float [H, N]: the additive score terms of the query's row (None without such terms):
    the reference's own rules on one row of its grid, O(N)."""
    g = reference._Grid(shape, heads, "cpu", torch.tensor([flat]))
    reference._bind_all(score, g)
    b = reference._bias(score, g, torch.float32)
    return None if b is None else b[:, 0].detach()


def _sink_count(p, shape, heads, h) -> int:
    """The largest ``sink(n)`` of head h's pattern (0 without sinks): far keys below it are
    reported as sinks."""
    def rec(node):
        if isinstance(node, Heads):
            return rec(node.patterns[h])
        if isinstance(node, Sink):
            return int(node.bind(shape, heads)[h]["n"])
        return max((rec(c) for c in node.children()), default=0)

    return rec(p)


# ------------------------------------------------------------------------------ overview

def _exact_edges(recipe, h):
    """Head h's classes with the pairs of padded tiles decided on their real tokens (the tile
    classes never call a pair with padding FULL); skipped when that would be costly."""
    cls = recipe.classes.head(h)
    layout = recipe.layout
    if not layout.pads or cls.nnz == 0:
        return cls
    ts = _TileSets(layout)
    rows, cols = cls.rows(), cls.indices
    edge = np.nonzero((cls.cls == P) & ((ts.n_valid[rows] < layout.block)
                                        | (ts.n_valid[cols] < layout.block)))[0]
    if len(edge) == 0 or len(edge) * layout.block ** 2 > EXACT_PAIRS / 10:
        return cls
    ir, tables = recipe.irs[h]
    allowed, size = pair_counts(rows[edge], cols[edge], ts.tokens,
                                flat_evaluator(ir, tables, recipe.shape))
    new = cls.cls.copy()
    new[edge] = np.where(allowed == 0, 0, np.where(allowed == size, F, P))
    return cls.with_classes(new)


def _overview(cls, k: int) -> np.ndarray:
    """int8 [C, C]: the tile classes downsampled by ``k`` tiles a side, from the sparse entries
    (a cell is full iff all its pairs are, empty iff all are)."""
    T = cls.Tq
    C = -(-T // k)
    idx = (cls.rows() // k) * C + cls.indices // k
    full = np.bincount(idx, weights=(cls.cls == F), minlength=C * C).reshape(C, C)
    nonempty = np.bincount(idx, minlength=C * C).reshape(C, C)
    side = np.minimum(k, T - np.arange(C) * k)
    size = side[:, None] * side[None, :]
    return np.where(full == size, 2, np.where(nonempty == 0, 0, 1)).astype(np.int8)


def _allowed_pairs(recipe, h: int, cls) -> tuple:
    """(lo, hi): allowed (query, key) pairs of head h, lo == hi when exact (always for
    separable patterns; flat ones evaluate their partial tile pairs, up to EXACT_PAIRS)."""
    ir, tables = recipe.irs[h]
    n = recipe.n
    if isinstance(ir, Const):
        return (n * n,) * 2 if ir.value else (0, 0)
    if isinstance(ir, Sep):
        c = math.prod(_dim_pairs(dr, L) for dr, L in zip(ir.dims, recipe.shape))
        return c, c
    ts = _TileSets(recipe.layout)
    rows, cols = cls.rows(), cls.indices
    nv = ts.n_valid
    full, part = cls.cls == F, cls.cls == P
    lo = int((nv[rows[full]] * nv[cols[full]]).sum())
    if part.sum() * recipe.layout.block ** 2 > EXACT_PAIRS:
        return lo, lo + int((nv[rows[part]] * nv[cols[part]]).sum())
    allowed, _ = pair_counts(rows[part], cols[part], ts.tokens, flat_evaluator(ir, tables, recipe.shape))
    c = lo + int(allowed.sum())
    return c, c


def pairs_text(g: Group, n: int) -> str:
    lo, hi = g.pairs
    if lo == hi:
        return f"{lo} of {n * n} pairs allowed ({lo / (n * n):.{_digits(lo / (n * n))}%})"
    return (f"{lo}..{hi} of {n * n} pairs allowed ({lo / (n * n):.2%}..{hi / (n * n):.2%}; "
            f"bounds from the tiles)")


def _digits(x: float) -> int:
    """Decimals of a percentage: one, more for densities below 1%."""
    if x == 0 or x >= 0.01:
        return 1
    return min(6, 1 + int(-math.floor(math.log10(x * 100))))


# ------------------------------------------------------------------------------ the keys of a query

@dataclass
class Band:
    """1-D: the keys drawn around the query, and the runs of keys far from it."""

    lo: int                 # first and last token drawn
    hi: int
    far: list               # [(start, end)] inclusive runs of keys outside [lo, hi]


def runs(idx: np.ndarray) -> list:
    """[(start, end)] inclusive runs of consecutive indices of a sorted int array."""
    if len(idx) == 0:
        return []
    br = np.nonzero(np.diff(idx) > 1)[0]
    return list(zip(idx[np.r_[0, br + 1]].tolist(), idx[np.r_[br, len(idx) - 1]].tolist()))


def band(row: torch.Tensor, q: int, min_gap: int = 8) -> Band:
    """The band: the run of keys at (or nearest) the query, grown by the nearest runs while the
    gap to them is at most max(min_gap, the band's length); what is left is far."""
    n = row.numel()
    rs = runs(np.nonzero(row.numpy())[0])
    if not rs:
        return Band(max(0, q - 2), min(n - 1, q + 2), [])
    starts = np.array([s for s, _ in rs])
    i = int(np.searchsorted(starts, q, side="right")) - 1      # last run starting at or before q
    if i < 0 or (rs[i][1] < q and i + 1 < len(rs) and rs[i + 1][0] - q < q - rs[i][1]):
        i += 1
    a, b = i, i                                                 # the runs in the band
    lo, hi = min(rs[i][0], q), max(rs[i][1], q)
    while True:
        span = hi - lo + 1
        gl = lo - rs[a - 1][1] - 1 if a > 0 else None
        gr = rs[b + 1][0] - hi - 1 if b + 1 < len(rs) else None
        options = [(g, side) for g, side in ((gl, -1), (gr, 1)) if g is not None
                   and g <= max(min_gap, span)]
        if not options:
            break
        _, side = min(options)
        if side < 0:
            a -= 1
            lo = rs[a][0]
        else:
            b += 1
            hi = rs[b][1]
    return Band(max(0, lo - 2), min(n - 1, hi + 2), rs[:a] + rs[b + 1:])


def far_text(far: list, sinks: int, limit: int = 4) -> List[str]:
    """Phrases naming the far runs: 'keys 0..3 (sinks)', 'key 900', '... and 7 more runs'."""
    out = []
    for s, e in far[:limit]:
        name = f"key {s}" if s == e else f"keys {s}..{e}"
        out.append(name + (" (sinks)" if e < sinks else ""))
    if len(far) > limit:
        rest = far[limit:]
        out.append(f"and {len(rest)} more runs ({sum(e - s + 1 for s, e in rest)} keys)")
    return out


@dataclass
class Region:
    """2-D and 3-D: the part of each frame drawn, at ``f`` tokens a cell side, and the frames."""

    y0: int
    y1: int                 # exclusive
    x0: int
    x1: int
    f: int
    frames: List[int]       # 3-D: the frames drawn; 2-D: [0]
    more: List[int]         # 3-D: frames with keys that are not drawn
    outside: list           # sink runs (flat) outside the region drawn
    per_row: int            # panels side by side
    far: list               # sink runs (flat) away from the other keys (drawn or not)


def _grid3(row: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The row as [frames, H, W] (2-D: one frame)."""
    return row.reshape(shape if len(shape) == 3 else (1,) + tuple(shape))


def region(row: torch.Tensor, shape: tuple, query: tuple, sinks: int, cells: int,
           gap: int = 1, max_frames: int = MAX_FRAMES, panel: Optional[int] = None,
           margin: Optional[float] = None) -> Region:
    """Which frames and which part of them to draw so that the panels fit in ``cells`` cells
    across (panels ``gap`` cells apart; ``panel``: each panel has that many cells of its own
    instead): the whole frame at one token a cell when it fits with up to three panels side
    by side, else the box around the keys (sinks far away left out, reported), downsampled
    only when even that box does not fit. The box has ``MARGIN`` tokens around the keys, or
    ``margin`` times its size (at least 2 tokens)."""
    grid = _grid3(row, shape)
    _, H, W = grid.shape
    tq, yq, xq = (0,) + tuple(query) if len(shape) == 2 else tuple(query)
    near = grid.clone()
    if sinks:
        near.view(-1)[:sinks] = False
    has = near.flatten(1).any(1).nonzero()[:, 0].tolist()
    frames = sorted(set(has) | {tq})
    more = []
    if len(frames) > max_frames:
        keep = sorted(sorted(frames, key=lambda t: (abs(t - tq), t))[:max_frames])
        more = [t for t in frames if t not in keep]
        frames = keep
    sel = near[frames].any(0)
    ys, xs = sel.any(1).nonzero()[:, 0], sel.any(0).nonzero()[:, 0]
    y0, y1 = min([yq] + ys[:1].tolist()), max([yq] + ys[-1:].tolist()) + 1
    x0, x1 = min([xq] + xs[:1].tolist()), max([xq] + xs[-1:].tolist()) + 1
    my = MARGIN if margin is None else max(2, int((y1 - y0) * margin))
    mx = MARGIN if margin is None else max(2, int((x1 - x0) * margin))
    y0, y1 = max(0, y0 - my), min(H, y1 + my)
    x0, x1 = max(0, x0 - mx), min(W, x1 + mx)
    n = len(frames)

    def per_row(w):     # panels of w cells that fit side by side
        if panel is not None:
            return n if w <= panel else 1
        return max(1, min(n, (cells + gap) // (w + gap)))

    if panel is not None:
        cells = panel

    k = min(n, 3)
    whole, box = (0, H, 0, W), (y0, y1, x0, x1)
    if W <= cells and per_row(W) >= k:
        choice = whole + (1,)            # the whole frame, at one token a cell
    elif x1 - x0 <= cells:
        choice = box + (1,)              # the box around the keys, at one token a cell
    else:                                # the box, downsampled so that k panels fit
        target = panel or max(1, (cells + gap) // k - gap)
        choice = box + (-(-(x1 - x0) // target),)
    outside, far = [], []
    if sinks:
        def beyond(t0, t1, u0, u1):     # sink keys outside frames x [t0, t1) x [u0, u1)
            inside = torch.zeros_like(grid)
            inside[frames, t0:t1, u0:u1] = True
            out = (grid & ~inside).view(-1)[:sinks].nonzero()[:, 0].numpy()
            return runs(out)

        far = beyond(y0, y1, x0, x1)
        outside = beyond(*choice[:4])
    y0, y1, x0, x1, f = choice
    return Region(y0, y1, x0, x1, f, frames, more, outside, per_row(-(-(x1 - x0) // f)), far)


def cells_of(frame: torch.Tensor, f: int) -> np.ndarray:
    """Fraction of allowed tokens per f x f cell of a [h, w] bool frame (-1: none)."""
    h, w = frame.shape
    pad = torch.nn.functional.pad
    x = pad(frame.float(), (0, -w % f, 0, -h % f))
    v = pad(torch.ones(h, w), (0, -w % f, 0, -h % f))
    s = x.reshape(x.shape[0] // f, f, -1, f).sum((1, 3))
    c = v.reshape(v.shape[0] // f, f, -1, f).sum((1, 3))
    return (s / c).numpy()


# ------------------------------------------------------------------------------ text

def _ranges(xs, sep=",") -> str:
    """'0,1' / '0..15' / '0..3,7': runs of three or more written as a range."""
    out = []
    for s, e in runs(np.asarray(sorted(xs))):
        out.append(str(s) if s == e else f"{s}{sep}{e}" if e == s + 1 else f"{s}..{e}")
    return sep.join(out)


def wrap(parts: List[str], width: int) -> List[str]:
    """Lines of at most ``width`` characters, broken between the phrases of ``parts``
    (a phrase longer than a line is broken at its spaces)."""
    lines, cur = [], ""
    for part in parts:
        pieces = [part] if len(part) <= width else textwrap.wrap(part, width) or [part]
        for piece in pieces:
            if cur and len(cur) + 1 + len(piece) <= width:
                cur += " " + piece
            else:
                if cur:
                    lines.append(cur)
                cur = piece
    if cur:
        lines.append(cur)
    return lines


def _cell_char(frac: float) -> str:
    return FULL if frac >= 1 else EMPTY if frac <= 0 else PARTIAL


def _unit(t: int) -> str:
    return "1 token" if t == 1 else f"{t} x {t} tokens"


def overview_text(g: Group, s: Scene, width: int) -> List[str]:
    head = wrap(["queries down, keys across;", f"one cell = {_unit(s.cell_tokens)}",
                 f"({FULL} all allowed, {PARTIAL} some, {EMPTY} none)"], width)
    chars = {2: FULL, 1: PARTIAL, 0: EMPTY}
    return head + ["".join(chars[int(c)] * 2 for c in row) for row in g.cells]


def keys_text(g: Group, s: Scene, width: int) -> List[str]:
    coords = ",".join(map(str, s.query))
    count = int(g.row.sum())
    if len(s.shape) == 1:
        return _keys_1d(g, s, width, coords, count)
    return _keys_nd(g, s, width, coords, count)


_ROUND = (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 40, 50, 64, 80, 100, 128, 200, 256)
_ROUND_UP = tuple(m * 10 ** e for e in range(13) for m in (1, 2, 4, 5))[1:]


def _keys_1d(g, s, width, coords, count) -> List[str]:
    b = band(g.row, s.flat)
    label_w = len(str(s.n - 1))
    avail = max(1, width - label_w - 1)
    per_line = max(x for x in _ROUND if x <= avail)     # round line starts: 1900, 1950, ...
    length = b.hi - b.lo + 1
    f = 1
    while -(-(length + per_line * f) // (per_line * f)) > MAX_LINES:
        f = next(x for x in _ROUND_UP if x > f)        # tokens a character: 2, 4, 5, 10, ...
    lo = b.lo // (per_line * f) * (per_line * f)
    hi = min(s.n - 1, b.hi)
    ncells = -(-(hi - lo + 1) // f)
    per_line = min(per_line, ncells)
    row = g.row[lo:hi + 1]
    frac = cells_of(row[None], f)[0] if f > 1 else row.float().numpy()
    chars = [_cell_char(x) for x in frac]
    chars[(s.flat - lo) // f] = QUERY
    scale = "1 token a character" if f == 1 else f"{f} tokens a character"
    lines = wrap([f"keys seen by query {coords}: {count} keys;", f"drawn: keys {lo}..{hi},",
                  scale], width)
    lines += wrap([f"{QUERY} query,", f"{FULL} key,"] + ([f"{PARTIAL} some,"] if f > 1 else [])
                  + [f"{EMPTY} not seen"], width)
    for i in range(0, ncells, per_line):
        lines.append(f"{lo + i * f:>{label_w}} " + "".join(chars[i:i + per_line]))
    if b.far:
        lines += wrap(["also seen:"] + [t + ";" for t in far_text(b.far, g.sinks)[:-1]]
                      + far_text(b.far, g.sinks)[-1:], width)
    return lines


def _keys_nd(g, s, width, coords, count) -> List[str]:
    three = len(s.shape) == 3
    cells = max(1, width // 2)
    r = region(g.row, s.shape, s.query, g.sinks, cells)
    grid = _grid3(g.row, s.shape)
    H, W = grid.shape[1:]
    tq, yq, xq = (0,) + tuple(s.query) if not three else tuple(s.query)
    whole = (r.y0, r.y1, r.x0, r.x1) == (0, H, 0, W)
    where = (f"the whole {H}x{W} {'frame' if three else 'grid'}" if whole else
             f"rows {r.y0}..{r.y1 - 1} x cols {r.x0}..{r.x1 - 1} of {H}x{W}")
    parts = [f"keys seen by query ({coords}): {count} keys;"]
    if three:
        parts.append(f"frames t={_ranges(r.frames)},")
    parts += [where + ",", ("1 token a cell" if r.f == 1 else f"{r.f} x {r.f} tokens a cell")]
    lines = wrap(parts, width)
    lines += wrap([f"{QUERY} query,", f"{FULL} key,"] + ([f"{PARTIAL} some,"] if r.f > 1 else [])
                  + [f"{EMPTY} not seen"], width)
    panels = []
    for t in r.frames:
        frac = cells_of(grid[t, r.y0:r.y1, r.x0:r.x1], r.f)
        rows = [[_cell_char(x) * 2 for x in line] for line in frac]
        if t == tq:
            rows[(yq - r.y0) // r.f][(xq - r.x0) // r.f] = QUERY * 2
        panels.append((t, ["".join(x) for x in rows]))
    if not three:
        lines += panels[0][1]
    else:
        pw = len(panels[0][1][0])
        for i in range(0, len(panels), r.per_row):
            chunk = panels[i:i + r.per_row]
            lines.append("  ".join(f"t={t}".ljust(pw) for t, _ in chunk).rstrip())
            for y in range(len(chunk[0][1])):
                lines.append("  ".join(p[y] for _, p in chunk))
    notes = []
    if r.more:
        notes.append(f"keys also in frames t={_ranges(r.more)} (not drawn);")
    if r.outside:
        notes += [f"also seen: {t}" + ("," if i + 1 < len(r.outside) else "")
                  for i, t in enumerate(far_text(r.outside, g.sinks))]
    if notes:
        lines += wrap(notes, width)
    return lines


def picture(p, shape: tuple, heads: int, only_head, query, width: int) -> str:
    """The terminal picture of ``show``: per group of heads that draw the same, the allowed
    pairs, the overview of the N x N mask and the keys the query sees; no line is longer than
    ``width`` (but for the overview, which is ``width`` wide or less)."""
    s = scene(p, tuple(shape), heads, only_head, query, max(1, width // 2))
    out = []
    for g in s.groups:
        out += wrap([f"{g.label}:", pairs_text(g, s.n)], width)
        out += overview_text(g, s, width)
        out += keys_text(g, s, width)
        out.append("")
    return "\n".join(out).rstrip()


# ------------------------------------------------------------------------------ compiled tiles

def draw_classes(cls, width: int = 64) -> str:
    """Tile classes (0 empty, 1 partial, 2 full) as a picture: a dense [T, T] tensor or array,
    or a sparse ``TileClasses`` (drawn without a dense table); when downsampled, a cell is full
    only if all its tiles are, empty only if all are."""
    cells = max(1, width // 2)
    if not isinstance(cls, TileClasses):
        cls = TileClasses.from_dense(np.asarray(cls, dtype=np.int8))
    k = -(-cls.Tq // cells)
    grid = _overview(cls, k)
    chars = {2: FULL, 1: PARTIAL, 0: EMPTY}
    unit = "1 tile pair" if k == 1 else f"{k} x {k} tile pairs"
    return "\n".join([f"query tiles down, key tiles across; one cell = {unit}"]
                     + ["".join(chars[int(c)] * 2 for c in row) for row in grid])
