"""NATTEN-compatible functions: ``na1d``, ``na2d``, ``na3d`` on heads-last tensors.

A NATTEN user switches with one import; the call stays the same::

    # import natten                      # before
    from maskdsl import natten          # after
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

NATTEN's call semantics beyond the window are kept too: key and value may carry fewer heads
than query (GQA/MQA: ``heads % heads_kv == 0``), ``additional_keys``/``additional_values``
``[B, N_add, heads_kv, D]`` are attended by every query (the pattern's ``extra_tokens`` with
``extra="keys"``), and ``return_lse=True`` returns ``(out, lse)`` with lse ``[B, *spatial, H]``
(float32, natural log), all checked against NATTEN 0.21.7. NATTEN's tuning arguments
(``backend`` names such as ``"cutlass-fna"``, tile shapes, ``torch_compile``,
``attention_kwargs``) are not accepted; ``backend`` here is a maskdsl backend (``"auto"``,
``"dense"``, ``"flex"``, ``"tiles"``).

Compiled attention callables are cached by (rank, spatial shape, heads, pattern, score,
backend), so calling ``na2d`` in every layer of a model compiles each configuration once.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from maskdsl.dsl.inputs import FLOATS
from maskdsl.dsl.pattern import neighborhood
from maskdsl.dsl.score import Score
from maskdsl.dsl.values import PerHead
from maskdsl.runtime.compiled import compile as _compile
from ._caching import LRU
from ._errors import MaskDSLError

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


def _check_additional(where: str, query, key, add_k, add_v) -> int:
    """NATTEN's additional KV: both or neither, [B, N_add, heads_kv, D] (values: Dv) agreeing
    with key and value; returns N_add (0 without)."""
    if add_k is None and add_v is None:
        return 0
    if (add_k is None) != (add_v is None):
        raise MaskDSLError(f"{where}: additional_keys and additional_values: expected both "
                           f"tensors or both None")
    for name, t in (("additional_keys", add_k), ("additional_values", add_v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise MaskDSLError(f"{where}: {name}: expected a 4-D tensor [B, N_add, heads_kv, D], "
                               f"got {list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    want = [key.shape[0], add_k.shape[1], key.shape[-2], key.shape[-1]]
    if list(add_k.shape) != want:
        raise MaskDSLError(f"{where}: additional_keys has shape {list(add_k.shape)}; expected "
                           f"{want} ([B, N_add, heads_kv, D] as key's)")
    if list(add_v.shape[:3]) != want[:3]:
        raise MaskDSLError(f"{where}: additional_values has shape {list(add_v.shape)}; expected "
                           f"[{', '.join(map(str, want[:3]))}, Dv] (additional_keys' [B, N_add, "
                           f"heads_kv])")
    if add_k.shape[1] == 0:
        raise MaskDSLError(f"{where}: additional_keys has 0 tokens; expected at least 1 or None")
    return int(add_k.shape[1])


def _check_tensors(where: str, rank: int, query, key, value):
    """Checks q, k, v are heads-last [B, *spatial, H, D] of the right rank and agree (key and
    value may carry heads_kv heads dividing H: GQA); returns (spatial shape, heads)."""
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
    hq, hk = query.shape[-2], key.shape[-2]
    if (key.shape[:-2] != query.shape[:-2] or key.shape[-1] != query.shape[-1] or hk == 0
            or hq % hk):
        raise MaskDSLError(f"{where}: key has shape {list(key.shape)} but query has "
                           f"{list(query.shape)}; expected the same shape, or heads_kv dividing "
                           f"query's {hq} heads (GQA/MQA)")
    if value.shape[:-1] != key.shape[:-1]:
        raise MaskDSLError(f"{where}: value has shape {list(value.shape)} but key has "
                           f"{list(key.shape)}; expected the same [B, {_AXES[rank]}, heads_kv] "
                           f"(the head dim D may differ)")
    return tuple(int(s) for s in query.shape[1:-2]), int(query.shape[-2])


def _compiled(where, pattern, shape, heads, score, backend, extra: int = 0):
    """The cached CompiledAttention for one configuration."""
    key = (len(shape), shape, heads, pattern, score, backend, extra)
    attn = _CACHE.get(key)
    if attn is not None:
        return attn
    try:
        attn = _compile(pattern, shape, heads, score=score, backend=backend, extra_tokens=extra,
                        extra="keys")
    except MaskDSLError as e:
        raise MaskDSLError(f"{where}: {e} (spatial shape {shape}, heads={heads})") from None
    return _CACHE.put(key, attn)


def _prepare(rank, query, key, value, kernel_size, stride, dilation, is_causal, score, backend,
             add_k=None, add_v=None):
    """The checks of a call and its (cached) CompiledAttention."""
    where = f"na{rank}d"
    shape, heads = _check_tensors(where, rank, query, key, value)
    extra = _check_additional(where, query, key, add_k, add_v)
    if score is not None and not isinstance(score, Score):
        raise MaskDSLError(f"{where}: score={score!r}: expected score terms such as "
                           f"md.distance_decay(0.1) or None")
    if not isinstance(backend, str):
        raise MaskDSLError(f"{where}: backend={backend!r}: expected one of 'auto', 'dense', "
                           f"'flex', 'tiles'")
    pattern = neighborhood_pattern(where, rank, kernel_size, stride, dilation, is_causal)
    return _compiled(where, pattern, shape, heads, score, backend, extra)


def _bhnd(query, key, value, add_k, add_v):
    """Heads-last [B, *spatial, H, D] (and the additional KV [B, N_add, H_kv, D]) -> q, k, v
    [B, H, N (+ N_add), D] as ``CompiledAttention`` takes them."""
    B = query.shape[0]
    n = math.prod(query.shape[1:-2])

    def to_bhnd(t):
        return t.reshape(B, n, t.shape[-2], t.shape[-1]).transpose(1, 2)

    q, k, v = to_bhnd(query), to_bhnd(key), to_bhnd(value)
    if add_k is not None:
        k = torch.cat([k, add_k.transpose(1, 2)], 2)
        v = torch.cat([v, add_v.transpose(1, 2)], 2)
    return q, k, v


def _heads_last(query, res, return_lse: bool):
    if return_lse:
        out, lse = res
        return (out.transpose(1, 2).reshape(*query.shape[:-1], out.shape[-1]),
                lse.transpose(1, 2).reshape(*query.shape[:-1]))
    return res.transpose(1, 2).reshape(*query.shape[:-1], res.shape[-1])


def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
        backend, add_k=None, add_v=None, return_lse=False):
    where = f"na{rank}d"
    if not isinstance(return_lse, bool):
        raise MaskDSLError(f"{where}: return_lse={return_lse!r}: expected True or False")
    if torch.compiler.is_compiling():
        return _na_traced(rank, query, key, value, kernel_size, stride, dilation, is_causal,
                          scale, score, backend, add_k, add_v, return_lse)
    attn = _prepare(rank, query, key, value, kernel_size, stride, dilation, is_causal, score,
                    backend, add_k, add_v)
    q, k, v = _bhnd(query, key, value, add_k, add_v)
    try:
        res = attn(q, k, v, scale=scale, return_lse=return_lse)
    except MaskDSLError as e:
        raise MaskDSLError(f"{where}: {e} (query shape {list(query.shape)})") from None
    return _heads_last(query, res, return_lse)


def _na_traced(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
               backend, add_k=None, add_v=None, return_lse=False):
    """``_na`` while Dynamo traces it: the Python checks and the compile run once, at trace
    time, and the call is one custom op (ARCHITECTURE.md, "torch.compile")."""
    # deferred: the op module's trace-time functions import torch._dynamo (~0.8 s), which only
    # a torch.compile trace needs
    from maskdsl.runtime import ops as _ops

    args = (kernel_size, stride, dilation, is_causal, score, backend)
    extra = (add_k, add_v) if add_k is not None or add_v is not None else ()
    metas = tuple(_ops.stand_in(t) for t in (query, key, value, *extra))
    error = _ops.natten_check(_prepare, rank, metas, *args)
    if error:
        out = _ops.refusal(query, key, value, error)
        return (out, out[..., 0].float()) if return_lse else out
    q, k, v = _bhnd(query, key, value, add_k, add_v)
    prepared = _ops.natten_prepare(_prepare, rank, metas, *args,
                                   _ops.call_meta(q, k, v, scale, return_lse))
    res = _ops.finish(prepared, score, q, k, v, True, where=f"na{rank}d: ",
                      return_lse=return_lse, scale=scale)
    return _heads_last(query, res, return_lse)


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
        additional_keys, additional_values: [B, N_add, heads_kv, D] (values: Dv) tokens every
            query attends besides its neighborhood (NATTEN's additional KV: text tokens beside
            a video grid), or None.
        return_lse: also return the log-sum-exp [B, {axes}, H] (float32, natural log).
        score: maskdsl score terms (keyword only), e.g. ``md.distance_decay(0.1)``. A
            ``md.dropout`` term is always applied here (functions have no train/eval mode; the
            ``maskdsl.nn`` modules follow ``module.training``).
        backend: maskdsl backend (keyword only): ``"auto"``, ``"dense"``, ``"flex"``, ``"tiles"``.

    Returns:
        [B, {axes}, H, Dv], in query's dtype (and the lse with ``return_lse``). key and value
        may carry heads_kv heads dividing H (GQA/MQA).

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
         stride=1, dilation=1, is_causal=False, scale: Optional[float] = None,
         additional_keys: Optional[torch.Tensor] = None,
         additional_values: Optional[torch.Tensor] = None, *, return_lse: bool = False,
         score: Optional[Score] = None, backend: str = "auto"):
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
               backend, additional_keys, additional_values, return_lse)


def na2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
         stride=1, dilation=1, is_causal=False, scale: Optional[float] = None,
         additional_keys: Optional[torch.Tensor] = None,
         additional_values: Optional[torch.Tensor] = None, *, return_lse: bool = False,
         score: Optional[Score] = None, backend: str = "auto"):
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
               backend, additional_keys, additional_values, return_lse)


def na3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
         stride=1, dilation=1, is_causal=False, scale: Optional[float] = None,
         additional_keys: Optional[torch.Tensor] = None,
         additional_values: Optional[torch.Tensor] = None, *, return_lse: bool = False,
         score: Optional[Score] = None, backend: str = "auto"):
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, score,
               backend, additional_keys, additional_values, return_lse)


for _rank, _fn in ((1, na1d), (2, na2d), (3, na3d)):
    _fn.__doc__ = _DOC.format(rank=_rank, axes=_AXES[_rank],
                              example=", ".join(["6"] * _rank))
del _rank, _fn
