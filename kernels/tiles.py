"""The ``tiles`` backend: block-sparse attention in plain PyTorch, forward and backward.

Algorithm (the same block sparsity as FlexAttention's BlockMask, executed with batched matmuls):

1. Lay q, k, v out in the program's token layout: N-D tiles of ``V`` tokens are contiguous, so a
   tile is a block of ``V`` consecutive rows.
2. For every query tile, list the key tiles the analytic classification marks non-empty
   (padded per row to the longest list, like BlockMask's ``kv_indices``), then keep only the
   keys of those tiles that some query of the tile attends to (an 8x8 query tile under a 13x13
   neighborhood keeps its 20x20 halo: 400 keys instead of nine tiles' 576). Pad each list to
   the longest, ``K`` keys, and gather keys and values: ``[B, H, T, K, D]``.
3. Dense attention per query tile against its gathered keys: scores ``[B, H, T, V, K]``, the
   exact token mask applied where tiles are partial (precomputed once per device from the
   generated mask_mod, O(N x keys-per-query) memory, never O(N^2)), score terms from the
   generated score_mod, sink logits in the denominator, dropout on the probabilities.
4. Scatter the output back to the user's token order.

Autograd differentiates all of it: q, k, v, learnable score parameters (captured tensors of the
generated score_mod), sink logits. Works on CPU, CUDA and MPS.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from maskdsl._caching import LRU, outside_inference_mode
from maskdsl._memory import check_allocation, guarded
from maskdsl.codegen.ir import HeadsN, contains
from maskdsl.codegen.program import Program
from maskdsl.codegen.source import head_mask_mod
from maskdsl.codegen.tileclasses import FULL
from maskdsl.dsl.score import score_tensors, terms_with_role
from . import band
from .rect import plain_program, run_range
from .softmax import FlashLSE, drop, softmax

__all__ = ["TilePlan", "run_tiles", "plan_for", "tiles_program", "rows_attending",
           "rows_with_keys", "TILE_SIZES"]

TILE_SIZES = (128, 64)           # tokens per tile; see tiles_program
_MAX_SCORE_ELEMENTS = 1 << 24    # explicit and chunked paths: query tiles in chunks of at most this many scores
_PLAN_CHUNK_ELEMENTS = 1 << 25   # plan build: token-mask entries evaluated per step
_CACHED_MASK_ELEMENTS = 1 << 25  # SDPA masks kept whole up to this size (128 MB in fp32)
_GATHER_BYTES = 256 << 20        # gathered k/v beyond this: attend a chunk of query tiles at a time
# one SDPA call over the whole grid with a materialised mask instead of gathering, when the
# gathered keys would cover at least this fraction of all N^2 pairs and the mask stays small:
# gathering then moves as much as the dense call computes (1-D 1024 causal & window(512) with
# 640 gathered keys per query: 8.0 ms gathered vs 7.2 ms for the masked call on the benchmark
# CPU; window(128), 0.25 of the pairs: 3.4 vs 8.1 ms)
WHOLE_FRACTION = 0.5
WHOLE_MAX_ELEMENTS = 1 << 24     # mask entries ([1 or H, N, N]) of the whole-grid call
BAND_OVER_WHOLE = 0.8            # the band path over the whole-grid call up to this share of N^2


def _sdpa_mask(view, H: int, dtype, t0: int, t1: int) -> torch.Tensor:
    """SDPA's mask [1, H*t, V, K] for query tiles t0:t1 of a plan (or a folded view of one):
    additive 0 / -inf in ``dtype``, or the bool disallowed entries for ``"blocked"``; rows with
    no key get one dummy key (their output is zeroed afterwards)."""
    t = t1 - t0
    ok = view.allowed_chunk(t0, t1)
    ok[..., :1] |= ~view.row_any[:, t0:t1]
    ok = ok.expand(H, t, view.V, view.K).reshape(1, H * t, view.V, view.K)
    if dtype == "blocked":
        return ~ok
    return torch.where(ok, torch.zeros((), dtype=dtype, device=ok.device),
                       torch.full((), float("-inf"), dtype=dtype, device=ok.device))


class TilePlan:
    """Per-program, per-device gather indices and token masks (built once, then reused)."""

    @outside_inference_mode
    def __init__(self, program, device: torch.device):

        target = device
        if device.type == "meta":   # meta tensors carry no values: build on CPU, then move
            device = torch.device("cpu")

        lay = program.layout
        r = program.recipe
        V, T = lay.block, lay.n_tiles
        heads_cls = [r.classes.distinct[0]] if r.classes.shared else \
            [r.classes.head(h) for h in range(r.heads)]
        Hc = len(heads_cls)
        M = max(1, max(int(c.counts().max()) if c.Tq else 0 for c in heads_cls))
        Hm = program.heads if r.varies else 1
        check_allocation(f"the tiles plan's token masks ({max(Hm, Hc)} x {T} x {V} x {M * V})",
                         max(Hm, Hc) * T * V * M * V + 16 * Hc * T * M * V
                         + 24 * _PLAN_CHUNK_ELEMENTS,
                         "use a smaller grid or a sparser pattern")
        # kv tile indices per (head, query tile) from the sparse classes, in key-tile order;
        # padded slots repeat tile 0 (and are masked)
        order = np.zeros((Hc, T, M), np.int64)
        valid_slot = np.zeros((Hc, T, M), bool)
        full_slot = np.zeros((Hc, T, M), bool)
        for c, cls in enumerate(heads_cls):
            rows = cls.rows()
            pos = np.arange(cls.nnz) - cls.indptr[rows]
            order[c, rows, pos] = cls.indices
            valid_slot[c, rows, pos] = True
            full_slot[c, rows, pos] = cls.cls == FULL
        idx = torch.from_numpy(order).to(device)
        # the mask_mod is evaluated on partial tile pairs only: a FULL pair allows every
        # (query, key) of its tiles, and holds no padding (ARCHITECTURE.md, "Tile classes")
        partial = valid_slot & ~full_slot
        P = max(1, int(partial.sum(-1).max()))
        p_order = np.argsort(~partial, axis=-1, kind="stable")[..., :P]      # slots, partial first
        p_ok = torch.from_numpy(np.take_along_axis(partial, p_order, -1)).to(device)   # [Hc, T, P]
        p_slot = torch.from_numpy(p_order).to(device)
        self.V, self.T, self.Hc = V, T, Hc
        # token-level mask over the candidate keys (the tiles' tokens), evaluated a chunk of
        # query tiles at a time (O(chunk x V x M*V) temporaries, never all of them at once):
        # pass 1 finds the keys some query of each tile attends to, pass 2 evaluates the mask
        # on those K keys only
        pos = torch.arange(lay.n_padded, device=device).reshape(T, V)
        qpos = pos[:, :, None]                                  # [T, V, 1]
        kcand = pos[idx].reshape(Hc, T, 1, M * V)               # [Hc, T, 1, M*V]
        kpart = pos[torch.gather(idx, 2, p_slot)].reshape(Hc, T, 1, P * V)
        full_cols = torch.from_numpy(full_slot).to(device)[:, :, None, :, None]
        Ha = max(Hm, Hc)
        step = max(1, _PLAN_CHUNK_ELEMENTS // max(1, Ha * V * M * V))
        lanes = torch.arange(V, device=device)

        def candidates(t0, t1):
            """bool [Ha, t, V, M*V]: the token mask of query tiles t0:t1 against every key of
            their key tiles (FULL slots true, partial ones evaluated, unused slots false)."""
            t = t1 - t0
            a = full_cols[:, t0:t1].expand(Ha, t, V, M, V).reshape(Ha, t, V, M * V).to(torch.uint8)
            ev = _token_masks(program, device, Hm, Hc, qpos[t0:t1], kpart[:, t0:t1])
            ev &= p_ok[:, t0:t1, None, :, None].expand(Hc, t, 1, P, V).reshape(Hc, t, 1, P * V)
            cols = (p_slot[:, t0:t1, :, None] * V + lanes).reshape(Hc, t, 1, P * V)
            # padded entries of the partial list point at other slots with value 0: amax keeps
            # those slots as they are
            a.scatter_reduce_(-1, cols.expand(Ha, t, V, P * V), ev.to(torch.uint8), "amax")
            return a.bool()

        with torch.no_grad():
            used = torch.empty(1 if Hc == 1 else Ha, T, M * V, dtype=torch.bool, device=device)
            for t0 in range(0, T, step):
                t1 = min(T, t0 + step)
                a = candidates(t0, t1)
                # keep only the keys some query of the tile attends to (per query tile, padded
                # to the longest list): an 8x8 query tile under a 13x13 neighborhood needs its
                # 20x20 halo, 400 keys, not the 576 of its nine key tiles
                u = a.any(2)                                    # [Ha, t, M*V]
                used[:, t0:t1] = u.any(0, keepdim=True) if Hc == 1 else u
                del a, u
            K = max(1, int(used.sum(-1).max()))
            K = min(M * V, -(-K // 16) * 16)                    # matmul-friendly width
            keep_cols = torch.argsort((~used).to(torch.int8), dim=-1, stable=True)[..., :K]
            col_ok = torch.gather(used, -1, keep_cols)          # [Hc, T, K]
            del used
            kpos = torch.gather(kcand.reshape(Hc, T, M * V), -1, keep_cols).reshape(Hc, T, 1, K)
            del kcand
            # stored bit-packed along the keys (8 per byte): 1M tokens under a 1024-token
            # window hold 150 MB of packed masks instead of 1.2 GB of bools
            K8 = -(-K // 8)
            bits = torch.empty(Ha, T, V, K8, dtype=torch.uint8, device=device)
            row_any = torch.empty(Ha, T, V, 1, dtype=torch.bool, device=device)
            weights = (1 << torch.arange(8, device=device)).to(torch.uint8)
            for t0 in range(0, T, step):
                t1 = min(T, t0 + step)
                cols = keep_cols[:, t0:t1, None, :].expand(Ha, t1 - t0, V, K)
                a = torch.gather(candidates(t0, t1), -1, cols) & col_ok[:, t0:t1, None, :]
                row_any[:, t0:t1] = a.any(-1, keepdim=True)
                a = torch.nn.functional.pad(a, (0, K8 * 8 - K)).reshape(Ha, t1 - t0, V, K8, 8)
                bits[:, t0:t1] = (a.to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
            del keep_cols
        self.K = K
        self._bits, self._weights = bits, weights
        # rows with no allowed key: give SDPA one dummy key (output zeroed afterwards), so no
        # backend ever sees an all -inf row (some return NaN there, and NaN gradients)
        self.row_any = row_any                                  # [1 or H, T, V, 1]
        self.every_row_has_keys = bool(self.row_any.all())
        self._float_masks: Dict[tuple, torch.Tensor] = {}
        self.q_pos, self.k_pos = qpos, kpos
        # one gather index from the user's token order straight to the gathered key layout
        tok = torch.from_numpy(lay.tokens()).to(device)
        user = torch.where(tok >= 0, tok, torch.full_like(tok, lay.n))   # n = the zero row
        self.q_index = user                                    # [n_padded]
        self.n_users = lay.n
        self.kv_index = user[kpos.reshape(Hc, -1)]             # [Hc, T*K]
        # the same indices with padding pointing at token 0 instead of the zero row: padded key
        # slots are masked and padded query rows are dropped, so any finite row will do, and
        # inputs already in the compute dtype are gathered without a padded copy
        self.q_index0 = torch.where(user == lay.n, 0, user)
        self.kv_index0 = torch.where(self.kv_index == lay.n, 0, self.kv_index)
        self.scatter = None if lay.identity else lay.scatter_index().to(device)
        # key slots that hold no key (tile lists and key lists padded to the longest): the
        # native path gathers token 0 there, then overwrites it with zeros, so a padding slot
        # never carries a real token's values (ARCHITECTURE.md, "Non-finite inputs")
        pad = self.kv_index == lay.n                           # [Hc, T*K]
        self.pad_mask = pad if bool(pad.any()) else None
        self.pad_slots = torch.nonzero(pad[0]).reshape(-1) if Hc == 1 else None
        if target != device:
            for name, value in list(vars(self).items()):
                if isinstance(value, torch.Tensor):
                    setattr(self, name, value.to(target))
        # inference reuses its gather buffers: on CPU a fresh 40 MB tensor costs ~5x its copy in
        # page faults (index_select into a reused buffer: 3 ms vs 16 ms on the benchmark CPU)
        self._buffers: Dict[tuple, tuple] = {}
        self.buffer_lock = threading.Lock()
        self._Ha = Ha
        self._whole_masks: Dict[tuple, torch.Tensor] = {}
        self._tokens = tok

    def band(self, program):
        """``kernels.band``'s plan for this program (None where it does not apply), built on
        first use and kept."""
        if not hasattr(self, "_band"):
            self._band = band.band_plan(program)
        return self._band

    @property
    def whole(self) -> bool:
        """Whether a call runs one SDPA over the whole grid (``WHOLE_FRACTION``; read at each
        call, so tests can force either path)."""
        n, T, V, K = self.n_users, self.T, self.V, self.K
        return T * V * K >= WHOLE_FRACTION * n * n and self._Ha * n * n <= WHOLE_MAX_ELEMENTS

    @outside_inference_mode
    def whole_mask(self, dtype):
        """The whole grid's SDPA mask [1, 1 or H, N, N] in the user's token order, scattered
        from the plan's token masks, as ``band.additive`` gives it (with the rows that have a
        key, [1, 1 or H, N, 1], or None), built once per dtype."""
        key = dtype
        if key not in self._whole_masks:
            n, T, V, K = self.n_users, self.T, self.V, self.K
            dev = self._bits.device
            ok = self.allowed                                     # [Ha, T, V, K]
            Ha = ok.shape[0]
            tok = self._tokens
            qtok = tok[self.q_pos.reshape(T, V)]                  # [T, V] user token or -1
            full = torch.zeros(Ha, n + 1, n + 1, dtype=torch.bool, device=dev)
            for h in range(Ha):
                ktok = tok[self.k_pos[h if self.Hc > 1 else 0].reshape(T, K)]   # [T, K]
                qi = torch.where(qtok >= 0, qtok, n)[:, :, None].expand(T, V, K)
                ki = torch.where(ktok >= 0, ktok, n)[:, None, :].expand(T, V, K)
                # only allowed entries are written: padded key slots may repeat a real key
                # (disallowed there); padding tokens map to row/column n, cut off below
                sel = ok[h]
                full[h].index_put_((qi[sel], ki[sel]),
                                   torch.ones((), dtype=torch.bool, device=dev))
            mask, rows = band.additive(full[None, :, :n, :n], dtype)
            self._whole_masks[key] = (mask, rows)
        return self._whole_masks[key]

    def allowed_chunk(self, t0: int = 0, t1: Optional[int] = None) -> torch.Tensor:
        """bool [1 or H, t, V, K]: the token mask of query tiles t0:t1 (unpacked)."""
        b = self._bits[:, t0:t1]
        out = (b[..., None] & self._weights) != 0
        return out.reshape(*b.shape[:-1], -1)[..., :self.K]

    @property
    def allowed(self) -> torch.Tensor:
        """bool [1 or H, T, V, K]: every query tile's token mask over its gathered keys."""
        return self.allowed_chunk()

    @outside_inference_mode
    def float_mask(self, H: int, dtype, t0: int = 0, t1: Optional[int] = None):
        """SDPA's mask for H heads and query tiles ``t0:t1``, [1, H*t, V, K]: additive
        (0 / -inf) in ``dtype`` (SDPA would convert a bool mask on every call), or the bool
        *disallowed* entries for ``dtype="blocked"`` (laid out like a score bias). Rows with no
        key get one dummy key (their output is zeroed). The whole mask is built once and kept
        when it is small (<= ``_CACHED_MASK_ELEMENTS``); otherwise per call and chunk."""
        t1 = self.T if t1 is None else t1
        whole = (t0, t1) == (0, self.T)
        key = (H, dtype)
        mask = self._float_masks.get(key) if whole else None
        if mask is None:
            mask = _sdpa_mask(self, H, dtype, t0, t1)
            if whole and H * self.T * self.V * self.K <= _CACHED_MASK_ELEMENTS:
                self._float_masks[key] = mask
        return mask

    def chunk(self, B: int, H: int, D: int) -> int:
        """Query tiles per step of the chunked path (the explicit softmax's chunk, so dropout
        draws the same stream either way)."""
        return max(1, _MAX_SCORE_ELEMENTS // max(1, B * H * self.V * self.K))

    @outside_inference_mode
    def buffers(self, B, H, D, Dv, dtype, device, padded: bool = True):
        """Gather buffers; ``padded`` adds copies of q, k, v with a zero row (for inputs that
        need a dtype conversion)."""
        key = (B, H, D, Dv, dtype, padded)
        if key not in self._buffers:
            if len(self._buffers) > 4:
                self._buffers.clear()
            n = self.q_index.numel()
            kv = self.kv_index.shape[-1]
            users = self.n_users + 1                 # user tokens and one zero row (padding)
            zero_rows = ([torch.zeros(B, H, users, d, dtype=dtype, device=device)
                          for d in (D, D, Dv)] if padded else [None, None, None])
            self._buffers[key] = (torch.empty(B, H, n, D, dtype=dtype, device=device),
                                  torch.empty(B, H, kv, D, dtype=dtype, device=device),
                                  torch.empty(B, H, kv, Dv, dtype=dtype, device=device), zero_rows)
        return self._buffers[key]


def _token_masks(program, device, Hm: int, Hc: int, qpos, kpos) -> torch.Tensor:
    """bool [max(Hm, Hc), T, V, M*V]: the token mask between each query tile and its candidate
    keys. A pattern with a different pattern per head (heads([...])) is evaluated head by head
    from each head's own IR: its table-form mask_mod would evaluate every head's branch for
    every head (O(H^2))."""
    r = program.recipe
    T, V = qpos.shape[0], qpos.shape[1]
    width = kpos.shape[-1]
    if Hm > 1 and contains(r.ir, HeadsN):
        out = torch.empty(Hm, T, V, width, dtype=torch.bool, device=device)
        for h in range(Hm):
            out[h] = head_mask_mod(r, h, device)(0, 0, qpos, kpos[h if Hc > 1 else 0])
        return out
    mask_mod, _ = program.mods(device)
    heads = torch.arange(Hm, device=device).reshape(Hm, 1, 1, 1)
    allowed = mask_mod(0, heads, qpos[None], kpos)
    return allowed.expand(max(Hm, Hc), T, V, width).clone()


def _keys_per_query(program) -> int:
    """Padded keys each query attends to in the tiles layout: max non-empty tiles x tile size."""
    c = program.classes
    return max(int(d.counts().max()) if d.Tq else 0 for d in c.distinct) * program.layout.block


def tiles_program(pattern, score, shape, heads):
    """The Program the tiles backend runs. 64-token tiles when their key tiles cover below 0.75x
    the keys of 128-token tiles (2-D neighborhoods: 576 vs 1152; after the halo gather 400 vs
    560 keys, 23.9 vs 26.8 ms forward for 64x64 13x13 H=4 on the benchmark CPU); otherwise 128,
    whose larger matmuls win at similar key counts (3-D 16x32x32 3x7x7: 88.4 vs 88.9 ms; 1-D
    32K causal window 1024: 94.1 vs 101.4 ms)."""
    big = Program(pattern, score, shape, heads, block=TILE_SIZES[0])
    small = Program(pattern, score, shape, heads, block=TILE_SIZES[1])
    return small if _keys_per_query(small) < 0.75 * _keys_per_query(big) else big


def _plan_bytes(plan) -> int:
    """What a plan holds (its token masks, indices, cached SDPA masks and gather buffers)."""
    total = sum(v.nbytes for v in vars(plan).values() if isinstance(v, torch.Tensor))
    total += sum(m.nbytes for m in plan._float_masks.values())
    total += sum(b.nbytes for bufs in plan._buffers.values() for b in bufs[:3])
    total += sum(m.nbytes for m, _ in plan._whole_masks.values())
    bp = getattr(plan, "_band", None)
    if bp is not None:
        # blocks with equal masks share one tensor: count each once
        kept = {id(m): m for masks in bp.masks.values() if masks for m, _ in masks}
        total += sum(m.nbytes for m in kept.values())
    return total


PLAN_CACHE_BYTES = 512 << 20    # plans kept, least recently used out (each is O(N x keys))
_PLANS = LRU(32, max_bytes=PLAN_CACHE_BYTES, weigh=_plan_bytes)


def plan_for(program, device) -> TilePlan:
    """The program's plan on ``device`` (one per recipe and device, in a bounded cache)."""
    device = torch.device(device)
    key = (program.recipe.key, device)
    plan = _PLANS.get(key)
    if plan is None:
        with guarded(f"the tiles plan for {program.pattern!r} on {tuple(program.shape)}"):
            plan = _PLANS.put(key, TilePlan(program, device))
    return plan


def _with_zero_row(x):
    return torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])], 2)


