"""The tiles backend's band path: attention for query blocks against the contiguous key span their
tile classes list, straight from views of q, k and v (no gather), one fused SDPA call per block
(ARCHITECTURE.md, "Backends").

Where every query block's keys lie in one contiguous span of the user's token order (a sliding
window, causal plus window, a 1-D neighborhood, sinks near the diagonal ...), gathering copies
each key once per query tile that reads it: at a wide window that copy costs as much as the
attention. Here a block of ``Bq`` queries ``[a, b)`` attends ``k[:, :, lo:hi]`` through a view,
with an additive mask [Bq, hi - lo] evaluated from the row-major program's ``mask_mod`` (FULL
pairs are zeros, so torch's flash kernel runs them at dense speed; the partial edges carry the
-inf entries). The masks are built once and kept with the plan, blocks whose masks are equal
sharing one (a sliding window has a handful of distinct ones at any length), when the distinct
ones hold at most ``MASK_CACHE_ELEMENTS`` entries; else they are built per block per call.

Taken (``band_plan``) for a program whose layout is the user's order (1-D grids, or N-D grids
whose spans are contiguous in flat order), with one mask for every head, when its spans hold at
most ``1 + BAND_COPY / V`` times the pairs the gathered path computes (V: its query tile).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from maskdsl._caching import outside_inference_mode
from .softmax import FlashLSE

__all__ = ["BandPlan", "band_plan", "pays", "run_band", "run_blocks", "additive", "BAND_COPY",
           "MASK_CACHE_ELEMENTS"]

# The gathered path copies each query tile's K keys: its cost per pair is about 1 + BAND_COPY / V
# of the band's (V: tokens per query tile), so the band is taken up to that many times the
# gathered pairs. Measured on the benchmark CPU (forward and forward+backward, fp32, D=64):
# V=128: causal & window(64) at 4096 (band/gathered pairs 1.85) gathered 9.5/26.6 ms, band
# 11.1/51.0; window(512) at 4096 (1.2) gathered 30.5/107.2, band 24.6/95.2; V=64: a 2-D
# neighborhood((7, 7)) on 64x64 (1.43) gathered 26.6/96.5, band 22.5/82.8.
BAND_COPY = 40.0
MASK_CACHE_ELEMENTS = 1 << 25    # the blocks' distinct masks kept up to this many entries in all
_BLOCKS = (256, 512, 1024)       # query block sizes tried (multiples of the 128/64 token tiles)


@dataclass
class BandPlan:
    """Query blocks ``(a, b, lo, hi)`` (queries [a, b) against keys [lo, hi)), the program that
    evaluates their masks, and the masks once built (per dtype and device)."""

    blocks: List[Tuple[int, int, int, int]]
    program: object
    pairs: int
    masks: Dict[tuple, list] = field(default_factory=dict)

    def mask(self, i: int, dtype, device):
        """(additive mask [Bq, span], rows with a key [Bq, 1] or None when all have one)."""
        key = (dtype, device)
        if key not in self.masks:
            self.masks[key] = _distinct_masks(self.program, self.blocks, dtype, device)
        cached = self.masks[key]
        if cached is not None:
            return cached[i]
        return _block_mask(self.program, self.blocks[i], dtype, device)


@outside_inference_mode       # kept with the plan: never an inference tensor
def _distinct_masks(program, blocks, dtype, device) -> Optional[list]:
    """Every block's mask, blocks with equal masks sharing one tensor (a sliding window's
    interior blocks all look alike: a handful of distinct masks for any length), or None when
    the distinct ones would exceed ``MASK_CACHE_ELEMENTS`` entries (then built per call)."""
    seen: Dict[bytes, tuple] = {}
    out, kept = [], 0
    for blk in blocks:
        ok = _block_ok(program, blk, device)
        digest = hashlib.blake2b(ok.cpu().numpy().tobytes(), digest_size=16,
                                 person=repr(tuple(ok.shape)).encode()[:16]).digest()
        found = seen.get(digest)
        if found is None or not torch.equal(found[0], ok):
            kept += ok.numel()
            if kept > MASK_CACHE_ELEMENTS:
                return None
            found = (ok, *additive(ok, dtype))
            seen.setdefault(digest, found)
        out.append(found[1:])
    return out


def additive(ok: torch.Tensor, dtype):
    """(additive 0 / -inf mask in ``dtype``, bool rows with a key [..., q, 1] or None when all
    have one) of a bool mask ``ok`` [..., q, k]; a row with no key gets key 0 as a stand-in, so
    SDPA never sees an all -inf row (its output is zeroed by ``run_blocks``)."""
    some = ok.any(-1, keepdim=True)
    rows = None
    if not bool(some.all()):
        ok = ok.clone()
        ok[..., :1] |= ~some
        rows = some
    mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, float("-inf"))
    return mask, rows


def _block_ok(program, block, device) -> torch.Tensor:
    """bool [b - a, hi - lo]: which keys of the block's span its queries attend."""
    a, b, lo, hi = block
    mask_mod, _ = program.mods(device)
    qi = torch.arange(a, b, device=device)[:, None]
    ki = torch.arange(lo, hi, device=device)[None, :]
    ok = mask_mod(0, torch.zeros((), dtype=torch.int64, device=device), qi, ki)
    return ok.expand(b - a, hi - lo).contiguous()


