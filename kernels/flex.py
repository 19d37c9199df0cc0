"""The ``flex`` backend: torch's flex_attention with the generated mods and the analytic BlockMask.

q, k, v are laid out in the program's token layout (tiles contiguous, padded), attended, and the
output is put back in the user's order; the layout is invisible outside this module.
One ``torch.compile(flex_attention)`` is shared by every program: mask_mod/score_mod objects
come from cached generated code, so layers with the same pattern reuse one compiled graph.

The BlockMask is built from the sparse tile classes directly, both directions: the key-block
lists per query block *and* the query-block lists per key block the backward needs (the
transpose of the sparse classes), so no [T, T] argsort ever runs (``BlockMask.from_kv_blocks``
with ``compute_q_blocks=True`` would sort a dense table).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from maskdsl._caching import LRU, outside_inference_mode
from maskdsl._errors import MaskDSLError
from maskdsl._memory import guard
from maskdsl.dsl.node import walk
from maskdsl.dsl.pattern import MaskFn
from maskdsl.dsl.score import ScoreFn, score_terms, terms_with_role
from maskdsl.codegen.program import Program
from maskdsl.codegen.tileclasses import FULL, PARTIAL
from .backends import whole_grid_only

__all__ = ["run_flex", "FLEX_DTYPES", "compiled_flex", "block_mask", "permutation",
           "refusal", "preference", "strength", "call_refusal", "prepare", "run"]

FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_compiled = None
_lock = threading.Lock()
_PERMS = LRU(64)
_BLOCK_MASKS = LRU(32)


def compiled_flex():
    """The process-wide ``torch.compile(flex_attention)``."""
    global _compiled
    with _lock:
        if _compiled is None:
            # deferred: flex_attention and dynamo cost ~0.8 s of import, paid only when used
            from torch.nn.attention.flex_attention import flex_attention

            # Each distinct pattern is a new code object and so one more compile of this
            # function; past dynamo's recompile limit (8) calls silently run unfused.
            import torch._dynamo  # deferred, as above

            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, max(getattr(cfg, name), 256))
            _compiled = torch.compile(flex_attention, dynamic=False)
        return _compiled


# ---------------------------------------------------------------------- the BlockMask

@outside_inference_mode
@guard("block_mask()")
def block_mask(program: Program, device="cpu", compute_q_blocks: bool = True,
               seq_len: Optional[int] = None):
    """The torch BlockMask (in the program's token layout), from the sparse tile classes.

    ``seq_len``: the sequence length it is made for (default: the layout's padded length, what
    the backend runs); a row-major layout may pass the user's N (the last block is partial)."""
    device = torch.device(device)
    r = program.recipe
    n = r.layout.n_padded if seq_len is None else seq_len
    if not r.layout.n <= n <= r.layout.n_padded or (n != r.layout.n_padded and r.layout.tile is not None):
        raise ValueError(f"seq_len={seq_len}: this layout holds {r.layout.n} tokens in "
                         f"{r.layout.n_padded} positions")
    key = (r.key, device, compute_q_blocks, n)
    found = _BLOCK_MASKS.get(key)
    if found is not None:
        return found
    from .compact import CompactBlockMask, tables_from_classes  # deferred with flex's import

    heads = [r.classes.distinct[0]] if r.classes.shared else [r.classes.head(h) for h in range(r.heads)]
    T = r.layout.n_tiles
    kv_num, kv_idx, q_num, q_idx = tables_from_classes(heads, PARTIAL, T, device, compute_q_blocks)
    fkv_num, fkv_idx, fq_num, fq_idx = tables_from_classes(heads, FULL, T, device,
                                                           compute_q_blocks)
    mask_mod, _ = program.mods(device, flex=True)
    bm = CompactBlockMask((n, n), kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx,
                          BLOCK_SIZE=(r.block, r.block), mask_mod=mask_mod)
    return _BLOCK_MASKS.put(key, bm)


# ---------------------------------------------------------------------- running

@outside_inference_mode
def permutation(program: Program, device):
    """Gather/scatter indices of the program's layout on ``device``."""
    key = (program.recipe.key, device)
    found = _PERMS.get(key)
    if found is None:
        lay = program.layout
        found = _PERMS.put(key, (lay.gather_index().to(device), lay.scatter_index().to(device)))
    return found


def _to_layout(x, gather):
    pad = x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])
    return torch.cat([x, pad], 2).index_select(2, gather)


