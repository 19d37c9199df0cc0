"""The Triton kernels: fused locality attention with in-kernel key ranges, no BlockMask.

Read it top to bottom like Triton's fused-attention tutorial:

1. ``_key_range``: for query coordinates on one dim, the in-group index range ``[jlo, jhi]`` of
   the keys they may see (NATTEN's window with kernel/stride/dilation/causal, window offsets,
   causal, block with its shift). Everything the kernel knows about the pattern is a table of
   ``3 x len(FIELDS)`` ints per head, read off the IR (``triton_params``), so a million-token
   sequence carries no mask metadata.
2. ``_attn_fwd``: one program per query tile and (batch, head). A query tile is a box of
   ``TM0 x TM1 x TM2`` queries of one residue group per dim (dilation: the tile's queries are
   ``d`` apart, and so are its keys: strided loads, no token permutation). The union of its
   queries' key ranges is a box; the program walks that box in ``TN0 x TN1 x TN2`` key tiles with
   an online softmax (fp32 accumulators, exp2) in two stages like Flex's partial and full
   blocks: a tile fully inside every query's range runs ``_fwd_tile(MASKED=False)`` (the mask
   compiled out), the others ``MASKED=True``. Sink tokens (``| sink(n)``) are a first loop over the
   flat keys ``[0, n)``; the box loop skips them. Score terms (distance_decay, alibi,
   relative_bias, softcap) are evaluated from coordinates; ``sink_logit`` starts the running max
   and sum at the sink's logit; ``dropout`` draws a Philox keep bit per (batch, head, query, key)
   from one seed, so forward and backward drop the same entries.
3. ``_attn_bwd_dq``: the forward's walk again, recomputing probabilities from the saved
   log-sum-exp; accumulates dq (and each row's share of learnable rates, slopes and caps).
4. ``_attn_bwd_dkdv``: one program per key tile. Both ends of a query's key range are
   non-decreasing in the query coordinate, so the queries that see a key tile form a box found
   by binary search per dim; the program walks it and accumulates dk, dv: no atomics, so dk, dv
   and dq are deterministic. ``_attn_bwd_dkdv_sink`` does the sink keys against every query.

5. ``_attn_bwd_relb``: the relative_bias table gradient without atomics. A program owns a row of
   partial sums and a fixed set of query tiles; per tile it walks the table entries the tile
   reaches and, per entry, the key offsets that clip to it (one key per query per offset: a
   row-wise dot product); sink keys are added per chunk of entries. torch sums the rows.

``sink_logit``'s gradient, ``-sum_q p_sink(q) * rowsum(dO * O)(q)``, is a torch reduction of
saved quantities. No kernel uses atomics, so every gradient is deterministic.

GQA: K and V may carry ``H / KVG`` heads; query head ``h`` reads key/value head ``h // KVG``
in every kernel (no copy of k, v). ``_attn_bwd_dkdv*`` still write dk, dv per query head; the
host sums each group's ``KVG`` rows.

On CPU this runs only under ``TRITON_INTERPRET=1`` (tests, small shapes). The host side (plan,
autograd, launches) is ``triton_attn``; tools that are not kernels (``keep_mask``,
``compile_ahead``, the key-range probe) are ``triton_tools``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_params import FIELDS, NO_LIMIT  # noqa: F401  (NO_LIMIT: the table's "no offset limit")

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
    """One (head, dim) row of the table: the fields of ``triton_params.FIELDS``."""
    base = P + (h * 3 + dim) * NF
    return (tl.load(base + F_KERNEL), tl.load(base + F_STRIDE), tl.load(base + F_DILATION),
            tl.load(base + F_CAUSAL), tl.load(base + F_LEFT), tl.load(base + F_RIGHT),
            tl.load(base + F_BLOCK), tl.load(base + F_SHIFT))

@triton.jit
def _key_range(x, S, K, s, d, caus, left, right, blk, sh):
    """In-group key indices [jlo, jhi] (inclusive) that queries at coordinate x may see."""
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
def _unflat(f, S1, S2):
    return f // (S1 * S2), (f // S2) % S1, f % S2

# ------------------------------------------------------------------ scores

@triton.jit
def _relb_index(dx0, dx1, dx2, R0, R1, R2):
    """Flat relative_bias entry of key-minus-query offsets (clipped to the radius)."""
    i0 = tl.minimum(tl.maximum(dx0, -R0), R0) + R0
    i1 = tl.minimum(tl.maximum(dx1, -R1), R1) + R1
    i2 = tl.minimum(tl.maximum(dx2, -R2), R2) + R2
    return (i0 * (2 * R1 + 1) + i1) * (2 * R2 + 1) + i2

@triton.jit
def _distance(qx0, qx1, qx2, kx0, kx1, kx2, METRIC: tl.constexpr, DEC0: tl.constexpr,
              DEC1: tl.constexpr, DEC2: tl.constexpr):
    """distance_decay's distance over its dims (DEC*: 1 on the dims it uses)."""
    d0 = tl.abs(qx0 - kx0).to(tl.float32) * DEC0
    d1 = tl.abs(qx1 - kx1).to(tl.float32) * DEC1
    d2 = tl.abs(qx2 - kx2).to(tl.float32) * DEC2
    if METRIC == 0:
        dist = tl.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
    elif METRIC == 1:
        dist = d0 + d1 + d2
    else:
        dist = tl.maximum(tl.maximum(d0, d1), d2)
    return dist

