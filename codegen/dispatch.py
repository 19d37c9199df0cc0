"""``backend="auto"``: pick the fastest correct backend and say why in one sentence."""
from __future__ import annotations

import math
from typing import Optional, Tuple

__all__ = ["choose", "call_time_fallback", "FLEX_MIN_TOKENS_CPU"]

FLEX_MIN_TOKENS_CPU = 4096   # below this, dense beats flex's compile + launch overhead on CPU


def _beyond_flex(score) -> Optional[object]:
    from .._score import Dropout, SinkLogit, score_terms

    for t in score_terms(score):
        if isinstance(t, (SinkLogit, Dropout)):
            return t
    return None


def choose(shape: tuple, heads: int, score, dense_max: int) -> Tuple[str, str]:
    """(backend, reason) for backend="auto", decided from what is known at compile time."""
    n = math.prod(shape)
    node = _beyond_flex(score)
    if node is not None:
        if n <= dense_max:
            return "dense", (f"dense: FlexAttention cannot express {node._name}, and the tiles and "
                             f"triton backends that can are not built yet")
        return "none", (f"no backend can run {node._name} at {n} tokens yet (flex cannot express it, "
                        f"dense stops at {dense_max} tokens)")
    if n < FLEX_MIN_TOKENS_CPU:
        return "dense", (f"dense: {n} tokens is small enough that the dense reference path beats "
                         f"flex's compile and launch overhead")
    return "flex", (f"flex: {n} tokens, the pattern compiles to a mask_mod with an analytic "
                    f"BlockMask (falls back to dense for float64 or for backward on CPU)")


def call_time_fallback(q, k, v) -> Optional[str]:
    """Why flex cannot run this call (None if it can)."""
    from .flex import FLEX_DTYPES
    import torch

    if q.dtype not in FLEX_DTYPES:
        return f"flex does not support {q.dtype}"
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "flex has no backward on CPU"
    return None
