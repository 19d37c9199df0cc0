"""maskdsl under ``torch.compile``: one custom op around ``CompiledAttention`` (ARCHITECTURE.md,
"torch.compile").

Dynamo cannot trace what a call does in Python (cache locks, ``importlib``, the non-finite check's
host read, lazily compiling a pattern), and a custom op cannot take a Python object. So a call
made while ``torch.compiler.is_compiling()`` is split in two:

* at trace time, ``_prepare`` (``torch.compiler.assume_constant_result``: Dynamo runs it as
  plain Python and bakes its result into the graph) checks what is static about the call
  (ranks, shapes, dtypes, devices, the requested backend's refusals) and registers the
  ``CompiledAttention`` in a bounded registry under a *handle*, a string;
* the graph calls ``maskdsl::attention(q, k, v, params, scale, training, handle, return_lse,
  where)``, whose real implementation runs exactly what an eager call runs
  (``CompiledAttention.__call__``: validation, the non-finite isolation, the backend; its
  ``MaskDSLError`` prefixed by ``where``), and whose fake implementation returns an empty
  [B, H, N, Dv] (and an lse [B, H, N], empty [0] when not asked for). ``params`` are the
  score's tensor parameters as the graph sees them, so a learnable rate or relative_bias table
  gets its gradient.

Only the batch size may be symbolic: ``_meta`` specializes every other size (a new size is a
new graph), a float scale is passed to the op rather than baked in, and a non-tensor argument is
handed to the checks as itself (``call_meta``, ARCHITECTURE.md "torch.compile").

Handles are keyed by content (the pattern's and score's content keys, shape, heads, requested
backend, device), never by tensor identity, so layers with the same configuration share one
entry and a graph's constants are the same in every process. Two kinds of state are per object
and get a per-object suffix: a dropout stream (each callable's generator advances on its own) and
document ids (an in-place change is noticed by the object that holds them).

Backward: ``maskdsl::attention_backward``, itself a custom op. When the graph's forward needs a
gradient (grad mode on, some input or score parameter requiring grad: static at trace time), the
forward op runs the call with autograd recording, on detached inputs, keeps that autograd graph
in a stash under a *token* (an int64 tensor it returns, saved for the backward) and hands out a
copy of the output (the graph may write into it; the kept graph must not see that); the backward
op takes the stashed graph by its token and runs ``torch.autograd.grad`` on it: no second
forward, exactly eager's gradients. The stash entry goes when the backward takes it or when the
token is freed (the graph that saved it was dropped), and the stash is bounded
(``STASH_SIZE``); without an entry (a second backward, an evicted one), the backward recomputes
the forward under ``enable_grad``, as correct at the cost of one more forward. Dropout keeps
its eager semantics: the forward returns its generator's state from before the call, and a
recomputing backward replays that state, so it drops exactly what the forward dropped; the
stream advances once per call, as in eager.

A call that eager would refuse compiles into a graph that raises the same ``MaskDSLError`` when
it runs (``maskdsl::refuse``), so bad input raises ``MaskDSLError`` under
``fullgraph=True`` too, and never breaks the graph.
"""
from __future__ import annotations

import hashlib
import itertools
import weakref
import operator
from typing import List, Optional, Tuple

import torch

from maskdsl._caching import LRU
from maskdsl._errors import MaskDSLError
from maskdsl.codegen.recipe import content_key
from maskdsl.dsl.inputs import check_qkv, check_scale
from maskdsl.dsl.score import check_params_device, score_terms

__all__ = ["compiled_call", "REGISTRY_SIZE", "handle_of"]

REGISTRY_SIZE = 512                 # CompiledAttention entries (least recently used out)
_REGISTRY = LRU(REGISTRY_SIZE)
STASH_SIZE = 1024                   # forward autograd graphs kept for their backward
_SERIAL = itertools.count()
_NO_STATE = torch.empty(0, dtype=torch.uint8)


# ---------------------------------------------------------------------- the registry

_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # attn -> its handle