@triton.jit
def _score_terms(s, qx0, qx1, qx2, qf, kx0, kx1, kx2, kf, h, valid,
                 RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2,
                 HAS_DECAY: tl.constexpr, METRIC: tl.constexpr,
                 DEC0: tl.constexpr, DEC1: tl.constexpr, DEC2: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr):
    """Every score term on logits ``s``, elementwise (coordinates broadcast against s); also
    u = s/cap before the cap and t = tanh(u), which the softcap's derivatives need (0 without
    a softcap)."""
    if HAS_DECAY:
        s = s - tl.load(RATE + h) * _distance(qx0, qx1, qx2, kx0, kx1, kx2, METRIC, DEC0, DEC1, DEC2)
    if HAS_ALIBI:
        s = s - tl.load(SLOPE + h) * tl.abs(qf - kf).to(tl.float32)
    if HAS_RELB:
        idx = _relb_index(kx0 - qx0, kx1 - qx1, kx2 - qx2, R0, R1, R2)
        s = s + tl.load(RELB + h * relb_hs + idx, mask=valid, other=0.0).to(tl.float32)
    t = s * 0.0
    u = t
    if HAS_CAP:
        cap = tl.load(CAP + h)
        u = s / cap
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)            # tanh(u), overflow-safe
        s = cap * t
    return s, t, u