def run_tiles(program, q, k, v, scale: float, *, sink=None, dropout_p=None,
              generator: Optional[torch.Generator] = None, keep: Optional[torch.Tensor] = None,
              return_lse: bool = False):
    """Block-sparse attention on [B, H, N, D] inputs in the user's token order (k, v: [B, H_kv,
    N, D] with H_kv dividing H for grouped-query attention; each query head's keys are gathered
    straight from its kv head, never from an H-head copy).

    Args:
        sink: per-head sink logits, a tensor [H] (or None).
        dropout_p: per-head dropout probabilities, a float tensor [H] (or None: no dropout).
        generator: where dropout draws from (CPU generator; the keep mask is moved to q's device).
        keep: an explicit keep mask in the gathered layout [B, H, T, V, K] (tests use this).
        return_lse: also return the log-sum-exp [B, H, N] (the softmax is then written out:
            SDPA returns none on CPU).
    Returns:
        [B, H, N, Dv] (and lse)
    """

    device = q.device
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if B == 0:   # nothing to attend; keep the graph so backward gives zero-size gradients
        out = v.new_zeros(0, H, N, Dv) + (q.sum() + k.sum() + v.sum()).to(v.dtype)
        return (out, out.new_zeros(0, H, N, dtype=dt)) if return_lse else out
    plan = plan_for(program, device)
    V, T, K, Hc = plan.V, plan.T, plan.K, plan.Hc
    group = H // k.shape[1]                    # query heads per key/value head (GQA)
    if (device.type != "meta" and sink is None and dropout_p is None and keep is None
            and program.score_mod(device) is None
            and (not return_lse or (device.type == "cpu" and D == Dv))):
        bp = plan.band(program)
        n = plan.n_users
        if band.pays(bp, T * V * K, V) and (not plan.whole or bp.pairs <= BAND_OVER_WHOLE * n * n):
            return band.run_band(bp, q, k, v, scale, dt, return_lse)
        if plan.whole:
            return _run_whole(plan, q, k, v, scale, dt, return_lse)
    # lay out queries; gather every query tile's key/value tiles straight from user order
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v) + score_tensors(program.score)
        + ((sink,) if sink is not None else ()))
    native = q.dtype == dt and k.dtype == dt and v.dtype == dt
    itemsize = torch.finfo(dt).bits // 8
    if T > 1 and B * H * T * K * (D + Dv) * itemsize > _GATHER_BYTES:
        return _run_chunked(program, plan, q, k, v, scale, sink, dropout_p, generator, keep, dt,
                            native, return_lse)
    if group > 1 and Hc == 1 and sink is None and dropout_p is None and keep is None:
        return _run_folded(program, plan, q, k, v, scale, dt, native, return_lse)
    if Hc == 1 and not grad and group == 1:
        with plan.buffer_lock:
            qb, kb, vb, (qz, kz, vz) = plan.buffers(B, H, D, Dv, dt, device, padded=not native)
            if native:
                qz, kz, vz, qi, kvi = q, k, v, plan.q_index0, plan.kv_index0[0]
            else:
                for z, x in ((qz, q), (kz, k), (vz, v)):
                    z[:, :, :N].copy_(x)                        # the last row stays zero
                qi, kvi = plan.q_index, plan.kv_index[0]
            torch.index_select(qz, 2, qi, out=qb)
            torch.index_select(kz, 2, kvi, out=kb)
            torch.index_select(vz, 2, kvi, out=vb)
            if native and plan.pad_mask is not None:
                kb.index_fill_(2, plan.pad_slots, 0)
                vb.index_fill_(2, plan.pad_slots, 0)
            return _attend(program, plan, qb.reshape(B, H, T, V, D), kb.reshape(B, H, T, K, D),
                           vb.reshape(B, H, T, K, Dv), q, scale, sink, dropout_p, generator,
                           keep, dt, return_lse)
    if native:
        qz, kz, vz, qi, kvi = q, k, v, plan.q_index0, plan.kv_index0
    else:
        qz, kz, vz = (_with_zero_row(x).to(dt) for x in (q, k, v))
        qi, kvi = plan.q_index, plan.kv_index
    qt = qz.index_select(2, qi).reshape(B, H, T, V, D)
    if Hc == 1 and group == 1:
        kg, vg = kz.index_select(2, kvi[0]), vz.index_select(2, kvi[0])
    else:                                      # per-head keys, or GQA: head h reads h // group
        hh = torch.arange(H, device=device)[:, None] // group
        kg, vg = kz[:, hh, kvi], vz[:, hh, kvi]
    if native and plan.pad_mask is not None:   # padding slots read token 0: zero them
        pad = plan.pad_mask[None, :, :, None]
        kg, vg = kg.masked_fill(pad, 0), vg.masked_fill(pad, 0)
    kg, vg = kg.reshape(B, H, T, K, D), vg.reshape(B, H, T, K, Dv)
    return _attend(program, plan, qt, kg, vg, q, scale, sink, dropout_p, generator, keep, dt,
                   return_lse)


