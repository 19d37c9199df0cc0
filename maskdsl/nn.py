"""Attention layers built on ``md.compile``: any pattern, and NATTEN-compatible modules.

``PatternAttention`` is the usual multi-head self-attention block (one Linear to q, k, v,
attention, one output Linear) with the attention restricted by a maskdsl pattern and shaped by
optional score terms::

    import maskdsl as md
    from maskdsl.nn import PatternAttention
    layer = PatternAttention(dim=256, heads=8, pattern=md.neighborhood((7, 7)), shape=(32, 32),
                             score=md.distance_decay(md.per_head([0.0, 0.05] * 4)))
    y = layer(x)            # x: [B, 32, 32, 256] or [B, 1024, 256]; y has x's layout

``NeighborhoodAttention1D/2D/3D`` take the arguments of NATTEN's modules of the same names
(``embed_dim``, ``num_heads``, ``kernel_size``, ``stride``, ``dilation``, ``is_causal``,
``qkv_bias``, ``qk_scale``, ``proj_drop``), read the token grid from each input
``[B, *spatial, embed_dim]`` and keep NATTEN's parameter names (``qkv``, ``proj``) and q/k/v
channel order, so a NATTEN checkpoint loads with ``load_state_dict``. Unlike NATTEN's they train
on CPU and accept ``score=`` terms and ``md.per_head`` kernels.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional

import torch
from torch import nn

from maskdsl.dsl.inputs import check_scale
from maskdsl.dsl.node import check_shape
from maskdsl.dsl.pattern import Pattern
from maskdsl.dsl.score import Score, score_tensors
from maskdsl.runtime.compiled import BACKENDS, CompiledAttention
from maskdsl.runtime.compiled import compile as _compile
from ._errors import MaskDSLError
from .natten import _AXES, neighborhood_pattern

__all__ = ["PatternAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
           "NeighborhoodAttention3D"]


def _positive_int(where: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise MaskDSLError(f"{where}: {name}={v!r}: expected a positive int")
    return int(v)


class PatternAttention(nn.Module):
    """Multi-head self-attention restricted to a maskdsl pattern.

    ``x -> Linear(dim, 3 * dim) -> q, k, v [B, heads, N, dim // heads] -> md.compile(pattern,
    shape, heads, score)(q, k, v) -> Linear(dim, dim)``. The q/k/v channels of the first Linear
    are ordered ``[3, heads, head_dim]`` (as in NATTEN and timm); with ``kv_heads`` (grouped-query
    attention) it is ``Linear(dim, (heads + 2 * kv_heads) * head_dim)``, ordered q, k, v.

    Args:
        dim: embedding size (channels); must be divisible by ``heads``.
        heads: number of attention heads.
        pattern: the pattern, e.g. ``md.neighborhood((7, 7)) & md.causal(dims=(0,))``.
        shape: the token grid (1 to 3 dims), or None to read it from each input
            ``[B, *shape, dim]`` (compiled once per grid shape and then reused).
        score: score terms combined with ``+``, or None. ``nn.Parameter`` tensors inside them
            (e.g. a ``relative_bias`` table) are registered as this module's parameters, so
            optimizers, ``state_dict`` and ``.to()`` see them.
        qkv_bias: bias in the q/k/v projection.
        proj_bias: bias in the output projection.
        backend: ``"auto"``, ``"dense"``, ``"flex"`` or ``"tiles"`` (see ``md.compile``).
        scale: logit scale (keyword only), default ``head_dim ** -0.5``.
        proj_drop: dropout probability after the output projection (keyword only).
        kv_heads: key/value heads (keyword only; default ``heads``): grouped-query attention,
            query head i reads key/value head ``i // (heads // kv_heads)``.

    A ``dropout`` score term is applied only in training mode (``module.train()``).

    Example:
        >>> import maskdsl as md, torch
        >>> layer = PatternAttention(16, 2, md.neighborhood((3, 3)), shape=(6, 6))
        >>> layer(torch.randn(1, 6, 6, 16)).shape
        torch.Size([1, 6, 6, 16])
        >>> layer(torch.randn(1, 36, 16)).shape
        torch.Size([1, 36, 16])
    """

    _arg_names = ("dim", "heads")   # as spelled in this class's signature, for messages

    def __init__(self, dim: int, heads: int, pattern: Pattern, shape, score: Optional[Score] = None,
                 qkv_bias: bool = True, proj_bias: bool = True, backend: str = "auto", *,
                 scale: Optional[float] = None, proj_drop: float = 0.0,
                 kv_heads: Optional[int] = None):
        super().__init__()
        where = type(self).__name__
        dim_name, heads_name = self._arg_names
        dim = _positive_int(where, dim_name, dim)
        heads = _positive_int(where, heads_name, heads)
        if dim % heads:
            raise MaskDSLError(f"{where}: {dim_name}={dim} is not divisible by "
                               f"{heads_name}={heads}; expected "
                               f"{dim_name} = {heads_name} * head_dim")
        if not isinstance(pattern, Pattern):
            raise MaskDSLError(f"{where}: pattern={pattern!r}: expected a pattern such as "
                               f"md.neighborhood(7)")
        if score is not None and not isinstance(score, Score):
            raise MaskDSLError(f"{where}: score={score!r}: expected score terms such as "
                               f"md.softcap(30.0) or None")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise MaskDSLError(f"{where}: backend={backend!r}: expected one of "
                               f"{', '.join(map(repr, BACKENDS))}")
        if isinstance(proj_drop, bool) or not isinstance(proj_drop, numbers.Real) \
                or not 0 <= proj_drop < 1:
            raise MaskDSLError(f"{where}: proj_drop={proj_drop!r}: expected a number in [0, 1)")
        kv_heads = heads if kv_heads is None else _positive_int(where, "kv_heads", kv_heads)
        if heads % kv_heads:
            raise MaskDSLError(f"{where}: kv_heads={kv_heads} does not divide {heads_name}="
                               f"{heads}; expected a divisor (grouped-query attention)")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.kv_heads = kv_heads
        self.scale = check_scale(scale, self.head_dim)
        self.pattern, self.score, self.backend = pattern, score, backend
        self._compiled: Dict[tuple, CompiledAttention] = {}
        self.shape = None
        if shape is not None:
            try:
                shape = check_shape(shape)
            except MaskDSLError as e:
                raise MaskDSLError(f"{where}: {e}") from None
            self.shape = self.attention(shape).shape     # checks the pattern against the grid
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(float(proj_drop))
        learnable = {id(v): v for v in score_tensors(score) if isinstance(v, nn.Parameter)}
        if learnable:
            self.score_params = nn.ParameterList(learnable.values())

    def __getstate__(self):
        # copy.deepcopy / torch.save keep the spec; compiled attention is rebuilt on first use
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return dict(state, _compiled={})

    def extra_repr(self) -> str:
        score = f", score={self.score!r}" if self.score is not None else ""
        kv = f", kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        return (f"dim={self.dim}, heads={self.heads}{kv}, pattern={self.pattern!r}, "
                f"shape={self.shape}{score}, backend={self.backend!r}")

    def attention(self, shape: tuple) -> CompiledAttention:
        """The compiled attention for a grid ``shape`` (compiled on first use, then cached)."""
        attn = self._compiled.get(shape)
        if attn is None:
            try:
                attn = _compile(self.pattern, shape, self.heads, score=self.score,
                                backend=self.backend)
            except MaskDSLError as e:
                raise MaskDSLError(f"{type(self).__name__}: {e}") from None
            self._compiled[shape] = attn
        return attn

    def _grid(self, x: torch.Tensor) -> tuple:
        """The token grid of input ``x``; raises MaskDSLError when x does not fit."""
        where = type(self).__name__
        if self.shape is None:
            if not 3 <= x.dim() <= 5:
                raise MaskDSLError(f"{where}: x has shape {list(x.shape)}; expected [B, *shape, "
                                   f"{self.dim}] with 1 to 3 grid dims")
            return tuple(int(s) for s in x.shape[1:-1])
        n = math.prod(self.shape)
        grid = tuple(x.shape[1:-1])
        if grid != self.shape and grid != (n,):
            raise MaskDSLError(
                f"{where}: x has shape {list(x.shape)}; expected [B, "
                f"{', '.join(map(str, self.shape))}, {self.dim}] or [B, {n}, {self.dim}] for "
                f"shape={self.shape}")
        return self.shape

    def _check_input(self, x) -> tuple:
        """The token grid of input ``x``; raises MaskDSLError when x does not fit."""
        where = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise MaskDSLError(f"{where}: x: expected a torch.Tensor [B, *shape, {self.dim}], got "
                               f"{type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise MaskDSLError(f"{where}: x has shape {list(x.shape)}; expected the last dim to "
                               f"be dim={self.dim}")
        return self._grid(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over x of shape [B, *shape, dim] or [B, N, dim]; returns x's layout.
        Under ``torch.compile`` the checks and the attention's compile run once, at trace time
        (ARCHITECTURE.md, "torch.compile")."""
        where = type(self).__name__
        compiling = torch.compiler.is_compiling()
        if compiling:
            # deferred: the op module imports torch._dynamo (~0.8 s), which only a trace needs
            from .runtime import ops as _ops

            shape, error = _ops.module_grid(self, _ops.stand_in(x))
            if error:
                return _ops.refusal(x, x, x, error)
        else:
            shape = self._check_input(x)
        B, n, H, Dh, Hk = x.shape[0], math.prod(shape), self.heads, self.head_dim, self.kv_heads
        qkv = self.qkv(x.reshape(B, n, self.dim))
        if Hk == H:
            q, k, v = qkv.reshape(B, n, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        else:                                                      # q: H heads, k and v: Hk
            q, k, v = qkv.split([H * Dh, Hk * Dh, Hk * Dh], dim=-1)
            q, k, v = (t.reshape(B, n, -1, Dh).transpose(1, 2) for t in (q, k, v))
        if compiling:
            prepared = _ops.module_prepare(self, shape, _ops.call_meta(q, k, v, self.scale))
            out = _ops.finish(prepared, self.score, q, k, v, self.training, where=f"{where}: ",
                              scale=self.scale)
        else:
            attn = self.attention(shape)
            attn.training = self.training
            try:
                out = attn(q, k, v, scale=self.scale)
            except MaskDSLError as e:
                raise MaskDSLError(f"{where}: {e}") from None
        out = out.transpose(1, 2).reshape(B, n, self.dim)
        return self.proj_drop(self.proj(out)).reshape(x.shape)


class _NeighborhoodAttention(PatternAttention):
    """NATTEN-compatible neighborhood attention module of rank ``_rank`` (see subclasses)."""

    _rank = 0
    _arg_names = ("embed_dim", "num_heads")

    def __init__(self, embed_dim: int, num_heads: int, kernel_size, stride=1, dilation=1,
                 is_causal=False, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 proj_drop: float = 0.0, *, score: Optional[Score] = None, backend: str = "auto",
                 kv_heads: Optional[int] = None):
        where = type(self).__name__
        pattern = neighborhood_pattern(where, self._rank, kernel_size, stride, dilation,
                                       is_causal)
        # NATTEN: ``self.scale = qk_scale or head_dim ** -0.5``
        super().__init__(embed_dim, num_heads, pattern, None, score, qkv_bias=qkv_bias,
                         proj_bias=True, backend=backend, scale=qk_scale or None,
                         proj_drop=proj_drop, kv_heads=kv_heads)
        self.embed_dim, self.num_heads, self.na_dim = self.dim, self.heads, self._rank
        self.kernel_size, self.stride = pattern.kernel_size, pattern.stride
        self.dilation, self.is_causal = pattern.dilation, pattern.causal

    def extra_repr(self) -> str:
        score = f", score={self.score!r}" if self.score is not None else ""
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}{score}")

    def _grid(self, x: torch.Tensor) -> tuple:
        r = self._rank
        if x.dim() != r + 2:
            raise MaskDSLError(
                f"{type(self).__name__}: x has shape {list(x.shape)} ({x.dim()}-D); expected a "
                f"{r + 2}-D tensor [B, {_AXES[r]}, {self.dim}]")
        return tuple(int(s) for s in x.shape[1:-1])