def handle_of(attn) -> str:
    """The registry handle of ``attn`` (computed once per object; see the module docstring)."""
    found = _HANDLES.get(attn)
    if found is not None:
        return found
    key = (content_key(attn.pattern), content_key(attn.score), tuple(attn.shape), attn.heads,
           attn.requested, attn.extent.key(),
           None if attn.device is None else str(attn.device))
    handle = "md-" + hashlib.sha1(repr(key).encode()).hexdigest()[:20]
    if attn.per_object:
        handle += f"-{next(_SERIAL)}"      # a dropout stream, document ids: per object
    _HANDLES[attn] = handle
    return handle


def _lookup(handle: str):
    attn = _REGISTRY.get(handle)
    if attn is None:
        raise MaskDSLError(
            f"torch.compile: the compiled attention {handle!r} is no longer registered (more "
            f"than {REGISTRY_SIZE} distinct ones were used under torch.compile); call "
            f"torch._dynamo.reset() and compile again")
    return attn


def _param_fields(score) -> Tuple[Tuple[int, str], ...]:
    """(term index, field name) of every tensor-valued score parameter, in a fixed order."""
    return tuple((i, name) for i, term in enumerate(score_terms(score)) for name in term.tensors())


def _shallow(obj):
    """A copy of a score node sharing its fields (no constructor checks re-run)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


def _with_params(attn, params: List[torch.Tensor], training: bool, generator=None):
    """A CompiledAttention that runs ``attn``'s spec with the score's tensors replaced by
    ``params``, in ``training`` mode (``attn`` itself when nothing differs; ``attn`` is never
    changed): ``attn.variant``, which shares ``attn``'s dropout generator unless ``generator``
    is given (the backward's replay) and, when its tensors are ``attn``'s own, its prepared
    state."""
    fields = _param_fields(attn.score)
    old = score_terms(attn.score)
    same = all(getattr(old[i], name) is t for (i, name), t in zip(fields, params))
    if same and generator is None and attn.training == training:
        return attn
    score = None
    if not same:
        terms = list(old)
        for (i, name), t in zip(fields, params):
            if terms[i] is old[i]:
                terms[i] = _shallow(old[i])
            object.__setattr__(terms[i], name, t)
        if len(terms) == 1 and attn.score is old[0]:
            score = terms[0]
        else:
            score = _shallow(attn.score)
            object.__setattr__(score, "terms", tuple(terms))
    return attn.variant(score, training, generator)


# ---------------------------------------------------------------------- the custom ops

def _fresh(out: torch.Tensor, inputs) -> torch.Tensor:
    """``out`` as a contiguous tensor that aliases no input (what a custom op must return)."""
    out = out.contiguous()
    ptr = out.untyped_storage().data_ptr()
    if out.numel() and any(t.numel() and t.untyped_storage().data_ptr() == ptr for t in inputs):
        out = out.clone()
    return out


def _rng_state(attn, training: bool) -> torch.Tensor:
    """The dropout generator's state before this call (empty when nothing is drawn)."""
    state = attn.dropout_state() if training else None
    return _NO_STATE.clone() if state is None else state


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------- the stash

_STASH: "dict[int, tuple]" = {}       # token id -> (inputs, outputs) of a recorded forward
_STASH_IDS = itertools.count(1)
_NO_TOKEN = torch.empty(0, dtype=torch.int64)


def _recording(inputs: list, needs) -> list:
    """The inputs a recorded call runs on: q, k, v detached, requiring grad where needed; a
    score parameter that is a leaf already requiring grad (the module's own ``Parameter``) as
    itself, so the call keeps its object's prepared state (``_with_params``), others detached."""
    return [t if i >= 3 and t.is_leaf and t.requires_grad else
            t.detach().requires_grad_(bool(n) and t.is_floating_point())
            for i, (t, n) in enumerate(zip(inputs, needs))]


def _stash_put(entry: tuple) -> torch.Tensor:
    """Keep a recorded forward; returns its token (int64 [1]), whose freeing drops the entry."""
    i = next(_STASH_IDS)
    token = torch.tensor([i], dtype=torch.int64)
    _STASH[i] = entry
    weakref.finalize(token, _STASH.pop, i, None)
    while len(_STASH) > STASH_SIZE:               # the oldest first (dicts keep insertion order)
        _STASH.pop(next(iter(_STASH)), None)
    return token


def _stash_take(token: torch.Tensor):
    """The recorded forward of ``token`` (removed from the stash), or None."""
    return _STASH.pop(int(token[0]), None) if token.numel() else None


def stashed() -> int:
    """How many recorded forwards wait for their backward (tests, diagnostics)."""
    return len(_STASH)


@torch.library.custom_op("maskdsl::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: List[torch.Tensor],
              scale: float, training: bool, handle: str, return_lse: bool,
              where: str, needs: List[bool]
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, H, N, Dv] attention of the registered CompiledAttention ``handle``, its lse [B, H, N]
    (empty [0] unless ``return_lse``), the dropout generator's state before the call (for a
    recomputing backward's replay) and the stash token (empty unless some ``needs``: which of
    q, k, v and the params the graph differentiates; then the call is recorded for the
    backward). ``where`` prefixes the eager call's MaskDSLError ("na2d: ")."""
    attn = _lookup(handle)
    state = _rng_state(attn, training)
    keep = any(needs)
    inputs = [q, k, v, *params]
    try:
        if keep:
            with _autograd_dispatch(), torch.enable_grad():
                inputs = _recording(inputs, needs)
                res = _with_params(attn, inputs[3:], training)(*inputs[:3], scale=scale,
                                                               return_lse=return_lse)
        else:
            res = _with_params(attn, params, training)(q, k, v, scale=scale,
                                                       return_lse=return_lse)
    except MaskDSLError as e:
        raise MaskDSLError(f"{where}{e}") from None
    out, lse = res if return_lse else (res, q.new_empty(0, dtype=_lse_dtype(q)))
    token = _NO_TOKEN.clone()
    if keep:
        token = _stash_put((inputs, out, lse if return_lse else None))
        out, lse = out.detach().clone(), lse.detach().clone()
    return _fresh(out, (q, k, v, *params)), _fresh(lse, ()), state, token


