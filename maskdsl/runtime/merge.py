"""``md.merge``: combine attentions over disjoint key sets from their outputs and log-sum-exps
(ARCHITECTURE.md, "Semantics"): the user's arguments checked, then ``kernels.softmax.combine``
(which the runtime's own merges call directly).

For parts i with output ``o_i`` and log-sum-exp ``l_i`` (the log of the softmax denominator over
the part's keys): ``l = log(sum_i exp(l_i))`` and ``o = sum_i exp(l_i - l) * o_i``. A part with no
key (``l_i = -inf``) weighs nothing; a row with no key in any part outputs zeros and ``-inf``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from maskdsl._errors import MaskDSLError
from maskdsl.kernels.softmax import combine

__all__ = ["merge"]


def merge(parts: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (out, lse) of attention over the union of disjoint key sets, from each set's
    ``(out [B, H, N, D], lse [B, H, N])``; exact and differentiable.

    A ``sink_logit`` joins each part's denominator it was computed with: include it in exactly
    one part, or the merged softmax counts it once per part.

    Example:
        >>> import torch, maskdsl as md
        >>> q = k = v = torch.randn(1, 1, 8, 4, dtype=torch.float64)
        >>> whole = md.reference.attention(q, k, v, md.full(), (8,), return_lse=True)
        >>> left = md.reference.attention(q, k, v, md.window(7, 0), (8,), return_lse=True)
        >>> right = md.reference.attention(q, k, v, ~md.window(7, 0), (8,), return_lse=True)
        >>> out, lse = md.merge([left, right])
        >>> bool(torch.allclose(out, whole[0])) and bool(torch.allclose(lse, whole[1]))
        True
    """
    if isinstance(parts, (str, bytes)) or not hasattr(parts, "__len__"):
        raise MaskDSLError(f"merge: expected a list of (out, lse) pairs, got {type(parts).__name__}")
    parts = list(parts)
    if not parts:
        raise MaskDSLError("merge: expected at least one (out, lse) pair, got an empty list")
    for i, part in enumerate(parts):
        if not (isinstance(part, (tuple, list)) and len(part) == 2
                and all(isinstance(t, torch.Tensor) for t in part)):
            raise MaskDSLError(f"merge: parts[{i}]: expected a pair (out, lse) of tensors, got "
                               f"{type(part).__name__}")
        out, lse = part
        if out.dim() != 4 or lse.shape != out.shape[:3]:
            raise MaskDSLError(
                f"merge: parts[{i}]: out {list(out.shape)} and lse {list(lse.shape)}: expected "
                f"out [B, H, N, D] and lse [B, H, N]")
        if out.shape != parts[0][0].shape:
            raise MaskDSLError(f"merge: parts[{i}]: out {list(out.shape)} differs from parts[0]'s "
                               f"{list(parts[0][0].shape)}")
        if out.device != parts[0][0].device or lse.device != out.device:
            raise MaskDSLError(f"merge: parts[{i}]: tensors on {out.device} and {lse.device}; "
                               f"expected every part on {parts[0][0].device}")
        if not lse.is_floating_point() or not out.is_floating_point():
            raise MaskDSLError(f"merge: parts[{i}]: expected floating tensors, got {out.dtype} "
                               f"and {lse.dtype}")
        if out.dtype != parts[0][0].dtype:
            raise MaskDSLError(f"merge: parts[{i}]: out is {out.dtype}, parts[0]'s out "
                               f"{parts[0][0].dtype}; expected every part's out in one dtype")
    if parts[0][0].device.type == "meta":     # shapes only: no value can be read
        return combine(parts)
    # an lse is finite, -inf (no key) or NaN (a poisoned row); +inf is no attention's.
    # One host read for both questions
    lses = [lse for _, lse in parts]
    nan = torch.isnan(lses[0])
    for x in lses[1:]:
        nan = nan | torch.isnan(x)
    flags = torch.stack([nan.any()] + [torch.isposinf(x).any() for x in lses]).tolist()
    if any(flags[1:]):
        i = flags[1:].index(True)
        raise MaskDSLError(
            f"merge: parts[{i}]: lse holds +inf; expected finite values, -inf for a row "
            f"with no key or NaN for a poisoned row (the natural log of a softmax "
            f"denominator, as attn(..., return_lse=True) returns it)")
    return combine(parts, has_nan=flags[0])
