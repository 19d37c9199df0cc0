"""The ``sdpa`` backend: torch's own ``scaled_dot_product_attention`` where it is the right answer
(ARCHITECTURE.md, "Backends"): a pattern that is the whole grid (``full()``) or the plain causal
mask over the flat order (``causal()`` on a 1-D grid, or on a grid with one dim longer than 1),
with no score terms. There torch's fused kernels (flash on CPU and CUDA) run every allowed pair at
dense speed, with no mask materialised and no tile gathered; no tiled path can beat them, so
``auto`` takes this backend first (issue "Never slower than torch's own attention").

GQA goes through SDPA's ``enable_gqa`` (no copy of k and v). ``return_lse`` runs torch's CPU flash
kernel directly with its log-sum-exp made differentiable (``softmax.FlashLSE``); on other devices
SDPA has no lse output and the call is refused (``auto`` runs the next backend)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from maskdsl.codegen.simplify import simplify
from maskdsl.dsl.pattern import Causal, Full
from maskdsl.dsl.score import score_terms
from .backends import whole_grid_only
from .softmax import FlashLSE

__all__ = ["refusal", "preference", "strength", "call_refusal", "prepare", "run", "kind"]

_FLASH_LSE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kind(pattern, shape) -> Optional[str]:
    """``"full"`` or ``"causal"`` when the pattern is exactly that mask over the flat token
    order of ``shape``, else None. ``causal()`` is ``k <= q`` per listed dim; over the flat
    order that is the causal mask when exactly one dim is longer than 1 and it is listed, and
    the whole grid when no listed dim is longer than 1."""
    p = simplify(pattern)
    if isinstance(p, Full):
        return "full"
    if isinstance(p, Causal):
        long = [d for d, s in enumerate(shape) if s > 1]
        dims = range(len(shape)) if p.dims is None else p.dims      # a checked tuple
        if not any(d in dims for d in long):       # k <= q only on dims of length 1
            return "full"
        if len(long) == 1:
            return "causal"
    return None


def refusal(spec, device) -> Optional[str]:
    whole = whole_grid_only("torch's SDPA runs", spec)
    if whole is not None:
        return whole
    if kind(spec.pattern, spec.shape) is None:
        return "torch's SDPA runs only full() and the plain causal mask"
    terms = score_terms(spec.score)
    if terms:
        return f"torch's SDPA takes no score terms ({terms[0]!r})"
    return None


def preference(spec, device) -> Optional[str]:
    return None


def strength(spec, device) -> str:
    k = kind(spec.pattern, spec.shape)
    flag = "is_causal=True" if k == "causal" else "no mask"
    return (f"the pattern is the {k} mask: torch's fused scaled_dot_product_attention ({flag}) "
            f"runs every allowed pair at dense speed, with no mask or tile gathered")


def call_refusal(spec, q, k, v, return_lse: bool = False) -> Optional[str]:
    if return_lse:
        if q.device.type != "cpu":
            return ("torch's SDPA returns no log-sum-exp on "
                    f"{q.device.type}; pick backend='tiles' (or 'triton'/'flex' on CUDA)")
        if q.dtype not in _FLASH_LSE_DTYPES or q.shape[-1] != v.shape[-1]:
            return ("the log-sum-exp comes from torch's CPU flash kernel, which takes equal "
                    "q/k and v head dims in float16/bfloat16/float32/float64")
    return None


def prepare(spec):
    return kind(spec.pattern, spec.shape) == "causal"


def run(causal: bool, q, k, v, call):
    H, Hk = q.shape[1], k.shape[1]
    if not call.return_lse:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=call.scale,
                                              enable_gqa=Hk != H)
    if Hk != H:                 # the flash kernel's lse entry takes equal head counts
        k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    out, lse = FlashLSE.apply(q.contiguous(), k.contiguous(), v.contiguous(), None, call.scale,
                              causal)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.to(dt)
