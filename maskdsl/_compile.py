"""``md.compile``: check a pattern against a shape once, then hand back a callable.

Backends: ``flex`` (generated mask_mod/score_mod + analytic BlockMask, torch.compile'd
flex_attention), ``triton`` (the fused kernel with in-kernel key ranges, no BlockMask),
``tiles`` (block-sparse PyTorch over the same tiles; any device, autograd) and ``dense`` (the
reference path, small N). ``auto`` picks one for the device and says why.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference
from ._caching import outside_inference_mode
from ._errors import MaskDSLError
from ._inputs import check_device, check_qkv, check_scale
from ._node import check_heads, check_shape
from ._pattern import And, Document, Heads, Not, Or, Pattern
from ._score import Dropout, Score, check_tensor_params, per_head_tensor, score_terms

__all__ = ["compile", "CompiledAttention", "BACKENDS"]

BACKENDS = ("auto", "dense", "flex", "tiles", "triton")
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
        source: the generated ``mask_mod`` (and ``score_mod``) Python source.
        mask_mod, score_mod: the generated functions (flex signatures).
    """

    def __init__(self, pattern, shape, heads, score, backend: str, reason: str, auto: bool,
                 device=None):
        self.pattern, self.shape, self.heads, self.score = pattern, shape, heads, score
        self.backend, self.reason = backend, reason
        self._device = device
        self.n = math.prod(shape)
        self.training = True
        self._auto = auto
        drop = next((t for t in score_terms(score) if isinstance(t, Dropout)), None)
        self._generator = torch.Generator().manual_seed(drop.seed) if drop is not None else None
        self._masks = {}
        self._program = None
        self._triton_plan = None
        # tensors the compiled structure was built from (document ids): an in-place change
        # (a new version) drops every cached plan, so the next call rebuilds from the new ids
        self._structural = [n.ids for n in walk(pattern)
                            if isinstance(n, Document) and isinstance(n.ids, torch.Tensor)]
        self._versions = self._structure_versions()

    def _structure_versions(self):
        out = []
        for t in self._structural:
            try:
                out.append(t._version)
            except RuntimeError:   # inference tensors keep no version counter: compare content
                out.append(t.detach().cpu().clone())
        return out

    def _refresh(self):
        """Forget every plan built from structural tensors that changed in place since."""
        now = self._structure_versions()
        same = all((a == b) if isinstance(a, int) and isinstance(b, int)
                   else isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                   and torch.equal(a, b) for a, b in zip(now, self._versions))
        if not same:
            self._versions = now
            self._masks, self._program, self._triton_plan = {}, None, None
            self._tiles_prog = None

    def __reduce__(self):
        # Pickling and deepcopy keep only the spec (and the dropout stream's position): every
        # cache, plan and compiled kernel is rebuilt on first use (they hold locks and devices).
        state = {"training": self.training,
                 "generator": self._generator.get_state() if self._generator is not None else None}
        requested = "auto" if self._auto else self.backend
        return (_rebuild, (self.pattern, self.shape, self.heads, self.score, requested,
                           None if self._device is None else str(self._device), state))

    def __repr__(self):
        score = f", score={self.score!r}" if self.score is not None else ""
        return (f"CompiledAttention({self.pattern!r}, shape={self.shape}, heads={self.heads}"
                f"{score}, backend={self.backend!r})")

    # ------------------------------------------------------------------ generated artefacts
    @property
    def program(self):
        """The codegen Program (IR, layout, generated source, tile classes), built on first use."""
        if self._program is None:
            from .codegen.program import program

            self._program = program(self.pattern, self.score, self.shape, self.heads)
        return self._program

    @property
    def _running(self):
        """The Program the chosen backend runs (tiles picks its own tile size)."""
        return self.tiles_program if self.backend == "tiles" else self.program

    @property
    def source(self) -> str:
        return self._running.source

    @property
    def mask_mod(self):
        return self._running.mods("cpu")[0]

    @property
    def score_mod(self):
        return self._running.mods("cpu")[1]

    def block_mask(self, device="cpu"):
        """The torch BlockMask, built analytically (in the program's token layout)."""
        return self._running.block_mask(check_device(device))

    def stats(self) -> dict:
        """Token density, block density before/after token tiling, ideal speedup, layout."""
        return self._running.stats()

    def mask(self, device="cpu") -> torch.Tensor:
        """The bool [H, N, N] mask (built once per device by the reference)."""
        device = check_device(device)
        if device not in self._masks:
            self._masks[device] = outside_inference_mode(reference.mask)(
                self.pattern, self.shape, self.heads, device)
        return self._masks[device]

    # ------------------------------------------------------------------ running
    def __call__(self, q, k, v, *, scale: Optional[float] = None) -> torch.Tensor:
        """Attention output [B, H, N, Dv] for q, k, v of shape [B, H, N, D].

        A query whose q row, or a key it attends, holds a NaN or inf outputs NaN; no other row
        is affected (ARCHITECTURE.md, "Non-finite inputs")."""
        from ._isolate import nonfinite_rows, poison, sanitize

        B, H, N, D = check_qkv(q, k, v, self.shape, self.heads)
        scale = check_scale(scale, D)
        reference.check_params_device(self.score, q.device)
        check_tensor_params(self.score)
        if self._structural:
            self._refresh()
        bad = nonfinite_rows(q, k, v)
        if bad is None:
            return self._run(q, k, v, scale)
        from .kernels.tiles import rows_attending

        bad_q, bad_kv = bad
        out = self._run(sanitize(q, bad_q), sanitize(k, bad_kv), sanitize(v, bad_kv), scale)
        return poison(out, q, bad_q | rows_attending(self.tiles_program, bad_kv))

    def _run(self, q, k, v, scale: float) -> torch.Tensor:
        """The chosen backend on checked, finite inputs."""
        if self._auto and q.device != self._device:   # auto decides per device
            from .codegen.dispatch import choose

            self._device = q.device
            self.backend, self.reason = choose(self.pattern, self.shape, self.heads, self.score,
                                                  q.device)
        if self.backend == "tiles":
            return self._tiles(q, k, v, scale)
        if self.backend == "triton":
            from .kernels.triton_attn import DTYPES

            if self._auto and q.dtype not in DTYPES:
                self.reason = (f"{self.reason.split('; this call')[0]}; this call ran tiles: "
                               f"the Triton kernel does not take {q.dtype}")
                return self._tiles(q, k, v, scale)
            return self._triton(q, k, v, scale)
        if self.backend == "flex":
            from .codegen.dispatch import call_time_fallback
            from .codegen.flex import run_flex

            why = call_time_fallback(q, k, v, self.score)
            if why is None:
                return run_flex(self.program, q, k, v, scale)
            if not self._auto:
                raise MaskDSLError(f"backend='flex': {why}")
            self.reason = f"{self.reason.split('; this call')[0]}; this call ran tiles: {why}"
            return self._tiles(q, k, v, scale)
        return self._dense(q, k, v, scale)

    def _extras(self, device):
        """Per-head sink logits and dropout probabilities [H] (None when absent; dropout also
        None when not training)."""
        from ._score import SinkLogit

        sink = drop_p = None
        for t in score_terms(self.score):
            if isinstance(t, SinkLogit):
                sink = per_head_tensor(t.values, t, "values", self.heads, device)
            elif isinstance(t, Dropout) and self.training:
                drop_p = per_head_tensor(t.p, t, "p", self.heads, device)
        return sink, drop_p

    def _tiles(self, q, k, v, scale):
        from .kernels.tiles import run_tiles

        sink, drop_p = self._extras(q.device)
        return run_tiles(self.tiles_program, q, k, v, scale, sink=sink, dropout_p=drop_p,
                         generator=self._generator)

    def _triton(self, q, k, v, scale):
        from .kernels.triton_attn import TritonPlan, run_triton, why_unavailable

        why = why_unavailable(q.device)
        if why is not None:
            raise MaskDSLError(f"backend='triton': {why}; use backend='tiles' or 'auto'")
        if self._triton_plan is None:
            self._triton_plan = TritonPlan(self.pattern, self.score, self.shape, self.heads)
        sink, drop_p = self._extras(q.device)
        # one seed per call from the compiled callable's generator: reproducible, advancing
        seed = (int(torch.randint(0, 2**31 - 1, (), generator=self._generator))
                if drop_p is not None else 0)
        return run_triton(self._triton_plan, q, k, v, scale, sink=sink, dropout_p=drop_p,
                          seed=seed)

    @property
    def tiles_program(self):
        """The Program the tiles backend runs (its tile size chosen per pattern)."""
        if getattr(self, "_tiles_prog", None) is None:
            from .kernels.tiles import tiles_program

            self._tiles_prog = tiles_program(self.pattern, self.score, self.shape, self.heads)
        return self._tiles_prog

    def _dense(self, q, k, v, scale):
        B, H, N, _ = q.shape
        reference.check_dense_size("backend='dense'", B, H, N, q.dtype)
        keep = None
        if self._generator is not None and self.training:
            keep = reference.dropout_mask(self.score, B, H, N, q.device, generator=self._generator)
        grid = reference._Grid(self.shape, self.heads, q.device)
        return reference.masked_attention(
            q, k, v, self.mask(q.device), lambda dt: reference._bias(self.score, grid, dt),
            self.score, scale, keep)


