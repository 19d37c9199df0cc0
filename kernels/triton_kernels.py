"""The Triton kernels: fused locality attention with in-kernel key ranges, no BlockMask.

Read it top to bottom like Triton's fused-attention tutorial:

1. ``_key_range``: for query coordinates on one dim, the in-group index range ``[jlo, jhi]`` of
   the keys they may see (NATTEN's window with kernel/stride/dilation/causal, window offsets,
   causal, block with its shift). Everything the kernel knows about the pattern is a table of
   ``3 x len(FIELDS)`` ints per head, read off the IR (``triton_params``), so a million-token
   sequence carries no mask metadata.
2. ``_attn_fwd``: one program per query tile and (batch, head). A query tile is a box of
   ``TM[0] x TM[1] x TM[2]`` queries of one residue group per dim (dilation: the tile's queries
   are ``d`` apart, and so are its keys: strided loads, no token permutation). The union of its
   queries' key ranges is a box; the program walks that box in ``TN`` key tiles with an online
   softmax (fp32 accumulators, exp2). Like the tutorial, one stage loop, ``_attn_fwd_inner``, is
   called once per stage: stage 1 the sink tokens (``| sink(n)``, the flat keys ``[0, n)``),
   stage 2 the box (which skips them). In stage 2 a tile fully inside every query's range runs
   ``_fwd_tile(MASKED=False)`` (the mask compiled out, Flex's full blocks), the others
   ``MASKED=True``. Score terms (distance_decay, alibi, relative_bias, softcap) are evaluated from
   coordinates; ``sink_logit`` starts the running max and sum at the sink's logit; ``dropout``
   draws a Philox keep bit per (batch, head, query, key) from one seed, so forward and backward
   drop the same entries.
3. ``_attn_bwd_dq``: the forward's walk again, recomputing probabilities from the saved
   log-sum-exp; accumulates dq (and each row's share of learnable rates, slopes and caps).
4. ``_attn_bwd_dkdv``: one program per key tile. Both ends of a query's key range are
   non-decreasing in the query coordinate, so the queries that see a key tile form a box found
   by binary search per dim; ``_attn_bwd_dkdv_inner`` walks it (stage 2) and accumulates dk,
   dv: no atomics, so dk, dv and dq are deterministic. ``_attn_bwd_dkdv_sink`` runs the same
   loop's stage 1: the sink keys against every query.
5. ``_attn_bwd_relb``: the relative_bias table gradient without atomics. A program owns a row of
   partial sums and a fixed set of query tiles; per tile it walks the table entries the tile
   reaches and, per entry, the key offsets that clip to it (one key per query per offset: a
   row-wise dot product); sink keys are added per chunk of entries. torch sums the rows.

Every kernel starts with ``_prologue``: program ids -> batch and head, the program's tile of the
launch grid (its lanes' coordinates) and the row views of q, k, v. A view is ``(pointer, offset
of the (batch, head), row stride, column stride, columns)``; ``_load_rows`` and ``_store_rows``
read and write a tile's rows through it. Kernel arguments come in groups: strides as tuples
(``q.stride()``), the grid ``S`` and tile counts ``NT`` as tuples, the score terms' tensors as one
``ScoreParams``, the constexpr score switches as one ``ScoreFlags``, tile shapes as ``TM``, ``TN``.

``sink_logit``'s gradient, ``-sum_q p_sink(q) * rowsum(dO * O)(q)``, is a torch reduction of
saved quantities. No kernel uses atomics, so every gradient is deterministic.

GQA: K and V may carry ``H / KVG`` heads; query head ``h`` reads key/value head ``h // KVG``
in every kernel (no copy of k, v). ``_attn_bwd_dkdv*`` still write dk, dv per query head; the
host sums each group's ``KVG`` rows.

On CPU this runs only under ``TRITON_INTERPRET=1`` (tests, small shapes). The host side (plan,
autograd, launches) is ``triton_attn``; tools that are not kernels (``keep_mask``,
``compile_ahead``, the key-range probe) are ``triton_tools``. The launch configuration
(``block_tokens``, ``launch_options``) is here, so that both import it from the kernels' module.
"""
from __future__ import annotations

from collections import namedtuple

import torch
import triton
import triton.language as tl

from .triton_params import FIELDS, NO_LIMIT  # noqa: F401  (NO_LIMIT: the table's "no offset limit")

# ---------------------------------------------------------------------- launch configuration

def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def block_tokens(dtype, head_dim: int, interpret: bool) -> int:
    """Queries (and keys) per tile: 64; 32 for fp32 with head dims over 128 (64 would need
    260-290 KB of shared memory in the backward); 16 in the interpreter (tests)."""
    if interpret:
        return 16
    return 32 if dtype == torch.float32 and head_dim > 128 else 64


def launch_options(dtype, head_dim: int) -> dict:
    """Pipelining depth: fp32 (and head dims over 128) with 3 stages would need more than
    Hopper's 227 KB of shared memory per block (the fp32 forward: 240 KB at 3 stages, 80 KB at
    1, compiled for sm_90); fp16/bf16 keep Triton's default."""
    return {"num_stages": 1} if dtype == torch.float32 or head_dim > 128 else {}


#: the score terms' tensors, one kernel argument: float32 [H] rate, slopes, cap and dropout
#: probabilities, the relative_bias table, its entries per head (0: shared) and radius (3 ints)
ScoreParams = namedtuple("ScoreParams", "rate slope cap dropp relb relb_hs radius")
#: which score terms are compiled in (one constexpr argument); DEC: 1 on the dims
#: distance_decay measures, METRIC: 0 euclidean, 1 manhattan, 2 chebyshev
ScoreFlags = namedtuple("ScoreFlags", "HAS_DECAY METRIC DEC HAS_ALIBI HAS_RELB HAS_CAP HAS_DROP")


def kernel_constexprs(c: dict) -> dict:
    """The kernels' shared constexpr arguments from ``triton_attn``'s flat constants: tile
    shapes TM, TN, the padded head dim BD, IEEE (fp32 dots) and the score flags F."""
    return dict(TM=(c["TM0"], c["TM1"], c["TM2"]), TN=(c["TN0"], c["TN1"], c["TN2"]),
                BD=c["BD"], IEEE=c["IEEE"],
                F=ScoreFlags(c["HAS_DECAY"], c["METRIC"], (c["DEC0"], c["DEC1"], c["DEC2"]),
                             c["HAS_ALIBI"], c["HAS_RELB"], c["HAS_CAP"], c["HAS_DROP"]))


