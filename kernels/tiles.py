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
from typing import Dict, Optional

import numpy as np
import torch

from maskdsl._caching import LRU, outside_inference_mode

__all__ = ["TilePlan", "run_tiles", "plan_for", "tiles_program", "rows_attending", "TILE_SIZES"]

TILE_SIZES = (128, 64)           # tokens per tile; see tiles_program
_MAX_SCORE_ELEMENTS = 1 << 26    # explicit path: query tiles in chunks of at most this many scores


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
        from maskdsl._memory import check_allocation

        check_allocation(f"the tiles plan's token masks ({max(Hm, Hc)} x {T} x {V} x {M * V})",
                         3 * max(Hm, Hc) * T * V * M * V + 16 * Hc * T * M * V,
                         "use a smaller grid or a sparser pattern")
        # kv tile indices per (head, query tile) from the sparse classes, in key-tile order;
        # padded slots repeat tile 0 (and are masked)
        order = np.zeros((Hc, T, M), np.int64)
        valid_slot = np.zeros((Hc, T, M), bool)
        for c, cls in enumerate(heads_cls):
            rows = cls.rows()
            pos = np.arange(cls.nnz) - cls.indptr[rows]
            order[c, rows, pos] = cls.indices
            valid_slot[c, rows, pos] = True
        idx = torch.from_numpy(order).to(device)
        self.V, self.T, self.Hc = V, T, Hc
        # token-level mask over the candidate keys (the tiles' tokens): [Ha, T, V, M*V]
        pos = torch.arange(lay.n_padded, device=device).reshape(T, V)
        qpos = pos[:, :, None]                                  # [T, V, 1]
        kpos = pos[idx].reshape(Hc, T, 1, M * V)                # [Hc, T, 1, M*V]
        with torch.no_grad():
            allowed = _token_masks(program, device, Hm, Hc, qpos, kpos)
            slot_ok = torch.from_numpy(valid_slot).to(device)
            allowed &= slot_ok[:, :, None, :, None].expand(Hc, T, 1, M, V).reshape(Hc, T, 1, M * V)
            # keep only the keys some query of the tile attends to (per query tile, padded to the
            # longest list): an 8x8 query tile under a 13x13 neighborhood needs its 20x20 halo,
            # 400 keys, not the 576 of its nine key tiles
            used = allowed.any(2)                               # [Ha, T, M*V]
            if Hc == 1:
                used = used.any(0, keepdim=True)
            K = max(1, int(used.sum(-1).max()))
            K = min(M * V, -(-K // 16) * 16)                    # matmul-friendly width
            keep_cols = torch.argsort((~used).to(torch.int8), dim=-1, stable=True)[..., :K]
            col_ok = torch.gather(used, -1, keep_cols)          # [Hc, T, K]
            kpos = torch.gather(kpos.reshape(Hc, T, M * V), -1, keep_cols).reshape(Hc, T, 1, K)
            cols = keep_cols[:, :, None, :].expand(allowed.shape[0], T, V, K)
            allowed = torch.gather(allowed, -1, cols) & col_ok[:, :, None, :]
        self.K = K
        self.allowed = allowed                                  # bool [1 or H, T, V, K]
        # rows with no allowed key: give SDPA one dummy key (output zeroed afterwards), so no
        # backend ever sees an all -inf row (some return NaN there, and NaN gradients)
        self.row_any = allowed.any(-1, keepdim=True)            # [1 or H, T, V, 1]
        self.sdpa_mask = allowed.clone()
        self.sdpa_mask[..., :1] |= ~self.row_any
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

    @outside_inference_mode
    def float_mask(self, H: int, dtype):
        """SDPA's mask for H heads, [1, H*T, V, K], built once: additive (0 / -inf) in ``dtype``
        (SDPA would convert a bool mask on every call), or the bool *disallowed* entries for
        ``dtype="blocked"`` (laid out like a score bias)."""
        key = (H, dtype)
        mask = self._float_masks.get(key)
        if mask is None:
            allowed = self.sdpa_mask.expand(H, self.T, self.V, self.K).reshape(
                1, H * self.T, self.V, self.K)
            if dtype == "blocked":
                mask = ~allowed
            else:
                mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
                mask.masked_fill_(~allowed, float("-inf"))
            self._float_masks[key] = mask
        return mask

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
    from maskdsl.codegen.ir import HeadsN, contains
    from maskdsl.codegen.source import head_mask_mod

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
    from maskdsl.codegen.program import Program

    big = Program(pattern, score, shape, heads, block=TILE_SIZES[0])
    small = Program(pattern, score, shape, heads, block=TILE_SIZES[1])
    return small if _keys_per_query(small) < 0.75 * _keys_per_query(big) else big


def _plan_bytes(plan) -> int:
    """What a plan holds (its token masks, indices, cached SDPA masks and gather buffers)."""
    total = sum(v.nbytes for v in vars(plan).values() if isinstance(v, torch.Tensor))
    total += sum(m.nbytes for m in plan._float_masks.values())
    total += sum(b.nbytes for bufs in plan._buffers.values() for b in bufs[:3])
    return total


PLAN_CACHE_BYTES = 512 << 20    # plans kept, least recently used out (each is O(N x keys))
_PLANS = LRU(32, max_bytes=PLAN_CACHE_BYTES, weigh=_plan_bytes)


def plan_for(program, device) -> TilePlan:
    """The program's plan on ``device`` (one per recipe and device, in a bounded cache)."""
    device = torch.device(device)
    key = (program.recipe.key, device)
    plan = _PLANS.get(key)
    if plan is None:
        from maskdsl._memory import guarded

        with guarded(f"the tiles plan for {program.pattern!r} on {tuple(program.shape)}"):
            plan = _PLANS.put(key, TilePlan(program, device))
    return plan


def score_tensors(score) -> tuple:
    """Every tensor-valued score parameter (learnable ones need the autograd path)."""
    from maskdsl._score import score_terms

    return tuple(v for term in score_terms(score) for v in vars(term).values()
                 if isinstance(v, torch.Tensor))


def _with_zero_row(x):
    return torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])], 2)


