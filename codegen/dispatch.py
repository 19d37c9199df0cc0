"""``backend="auto"``: pick the fastest correct backend and say why in one sentence."""
from __future__ import annotations

import math
from typing import Optional, Tuple

__all__ = ["choose", "call_time_fallback", "torch_device", "triton_refusal",
           "DENSE_MAX_TOKENS_SMALL", "TRITON_MIN_TOKENS"]

DENSE_MAX_TOKENS_SMALL = 256   # up to here the dense reference path is fastest anywhere


def _beyond_flex(score) -> Optional[object]:
    from .._score import Dropout, SinkLogit, score_terms

    for t in score_terms(score):
        if isinstance(t, (SinkLogit, Dropout)):
            return t
    return None


TRITON_MIN_TOKENS = 262144   # from here a BlockMask holds >= 2048^2 tile entries per head


def triton_refusal(pattern, score, shape, heads) -> Optional[str]:
    """None if the Triton kernel can run the pattern and score, else the reason (its message)."""
    from .._errors import MaskDSLError
    from ..kernels.triton_attn import triton
    from ..kernels.triton_params import check_score, lower_pattern

    if triton is None:
        return "triton is not installed"
    try:
        lower_pattern(pattern, shape, heads)
        check_score(score)
    except MaskDSLError as e:
        return str(e)
    return None


def choose(pattern, shape: tuple, heads: int, score, device) -> Tuple[str, str]:
    """(backend, reason) for backend="auto" on ``device``."""
    n = math.prod(shape)
    node = _beyond_flex(score)
    dev = torch_device(device)
    if n <= DENSE_MAX_TOKENS_SMALL:
        return "dense", (f"dense: {n} tokens is small enough that the dense reference path is "
                         f"the fastest")
    if dev.type == "cuda":
        refusal = triton_refusal(pattern, score, shape, heads)
        if refusal is None and node is not None:
            return "triton", (f"triton: FlexAttention cannot express {node._name}; the Triton "
                              f"kernel runs it fused (forward and backward)")
        if refusal is None and n >= TRITON_MIN_TOKENS:
            tiles = (n + 127) // 128
            return "triton", (f"triton: {n} tokens; a BlockMask would hold {tiles}^2 tile entries "
                              f"per head, the Triton kernel computes key ranges in-kernel")
        if node is None:
            return "flex", ("flex: on CUDA the pattern compiles to a mask_mod with an analytic "
                            "BlockMask (forward and backward)")
        return "tiles", (f"tiles: FlexAttention cannot express {node._name} and the Triton "
                         f"kernel cannot run this pattern; the tiled PyTorch path can")
    return "tiles", (f"tiles: on {dev.type}, block-sparse PyTorch over the analytic tiles is the "
                     f"fastest path and the only one with a backward (Flex is inference-only there)")


def torch_device(device):
    import torch

    from .._inputs import check_device

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device, usable=False)


def call_time_fallback(q, k, v, score=None) -> Optional[str]:
    """Why flex cannot run this call (None if it can), as the message a user who asked for
    flex reads: what is wrong and what to do."""
    import torch

    from .._score import score_terms
    from .flex import FLEX_DTYPES

    if q.dtype not in FLEX_DTYPES:
        names = "/".join(str(d).replace("torch.", "") for d in FLEX_DTYPES)
        return (f"flex does not support {q.dtype}; pass {names} inputs or pick "
                f"backend='tiles'")
    if q.device.type == "cpu" and torch.is_grad_enabled():
        if any(t.requires_grad for t in (q, k, v)):
            return ("flex has no backward on CPU; run under torch.no_grad() with inputs that "
                    "do not require grad, or pick backend='tiles'")
        for term in score_terms(score):   # learnable score parameters would get no gradient
            for name, value in vars(term).items():
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    return (f"flex has no backward on CPU, so {term._name}'s {name} (a tensor "
                            f"that requires grad) would get no gradient; run under "
                            f"torch.no_grad() or pick backend='tiles'")
    return None
