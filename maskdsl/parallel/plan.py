"""Context parallelism, the analytic part (ARCHITECTURE.md, "Context parallelism"): how the
token grid is split over the ranks (``Layout``), which keys every rank needs from every other
(``need``, exact, from the row-major tile classes), and the bytes each strategy moves in one
forward (``bytes_of``). Pure computation: no process group, the same answer on every rank, so
the ranks agree on every message without exchanging a plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

from maskdsl._errors import MaskDSLError
from maskdsl.codegen.recipe import varies_per_head
from maskdsl.codegen.tileclasses import FULL
from maskdsl.kernels.rect import head_classes, pair_masks

__all__ = ["Layout", "layout", "need", "work", "HaloPlan", "halo_plan", "bytes_of",
           "STRATEGIES", "BALANCES"]

STRATEGIES = ("halo", "ulysses", "allgather")
HALO_BUDGET = 1 << 30      # token pairs the halo plan may evaluate (PARTIAL cross-rank pairs)
BALANCES = (None, "head-tail")


@dataclass(frozen=True)
class Layout:
    """The split of ``n`` grid tokens (plus ``extra`` extra tokens) over ``world`` ranks along
    grid dim 0: ``parts[r]``, the flat (start, end) intervals rank r owns, in its local order.
    Extra tokens go to ``extra_owner``, the rank that owns grid token n - 1, after its grid
    tokens."""

    shape: tuple
    n: int
    extra: int
    world: int
    balance: object
    parts: Tuple[Tuple[Tuple[int, int], ...], ...]
    extra_owner: int

    def intervals(self, r: int) -> List[Tuple[int, int]]:
        """Rank r's token intervals in its local order (the extra tokens last)."""
        out = list(self.parts[r])
        if self.extra and r == self.extra_owner:
            out.append((self.n, self.n + self.extra))
        return out

    def count(self, r: int) -> int:
        return sum(b - a for a, b in self.intervals(r))

    def grid_count(self, r: int) -> int:
        return sum(b - a for a, b in self.parts[r])

    def positions(self, r: int) -> torch.Tensor:
        """int64 [count(r)]: the global position of each of rank r's local tokens."""
        return torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in self.intervals(r)])

    def owner(self) -> np.ndarray:
        """int64 [n + extra]: the rank owning each token."""
        own = np.empty(self.n + self.extra, np.int64)
        for r in range(self.world):
            for a, b in self.intervals(r):
                own[a:b] = r
        return own

    def local_index(self) -> np.ndarray:
        """int64 [n + extra]: each token's row in its owner's local buffer."""
        idx = np.empty(self.n + self.extra, np.int64)
        for r in range(self.world):
            at = 0
            for a, b in self.intervals(r):
                idx[a:b] = np.arange(at, at + b - a)
                at += b - a
        return idx


