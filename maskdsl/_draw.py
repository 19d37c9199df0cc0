"""Text pictures of masks: the N x N mask by blocks (full / partial / empty) and the keys one
query sees, drawn on the token grid itself."""
from __future__ import annotations

import math

import torch

__all__ = ["draw_blocks", "draw_classes", "draw_query", "FULL", "PARTIAL", "EMPTY"]

FULL, PARTIAL, EMPTY, QUERY = "█", "▒", "·", "◆"


def _block_counts(m: torch.Tensor, rows: int, cols: int) -> tuple:
    """Fraction of allowed entries in each of (ceil(R/rows) x ceil(C/cols)) blocks of a 2-D bool."""
    R, C = m.shape
    br, bc = math.ceil(R / rows), math.ceil(C / cols)
    pr, pc = -R % br, -C % bc
    padded = torch.nn.functional.pad(m.float(), (0, pc, 0, pr))
    valid = torch.nn.functional.pad(torch.ones(R, C), (0, pc, 0, pr))
    s = padded.reshape(padded.shape[0] // br, br, -1, bc).sum((1, 3))
    n = valid.reshape(valid.shape[0] // br, br, -1, bc).sum((1, 3))
    return s, n, br, bc


def _cells(s: torch.Tensor, n: torch.Tensor) -> list:
    """One list of cell characters per row (drawn two characters wide: terminal cells are
    about twice as tall as wide, so this keeps pictures square)."""
    return [[FULL if a == b else EMPTY if a == 0 else PARTIAL for a, b in zip(srow, nrow)]
            for srow, nrow in zip(s.tolist(), n.tolist())]


def _join(cells: list) -> str:
    return "".join(c * 2 for c in cells)


def draw_blocks(m: torch.Tensor, width: int = 64) -> str:
    """The [N, N] mask of one head, downsampled to at most ``width`` characters across: each
    cell is a block of queries (rows) x keys (columns), full, partial or empty."""
    cells = max(1, width // 2)
    s, n, br, bc = _block_counts(m, cells, cells)
    unit = "1 token" if br == 1 else f"{br} x {bc} tokens"
    lines = [_join(row) for row in _cells(s, n)]
    header = (f"queries down, keys across; one cell = {unit}  "
              f"({FULL} all allowed, {PARTIAL} some, {EMPTY} none)")
    return "\n".join([header] + lines)


def draw_classes(cls: torch.Tensor, width: int = 64) -> str:
    """A [T, T] tile-class matrix (0 empty, 1 partial, 2 full) as a picture; when downsampled,
    a cell is full only if all its tiles are, empty only if all are."""
    cells = max(1, width // 2)
    full, n, br, _ = _block_counts(cls == 2, cells, cells)
    nonempty, _, _, _ = _block_counts(cls > 0, cells, cells)
    rows = []
    for frow, erow, nrow in zip(full.tolist(), nonempty.tolist(), n.tolist()):
        rows.append("".join((FULL if f == c else EMPTY if e == 0 else PARTIAL) * 2
                            for f, e, c in zip(frow, erow, nrow)))
    unit = "1 tile pair" if br == 1 else f"{br} x {br} tile pairs"
    return "\n".join([f"query tiles down, key tiles across; one cell = {unit}"] + rows)


def draw_query(row: torch.Tensor, shape: tuple, query: tuple, width: int = 64) -> str:
    """The keys one query sees (``row``: bool [N]) drawn on the grid; 3-D grids as a row of
    frames (dim 0), each frame a 2-D picture of dims 1 and 2."""
    r = len(shape)
    grid = row.reshape(shape)
    if r == 1:
        grid = grid[None, None, :]
        q = (0, 0, query[0])
    elif r == 2:
        grid = grid[None]
        q = (0,) + tuple(query)
    else:
        q = tuple(query)
    frames = []
    for t in range(grid.shape[0]):
        cells = max(1, width // 2 // (1 if r < 3 else min(grid.shape[0], 4)))
        s, n, br, bc = _block_counts(grid[t], cells, cells)
        lines = _cells(s, n)
        if t == q[0]:
            lines[q[1] // br][q[2] // bc] = QUERY
        frames.append([_join(x) for x in lines])
    if r < 3:
        body = frames[0]
    else:
        shown = [t for t in range(len(frames)) if grid[t].any() or t == q[0]]
        body, chunk = [], 6
        for i in range(0, len(shown), chunk):
            group = shown[i:i + chunk]
            w = len(frames[group[0]][0])
            body.append("  ".join(f"t={t}".ljust(w) for t in group))
            for y in range(len(frames[group[0]])):
                body.append("  ".join(frames[t][y] for t in group))
    coords = ",".join(map(str, query))
    return "\n".join([f"keys seen by query ({coords}): {QUERY} query, {FULL} key, {EMPTY} not seen"]
                     + body)
