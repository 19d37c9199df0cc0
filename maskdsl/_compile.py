"""``md.compile``: check a pattern against a shape once, then hand back a callable.

This version ships the ``dense`` backend (the reference path, for small N); the compiler
issue adds ``flex``, ``tiles`` and ``triton`` behind the same :class:`CompiledAttention`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference
from ._errors import MaskDSLError
from ._inputs import check_qkv, check_scale
from ._node import check_heads, check_shape
from ._pattern import And, Heads, Not, Or, Pattern
from ._score import Dropout, Score, score_terms

__all__ = ["compile", "CompiledAttention", "BACKENDS"]

BACKENDS = ("auto", "dense")
DENSE_MAX_TOKENS = 32768  # the dense path materialises [B, H, N, N] logits


def walk(p: Pattern):
    """Every node of a pattern tree, parents first."""
    yield p
    if isinstance(p, (And, Or)):
        yield from walk(p.a)
        yield from walk(p.b)
    elif isinstance(p, Not):
        yield from walk(p.a)
    elif isinstance(p, Heads):
        for x in p.patterns:
            yield from walk(x)


def validate(p, shape, heads: int, score=None) -> tuple:
    """Check a pattern (and score) against a grid shape and head count; returns the shape.
    Raises MaskDSLError naming the first parameter the shape or head count cannot hold."""
    if not isinstance(p, Pattern):
        hint = " (score terms go in score=...)" if isinstance(p, Score) else ""
        raise MaskDSLError(f"pattern: expected a pattern such as neighborhood(7), got {p!r}{hint}")
    if score is not None and not isinstance(score, Score):
        raise MaskDSLError(f"score: expected score terms such as softcap(30.0) or None, got {score!r}")
    shape, heads = check_shape(shape), check_heads(heads)
    for node in walk(p):
        node.bind(shape, heads)
    for term in score_terms(score):
        term.bind(shape, heads)
    return shape


class CompiledAttention:
    """Attention for one pattern, grid shape and head count; call it as ``attn(q, k, v)``.

    Attributes:
        pattern, shape, heads, score: what it was compiled for.
        backend: the backend that runs it; reason: why that one, in one sentence.
        training: whether a ``dropout`` term is applied (default True; set False to evaluate).
    """

    def __init__(self, pattern, shape, heads, score, backend: str, reason: str):
        self.pattern, self.shape, self.heads, self.score = pattern, shape, heads, score
        self.backend, self.reason = backend, reason
        self.n = math.prod(shape)
        self.training = True
        drop = next((t for t in score_terms(score) if isinstance(t, Dropout)), None)
        self._generator = torch.Generator().manual_seed(drop.seed) if drop is not None else None
        self._masks = {}

    def __repr__(self):
        score = f", score={self.score!r}" if self.score is not None else ""
        return (f"CompiledAttention({self.pattern!r}, shape={self.shape}, heads={self.heads}"
                f"{score}, backend={self.backend!r})")

    def mask(self, device="cpu") -> torch.Tensor:
        """The bool [H, N, N] mask (built once per device by the reference)."""
        device = torch.device(device)
        if device not in self._masks:
            self._masks[device] = reference.mask(self.pattern, self.shape, self.heads, device)
        return self._masks[device]

    def __call__(self, q, k, v, *, scale: Optional[float] = None) -> torch.Tensor:
        """Attention output [B, H, N, Dv] for q, k, v of shape [B, H, N, D]."""
        B, H, N, D = check_qkv(q, k, v, self.shape, self.heads)
        scale = check_scale(scale, D)
        reference.check_params_device(self.score, q.device)
        keep = None
        if self._generator is not None and self.training:
            keep = reference.dropout_mask(self.score, B, H, N, q.device, generator=self._generator)
        grid = reference._Grid(self.shape, self.heads, q.device)
        return reference.masked_attention(
            q, k, v, self.mask(q.device), lambda dt: reference._bias(self.score, grid, dt),
            self.score, scale, keep)


def compile(p: Pattern, shape, heads: int = 1, score: Optional[Score] = None,
            backend: str = "auto") -> CompiledAttention:
    """Compile a pattern (and optional score terms) for a token grid into an attention callable.

    Args:
        p: the pattern, e.g. ``neighborhood((7, 7)) & causal(dims=(0,))``.
        shape: the token grid (1 to 3 dims); q, k, v carry N = prod(shape) tokens, row-major.
        heads: the number of heads H (per_head lists and heads([...]) must have H entries).
        score: score terms combined with ``+``, or None.
        backend: ``"auto"`` or ``"dense"`` in this version.

    Returns:
        a :class:`CompiledAttention`; ``attn(q, k, v)`` with q, k, v of shape [B, H, N, D].

    Example:
        >>> import maskdsl as md, torch
        >>> attn = md.compile(md.neighborhood((3, 3)), shape=(6, 6), heads=2)
        >>> q = k = v = torch.randn(1, 2, 36, 8)
        >>> attn(q, k, v).shape
        torch.Size([1, 2, 36, 8])
    """
    shape = validate(p, shape, heads, score)
    heads = check_heads(heads)
    if backend not in BACKENDS:
        raise MaskDSLError(
            f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}"
        )
    n = math.prod(shape)
    if n > DENSE_MAX_TOKENS:
        raise MaskDSLError(
            f"shape={shape}: {n} tokens is too many for the dense backend, which materialises "
            f"[B, H, N, N]; expected N <= {DENSE_MAX_TOKENS}"
        )
    reason = ("dense was requested" if backend == "dense" else
              "dense is the only backend in this version (the reference path)")
    return CompiledAttention(p, shape, heads, score, "dense", reason)