@attention.register_fake
def _attention_fake(q, k, v, params, scale, training, handle, return_lse, where, needs):
    attn = _REGISTRY.get(handle)
    n_state = 0
    state = attn.dropout_state() if attn is not None and training else None
    if state is not None:
        n_state = state.numel()
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(*(q.shape[:-1] if return_lse else (0,)), dtype=_lse_dtype(q))
    return (out, lse, torch.empty(n_state, dtype=torch.uint8),
            torch.empty(1 if any(needs) else 0, dtype=torch.int64))


def _autograd_dispatch():
    """Autograd back on inside a custom op's implementation (the dispatcher runs it with the
    autograd keys excluded, so ``enable_grad`` alone would record nothing)."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("maskdsl::attention_backward", mutates_args=())
def attention_backward(grad: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, params: List[torch.Tensor],
                       rng_state: torch.Tensor, token: torch.Tensor, scale: float,
                       training: bool, handle: str, needs: List[bool]) -> List[torch.Tensor]:
    """Gradients of ``maskdsl::attention`` for q, k, v and each parameter (zeros where
    ``needs`` is False): from the forward's recorded graph when the stash still holds
    ``token``'s, else from the forward recomputed under ``enable_grad``; ``grad_lse`` (empty
    when the forward returned no lse) is the lse output's gradient."""
    attn = _lookup(handle)
    stashed_call = _stash_take(token)
    if stashed_call is not None and any(n and not t.requires_grad
                                        for t, n in zip(stashed_call[0], needs)):
        stashed_call = None            # recorded without a gradient now asked for: recompute
    if stashed_call is not None:
        inputs, out, lse = stashed_call
    else:
        inputs = _recording([q, k, v, *params], needs)
    wanted = [t for t, n in zip(inputs, needs) if n and t.requires_grad]
    grads = {}
    if wanted:
        with _autograd_dispatch(), torch.enable_grad():
            if stashed_call is None:
                generator = None
                if rng_state.numel():
                    generator = torch.Generator()
                    generator.set_state(rng_state)
                run = _with_params(attn, inputs[3:], training, generator=generator)
                if grad_lse.numel():
                    out, lse = run(*inputs[:3], scale=scale, return_lse=True)
                else:
                    out, lse = run(*inputs[:3], scale=scale), None
            if grad_lse.numel():
                found = torch.autograd.grad([out, lse], wanted, [grad, grad_lse],
                                            allow_unused=True)
            else:
                found = torch.autograd.grad(out, wanted, grad, allow_unused=True)
        grads = {id(t): g for t, g in zip(wanted, found)}
    return [_fresh(grads[id(t)], ()) if grads.get(id(t)) is not None else
            torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in inputs]


