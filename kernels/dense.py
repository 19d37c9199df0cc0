"""The ``dense`` backend: the reference itself (``maskdsl.reference.attention``), when asked for.

It materialises [B, H, N, N] logits, so an explicit request is refused beyond ``MAX_TOKENS``.
``auto`` does not take it: the tiles backend (one SDPA call with a materialised mask where
gathering would not pay) and the sdpa backend are faster at every size (256 tokens, H=4, D=64
on the benchmark CPU: 0.5-0.7 ms against 2.2-6.0 ms forward)."""
from __future__ import annotations

from typing import Optional

import torch

from maskdsl import reference
from maskdsl.dsl.score import Dropout, without

__all__ = ["refusal", "preference", "strength", "call_refusal", "prepare", "run", "next_keep",
           "MAX_TOKENS"]

MAX_TOKENS = 32768        # beyond this the [B, H, N, N] logits are out of the question


def refusal(spec, device) -> Optional[str]:
    if spec.n > MAX_TOKENS:
        return (f"{spec.n} tokens is too many for the dense backend, which materialises "
                f"[B, H, N, N]; expected N <= {MAX_TOKENS} (try backend='tiles' or 'flex')")
    return None


def preference(spec, device) -> Optional[str]:
    return "the reference materialises every logit: the other backends are faster at any size"


def strength(spec, device) -> str:
    return "the reference path, exactly as the oracle computes it"


def call_refusal(spec, q, k, v, return_lse: bool = False) -> Optional[str]:
    return None


def prepare(spec):
    return spec


def run(spec, q, k, v, call) -> torch.Tensor:
    if spec.ranged:            # the reference at global coordinates (it isolates non-finite rows)
        e = spec.extent
        return reference.attention(q, k, v, spec.pattern, spec.shape, score=spec.score,
                                   scale=call.scale, q_range=e.q, kv_range=e.kv,
                                   return_lse=call.return_lse)
    B, H, N, _ = q.shape
    reference.check_dense_size("backend='dense'", B, H, N, q.dtype)
    score, keep = spec.score, None
    if call.dropout_p is not None:
        keep = reference.dropout_mask(score, B, H, N, q.device, generator=call.generator)
    else:                                  # not training (or no dropout term): no dropout
        score = without(score, Dropout)
    return reference.attention(q, k, v, spec.pattern, spec.shape, score=score,
                               scale=call.scale, dropout_keep=keep, return_lse=call.return_lse)


def next_keep(spec, state, batch: int, drop_p, generator) -> torch.Tensor:
    """bool [B, H, N, N]: the keep mask ``run`` draws from ``generator`` (a copy of the call's)."""
    return reference.dropout_mask(spec.score, batch, spec.heads, spec.n, generator=generator)