def run_flex(program: Program, q, k, v, scale: float, compiled: bool = True,
             return_lse: bool = False):
    """flex_attention on [B, H, N, D] inputs in the user's token order (k, v may have H_kv
    heads: Flex's own ``enable_gqa``); ``return_lse``: also the float32 lse [B, H, N]."""
    from torch.nn.attention.flex_attention import flex_attention  # deferred (see compiled_flex)

    device = q.device
    mask_mod, score_mod = program.mods(device, flex=True)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if device.type == "cpu":  # flex refuses inputs that require grad on CPU, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    bm = block_mask(program, device, compute_q_blocks=needs_grad or device.type != "cpu")
    permute = not program.layout.row_major_order
    if permute:
        gather, scatter = permutation(program, device)
        q, k, v = (_to_layout(t, gather) for t in (q, k, v))
    fn = compiled_flex() if compiled else flex_attention
    kw = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if return_lse:
        kw.update(_lse_request())
    users = _user_functions(program)
    try:
        out = fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, **kw)
    except MaskDSLError:
        raise
    except Exception as e:
        if not users:
            raise
        # the user's functions run inside torch.compile's trace: what fails there is theirs
        first = (str(e).strip().splitlines() or [""])[0]
        raise MaskDSLError(
            f"backend='flex': {', '.join(map(repr, users))} could not run under torch.compile "
            f"(flex traces mask_mod/score_mod): {type(e).__name__}: {first}; make the "
            f"function traceable (no Python control flow on tensor values, no in-place "
            f"writes) or pick backend='tiles'") from None
    lse = None
    if return_lse:
        out, aux = out
        lse = getattr(aux, "lse", aux).float()     # AuxOutput (torch >= 2.9) or the bare lse
    if permute:
        out = out.index_select(2, scatter)
        lse = lse.index_select(2, scatter) if lse is not None else None
    return (out, lse) if return_lse else out


def _user_functions(program) -> list:
    """The user-written ``mask_fn`` / ``score_fn`` nodes a program calls."""
    return ([n for n in walk(program.pattern) if isinstance(n, MaskFn)]
            + [t for t in score_terms(program.score) if isinstance(t, ScoreFn)])


def _lse_request() -> dict:
    """flex_attention's way to ask for the log-sum-exp: ``return_aux`` where it exists
    (``return_lse`` is deprecated there), else ``return_lse``."""
    try:  # deferred (see compiled_flex)
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:   # pragma: no cover - torch < 2.9
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


# ---------------------------------------------------------------------- the backend protocol

def _beyond_flex(score):
    return next(iter(terms_with_role(score, "denominator", "dropout")), None)


def refusal(spec, device) -> Optional[str]:
    whole = whole_grid_only("the flex kernels run", spec)
    if whole is not None:
        return whole
    node = _beyond_flex(spec.score)
    if node is not None:
        return f"FlexAttention cannot express {node!r} (use backend='auto', 'tiles' or 'triton')"
    return None


def preference(spec, device) -> Optional[str]:
    return None


def strength(spec, device) -> str:
    return "on CUDA the pattern compiles to a mask_mod with an analytic BlockMask (forward and backward)"


def call_refusal(spec, q, k, v, return_lse: bool = False) -> Optional[str]:
    if q.dtype not in FLEX_DTYPES:
        names = "/".join(str(d).replace("torch.", "") for d in FLEX_DTYPES)
        return f"flex does not support {q.dtype}; pass {names} inputs or pick backend='tiles'"
    if q.device.type == "cpu":
        for term in score_terms(spec.score):
            if isinstance(term, ScoreFn) and term.ignores_score(spec.shape):
                return (f"{term!r} does not use the score it is given, and torch's "
                        f"compiled CPU flex_attention gets some such score_mods wrong (a "
                        f"constant, one of the head only: a torch bug, eager flex is right); "
                        f"pick backend='tiles'")
    if return_lse and q.device.type == "cpu":
        return ("flex cannot return the log-sum-exp on CPU (torch's compiled CPU flex kernel "
                "has no lse output); pick backend='tiles'")
    if q.device.type == "cpu" and torch.is_grad_enabled():
        if any(t.requires_grad for t in (q, k, v)):
            return ("flex has no backward on CPU; run under torch.no_grad() with inputs that "
                    "do not require grad, or pick backend='tiles'")
        for term in score_terms(spec.score):   # learnable score parameters would get no gradient
            for name, value in term.tensors().items():
                if value.requires_grad:
                    return (f"flex has no backward on CPU, so {term._name}'s {name} (a tensor "
                            f"that requires grad) would get no gradient; run under "
                            f"torch.no_grad() or pick backend='tiles'")
    return None


def prepare(spec) -> Program:
    return Program(spec.pattern, spec.score, spec.shape, spec.heads)


def run(state: Program, q, k, v, call) -> torch.Tensor:
    return run_flex(state, q, k, v, call.scale, return_lse=call.return_lse)
