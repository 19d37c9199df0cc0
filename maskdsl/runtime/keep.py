"""The dropout keep mask a backend's next call will draw, in the reference's [B, H, N, N] layout,
without advancing the compiled callable's generator (``maskdsl check`` compares a dropout run
against the reference given the backend's own keep mask; ARCHITECTURE.md, "Command line").

Each backend draws differently, so each says how in its ``next_keep(spec, state, batch, drop_p,
generator)`` hook (the backend protocol): dense with the reference's own ``dropout_mask``; tiles
one uniform per gathered (query, key slot) of its plan, query tiles in chunks; Triton in-kernel
from one seed per call. Flex has no dropout, and no hook.
"""
from __future__ import annotations

import torch

from maskdsl.dsl.score import score_extras
from maskdsl.kernels import backends

__all__ = ["next_keep_mask"]


def next_keep_mask(attn, backend: str, batch: int) -> torch.Tensor:
    """bool [B, H, N, N]: the keep mask ``backend``'s next call of ``attn`` draws (CPU): the
    backend's own ``next_keep`` hook, on a copy of the callable's generator."""
    hook = getattr(backends.get(backend), "next_keep", None)
    if hook is None:
        raise ValueError(f"{backend} draws no dropout")
    gen = torch.Generator()
    gen.set_state(attn.dropout_state())         # a copy: the callable's stream stays where it is
    _, drop_p = score_extras(attn.score, attn.heads, "cpu", True)
    spec = backends.Spec(attn.pattern, attn.score, attn.shape, attn.heads)
    return hook(spec, attn.backend_state(backend), batch, drop_p, gen)