@attention_backward.register_fake
def _attention_backward_fake(grad, grad_lse, q, k, v, params, rng_state, token, scale, training,
                             handle, needs):
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, *params)]


def _setup_context(ctx, inputs, output):
    q, k, v, params, scale, training, handle, return_lse, _where, _needs = inputs
    _, _, state, token = output
    ctx.save_for_backward(q, k, v, state, token, *params)
    ctx.scale, ctx.training, ctx.handle, ctx.return_lse = scale, training, handle, return_lse


def _backward(ctx, grad, grad_lse, _grad_state, _grad_token):
    q, k, v, state, token, *params = ctx.saved_tensors
    nq, nk, nv, nparams = ctx.needs_input_grad[:4]
    needs = [bool(nq), bool(nk), bool(nv), *(bool(n) for n in nparams)]
    if not ctx.return_lse or grad_lse is None:
        grad_lse = grad.new_empty(0, dtype=_lse_dtype(q))
    grads = attention_backward(grad, grad_lse, q, k, v, params, state, token, ctx.scale,
                               ctx.training, ctx.handle, needs)
    out = [g if n else None for g, n in zip(grads, needs)]
    return out[0], out[1], out[2], out[3:], None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("maskdsl::refuse", mutates_args=())
def refuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: str, message: str,
           where: str, scale: Optional[float]) -> torch.Tensor:
    """Raises the ``MaskDSLError`` an eager call raises: a refused call, compiled into the
    graph. With a ``handle``, the real tensors are checked first (their exact shapes in the
    message), then ``scale`` when the call's float scale reaches the graph as a value (see
    ``call_meta``); else ``message``, the trace-time refusal. ``where`` prefixes it
    ("na2d: ")."""
    try:
        if handle:
            attn = _lookup(handle)
            check_qkv(q, k, v, attn.shape, attn.heads, extent=attn.extent)
            if scale is not None:
                check_scale(scale, q.shape[-1])
        raise MaskDSLError(message)
    except MaskDSLError as e:
        raise MaskDSLError(f"{where}{e}") from None


@refuse.register_fake
def _refuse_fake(q, k, v, handle, message, where, scale):
    if q.dim() == v.dim() >= 1:
        return q.new_empty(*q.shape[:-1], v.shape[-1])
    return q.new_empty(0)


def _refuse_backward(ctx, grad):   # pragma: no cover - the forward always raises
    return None, None, None, None, None, None, None


refuse.register_autograd(_refuse_backward)


def refusal(q, k, v, message: str, where: str = "", handle: str = "", scale=None):
    """Traced: ``refuse`` for a call whose q, k, v (or module input) may not be tensors: an
    empty [0, 0, 0, 0] stands in for each non-tensor, and the real tensors (and ``scale``) are
    re-checked only when all three are tensors."""
    args = [t if isinstance(t, torch.Tensor) else None for t in (q, k, v)]
    if any(t is None for t in args):
        empty = torch.empty(0, 0, 0, 0)
        args = [empty if t is None else t for t in args]
        handle = ""
    return refuse(*args, handle, message, where, scale)


# ---------------------------------------------------------------------- trace time

def from_meta(layout, rank, dtype, device, batch, rest, requires_grad):
    """A tensor without storage that carries what the checks read (layout, rank, dtype, device,
    shape, requires_grad); ``batch``: the batch size, 1 when it is dynamic."""
    if layout == _OBJECT:                 # not a tensor: the argument itself (``_meta``)
        return rank
    if layout != torch.strided:
        return torch.empty(0, dtype=dtype).to_sparse()
    base = torch.empty((), dtype=dtype, device=device, requires_grad=requires_grad)
    return base.expand(*((batch,) + rest)) if rank >= 1 else base