def _run_whole(plan, q, k, v, scale, dt, return_lse):
    """One fused SDPA call over the whole grid with the plan's mask materialised (see
    ``WHOLE_FRACTION``): ``band.run_blocks`` with one block."""
    n = plan.n_users
    return band.run_blocks([(0, n, 0, n)], lambda i: plan.whole_mask(dt), q, k, v, scale, dt,
                           return_lse)


def _attend(program, plan, qt, kg, vg, q, scale, sink, dropout_p, generator, keep, dt,
            return_lse=False):
    """Attention of the laid-out queries against their gathered keys, back in user order."""
    out = _attend_tiles(program, plan, qt, kg, vg, q, scale, sink, dropout_p, generator, keep, dt,
                        return_lse)
    if return_lse:
        out, lse = out
        return (_unlayout(plan, out, q.shape[2], q.dtype),
                _unlayout(plan, lse[..., None], q.shape[2], dt)[..., 0])
    return _unlayout(plan, out, q.shape[2], q.dtype)


def _unlayout(plan, out, N: int, dtype):
    """[B, H, n_padded, Dv] in the layout -> [B, H, N, Dv] in the user's order."""
    if plan.scatter is not None:
        out = out.index_select(2, plan.scatter)
    elif out.shape[2] != N:
        out = out[:, :, :N]
    return out.to(dtype)


