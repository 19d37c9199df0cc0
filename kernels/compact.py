"""Compact BlockMasks: block-index tables as wide as the longest row, not as the grid.

A torch ``BlockMask`` holds, per query block, ``kv_num_blocks`` and ``kv_indices`` (and the same
per key block for the backward). Its kernels read only the first ``num`` entries of a row, but
its shape says how long the key sequence is: compiled CPU flex checks ``N_kv <= kv_indices.size(-1)
x BLOCK_SIZE``, and ``to_dense()`` sizes its table by ``kv_indices.shape[-1]``. So the tables
keep their ``[..., R, C]`` shape (C = key blocks) while their storage holds ``R x W`` entries (W:
the most non-empty blocks of any row): a strided view with row stride W over one buffer of
``rows x W + C - W + 1`` int32, whose row r reads its own W entries, then the next rows' (never
read: every reader stops at ``num``). A 1-D ``causal() & window(1024)`` over 4,194,304 tokens has
32,768 x 32,768 blocks: 4 GB of indices per table at full width, under 1.5 MB compact.

What torch's ``BlockMask`` methods assume of the tables, and what :class:`CompactBlockMask` does:

* the kernels (compiled CPU flex, the Triton templates) address rows by stride and stop at
  ``num``: the compact view is read as it is;
* ``to_dense()``, ``to_string()``, ``sparsity()``, ``numel()``, ``shape``: shape and ``num``
  only, or reads that stop at ``num``: inherited as they are;
* ``to(device)`` would copy a view with overlapping rows at full width: moves the buffer instead;
* ``_adjust(q_len, kv_len)`` crops rows and counts the kept entries by comparing *indices* with
  *counts* (right for torch's own argsort-padded causal tables, not for others; compact rows
  would be read past ``num``): crops entry by entry instead (keeps the entries with a key block
  below the new count), both directions recomputed;
* ``__getitem__`` (batch/head/query-block selection) rebuilds the query-side tables through a
  dense ``[C, R]`` transpose: selects entries and transposes them sparsely instead; like torch's
  it hands out a mask whose mask_mod refuses to run (the b/h it would see changed meaning).

The tables are for reading (a write past a row's ``num`` would land in the next rows' entries;
torch does not check overlap this irregular); ``.contiguous()`` materialises one at full width.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, _sliced_mask_mod_error

from maskdsl._memory import check_allocation

__all__ = ["CompactBlockMask", "compact_from_entries", "tables_from_classes", "tables_of"]


def _view(storage: torch.Tensor, lead: Sequence[int], R: int, C: int, W: int) -> torch.Tensor:
    """[*lead, R, C] view with row stride W over ``storage`` (``prod(lead) x R x W + C - W + 1``)."""
    strides, s = [], R * W
    for n in reversed(lead):
        strides.append(s)
        s *= n
    return storage.as_strided((*lead, R, C), (*reversed(strides), W, 1))


def _buffer_len(rows: int, C: int, W: int) -> int:
    # rows x W entries, then enough for the last row's view (C columns) and the one-past-the-end
    # read of the Triton templates' next-block prefetch
    return rows * W + max(C - W, 0) + 1


def compact_from_entries(lead: Sequence[int], R: int, C: int, flat: torch.Tensor, row: torch.Tensor,
                         col: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tables from entries (leading index ``flat`` into ``lead``, ``row``, ``col``), sorted
    here by (flat, row, col); int32 num [*lead, R] and compact indices [*lead, R, C]."""
    device = col.device
    G = int(np.prod(lead)) if len(lead) else 1
    key = (flat * R + row) * C + col
    key, order = torch.sort(key)
    col = col[order]
    grow = torch.div(key, C, rounding_mode="floor")               # flat * R + row
    num = torch.bincount(grow, minlength=G * R)[:G * R]
    W = max(1, int(num.max())) if num.numel() else 1
    check_allocation(f"a BlockMask table of {G} x {R} rows of up to {W} blocks",
                     4 * _buffer_len(G * R, C, W), "use backend='triton' or 'tiles' (no BlockMask)")
    starts = torch.cumsum(num, 0) - num
    buf = torch.zeros(_buffer_len(G * R, C, W), dtype=torch.int32, device=device)
    if col.numel():
        pos = torch.arange(col.numel(), device=device) - starts[grow]
        buf[grow * W + pos] = col.to(torch.int32)
    return num.to(torch.int32).reshape(*lead, R), _view(buf, lead, R, C, W)


