"""Non-finite inputs stay in the rows that attend them (ARCHITECTURE.md, "Non-finite inputs").

The rule every backend and the reference hold: a query row is *poisoned* when its own q row
holds a NaN or an infinity, or when it attends a key whose k or v row holds one. A poisoned row
outputs NaN; every other row is computed exactly as if the non-finite rows were not there (they
are not attended by it). Gradients: a poisoned row's q gets a NaN gradient (so a gradient
scaler sees the step is bad) and the row contributes nothing to any other gradient.

One mechanism for every backend, run by ``CompiledAttention.__call__``:

1. detect: one reduction over q, k and v (a finite sum means every entry is finite, the fast
   path, and nothing below runs);
2. sanitize: non-finite rows become zeros (``torch.where``, so every other row's gradient is
   untouched) and the backend runs on finite inputs only: no kernel ever multiplies a masked-out
   probability by a NaN value, which is how one NaN used to spread to every row of a tile;
3. poison: the rows with a bad q, or attending a bad key (read off the pattern's tile plan,
   ``kernels.tiles.rows_attending``), are set to NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["all_finite", "nonfinite_rows", "sanitize", "poison", "poison_lse"]


def all_finite(*xs: torch.Tensor) -> bool:
    """Whether every entry of ``xs`` is finite: one sum each (a finite total means all are; a
    false alarm from an overflowing sum is for the caller's row check to clear) and one host
    read (on CPU a read per sum costs nothing and saves the adds and the isfinite)."""
    xs = [x for x in xs if x.numel()]
    if not xs:
        return True
    acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    if xs[0].device.type == "cpu":
        return math.isfinite(sum(x.sum(dtype=acc).item() for x in xs))
    return bool(torch.isfinite(sum(x.sum(dtype=acc) for x in xs)))


def nonfinite_rows(q, k, v) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """None when q, k and v are all finite (one reduction and one host read), else
    (bad_q [B, H, N], bad_kv [B, H_kv, N]): the rows of q, and of k or v, holding a NaN or inf."""
    if q.device.type == "meta" or q.numel() == 0:
        return None
    if all_finite(q, k, v):
        return None
    bad_q = ~torch.isfinite(q).all(-1)
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    if not bool(bad_q.any() | bad_kv.any()):   # finite entries whose sum overflowed
        return None
    return bad_q, bad_kv


def sanitize(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` with the listed rows [B, H, N] replaced by zeros (differentiable elsewhere)."""
    return torch.where(rows[..., None], torch.zeros((), dtype=x.dtype, device=x.device), x)


class _Poison(torch.autograd.Function):
    """Poisoned rows -> NaN; backward: no gradient through them, NaN into their q rows."""

    @staticmethod
    def forward(ctx, out, q, rows):
        ctx.save_for_backward(rows)
        ctx.q_meta = (q.shape, q.dtype, q.device)
        return out.masked_fill(rows[..., None], float("nan"))

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        gq = None
        if ctx.needs_input_grad[1]:
            shape, dtype, device = ctx.q_meta
            gq = torch.zeros(shape, dtype=dtype, device=device).masked_fill_(rows[..., None],
                                                                            float("nan"))
        return grad.masked_fill(rows[..., None], 0), gq, None


def poison(out: torch.Tensor, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out`` with the poisoned rows [B, H, N] set to NaN (see the module docstring)."""
    return _Poison.apply(out, q, rows)


def poison_lse(lse: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp with the poisoned rows [B, H, N] set to NaN (no gradient through them)."""
    return lse.masked_fill(rows, float("nan"))