_NA_DOC = """{rank}-D neighborhood attention, a drop-in for ``natten.NeighborhoodAttention{rank}D``.

    Args:
        embed_dim: embedding size (channels), ``num_heads * head_dim``.
        num_heads: number of attention heads.
        kernel_size: window size: an int, a tuple of {rank}, or ``md.per_head([...])``.
        stride: window step (1 <= stride <= kernel_size), int or tuple.
        dilation: dilation, int or tuple; kernel_size * dilation <= the input's spatial size.
        is_causal: a bool or a tuple of {rank} bools.
        qkv_bias: bias in the q/k/v projection.
        qk_scale: logit scale, default ``head_dim ** -0.5``.
        proj_drop: dropout probability after the output projection.
        score: maskdsl score terms (keyword only), e.g. ``md.distance_decay(0.1)``.
        backend: maskdsl backend (keyword only), default ``"auto"``.

    Input and output: [B, {axes}, embed_dim]; the grid is read from each input and the
    attention compiled once per grid shape.

    Example:
        >>> import torch
        >>> layer = NeighborhoodAttention{rank}D(embed_dim=16, num_heads=2, kernel_size=3)
        >>> layer(torch.randn(1, {example}, 16)).shape
        torch.Size([1, {example}, 16])
    """


class NeighborhoodAttention1D(_NeighborhoodAttention):
    _rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    _rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    _rank = 3


for _cls in (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D):
    _cls.__doc__ = _NA_DOC.format(rank=_cls._rank, axes=_AXES[_cls._rank],
                                  example=", ".join(["6"] * _cls._rank))
del _cls
