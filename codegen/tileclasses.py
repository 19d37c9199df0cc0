"""Sparse tile classes: for every query tile, its non-empty key tiles and their class.

``TileClasses`` is a CSR matrix over (query tile, key tile) pairs: ``indptr [Tq + 1]``,
``indices [nnz]`` (key tiles, sorted within each row) and ``cls [nnz]`` (PARTIAL, FULL or, while
combining, UNDECIDED). Memory is O(non-empty pairs), never O(Tq x Tk): a 7-key band over four
million tokens has ~300K non-empty pairs where a dense table would hold 10^9.

The operations the classifier needs, all vectorised numpy over the non-empty entries:

* ``from_pairs`` / ``from_dense_rows`` (build), ``kron`` (the N-D product of per-dim classes of a
  separable pattern: a pair is non-empty iff it is on every dim, its class the minimum),
* ``combine`` (``&`` / ``|`` three-valued, on the union or intersection of the entries),
* ``transpose`` (the key-tile-major view a BlockMask's q-indices need), ``dense`` (small cases).

Classes: ``EMPTY = 0 < PARTIAL = 1 < FULL = 2``, ``UNDECIDED = 3``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskdsl._errors import MaskDSLError
from maskdsl._memory import check_allocation

__all__ = ["TileClasses", "EMPTY", "PARTIAL", "FULL", "UNDECIDED", "combine", "kron"]

EMPTY, PARTIAL, FULL, UNDECIDED = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class TileClasses:
    """Non-empty (query tile, key tile) pairs of one head, row by row (CSR)."""

    Tq: int
    Tk: int
    indptr: np.ndarray     # int64 [Tq + 1]
    indices: np.ndarray    # int64 [nnz], sorted within each row
    cls: np.ndarray        # int8 [nnz]: PARTIAL, FULL (UNDECIDED while combining)

    # ------------------------------------------------------------------ building
    @staticmethod
    def empty(Tq: int, Tk: int) -> "TileClasses":
        return TileClasses(Tq, Tk, np.zeros(Tq + 1, np.int64), np.zeros(0, np.int64),
                           np.zeros(0, np.int8))

    @staticmethod
    def from_pairs(Tq: int, Tk: int, rows, cols, cls, sort: bool = True) -> "TileClasses":
        """From arrays of (row, col, class); EMPTY entries are dropped; unsorted input is sorted
        (pairs must be unique)."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        cls = np.asarray(cls, dtype=np.int8)
        keep = cls != EMPTY
        if not keep.all():
            rows, cols, cls = rows[keep], cols[keep], cls[keep]
        if sort and len(rows):
            key = rows * Tk + cols
            if np.any(key[1:] < key[:-1]):
                order = np.argsort(key, kind="stable")
                rows, cols, cls = rows[order], cols[order], cls[order]
        indptr = np.zeros(Tq + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=Tq)[:Tq], out=indptr[1:])
        return TileClasses(Tq, Tk, indptr, cols, cls)

    @staticmethod
    def from_dense(dense: np.ndarray) -> "TileClasses":
        """From a dense int8 [Tq, Tk] table (small cases, or one chunk of rows)."""
        rows, cols = np.nonzero(dense)
        return TileClasses.from_pairs(dense.shape[0], dense.shape[1], rows, cols,
                                      dense[rows, cols], sort=False)

    @staticmethod
    def from_row_chunks(Tq: int, Tk: int, rows_fn, chunk_pairs: int = 1 << 24) -> "TileClasses":
        """Built chunk by chunk from ``rows_fn(t0, t1) -> int8 [t1 - t0, Tk]``: O(chunk x Tk)
        memory for the classifiers that only know how to fill whole rows."""
        _check_work(Tq, Tk)
        step = max(1, chunk_pairs // max(1, Tk))
        parts_r, parts_c, parts_v = [], [], []
        kept = 0
        for t0 in range(0, Tq, step):
            block = rows_fn(t0, min(Tq, t0 + step))
            r, c = np.nonzero(block)
            kept += len(r)
            _check_entries(kept, Tq, Tk)
            parts_r.append(r + t0)
            parts_c.append(c)
            parts_v.append(block[r, c])
        if not parts_r:
            return TileClasses.empty(Tq, Tk)
        return TileClasses.from_pairs(Tq, Tk, np.concatenate(parts_r), np.concatenate(parts_c),
                                      np.concatenate(parts_v), sort=False)

    # ------------------------------------------------------------------ reading
    @property
    def nnz(self) -> int:
        return int(len(self.indices))

    def rows(self) -> np.ndarray:
        """The query tile of every entry, int64 [nnz]."""
        return np.repeat(np.arange(self.Tq, dtype=np.int64), np.diff(self.indptr))

    def counts(self, which=None) -> np.ndarray:
        """Per query tile: how many key tiles are non-empty (or of class ``which``)."""
        if which is None:
            return np.diff(self.indptr)
        sel = (self.cls == which).astype(np.int64)
        c = np.concatenate([[0], np.cumsum(sel)])
        return c[self.indptr[1:]] - c[self.indptr[:-1]]

    def count(self, which) -> int:
        return int((self.cls == which).sum())

    def dense(self) -> np.ndarray:
        """int8 [Tq, Tk] (tests and small pictures only)."""
        out = np.zeros((self.Tq, self.Tk), np.int8)
        out[self.rows(), self.indices] = self.cls
        return out

    def rows_dense(self, t0: int, t1: int) -> np.ndarray:
        """int8 [t1 - t0, Tk]: rows t0..t1 as a dense block."""
        out = np.zeros((t1 - t0, self.Tk), np.int8)
        a, b = self.indptr[t0], self.indptr[t1]
        r = np.repeat(np.arange(t1 - t0), np.diff(self.indptr[t0:t1 + 1]))
        out[r, self.indices[a:b]] = self.cls[a:b]
        return out

    def transpose(self) -> "TileClasses":
        """Key-tile-major: row j lists the query tiles i with (i, j) non-empty."""
        rows = self.rows()
        order = np.lexsort((rows, self.indices))
        return TileClasses.from_pairs(self.Tk, self.Tq, self.indices[order], rows[order],
                                      self.cls[order], sort=False)

    def where(self, keep: np.ndarray) -> "TileClasses":
        """Only the entries where ``keep`` [nnz] is True."""
        rows = self.rows()[keep]
        return TileClasses.from_pairs(self.Tq, self.Tk, rows, self.indices[keep],
                                      self.cls[keep], sort=False)

    def with_classes(self, cls: np.ndarray) -> "TileClasses":
        """The same entries with new classes (EMPTY ones dropped)."""
        cls = np.asarray(cls, np.int8)
        if (cls != EMPTY).all():
            return TileClasses(self.Tq, self.Tk, self.indptr, self.indices, cls)
        return TileClasses.from_pairs(self.Tq, self.Tk, self.rows(), self.indices, cls, sort=False)

    def same_as(self, other: "TileClasses") -> bool:
        return (self.Tq == other.Tq and self.Tk == other.Tk
                and np.array_equal(self.indptr, other.indptr)
                and np.array_equal(self.indices, other.indices)
                and np.array_equal(self.cls, other.cls))

    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.cls.nbytes)