def run_tiles(program, q, k, v, scale: float, *, sink=None, dropout_p=None,
              generator: Optional[torch.Generator] = None, keep: Optional[torch.Tensor] = None):
    """Block-sparse attention on [B, H, N, D] inputs in the user's token order.

    Args:
        sink: per-head sink logits, a tensor [H] (or None).
        dropout_p: per-head dropout probabilities, a float tensor [H] (or None: no dropout).
        generator: where dropout draws from (CPU generator; the keep mask is moved to q's device).
        keep: an explicit keep mask in the gathered layout [B, H, T, V, K] (tests use this).
    Returns:
        [B, H, N, Dv]
    """

    device = q.device
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    if B == 0:   # nothing to attend; keep the graph so backward gives zero-size gradients
        return v.new_zeros(0, H, N, Dv) + (q.sum() + k.sum() + v.sum()).to(v.dtype)
    plan = plan_for(program, device)
    V, T, K, Hc = plan.V, plan.T, plan.K, plan.Hc
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    # lay out queries; gather every query tile's key/value tiles straight from user order
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v) + score_tensors(program.score)
        + ((sink,) if sink is not None else ()))
    native = q.dtype == dt and k.dtype == dt and v.dtype == dt
    if Hc == 1 and not grad:
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
                           keep, dt)
    if native:
        qz, kz, vz, qi, kvi = q, k, v, plan.q_index0, plan.kv_index0
    else:
        qz, kz, vz = (_with_zero_row(x).to(dt) for x in (q, k, v))
        qi, kvi = plan.q_index, plan.kv_index
    qt = qz.index_select(2, qi).reshape(B, H, T, V, D)
    if Hc == 1:
        kg, vg = kz.index_select(2, kvi[0]), vz.index_select(2, kvi[0])
    else:
        hh = torch.arange(H, device=device)[:, None]
        kg, vg = kz[:, hh, kvi], vz[:, hh, kvi]
    if native and plan.pad_mask is not None:   # padding slots read token 0: zero them
        pad = plan.pad_mask[None, :, :, None]
        kg, vg = kg.masked_fill(pad, 0), vg.masked_fill(pad, 0)
    kg, vg = kg.reshape(B, H, T, K, D), vg.reshape(B, H, T, K, Dv)
    return _attend(program, plan, qt, kg, vg, q, scale, sink, dropout_p, generator, keep, dt)


def _attend(program, plan, qt, kg, vg, q, scale, sink, dropout_p, generator, keep, dt):
    """Attention of the laid-out queries against their gathered keys, back in user order."""
    from maskdsl._score import Softcap, score_terms

    device = q.device
    B, H, N, _ = q.shape
    Dv = vg.shape[-1]
    V, T, K, Hc = plan.V, plan.T, plan.K, plan.Hc
    _, score_mod = program.mods(device)
    bias = None
    if score_mod is not None:
        heads = torch.arange(H, device=device).reshape(1, H, 1, 1, 1)
        kp = plan.k_pos[:, None] if Hc > 1 else plan.k_pos[0][None, None]
        kp = kp.reshape(1, Hc, T, 1, K) if Hc > 1 else kp
        zero = torch.zeros((), dtype=dt, device=device)
        # a 0-d score loses type promotion to float32 tables: cast (SDPA misreads a mask whose
        # dtype differs from q's)
        bias = score_mod(zero, 0, heads, plan.q_pos[None, None], kp).to(dt)   # [1, H, T, V, K]
    nonlinear = any(isinstance(t, Softcap) for t in score_terms(program.score))
    if sink is None and dropout_p is None and not nonlinear:
        out = _fused(qt, kg, vg, plan, bias, scale, B, H)
    else:
        out = _explicit(qt, kg, vg, plan, score_mod, scale, sink, dropout_p, generator, keep,
                        B, H, dt)
    out = out.reshape(B, H, T * V, Dv)
    if plan.scatter is not None:
        out = out.index_select(2, plan.scatter)
    elif out.shape[2] != N:
        out = out[:, :, :N]
    return out.to(q.dtype)