@triton.jit
def _scores(q, k, scale, qx0, qx1, qx2, qf, kx0, kx1, kx2, kf, h, valid,
            RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2,
            IEEE: tl.constexpr, HAS_DECAY: tl.constexpr, METRIC: tl.constexpr,
            DEC0: tl.constexpr, DEC1: tl.constexpr, DEC2: tl.constexpr,
            HAS_ALIBI: tl.constexpr, HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr):
    """Logits of a (query tile, key tile) pair with every score term, and t, u (above)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    return _score_terms(s, qx0[:, None], qx1[:, None], qx2[:, None], qf[:, None],
                        kx0[None, :], kx1[None, :], kx2[None, :], kf[None, :], h, valid,
                        RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, HAS_DECAY, METRIC,
                        DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP)

@triton.jit
def _keep(seed, bh, N, qf, kf, pd):
    """Dropout keep bits: one Philox draw per (batch*head, query, key); qf and kf broadcast."""
    off = (bh.to(tl.int64) * N + qf.to(tl.int64)) * N + kf.to(tl.int64)
    return tl.rand(seed, off) >= pd

# ------------------------------------------------------------------ tiles

@triton.jit
def _query_lanes(pid, P, h, S0, S1, S2, NT1, NT2,
                 TM0: tl.constexpr, TM1: tl.constexpr, TM2: tl.constexpr):
    """Coordinates of a query (or key) tile: a box of one residue group per dim."""
    t0 = pid // (NT1 * NT2)
    t1 = (pid // NT2) % NT1
    t2 = pid % NT2
    lane = tl.arange(0, TM0 * TM1 * TM2)
    a0 = lane // (TM1 * TM2)
    a1 = (lane // TM2) % TM1
    a2 = lane % TM2
    d0, d1, d2 = _dilations(P, h)
    tpg0 = ((S0 + d0 - 1) // d0 + TM0 - 1) // TM0       # tiles per residue group
    tpg1 = ((S1 + d1 - 1) // d1 + TM1 - 1) // TM1
    tpg2 = ((S2 + d2 - 1) // d2 + TM2 - 1) // TM2
    g0, g1, g2 = t0 // tpg0, t1 // tpg1, t2 // tpg2
    x0 = g0 + ((t0 % tpg0) * TM0 + a0) * d0
    x1 = g1 + ((t1 % tpg1) * TM1 + a1) * d1
    x2 = g2 + ((t2 % tpg2) * TM2 + a2) * d2
    # (group checks as vectors: the interpreter turns bool-vector & bool-scalar into int32)
    valid = ((x0 < S0) & (x1 < S1) & (x2 < S2) & (a0 * 0 + g0 < d0) & (a1 * 0 + g1 < d1)
             & (a2 * 0 + g2 < d2))
    return x0, x1, x2, valid

@triton.jit
def _ranges(x0, x1, x2, P, h, S0, S1, S2):
    K, s, d, c, lf, rt, bk, sh = _dim_params(P, h, 0)
    lo0, hi0 = _key_range(x0, S0, K, s, d, c, lf, rt, bk, sh)
    K, s, d, c, lf, rt, bk, sh = _dim_params(P, h, 1)
    lo1, hi1 = _key_range(x1, S1, K, s, d, c, lf, rt, bk, sh)
    K, s, d, c, lf, rt, bk, sh = _dim_params(P, h, 2)
    lo2, hi2 = _key_range(x2, S2, K, s, d, c, lf, rt, bk, sh)
    return lo0, hi0, lo1, hi1, lo2, hi2

@triton.jit
def _dilations(P, h):
    return (tl.load(P + (h * 3 + 0) * NF + F_DILATION), tl.load(P + (h * 3 + 1) * NF + F_DILATION),
            tl.load(P + (h * 3 + 2) * NF + F_DILATION))

@triton.jit
def _key_box(qx0, qx1, qx2, qvalid, lo0, hi0, lo1, hi1, lo2, hi2, d0, d1, d2,
             TN0: tl.constexpr, TN1: tl.constexpr, TN2: tl.constexpr):
    """The box of in-group key indices [JLO, JHI] covering every valid query's range, its
    key-tile counts per dim, and the tile's residue group per dim."""
    big = NO_KEY
    JLO0 = tl.min(tl.where(qvalid, lo0, big))
    JLO1 = tl.min(tl.where(qvalid, lo1, big))
    JLO2 = tl.min(tl.where(qvalid, lo2, big))
    JHI0 = tl.max(tl.where(qvalid, hi0, -1))
    JHI1 = tl.max(tl.where(qvalid, hi1, -1))
    JHI2 = tl.max(tl.where(qvalid, hi2, -1))
    nk0 = tl.where(JHI0 >= JLO0, (JHI0 - JLO0 + TN0) // TN0, 0)
    nk1 = tl.where(JHI1 >= JLO1, (JHI1 - JLO1 + TN1) // TN1, 0)
    nk2 = tl.where(JHI2 >= JLO2, (JHI2 - JLO2 + TN2) // TN2, 0)
    g0 = tl.min(tl.where(qvalid, qx0 % d0, big))
    g1 = tl.min(tl.where(qvalid, qx1 % d1, big))
    g2 = tl.min(tl.where(qvalid, qx2 % d2, big))
    return JLO0, JLO1, JLO2, JHI0, JHI1, JHI2, nk0, nk1, nk2, g0, g1, g2

@triton.jit
def _box_keys(t, JLO0, JLO1, JLO2, JHI0, JHI1, JHI2, nk1, nk2, g0, g1, g2, d0, d1, d2,
              TN0: tl.constexpr, TN1: tl.constexpr, TN2: tl.constexpr):
    """Key tile ``t`` of the box [JLO, JHI] (in-group indices): indices and coordinates."""
    lane = tl.arange(0, TN0 * TN1 * TN2)
    kj0 = JLO0 + (t // (nk1 * nk2)) * TN0 + lane // (TN1 * TN2)
    kj1 = JLO1 + ((t // nk2) % nk1) * TN1 + (lane // TN2) % TN1
    kj2 = JLO2 + (t % nk2) * TN2 + lane % TN2
    valid = (kj0 <= JHI0) & (kj1 <= JHI1) & (kj2 <= JHI2)
    return kj0, kj1, kj2, g0 + kj0 * d0, g1 + kj1 * d1, g2 + kj2 * d2, valid

@triton.jit
def _in_box(lo0, hi0, lo1, hi1, lo2, hi2, kj0, kj1, kj2):
    return ((lo0[:, None] <= kj0[None, :]) & (kj0[None, :] <= hi0[:, None])
            & (lo1[:, None] <= kj1[None, :]) & (kj1[None, :] <= hi1[:, None])
            & (lo2[:, None] <= kj2[None, :]) & (kj2[None, :] <= hi2[:, None]))

@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K_, V_, kbase, vbase, skn, skd, svn, svd, offs_d, offs_dv,
              D, DV, kf, kvalid, allowed, qx0, qx1, qx2, qf, kx0, kx1, kx2,
              scale, h, bh, N, seed, RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP,
              IEEE: tl.constexpr, HAS_DECAY: tl.constexpr, METRIC: tl.constexpr,
              DEC0: tl.constexpr, DEC1: tl.constexpr, DEC2: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr,
              HAS_DROP: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the online softmax. MASKED: a partial tile (the token mask applies);
    full tiles (every query sees every key) skip it entirely (compiled out)."""
    k = tl.load(K_ + kbase + kf[:, None] * skn + offs_d[None, :] * skd,
                mask=kvalid[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V_ + vbase + kf[:, None] * svn + offs_dv[None, :] * svd,
                mask=kvalid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    s, _, _ = _scores(q, k, scale, qx0, qx1, qx2, qf, kx0, kx1, kx2, kf, h, allowed,
                   RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, IEEE, HAS_DECAY, METRIC,
                   DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP)
    s = s * LOG2E                                       # natural -> base 2
    if MASKED:                                          # partial tile: the token mask
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROP:
        pd = tl.load(DROPP + h)
        p = tl.where(_keep(seed, bh, N, qf[:, None], kf[None, :], pd), p / (1.0 - pd), 0.0)
    acc += tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i

@triton.jit
def _attn_fwd(Q, K_, V_, O, LSE, P, NS, RATE, SLOPE, CAP, SINKL, DROPP, RELB,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, KVG,
              sob, soh, son, sod, H, N, S0, S1, S2, NT1, NT2, D, DV, scale, seed,
              relb_hs, R0, R1, R2,
              TM0: tl.constexpr, TM1: tl.constexpr, TM2: tl.constexpr,
              TN0: tl.constexpr, TN1: tl.constexpr, TN2: tl.constexpr,
              BD: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
              HAS_DECAY: tl.constexpr, METRIC: tl.constexpr, DEC0: tl.constexpr,
              DEC1: tl.constexpr, DEC2: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr, HAS_SINKL: tl.constexpr,
              HAS_DROP: tl.constexpr, HAS_SINK: tl.constexpr):
    BLOCK_M: tl.constexpr = TM0 * TM1 * TM2
    BLOCK_N: tl.constexpr = TN0 * TN1 * TN2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # the query tile: coordinates, flat index, each query's key range per dim
    qx0, qx1, qx2, qvalid = _query_lanes(pid, P, h, S0, S1, S2, NT1, NT2, TM0, TM1, TM2)
    qf = (qx0 * S1 + qx1) * S2 + qx2
    lo0, hi0, lo1, hi1, lo2, hi2 = _ranges(qx0, qx1, qx2, P, h, S0, S1, S2)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    qbase = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kbase = b.to(tl.int64) * skb + (h // KVG).to(tl.int64) * skh
    vbase = b.to(tl.int64) * svb + (h // KVG).to(tl.int64) * svh
    q = tl.load(Q + qbase + qf[:, None] * sqn + offs_d[None, :] * sqd,
                mask=qvalid[:, None] & (offs_d[None, :] < D), other=0.0)
    # running max and sum in base 2; a sink logit starts them (it joins the denominator)
    if HAS_SINKL:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKL + h) * LOG2E
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    n_sink = tl.load(NS + h)
    # stage 1: sink tokens, flat keys [0, n_sink), seen by every query
    if HAS_SINK:
        for start in range(0, n_sink, BLOCK_N):
            kf = start + tl.arange(0, BLOCK_N)
            kvalid = kf < n_sink
            kx0, kx1, kx2 = _unflat(kf, S1, S2)
            allowed = qvalid[:, None] & kvalid[None, :]
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, K_, V_, kbase, vbase, skn, skd, svn, svd, offs_d, offs_dv,
                D, DV, kf, kvalid, allowed, qx0, qx1, qx2, qf, kx0, kx1, kx2,
                scale, h, bh, N, seed, RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP,
                IEEE, HAS_DECAY, METRIC, DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP,
                HAS_DROP, True)
    # stage 2: the box of key tiles covering every query's range
    d0, d1, d2 = _dilations(P, h)
    JLO0, JLO1, JLO2, JHI0, JHI1, JHI2, nk0, nk1, nk2, g0, g1, g2 = _key_box(
        qx0, qx1, qx2, qvalid, lo0, hi0, lo1, hi1, lo2, hi2, d0, d1, d2, TN0, TN1, TN2)
    # a key tile inside [max lo, min hi] on every dim is full: no mask needed
    big = NO_KEY
    MLO0 = tl.max(tl.where(qvalid, lo0, big))
    MLO1 = tl.max(tl.where(qvalid, lo1, big))
    MLO2 = tl.max(tl.where(qvalid, lo2, big))
    MHI0 = tl.min(tl.where(qvalid, hi0, -1))
    MHI1 = tl.min(tl.where(qvalid, hi1, -1))
    MHI2 = tl.min(tl.where(qvalid, hi2, -1))
    all_q = tl.min(qvalid.to(tl.int32)) == 1
    for t in range(0, nk0 * nk1 * nk2):
        kj0, kj1, kj2, kx0, kx1, kx2, kvalid = _box_keys(
            t, JLO0, JLO1, JLO2, JHI0, JHI1, JHI2, nk1, nk2, g0, g1, g2, d0, d1, d2,
            TN0, TN1, TN2)
        kf = (kx0 * S1 + kx1) * S2 + kx2
        kvalid = kvalid & (kf >= n_sink)
        allowed = (qvalid[:, None] & kvalid[None, :]
                   & _in_box(lo0, hi0, lo1, hi1, lo2, hi2, kj0, kj1, kj2))
        full = (all_q & (tl.min(kj0) >= MLO0) & (tl.max(kj0) <= MHI0)
                & (tl.min(kj1) >= MLO1) & (tl.max(kj1) <= MHI1)
                & (tl.min(kj2) >= MLO2) & (tl.max(kj2) <= MHI2) & (tl.min(kf) >= n_sink))
        if full:        # stage 2a: every query sees every key of the tile, no mask
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, K_, V_, kbase, vbase, skn, skd, svn, svd, offs_d, offs_dv,
                D, DV, kf, kvalid, allowed, qx0, qx1, qx2, qf, kx0, kx1, kx2,
                scale, h, bh, N, seed, RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP,
                IEEE, HAS_DECAY, METRIC, DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP,
                HAS_DROP, False)
        else:           # stage 2b: a partial tile, the token mask applies
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, K_, V_, kbase, vbase, skn, skd, svn, svd, offs_d, offs_dv,
                D, DV, kf, kvalid, allowed, qx0, qx1, qx2, qf, kx0, kx1, kx2,
                scale, h, bh, N, seed, RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP,
                IEEE, HAS_DECAY, METRIC, DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP,
                HAS_DROP, True)
    # epilogue: a row with no key (and no sink logit) has l = 0 and outputs zeros
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), 0.0)
    obase = b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(O + obase + qf[:, None] * son + offs_dv[None, :] * sod, out.to(O.dtype.element_ty),
             mask=qvalid[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * N + qf, lse, mask=qvalid)

# ------------------------------------------------------------------ backward

@triton.jit
def _bwd_probs(q, k, do, v, lse, delta, scale, allowed, qx0, qx1, qx2, qf, kx0, kx1, kx2,
               kf, h, bh, N, seed, RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP,
               IEEE: tl.constexpr, HAS_DECAY: tl.constexpr, METRIC: tl.constexpr,
               DEC0: tl.constexpr, DEC1: tl.constexpr, DEC2: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr,
               HAS_DROP: tl.constexpr):
    """For one tile pair: the dropped probabilities (for dv), dS (for dq, dk, bias terms)
    and dS x d(softcap)/d(cap) (for a learnable cap; 0 without a softcap)."""
    s, t, u = _scores(q, k, scale, qx0, qx1, qx2, qf, kx0, kx1, kx2, kf, h, allowed,
                   RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, IEEE, HAS_DECAY, METRIC,
                   DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP)
    s = tl.where(allowed, s * LOG2E, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    if IEEE:
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    else:
        dp = tl.dot(do, tl.trans(v))
    pdrop = p
    if HAS_DROP:
        pd = tl.load(DROPP + h)
        keep = _keep(seed, bh, N, qf[:, None], kf[None, :], pd)
        pdrop = tl.where(keep, p / (1.0 - pd), 0.0)
        dp = tl.where(keep, dp / (1.0 - pd), 0.0)
    ds = p * (dp - delta[:, None])
    dcap = ds * 0.0
    if HAS_CAP:
        dcap = ds * (t - u * (1.0 - t * t))
        ds = ds * (1.0 - t * t)
    return pdrop, ds, dcap

@triton.jit
def _attn_bwd_dq(Q, K_, V_, DO, DQ, LSE, DELTA, P, NS, RATE, SLOPE, CAP, DROPP, RELB, GPAR, gstride,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, KVG,
                 H, N, S0, S1, S2, NT1, NT2, D, DV, scale, seed, relb_hs, R0, R1, R2,
                 TM0: tl.constexpr, TM1: tl.constexpr, TM2: tl.constexpr,
                 TN0: tl.constexpr, TN1: tl.constexpr, TN2: tl.constexpr,
                 BD: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
                 HAS_DECAY: tl.constexpr, METRIC: tl.constexpr, DEC0: tl.constexpr,
                 DEC1: tl.constexpr, DEC2: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr, HAS_DROP: tl.constexpr,
                 HAS_SINK: tl.constexpr, RATE_GRAD: tl.constexpr, SLOPE_GRAD: tl.constexpr,
                 CAP_GRAD: tl.constexpr):
    """dq; with learnable rate / slope / cap also each query row's share of their gradient,
    GPAR[0|1|2, bh, q] (each row belongs to one program: no atomics)."""
    BLOCK_N: tl.constexpr = TN0 * TN1 * TN2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qx0, qx1, qx2, qvalid = _query_lanes(pid, P, h, S0, S1, S2, NT1, NT2, TM0, TM1, TM2)
    qf = (qx0 * S1 + qx1) * S2 + qx2
    lo0, hi0, lo1, hi1, lo2, hi2 = _ranges(qx0, qx1, qx2, P, h, S0, S1, S2)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    qbase = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kbase = b.to(tl.int64) * skb + (h // KVG).to(tl.int64) * skh
    vbase = b.to(tl.int64) * svb + (h // KVG).to(tl.int64) * svh
    qmask = qvalid[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + qbase + qf[:, None] * sqn + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    dobase = bh.to(tl.int64) * N * DV
    do = tl.load(DO + dobase + qf[:, None] * DV + offs_dv[None, :],
                 mask=qvalid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N + qf, mask=qvalid, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + qf, mask=qvalid, other=0.0)
    dq = tl.zeros(q.shape, dtype=tl.float32)
    g_rate = tl.zeros([TM0 * TM1 * TM2], dtype=tl.float32)
    g_slope = tl.zeros([TM0 * TM1 * TM2], dtype=tl.float32)
    g_cap = tl.zeros([TM0 * TM1 * TM2], dtype=tl.float32)
    n_sink = tl.load(NS + h)
    d0, d1, d2 = _dilations(P, h)
    JLO0, JLO1, JLO2, JHI0, JHI1, JHI2, nk0, nk1, nk2, g0, g1, g2 = _key_box(
        qx0, qx1, qx2, qvalid, lo0, hi0, lo1, hi1, lo2, hi2, d0, d1, d2, TN0, TN1, TN2)
    n_sink_tiles = 0
    if HAS_SINK:
        n_sink_tiles = (n_sink + BLOCK_N - 1) // BLOCK_N
    for t in range(0, n_sink_tiles + nk0 * nk1 * nk2):
        if t < n_sink_tiles:          # sink keys: flat [0, n_sink), seen by every query
            kf = t * BLOCK_N + tl.arange(0, BLOCK_N)
            kvalid = kf < n_sink
            kx0, kx1, kx2 = _unflat(kf, S1, S2)
            allowed = qvalid[:, None] & kvalid[None, :]
        else:
            kj0, kj1, kj2, kx0, kx1, kx2, kvalid = _box_keys(
                t - n_sink_tiles, JLO0, JLO1, JLO2, JHI0, JHI1, JHI2, nk1, nk2,
                g0, g1, g2, d0, d1, d2, TN0, TN1, TN2)
            kf = (kx0 * S1 + kx1) * S2 + kx2
            kvalid = kvalid & (kf >= n_sink)
            allowed = (qvalid[:, None] & kvalid[None, :]
                       & _in_box(lo0, hi0, lo1, hi1, lo2, hi2, kj0, kj1, kj2))
        k = tl.load(K_ + kbase + kf[:, None] * skn + offs_d[None, :] * skd,
                    mask=kvalid[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V_ + vbase + kf[:, None] * svn + offs_dv[None, :] * svd,
                    mask=kvalid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        _, ds, dcap = _bwd_probs(q, k, do, v, lse, delta, scale, allowed, qx0, qx1, qx2, qf,
                           kx0, kx1, kx2, kf, h, bh, N, seed, RATE, SLOPE, CAP, RELB,
                           relb_hs, R0, R1, R2, DROPP, IEEE, HAS_DECAY, METRIC, DEC0, DEC1,
                           DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP, HAS_DROP)
        if RATE_GRAD:
            g_rate -= tl.sum(ds * _distance(qx0[:, None], qx1[:, None], qx2[:, None],
                                            kx0[None, :], kx1[None, :], kx2[None, :],
                                            METRIC, DEC0, DEC1, DEC2), 1)
        if SLOPE_GRAD:
            g_slope -= tl.sum(ds * tl.abs(qf[:, None] - kf[None, :]).to(tl.float32), 1)
        if CAP_GRAD:
            g_cap += tl.sum(dcap, 1)
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    rows = GPAR + bh.to(tl.int64) * N + qf
    if RATE_GRAD:
        tl.store(rows, g_rate, mask=qvalid)
    if SLOPE_GRAD:
        tl.store(rows + gstride, g_slope, mask=qvalid)
    if CAP_GRAD:
        tl.store(rows + 2 * gstride, g_cap, mask=qvalid)
    tl.store(DQ + bh.to(tl.int64) * N * D + qf[:, None] * D + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qmask)

@triton.jit
def _first_true(lo, hi, NBS: tl.constexpr, x_of_i, want_hi: tl.constexpr, bound,
                S, K, s, d, caus, left, right, blk, sh):
    """Binary search on in-group query index i in [lo, hi): the first i with
    jhi(i) >= bound (want_hi) or jlo(i) > bound (not want_hi); hi if none."""
    for _ in range(NBS):
        mid = (lo + hi) // 2
        jl, jh = _key_range(x_of_i + mid * d, S, K, s, d, caus, left, right, blk, sh)
        if want_hi:
            ok = jh >= bound
        else:
            ok = jl > bound
        go_left = (ok & (lo < hi)).to(tl.int1)
        hi = tl.where(go_left, mid, hi)
        lo = tl.where((go_left | (lo >= hi)).to(tl.int1), lo, mid + 1)
    return lo

@triton.jit
def _query_span(kjmin, kjmax, g, S, K, s, d, caus, left, right, blk, sh, NBS: tl.constexpr):
    """In-group indices [ia, ib] of the queries (group g) whose range meets [kjmin, kjmax]."""
    Lg = (S - g + d - 1) // d
    ia = _first_true(g * 0, Lg, NBS, g, True, kjmin, S, K, s, d, caus, left, right, blk, sh)
    ib = _first_true(g * 0, Lg, NBS, g, False, kjmax, S, K, s, d, caus, left, right, blk, sh) - 1
    return ia, ib

@triton.jit
def _kv_grads_step(dk, dv, k, v, Q, DO, LSE, DELTA, qbase, sqn, sqd, offs_d, offs_dv, D, DV,
                   qf, qvalid, allowed, qx0, qx1, qx2, kx0, kx1, kx2, kf, scale, h, bh, N,
                   seed, RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP,
                   IEEE: tl.constexpr, HAS_DECAY: tl.constexpr, METRIC: tl.constexpr,
                   DEC0: tl.constexpr, DEC1: tl.constexpr, DEC2: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr,
                   HAS_DROP: tl.constexpr):
    """One query tile's contribution to a key tile's dk (unscaled) and dv."""
    q = tl.load(Q + qbase + qf[:, None] * sqn + offs_d[None, :] * sqd,
                mask=qvalid[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + bh.to(tl.int64) * N * DV + qf[:, None] * DV + offs_dv[None, :],
                 mask=qvalid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N + qf, mask=qvalid, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + qf, mask=qvalid, other=0.0)
    pdrop, ds, _ = _bwd_probs(q, k, do, v, lse, delta, scale, allowed, qx0, qx1, qx2, qf,
                              kx0, kx1, kx2, kf, h, bh, N, seed, RATE, SLOPE, CAP, RELB,
                              relb_hs, R0, R1, R2, DROPP, IEEE, HAS_DECAY, METRIC, DEC0,
                              DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP, HAS_DROP)
    if IEEE:
        dv += tl.dot(tl.trans(pdrop.to(do.dtype)), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    else:
        dv += tl.dot(tl.trans(pdrop.to(do.dtype)), do)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv

@triton.jit
def _attn_bwd_dkdv(Q, K_, V_, DO, DK, DV_, LSE, DELTA, P, NS, RATE, SLOPE, CAP, DROPP, RELB,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, KVG,
                   H, N, S0, S1, S2, NT1, NT2, D, DV, scale, seed, relb_hs, R0, R1, R2,
                   TM0: tl.constexpr, TM1: tl.constexpr, TM2: tl.constexpr,
                   TN0: tl.constexpr, TN1: tl.constexpr, TN2: tl.constexpr,
                   BD: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
                   HAS_DECAY: tl.constexpr, METRIC: tl.constexpr, DEC0: tl.constexpr,
                   DEC1: tl.constexpr, DEC2: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr, HAS_DROP: tl.constexpr,
                   NBS: tl.constexpr):
    """dk, dv for one key tile of the box keys (sink keys: _attn_bwd_dkdv_sink)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # the key tile (same residue-group tiling as queries, key tile shape)
    kx0, kx1, kx2, kvalid = _query_lanes(pid, P, h, S0, S1, S2, NT1, NT2, TN0, TN1, TN2)
    kf = (kx0 * S1 + kx1) * S2 + kx2
    n_sink = tl.load(NS + h)
    kvalid = kvalid & (kf >= n_sink)
    K0, s0, d0, c0, l0, r0, b0, h0 = _dim_params(P, h, 0)
    K1, s1, d1, c1, l1, r1, b1, h1 = _dim_params(P, h, 1)
    K2, s2, d2, c2, l2, r2, b2, h2 = _dim_params(P, h, 2)
    kj0, kj1, kj2 = kx0 // d0, kx1 // d1, kx2 // d2
    big = NO_KEY
    g0 = tl.min(tl.where(kvalid, kx0 % d0, big))
    g1 = tl.min(tl.where(kvalid, kx1 % d1, big))
    g2 = tl.min(tl.where(kvalid, kx2 % d2, big))
    any_k = tl.max(kvalid.to(tl.int32)) == 1
    ia0, ib0 = _query_span(tl.min(tl.where(kvalid, kj0, big)), tl.max(tl.where(kvalid, kj0, -1)),
                           g0, S0, K0, s0, d0, c0, l0, r0, b0, h0, NBS)
    ia1, ib1 = _query_span(tl.min(tl.where(kvalid, kj1, big)), tl.max(tl.where(kvalid, kj1, -1)),
                           g1, S1, K1, s1, d1, c1, l1, r1, b1, h1, NBS)
    ia2, ib2 = _query_span(tl.min(tl.where(kvalid, kj2, big)), tl.max(tl.where(kvalid, kj2, -1)),
                           g2, S2, K2, s2, d2, c2, l2, r2, b2, h2, NBS)
    nq0 = tl.where((any_k & (ib0 >= ia0)).to(tl.int1), (ib0 - ia0 + TM0) // TM0, 0)
    nq1 = tl.where(ib1 >= ia1, (ib1 - ia1 + TM1) // TM1, 0)
    nq2 = tl.where(ib2 >= ia2, (ib2 - ia2 + TM2) // TM2, 0)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    qbase = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kbase = b.to(tl.int64) * skb + (h // KVG).to(tl.int64) * skh
    vbase = b.to(tl.int64) * svb + (h // KVG).to(tl.int64) * svh
    kmask = kvalid[:, None] & (offs_d[None, :] < D)
    vmask = kvalid[:, None] & (offs_dv[None, :] < DV)
    k = tl.load(K_ + kbase + kf[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V_ + vbase + kf[:, None] * svn + offs_dv[None, :] * svd, mask=vmask, other=0.0)
    dk = tl.zeros([TN0 * TN1 * TN2, BD], dtype=tl.float32)
    dv = tl.zeros([TN0 * TN1 * TN2, BDV], dtype=tl.float32)
    for t in range(0, nq0 * nq1 * nq2):
        # the query tile t of the box [ia, ib] (in-group indices)
        qi0, qi1, qi2, qx0, qx1, qx2, qvalid = _box_keys(
            t, ia0, ia1, ia2, ib0, ib1, ib2, nq1, nq2, g0, g1, g2, d0, d1, d2,
            TM0, TM1, TM2)
        qvalid = qvalid & (qx0 < S0) & (qx1 < S1) & (qx2 < S2)
        qf = (qx0 * S1 + qx1) * S2 + qx2
        lo0, hi0, lo1, hi1, lo2, hi2 = _ranges(qx0, qx1, qx2, P, h, S0, S1, S2)
        allowed = (qvalid[:, None] & kvalid[None, :]
                   & _in_box(lo0, hi0, lo1, hi1, lo2, hi2, kj0, kj1, kj2))
        dk, dv = _kv_grads_step(
            dk, dv, k, v, Q, DO, LSE, DELTA, qbase, sqn, sqd, offs_d, offs_dv, D, DV, qf,
            qvalid, allowed, qx0, qx1, qx2, kx0, kx1, kx2, kf, scale, h, bh, N, seed,
            RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP, IEEE, HAS_DECAY, METRIC,
            DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP, HAS_DROP)
    base = bh.to(tl.int64) * N
    tl.store(DK + base * D + kf[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kmask)
    tl.store(DV_ + base * DV + kf[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=vmask)

@triton.jit
def _attn_bwd_dkdv_sink(Q, K_, V_, DO, DK, DV_, LSE, DELTA, NS, RATE, SLOPE, CAP, DROPP, RELB,
                        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, KVG,
                        H, N, S1, S2, D, DV, scale, seed, relb_hs, R0, R1, R2,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BD: tl.constexpr, BDV: tl.constexpr, IEEE: tl.constexpr,
                        HAS_DECAY: tl.constexpr, METRIC: tl.constexpr, DEC0: tl.constexpr,
                        DEC1: tl.constexpr, DEC2: tl.constexpr, HAS_ALIBI: tl.constexpr,
                        HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr,
                        HAS_DROP: tl.constexpr):
    """dk, dv of the sink keys (flat [0, n_sink)): every query sees them."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_sink = tl.load(NS + h)
    kf = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kvalid = kf < n_sink
    kx0, kx1, kx2 = _unflat(kf, S1, S2)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    qbase = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kbase = b.to(tl.int64) * skb + (h // KVG).to(tl.int64) * skh
    vbase = b.to(tl.int64) * svb + (h // KVG).to(tl.int64) * svh
    kmask = kvalid[:, None] & (offs_d[None, :] < D)
    vmask = kvalid[:, None] & (offs_dv[None, :] < DV)
    k = tl.load(K_ + kbase + kf[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V_ + vbase + kf[:, None] * svn + offs_dv[None, :] * svd, mask=vmask, other=0.0)
    dk = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BDV], dtype=tl.float32)
    n_q = tl.where(pid * BLOCK_N < n_sink, N, 0)
    for start in range(0, n_q, BLOCK_M):
        qf = start + tl.arange(0, BLOCK_M)
        qvalid = qf < N
        qx0, qx1, qx2 = _unflat(qf, S1, S2)
        allowed = qvalid[:, None] & kvalid[None, :]
        dk, dv = _kv_grads_step(
            dk, dv, k, v, Q, DO, LSE, DELTA, qbase, sqn, sqd, offs_d, offs_dv, D, DV, qf,
            qvalid, allowed, qx0, qx1, qx2, kx0, kx1, kx2, kf, scale, h, bh, N, seed,
            RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP, IEEE, HAS_DECAY, METRIC,
            DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP, HAS_DROP)
    base = bh.to(tl.int64) * N
    tl.store(DK + base * D + kf[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kmask)
    tl.store(DV_ + base * DV + kf[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=vmask)

@triton.jit
def _pair_ds(q, k, do, v, lse, delta, scale, allowed, qx0, qx1, qx2, qf, kx0, kx1, kx2, kf,
             h, bh, N, seed, RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, DROPP,
             HAS_DECAY: tl.constexpr, METRIC: tl.constexpr, DEC0: tl.constexpr,
             DEC1: tl.constexpr, DEC2: tl.constexpr, HAS_ALIBI: tl.constexpr,
             HAS_RELB: tl.constexpr, HAS_CAP: tl.constexpr, HAS_DROP: tl.constexpr):
    """dS for one key per query row (row m pairs q[m] with k[m]): the row-wise twin of
    _bwd_probs."""
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1) * scale
    s, t, _ = _score_terms(s, qx0, qx1, qx2, qf, kx0, kx1, kx2, kf, h, allowed,
                        RATE, SLOPE, CAP, RELB, relb_hs, R0, R1, R2, HAS_DECAY, METRIC,
                        DEC0, DEC1, DEC2, HAS_ALIBI, HAS_RELB, HAS_CAP)
    p = tl.math.exp2(tl.where(allowed, s * LOG2E, float("-inf")) - lse)
    dp = tl.sum(do.to(tl.float32) * v.to(tl.float32), 1)
    if HAS_DROP:
        pd = tl.load(DROPP + h)
        dp = tl.where(_keep(seed, bh, N, qf, kf, pd), dp / (1.0 - pd), 0.0)
    ds = p * (dp - delta)
    if HAS_CAP:
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
def _attn_bwd_relb(Q, K_, V_, DO, LSE, DELTA, P, NS, RATE, SLOPE, CAP, DROPP, RELB, PART,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, KVG,
                   H, N, S0, S1, S2, NT1, NT2, NTILES, NPAR, D, DV, scale, seed, relb_hs,
                   R0, R1, R2, T,
                   TM0: tl.constexpr, TM1: tl.constexpr, TM2: tl.constexpr,
                   BD: tl.constexpr, BDV: tl.constexpr, CH: tl.constexpr,
                   HAS_DECAY: tl.constexpr, METRIC: tl.constexpr, DEC0: tl.constexpr,
                   DEC1: tl.constexpr, DEC2: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_CAP: tl.constexpr, HAS_DROP: tl.constexpr, HAS_SINK: tl.constexpr):
    """The relative_bias table gradient, deterministically: program (p, bh) owns the row
    PART[bh, p, :] and the query tiles p, p + NPAR, ...; per tile it walks the table entries
    the tile reaches and, per entry, the key offsets that clip to it (one key per query
    for each offset: a row-wise dot, no atomics); sink keys are added per chunk of entries.
    The wrapper sums PART over batches and programs in a fixed order."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_sink = tl.load(NS + h)
    d0, d1, d2 = _dilations(P, h)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    qbase = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kbase = b.to(tl.int64) * skb + (h // KVG).to(tl.int64) * skh
    vbase = b.to(tl.int64) * svb + (h // KVG).to(tl.int64) * svh
    row = PART + (bh.to(tl.int64) * NPAR + pid) * T
    big = NO_KEY
    for tile in range(pid, NTILES, NPAR):
        qx0, qx1, qx2, qvalid = _query_lanes(tile, P, h, S0, S1, S2, NT1, NT2, TM0, TM1, TM2)
        qf = (qx0 * S1 + qx1) * S2 + qx2
        lo0, hi0, lo1, hi1, lo2, hi2 = _ranges(qx0, qx1, qx2, P, h, S0, S1, S2)
        q = tl.load(Q + qbase + qf[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=qvalid[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + bh.to(tl.int64) * N * DV + qf[:, None] * DV + offs_dv[None, :],
                     mask=qvalid[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * N + qf, mask=qvalid, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * N + qf, mask=qvalid, other=0.0)
        i0, i1, i2 = qx0 // d0, qx1 // d1, qx2 // d2
        # in-group key offsets any query of the tile reaches, per dim
        om0 = tl.min(tl.where(qvalid, lo0 - i0, big))
        oM0 = tl.max(tl.where(qvalid, hi0 - i0, -big))
        om1 = tl.min(tl.where(qvalid, lo1 - i1, big))
        oM1 = tl.max(tl.where(qvalid, hi1 - i1, -big))
        om2 = tl.min(tl.where(qvalid, lo2 - i2, big))
        oM2 = tl.max(tl.where(qvalid, hi2 - i2, -big))
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
                    val = tl.sum(tl.zeros([TM0 * TM1 * TM2], dtype=tl.float32), 0)
                    for jo0 in range(jl0, jh0 + 1):
                        for jo1 in range(jl1, jh1 + 1):
                            for jo2 in range(jl2, jh2 + 1):
                                kx0 = qx0 + jo0 * d0
                                kx1 = qx1 + jo1 * d1
                                kx2 = qx2 + jo2 * d2
                                kf = (kx0 * S1 + kx1) * S2 + kx2
                                ok = (qvalid & (kx0 >= 0) & (kx0 < S0) & (kx1 >= 0)
                                      & (kx1 < S1) & (kx2 >= 0) & (kx2 < S2)
                                      & (lo0 <= i0 + jo0) & (i0 + jo0 <= hi0)
                                      & (lo1 <= i1 + jo1) & (i1 + jo1 <= hi1)
                                      & (lo2 <= i2 + jo2) & (i2 + jo2 <= hi2)
                                      & (kf >= n_sink))
                                k = tl.load(K_ + kbase + kf[:, None] * skn + offs_d[None, :] * skd,
                                            mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
                                v = tl.load(V_ + vbase + kf[:, None] * svn + offs_dv[None, :] * svd,
                                            mask=ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                                ds = _pair_ds(q, k, do, v, lse, delta, scale, ok, qx0, qx1, qx2,
                                              qf, kx0, kx1, kx2, kf, h, bh, N, seed, RATE, SLOPE,
                                              CAP, RELB, relb_hs, R0, R1, R2, DROPP, HAS_DECAY,
                                              METRIC, DEC0, DEC1, DEC2, HAS_ALIBI, True, HAS_CAP,
                                              HAS_DROP)
                                val += tl.sum(ds, 0)
                    e = ((a0 + R0) * (2 * R1 + 1) + (a1 + R1)) * (2 * R2 + 1) + (a2 + R2)
                    tl.store(row + e, tl.load(row + e) + val)
        tl.debug_barrier()
        if HAS_SINK:        # sink keys: each query reaches them at its own offset
            for j in range(0, n_sink):
                kf = qf * 0 + j
                kx0, kx1, kx2 = _unflat(kf, S1, S2)
                k = tl.load(K_ + kbase + kf[:, None] * skn + offs_d[None, :] * skd,
                            mask=qvalid[:, None] & (offs_d[None, :] < D), other=0.0)
                v = tl.load(V_ + vbase + kf[:, None] * svn + offs_dv[None, :] * svd,
                            mask=qvalid[:, None] & (offs_dv[None, :] < DV), other=0.0)
                ds = _pair_ds(q, k, do, v, lse, delta, scale, qvalid, qx0, qx1, qx2, qf,
                              kx0, kx1, kx2, kf, h, bh, N, seed, RATE, SLOPE, CAP, RELB,
                              relb_hs, R0, R1, R2, DROPP, HAS_DECAY, METRIC, DEC0, DEC1, DEC2,
                              HAS_ALIBI, True, HAS_CAP, HAS_DROP)
                e = _relb_index(kx0 - qx0, kx1 - qx1, kx2 - qx2, R0, R1, R2)
                for c in range(0, T, CH):
                    ent = c + tl.arange(0, CH)
                    add = tl.sum(tl.where(e[:, None] == ent[None, :], ds[:, None], 0.0), 0)
                    tl.store(row + ent, tl.load(row + ent, mask=ent < T, other=0.0) + add,
                             mask=ent < T)
            tl.debug_barrier()