MAX_ROW_CHUNK_PAIRS = 2e10   # tile pairs a row-chunk classifier may visit (~a minute of numpy)


def _check_work(Tq: int, Tk: int) -> None:
    """Refuse a classification that would visit every one of Tq x Tk tile pairs when that is
    beyond reach (a flat or negated pattern, or an untileable N-D shape, on a huge grid)."""
    if Tq * Tk > MAX_ROW_CHUNK_PAIRS:
        raise MaskDSLError(
            f"classifying this pattern's {Tq} x {Tk} tile pairs one by one is beyond reach (more "
            f"than {MAX_ROW_CHUNK_PAIRS:.0e}); only separable patterns (neighborhood, window, "
            f"causal, block, their &) and sinks scale past that: use a smaller grid, or a shape "
            f"whose dims are powers of two (token tiling)")


def _check_entries(nnz: int, Tq: int, Tk: int) -> None:
    """Refuse a table of ``nnz`` entries that cannot fit (about 40 bytes each while built)."""
    check_allocation(f"tile classes with {nnz} non-empty tile pairs (of {Tq} x {Tk})", 40 * nnz,
                     "the pattern is dense at this size: use a smaller grid, or a sparser pattern")


# ---------------------------------------------------------------------- combining

def combine(parts, kind: str) -> TileClasses:
    """Three-valued ``&`` (kind "and") or ``|`` ("or") of several operands' classes, entry by
    entry. ``&``: a pair missing from any operand is EMPTY; FULL is neutral; two or more
    non-FULL operands make it UNDECIDED (refined later). ``|``: a pair in any operand is present;
    FULL absorbs; two or more PARTIAL/UNDECIDED operands make it UNDECIDED."""
    parts = list(parts)
    first = parts[0]
    if len(parts) == 1:
        return first
    Tq, Tk = first.Tq, first.Tk
    keys = np.concatenate([p.rows() * Tk + p.indices for p in parts])
    cls = np.concatenate([p.cls for p in parts])
    order = np.argsort(keys, kind="stable")
    keys, cls = keys[order], cls[order]
    start = np.ones(len(keys), bool)
    start[1:] = keys[1:] != keys[:-1]
    group = np.cumsum(start) - 1
    uniq = keys[start]
    n = len(uniq)
    present = np.bincount(group, minlength=n)
    non_full = np.bincount(group, weights=(cls != FULL), minlength=n).astype(np.int64)
    any_full = np.bincount(group, weights=(cls == FULL), minlength=n) > 0
    single = np.zeros(n, np.int8)
    nf_idx = np.nonzero(cls != FULL)[0]
    single[group[nf_idx]] = cls[nf_idx]          # the (last) non-FULL class of each group
    if kind == "and":
        out = np.where(non_full == 0, FULL, np.where(non_full == 1, single, UNDECIDED))
        out = np.where(present == len(parts), out, EMPTY)
    else:
        out = np.where(any_full, FULL, np.where(non_full == 1, single, UNDECIDED))
    return TileClasses.from_pairs(Tq, Tk, uniq // Tk, uniq % Tk, out.astype(np.int8), sort=False)


def kron(per_dim, grids) -> TileClasses:
    """The classes of a separable (AND over dims) pattern on a tiled layout from each dim's
    classes between its tile intervals: query tile (i_0, ..., i_r) and key tile (j_0, ..., j_r)
    (row-major over ``grids``) are non-empty iff every (i_d, j_d) is, and their class is the
    minimum over dims."""
    out = per_dim[0]
    for d in range(1, len(per_dim)):
        out = _kron2(out, per_dim[d])
    return out


def _kron2(A: TileClasses, B: TileClasses) -> TileClasses:
    nb_rows, nb_cols = B.Tq, B.Tk
    ca, cb = A.counts(), B.counts()
    row_len = (ca[:, None] * cb[None, :]).reshape(-1)            # rows (ia, ib), ia-major
    total = int(row_len.sum())
    _check_entries(total, A.Tq * nb_rows, A.Tk * nb_cols)
    Tq, Tk = A.Tq * nb_rows, A.Tk * nb_cols
    if total == 0:
        return TileClasses.empty(Tq, Tk)
    indptr = np.zeros(Tq + 1, np.int64)
    np.cumsum(row_len, out=indptr[1:])
    row = np.repeat(np.arange(Tq, dtype=np.int64), row_len)
    local = np.arange(total, dtype=np.int64) - indptr[row]
    ia, ib = row // nb_rows, row % nb_rows
    width = cb[ib]
    ea = A.indptr[ia] + local // width
    eb = B.indptr[ib] + local % width
    cols = A.indices[ea] * nb_cols + B.indices[eb]
    cls = np.minimum(A.cls[ea], B.cls[eb])
    return TileClasses(Tq, Tk, indptr, cols, cls.astype(np.int8))
