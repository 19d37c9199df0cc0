"""``md.compile``: check a pattern against a shape once, then hand back a callable.

Backends (ARCHITECTURE.md, "Backends"): ``flex`` (generated mask_mod/score_mod + analytic
BlockMask, torch.compile'd flex_attention), ``triton`` (the fused kernel with in-kernel key
ranges, no BlockMask), ``tiles`` (block-sparse PyTorch over the same tiles; any device,
autograd) and ``dense`` (the reference path, small N). ``auto`` picks one for the device and
says why. This module knows the backends only through ``kernels.backends``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from maskdsl import reference
from maskdsl._caching import outside_inference_mode
from maskdsl._errors import MaskDSLError
from maskdsl.dsl.extent import Extent, check_extent
from maskdsl.dsl.inputs import check_call, check_device, check_qkv
from maskdsl.dsl.node import check_heads, check_shape, walk
from maskdsl.dsl.pattern import Document, Pattern
from maskdsl.dsl.score import Dropout, Score, score_extras, score_terms
from maskdsl.codegen.program import Program
from maskdsl.kernels import backends
from maskdsl.kernels.isolate import nonfinite_rows, poison, poison_lse, sanitize
from maskdsl.kernels.tiles import rows_attending
from .extent import run_extra
from .interop import flex_inputs, row_major_block_mask, row_major_program
from .kvcache import KVCache, lookback_of

__all__ = ["compile", "CompiledAttention", "BACKENDS"]

BACKENDS = ("auto", *backends.BACKENDS)     # what md.compile(backend=...) accepts


@dataclass
class Prepared:
    """Everything a :class:`CompiledAttention` builds from its structure, in one typed object it
    owns (ARCHITECTURE.md, "Caches"): other modules ask for a piece through
    ``attn.backend_state(name)`` and ``attn.prepared(field, build)``, never write it. Dropped as
    a whole when document ids change in place, so no derived artefact (a KV cache's lookback,
    a halo plan, a Flex mask) outlives the ids it was read from."""

    backends: Dict[str, Any] = field(default_factory=dict)   # backend name -> prepare(spec)
    row_major: Any = None     # the public artefacts' Program (``interop.row_major_program``)
    plain: Any = None         # positions equal to flat indices (``rect.row_major``)
    reach: Any = None         # ``rect.key_reach`` of ``plain``
    lookback: Any = None      # ``kvcache.Lookback``
    masks: Dict[Any, Any] = field(default_factory=dict)      # device -> reference mask


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
        backend: the backend that runs it; reason: why that one, in one sentence (and, when an
            ``auto`` call had to run another backend, which and why).
        training: whether a ``dropout`` term is applied (default True; set False to evaluate).
        source: the generated ``mask_mod`` (and ``score_mod``) Python source.
        mask_mod, score_mod: the generated functions (flex signatures), like ``source`` and
            ``block_mask()`` in the user's row-major token order; ``flex_inputs("tiled")``
            gives the tiled form the flex backend runs, with its permutation.
    """

    def __init__(self, spec, choice, auto: bool, device=None, extent=None):
        self._spec = spec
        self.pattern, self.shape, self.heads, self.score = (spec.pattern, spec.shape, spec.heads,
                                                            spec.score)
        self._choice = choice
        self._device = device
        self.n = math.prod(self.shape)
        #: extra tokens and sub-ranges (``extent.Extent``; square self-attention by default)
        self.extent = extent if extent is not None else Extent(self.n)
        self.training = True
        self._auto = auto
        drop = next((t for t in score_terms(self.score) if isinstance(t, Dropout)), None)
        self._generator = torch.Generator().manual_seed(drop.seed) if drop is not None else None
        self._prepared = Prepared()
        self._last_call = None          # (backend, refusals) when an auto call fell back
        # tensors the compiled structure was built from (document ids): an in-place change
        # (a new version) drops every prepared state, so the next call rebuilds from new ids
        self._structural = [n.ids for n in walk(self.pattern)
                            if isinstance(n, Document) and isinstance(n.ids, torch.Tensor)]
        self._versions = self._structure_versions()
        self._generation = 0            # + 1 at each change (a KV cache compares it per step)

    # ------------------------------------------------------------------ what was chosen
    @property
    def backend(self) -> str:
        return self._choice.backend

    @property
    def reason(self) -> str:
        text = self._choice.reason
        if self._last_call is not None:
            name, met = self._last_call
            text += f"; this call ran {name}: " + "; ".join(f"{n}: {w}" for n, w in met)
        return text

    def __reduce__(self):
        # Pickling and deepcopy keep only the spec (and the dropout stream's position): every
        # cache, plan and compiled kernel is rebuilt on first use (they hold locks and devices).
        state = {"training": self.training,
                 "generator": self.dropout_state()}
        e = self.extent
        state["extent"] = dict(extra_tokens=e.extra, extra=e.mode, q_range=e.q, kv_range=e.kv)
        return (_rebuild, (self.pattern, self.shape, self.heads, self.score, self.requested,
                           None if self._device is None else str(self._device), state))

    @property
    def requested(self) -> str:
        """The backend asked for: ``"auto"``, or the name given to ``md.compile``."""
        if self._auto:
            return "auto"
        return self.backend

    @property
    def device(self):
        """The device ``auto`` decided for (None for an explicitly requested backend)."""
        return self._device

    @property
    def per_object(self) -> bool:
        """Whether this object holds state of its own beyond its content: a dropout stream, or
        document ids (whose in-place changes it notices)."""
        return self._generator is not None or bool(self._structural)

    @property
    def last_backend(self) -> str:
        """The backend the last call ran (``auto`` may have run another for those tensors)."""
        return self._last_call[0] if self._last_call is not None else self.backend

    def dropout_state(self):
        """The dropout stream's state (a uint8 tensor; None without a dropout term)."""
        return self._generator.get_state() if self._generator is not None else None

    def set_dropout_state(self, state) -> None:
        """Put the dropout stream back to ``state`` (from :meth:`dropout_state`)."""
        self._generator.set_state(state)

    def __repr__(self):
        score = f", score={self.score!r}" if self.score is not None else ""
        ext = f", {self.extent.describe()}" if not self.extent.square else ""
        return (f"CompiledAttention({self.pattern!r}, shape={self.shape}, heads={self.heads}"
                f"{score}{ext}, backend={self.backend!r})")

    # ------------------------------------------------------------------ prepared state
    def backend_state(self, name: str):
        """The prepared state of backend ``name`` (programs, plans), built on first use from
        the structure as it is now."""
        self.refresh()
        states = self._prepared.backends
        if name not in states:
            states[name] = backends.get(name).prepare(self._spec)
        return states[name]

    def prepared_state(self, name: str):
        """Backend ``name``'s prepared state if it is already built (None otherwise): nothing is
        built here."""
        self.refresh()
        return self._prepared.backends.get(name)

    def prepared(self, name: str, build):
        """The derived artefact ``name`` (a field of :class:`Prepared`: ``row_major``,
        ``plain``, ``reach``, ``lookback``), built by ``build()`` on first use from the
        structure as it is now and kept until document ids change."""
        self.refresh()
        found = getattr(self._prepared, name)
        if found is None:
            found = build()
            setattr(self._prepared, name, found)
        return found

    @property
    def generation(self) -> int:
        """How many times the structure changed (document ids in place) since compiling; what
        a derived artefact compares to know it is current (after :meth:`refresh`)."""
        return self._generation

    def _structure_versions(self):
        out = []
        for t in self._structural:
            try:
                out.append(t._version)
            except RuntimeError:   # inference tensors keep no version counter: compare content
                out.append(t.detach().cpu().clone())
        return out

    def refresh(self) -> int:
        """Forget every state built from structural tensors that changed in place since;
        returns :attr:`generation`."""
        if not self._structural:
            return self._generation
        now = self._structure_versions()
        same = all((a == b) if isinstance(a, int) and isinstance(b, int)
                   else isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                   and torch.equal(a, b) for a, b in zip(now, self._versions))
        if not same:
            self._versions = now
            self._prepared = Prepared()
            self._generation += 1
        return self._generation

    # ------------------------------------------------------------------ generated artefacts
    @property
    def program(self):
        """The codegen Program (recipe: IR, layout, tile classes; generated source) the running
        backend uses (flex's 128-token blocks for backends without one)."""
        state = self.backend_state(self.backend)
        if isinstance(state, Program):
            return state
        state = getattr(state, "program", None)      # a sub-range's rectangle-path program
        return state if isinstance(state, Program) else self.backend_state("flex")

    @property
    def tiles_program(self):
        """The Program the tiles backend runs (its tile size chosen per pattern)."""
        return self.backend_state("tiles")

    def _square_only(self, what: str):
        """The public artefacts describe the square grid problem: refuse them for extra tokens
        and sub-ranges rather than hand out a grid-sized mask that does not fit the call."""
        if not self.extent.square:
            raise MaskDSLError(
                f"{what}: this attention has {self.extent.describe()}, and {what} describes the "
                f"square {self.n}-token grid problem only; compile the same pattern without them "
                f"for the grid's artefacts")

    def row_major_program(self):
        """The Program in the user's row-major token order (the public artefacts' program)."""
        self._square_only("mask_mod, score_mod, source and block_mask()")
        return self.prepared("row_major", lambda: row_major_program(self))

    @property
    def source(self) -> str:
        """The generated ``mask_mod`` (and ``score_mod``) source, on row-major flat indices."""
        return self.row_major_program().source

    @property
    def mask_mod(self):
        """The generated mask_mod, on the user's row-major token indices (flex's signature)."""
        return self.row_major_program().mods("cpu", flex=True)[0]

    @property
    def score_mod(self):
        """The generated score_mod on row-major token indices, or None without score terms."""
        return self.row_major_program().mods("cpu", flex=True)[1]

    def block_mask(self, device="cpu"):
        """The torch BlockMask in the user's row-major token order (sequence length N), built
        analytically from key ranges: pass it to ``flex_attention`` with your own q, k, v.
        The tiled form the flex backend runs: :meth:`flex_inputs` with ``layout="tiled"``."""
        return row_major_block_mask(self.row_major_program(), check_device(device))

    def flex_inputs(self, layout: str = "row-major", device="cpu"):
        """Everything ``flex_attention`` needs, as a :class:`maskdsl.runtime.interop.FlexInputs`:
        mask_mod, score_mod, block_mask and, for ``layout="tiled"`` (the order the flex backend
        runs: compact N-D tiles, fewer non-empty blocks), the gather/scatter indices with
        ``to_layout(x)`` / ``from_layout(out)`` to move tensors in and out of it."""
        self._square_only("flex_inputs()")
        return flex_inputs(self, layout, device)

    @property
    def lookback(self):
        """What a KV cache of this pattern keeps (:class:`maskdsl.runtime.kvcache.Lookback`: ``tokens``,
        ``sinks``, ``window``, ``bounded``, ``granule``), from the pattern's key reach (document
        ids changed in place are read anew); raises MaskDSLError, naming a pair, when some
        query attends a key of a later decoding step."""
        return lookback_of(self)

    def kv_cache(self, batch: int = 1, kv_heads: Optional[int] = None, head_dim: int = 64,
                 dtype=torch.float32, device="cpu", head_dim_v: Optional[int] = None):
        """A :class:`maskdsl.runtime.kvcache.KVCache` for decoding this pattern: ``out =
        cache.step(q, k, v)`` appends the next tokens (one, a chunk, or whole slabs of dim 0
        for N-D grids) and returns attention for them at their global positions, keeping only
        the keys a later query can attend (``attn.lookback``). ``kv_heads``: key/value heads
        (GQA; default ``heads``). A step equals ``attn(q, k, v)``'s rows: the same argument
        checks, the document ids and score tensors as they are now, the extra keys of
        ``extra_tokens=E, extra="keys"`` (given once with ``cache.set_extra(k, v)``).
        ``extra="all"`` and ``q_range``/``kv_range`` are refused (ARCHITECTURE.md, "Sub-ranges
        and the KV cache"), as are buffers beyond the memory budget."""
        return KVCache(self, batch, kv_heads, head_dim, dtype, device, head_dim_v)

    def stats(self) -> dict:
        """Token density, block density before/after token tiling, ideal speedup, layout."""
        return self.program.stats()

    def mask(self, device="cpu") -> torch.Tensor:
        """The bool [H, N, N] mask (built once per device by the reference)."""
        self._square_only("mask()")
        device = check_device(device)
        self.refresh()
        masks = self._prepared.masks
        if device not in masks:
            masks[device] = outside_inference_mode(reference.mask)(
                self.pattern, self.shape, self.heads, device)
        return masks[device]

    # ------------------------------------------------------------------ running
    def __call__(self, q, k, v, *, scale: Optional[float] = None, return_lse: bool = False):
        """Attention output [B, H, N, Dv] for q, k, v of shape [B, H, N, D].

        k and v may carry H_kv heads dividing H (grouped-query attention): query head i reads
        key/value head i // (H // H_kv), as SDPA's ``enable_gqa`` and Flex do; no backend but
        ``triton`` copies them to H heads.

        ``return_lse=True`` returns ``(out, lse)``: lse float32 (float64 for float64 inputs)
        [B, H, N], the natural log of each row's softmax denominator (sink logits included),
        -inf for a row with no key, differentiable wherever the backend has a backward;
        :func:`maskdsl.merge` combines such pairs (ARCHITECTURE.md, "Log-sum-exp").

        A query whose q row, or a key it attends, holds a NaN or inf outputs NaN (and a NaN
        lse); no other row is affected (ARCHITECTURE.md, "Non-finite inputs"). Under
        ``torch.compile`` the call is one custom op that runs this same eager call
        (ARCHITECTURE.md, "torch.compile")."""
        if not isinstance(return_lse, bool):
            raise MaskDSLError(f"return_lse={return_lse!r}: expected True or False")
        if torch.compiler.is_compiling():
            # deferred: the op module imports torch._dynamo (~0.8 s), which only a trace needs
            from .ops import compiled_call

            return compiled_call(self, q, k, v, scale, return_lse)
        B, H, N, D = check_qkv(q, k, v, self.shape, self.heads, extent=self.extent)
        scale = check_call(self.score, q.device, scale, D, return_lse)
        self.refresh()
        if self.extent.extra:
            return run_extra(self, q, k, v, scale, return_lse)
        if self.extent.ranged:      # the backend isolates non-finite rows of a sub-range itself
            return self._run(q, k, v, scale, return_lse)
        return self.grid_call(q, k, v, scale, return_lse)

    def grid_call(self, q, k, v, scale: float, return_lse: bool):
        """Self-attention over the grid on checked q, k, v (the grid's tokens only), with the
        non-finite isolation: the square call, and the grid part of an extra-token call."""
        H = q.shape[1]
        bad = nonfinite_rows(q, k, v)
        if bad is None:
            return self._run(q, k, v, scale, return_lse)
        bad_q, bad_kv = bad
        res = self._run(sanitize(q, bad_q), sanitize(k, bad_kv), sanitize(v, bad_kv), scale,
                        return_lse)
        if bad_kv.shape[1] != H:                 # GQA: each query head sees its kv head's rows
            bad_kv = bad_kv.repeat_interleave(H // bad_kv.shape[1], dim=1)
        rows = bad_q | rows_attending(self.tiles_program, bad_kv)
        if return_lse:
            return poison(res[0], q, rows), poison_lse(res[1], rows)
        return poison(res, q, rows)

    def decide(self, q, k, v, return_lse: bool = False) -> str:
        """The backend that runs a call on these tensors: ``auto`` re-decides for a new device
        and, for this call, runs the next backend when the chosen one refuses the tensors (the
        reason says so); an explicitly requested backend that refuses them raises
        MaskDSLError. The one dispatch for eager calls and torch.compile's trace."""
        name = self.backend
        if self._auto:
            if q.device != self._device:        # auto decides per device
                self._device = q.device
                self._choice = backends.choose(self._spec, q.device)
                name = self.backend
            ran, met = backends.fallback(self._spec, name, q, k, v, q.device, return_lse)
            self._last_call = (ran, met) if met else None
            return ran
        why = backends.get(name).call_refusal(self._spec, q, k, v, return_lse)
        if why is not None:
            raise MaskDSLError(f"backend={name!r}: {why}")
        return name

    def _run(self, q, k, v, scale: float, return_lse: bool = False):
        """The chosen backend on checked, finite inputs."""
        name = self.decide(q, k, v, return_lse)
        sink, drop_p = score_extras(self.score, self.heads, q.device, self.training)
        call = backends.Call(scale, sink, drop_p, self._generator, return_lse)
        return backends.get(name).run(self.backend_state(name), q, k, v, call)

    def variant(self, score=None, training: Optional[bool] = None, generator=None):
        """A copy that runs this attention with ``score`` (the same structure with other
        tensors: torch.compile's graph inputs), in ``training`` mode and drawing dropout from
        ``generator`` (each None: this object's). It shares this object's prepared state unless
        the score differs (the backends' states hold the score: prepared again); this object
        is never changed."""
        run = object.__new__(type(self))
        run.__dict__.update(self.__dict__)
        if training is not None:
            run.training = training
        if generator is not None:
            run._generator = generator
        if score is not None and score is not self.score:
            run._spec = backends.Spec(self.pattern, score, self.shape, self.heads,
                                      self._spec.extent)
            run.score = score
            run._prepared = Prepared()
        return run


def compile(p: Pattern, shape, heads: int = 1, score: Optional[Score] = None,
            backend: str = "auto", device=None, *, extra_tokens: int = 0, extra: str = "all",
            q_range=None, kv_range=None) -> CompiledAttention:
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
        extra_tokens: E tokens after the grid's (keyword only; text tokens beside a video
            grid, registers): q, k, v hold N + E tokens; every grid query attends its pattern's
            grid keys plus every extra key, every extra query attends every key. The additive
            score terms apply to grid x grid pairs only; softcap and sink_logit to every row.
        extra: ``"all"`` (extra tokens are queries too) or ``"keys"`` (k and v only hold them:
            NATTEN's additional KV; q holds N tokens).
        q_range, kv_range: (start, end) flat ranges of the grid (keyword only): q holds the
            global queries ``start..end`` and k, v the keys of ``kv_range``; the pattern and
            score are evaluated at global coordinates (chunked prefill, context parallelism).
            Merge the lse-weighted outputs of disjoint key ranges with ``md.merge``.

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
    extent = check_extent(shape, extra_tokens, extra, q_range, kv_range, score)
    if backend not in BACKENDS:
        raise MaskDSLError(
            f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}"
        )
    spec = backends.Spec(p, score, shape, heads, extent if extent.ranged else None)
    if backend == "auto":
        dev = (torch.device("cuda" if torch.cuda.is_available() else "cpu") if device is None
               else check_device(device, usable=False))
        return CompiledAttention(spec, backends.choose(spec, dev), auto=True, device=dev,
                                 extent=extent)
    dev = torch.device("cuda") if backend == "triton" else torch.device("cpu")
    return CompiledAttention(spec, backends.requested(backend, spec, dev), auto=False,
                             extent=extent)


def _rebuild(pattern, shape, heads, score, backend, device, state):
    attn = compile(pattern, shape, heads, score=score, backend=backend, device=device,
                   **state.get("extent", {}))
    attn.training = state["training"]
    if state["generator"] is not None:
        attn.set_dropout_state(state["generator"])
    return attn