# ---------------------------------------------------------------------- constants
LOG2E = tl.constexpr(1.4426950408889634)   # natural log -> base 2 (the softmax runs in exp2)
NO_KEY = tl.constexpr(1 << 30)             # above any in-group index: the neutral element of
                                           # the min/max reductions over a tile's key ranges
# the per-(head, dim) table: NF fields per row, at the offsets of triton_params.FIELDS
NF = tl.constexpr(len(FIELDS))
F_KERNEL = tl.constexpr(FIELDS.index("kernel"))
F_STRIDE = tl.constexpr(FIELDS.index("stride"))
F_DILATION = tl.constexpr(FIELDS.index("dilation"))
F_CAUSAL = tl.constexpr(FIELDS.index("causal"))
F_LEFT = tl.constexpr(FIELDS.index("left"))
F_RIGHT = tl.constexpr(FIELDS.index("right"))
F_BLOCK = tl.constexpr(FIELDS.index("block"))
F_SHIFT = tl.constexpr(FIELDS.index("shift"))


# ------------------------------------------------------------------ pattern, per dim

@triton.jit
def _dim_params(P, h, dim: tl.constexpr):
    """One (head, dim) row of the table: the fields of ``triton_params.FIELDS``, as a tuple."""
    base = P + (h * 3 + dim) * NF
    return (tl.load(base + F_KERNEL), tl.load(base + F_STRIDE), tl.load(base + F_DILATION),
            tl.load(base + F_CAUSAL), tl.load(base + F_LEFT), tl.load(base + F_RIGHT),
            tl.load(base + F_BLOCK), tl.load(base + F_SHIFT))