class _Fold:
    """A plan read with the ``g`` query heads of each key/value head folded into the rows of
    one tile (GQA): tile t of kv head j holds rows (head j*g + i, query v) at i*V + v, so one
    gather of the kv head's keys serves all g query heads (no per-head copy of k and v)."""

    def __init__(self, plan, g: int, Hk: int):
        self._plan, self.g, self.Hk = plan, g, Hk
        self.T, self.K, self.Hc = plan.T, plan.K, 1
        self.V = g * plan.V
        self.q_pos = plan.q_pos.repeat(1, g, 1)                    # [T, g*V, 1]
        self.k_pos = plan.k_pos
        self.row_any = self._fold(plan.row_any)
        self.every_row_has_keys = plan.every_row_has_keys

    def _fold(self, a):
        """[1 or H, t, V, X] per query head -> [1 or Hk, t, g*V, X] per kv head."""
        if a.shape[0] == 1:
            return a.repeat(1, 1, self.g, 1)
        t, V, X = a.shape[1:]
        return a.reshape(self.Hk, self.g, t, V, X).transpose(1, 2).reshape(self.Hk, t, self.V, X)

    def allowed_chunk(self, t0: int = 0, t1: Optional[int] = None) -> torch.Tensor:
        return self._fold(self._plan.allowed_chunk(t0, t1))

    def float_mask(self, H: int, dtype, t0: int = 0, t1: Optional[int] = None):
        t1 = self.T if t1 is None else t1
        key = ("fold", self.g, H, dtype)
        whole = (t0, t1) == (0, self.T)
        mask = self._plan._float_masks.get(key) if whole else None
        if mask is None and whole and H == 1 and self._plan.row_any.shape[0] == 1:
            # one mask for every head: the unfolded plan's, repeated for the g folded heads
            mask = self._plan.float_mask(1, dtype).repeat(1, 1, self.g, 1)
            if self.T * self.V * self.K <= _CACHED_MASK_ELEMENTS:
                self._plan._float_masks[key] = mask
        if mask is None:
            mask = _sdpa_mask(self, H, dtype, t0, t1)
            if whole and H * self.T * self.V * self.K <= _CACHED_MASK_ELEMENTS:
                self._plan._float_masks[key] = mask
        return mask

    def heads(self, device) -> torch.Tensor:
        """[1, Hk, 1, g*V, 1]: the query head of each folded row."""
        h = (torch.arange(self.Hk, device=device)[:, None] * self.g
             + torch.arange(self.g, device=device)[None, :])
        return h.repeat_interleave(self._plan.V, 1).reshape(1, self.Hk, 1, self.V, 1)

    def unfold(self, x, B: int):
        """[B, Hk, T * g*V, X] -> [B, H, T * V, X] (query heads back in their own slots)."""
        T, g, V = self.T, self.g, self._plan.V
        X = x.shape[-1]
        return x.reshape(B, self.Hk, T, g, V, X).transpose(2, 3).reshape(B, self.Hk * g, T * V, X)


