"""Token layouts: the order in which q/k/v tokens are laid out for a block-sparse kernel.

``Layout(shape, tile=None)`` is row-major (the user's order). ``Layout(shape, tile, groups)``
is a *token tiling*: each dimension is first regrouped by residue (``groups[d] = dilation``:
coordinate ``x = g + dilation * i`` moves to ``g * G + i``, so a dilated neighborhood becomes
contiguous within its group), padded to a multiple of ``tile[d]``, and the grid is cut into
N-D tiles of ``prod(tile)`` tokens that are laid out contiguously, tile after tile. With
``prod(tile) == BLOCK_SIZE`` every block of the BlockMask is one compact N-D tile, which is
what makes neighborhoods block-dense. Padding tokens are zero and masked out.

Everything here is about *positions*: ``p`` in ``[0, n_padded)`` is a position in the laid-out
sequence; ``tokens()`` maps positions back to the user's flat token index (-1 for padding).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import sympy as sp
import torch

from .printer_torch import FloorDiv, PosMod

__all__ = ["Layout", "candidate_tiles"]


class Layout:
    def __init__(self, shape: tuple, tile: Optional[tuple] = None, groups: Optional[tuple] = None,
                 block: int = 128):
        self.shape, self.rank = tuple(shape), len(shape)
        self.n = math.prod(shape)
        self.tile = None if tile is None else tuple(tile)
        self.groups = tuple(groups) if groups is not None else (1,) * self.rank
        self.block = block if tile is None else math.prod(tile)
        if tile is None:
            self.n_padded = -(-self.n // block) * block
            self.grouped = self.shape
            self.padded = None
            self.grid = None
        else:
            G = [-(-L // g) for L, g in zip(shape, self.groups)]
            self.group_len = tuple(G)
            self.grouped = tuple(g * n for g, n in zip(self.groups, G))
            self.padded = tuple(-(-U // t) * t for U, t in zip(self.grouped, self.tile))
            self.grid = tuple(P // t for P, t in zip(self.padded, self.tile))
            self.n_padded = math.prod(self.padded)
        self.n_tiles = self.n_padded // self.block

    # ---------------------------------------------------------------- identity
    @property
    def identity(self) -> bool:
        return self.tile is None and self.n_padded == self.n

    @property
    def key(self) -> tuple:
        return (self.shape, self.tile, self.groups, self.block)

    def __repr__(self):
        if self.tile is None:
            return f"Layout(row-major, blocks of {self.block})"
        g = "" if all(x == 1 for x in self.groups) else f", groups={self.groups}"
        return f"Layout(tile={'x'.join(map(str, self.tile))}{g})"

    @property
    def row_major_order(self) -> bool:
        """Whether positions are the user's flat token indices (row-major order, no padding):
        untiled and unpadded, or tiles that are runs of whole rows (each dim's tile spans the
        full extent of every later dim), ungrouped."""
        if self.tile is None:
            return self.n_padded == self.n
        if any(g != 1 for g in self.groups) or self.padded != self.shape:
            return False
        return all(t == 1 or all(self.tile[e] == self.shape[e] for e in range(d + 1, self.rank))
                   for d, t in enumerate(self.tile))

    def describe(self) -> str:
        if self.tile is None:
            return f"row-major, {self.block}-token blocks"
        if self.row_major_order:
            return f"row-major order ({'x'.join(map(str, self.tile))} tiles)"
        g = ("" if all(x == 1 for x in self.groups)
             else ", tokens grouped by residue mod " + "x".join(map(str, self.groups)))
        pad = "" if self.n_padded == self.n else f", padded {self.n} -> {self.n_padded} tokens"
        return f"{'x'.join(map(str, self.tile))} tiles{g}{pad}"

    # ---------------------------------------------------------------- positions <-> tokens
    def dim_order(self, d: int) -> np.ndarray:
        """For a tiled layout: per padded coordinate u of dim d, the user coordinate (or -1)."""
        u = np.arange(self.padded[d])
        G, g = self.group_len[d], self.groups[d]
        x = (u // G) + g * (u % G) if g > 1 else u
        valid = (u < self.grouped[d]) & (x < self.shape[d])
        return np.where(valid, x, -1)

    def tokens(self) -> np.ndarray:
        """int64 [n_padded]: the user's flat token index at each position (-1 = padding)."""
        if self.tile is None:
            out = np.arange(self.n_padded)
            out[self.n:] = -1
            return out
        orders = [self.dim_order(d) for d in range(self.rank)]
        # position -> (tile coords, offset coords) -> padded coords u_d
        p = np.arange(self.n_padded)
        tile_idx, off = p // self.block, p % self.block
        flat = np.zeros(self.n_padded, dtype=np.int64)
        valid = np.ones(self.n_padded, dtype=bool)
        T = np.unravel_index(tile_idx, self.grid)
        O = np.unravel_index(off, self.tile)
        for d in range(self.rank):
            x = orders[d][T[d] * self.tile[d] + O[d]]
            valid &= x >= 0
            flat = flat * self.shape[d] + np.maximum(x, 0)
        return np.where(valid, flat, -1)

    def gather_index(self) -> torch.Tensor:
        """Index into ``cat([x, zero_row])`` along the token dim that lays x out (pads -> n)."""
        t = self.tokens()
        return torch.from_numpy(np.where(t >= 0, t, self.n))

    def scatter_index(self) -> torch.Tensor:
        """For each user token, its position in the layout (inverse of gather_index)."""
        t = self.tokens()
        inv = np.empty(self.n, dtype=np.int64)
        pos = np.nonzero(t >= 0)[0]
        inv[t[pos]] = pos
        return torch.from_numpy(inv)

    # ---------------------------------------------------------------- symbolic decoding
    def decode(self, idx: sp.Symbol, prefix: str) -> List[Tuple[str, sp.Expr]]:
        """Prologue lines computing grid coordinates ``{prefix}0..``, the flat index
        ``{prefix}_flat`` and (when the layout pads) ``{prefix}_valid`` from position ``idx``.

        Every expression is built from atomic ``FloorDiv``/``PosMod`` nodes and without trivial
        terms (``x * 1``, ``x % 1``, ``0 * t``): the printer rebuilds expressions
        (``replace``), and sympy re-evaluating a hand-built unevaluated tree such as
        ``Mod(Mul(1, Mod(t, 14)), 7)`` turned it into ``Mod(Mod(t, 14)**2, 7)`` (a wrong 3-D
        decode, ARCHITECTURE.md, "Token layouts"); atomic nodes are never rewritten, and cost
        nothing to build."""
        lines: List[Tuple[str, sp.Basic]] = []
        if self.tile is None or self.row_major_order:   # positions are flat token indices
            stride = 1
            coords = []
            for d in reversed(range(self.rank)):
                e = _mod(_div(idx, stride), self.shape[d]) if d > 0 else _div(idx, stride)
                coords.append((f"{prefix}{d}", e))
                stride *= self.shape[d]
            lines += coords[::-1]
            if self.n_padded != self.n:
                # clamped: generated code evaluates table lookups at padding positions too
                lines.append((f"{prefix}_flat", sp.Min(idx, self.n - 1)))
                lines.append((f"{prefix}_valid", sp.Lt(idx, self.n)))
            else:
                lines.append((f"{prefix}_flat", idx))
            return lines
        tile = sp.Symbol(f"{prefix}_tile", integer=True, nonnegative=True)
        off = sp.Symbol(f"{prefix}_off", integer=True, nonnegative=True)
        lines.append((tile.name, _div(idx, self.block)))
        lines.append((off.name, _mod(idx, self.block)))
        valid = []
        for d in range(self.rank):
            tstride = math.prod(self.grid[d + 1:])
            ostride = math.prod(self.tile[d + 1:])
            T = _div(tile, tstride)
            T = sp.Integer(0) if self.grid[d] == 1 else _mod(T, self.grid[d]) if d > 0 else T
            O = _div(off, ostride)
            O = _mod(O, self.tile[d]) if d > 0 else O
            u = T * self.tile[d] + O
            g, G = self.groups[d], self.group_len[d]
            x = _div(u, G) + g * _mod(u, G) if g > 1 else u
            lines.append((f"{prefix}{d}", x))
            usym = sp.Symbol(f"{prefix}{d}", integer=True, nonnegative=True)
            if self.padded[d] != self.shape[d] or g > 1:
                valid.append(sp.Lt(usym, self.shape[d]))
                if g > 1 and self.grouped[d] != self.padded[d]:
                    valid.append(sp.Lt(u, self.grouped[d]))
        flat = sp.Integer(0)
        for d in range(self.rank):
            flat = flat * self.shape[d] + sp.Symbol(f"{prefix}{d}", integer=True, nonnegative=True)
        if valid:  # padding positions decode past the grid: keep table lookups in bounds
            flat = sp.Min(flat, self.n - 1)
        lines.append((f"{prefix}_flat", flat))
        if valid:
            lines.append((f"{prefix}_valid", sp.And(*valid)))
        return lines

    @property
    def pads(self) -> bool:
        return self.n_padded != self.n


def _div(x, n: int):
    """``x // n`` for a non-negative integer expression (``x`` itself when n == 1), an atomic
    node the printer prints as ``//`` (no sympy evaluation of floor)."""
    return x if n == 1 else FloorDiv(x, n)


def _mod(x, n: int):
    """``x % n`` (0 when n == 1), atomic like ``_div``."""
    return sp.Integer(0) if n == 1 else PosMod(x, n)


def candidate_tiles(shape: tuple, block: int = 128) -> List[tuple]:
    """N-D tile shapes with ``prod == block`` (powers of two) that fit the grid reasonably:
    no tile side longer than twice its dim rounded up to a power of two."""
    r = len(shape)
    if r == 1:
        return []
    sides = [1 << i for i in range(block.bit_length())]
    limit = [1 << max(0, (2 * L - 1).bit_length()) for L in shape]
    out = []
    if r == 2:
        for a in sides:
            b = block // a
            if a * b == block and a <= limit[0] and b <= limit[1]:
                out.append((a, b))
    else:
        for a in sides:
            for b in sides:
                c = block // (a * b) if a * b <= block else 0
                if c and a * b * c == block and a <= limit[0] and b <= limit[1] and c <= limit[2]:
                    out.append((a, b, c))
    return out
