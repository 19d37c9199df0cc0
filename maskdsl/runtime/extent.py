"""Extra tokens (the request itself, ``Extent``, is checked in ``dsl.extent``): the grid's
attention on any backend, with its lse, merged with dense stripes for the extra keys and
queries (O(N x E), never (N + E)^2 for the grid part). Sub-ranges are not composed here: the
backends take them in their ``Spec`` (tiles runs them on the rectangle path, ``kernels.rect``;
dense on the reference; flex and triton refuse by name)."""
from __future__ import annotations

import torch

from maskdsl._errors import MaskDSLError
from maskdsl.dsl.score import score_extras
from maskdsl.kernels.rect import dense_stripe, softcap_values
from maskdsl.kernels.softmax import combine

__all__ = ["run_extra"]


def run_extra(attn, q, k, v, scale: float, return_lse: bool):
    """A call of a CompiledAttention with extra tokens, on checked tensors. Grid queries: the
    grid's own attention (any backend, with its lse) merged with a dense stripe over the extra
    keys; extra queries (``extra="all"``): dense over every key."""
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
    return (out, lse) if return_lse else out