def _run_folded(program, plan, q, k, v, scale, dt, native, return_lse):
    """GQA with shared tile classes, no sink logit or dropout: every kv head's keys gathered
    once and attended by its g query heads' rows folded into each tile (see ``_Fold``)."""
    B, H, N, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    g = H // Hk
    T, V, K = plan.T, plan.V, plan.K
    if native:
        qz, kz, vz, qi, kvi = q, k, v, plan.q_index0, plan.kv_index0[0]
    else:
        qz, kz, vz = (_with_zero_row(x).to(dt) for x in (q, k, v))
        qi, kvi = plan.q_index, plan.kv_index[0]
    qt = qz.index_select(2, qi).reshape(B, Hk, g, T, V, D).transpose(2, 3).reshape(B, Hk, T, g * V, D)
    kg, vg = kz.index_select(2, kvi), vz.index_select(2, kvi)
    if native and plan.pad_mask is not None:
        pad = plan.pad_mask[None, :, :, None]
        kg, vg = kg.masked_fill(pad, 0), vg.masked_fill(pad, 0)
    fold = _Fold(plan, g, Hk)
    res = _attend_tiles(program, fold, qt, kg.reshape(B, Hk, T, K, D), vg.reshape(B, Hk, T, K, Dv),
                        q, scale, None, None, None, None, dt, return_lse, heads=fold.heads(q.device))
    if return_lse:
        out, lse = res
        out = _unlayout(plan, fold.unfold(out, B), N, q.dtype)
        return out, _unlayout(plan, fold.unfold(lse[..., None], B), N, dt)[..., 0]
    return _unlayout(plan, fold.unfold(res, B), N, q.dtype)