def layout(shape: tuple, world: int, extra: int = 0, balance=None) -> Layout:
    """Contiguous slabs of grid dim 0, one per rank, sizes as even as possible (the first
    ``rows % world`` ranks take one row more); ``balance="head-tail"``: 2 x world slabs, rank r
    owning slabs r and 2 x world - 1 - r (the layout torch's head-tail load balancer uses, so
    the work of a causal pattern is spread evenly)."""
    if balance not in BALANCES:
        raise MaskDSLError(f"balance={balance!r}: expected None or 'head-tail'")
    rows = shape[0]
    per_row = math.prod(shape[1:])
    pieces = world * (2 if balance else 1)
    if rows < pieces:
        how = f" with balance={balance!r} ({pieces} slabs)" if balance else ""
        raise MaskDSLError(f"shape={tuple(shape)}: grid dim 0 has {rows} rows; splitting it over "
                           f"world size {world}{how} needs at least {pieces} rows")
    sizes = [rows // pieces + (1 if i < rows % pieces else 0) for i in range(pieces)]
    edges = np.concatenate([[0], np.cumsum(sizes)]) * per_row
    slab = [(int(edges[i]), int(edges[i + 1])) for i in range(pieces)]
    if balance:
        parts = tuple((slab[r], slab[pieces - 1 - r]) for r in range(world))
    else:
        parts = tuple((slab[r],) for r in range(world))
    n = rows * per_row
    owner = next(r for r in range(world) if any(b == n for _, b in parts[r]))
    return Layout(tuple(shape), n, int(extra), world, balance, parts, owner)


def need(program, lay: Layout, budget: int = HALO_BUDGET):
    """bool [world, n]: ``need[r, j]`` iff some query of rank r attends grid key j on some head.
    Exact: FULL tile pairs from the tile classes, PARTIAL pairs evaluated token by token (only
    the pairs whose query and key tiles are not owned by one single rank: a rank never needs
    to be sent what it owns). None when that would evaluate more than ``budget`` token pairs
    (a pattern without bounded reach, such as ``document`` with arbitrary ids: all-gather is
    then the plan)."""
    W, n, H = lay.world, lay.n, program.heads
    V = program.layout.block
    classes = head_classes(program)
    owner = lay.owner()[:n]
    T = -(-n // V)
    pad = np.full(T * V, -1, np.int64)
    pad[:n] = owner
    tile_owner = pad.reshape(T, V)                                      # -1 past the end
    ranks_in = np.zeros((T, W), bool)
    for w in range(W):
        ranks_in[:, w] = (tile_owner == w).any(1)
    single = ranks_in.sum(1) == 1
    first = np.where(single, tile_owner[:, 0], -1)
    need_t = np.zeros((W, T), bool)                # whole key tiles needed (FULL pairs)
    out = torch.zeros(W, n, dtype=torch.bool)
    mask_mod, _ = program.mods("cpu")
    work = []
    for cls in classes:
        rows, cols, kind = cls.rows(), np.asarray(cls.indices), np.asarray(cls.cls)
        # pairs within one rank's own tokens need nothing sent
        local = single[rows] & single[cols] & (first[rows] == first[cols])
        work.append((rows, cols, kind, local))
    evaluated = sum(int(((k != FULL) & ~lo).sum()) for _, _, k, lo in work) * V * V * \
        (H if len(classes) == 1 and varies_per_head(program.pattern) else 1)
    if evaluated > budget:
        return None
    for ci, (rows, cols, kind, local) in enumerate(work):
        full = (kind == FULL) & ~local
        for w in range(W):
            sel = full & ranks_in[rows, w]
            need_t[w, cols[sel]] = True
        part = (kind != FULL) & ~local
        pr, pc = rows[part], cols[part]
        if not len(pr):
            continue
        for a, _, kpos, ok in pair_masks(program, mask_mod, pr, pc,
                                         None if len(classes) == 1 else ci):
            qt = pr[a:a + len(ok)]
            ki = kpos[:, 0, :]                                           # [P, V]
            one = torch.from_numpy(single[qt])
            if bool(one.any()):          # a query tile of one rank: any row, that rank
                hit = ok[one].any(1)                                     # [P1, V] key columns
                w_of = torch.from_numpy(first[qt])[one][:, None].expand_as(hit)
                out[w_of[hit], ki[one][hit]] = True
            if not bool(one.all()):      # a tile across a slab boundary: row by row
                qown = torch.from_numpy(tile_owner[qt])[~one]            # [P2, V]
                okm, kim = ok[~one], ki[~one]
                for w in range(W):
                    hit = (okm & (qown == w)[:, :, None]).any(1)
                    out[w, kim[hit]] = True
    if need_t.any():
        tok = torch.from_numpy(np.repeat(need_t, V, axis=1)[:, :n])
        out |= tok
    return out


def work(program, lay: Layout) -> list:
    """Each rank's share of the attention work, in non-empty (query tile, key tile) pairs over
    all heads, a query tile's pairs split by the rows each rank owns (the unit every backend
    computes in). A causal pattern without a window loads the last slab most."""
    V, n, H = program.layout.block, lay.n, program.heads
    r = program.recipe
    if r.classes.shared:
        per_tile = np.diff(np.asarray(r.classes.distinct[0].indptr)) * H
    else:
        per_tile = sum(np.diff(np.asarray(r.classes.head(h).indptr)) for h in range(H))
    owner = lay.owner()[:n]
    out = []
    for w in range(lay.world):
        rows = np.bincount(np.nonzero(owner == w)[0] // V, minlength=len(per_tile))
        out.append(float((rows / V * per_tile).sum()))
    return out


@dataclass(frozen=True)
class HaloPlan:
    """``rows[s][r]``: int64 local rows of rank s's buffer that rank r receives from s (the
    grid keys r's queries attend, then every extra token when s owns them), sorted by global
    position; ``positions[s][r]``: their global positions."""

    rows: tuple
    positions: tuple

    def count(self, s: int, r: int) -> int:
        return int(self.rows[s][r].numel())


def halo_plan(program, lay: Layout, budget: int = HALO_BUDGET):
    """The halo exchange of ``lay`` (None past ``budget``, see ``need``)."""
    nd = need(program, lay, budget)
    if nd is None:
        return None
    owner = torch.from_numpy(lay.owner())
    local = torch.from_numpy(lay.local_index())
    W, n = lay.world, lay.n
    rows = [[None] * W for _ in range(W)]
    poss = [[None] * W for _ in range(W)]
    extra = torch.arange(n, n + lay.extra, dtype=torch.int64)
    for r in range(W):
        want = nd[r].clone()
        for s in range(W):
            if s == r:
                rows[s][r] = poss[s][r] = torch.zeros(0, dtype=torch.int64)
                continue
            pos = torch.nonzero(want & (owner[:n] == s)).reshape(-1)
            if lay.extra and s == lay.extra_owner:
                pos = torch.cat([pos, extra])        # every grid query attends every extra key
            poss[s][r] = pos
            rows[s][r] = local[pos]
    return HaloPlan(tuple(map(tuple, rows)), tuple(map(tuple, poss)))


def _isz(dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _lse_isz(dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def bytes_of(strategy: str, lay: Layout, *, heads: int, kv_heads: int, batch: int,
             head_dim: int, head_dim_v: int, dtype, extra_mode: str = "all",
             return_lse: bool = False, halo: HaloPlan = None) -> dict:
    """{"sent": [bytes per rank], "received": [bytes per rank]} of one forward of
    ``strategy``, counted message by message as ``maskdsl.distributed`` sends them."""
    W = lay.world
    isz, lsz = _isz(dtype), _lse_isz(dtype)
    sent, recv = [0] * W, [0] * W
    counts = [lay.count(r) for r in range(W)]

    def move(s, r, nbytes):
        if s != r and nbytes:
            sent[s] += nbytes
            recv[r] += nbytes

    kv_row = batch * kv_heads * (head_dim + head_dim_v) * isz
    if strategy == "allgather":
        for s in range(W):
            for r in range(W):
                move(s, r, counts[s] * kv_row)
    elif strategy == "ulysses":
        hq, hk = heads // W, kv_heads // W
        q_row = batch * hq * head_dim * isz
        kv_part = batch * hk * (head_dim + head_dim_v) * isz
        back_row = batch * hq * (head_dim_v * isz + (lsz if return_lse else 0))
        for s in range(W):
            nq = counts[s] if extra_mode == "all" else lay.grid_count(s)
            for r in range(W):
                move(s, r, nq * q_row + counts[s] * kv_part)     # sequence -> heads
                move(r, s, nq * back_row)                        # the output back
    elif strategy == "halo":
        for s in range(W):
            for r in range(W):
                move(s, r, halo.count(s, r) * kv_row)
        if lay.extra and extra_mode == "all":
            o, E = lay.extra_owner, lay.extra
            for r in range(W):
                move(o, r, E * batch * heads * head_dim * isz)           # extra queries out
                move(r, o, E * batch * heads * (head_dim_v * isz + lsz))  # partial out + lse
    else:
        raise MaskDSLError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    return {"sent": sent, "received": recv}
