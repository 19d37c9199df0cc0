"""The rectangle path: attention over a rectangle of the global (query, key) problem, dense
stripes, and the pattern's key reach (ARCHITECTURE.md, "Sub-ranges and the KV cache"). The
tiles backend runs sub-range requests (``q_range``/``kv_range``) here; the runtime's KV cache,
extra-token stripes and context parallelism call it with the keys they hold.

``rect_attention``: queries at global flat positions ``q_pos`` against keys at global flat
positions ``k_pos`` (any order, -1 for an empty slot), the pattern and score terms evaluated at
those global coordinates through the row-major program's generated ``mask_mod``/``score_mod``,
the softmax written out (sink logits, softcap, lse), a chunk of query rows at a time so no step
holds more than ``MAX_SCORES`` logits. Memory and work are O(queries x keys given): the caller
hands it the keys that matter (the KV cache: sinks plus the lookback window). GQA reads each
query head's key/value head without an expanded copy (the heads of a group are folded into the
query rows of one matmul).

``key_reach``: for every token j, the last query that attends it, and for every query i the
last key it attends, computed from the row-major program's tile classes: a FULL tile pair
needs no evaluation (every query of the tile sees every key of the other), a PARTIAL pair is
evaluated token by token. O(tiles + partial pairs x tile^2), never N x N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import numpy as np

from maskdsl.codegen.layout_search import row_major as layout
from maskdsl.codegen.program import BLOCK_SIZE, Program
from maskdsl.codegen.recipe import varies_per_head
from maskdsl.codegen.tileclasses import FULL
from maskdsl.dsl.score import Softcap, per_head_tensor, score_terms
from .isolate import all_finite, poison, poison_lse, sanitize
from .softmax import FlashLSE, add_sink, flash, softmax

__all__ = ["plain_program", "rect_attention", "tiled_rect", "run_range", "dense_stripe",
           "softcap_values", "key_reach", "pair_masks", "head_classes", "bad_rows", "Reach",
           "MAX_SCORES"]

MAX_SCORES = 1 << 24          # logits per step (query rows are chunked to stay under it)


def plain_program(pattern, score, shape, heads) -> Program:
    """The Program of a pattern and score in row-major token order, positions equal to flat
    token indices (padding after the last token): what the rectangle path evaluates."""
    return Program(pattern, score, shape, heads, tile=layout(shape, BLOCK_SIZE))


def softcap_values(score, heads: int, device):
    """Per-head softcap values [H] (None without a softcap term)."""
    for t in score_terms(score):
        if isinstance(t, Softcap):
            return per_head_tensor(t.cap, t, "cap", heads, device)
    return None


def bad_rows(x) -> Optional[torch.Tensor]:
    """bool [B, H, n]: rows of x holding a NaN or inf; None when all are finite (one sum)."""
    if x.numel() == 0:
        return None
    if all_finite(x):
        return None
    bad = ~torch.isfinite(x).all(-1)
    return bad if bool(bad.any()) else None


def head_classes(program, heads=None) -> list:
    """The row-major program's tile classes: one when every head shares them, else those of
    each head of ``heads`` (default: all, list index = head)."""
    r = program.recipe
    if r.classes.shared:
        return [r.classes.distinct[0]]
    return [r.classes.head(h) for h in (range(program.heads) if heads is None else heads)]


def rect_attention(program, q, k, v, q_pos, k_pos, scale: float, *, sink=None,
                   return_lse: bool = False, kv_bad=None, cap=None, head_ids=None):
    """Attention of q [B, H, nq, D] at global positions ``q_pos`` [nq] against k, v [B, H_kv,
    nk, D] at ``k_pos`` [nk] (int64; -1 marks an empty slot), on finite or non-finite inputs
    (ARCHITECTURE.md, "Non-finite inputs"). ``kv_bad``: the key rows known to hold a NaN or
    inf, bool [B, H_kv, nk], or False when all are known finite (the KV cache tracks them as
    it stores; default None: found here).
    ``program=None``: every pair is allowed and no score term applies but ``cap`` (softcap
    values [H]) and ``sink`` (the dense stripes of extra tokens; positions are then ignored).
    ``head_ids``: int64 [H], the program's head index of each of q's heads (default 0..H-1;
    context parallelism's Ulysses strategy runs a slice of the heads): per-head patterns and
    score terms are evaluated at those heads; ``sink`` and ``cap`` are given for q's heads.
    Returns out [B, H, nq, Dv] (and lse [B, H, nq])."""
    B, H, nq, D = q.shape
    Hk, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    g = H // Hk
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    if program is None:
        mask_mod = score_mod = None
        q_pos = torch.zeros(nq, dtype=torch.int64, device=dev)
        k_pos = torch.zeros(nk, dtype=torch.int64, device=dev)
    else:
        mask_mod, score_mod = program.mods(dev)
    q_pos, k_pos = q_pos.to(dev), k_pos.to(dev)
    if nk == 0:                 # no key at all: one empty slot (zeros out, -inf or sink lse)
        k = torch.cat([k, k.new_zeros(B, Hk, 1, D)], 2)     # keeps the graph to k and v
        v = torch.cat([v, v.new_zeros(B, Hk, 1, Dv)], 2)
        k_pos = torch.full((1,), -1, dtype=torch.int64, device=dev)
        kv_bad = False
        nk = 1
    valid_k = k_pos >= 0
    kp = torch.where(valid_k, k_pos, torch.zeros_like(k_pos))
    bad_q = bad_rows(q)
    if kv_bad is None:
        bk, bv = bad_rows(k), bad_rows(v)
        kv_bad = bk if bv is None else bv if bk is None else bk | bv
    bad_kv = kv_bad & valid_k if isinstance(kv_bad, torch.Tensor) else None
    if bad_kv is not None and not bool(bad_kv.any()):
        bad_kv = None
    any_bad = bad_q is not None or bad_kv is not None
    if any_bad:
        bad_q = bad_q if bad_q is not None else torch.zeros(B, H, nq, dtype=torch.bool, device=dev)
        bad_kv = bad_kv if bad_kv is not None else torch.zeros(B, Hk, nk, dtype=torch.bool,
                                                               device=dev)
        q, k, v = sanitize(q, bad_q), sanitize(k, bad_kv), sanitize(v, bad_kv)
    qd, kd, vd = q.to(dt), k.to(dt), v.to(dt)
    heads = (torch.arange(H, device=dev) if head_ids is None else
             head_ids.to(device=dev, dtype=torch.int64)).reshape(1, H, 1, 1)
    step = max(1, MAX_SCORES // max(1, B * H * max(1, nk)))
    # torch's CPU flash kernel with a float mask (and its differentiable lse) when no score
    # term but a sink logit applies and the inputs are finite: one fused pass per chunk
    fast = (dev.type == "cpu" and program is not None and score_mod is None and cap is None
            and not any_bad and D == Dv and q.dtype in (torch.float32, torch.float64))
    kf = vf = None
    sk = sink.to(device=dev, dtype=dt).reshape(1, H, 1, 1) if sink is not None else None
    outs, lses, hits = [], [], []
    for a in range(0, nq, step):
        b = min(nq, a + step)
        c = b - a
        qp = q_pos[a:b].reshape(1, 1, c, 1)
        allowed = valid_k.reshape(1, 1, 1, nk)
        if mask_mod is not None:
            allowed = mask_mod(0, heads, qp, kp.reshape(1, 1, 1, nk)) & allowed
        if fast and not return_lse and sink is None:
            # no lse wanted: SDPA itself, its GQA without copying k and v, and no mask at all
            # when every key is allowed (a decode step over a window's ring); rows with no
            # key go the flash way below (its stand-in key)
            every = bool(allowed.all())
            if every or bool(allowed.any(-1).all()):
                outs.append(F.scaled_dot_product_attention(
                    qd[:, :, a:b], kd, vd, attn_mask=None if every else allowed, scale=scale,
                    enable_gqa=g > 1))
                continue
        if fast:
            if kf is None:
                kf = kd.repeat_interleave(g, 1) if g > 1 else kd
                vf = vd.repeat_interleave(g, 1) if g > 1 else vd
            o, lse = flash(qd[:, :, a:b], kf, vf, allowed, scale, sink)
            outs.append(o)
            lses.append(lse)
            continue
        allowed = allowed.expand(1, H, c, nk)
        # GQA: the g query heads of a key/value head are one matmul's rows (no k/v copy)
        qg = qd[:, :, a:b].reshape(B, Hk, g * c, D)
        s = torch.matmul(qg, kd.transpose(-1, -2)).reshape(B, H, c, nk) * scale
        if score_mod is not None:
            s = score_mod(s, 0, heads, qp, kp.reshape(1, 1, 1, nk))
        if cap is not None:
            cp = cap.to(device=dev, dtype=dt).reshape(1, H, 1, 1)
            s = cp * torch.tanh(s / cp)
        p, lse = softmax(s, allowed, sk, return_lse)
        o = torch.matmul(p.reshape(B, Hk, g * c, nk), vd).reshape(B, H, c, Dv)
        outs.append(o)
        if return_lse:
            lses.append(lse)
        if any_bad:
            badk = bad_kv.repeat_interleave(g, 1) if g > 1 else bad_kv
            hits.append((allowed & badk[:, :, None, :]).any(-1))
    out = (torch.cat(outs, 2) if len(outs) > 1 else outs[0]) if outs else \
        qd.new_zeros(B, H, 0, Dv)
    lse = None
    if return_lse:
        lse = (torch.cat(lses, 2) if len(lses) > 1 else lses[0]) if lses else \
            qd.new_zeros(B, H, 0)
    out = out.to(q.dtype)
    if any_bad and nq:
        rows = bad_q | torch.cat(hits, 2)
        out = poison(out, q, rows)
        lse = poison_lse(lse, rows) if lse is not None else None
    return (out, lse) if return_lse else out


def _runs(pos: torch.Tensor):
    """(buffer offset, first, end) of each run of consecutive positions in ascending ``pos``."""
    if pos.numel() == 0:
        return []
    cut = torch.nonzero(pos[1:] != pos[:-1] + 1).reshape(-1) + 1
    starts = [0] + cut.tolist()
    ends = cut.tolist() + [pos.numel()]
    p = pos.tolist() if pos.numel() < 4096 else None
    first = (lambda i: p[i]) if p is not None else (lambda i: int(pos[i]))   # noqa: E731
    return [(a, first(a), first(a) + (b - a)) for a, b in zip(starts, ends)]


def tiled_rect(program, q, k, v, q_pos, k_pos, scale: float, *, sink=None, head_ids=None,
               rows: int = 2048):
    """(out, lse) of queries at ascending global grid positions ``q_pos`` [nq] against a key
    buffer k, v [B, H_kv, nk, *] whose rows sit at global positions ``k_pos`` [nk] (any order;
    positions outside the grid are skipped): per run of consecutive query positions, per chunk
    of ``rows`` query rows, ``rect_attention`` over the buffer's keys in the key tiles the
    row-major tile classes list for the chunk's query tiles (of the heads in ``head_ids``).
    A key the pattern attends but the buffer lacks is not seen: the caller hands in every key
    its queries need (sub-ranges: the range; context parallelism: its plan's halo)."""
    n, V = program.n, program.layout.block
    classes = head_classes(program, None if head_ids is None else head_ids.tolist())
    dev = q.device
    kp = k_pos.cpu()
    grid = (kp >= 0) & (kp < n)
    slot = torch.full((n,), -1, dtype=torch.int64)
    slot[kp[grid]] = torch.nonzero(grid).reshape(-1)
    lanes = np.arange(V)
    step = max(1, rows // V)
    outs, lses = [], []
    for off, p0, p1 in _runs(q_pos.cpu()):
        for a in range(p0 // V, -(-p1 // V), step):
            b = min(-(-p1 // V), a + step)
            tiles = np.unique(np.concatenate(
                [np.asarray(c.indices[c.indptr[a]:c.indptr[b]]) for c in classes]))
            tok = (tiles[:, None] * V + lanes).reshape(-1)
            tok = torch.from_numpy(tok[tok < n])
            loc = slot[tok]
            keep = loc >= 0
            loc, keys = loc[keep].to(dev), tok[keep].to(dev)
            r0, r1 = max(p0, a * V), min(p1, b * V)
            o, lse = rect_attention(program, q[:, :, off + r0 - p0:off + r1 - p0],
                                    k.index_select(2, loc), v.index_select(2, loc),
                                    torch.arange(r0, r1, device=dev), keys, scale, sink=sink,
                                    return_lse=True, head_ids=head_ids)
            outs.append(o)
            lses.append(lse)
    if not outs:
        B, H = q.shape[:2]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros(B, H, 0, v.shape[-1]), q.new_zeros(B, H, 0, dtype=dt)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def run_range(program, extent, q, k, v, call):
    """A sub-range request (the tiles backend's ``run`` for ``spec.extent``): the queries of
    ``extent.q`` against the keys of ``extent.kv`` at their global positions, each chunk of query
    tiles against the key tiles its row-major tile classes list, cut to the key range. Non-finite
    rows are isolated here (``rect_attention``), not by the caller."""
    n = program.n
    q0, q1 = extent.q if extent.q is not None else (0, n)
    k0, k1 = extent.kv if extent.kv is not None else (0, n)
    out, lse = tiled_rect(program, q, k, v, torch.arange(q0, q1), torch.arange(k0, k1),
                          call.scale, sink=call.sink)
    return (out, lse) if call.return_lse else out


def dense_stripe(q, k, v, scale, cap, sink):
    """(out, lse) of q against every key of k, v (a dense stripe: extra tokens): torch's CPU
    flash kernel with its differentiable lse when it can (no softcap, equal head dims, finite
    inputs; the g query heads of a kv head folded into its rows; a sink logit merged in as a
    part with no value), else ``rect_attention``, which also isolates non-finite rows."""
    B, H, nq, D = q.shape
    Hk, nk = k.shape[1], k.shape[2]
    fast = (cap is None and q.device.type == "cpu" and D == v.shape[-1] and nq and nk
            and q.dtype in (torch.float32, torch.float64)
            and all(bad_rows(x) is None for x in (q, k, v)))
    if not fast:
        return rect_attention(None, q, k, v, None, None, scale, cap=cap, sink=sink,
                              return_lse=True)
    g = H // Hk
    out, lse = FlashLSE.apply(q.reshape(B, Hk, g * nq, D), k, v, None, scale)
    out, lse = out.reshape(B, H, nq, D), lse.reshape(B, H, nq)
    if sink is not None:
        out, lse = add_sink(out, lse, sink)
    return out, lse


@dataclass(frozen=True)
class Reach:
    """Per token of the grid (int64 [N], max over heads): ``last_query[j]``, the last query
    that attends key j (-1: none), and ``last_key[i]``, the last key query i attends (-1:
    none)."""

    last_query: torch.Tensor
    last_key: torch.Tensor


def pair_masks(program, mask_mod, pr, pc, head=None):
    """For tile pairs (query tile ``pr[i]``, key tile ``pc[i]``) of the row-major program, in
    chunks of at most 2^24 evaluations: (first pair index, qpos [P, V, 1], kpos [P, 1, V], ok
    [P, V, V]), ok = the pattern allows the pair on some head (``head``: that head only), False
    past the last token. A pattern whose heads all mask alike is evaluated on head 0 only.
    Shared by ``key_reach`` and context parallelism's halo plan."""
    V, n, H = program.layout.block, program.n, program.heads
    if head is None and not varies_per_head(program.pattern):
        head = 0
    heads = torch.arange(H).reshape(H, 1, 1, 1) if head is None else \
        torch.tensor([head]).reshape(1, 1, 1, 1)
    Hh = heads.numel()
    lanes = torch.arange(V)
    last = torch.tensor(n - 1)
    step = max(1, (1 << 24) // max(1, Hh * V * V))
    for a in range(0, len(pr), step):
        qt = torch.from_numpy(pr[a:a + step])
        kt = torch.from_numpy(pc[a:a + step])
        qpos = (qt[:, None] * V + lanes)[:, :, None]                 # [P, V, 1]
        kpos = (kt[:, None] * V + lanes)[:, None, :]                 # [P, 1, V]
        real = (qpos < n) & (kpos < n)
        ok = mask_mod(0, heads, torch.minimum(qpos, last)[None], torch.minimum(kpos, last)[None])
        yield a, qpos, kpos, ok.expand(Hh, *real.shape).any(0) & real


def key_reach(program) -> Reach:
    """The pattern's reach, from the row-major program's tile classes (see the module
    docstring). CPU tensors."""
    lay = program.layout
    V, n = lay.block, program.n
    classes = head_classes(program)
    last_q = torch.full((n,), -1, dtype=torch.int64)
    last_k = torch.full((n,), -1, dtype=torch.int64)
    tile_last = lambda t: np.minimum(n - 1, t * V + V - 1)          # noqa: E731
    mask_mod, _ = program.mods("cpu")
    pairs = []
    for ci, cls in enumerate(classes):
        rows, cols, kind = cls.rows(), np.asarray(cls.indices), np.asarray(cls.cls)
        full = kind == FULL
        if full.any():
            fr, fc = rows[full], cols[full]
            # queries of a FULL pair's query tile reach its last key; its keys are reached by
            # the tile's last query
            qmax = np.full(lay.n_tiles, -1, np.int64)
            np.maximum.at(qmax, fr, tile_last(fc))
            kmax = np.full(lay.n_tiles, -1, np.int64)
            np.maximum.at(kmax, fc, tile_last(fr))
            per_tok = lambda a: torch.from_numpy(np.repeat(a, V)[:n])   # noqa: E731
            last_k = torch.maximum(last_k, per_tok(qmax))
            last_q = torch.maximum(last_q, per_tok(kmax))
        part = ~full
        pairs.append((ci, rows[part], cols[part]))
    for ci, pr, pc in pairs:
        for _, qpos, kpos, ok in pair_masks(program, mask_mod, pr, pc,
                                            None if len(classes) == 1 else ci):
            kmax = torch.where(ok, kpos.expand_as(ok), -1).amax(-1)      # per query row
            qmax = torch.where(ok, qpos.expand_as(ok), -1).amax(-2)      # per key column
            qi = qpos[:, :, 0].reshape(-1)
            ki = kpos[:, 0, :].reshape(-1)
            sel_q, sel_k = qi < n, ki < n
            last_k.scatter_reduce_(0, qi[sel_q], kmax.reshape(-1)[sel_q], "amax")
            last_q.scatter_reduce_(0, ki[sel_k], qmax.reshape(-1)[sel_k], "amax")
    return Reach(last_q, last_k)