class _Slice:
    """Query tiles ``t0:t1`` of a plan, read like a plan by the attention steps."""

    def __init__(self, plan, t0: int, t1: int):
        self._plan, self._t0, self._t1 = plan, t0, t1
        self.T, self.V, self.K, self.Hc = t1 - t0, plan.V, plan.K, plan.Hc
        self._float_masks = {}            # (read by _Fold; a slice keeps no mask of its own)
        self.row_any = plan.row_any[:, t0:t1]
        self.every_row_has_keys = plan.every_row_has_keys
        self.q_pos, self.k_pos = plan.q_pos[t0:t1], plan.k_pos[:, t0:t1]

    def float_mask(self, H: int, dtype):
        return self._plan.float_mask(H, dtype, self._t0, self._t1)

    def allowed_chunk(self, t0: int = 0, t1: Optional[int] = None) -> torch.Tensor:
        t1 = self.T if t1 is None else t1
        return self._plan.allowed_chunk(self._t0 + t0, self._t0 + t1)


def _run_chunked(program, plan, q, k, v, scale, sink, dropout_p, generator, keep, dt, native,
                 return_lse=False):
    """run_tiles for large grids: gather and attend a chunk of query tiles at a time, so the
    gathered keys and the SDPA masks are O(chunk), not O(N x keys per query) (1M tokens under a
    1024-token window: 1.2 GB of gathered k/v at D=16, 4.8 GB of fp32 mask otherwise)."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    T, V, K, Hc = plan.T, plan.V, plan.K, plan.Hc
    if native:
        qz, kz, vz, qi, kvi = q, k, v, plan.q_index0, plan.kv_index0
    else:
        qz, kz, vz = (_with_zero_row(x).to(dt) for x in (q, k, v))
        qi, kvi = plan.q_index, plan.kv_index
    qi, kvi = qi.reshape(T, V), kvi.reshape(Hc, T, K)
    pad = plan.pad_mask.reshape(Hc, T, K) if native and plan.pad_mask is not None else None
    Hk = k.shape[1]
    g = H // Hk
    hh = torch.arange(H, device=q.device)[:, None] // g                      # GQA: kv head of h
    # GQA with shared classes and no sink or dropout: fold the query heads into the tiles
    fold = g > 1 and Hc == 1 and sink is None and dropout_p is None and keep is None
    step = plan.chunk(B, H, D)
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v) + score_tensors(program.score)
        + ((sink,) if sink is not None else ()))
    # without autograd, chunks are written into one buffer: kept chunk outputs between the
    # freed temporaries would fragment the heap (RSS grew ~20 MB per chunk at 1M tokens)
    whole = None if grad else torch.empty(B, H, T * V, Dv, dtype=dt, device=q.device)
    outs, lses = [], []
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        t = t1 - t0
        qt = qz.index_select(2, qi[t0:t1].reshape(-1)).reshape(B, H, t, V, D)
        idx = kvi[:, t0:t1].reshape(Hc, t * K)
        if fold:
            kg, vg = kz.index_select(2, idx[0]), vz.index_select(2, idx[0])
            if pad is not None:
                m = pad[:, t0:t1].reshape(1, t * K)[None, :, :, None]
                kg, vg = kg.masked_fill(m, 0), vg.masked_fill(m, 0)
            view = _Fold(_Slice(plan, t0, t1), g, Hk)
            o = _attend_tiles(program, view,
                              qt.reshape(B, Hk, g, t, V, D).transpose(2, 3).reshape(B, Hk, t, g * V, D),
                              kg.reshape(B, Hk, t, K, D), vg.reshape(B, Hk, t, K, Dv), q, scale,
                              None, None, None, None, dt, return_lse, heads=view.heads(q.device))
            if return_lse:
                o, lse = o
                lses.append(view.unfold(lse[..., None], B)[..., 0])
            o = view.unfold(o, B)
            if whole is None:
                outs.append(o)
            else:
                whole[:, :, t0 * V:t1 * V] = o
            del qt, kg, vg, o
            continue
        if Hc == 1 and k.shape[1] == H:
            kg, vg = kz.index_select(2, idx[0]), vz.index_select(2, idx[0])
        else:
            kg, vg = kz[:, hh, idx], vz[:, hh, idx]
        if pad is not None:
            m = pad[:, t0:t1].reshape(Hc, t * K)[None, :, :, None]
            kg, vg = kg.masked_fill(m, 0), vg.masked_fill(m, 0)
        kg, vg = kg.reshape(B, H, t, K, D), vg.reshape(B, H, t, K, Dv)
        o = _attend_tiles(program, _Slice(plan, t0, t1), qt, kg, vg, q, scale, sink, dropout_p,
                          generator, keep[:, :, t0:t1] if keep is not None else None, dt,
                          return_lse)
        if return_lse:
            o, lse = o
            lses.append(lse)
        if whole is None:
            outs.append(o)
        else:
            whole[:, :, t0 * V:t1 * V] = o
        del qt, kg, vg, o
    out = _unlayout(plan, torch.cat(outs, 2) if whole is None else whole, N, q.dtype)
    if return_lse:
        return out, _unlayout(plan, torch.cat(lses, 2)[..., None], N, dt)[..., 0]
    return out


def _attend_tiles(program, plan, qt, kg, vg, q, scale, sink, dropout_p, generator, keep, dt,
                  return_lse=False, heads=None):
    """[B, H, T * V, Dv]: attention of laid-out query tiles against their gathered keys (and
    the lse [B, H, T * V] with ``return_lse``). ``heads``: the head index of each (head, row)
    the score terms read, broadcast as [1, H, 1, V, 1] (default: head h for slot h; GQA's
    folded tiles hold several heads' rows)."""
    device = q.device
    B, H = qt.shape[:2]
    Dv = vg.shape[-1]
    V, T, K, Hc = plan.V, plan.T, plan.K, plan.Hc
    score_mod = program.score_mod(device)
    # the fused path adds the score terms as a bias: only when every term is additive
    nonlinear = bool(terms_with_role(program.score, "nonlinear", "function"))
    if heads is None:
        heads = torch.arange(H, device=device).reshape(1, H, 1, 1, 1)
    bias = None
    if score_mod is not None and not nonlinear:
        kp = plan.k_pos[:, None] if Hc > 1 else plan.k_pos[0][None, None]
        kp = kp.reshape(1, Hc, T, 1, K) if Hc > 1 else kp
        zero = torch.zeros((), dtype=dt, device=device)
        # a 0-d score loses type promotion to float32 tables: cast (SDPA misreads a mask whose
        # dtype differs from q's)
        bias = score_mod(zero, 0, heads, plan.q_pos[None, None], kp).to(dt)   # [1, H, T, V, K]
    if sink is None and dropout_p is None and not nonlinear and (
            not return_lse or _flash_lse_ok(qt, vg, bias)):
        out = _fused(qt, kg, vg, plan, bias, scale, B, H, return_lse)
    else:
        out = _explicit(qt, kg, vg, plan, score_mod, scale, sink, dropout_p, generator, keep,
                        B, H, dt, return_lse, heads)
    if return_lse:
        out, lse = out
        return out.reshape(B, H, T * V, Dv), lse.reshape(B, H, T * V)
    return out.reshape(B, H, T * V, Dv)


def _flash_lse_ok(qt, vg, bias) -> bool:
    """Whether the fused path can return the lse: torch's CPU flash kernel returns it (for
    equal q and v head dims, and a score bias that needs no gradient)."""
    return (qt.device.type == "cpu" and qt.shape[-1] == vg.shape[-1]
            and (bias is None or not bias.requires_grad))


def _fused(qt, kg, vg, plan, bias, scale, B, H, return_lse=False):
    """One fused SDPA call over all query tiles: [B, H*T, V, D] x [B, H*T, K, D] (and the lse
    [B, H, T, V] through torch's CPU flash kernel with ``return_lse``)."""
    T, V, MV = plan.T, plan.V, plan.K
    if bias is None and plan.row_any.shape[0] == 1:
        # the same token mask for every head: batch [B * H] against one [1, T, V, K] mask
        # (broadcast, built once and kept; H x smaller than a per-head copy)
        mask = plan.float_mask(1, qt.dtype)
        lead = (B * H, T)
    elif bias is None:
        mask = plan.float_mask(H, qt.dtype)
        lead = (B, H * T)
    else:
        bias = bias.expand(1, H, T, V, MV).reshape(1, H * T, V, MV)
        mask = bias.masked_fill(plan.float_mask(H, "blocked"), float("-inf"))
        lead = (B, H * T)
    args = (qt.reshape(*lead, V, qt.shape[-1]), kg.reshape(*lead, MV, kg.shape[-1]),
            vg.reshape(*lead, MV, vg.shape[-1]))
    if return_lse:
        out, lse = FlashLSE.apply(*args, mask.detach(), scale)
        lse = lse.reshape(B, H, T, V)
    else:
        out = F.scaled_dot_product_attention(*args, attn_mask=mask, scale=scale)
    out = out.reshape(B, H * T, V, out.shape[-1])
    if plan.every_row_has_keys:
        return (out, lse) if return_lse else out
    row_any = plan.row_any.expand(H, T, V, 1).reshape(1, H * T, V, 1)
    out = torch.where(row_any, out, torch.zeros((), dtype=out.dtype, device=out.device))
    if return_lse:
        lse = torch.where(row_any.reshape(1, H, T, V), lse,
                          torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device))
        return out, lse
    return out


