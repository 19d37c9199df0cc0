"""Running what a compiled attention covers beyond square self-attention over one grid (the
request itself, ``Extent``, is checked in ``dsl.extent``): extra tokens as the grid's attention (any backend) merged through the log-sum-exp with
dense stripes for the extra keys and queries (O(N x E), never (N + E)^2 for the grid part);
sub-ranges on the rectangle path (``rect``) over the key tiles the row-major tile classes list.
"""
from __future__ import annotations

import torch

from maskdsl import reference
from maskdsl._errors import MaskDSLError
from maskdsl.dsl.extent import Extent
from maskdsl.dsl.score import Softcap, per_head_tensor, score_extras, score_terms
from maskdsl.kernels.backends import Choice, requested
from maskdsl.kernels.softmax import FlashLSE, add_sink, combine
from .rect import bad_rows, rect_attention, row_major, tiled_rect

__all__ = ["extent_choice", "run_extent", "dense_stripe", "softcap_values"]

# ---------------------------------------------------------------------- running

def softcap_values(score, heads: int, device):
    """Per-head softcap values [H] (None without a softcap term)."""
    for t in score_terms(score):
        if isinstance(t, Softcap):
            return per_head_tensor(t.cap, t, "cap", heads, device)
    return None


def extent_choice(spec, extent: Extent, backend: str):
    """The backend choice of a sub-range request. ``tiles`` (and ``auto``): the rectangle
    path over the key tiles the row-major tile classes list for each chunk of query tiles;
    ``dense``: the reference; flex and triton are refused (their kernels take the whole grid)."""
    if backend in ("flex", "triton"):
        raise MaskDSLError(
            f"backend={backend!r}: {extent.describe()}: the {backend} kernels run the whole "
            f"grid; sub-ranges run on backend='tiles' (PyTorch, any device) or 'dense'")
    if backend == "dense":
        choice = requested("dense", spec, torch.device("cpu"))
    else:
        choice = Choice("tiles", "tiles: a sub-range runs on the rectangle path: each chunk of "
                                 "query tiles against the key tiles its tile classes list, "
                                 "the token mask evaluated at global coordinates")
    return choice


def run_extent(attn, q, k, v, scale: float, return_lse: bool):
    """A call of a CompiledAttention with extra tokens or sub-ranges, on checked tensors."""
    ext = attn.extent
    if ext.extra:
        out, lse = _run_extra(attn, q, k, v, scale)
    elif attn.backend == "dense":
        out, lse = reference.attention(q, k, v, attn.pattern, attn.shape, score=attn.score,
                                       scale=scale, q_range=ext.q, kv_range=ext.kv,
                                       return_lse=True)
    else:
        out, lse = _run_range(attn, q, k, v, scale)
    return (out, lse) if return_lse else out


def _run_extra(attn, q, k, v, scale):
    """Grid queries: the grid's own attention (any backend, with its lse) merged with a dense
    stripe over the extra keys; extra queries (``extra="all"``): dense over every key."""
    ext, H = attn.extent, attn.heads
    N = ext.n
    qg, kg, vg = q[:, :, :N], k[:, :, :N], v[:, :, :N]
    ke, ve = k[:, :, N:], v[:, :, N:]
    try:
        grid = attn.grid_call(qg, kg, vg, scale, True)
    except MaskDSLError as e:
        raise MaskDSLError(f"{ext.describe()}: the grid's attention is merged with the extra "
                           f"tokens' through its log-sum-exp: {e}") from None
    cap = softcap_values(attn.score, H, q.device)
    sink, _ = score_extras(attn.score, H, q.device, False)
    stripe = dense_stripe(qg, ke, ve, scale, cap, None)
    out, lse = combine([grid, stripe])
    if ext.mode == "all":
        ox, lx = dense_stripe(q[:, :, N:], k, v, scale, cap, sink)
        out, lse = torch.cat([out, ox.to(out.dtype)], 2), torch.cat([lse, lx.to(lse.dtype)], 2)
    return out, lse


def dense_stripe(q, k, v, scale, cap, sink):
    """(out, lse) of q against every key of k, v (a dense stripe): torch's CPU flash kernel
    with its differentiable lse when it can (no softcap, equal head dims, finite inputs; the g
    query heads of a kv head folded into its rows; a sink logit merged in as a part with no
    value), else the rectangle path, which also isolates non-finite rows."""
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


def _run_range(attn, q, k, v, scale):
    """Sub-range queries against sub-range keys: per chunk of query tiles of the row-major
    program, the key tiles its classes list (every head's), cut to ``kv_range``."""
    ext = attn.extent
    N = ext.n
    q0, q1 = ext.q if ext.q is not None else (0, N)
    k0, k1 = ext.kv if ext.kv is not None else (0, N)
    sink, _ = score_extras(attn.score, attn.heads, q.device, False)
    return tiled_rect(row_major(attn), q, k, v, torch.arange(q0, q1), torch.arange(k0, k1),
                      scale, sink=sink)
