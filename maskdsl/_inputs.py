"""Checks on the tensors a user passes in: q, k, v, dropout keep masks, scales."""
from __future__ import annotations

import math
import numbers

import torch

from ._errors import MaskDSLError

__all__ = ["check_qkv", "check_scale"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v, shape: tuple, heads=None, dtypes=FLOATS):
    """Check q, k, v against the grid ``shape`` (and ``heads``); returns (B, H, N, D)."""
    n = math.prod(shape)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise MaskDSLError(f"{name}: expected a torch.Tensor [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise MaskDSLError(
                f"{name}: expected a 4-D tensor [B, H, N, D], got shape {list(t.shape)}"
            )
        if t.dtype not in dtypes:
            raise MaskDSLError(
                f"{name}: dtype {t.dtype} is not supported; expected one of "
                f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}"
            )
        if t.shape[2] != n:
            raise MaskDSLError(
                f"{name}: shape {list(t.shape)} has N={t.shape[2]} tokens but shape {shape} has "
                f"{n}; expected [B, H, {n}, D]"
            )
        if heads is not None and t.shape[1] != heads:
            raise MaskDSLError(
                f"{name}: shape {list(t.shape)} has H={t.shape[1]} heads but the pattern was "
                f"compiled for heads={heads}"
            )
    b, h, _, d = q.shape
    if k.shape != q.shape:
        raise MaskDSLError(f"k: shape {list(k.shape)} differs from q's {list(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise MaskDSLError(
            f"v: shape {list(v.shape)} differs from q's {list(q.shape)} in [B, H, N]"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise MaskDSLError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); expected one dtype")
    if not (q.device == k.device == v.device):
        raise MaskDSLError(
            f"q, k, v: devices differ ({q.device}, {k.device}, {v.device}); expected one device"
        )
    if d == 0 or v.shape[3] == 0:
        raise MaskDSLError(f"q, v: head dims {d} and {v.shape[3]}: expected >= 1")
    return b, h, n, d


def check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise MaskDSLError(f"scale={scale!r}: expected a finite number (default 1/sqrt(D))")
    return float(scale)
