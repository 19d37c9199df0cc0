"""What a compiled attention covers beyond square self-attention over one grid (ARCHITECTURE.md,
"Extra tokens" and "Sub-ranges and the KV cache"): ``extra_tokens`` (tokens after the grid's,
attended by every query; ``extra="all"``: they are queries too, attending every key;
``extra="keys"``: keys/values only, NATTEN's additional KV) and ``q_range`` / ``kv_range``
(queries and keys are the global grid's tokens with flat index in the range).

This module checks and describes the request (``reference`` reads it in its own words) and
runs it: extra tokens as the grid's attention (any backend) merged through the log-sum-exp with
dense stripes for the extra keys and queries (O(N x E), never (N + E)^2 for the grid part);
sub-ranges on the rectangle path (``rect``) over the key tiles the row-major tile classes list.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

from maskdsl._errors import MaskDSLError

__all__ = ["Extent", "check_extent", "EXTRA_MODES"]

EXTRA_MODES = ("all", "keys")


@dataclass(frozen=True)
class Extent:
    """``n``: grid tokens; ``extra``: extra tokens E; ``mode``: "all" or "keys"; ``q`` and
    ``kv``: the (start, end) flat ranges of the queries and keys."""

    n: int
    extra: int = 0
    mode: str = "all"
    q: Optional[Tuple[int, int]] = None
    kv: Optional[Tuple[int, int]] = None

    @property
    def square(self) -> bool:
        return self.extra == 0 and self.q is None and self.kv is None

    @property
    def nq(self) -> int:
        """Query tokens a call passes."""
        if self.q is not None:
            return self.q[1] - self.q[0]
        return self.n + (self.extra if self.mode == "all" else 0)

    @property
    def nk(self) -> int:
        """Key/value tokens a call passes."""
        if self.kv is not None:
            return self.kv[1] - self.kv[0]
        return self.n + self.extra

    @property
    def q0(self) -> int:
        return 0 if self.q is None else self.q[0]

    @property
    def k0(self) -> int:
        return 0 if self.kv is None else self.kv[0]

    def key(self) -> tuple:
        return (self.extra, self.mode, self.q, self.kv)

    def describe(self) -> str:
        parts = []
        if self.extra:
            parts.append(f"extra_tokens={self.extra}" + (", extra='keys'" if self.mode == "keys"
                                                         else ""))
        if self.q is not None:
            parts.append(f"q_range={self.q}")
        if self.kv is not None:
            parts.append(f"kv_range={self.kv}")
        return ", ".join(parts)


def _range(name: str, r, n: int):
    if r is None:
        return None
    if (not isinstance(r, (tuple, list)) or len(r) != 2
            or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in r)):
        raise MaskDSLError(f"{name}={r!r}: expected a pair (start, end) of ints with "
                           f"0 <= start < end <= {n}")
    a, b = int(r[0]), int(r[1])
    if not 0 <= a < b <= n:
        raise MaskDSLError(f"{name}={r!r}: expected 0 <= start < end <= {n} (the grid's tokens)")
    return (a, b)


def check_extent(shape: tuple, extra_tokens=0, extra="all", q_range=None, kv_range=None,
                 score=None) -> Extent:
    """The checked request for a grid of ``shape``; MaskDSLError names the field, the value and
    the legal range."""
    from maskdsl.dsl.score import Dropout, ScoreFn, score_terms

    n = math.prod(shape)
    if (isinstance(extra_tokens, bool) or not isinstance(extra_tokens, numbers.Integral)
            or not 0 <= extra_tokens <= 2 ** 31 - 1 - n):
        raise MaskDSLError(f"extra_tokens={extra_tokens!r}: expected an int in "
                           f"[0, {2 ** 31 - 1 - n}]")
    if extra not in EXTRA_MODES:
        raise MaskDSLError(f"extra={extra!r}: expected 'all' (extra tokens are queries and keys) "
                           f"or 'keys' (keys and values only)")
    q, kv = _range("q_range", q_range, n), _range("kv_range", kv_range, n)
    ext = Extent(n, int(extra_tokens), extra, q, kv)
    if ext.extra and (q is not None or kv is not None):
        raise MaskDSLError("extra_tokens with q_range/kv_range: expected one or the other "
                           "(split the extra tokens off and merge with md.merge)")
    if not ext.square:
        for t in score_terms(score):
            if isinstance(t, Dropout):
                raise MaskDSLError(f"{ext.describe()}: dropout is not supported beyond square "
                                   f"self-attention; drop the dropout term")
            if isinstance(t, ScoreFn) and ext.extra:
                raise MaskDSLError(f"{ext.describe()}: score_fn {t.name!r} is defined on grid "
                                   f"indices; extra tokens take softcap, sink_logit and the "
                                   f"grid-distance terms only")
    return ext


# ---------------------------------------------------------------------- running

def _softcap(score, heads: int, device):
    """Per-head softcap values [H] (None without a softcap term)."""
    from maskdsl.dsl.score import Softcap, per_head_tensor, score_terms

    for t in score_terms(score):
        if isinstance(t, Softcap):
            return per_head_tensor(t.cap, t, "cap", heads, device)
    return None


def extent_backend(spec, extent: Extent, backend: str, device):
    """The CompiledAttention of a sub-range request. ``tiles`` (and ``auto``): the rectangle
    path over the key tiles the row-major tile classes list for each chunk of query tiles;
    ``dense``: the reference; flex and triton are refused (their kernels take the whole grid)."""
    from .compiled import CompiledAttention
    from maskdsl.kernels.backends import Choice

    if backend in ("flex", "triton"):
        raise MaskDSLError(
            f"backend={backend!r}: {extent.describe()}: the {backend} kernels run the whole "
            f"grid; sub-ranges run on backend='tiles' (PyTorch, any device) or 'dense'")
    if backend == "dense":
        from maskdsl.kernels.backends import requested

        import torch

        choice = requested("dense", spec, torch.device("cpu"))
    else:
        choice = Choice("tiles", "tiles: a sub-range runs on the rectangle path: each chunk of "
                                 "query tiles against the key tiles its tile classes list, "
                                 "the token mask evaluated at global coordinates")
    return CompiledAttention(spec, choice, auto=False, extent=extent, asked=backend)


def run_extent(attn, q, k, v, scale: float, return_lse: bool):
    """A call of a CompiledAttention with extra tokens or sub-ranges, on checked tensors."""
    ext = attn.extent
    if ext.extra:
        out, lse = _run_extra(attn, q, k, v, scale)
    elif attn.backend == "dense":
        from maskdsl import reference

        out, lse = reference.attention(q, k, v, attn.pattern, attn.shape, score=attn.score,
                                       scale=scale, q_range=ext.q, kv_range=ext.kv,
                                       return_lse=True)
    else:
        out, lse = _run_range(attn, q, k, v, scale)
    return (out, lse) if return_lse else out


def _run_extra(attn, q, k, v, scale):
    """Grid queries: the grid's own attention (any backend, with its lse) merged with a dense
    stripe over the extra keys; extra queries (``extra="all"``): dense over every key."""
    import torch

    from .merge import merge
    from maskdsl.dsl.score import score_extras

    ext, H = attn.extent, attn.heads
    N = ext.n
    qg, kg, vg = q[:, :, :N], k[:, :, :N], v[:, :, :N]
    ke, ve = k[:, :, N:], v[:, :, N:]
    try:
        grid = attn.grid_call(qg, kg, vg, scale, True)
    except MaskDSLError as e:
        raise MaskDSLError(f"{ext.describe()}: the grid's attention is merged with the extra "
                           f"tokens' through its log-sum-exp: {e}") from None
    cap = _softcap(attn.score, H, q.device)
    sink, _ = score_extras(attn.score, H, q.device, False)
    stripe = _dense(qg, ke, ve, scale, cap, None)
    out, lse = merge([grid, stripe])
    if ext.mode == "all":
        ox, lx = _dense(q[:, :, N:], k, v, scale, cap, sink)
        out, lse = torch.cat([out, ox.to(out.dtype)], 2), torch.cat([lse, lx.to(lse.dtype)], 2)
    return out, lse


def _dense(q, k, v, scale, cap, sink):
    """(out, lse) of q against every key of k, v (a dense stripe): torch's CPU flash kernel
    with its differentiable lse when it can (no softcap, equal head dims, finite inputs; the g
    query heads of a kv head folded into its rows; a sink logit merged in as a part with no
    value), else the rectangle path, which also isolates non-finite rows."""
    import torch

    from .merge import merge
    from .rect import _bad_rows, rect_attention

    B, H, nq, D = q.shape
    Hk, nk = k.shape[1], k.shape[2]
    fast = (cap is None and q.device.type == "cpu" and D == v.shape[-1] and nq and nk
            and q.dtype in (torch.float32, torch.float64)
            and all(_bad_rows(x) is None for x in (q, k, v)))
    if not fast:
        return rect_attention(None, q, k, v, None, None, scale, cap=cap, sink=sink,
                              return_lse=True)
    from maskdsl.kernels.tiles import _FlashLSE

    g = H // Hk
    out, lse = _FlashLSE.apply(q.reshape(B, Hk, g * nq, D), k, v, None, scale)
    out, lse = out.reshape(B, H, nq, D), lse.reshape(B, H, nq)
    if sink is not None:
        s = sink.to(device=q.device, dtype=lse.dtype).reshape(1, H, 1).expand(B, H, nq)
        out, lse = merge([(out, lse), (torch.zeros_like(out), s)])
    return out, lse


def _run_range(attn, q, k, v, scale):
    """Sub-range queries against sub-range keys: per chunk of query tiles of the row-major
    program, the key tiles its classes list (every head's), cut to ``kv_range``."""
    import torch

    from .rect import row_major, tiled_rect
    from maskdsl.dsl.score import score_extras

    ext = attn.extent
    N = ext.n
    q0, q1 = ext.q if ext.q is not None else (0, N)
    k0, k1 = ext.kv if ext.kv is not None else (0, N)
    sink, _ = score_extras(attn.score, attn.heads, q.device, False)
    return tiled_rect(row_major(attn), q, k, v, torch.arange(q0, q1), torch.arange(k0, k1),
                      scale, sink=sink)