def prepare_call(attn, meta: tuple) -> tuple:
    """Trace time, as plain Python: (handle, parameter fields, scale (None: the graph passes the
    call's float), error message or "").

    ``meta`` (``call_meta``): per tensor (layout, rank, dtype, device, batch, the other sizes,
    requires_grad), the scale (``_scale_meta``), whether grad mode is on, whether the batch
    sizes agree, whether the lse is asked for. Runs the eager call's static checks and, for
    ``auto``, its choice of backend for these tensors."""
    tensors, scale, grad_mode, batch_ok, return_lse = meta
    handle = handle_of(attn)
    _REGISTRY.put(handle, attn)
    try:
        q, k, v = (from_meta(*t) for t in tensors)
        check_qkv(q, k, v, attn.shape, attn.heads, extent=attn.extent)
        if not batch_ok:
            raise MaskDSLError("q, k, v: batch sizes differ")   # refuse() names the shapes
        kind, scale = scale
        if kind == "float":       # the graph passes it, the op's eager call checks it
            scale = None
        else:
            scale = check_scale(_TensorScale(*scale) if kind == "tensor" else scale,
                                q.shape[-1])
        check_params_device(attn.score, q.device)
        ext = attn.extent
        if ext.extra:             # the grid part runs with its lse, on the grid's tokens
            return_lse = True
            q, k, v = (from_meta(*t[:5], (t[5][0], ext.n) + t[5][2:], t[6]) for t in tensors)
        with torch.set_grad_enabled(grad_mode):   # the eager call's dispatch, on stand-ins
            attn.decide(q, k, v, return_lse)
    except MaskDSLError as e:
        return handle, (), None, str(e)
    return handle, _param_fields(attn.score), scale, ""


_prepare = torch.compiler.assume_constant_result(prepare_call)


_OBJECT = "not a tensor"


def _meta(t):
    # An argument that is not a tensor travels as itself, so that the trace-time checks raise
    # eager's MaskDSLError for it (Dynamo must see it as a constant: None, a number, a list).
    if not isinstance(t, torch.Tensor):
        return (_OBJECT, t) + (None,) * 5
    # The batch size is left out (it may be dynamic; the stand-ins have batch 1, and refuse()
    # re-checks the real tensors). Every other size is specialized: torch's automatic dynamic
    # makes a dim symbolic once it changed, and a SymInt cannot reach assume_constant_result
    # (Dynamo: "argument conversion failed", then on every later recompile). operator.index
    # of a SymInt is SymInt.__index__, which Dynamo runs as guard-and-specialize (int() would
    # stay symbolic): a new size is a new graph.
    return (t.layout, t.dim(), t.dtype, t.device, 1,
            tuple(operator.index(s) for s in t.shape[1:]), t.requires_grad)


def stand_in(t):
    """Trace time: the static description of a tensor ``assume_constant_result`` can take."""
    return _meta(t)


def _scale_meta(scale) -> tuple:
    """Traced: (kind, value), the scale as ``prepare_call`` takes it. A float stays out of the
    constants (kind "float": torch's automatic dynamic makes a float that changed a SymFloat,
    which cannot be a constant of the trace; the graph passes it to the op, whose call guards on
    it and whose eager call checks it); an int is specialized like a size; a tensor goes as its
    rank and dtype; anything else (None, a str) as itself. Eager refuses all but None and
    numbers."""
    if isinstance(scale, float) and not isinstance(scale, bool):
        return ("float", None)
    if isinstance(scale, int) and not isinstance(scale, bool):
        return ("value", operator.index(scale))
    if isinstance(scale, torch.Tensor):
        return ("tensor", (scale.dim(), scale.dtype))
    return ("value", scale)


class _TensorScale:
    """Trace time: stands in for a tensor passed as ``scale`` in eager's refusal."""

    def __init__(self, rank, dtype):
        self.rank, self.dtype = rank, dtype

    def __repr__(self):
        return f"<a {self.rank}-D {str(self.dtype).replace('torch.', '')} torch.Tensor>"


