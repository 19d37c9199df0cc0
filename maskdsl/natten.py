"""NATTEN-compatible functions: ``na1d``, ``na2d``, ``na3d`` on heads-last tensors.

A NATTEN user switches with one import; the call stays the same::

    # import natten                      # before
    from maskdsl import natten           # after
    out = natten.na2d(q, k, v, kernel_size=(7, 7), stride=(1, 1), dilation=(2, 1),
                      is_causal=(False, False))   # q, k, v, out: [B, X, Y, H, D]

The tensors use NATTEN's heads-last layout ``[B, *spatial, H, D]`` and the semantics are
NATTEN's generalized neighborhood attention (``md.neighborhood``: kernel size, stride,
dilation and per-dim causality, windows shifted at the borders), checked against NATTEN itself
in ``tests/test_natten.py`` and ``tests/test_natten_api.py``.

What the switch gains:

* CPU training: ``backend="auto"`` picks a path with autograd on every device (NATTEN's CPU
  backend has no backward), and any float dtype and head dim (NATTEN on CPU needs a power of
  two in [8, 512]).
* Score terms: ``score=md.distance_decay(0.1) + md.softcap(30.0)`` (and relative-position bias,
  ALiBi, sink logits, attention dropout) are applied inside the same call.
* Per-head kernels: any of ``kernel_size``, ``stride``, ``dilation`` may be
  ``md.per_head([...])`` with one value per head, e.g.
  ``na2d(q, k, v, kernel_size=md.per_head([3, 5, 7, 9]))`` for 4 heads.

NATTEN's tuning arguments (``backend`` names such as ``"cutlass-fna"``, tile shapes,
``torch_compile``, ``additional_keys``/``additional_values``, ``return_lse``) are not accepted;
``backend`` here is a maskdsl backend (``"auto"``, ``"dense"``, ``"flex"``, ``"tiles"``).

Compiled attention callables are cached by (rank, spatial shape, heads, pattern, score,
backend), so calling ``na2d`` in every layer of a model compiles each configuration once.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ._caching import LRU
from ._compile import compile as _compile
from ._errors import MaskDSLError
from ._inputs import FLOATS
from ._pattern import neighborhood
from ._score import Score
from ._values import PerHead

__all__ = ["na1d", "na2d", "na3d"]

_AXES = {1: "L", 2: "X, Y", 3: "X, Y, Z"}
_CACHE_SIZE = 128                          # compiled configurations kept (least recently used out)
_CACHE = LRU(_CACHE_SIZE)


# ----------------------------------------------------------------------------- argument checks

def per_dim_arg(where: str, name: str, value, rank: int, kind: str):
    """NATTEN's per-dim argument rules: an int (bool for ``is_causal``) repeated on every dim,
    or a tuple/list with one entry per dim. ``md.per_head`` lists pass through unchanged (the
    pattern checks them). Returns the value as a tuple (or the per_head list)."""
    if isinstance(value, PerHead):
        if kind == "bool":
            raise MaskDSLError(f"{where}: {name}={value!r}: is_causal cannot vary per head; "
                               f"expected a bool or a tuple of {rank} bools")
        return value
    if kind == "bool":
        if value is None:                 # NATTEN accepts is_causal=None for False
            return (False,) * rank
        ok = lambda x: isinstance(x, bool)                                   # noqa: E731
        legal = f"a bool or a tuple of {rank} bool{'s' if rank > 1 else ''}"
    else:
        ok = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool)  # noqa: E731
        legal = f"an int or a tuple of {rank} int{'s' if rank > 1 else ''}"
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, tuple):
        if len(value) != rank:
            raise MaskDSLError(f"{where}: {name}={value!r} has {len(value)} entries; expected "
                               f"{legal} (one per spatial dim)")
        for i, x in enumerate(value):
            if not ok(x) and not isinstance(x, PerHead):
                raise MaskDSLError(f"{where}: {name}[{i}]={x!r}: expected {legal}")
        return tuple(x if isinstance(x, PerHead) or kind == "bool" else int(x) for x in value)
    if not ok(value):
        raise MaskDSLError(f"{where}: {name}={value!r}: expected {legal}")
    return (value if kind == "bool" else int(value),) * rank


def neighborhood_pattern(where: str, rank: int, kernel_size, stride, dilation, is_causal):
    """``md.neighborhood`` for NATTEN-style arguments of a rank-``rank`` call."""
    kernel = per_dim_arg(where, "kernel_size", kernel_size, rank, "int")
    stride = per_dim_arg(where, "stride", stride, rank, "int")
    dilation = per_dim_arg(where, "dilation", dilation, rank, "int")
    causal = per_dim_arg(where, "is_causal", is_causal, rank, "bool")
    try:
        return neighborhood(kernel, stride=stride, dilation=dilation, causal=causal)
    except MaskDSLError as e:
        raise MaskDSLError(f"{where}: {e}") from None


def _check_tensors(where: str, rank: int, query, key, value):
    """Checks q, k, v are heads-last [B, *spatial, H, D] of the right rank and agree;
    returns (spatial shape, heads)."""
    layout = f"[B, {_AXES[rank]}, H, D]"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise MaskDSLError(f"{where}: {name}: expected a torch.Tensor {layout}, got "
                               f"{type(t).__name__}")
        if t.dim() != rank + 3:
            raise MaskDSLError(
                f"{where}: {name} has shape {list(t.shape)} ({t.dim()}-D); expected a "
                f"{rank + 3}-D tensor {layout} (heads-last, as in NATTEN)"
                + (f"; try na{t.dim() - 3}d" if 1 <= t.dim() - 3 <= 3 else ""))
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in FLOATS:
            raise MaskDSLError(f"{where}: {name} has dtype {t.dtype}; expected a floating-point "
                               f"dtype ({', '.join(str(d).replace('torch.', '') for d in FLOATS)})")
    if key.shape != query.shape:
        raise MaskDSLError(f"{where}: key has shape {list(key.shape)} but query has "
                           f"{list(query.shape)}; expected the same shape")
    if value.shape[:-1] != query.shape[:-1]:
        raise MaskDSLError(f"{where}: value has shape {list(value.shape)} but query has "
                           f"{list(query.shape)}; expected the same [B, {_AXES[rank]}, H] (the "
                           f"head dim D may differ)")
    return tuple(int(s) for s in query.shape[1:-2]), int(query.shape[-2])


def _compiled(where, pattern, shape, heads, score, backend):
    """The cached CompiledAttention for one configuration."""
    key = (len(shape), shape, heads, pattern, score, backend)
    attn = _CACHE.get(key)
    if attn is not None:
        return attn
    try:
        attn = _compile(pattern, shape, heads, score=score, backend=backend)
    except MaskDSLError as e:
        raise MaskDSLError(f"{where}: {e} (spatial shape {shape}, heads={heads})") from None
    return _CACHE.put(key, attn)


def _prepare(rank, query, key, value, kernel_size, stride, dilation, is_causal, score, backend):
    """The checks of a call and its (cached) CompiledAttention."""
    where = f"na{rank}d"
    shape, heads = _check_tensors(where, rank, query, key, value)
    if score is not None and not isinstance(score, Score):
        raise MaskDSLError(f"{where}: score={score!r}: expected score terms such as "
                           f"md.distance_decay(0.1) or None")
    if not isinstance(backend, str):
        raise MaskDSLError(f"{where}: backend={backend!r}: expected one of 'auto', 'dense', "
                           f"'flex', 'tiles'")
    pattern = neighborhood_pattern(where, rank, kernel_size, stride, dilation, is_causal)
    return _compiled(where, pattern, shape, heads, score, backend)


def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
        backend):
    where = f"na{rank}d"
    if torch.compiler.is_compiling():
        return _na_traced(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                          scale, score, backend)
    attn = _prepare(rank, query, key, value, kernel_size, stride, dilation, is_causal, score,
                    backend)
    B, n, heads = query.shape[0], math.prod(attn.shape), attn.heads

    def to_bhnd(t):                        # [B, *spatial, H, D] -> [B, H, N, D]
        return t.reshape(B, n, heads, t.shape[-1]).transpose(1, 2)

    try:
        out = attn(to_bhnd(query), to_bhnd(key), to_bhnd(value), scale=scale)
    except MaskDSLError as e:
        raise MaskDSLError(f"{where}: {e} (query shape {list(query.shape)})") from None
    return out.transpose(1, 2).reshape(*query.shape[:-1], out.shape[-1])


def _na_traced(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
               backend):
    """``_na`` while Dynamo traces it: the Python checks and the compile run once, at trace
    time, and the call is one custom op (ARCHITECTURE.md, "torch.compile")."""
    from . import _ops

    args = (kernel_size, stride, dilation, is_causal, score, backend)
    metas = tuple(_ops.stand_in(t) for t in (query, key, value))
    error = _ops.natten_check(rank, metas, *args)
    if error:
        return _ops.refuse(query, key, value, "", error, "")
    B, heads = query.shape[0], query.shape[-2]
    n = math.prod(query.shape[1:-2])

    def to_bhnd(t):
        return t.reshape(B, n, heads, t.shape[-1]).transpose(1, 2)

    q, k, v = to_bhnd(query), to_bhnd(key), to_bhnd(value)
    prepared = _ops.natten_prepare(rank, metas, *args, _ops.call_meta(q, k, v, scale))
    out = _ops.finish(prepared, score, q, k, v, True, where=f"na{rank}d: ")
    return out.transpose(1, 2).reshape(*query.shape[:-1], out.shape[-1])


# ----------------------------------------------------------------------------- public functions

_DOC = """{rank}-D neighborhood attention, a drop-in for ``natten.na{rank}d``.

    Args:
        query, key: [B, {axes}, H, D] (heads-last, as in NATTEN).
        value: [B, {axes}, H, Dv].
        kernel_size: window size per dim: an int (same on every dim), a tuple of {rank}, or
            ``md.per_head([...])`` with one value per head. 2 <= kernel_size and
            kernel_size * dilation <= the spatial size.
        stride: queries in groups of ``stride`` share a window; 1 <= stride <= kernel_size.
        dilation: attend within the residue class ``x % dilation``.
        is_causal: a bool or a tuple of {rank} bools (per-dim causality).
        scale: logit scale, default ``D ** -0.5``.
        score: maskdsl score terms (keyword only), e.g. ``md.distance_decay(0.1)``. A
            ``md.dropout`` term is always applied here (functions have no train/eval mode; the
            ``maskdsl.nn`` modules follow ``module.training``).
        backend: maskdsl backend (keyword only): ``"auto"``, ``"dense"``, ``"flex"``, ``"tiles"``.

    Returns:
        [B, {axes}, H, Dv], in query's dtype.

    Raises:
        MaskDSLError: for a wrong tensor rank, q/k/v shapes that disagree, and kernel, stride,
            dilation or causal values the spatial shape cannot hold.

    Example:
        >>> import torch
        >>> from maskdsl import natten
        >>> q = k = v = torch.randn(1, {example}, 2, 8)
        >>> natten.na{rank}d(q, k, v, kernel_size=3).shape
        torch.Size([1, {example}, 2, 8])
    """


def na1d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
         stride=1, dilation=1, is_causal=False, scale: Optional[float] = None, *,
         score: Optional[Score] = None, backend: str = "auto") -> torch.Tensor:
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
               backend)


def na2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
         stride=1, dilation=1, is_causal=False, scale: Optional[float] = None, *,
         score: Optional[Score] = None, backend: str = "auto") -> torch.Tensor:
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
               backend)


def na3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
         stride=1, dilation=1, is_causal=False, scale: Optional[float] = None, *,
         score: Optional[Score] = None, backend: str = "auto") -> torch.Tensor:
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
               backend)


for _rank, _fn in ((1, na1d), (2, na2d), (3, na3d)):
    _fn.__doc__ = _DOC.format(rank=_rank, axes=_AXES[_rank],
                              example=", ".join(["6"] * _rank))
del _rank, _fn