def _explicit(qt, kg, vg, plan, score_mod, scale, sink, dropout_p, generator, keep, B, H, dt,
              return_lse=False, heads=None):
    """The softmax written out (``kernels.softmax``): score terms, sink logits, dropout and the
    log-sum-exp, chunked over query tiles."""
    device = qt.device
    T, V, K, Hc = plan.T, plan.V, plan.K, plan.Hc
    if heads is None:
        heads = torch.arange(H, device=device).reshape(1, H, 1, 1, 1)
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, B * H * V * K))
    sk = sink.to(dt).reshape(1, H, 1, 1, 1) if sink is not None else None
    ps = (dropout_p.to(device=device, dtype=dt).reshape(1, H, 1, 1, 1)
          if dropout_p is not None else None)
    outs, lses = [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = torch.matmul(qt[:, :, t0:t1], kg[:, :, t0:t1].transpose(-1, -2)) * scale
        if score_mod is not None:
            qp = plan.q_pos[t0:t1][None, None]                   # [1, 1, t, V, 1]
            kp = plan.k_pos[:, t0:t1][None] if Hc > 1 else plan.k_pos[0, t0:t1][None, None]
            s = score_mod(s, 0, heads, qp, kp)
        p, lse = softmax(s, plan.allowed_chunk(t0, t1)[None], sk, return_lse)
        if return_lse:
            lses.append(lse)
        if ps is not None:
            p = drop(p, ps, None if keep is None else keep[:, :, t0:t1], generator)
        outs.append(torch.matmul(p, vg[:, :, t0:t1]))
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    if return_lse:
        return out, torch.cat(lses, 2) if len(lses) > 1 else lses[0]
    return out


def rows_attending(program, bad: torch.Tensor) -> torch.Tensor:
    """bool [B, H, N]: the queries that attend at least one key flagged in ``bad`` [B, H, N]
    (user token order), read off the plan's token masks: O(B x H x N x keys per query).
    ``isolate`` uses it to poison exactly the rows that attend a non-finite key."""
    B, H, N = bad.shape
    plan = plan_for(program, bad.device)
    T, V, K = plan.T, plan.V, plan.K
    ext = torch.cat([bad, bad.new_zeros(B, H, 1)], 2)          # token N: the padding slot
    if plan.Hc == 1:
        seen = ext.index_select(2, plan.kv_index[0])
    else:
        seen = ext[:, torch.arange(H, device=bad.device)[:, None], plan.kv_index]
    seen = seen.reshape(B, H, T, 1, K)
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, B * H * V * K))     # O(chunk) temporaries
    hit = torch.cat([(plan.allowed_chunk(t0, t0 + step)[None] & seen[:, :, t0:t0 + step]).any(-1)
                     for t0 in range(0, T, step)], 2).reshape(B, H, T * V)
    if plan.scatter is not None:
        return hit.index_select(2, plan.scatter)
    return hit[:, :, :N]