def call_meta(q, k, v, scale, return_lse: bool = False) -> tuple:
    """Traced: what ``prepare_call`` reads about a call, as constants."""
    batch_ok = True                # an ``if`` on sizes: a guard and a constant, not a SymBool
    if all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in (q, k, v)):
        if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
            batch_ok = False
    return (tuple(_meta(t) for t in (q, k, v)), _scale_meta(scale), torch.is_grad_enabled(),
            batch_ok, bool(return_lse))


def finish(prepared, score, q, k, v, training: bool, where: str = "", return_lse: bool = False,
           scale=None):
    """Traced: the graph's op call for a prepared call (or the refusal it compiles to);
    ``scale``: the call's own, used when ``prepare_call`` left it to the graph (a float)."""
    handle, fields, checked, error = prepared
    runtime = isinstance(scale, float) and not isinstance(scale, bool)
    scale = scale if runtime else checked
    if error:
        out = refusal(q, k, v, error, where, handle, scale if runtime else None)
        return (out, out[..., 0].float()) if return_lse else out
    terms = score_terms(score)
    params = [getattr(terms[i], name) for i, name in fields]
    # which inputs the graph differentiates: static while Dynamo traces (it guards on grad mode
    # and requires_grad), so the op records its call for the backward only in training graphs
    grad_on = torch.is_grad_enabled()
    needs = [bool(grad_on and t.requires_grad) for t in (q, k, v, *params)]
    out, lse, _, _ = attention(q, k, v, params, scale, bool(training), handle, bool(return_lse),
                               where, needs)
    return (out, lse) if return_lse else out


def compiled_call(attn, q, k, v, scale, return_lse: bool = False):
    """What ``CompiledAttention.__call__`` runs while Dynamo traces it (no graph break)."""
    prepared = _prepare(attn, call_meta(q, k, v, scale, return_lse))
    return finish(prepared, attn.score, q, k, v, attn.training, return_lse=return_lse,
                  scale=scale)


# ---------------------------------------------------------------------- maskdsl.nn, natten

@torch.compiler.assume_constant_result
def module_grid(module, meta: tuple):
    """Trace time, for ``maskdsl.nn``: (grid shape, error message or ""): the module's input
    checks on a stand-in of x, and its attention compiled for that grid."""
    try:
        shape = module._check_input(from_meta(*meta))
        module.attention(shape)
        return shape, ""
    except MaskDSLError as e:
        return (), str(e)


@torch.compiler.assume_constant_result
def module_prepare(module, shape: tuple, meta: tuple):
    """Trace time, for ``maskdsl.nn``: ``prepare_call`` for the module's attention."""
    return prepare_call(module.attention(shape), meta)


def _natten_attention(prepare, rank, metas, kernel_size, stride, dilation, is_causal, score,
                      backend):
    tensors = [from_meta(*m) for m in metas]     # query, key, value (and the additional KV)
    return prepare(rank, *tensors[:3], kernel_size, stride, dilation, is_causal, score, backend,
                   *tensors[3:])


@torch.compiler.assume_constant_result
def natten_check(prepare, rank: int, metas: tuple, kernel_size, stride, dilation, is_causal,
                 score, backend) -> str:
    """Trace time, for ``maskdsl.natten`` (``prepare``: its ``_prepare``, passed in so that this
    module never imports natten): the call's error message, or ""."""
    try:
        _natten_attention(prepare, rank, metas, kernel_size, stride, dilation, is_causal, score,
                          backend)
        return ""
    except MaskDSLError as e:
        return str(e)


@torch.compiler.assume_constant_result
def natten_prepare(prepare, rank: int, metas: tuple, kernel_size, stride, dilation, is_causal,
                   score, backend, meta: tuple):
    """Trace time, for ``maskdsl.natten``: ``prepare_call`` for the call's attention."""
    return prepare_call(_natten_attention(prepare, rank, metas, kernel_size, stride, dilation,
                                           is_causal, score, backend), meta)