def _block_mask(program, block, dtype, device):
    return additive(_block_ok(program, block, device), dtype)


def band_plan(program) -> Optional[BandPlan]:
    """The band path's blocks for ``program`` (see the module docstring), or None when its
    layout or masks rule it out; whether it pays is ``pays`` (read per call)."""
    lay, r = program.layout, program.recipe
    # positions must be the user's flat token indices (row-major, padding after the last token)
    if not (lay.tile is None or lay.row_major_order) or r.varies or not r.classes.shared:
        return None
    cls = r.classes.distinct[0]
    n, V = lay.n, lay.block
    counts = np.diff(cls.indptr)
    if cls.Tq == 0 or not counts.all():
        return None                   # a query tile with no key tile: leave it to the tiles
    idx = np.asarray(cls.indices)
    first = np.minimum.reduceat(idx, cls.indptr[:-1])        # per query tile: key tile span
    last = np.maximum.reduceat(idx, cls.indptr[:-1])
    best = None
    for Bq in _BLOCKS:
        per = max(1, Bq // V)
        blocks, pairs = [], 0
        for t0 in range(0, cls.Tq, per):
            t1 = min(cls.Tq, t0 + per)
            a, b = t0 * V, min(n, t1 * V)
            lo, hi = int(first[t0:t1].min()) * V, min(n, (int(last[t0:t1].max()) + 1) * V)
            blocks.append((a, b, lo, hi))
            pairs += (b - a) * (hi - lo)
        cost = pairs * (1 + 128 / Bq)  # smaller blocks: smaller matmuls, more calls
        if best is None or cost < best[0]:
            best = (cost, blocks, pairs)
    _, blocks, pairs = best
    return BandPlan(blocks, program, pairs)


def pays(bp: Optional[BandPlan], gathered_pairs: int, V: int) -> bool:
    """Whether the band beats gathering ``gathered_pairs`` with ``V``-token query tiles (read
    per call: tests force either path)."""
    return bp is not None and bp.pairs <= (1 + BAND_COPY / V) * gathered_pairs


def run_band(bp: BandPlan, q, k, v, scale: float, dt, return_lse: bool):
    """[B, H, N, Dv] (and lse [B, H, N]) over the band's query blocks (see the module
    docstring); q, k, v in the user's order, k and v may have H_kv heads (GQA)."""
    return run_blocks(bp.blocks, lambda i: bp.mask(i, dt, q.device), q, k, v, scale, dt,
                      return_lse)


def run_blocks(blocks, mask_of, q, k, v, scale: float, dt, return_lse: bool):
    """One fused SDPA call per block ``(a, b, lo, hi)``: queries [a, b) against views of keys
    [lo, hi), with ``mask_of(i)`` = (additive mask broadcast to [B, H, b - a, hi - lo], rows
    with a key or None; see ``additive``); the blocks cover every query once. Also the tiles
    backend's whole-grid call (one block). Rows with no key give zeros (and lse -inf)."""
    B, H, N, _ = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
    if return_lse and Hk != H:
        kd, vd = kd.repeat_interleave(H // Hk, 1), vd.repeat_interleave(H // Hk, 1)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    one = len(blocks) == 1 and blocks[0][:2] == (0, N)       # the whole-grid call: no copy
    whole = None if grad or one else torch.empty(B, H, N, Dv, dtype=dt, device=q.device)
    outs, lses = [], []
    for i, (a, b, lo, hi) in enumerate(blocks):
        mask, rows = mask_of(i)
        qs, ks, vs = qd[:, :, a:b], kd[:, :, lo:hi], vd[:, :, lo:hi]
        if return_lse:
            o, lse = FlashLSE.apply(qs, ks, vs, mask, scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale,
                                               enable_gqa=Hk != H)
        if rows is not None:
            o = torch.where(rows, o, torch.zeros((), dtype=o.dtype, device=o.device))
            if return_lse:
                lse = torch.where(rows[..., 0], lse, torch.full((), float("-inf"),
                                                                dtype=lse.dtype,
                                                                device=lse.device))
        if whole is None:
            outs.append(o)
        else:
            whole[:, :, a:b] = o
        if return_lse:
            lses.append(lse)
    out = (whole if whole is not None else outs[0] if len(outs) == 1 else
           torch.cat(outs, 2)).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, 2).to(dt)
    return out
