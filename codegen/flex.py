"""The ``flex`` backend: torch's flex_attention with the generated mods and the analytic BlockMask.

q, k, v are laid out in the program's token layout (tiles contiguous, padded), attended, and the
output is put back in the user's order; the layout is invisible outside this module.
One ``torch.compile(flex_attention)`` is shared by every program: mask_mod/score_mod objects
come from the cached Program, so layers with the same pattern reuse one compiled graph.
"""
from __future__ import annotations

import threading

import torch

from .._caching import outside_inference_mode
from .program import Program

__all__ = ["run_flex", "FLEX_DTYPES", "compiled_flex"]

FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_compiled = None
_lock = threading.Lock()


def compiled_flex():
    """The process-wide ``torch.compile(flex_attention)``."""
    global _compiled
    with _lock:
        if _compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            # Each distinct pattern is a new code object and so one more compile of this
            # function; past dynamo's recompile limit (8) calls silently run unfused.
            import torch._dynamo

            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, max(getattr(cfg, name), 256))
            _compiled = torch.compile(flex_attention, dynamic=False)
        return _compiled


@outside_inference_mode
def _permutation(program: Program, device):
    """Gather/scatter indices of the program's layout on ``device`` (kept on the program)."""
    cache = program.__dict__.setdefault("_flex_perms", {})
    if device not in cache:
        lay = program.layout
        cache[device] = (lay.gather_index().to(device), lay.scatter_index().to(device))
    return cache[device]


def _to_layout(x, gather):
    pad = x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])
    return torch.cat([x, pad], 2).index_select(2, gather)


def run_flex(program: Program, q, k, v, scale: float, compiled: bool = True):
    """flex_attention on [B, H, N, D] inputs in the user's token order."""
    from torch.nn.attention.flex_attention import flex_attention

    device = q.device
    mask_mod, score_mod = program.mods(device, flex=True)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if device.type == "cpu":  # flex refuses inputs that require grad on CPU, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = program.block_mask(device, compute_q_blocks=needs_grad or device.type != "cpu")
    lay = program.layout
    if not lay.identity:
        gather, scatter = _permutation(program, device)
        q, k, v = (_to_layout(t, gather) for t in (q, k, v))
    fn = compiled_flex() if compiled else flex_attention
    out = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    if not lay.identity:
        out = out.index_select(2, scatter)
    return out