def _fused(qt, kg, vg, plan, bias, scale, B, H):
    """One fused SDPA call over all query tiles: [B, H*T, V, D] x [B, H*T, K, D]."""
    import torch.nn.functional as F

    T, V, MV = plan.T, plan.V, plan.K
    if bias is None:
        mask = plan.float_mask(H, qt.dtype)
    else:
        bias = bias.expand(1, H, T, V, MV).reshape(1, H * T, V, MV)
        mask = bias.masked_fill(plan.float_mask(H, "blocked"), float("-inf"))
    out = F.scaled_dot_product_attention(
        qt.reshape(B, H * T, V, qt.shape[-1]), kg.reshape(B, H * T, MV, kg.shape[-1]),
        vg.reshape(B, H * T, MV, vg.shape[-1]), attn_mask=mask, scale=scale)
    if plan.every_row_has_keys:
        return out
    row_any = plan.row_any.expand(H, T, V, 1).reshape(1, H * T, V, 1)
    return torch.where(row_any, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _explicit(qt, kg, vg, plan, score_mod, scale, sink, dropout_p, generator, keep, B, H, dt):
    """The softmax written out: softcap, sink logits and dropout (chunked over query tiles)."""
    device = qt.device
    T, V, K, Hc = plan.T, plan.V, plan.K, plan.Hc
    heads = torch.arange(H, device=device).reshape(1, H, 1, 1, 1)
    allowed = plan.allowed[None]                                 # [1, Hc, T, V, K]
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, B * H * V * K))
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        s = torch.matmul(qt[:, :, t0:t1], kg[:, :, t0:t1].transpose(-1, -2)) * scale
        if score_mod is not None:
            qp = plan.q_pos[t0:t1][None, None]                   # [1, 1, t, V, 1]
            kp = plan.k_pos[:, t0:t1][None] if Hc > 1 else plan.k_pos[0, t0:t1][None, None]
            s = score_mod(s, 0, heads, qp, kp)
        s = s.masked_fill(~allowed[:, :, t0:t1], float("-inf"))
        m = s.amax(-1, keepdim=True)
        if sink is not None:
            m = torch.maximum(m, sink.to(dt).reshape(1, H, 1, 1, 1))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        e = torch.exp(s - m)
        denom = e.sum(-1, keepdim=True)
        if sink is not None:
            denom = denom + torch.exp(sink.to(dt).reshape(1, H, 1, 1, 1) - m)
        # a row with no key divides 0 by 1; a NaN (sink logit) stays NaN, never becomes 1
        p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
        if dropout_p is not None:
            ps = dropout_p.to(device=device, dtype=dt).reshape(1, H, 1, 1, 1)
            if keep is not None:
                kp_ = keep[:, :, t0:t1]
            else:
                u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
                kp_ = (u >= ps.cpu().double()).to(device)
            p = p * kp_ / (1 - ps)
        outs.append(torch.matmul(p, vg[:, :, t0:t1]))
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


def rows_attending(program, bad: torch.Tensor) -> torch.Tensor:
    """bool [B, H, N]: the queries that attend at least one key flagged in ``bad`` [B, H, N]
    (user token order), read off the plan's token masks: O(B x H x N x keys per query).
    ``_isolate`` uses it to poison exactly the rows that attend a non-finite key."""
    B, H, N = bad.shape
    plan = plan_for(program, bad.device)
    T, V, K = plan.T, plan.V, plan.K
    ext = torch.cat([bad, bad.new_zeros(B, H, 1)], 2)          # token N: the padding slot
    if plan.Hc == 1:
        seen = ext.index_select(2, plan.kv_index[0])
    else:
        seen = ext[:, torch.arange(H, device=bad.device)[:, None], plan.kv_index]
    hit = (plan.allowed[None] & seen.reshape(B, H, T, 1, K)).any(-1).reshape(B, H, T * V)
    if plan.scatter is not None:
        return hit.index_select(2, plan.scatter)
    return hit[:, :, :N]


# ---------------------------------------------------------------------- the backend protocol

def refusal(spec, device):
    return None                    # any pattern, any score, any device


def preference(spec, device):
    return None


def strength(spec, device) -> str:
    if device.type == "cuda":
        return "block-sparse PyTorch over the analytic tiles runs any pattern and score, with a backward"
    return (f"on {device.type}, block-sparse PyTorch over the analytic tiles is the fastest path "
            f"and the only one with a backward (Flex is inference-only there)")


def call_refusal(spec, q, k, v):
    return None


def prepare(spec):
    return tiles_program(spec.pattern, spec.score, spec.shape, spec.heads)


def run(state, q, k, v, call):
    return run_tiles(state, q, k, v, call.scale, sink=call.sink, dropout_p=call.dropout_p,
                     generator=call.generator)