@triton.jit
def _key_range(x, S, row):
    """In-group key indices [jlo, jhi] (inclusive) that queries at coordinate x may see (row:
    the dim's table row, ``_dim_params``)."""
    K, s, d, caus, left, right, blk, sh = row
    g = x % d
    i = x // d
    Lg = (S - g + d - 1) // d                      # keys in x's residue group
    # NATTEN's window on in-group indices (shifted at the borders, K keys)
    Kc = tl.maximum(K, 1)
    lead = tl.minimum((i // s) * s + s // 2, Lg - 1)
    start = tl.minimum(tl.maximum(lead - Kc // 2, 0), Lg - Kc)
    lead_c = tl.minimum((i // s) * s + s - 1, Lg - 1)
    start_c = tl.maximum(lead_c - Kc + 1, 0)
    nlo = tl.where(caus != 0, start_c, start)
    nhi = tl.where(caus != 0, i, start + Kc - 1)
    nlo = tl.where(K > 0, nlo, 0)
    nhi = tl.where(K > 0, nhi, Lg - 1)
    # raw-coordinate limits: window offsets (causal is right = 0) and the block of x
    lo = x - left
    hi = x + right
    # the block of x: block index (x + size - shift) // size (x + size - shift > 0: no
    # negative division), its first key index * size - size + shift
    bs = tl.maximum(blk, 1)
    b0 = ((x + bs - sh) // bs) * bs - bs + sh
    lo = tl.where(blk > 0, tl.maximum(lo, b0), lo)
    hi = tl.where(blk > 0, tl.minimum(hi, b0 + bs - 1), hi)
    # raw -> in-group; never divide a negative number (Triton's // truncates toward zero)
    jl = (tl.maximum(lo, g) - g + d - 1) // d
    jh = tl.where(hi < g, -1, (tl.maximum(hi, g) - g) // d)
    return tl.maximum(nlo, jl), tl.minimum(tl.minimum(nhi, jh), Lg - 1)

@triton.jit
def _unflat(f, S):
    """Flat token index -> coordinates on the 3-D grid S."""
    return f // (S[1] * S[2]), (f // S[2]) % S[1], f % S[2]

# ------------------------------------------------------------------ scores

@triton.jit
def _relb_index(dx, R):
    """Flat relative_bias entry of key-minus-query offsets dx (clipped to the radius R)."""
    i0 = tl.minimum(tl.maximum(dx[0], -R[0]), R[0]) + R[0]
    i1 = tl.minimum(tl.maximum(dx[1], -R[1]), R[1]) + R[1]
    i2 = tl.minimum(tl.maximum(dx[2], -R[2]), R[2]) + R[2]
    return (i0 * (2 * R[1] + 1) + i1) * (2 * R[2] + 1) + i2

@triton.jit
def _distance(qx, kx, F: tl.constexpr):
    """distance_decay's distance over its dims (F.DEC: 1 on the dims it uses)."""
    d0 = tl.abs(qx[0] - kx[0]).to(tl.float32) * F.DEC[0]
    d1 = tl.abs(qx[1] - kx[1]).to(tl.float32) * F.DEC[1]
    d2 = tl.abs(qx[2] - kx[2]).to(tl.float32) * F.DEC[2]
    if F.METRIC == 0:
        dist = tl.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
    elif F.METRIC == 1:
        dist = d0 + d1 + d2
    else:
        dist = tl.maximum(tl.maximum(d0, d1), d2)
    return dist

@triton.jit
def _score_terms(s, qx, qf, kx, kf, h, valid, sp, F: tl.constexpr):
    """Every score term on logits ``s``, elementwise (coordinates broadcast against s); also
    u = s/cap before the cap and t = tanh(u), which the softcap's derivatives need (0 without
    a softcap). sp: the ScoreParams, F: the ScoreFlags."""
    if F.HAS_DECAY:
        s = s - tl.load(sp.rate + h) * _distance(qx, kx, F)
    if F.HAS_ALIBI:
        s = s - tl.load(sp.slope + h) * tl.abs(qf - kf).to(tl.float32)
    if F.HAS_RELB:
        idx = _relb_index((kx[0] - qx[0], kx[1] - qx[1], kx[2] - qx[2]), sp.radius)
        s = s + tl.load(sp.relb + h * sp.relb_hs + idx, mask=valid, other=0.0).to(tl.float32)
    t = s * 0.0
    u = t
    if F.HAS_CAP:
        cap = tl.load(sp.cap + h)
        u = s / cap
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)            # tanh(u), overflow-safe
        s = cap * t
    return s, t, u

@triton.jit
def _scores(q, k, scale, qx, qf, kx, kf, h, valid, sp, IEEE: tl.constexpr, F: tl.constexpr):
    """Logits of a (query tile, key tile) pair with every score term, and t, u (above)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    return _score_terms(s, (qx[0][:, None], qx[1][:, None], qx[2][:, None]), qf[:, None],
                        (kx[0][None, :], kx[1][None, :], kx[2][None, :]), kf[None, :], h, valid,
                        sp, F)

@triton.jit
def _keep(seed, bh, N, qf, kf, pd):
    """Dropout keep bits: one Philox draw per (batch*head, query, key); qf and kf broadcast."""
    off = (bh.to(tl.int64) * N + qf.to(tl.int64)) * N + kf.to(tl.int64)
    return tl.rand(seed, off) >= pd

# ------------------------------------------------------------------ rows

@triton.jit
def _view(X, strides, b, h, cols):
    """Rows of one (batch, head) of a [B, H, N, C] tensor: (pointer, int64 offset of the
    (batch, head), row stride, column stride, columns)."""
    return (X, b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[1], strides[2],
            strides[3], cols)

@triton.jit
def _bh_rows(X, bh, N, C):
    """The view of one batch*head's rows of a contiguous [B, H, N, C] tensor (dO, dq, dk, dv)."""
    return (X, bh.to(tl.int64) * N * C, C, 1, C)

@triton.jit
def _load_rows(view, rows, valid, BC: tl.constexpr):
    """The [len(rows), BC] tile of a view's rows (zeros where invalid or past its columns)."""
    ptr, base, sn, sd, n = view
    cols = tl.arange(0, BC)
    return tl.load(ptr + base + rows[:, None] * sn + cols[None, :] * sd,
                   mask=valid[:, None] & (cols[None, :] < n), other=0.0)

@triton.jit
def _store_rows(view, rows, valid, x, BC: tl.constexpr):
    """Store x (cast to the view's dtype) into the rows, where valid and within the columns."""
    ptr, base, sn, sd, n = view
    cols = tl.arange(0, BC)
    tl.store(ptr + base + rows[:, None] * sn + cols[None, :] * sd, x.to(ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < n))

@triton.jit
def _query_rows(qview, DO, LSE, DELTA, bh, N, DV, qf, qvalid, BD: tl.constexpr,
                BDV: tl.constexpr):
    """What the backward reads per query: q, dO, the saved lse and delta = rowsum(dO * O)."""
    q = _load_rows(qview, qf, qvalid, BD)
    do = _load_rows(_bh_rows(DO, bh, N, DV), qf, qvalid, BDV)
    lse = tl.load(LSE + bh.to(tl.int64) * N + qf, mask=qvalid, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + qf, mask=qvalid, other=0.0)
    return q, do, lse, delta

# ------------------------------------------------------------------ tiles

@triton.jit
def _dilations(P, h):
    return (tl.load(P + (h * 3 + 0) * NF + F_DILATION), tl.load(P + (h * 3 + 1) * NF + F_DILATION),
            tl.load(P + (h * 3 + 2) * NF + F_DILATION))

@triton.jit
def _tile_lanes(pid, P, h, S, NT, T: tl.constexpr):
    """Query (or key) tile ``pid`` of the launch grid (NT tiles per dim): a box of T lanes of one
    residue group per dim; its coordinates, flat indices and valid lanes."""
    t0 = pid // (NT[1] * NT[2])
    t1 = (pid // NT[2]) % NT[1]
    t2 = pid % NT[2]
    lane = tl.arange(0, T[0] * T[1] * T[2])
    a0 = lane // (T[1] * T[2])
    a1 = (lane // T[2]) % T[1]
    a2 = lane % T[2]
    d0, d1, d2 = _dilations(P, h)
    tpg0 = ((S[0] + d0 - 1) // d0 + T[0] - 1) // T[0]       # tiles per residue group
    tpg1 = ((S[1] + d1 - 1) // d1 + T[1] - 1) // T[1]
    tpg2 = ((S[2] + d2 - 1) // d2 + T[2] - 1) // T[2]
    g0, g1, g2 = t0 // tpg0, t1 // tpg1, t2 // tpg2
    x0 = g0 + ((t0 % tpg0) * T[0] + a0) * d0
    x1 = g1 + ((t1 % tpg1) * T[1] + a1) * d1
    x2 = g2 + ((t2 % tpg2) * T[2] + a2) * d2
    # (group checks as vectors: the interpreter turns bool-vector & bool-scalar into int32)
    valid = ((x0 < S[0]) & (x1 < S[1]) & (x2 < S[2]) & (a0 * 0 + g0 < d0) & (a1 * 0 + g1 < d1)
             & (a2 * 0 + g2 < d2))
    return (x0, x1, x2), (x0 * S[1] + x1) * S[2] + x2, valid

@triton.jit
def _ranges(x, P, h, S):
    """Each query's in-group key range per dim: (jlo per dim), (jhi per dim)."""
    lo0, hi0 = _key_range(x[0], S[0], _dim_params(P, h, 0))
    lo1, hi1 = _key_range(x[1], S[1], _dim_params(P, h, 1))
    lo2, hi2 = _key_range(x[2], S[2], _dim_params(P, h, 2))
    return (lo0, lo1, lo2), (hi0, hi1, hi2)

@triton.jit
def _key_box(qx, qvalid, lo, hi, d, TN: tl.constexpr):
    """The box of in-group key indices [JLO, JHI] covering every valid query's range, its
    key-tile counts per dim, and the tile's residue group per dim."""
    big = NO_KEY
    JLO0 = tl.min(tl.where(qvalid, lo[0], big))
    JLO1 = tl.min(tl.where(qvalid, lo[1], big))
    JLO2 = tl.min(tl.where(qvalid, lo[2], big))
    JHI0 = tl.max(tl.where(qvalid, hi[0], -1))
    JHI1 = tl.max(tl.where(qvalid, hi[1], -1))
    JHI2 = tl.max(tl.where(qvalid, hi[2], -1))
    nk0 = tl.where(JHI0 >= JLO0, (JHI0 - JLO0 + TN[0]) // TN[0], 0)
    nk1 = tl.where(JHI1 >= JLO1, (JHI1 - JLO1 + TN[1]) // TN[1], 0)
    nk2 = tl.where(JHI2 >= JLO2, (JHI2 - JLO2 + TN[2]) // TN[2], 0)
    g0 = tl.min(tl.where(qvalid, qx[0] % d[0], big))
    g1 = tl.min(tl.where(qvalid, qx[1] % d[1], big))
    g2 = tl.min(tl.where(qvalid, qx[2] % d[2], big))
    return (JLO0, JLO1, JLO2), (JHI0, JHI1, JHI2), (nk0, nk1, nk2), (g0, g1, g2)

@triton.jit
def _box_tile(t, box, d, T: tl.constexpr):
    """Tile ``t`` of the box (JLO, JHI, tile counts, group) of in-group indices: indices,
    coordinates, valid lanes."""
    JLO, JHI, nt, g = box
    lane = tl.arange(0, T[0] * T[1] * T[2])
    j0 = JLO[0] + (t // (nt[1] * nt[2])) * T[0] + lane // (T[1] * T[2])
    j1 = JLO[1] + ((t // nt[2]) % nt[1]) * T[1] + (lane // T[2]) % T[1]
    j2 = JLO[2] + (t % nt[2]) * T[2] + lane % T[2]
    valid = (j0 <= JHI[0]) & (j1 <= JHI[1]) & (j2 <= JHI[2])
    return (j0, j1, j2), (g[0] + j0 * d[0], g[1] + j1 * d[1], g[2] + j2 * d[2]), valid

@triton.jit
def _sink_keys(start, n_sink, S, BLOCK_N: tl.constexpr):
    """Sink keys ``start + [0, BLOCK_N)`` of the flat keys [0, n_sink): coordinates, flat
    indices, valid lanes."""
    kf = start + tl.arange(0, BLOCK_N)
    kvalid = kf < n_sink
    return _unflat(kf, S), kf, kvalid

@triton.jit
def _box_keys(t, box, d, S, n_sink, TN: tl.constexpr):
    """Key tile ``t`` of a query tile's key box, sink keys left out (stage 1 has them)."""
    kj, kx, kvalid = _box_tile(t, box, d, TN)
    kf = (kx[0] * S[1] + kx[1]) * S[2] + kx[2]
    return kj, kx, kf, kvalid & (kf >= n_sink)

@triton.jit
def _in_box(lo, hi, kj):
    return ((lo[0][:, None] <= kj[0][None, :]) & (kj[0][None, :] <= hi[0][:, None])
            & (lo[1][:, None] <= kj[1][None, :]) & (kj[1][None, :] <= hi[1][:, None])
            & (lo[2][:, None] <= kj[2][None, :]) & (kj[2][None, :] <= hi[2][:, None]))

# ------------------------------------------------------------------ prologue

@triton.jit
def _prologue(Q, K_, V_, sq, sk, sv, H, KVG, D, DV, P, S, NT, T: tl.constexpr):
    """Every kernel's start: program ids -> batch, head, batch*head; the program's tile of the
    launch grid (T lanes, NT tiles per dim: coordinates, flat indices, valid lanes), or with
    T None (sink-key chunks, relb's loop over tiles) the program id; the row views of q, k, v
    (GQA: query head h reads kv head h // KVG)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if T is None:
        tile = pid
    else:
        tile = _tile_lanes(pid, P, h, S, NT, T)
    return b, h, bh, tile, (_view(Q, sq, b, h, D), _view(K_, sk, b, h // KVG, D),
                            _view(V_, sv, b, h // KVG, DV))

# ------------------------------------------------------------------ forward

@triton.jit
def _fwd_tile(acc, m_i, l_i, q, qx, qf, kview, vview, kx, kf, kvalid, allowed, scale, h, bh, N,
              seed, sp, BD: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
              F: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the online softmax. MASKED: a partial tile (the token mask applies);
    full tiles (every query sees every key) skip it entirely (compiled out)."""
    k = _load_rows(kview, kf, kvalid, BD)
    v = _load_rows(vview, kf, kvalid, BDV)
    s, _, _ = _scores(q, k, scale, qx, qf, kx, kf, h, allowed, sp, IEEE, F)
    s = s * LOG2E                                       # natural -> base 2
    if MASKED:                                          # partial tile: the token mask
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if F.HAS_DROP:
        pd = tl.load(sp.dropp + h)
        p = tl.where(_keep(seed, bh, N, qf[:, None], kf[None, :], pd), p / (1.0 - pd), 0.0)
    acc += tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i

@triton.jit
def _attn_fwd_inner(m_i, l_i, acc, q, qx, qf, qvalid, lo, hi, kview, vview, P, h, bh, N, S,
                    n_sink, scale, seed, sp, TN: tl.constexpr, BD: tl.constexpr,
                    BDV: tl.constexpr, IEEE: tl.constexpr, F: tl.constexpr,
                    STAGE: tl.constexpr):
    """One stage of the forward's key walk. STAGE 1: the sink keys, flat [0, n_sink), seen by
    every query (masked: the tile's tail). STAGE 2: the box of key tiles covering every query's
    range [lo, hi]; a tile inside [max lo, min hi] on every dim is full (no mask)."""
    BLOCK_N: tl.constexpr = TN[0] * TN[1] * TN[2]
    if STAGE == 1:
        start, end, step = 0, n_sink, BLOCK_N
    else:
        d = _dilations(P, h)
        box = _key_box(qx, qvalid, lo, hi, d, TN)
        nk = box[2]
        big = NO_KEY
        MLO0 = tl.max(tl.where(qvalid, lo[0], big))
        MLO1 = tl.max(tl.where(qvalid, lo[1], big))
        MLO2 = tl.max(tl.where(qvalid, lo[2], big))
        MHI0 = tl.min(tl.where(qvalid, hi[0], -1))
        MHI1 = tl.min(tl.where(qvalid, hi[1], -1))
        MHI2 = tl.min(tl.where(qvalid, hi[2], -1))
        all_q = tl.min(qvalid.to(tl.int32)) == 1
        start, end, step = 0, nk[0] * nk[1] * nk[2], 1
    for t in range(start, end, step):
        if STAGE == 1:
            kx, kf, kvalid = _sink_keys(t, n_sink, S, BLOCK_N)
            allowed = qvalid[:, None] & kvalid[None, :]
            full = False
        else:
            kj, kx, kf, kvalid = _box_keys(t, box, d, S, n_sink, TN)
            allowed = qvalid[:, None] & kvalid[None, :] & _in_box(lo, hi, kj)
            full = (all_q & (tl.min(kj[0]) >= MLO0) & (tl.max(kj[0]) <= MHI0)
                    & (tl.min(kj[1]) >= MLO1) & (tl.max(kj[1]) <= MHI1)
                    & (tl.min(kj[2]) >= MLO2) & (tl.max(kj[2]) <= MHI2) & (tl.min(kf) >= n_sink))
        if full:        # every query sees every key of the tile, no mask
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qx, qf, kview, vview, kx, kf, kvalid,
                                      allowed, scale, h, bh, N, seed, sp, BD, BDV, IEEE, F, False)
        else:           # a sink or partial tile: the token mask applies
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qx, qf, kview, vview, kx, kf, kvalid,
                                      allowed, scale, h, bh, N, seed, sp, BD, BDV, IEEE, F, True)
    return m_i, l_i, acc

@triton.jit
def _attn_fwd(Q, K_, V_, O, LSE, P, NS, SINKL, sp, sq, sk, sv, KVG, so, H, N, S, NT, D, DV,
              scale, seed, TM: tl.constexpr, TN: tl.constexpr, BD: tl.constexpr,
              BDV: tl.constexpr, IEEE: tl.constexpr, F: tl.constexpr, HAS_SINKL: tl.constexpr,
              HAS_SINK: tl.constexpr):
    BLOCK_M: tl.constexpr = TM[0] * TM[1] * TM[2]
    b, h, bh, (qx, qf, qvalid), (qview, kview, vview) = _prologue(Q, K_, V_, sq, sk, sv, H, KVG,
                                                                  D, DV, P, S, NT, TM)
    lo, hi = _ranges(qx, P, h, S)           # each query's key range per dim
    q = _load_rows(qview, qf, qvalid, BD)
    # running max and sum in base 2; a sink logit starts them (it joins the denominator)
    if HAS_SINKL:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKL + h) * LOG2E
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    n_sink = tl.load(NS + h)
    if HAS_SINK:    # stage 1: sink tokens
        m_i, l_i, acc = _attn_fwd_inner(m_i, l_i, acc, q, qx, qf, qvalid, lo, hi, kview, vview,
                                        P, h, bh, N, S, n_sink, scale, seed, sp, TN, BD, BDV,
                                        IEEE, F, 1)
    # stage 2: the box of key tiles covering every query's range
    m_i, l_i, acc = _attn_fwd_inner(m_i, l_i, acc, q, qx, qf, qvalid, lo, hi, kview, vview,
                                    P, h, bh, N, S, n_sink, scale, seed, sp, TN, BD, BDV,
                                    IEEE, F, 2)
    # epilogue: a row with no key (and no sink logit) has l = 0 and outputs zeros
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), 0.0)
    _store_rows(_view(O, so, b, h, DV), qf, qvalid, out, BDV)
    tl.store(LSE + bh.to(tl.int64) * N + qf, lse, mask=qvalid)

# ------------------------------------------------------------------ backward

@triton.jit
def _bwd_probs(q, k, do, v, lse, delta, scale, allowed, qx, qf, kx, kf, h, bh, N, seed, sp,
               IEEE: tl.constexpr, F: tl.constexpr):
    """For one tile pair: the dropped probabilities (for dv), dS (for dq, dk, bias terms)
    and dS x d(softcap)/d(cap) (for a learnable cap; 0 without a softcap)."""
    s, t, u = _scores(q, k, scale, qx, qf, kx, kf, h, allowed, sp, IEEE, F)
    s = tl.where(allowed, s * LOG2E, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    if IEEE:
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    else:
        dp = tl.dot(do, tl.trans(v))
    pdrop = p
    if F.HAS_DROP:
        pd = tl.load(sp.dropp + h)
        keep = _keep(seed, bh, N, qf[:, None], kf[None, :], pd)
        pdrop = tl.where(keep, p / (1.0 - pd), 0.0)
        dp = tl.where(keep, dp / (1.0 - pd), 0.0)
    ds = p * (dp - delta[:, None])
    dcap = ds * 0.0
    if F.HAS_CAP:
        dcap = ds * (t - u * (1.0 - t * t))
        ds = ds * (1.0 - t * t)
    return pdrop, ds, dcap

@triton.jit
def _attn_bwd_dq(Q, K_, V_, DO, DQ, LSE, DELTA, P, NS, GPAR, gstride, sp, sq, sk, sv, KVG, H, N,
                 S, NT, D, DV, scale, seed, TM: tl.constexpr, TN: tl.constexpr,
                 BD: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr, F: tl.constexpr,
                 HAS_SINK: tl.constexpr, PARAM_GRAD: tl.constexpr):
    """dq; with learnable rate / slope / cap (PARAM_GRAD: which of the three) also each query
    row's share of their gradient, GPAR[0|1|2, bh, q] (each row belongs to one program: no
    atomics). One loop over the forward's two stages: sink tiles, then the key box."""
    BLOCK_N: tl.constexpr = TN[0] * TN[1] * TN[2]
    b, h, bh, (qx, qf, qvalid), (qview, kview, vview) = _prologue(Q, K_, V_, sq, sk, sv, H, KVG,
                                                                  D, DV, P, S, NT, TM)
    lo, hi = _ranges(qx, P, h, S)
    q, do, lse, delta = _query_rows(qview, DO, LSE, DELTA, bh, N, DV, qf, qvalid, BD, BDV)
    dq = tl.zeros(q.shape, dtype=tl.float32)
    g_rate = tl.zeros([TM[0] * TM[1] * TM[2]], dtype=tl.float32)
    g_slope = tl.zeros([TM[0] * TM[1] * TM[2]], dtype=tl.float32)
    g_cap = tl.zeros([TM[0] * TM[1] * TM[2]], dtype=tl.float32)
    n_sink = tl.load(NS + h)
    d = _dilations(P, h)
    box = _key_box(qx, qvalid, lo, hi, d, TN)
    nk = box[2]
    n_sink_tiles = 0
    if HAS_SINK:
        n_sink_tiles = (n_sink + BLOCK_N - 1) // BLOCK_N
    for t in range(0, n_sink_tiles + nk[0] * nk[1] * nk[2]):
        if t < n_sink_tiles:          # stage 1: sink keys, seen by every query
            kx, kf, kvalid = _sink_keys(t * BLOCK_N, n_sink, S, BLOCK_N)
            allowed = qvalid[:, None] & kvalid[None, :]
        else:                         # stage 2: the key box
            kj, kx, kf, kvalid = _box_keys(t - n_sink_tiles, box, d, S, n_sink, TN)
            allowed = qvalid[:, None] & kvalid[None, :] & _in_box(lo, hi, kj)
        k = _load_rows(kview, kf, kvalid, BD)
        v = _load_rows(vview, kf, kvalid, BDV)
        _, ds, dcap = _bwd_probs(q, k, do, v, lse, delta, scale, allowed, qx, qf, kx, kf, h, bh,
                                 N, seed, sp, IEEE, F)
        if PARAM_GRAD[0]:
            g_rate -= tl.sum(ds * _distance((qx[0][:, None], qx[1][:, None], qx[2][:, None]),
                                            (kx[0][None, :], kx[1][None, :], kx[2][None, :]),
                                            F), 1)
        if PARAM_GRAD[1]:
            g_slope -= tl.sum(ds * tl.abs(qf[:, None] - kf[None, :]).to(tl.float32), 1)
        if PARAM_GRAD[2]:
            g_cap += tl.sum(dcap, 1)
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    rows = GPAR + bh.to(tl.int64) * N + qf
    if PARAM_GRAD[0]:
        tl.store(rows, g_rate, mask=qvalid)
    if PARAM_GRAD[1]:
        tl.store(rows + gstride, g_slope, mask=qvalid)
    if PARAM_GRAD[2]:
        tl.store(rows + 2 * gstride, g_cap, mask=qvalid)
    _store_rows(_bh_rows(DQ, bh, N, D), qf, qvalid, dq * scale, BD)

@triton.jit
def _first_true(lo, hi, NBS: tl.constexpr, x_of_i, want_hi: tl.constexpr, bound, S, row):
    """Binary search on in-group query index i in [lo, hi): the first i with
    jhi(i) >= bound (want_hi) or jlo(i) > bound (not want_hi); hi if none."""
    d = row[2]
    for _ in range(NBS):
        mid = (lo + hi) // 2
        jl, jh = _key_range(x_of_i + mid * d, S, row)
        if want_hi:
            ok = jh >= bound
        else:
            ok = jl > bound
        go_left = (ok & (lo < hi)).to(tl.int1)
        hi = tl.where(go_left, mid, hi)
        lo = tl.where((go_left | (lo >= hi)).to(tl.int1), lo, mid + 1)
    return lo

@triton.jit
def _query_span(kjmin, kjmax, g, S, row, NBS: tl.constexpr):
    """In-group indices [ia, ib] of the queries (group g) whose range meets [kjmin, kjmax]."""
    d = row[2]
    Lg = (S - g + d - 1) // d
    ia = _first_true(g * 0, Lg, NBS, g, True, kjmin, S, row)
    ib = _first_true(g * 0, Lg, NBS, g, False, kjmax, S, row) - 1
    return ia, ib

@triton.jit
def _kv_grads_step(dk, dv, k, v, qview, DO, LSE, DELTA, qx, qf, qvalid, kx, kf, allowed, scale,
                   h, bh, N, DV, seed, sp, BD: tl.constexpr, BDV: tl.constexpr,
                   IEEE: tl.constexpr, F: tl.constexpr):
    """One query tile's contribution to a key tile's dk (unscaled) and dv."""
    q, do, lse, delta = _query_rows(qview, DO, LSE, DELTA, bh, N, DV, qf, qvalid, BD, BDV)
    pdrop, ds, _ = _bwd_probs(q, k, do, v, lse, delta, scale, allowed, qx, qf, kx, kf, h, bh, N,
                              seed, sp, IEEE, F)
    if IEEE:
        dv += tl.dot(tl.trans(pdrop.to(do.dtype)), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    else:
        dv += tl.dot(tl.trans(pdrop.to(do.dtype)), do)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv

@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, kx, kf, kvalid, walk, qview, DO, LSE, DELTA, h, bh, N, S,
                         DV, scale, seed, sp, TM: tl.constexpr, BD: tl.constexpr,
                         BDV: tl.constexpr, IEEE: tl.constexpr, F: tl.constexpr,
                         STAGE: tl.constexpr):
    """One stage of a key tile's query walk, accumulating dk (unscaled) and dv. STAGE 1, the
    sink keys: walk = n_q, every query of [0, n_q) in flat chunks. STAGE 2: walk = (P, kj, d,
    qbox), the query tiles of the box qbox (in-group indices), masked by each query's range."""
    BLOCK_M: tl.constexpr = TM[0] * TM[1] * TM[2]
    if STAGE == 1:
        start, end, step = 0, walk, BLOCK_M
    else:
        P, kj, d, qbox = walk
        nq = qbox[2]
        start, end, step = 0, nq[0] * nq[1] * nq[2], 1
    for t in range(start, end, step):
        if STAGE == 1:
            qf = t + tl.arange(0, BLOCK_M)
            qvalid = qf < N
            qx = _unflat(qf, S)
            allowed = qvalid[:, None] & kvalid[None, :]
        else:
            _, qx, qvalid = _box_tile(t, qbox, d, TM)
            qvalid = qvalid & (qx[0] < S[0]) & (qx[1] < S[1]) & (qx[2] < S[2])
            qf = (qx[0] * S[1] + qx[1]) * S[2] + qx[2]
            lo, hi = _ranges(qx, P, h, S)
            allowed = qvalid[:, None] & kvalid[None, :] & _in_box(lo, hi, kj)
        dk, dv = _kv_grads_step(dk, dv, k, v, qview, DO, LSE, DELTA, qx, qf, qvalid, kx, kf,
                                allowed, scale, h, bh, N, DV, seed, sp, BD, BDV, IEEE, F)
    return dk, dv

@triton.jit
def _attn_bwd_dkdv(Q, K_, V_, DO, DK, DV_, LSE, DELTA, P, NS, sp, sq, sk, sv, KVG, H, N, S, NT,
                   D, DV, scale, seed, TM: tl.constexpr, TN: tl.constexpr, BD: tl.constexpr,
                   BDV: tl.constexpr, IEEE: tl.constexpr, F: tl.constexpr,
                   NBS: tl.constexpr):
    """dk, dv for one key tile of the box keys (sink keys: _attn_bwd_dkdv_sink)."""
    # the key tile (same residue-group tiling as queries, key tile shape)
    b, h, bh, (kx, kf, kvalid), (qview, kview, vview) = _prologue(Q, K_, V_, sq, sk, sv, H, KVG,
                                                                  D, DV, P, S, NT, TN)
    n_sink = tl.load(NS + h)
    kvalid = kvalid & (kf >= n_sink)
    row0 = _dim_params(P, h, 0)
    row1 = _dim_params(P, h, 1)
    row2 = _dim_params(P, h, 2)
    d = (row0[2], row1[2], row2[2])
    kj = (kx[0] // d[0], kx[1] // d[1], kx[2] // d[2])
    big = NO_KEY
    g0 = tl.min(tl.where(kvalid, kx[0] % d[0], big))
    g1 = tl.min(tl.where(kvalid, kx[1] % d[1], big))
    g2 = tl.min(tl.where(kvalid, kx[2] % d[2], big))
    any_k = tl.max(kvalid.to(tl.int32)) == 1
    ia0, ib0 = _query_span(tl.min(tl.where(kvalid, kj[0], big)), tl.max(tl.where(kvalid, kj[0], -1)),
                           g0, S[0], row0, NBS)
    ia1, ib1 = _query_span(tl.min(tl.where(kvalid, kj[1], big)), tl.max(tl.where(kvalid, kj[1], -1)),
                           g1, S[1], row1, NBS)
    ia2, ib2 = _query_span(tl.min(tl.where(kvalid, kj[2], big)), tl.max(tl.where(kvalid, kj[2], -1)),
                           g2, S[2], row2, NBS)
    nq0 = tl.where((any_k & (ib0 >= ia0)).to(tl.int1), (ib0 - ia0 + TM[0]) // TM[0], 0)
    nq1 = tl.where(ib1 >= ia1, (ib1 - ia1 + TM[1]) // TM[1], 0)
    nq2 = tl.where(ib2 >= ia2, (ib2 - ia2 + TM[2]) // TM[2], 0)
    qbox = ((ia0, ia1, ia2), (ib0, ib1, ib2), (nq0, nq1, nq2), (g0, g1, g2))
    k = _load_rows(kview, kf, kvalid, BD)
    v = _load_rows(vview, kf, kvalid, BDV)
    dk = tl.zeros([TN[0] * TN[1] * TN[2], BD], dtype=tl.float32)
    dv = tl.zeros([TN[0] * TN[1] * TN[2], BDV], dtype=tl.float32)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, kx, kf, kvalid, (P, kj, d, qbox), qview, DO, LSE,
                                  DELTA, h, bh, N, S, DV, scale, seed, sp, TM, BD, BDV, IEEE, F, 2)
    _store_rows(_bh_rows(DK, bh, N, D), kf, kvalid, dk * scale, BD)
    _store_rows(_bh_rows(DV_, bh, N, DV), kf, kvalid, dv, BDV)

@triton.jit
def _attn_bwd_dkdv_sink(Q, K_, V_, DO, DK, DV_, LSE, DELTA, NS, sp, sq, sk, sv, KVG, H, N, S, D,
                        DV, scale, seed, TM: tl.constexpr, TN: tl.constexpr, BD: tl.constexpr,
                        BDV: tl.constexpr, IEEE: tl.constexpr, F: tl.constexpr):
    """dk, dv of the sink keys (flat [0, n_sink)): every query sees them."""
    BLOCK_N: tl.constexpr = TN[0] * TN[1] * TN[2]
    b, h, bh, pid, (qview, kview, vview) = _prologue(Q, K_, V_, sq, sk, sv, H, KVG, D, DV, None,
                                                     S, None, None)
    n_sink = tl.load(NS + h)
    kx, kf, kvalid = _sink_keys(pid * BLOCK_N, n_sink, S, BLOCK_N)
    k = _load_rows(kview, kf, kvalid, BD)
    v = _load_rows(vview, kf, kvalid, BDV)
    dk = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BDV], dtype=tl.float32)
    n_q = tl.where(pid * BLOCK_N < n_sink, N, 0)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, kx, kf, kvalid, n_q, qview, DO, LSE, DELTA, h, bh,
                                  N, S, DV, scale, seed, sp, TM, BD, BDV, IEEE, F, 1)
    _store_rows(_bh_rows(DK, bh, N, D), kf, kvalid, dk * scale, BD)
    _store_rows(_bh_rows(DV_, bh, N, DV), kf, kvalid, dv, BDV)

@triton.jit
def _pair_ds(q, k, do, v, lse, delta, scale, allowed, qx, qf, kx, kf, h, bh, N, seed, sp,
             F: tl.constexpr):
    """dS for one key per query row (row m pairs q[m] with k[m]): the row-wise twin of
    _bwd_probs."""
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1) * scale
    s, t, _ = _score_terms(s, qx, qf, kx, kf, h, allowed, sp, F)
    p = tl.math.exp2(tl.where(allowed, s * LOG2E, float("-inf")) - lse)
    dp = tl.sum(do.to(tl.float32) * v.to(tl.float32), 1)
    if F.HAS_DROP:
        pd = tl.load(sp.dropp + h)
        dp = tl.where(_keep(seed, bh, N, qf, kf, pd), dp / (1.0 - pd), 0.0)
    ds = p * (dp - delta)
    if F.HAS_CAP:
        ds = ds * (1.0 - t * t)
    return tl.where(allowed, ds, 0.0)

@triton.jit
def _offsets_of_entry(a, omin, omax, d, R):
    """In-group offsets jo (raw offset jo * d) whose clipped offset is the entry a."""
    edge = (R + d - 1) // d
    exact = (a - (a // d) * d) == 0          # a multiple of d (// truncates: exact here)
    lo = tl.where(exact, a // d, 1)
    hi = tl.where(exact, a // d, 0)
    lo = tl.where(a == R, edge, lo)
    hi = tl.where(a == R, omax, hi)
    lo = tl.where(a == -R, omin, lo)
    hi = tl.where(a == -R, -edge, hi)
    lo = tl.where(R == 0, omin, lo)
    hi = tl.where(R == 0, omax, hi)
    return tl.maximum(lo, omin), tl.minimum(hi, omax)

@triton.jit
def _attn_bwd_relb(Q, K_, V_, DO, LSE, DELTA, P, NS, PART, sp, sq, sk, sv, KVG, H, N, S, NT,
                   NTILES, NPAR, T, D, DV, scale, seed, TM: tl.constexpr, BD: tl.constexpr,
                   BDV: tl.constexpr, CH: tl.constexpr, F: tl.constexpr,
                   HAS_SINK: tl.constexpr):
    """The relative_bias table gradient, deterministically: program (p, bh) owns the row
    PART[bh, p, :] and the query tiles p, p + NPAR, ...; per tile it walks the table entries
    the tile reaches and, per entry, the key offsets that clip to it (one key per query
    for each offset: a row-wise dot, no atomics); sink keys are added per chunk of entries.
    The wrapper sums PART over batches and programs in a fixed order."""
    b, h, bh, pid, (qview, kview, vview) = _prologue(Q, K_, V_, sq, sk, sv, H, KVG, D, DV, P, S,
                                                     NT, None)
    n_sink = tl.load(NS + h)
    d0, d1, d2 = _dilations(P, h)
    R0, R1, R2 = sp.radius
    row = PART + (bh.to(tl.int64) * NPAR + pid) * T
    big = NO_KEY
    for tile in range(pid, NTILES, NPAR):
        qx, qf, qvalid = _tile_lanes(tile, P, h, S, NT, TM)
        lo, hi = _ranges(qx, P, h, S)
        q, do, lse, delta = _query_rows(qview, DO, LSE, DELTA, bh, N, DV, qf, qvalid, BD, BDV)
        i0, i1, i2 = qx[0] // d0, qx[1] // d1, qx[2] // d2
        # in-group key offsets any query of the tile reaches, per dim
        om0 = tl.min(tl.where(qvalid, lo[0] - i0, big))
        oM0 = tl.max(tl.where(qvalid, hi[0] - i0, -big))
        om1 = tl.min(tl.where(qvalid, lo[1] - i1, big))
        oM1 = tl.max(tl.where(qvalid, hi[1] - i1, -big))
        om2 = tl.min(tl.where(qvalid, lo[2] - i2, big))
        oM2 = tl.max(tl.where(qvalid, hi[2] - i2, -big))
        # the entries those offsets clip to (empty ranges when no query is valid)
        any_q = tl.max(qvalid.to(tl.int32)) == 1
        ea0 = tl.where(any_q, tl.minimum(tl.maximum(om0 * d0, -R0), R0), 0)
        eb0 = tl.where(any_q, tl.minimum(tl.maximum(oM0 * d0, -R0), R0), -1)
        ea1 = tl.where(any_q, tl.minimum(tl.maximum(om1 * d1, -R1), R1), 0)
        eb1 = tl.where(any_q, tl.minimum(tl.maximum(oM1 * d1, -R1), R1), -1)
        ea2 = tl.where(any_q, tl.minimum(tl.maximum(om2 * d2, -R2), R2), 0)
        eb2 = tl.where(any_q, tl.minimum(tl.maximum(oM2 * d2, -R2), R2), -1)
        for a0 in range(ea0, eb0 + 1):
            jl0, jh0 = _offsets_of_entry(a0, om0, oM0, d0, R0)
            for a1 in range(ea1, eb1 + 1):
                jl1, jh1 = _offsets_of_entry(a1, om1, oM1, d1, R1)
                for a2 in range(ea2, eb2 + 1):
                    jl2, jh2 = _offsets_of_entry(a2, om2, oM2, d2, R2)
                    val = tl.sum(tl.zeros([TM[0] * TM[1] * TM[2]], dtype=tl.float32), 0)
                    for jo0 in range(jl0, jh0 + 1):
                        for jo1 in range(jl1, jh1 + 1):
                            for jo2 in range(jl2, jh2 + 1):
                                kx = (qx[0] + jo0 * d0, qx[1] + jo1 * d1, qx[2] + jo2 * d2)
                                kf = (kx[0] * S[1] + kx[1]) * S[2] + kx[2]
                                ok = (qvalid & (kx[0] >= 0) & (kx[0] < S[0]) & (kx[1] >= 0)
                                      & (kx[1] < S[1]) & (kx[2] >= 0) & (kx[2] < S[2])
                                      & (lo[0] <= i0 + jo0) & (i0 + jo0 <= hi[0])
                                      & (lo[1] <= i1 + jo1) & (i1 + jo1 <= hi[1])
                                      & (lo[2] <= i2 + jo2) & (i2 + jo2 <= hi[2])
                                      & (kf >= n_sink))
                                k = _load_rows(kview, kf, ok, BD)
                                v = _load_rows(vview, kf, ok, BDV)
                                ds = _pair_ds(q, k, do, v, lse, delta, scale, ok, qx, qf, kx, kf,
                                              h, bh, N, seed, sp, F)
                                val += tl.sum(ds, 0)
                    e = ((a0 + R0) * (2 * R1 + 1) + (a1 + R1)) * (2 * R2 + 1) + (a2 + R2)
                    tl.store(row + e, tl.load(row + e) + val)
        tl.debug_barrier()
        if HAS_SINK:        # sink keys: each query reaches them at its own offset
            for j in range(0, n_sink):
                kf = qf * 0 + j
                kx = _unflat(kf, S)
                k = _load_rows(kview, kf, qvalid, BD)
                v = _load_rows(vview, kf, qvalid, BDV)
                ds = _pair_ds(q, k, do, v, lse, delta, scale, qvalid, qx, qf, kx, kf, h, bh, N,
                              seed, sp, F)
                e = _relb_index((kx[0] - qx[0], kx[1] - qx[1], kx[2] - qx[2]), sp.radius)
                for c in range(0, T, CH):
                    ent = c + tl.arange(0, CH)
                    add = tl.sum(tl.where(e[:, None] == ent[None, :], ds[:, None], 0.0), 0)
                    tl.store(row + ent, tl.load(row + ent, mask=ent < T, other=0.0) + add,
                             mask=ent < T)
            tl.debug_barrier()