def tables_from_classes(classes, which: int, C: int, device, q_side: bool = True) -> list:
    """(kv num, kv idx, q num, q idx) of the entries of class ``which`` of per-head sparse tile
    classes (``codegen.tileclasses.TileClasses``, one per head; ``C`` key tiles), built on the
    host and moved to ``device``; the q side is None unless ``q_side``."""
    flat, row, col = [], [], []
    for h, c in enumerate(classes):
        sel = c.cls == which
        row.append(c.rows()[sel])
        col.append(np.asarray(c.indices)[sel])
        flat.append(np.full(len(row[-1]), h, np.int64))
    flat, row, col = (torch.from_numpy(np.concatenate(x).astype(np.int64))
                      for x in (flat, row, col))
    R, lead = classes[0].Tq, (1, len(classes))
    out = list(compact_from_entries(lead, R, C, flat, row, col))
    out += compact_from_entries(lead, C, R, flat, col, row) if q_side else [None, None]
    return [None if t is None else _move(t, device) for t in out]


def _entries(num: torch.Tensor, idx: torch.Tensor, select=None):
    """(lead shape, flat, row, col) of every entry of a table (the first ``num`` of each row),
    after ``select`` (an index on the leading and row dims) when given."""
    W = int(num.max()) if num.numel() else 0
    sub = idx[..., :W]                      # a view: compact or not, only the read entries
    if select is not None:
        num, sub = num[select], sub[select]
    lead, R = tuple(num.shape[:-1]), num.shape[-1]
    G = int(np.prod(lead)) if len(lead) else 1
    valid = torch.arange(W, device=num.device) < num[..., None]
    at = valid.reshape(G, R, W).nonzero()
    flat, row, pos = at[:, 0], at[:, 1], at[:, 2]
    col = sub.reshape(G, R, W)[flat, row, pos].long()
    return lead, R, flat, row, col


def tables_of(num, idx, C: int, keep_rows: Optional[int] = None, keep_cols: Optional[int] = None,
              select=None):
    """(kv num, kv idx, q num, q idx) of one class from a kv-side table (``C`` key blocks):
    ``select``-ed (leading and query-block dims), then cropped to the first ``keep_rows`` query
    blocks and ``keep_cols`` key blocks when given."""
    lead, R, flat, row, col = _entries(num, idx, select)
    R2 = R if keep_rows is None else min(R, keep_rows)
    C2 = C if keep_cols is None else min(C, keep_cols)
    keep = (row < R2) & (col < C2)
    flat, row, col = flat[keep], row[keep], col[keep]
    kn, ki = compact_from_entries(lead, R2, C2, flat, row, col)
    qn, qi = compact_from_entries(lead, C2, R2, flat, col, row)
    return kn, ki, qn, qi


def _move(t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """``t`` on ``device``, a compact view staying compact (its whole buffer moves, once)."""
    if t is None or t.device == torch.device(device):
        return t
    if t.dim() >= 2 and t.stride(-1) == 1 and t.stride(-2) < t.shape[-1]:
        base = t.as_strided((t.untyped_storage().nbytes() // t.element_size() - t.storage_offset(),),
                            (1,))
        return base.to(device).as_strided(t.shape, t.stride())
    return t.to(device)


class CompactBlockMask(BlockMask):
    """A torch ``BlockMask`` whose index tables are compact views (see the module docstring);
    flex_attention takes it as it is."""

    def _tables(self, rows=None, cols=None, select=None):
        C = self.kv_indices.shape[-1]
        out = []
        for num, idx in ((self.kv_num_blocks, self.kv_indices),
                         (self.full_kv_num_blocks, self.full_kv_indices)):
            out += [None] * 4 if num is None else list(tables_of(num, idx, C, rows, cols, select))
        return out

    def _rebuilt(self, tables, seq_lengths, mask_mod):
        kn, ki, qn, qi, fkn, fki, fqn, fqi = tables
        return type(self)(seq_lengths, kn, ki, fkn, fki, qn, qi, fqn, fqi,
                          BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=mask_mod)

    def _adjust(self, new_q_len: int, new_kv_len: int):
        rows = -(-new_q_len // self.BLOCK_SIZE[0])
        cols = -(-new_kv_len // self.BLOCK_SIZE[1])
        return self._rebuilt(self._tables(rows, cols), (new_q_len, new_kv_len), self.mask_mod)

    def __getitem__(self, index):
        index = (index,) if not isinstance(index, tuple) else index
        padded = (*index, slice(None), slice(None), slice(None))[:3]
        sizes = self.kv_num_blocks.shape[:3]
        index = tuple((slice(i + n, i + n + 1) if -n <= i < 0 else slice(i, i + 1))
                      if isinstance(i, int) else i for i, n in zip(padded, sizes))
        return self._rebuilt(self._tables(select=index), self.seq_lengths, _sliced_mask_mod_error)

    def to(self, device):
        moved = {a: _move(getattr(self, a), device) for a in self._TENSOR_ATTRS}
        return type(self)(self.seq_lengths, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                          dq_kv_order_spt=self.dq_kv_order_spt, **moved)
