"""A compiled attention's row-major program and key reach, kept with its prepared state (the
rectangle path itself is ``kernels.rect``; the KV cache and context parallelism run it over the
keys they hold)."""
from __future__ import annotations

from maskdsl.kernels.rect import Reach, key_reach, plain_program

__all__ = ["row_major", "reach_of"]


def row_major(attn):
    """``kernels.rect.plain_program`` of ``attn``'s pattern and score (positions equal to flat
    token indices), built once per structure (``attn.prepared``)."""
    return attn.prepared("plain", lambda: plain_program(attn.pattern, attn.score, attn.shape,
                                                        attn.heads))


def reach_of(attn) -> Reach:
    """``kernels.rect.key_reach`` of ``attn``'s row-major program, kept with its prepared state."""
    return attn.prepared("reach", lambda: key_reach(row_major(attn)))