def rows_with_keys(program, device) -> torch.Tensor:
    """bool [H, N]: the queries that attend at least one key (built once per plan and device;
    backends whose kernels cannot tell an empty row's log-sum-exp apart read it here)."""
    plan = plan_for(program, device)
    found = getattr(plan, "_rows_with_keys", None)
    if found is None:
        ones = torch.ones(1, program.heads, program.n, dtype=torch.bool, device=device)
        found = plan._rows_with_keys = outside_inference_mode(rows_attending)(program, ones)[0]
    return found


# ---------------------------------------------------------------------- the backend protocol

def refusal(spec, device):
    return None                    # any pattern, any score, any device


def preference(spec, device):
    return None


def strength(spec, device) -> str:
    if spec.ranged:
        return ("a sub-range runs on the rectangle path: each chunk of query tiles against the "
                "key tiles its tile classes list, the token mask evaluated at global coordinates")
    if device.type == "cuda":
        return "block-sparse PyTorch over the analytic tiles runs any pattern and score, with a backward"
    return (f"on {device.type}, block-sparse PyTorch over the analytic tiles is the fastest path "
            f"and the only one with a backward (Flex is inference-only there)")


def call_refusal(spec, q, k, v, return_lse: bool = False):
    return None


@dataclass(frozen=True)
class RangeState:
    """A sub-range request's prepared state: the row-major program the rectangle path
    evaluates at global positions, and the request."""

    program: Program
    extent: object


def prepare(spec):
    if spec.ranged:
        return RangeState(plain_program(spec.pattern, spec.score, spec.shape, spec.heads),
                          spec.extent)
    return tiles_program(spec.pattern, spec.score, spec.shape, spec.heads)


def run(state, q, k, v, call):
    if isinstance(state, RangeState):
        return run_range(state.program, state.extent, q, k, v, call)
    return run_tiles(state, q, k, v, call.scale, sink=call.sink, dropout_p=call.dropout_p,
                     generator=call.generator, return_lse=call.return_lse)


def next_keep(spec, program, batch: int, drop_p, generator) -> torch.Tensor:
    """bool [B, H, N, N] on the CPU: the keep mask ``run`` draws from ``generator`` (a copy of
    the call's): one uniform per gathered (query, key slot) of the plan, a chunk of query tiles
    at a time, as ``_explicit`` draws them (``softmax.drop``), scattered to token pairs."""
    H, n = spec.heads, spec.n
    plan = plan_for(program, torch.device("cpu"))
    T, V, K = plan.T, plan.V, plan.K
    chunk = plan.chunk(batch, H, 0)      # the query tiles each step of the call draws for
    ps = drop_p.double().reshape(1, H, 1, 1, 1)
    keep = torch.cat([torch.rand((batch, H, min(T, t0 + chunk) - t0, V, K), generator=generator,
                                 dtype=torch.float64) >= ps for t0 in range(0, T, chunk)], 2)
    tok = torch.from_numpy(program.layout.tokens())
    qtok = tok[plan.q_pos.expand(T, V, 1)].expand(T, V, K)
    out = torch.zeros(batch, H, n, n, dtype=torch.bool)
    for h in range(H):
        ok = plan.allowed[h if plan.allowed.shape[0] > 1 else 0]
        ktok = tok[plan.k_pos[h if plan.Hc > 1 else 0]].expand(T, V, K)
        out[:, h, qtok[ok], ktok[ok]] = keep[:, h, ok]
    return out