def compile(p: Pattern, shape, heads: int = 1, score: Optional[Score] = None,
            backend: str = "auto", device=None) -> CompiledAttention:
    """Compile a pattern (and optional score terms) for a token grid into an attention callable.

    Args:
        p: the pattern, e.g. ``neighborhood((7, 7)) & causal(dims=(0,))``.
        shape: the token grid (1 to 3 dims); q, k, v carry N = prod(shape) tokens, row-major.
        heads: the number of heads H (per_head lists and heads([...]) must have H entries).
        score: score terms combined with ``+``, or None.
        backend: ``"auto"`` (pick for the device and say why in ``attn.reason``), ``"flex"``,
            ``"triton"``, ``"tiles"`` or ``"dense"``.
        device: where it will run, for ``auto``'s choice (default: CUDA if available, else
            CPU); a call on another device re-decides.

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
    if backend == "auto":
        from .codegen.dispatch import choose

        from .codegen.dispatch import torch_device

        dev = torch_device(device)
        chosen, reason = choose(p, shape, heads, score, dev)
        return CompiledAttention(p, shape, heads, score, chosen, reason, auto=True, device=dev)
    if backend == "dense" and n > DENSE_MAX_TOKENS:
        raise MaskDSLError(
            f"shape={shape}: {n} tokens is too many for the dense backend, which materialises "
            f"[B, H, N, N]; expected N <= {DENSE_MAX_TOKENS} (try backend='flex')"
        )
    if backend == "flex":
        from .codegen.dispatch import _beyond_flex

        node = _beyond_flex(score)
        if node is not None:
            raise MaskDSLError(
                f"backend='flex': FlexAttention cannot express {node!r}; use backend='auto' or 'dense'"
            )
    if backend == "triton":
        from .kernels.triton_attn import TritonPlan, triton

        if triton is None:
            raise MaskDSLError("backend='triton': triton is not installed (pip install triton); "
                               "use backend='auto' or 'tiles'")
        plan = TritonPlan(p, score, shape, heads)   # raises MaskDSLError naming what it cannot run
        attn = CompiledAttention(p, shape, heads, score, backend, f"{backend} was requested",
                                 auto=False)
        attn._triton_plan = plan
        return attn
    return CompiledAttention(p, shape, heads, score, backend, f"{backend} was requested", auto=False)


def _rebuild(pattern, shape, heads, score, backend, device, state):
    attn = compile(pattern, shape, heads, score=score, backend=backend, device=device)
    attn.training = state["training"]
    if state["generator"] is not None:
        attn._generator.set_state(state["generator"])
    return attn
