"""The ``tiles`` backend: block-sparse attention in plain PyTorch, forward and backward.

Algorithm (the same block sparsity as FlexAttention's BlockMask, executed with batched matmuls):

1. Lay q, k, v out in the program's token layout: N-D tiles of ``V`` tokens are contiguous, so a
   tile is a block of ``V`` consecutive rows.
2. For every query tile, list the key tiles the analytic classification marks non-empty
   (padded per row to the longest list, like BlockMask's ``kv_indices``); gather those key and
   value tiles: ``[B, H, T, M*V, D]``.
3. Dense attention per query tile against its gathered keys: scores ``[B, H, T, V, M*V]``, the
   exact token mask applied where tiles are partial (precomputed once per device from the
   generated mask_mod, O(N x keys-per-query) memory, never O(N^2)), score terms from the
   generated score_mod, sink logits in the denominator, dropout on the probabilities.
4. Scatter the output back to the user's token order.

Autograd differentiates all of it: q, k, v, learnable score parameters (captured tensors of the
generated score_mod), sink logits. Works on CPU, CUDA and MPS.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, Optional

import numpy as np
import torch

__all__ = ["TilePlan", "run_tiles"]

_MAX_SCORE_ELEMENTS = 1 << 26    # process query tiles in chunks of at most this many scores


class TilePlan:
    """Per-program, per-device gather indices and token masks (built once, then reused)."""

    def __init__(self, program, device: torch.device):
        from maskdsl.codegen.blockmask import EMPTY, FULL

        lay = program.layout
        V, T = lay.block, lay.n_tiles
        cls = program.classes                                   # [H, T, T]
        shared = all(np.array_equal(cls[0], c) for c in cls[1:])
        cls = cls[:1] if shared else cls
        Hc = cls.shape[0]
        nonempty = cls != EMPTY
        M = max(1, int(nonempty.sum(-1).max()))
        # kv tile indices per (head, query tile), non-empty first; padded slots repeat tile 0
        order = np.argsort(~nonempty, axis=-1, kind="stable")[..., :M]
        valid_slot = np.take_along_axis(nonempty, order, -1)    # [Hc, T, M]
        full_slot = np.take_along_axis(cls == FULL, order, -1)
        idx = np.where(valid_slot, order, 0)
        self.V, self.T, self.M, self.Hc = V, T, M, Hc
        self.kv_tiles = torch.from_numpy(idx).to(device)        # [Hc, T, M]
        # token-level mask for the gathered layout: [Hc, T, V, M*V]
        pos = torch.arange(lay.n_padded, device=device).reshape(T, V)
        qpos = pos[:, :, None]                                  # [T, V, 1]
        kpos = pos[self.kv_tiles].reshape(Hc, T, 1, M * V)      # [Hc, T, 1, M*V]
        mask_mod, _ = program.mods(device)
        # the token mask is per head whenever the pattern is, even if the tile lists agree
        from maskdsl.codegen.program import _varies_per_head

        Hm = program.heads if _varies_per_head(program.pattern) else 1
        heads = torch.arange(Hm, device=device).reshape(Hm, 1, 1, 1)
        with torch.no_grad():
            allowed = mask_mod(0, heads, qpos[None], kpos)
            allowed = allowed.expand(max(Hm, Hc), T, V, M * V).clone()
            slot_ok = torch.from_numpy(valid_slot).to(device)
            allowed &= slot_ok[:, :, None, :, None].expand(Hc, T, 1, M, V).reshape(Hc, T, 1, M * V)
        self.allowed = allowed                                  # bool [1 or H, T, V, M*V]
        self.q_pos, self.k_pos = qpos, kpos
        self.all_full = bool((full_slot | ~valid_slot).all())
        if not lay.identity:
            self.gather = lay.gather_index().to(device)
            self.scatter = lay.scatter_index().to(device)
        else:
            self.gather = self.scatter = None


_lock = threading.Lock()


def plan_for(program, device) -> TilePlan:
    """The program's plan on ``device``, kept on the program itself (its lifetime)."""
    device = torch.device(device)
    with _lock:
        plans = program.__dict__.setdefault("_tile_plans", {})
        plan = plans.get(device)
    if plan is None:
        plan = TilePlan(program, device)
        with _lock:
            plan = plans.setdefault(device, plan)
    return plan


def _to_layout(x, gather):
    if gather is None:
        return x
    pad = x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])
    return torch.cat([x, pad], 2).index_select(2, gather)


def run_tiles(program, q, k, v, scale: float, *, sink=None, dropout_p=None,
              generator: Optional[torch.Generator] = None, keep: Optional[torch.Tensor] = None):
    """Block-sparse attention on [B, H, N, D] inputs in the user's token order.

    Args:
        sink: per-head sink logits, a tensor [H] (or None).
        dropout_p: per-head dropout probabilities, a float tensor [H] (or None: no dropout).
        generator: where dropout draws from (CPU generator; the keep mask is moved to q's device).
        keep: an explicit keep mask in the gathered layout [B, H, T, V, M*V] (tests use this).
    Returns:
        [B, H, N, Dv]
    """
    device = q.device
    plan = plan_for(program, device)
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    V, T, M = plan.V, plan.T, plan.M
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qt = _to_layout(q, plan.gather).reshape(B, H, T, V, D)
    kt = _to_layout(k, plan.gather).reshape(B, H, T, V, D)
    vt = _to_layout(v, plan.gather).reshape(B, H, T, V, Dv)
    idx = plan.kv_tiles                                          # [Hc, T, M]
    if plan.Hc == 1:
        kg = kt[:, :, idx[0]].reshape(B, H, T, M * V, D)         # gather key tiles
        vg = vt[:, :, idx[0]].reshape(B, H, T, M * V, Dv)
    else:
        hh = torch.arange(H, device=device)[:, None, None]
        kg = kt[:, hh, idx].reshape(B, H, T, M * V, D)
        vg = vt[:, hh, idx].reshape(B, H, T, M * V, Dv)
    _, score_mod = program.mods(device)
    heads = torch.arange(H, device=device).reshape(1, H, 1, 1, 1)
    allowed = plan.allowed[None]                                 # [1, Hc, T, V, M*V]
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, B * H * V * M * V))
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = torch.matmul(qt[:, :, t0:t1].to(dt), kg[:, :, t0:t1].to(dt).transpose(-1, -2)) * scale
        if score_mod is not None:
            qp = plan.q_pos[t0:t1][None, None]                   # [1, 1, t, V, 1]
            kp = plan.k_pos[:, t0:t1] if plan.Hc > 1 else plan.k_pos[0, t0:t1]
            kp = kp[None, :, :, :, :] if plan.Hc > 1 else kp[None, None]
            s = score_mod(s, 0, heads, qp, kp)
        ok = allowed[:, :, t0:t1]
        s = s.masked_fill(~ok, float("-inf"))
        m = s.amax(-1, keepdim=True)
        if sink is not None:
            m = torch.maximum(m, sink.to(dt).reshape(1, H, 1, 1, 1))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        e = torch.exp(s - m)
        denom = e.sum(-1, keepdim=True)
        if sink is not None:
            denom = denom + torch.exp(sink.to(dt).reshape(1, H, 1, 1, 1) - m)
        p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
        if dropout_p is not None:
            ps = dropout_p.to(device=device, dtype=dt).reshape(1, H, 1, 1, 1)
            if keep is not None:
                kp_ = keep[:, :, t0:t1]
            else:
                u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
                kp_ = (u >= ps.cpu().double()).to(device)
            p = p * kp_ / (1 - ps)
        outs.append(torch.matmul(p, vg[:, :, t0:t1].to(dt)))
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    out = out.reshape(B, H, T * V, Dv)
    if plan.scatter is not None:
        out = out.index_select(2, plan.scatter)
    elif out.shape[2] != N:
        out = out[:, :, :N]
    return out.to(q.dtype)
