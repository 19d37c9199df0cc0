"""The one PyTorch softmax every PyTorch path runs (ARCHITECTURE.md, "Backends"): the tiles
backend's written-out path, the rectangle path (sub-ranges, the KV cache, context parallelism)
and the dense stripes of extra tokens. The reference keeps its own, as the oracle.

* ``softmax(s, allowed, sink)``: probabilities and log-sum-exp of logits whose score terms are
  applied, masked by ``allowed``, with an optional sink logit in the denominator;
* ``drop(p, ps, keep, generator)``: dropout on probabilities, from a given keep mask or drawn;
* ``FlashLSE``: torch's CPU flash kernel with a differentiable log-sum-exp;
* ``flash(q, k, v, allowed, scale, sink)``: one fused call of it with a boolean mask, rows
  with no key and a sink logit handled;
* ``combine(parts)``: attention over disjoint key sets from each set's (out, lse) (the core
  of ``md.merge``, without its argument checks and host read);
* ``add_sink(out, lse, sink)``: a sink logit joined to an (out, lse) pair as a part with no
  value.
"""
from __future__ import annotations

import torch

__all__ = ["softmax", "drop", "FlashLSE", "flash", "combine", "add_sink"]


def softmax(s: torch.Tensor, allowed: torch.Tensor, sink=None, lse: bool = False):
    """``(p, lse)`` over the last dim of logits ``s`` where ``allowed`` (bool, broadcast to s);
    ``sink``: logits broadcast to ``s[..., :1]`` that join only the denominator. A row with no
    key gives zeros and lse -inf (finite gradients); a NaN (a NaN sink logit) stays NaN. The
    lse is ``[...]`` (the last dim dropped), None unless asked for."""
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    if sink is not None:
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
    empty = denom == 0
    p = e / torch.where(empty, torch.ones_like(denom), denom)
    if not lse:
        return p, None
    # log of the denominator: -inf (and no NaN gradient) for a row with no key
    out = m + torch.log(torch.where(empty, torch.ones_like(denom), denom))
    return p, torch.where(empty, torch.full_like(out, float("-inf")), out)[..., 0]


def drop(p: torch.Tensor, ps: torch.Tensor, keep=None, generator=None) -> torch.Tensor:
    """Dropout on probabilities ``p`` with per-row probabilities ``ps`` (broadcast to p): kept
    ones scaled by 1 / (1 - ps). ``keep``: the bool keep mask to use; else one is drawn from
    ``generator`` on the CPU in float64, ``u >= ps`` with ``u`` uniform of p's shape (the
    stream's order is the order of these calls: ``kernels.tiles.next_keep`` replays it)."""
    if keep is None:
        u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
        keep = (u >= ps.cpu().double()).to(p.device)
    return p * keep / (1 - ps)


class FlashLSE(torch.autograd.Function):
    """torch's CPU flash attention with its log-sum-exp as a differentiable output. Since
    d lse / d s_ij = p_ij, the lse's gradient enters the flash backward as ``delta - dlse``:
    one more head-dim column, zero in q, k and v, holding -dlse in the output and 1 in its
    gradient, so that ``delta = rowsum(dO * O)`` comes out shifted by exactly -dlse."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, is_causal=False):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale, ctx.is_causal = scale, is_causal
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        col = lambda x, fill: torch.cat([x, x.new_full((*x.shape[:-1], 1), fill)], -1)  # noqa: E731
        o1 = torch.cat([out, -dlse[..., None].to(out.dtype)], -1)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            col(dout.contiguous(), 1.0), col(q, 0.0), col(k, 0.0), col(v, 0.0), o1, lse, 0.0,
            ctx.is_causal, attn_mask=mask, scale=ctx.scale)
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None, None


def combine(parts, has_nan: bool = True):
    """``(out, lse)`` of attention over the union of disjoint key sets from each set's ``(out
    [B, H, N, D], lse [B, H, N])``, exact and differentiable, with no argument checks and no
    host read (``md.merge`` checks a user's parts, then calls this): ``lse = log sum_i
    exp(lse_i)``, ``out = sum_i exp(lse_i - lse) out_i``. A part with no key (-inf) weighs
    nothing, a row with no key anywhere gives zeros and -inf with zero gradients, a NaN part
    keeps its row NaN (``has_nan=False``: the caller knows there is none)."""
    lse_dt = torch.float32
    for _, lse in parts:                                 # every part's lse dtype counts
        lse_dt = torch.promote_types(lse_dt, lse.dtype)
    lses = [lse.to(lse_dt) for _, lse in parts]                          # each [B, H, N]
    # log-sum-exp over the parts, written out so that rows with no key anywhere (every l_i =
    # -inf) give -inf with zero gradients (torch.logsumexp's backward is NaN there), and a NaN
    # part (a poisoned row) stays NaN. Part by part (no stacked copy of the outputs: a merge
    # costs one multiply-add per part over out)
    m = lses[0].detach()
    for x in lses[1:]:
        m = torch.maximum(m, x.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = [torch.exp(x - m) for x in lses]                                 # 0 for empty parts
    s = e[0]
    for x in e[1:]:
        s = s + x
    some = s > 0
    safe = torch.where(some, s, torch.ones_like(s))
    total = torch.where(some, m + torch.log(safe), torch.full_like(s, float("-inf")))
    out = None
    for (o, lse), w in zip(parts, e):
        # a part with no key weighs nothing, whatever its output holds (0 * NaN is NaN)
        o = torch.where(torch.isneginf(lse)[..., None], torch.zeros((), dtype=o.dtype,
                                                                     device=o.device), o)
        w = (w / safe)[..., None].to(o.dtype)                           # exp(l_i - l)
        out = o * w if out is None else torch.addcmul(out, o, w)
    if has_nan:
        nan = torch.isnan(lses[0])
        for x in lses[1:]:
            nan = nan | torch.isnan(x)
        total = torch.where(nan, torch.full_like(total, float("nan")), total)
        out = torch.where(nan[..., None], torch.full_like(out, float("nan")), out)
    return out, total


def add_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor):
    """``(out, lse)`` with a sink logit joined to the denominator: a part with no value (its
    output zeros) combined through the lse. ``sink``: [H] for out [B, H, n, Dv], lse [B, H, n].
    A row with no key gets lse = sink and zero output; a NaN sink makes its head NaN."""
    B, H, n = lse.shape
    s = sink.to(device=lse.device, dtype=lse.dtype).reshape(1, H, 1).expand(B, H, n)
    return combine([(out, lse), (torch.zeros_like(out), s)])


def flash(q, k, v, allowed, scale: float, sink=None):
    """(out, lse) of q [B, H, c, D] against k, v [B, H, nk, D] where ``allowed`` [1, 1 or H,
    c, nk]: torch's CPU flash kernel with an additive -inf mask (``FlashLSE``, differentiable
    lse). A row with no key gets a stand-in key (finite gradients) and then zeros and -inf; a
    sink logit joins the denominator through the lse (``add_sink``)."""
    nk = k.shape[2]
    some = allowed.any(-1, keepdim=True)
    empty = not bool(some.all())
    if empty:
        first = torch.zeros(nk, dtype=torch.bool, device=q.device)
        first[0] = True
        allowed = allowed | (~some & first)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(
        ~allowed, float("-inf"))
    out, lse = FlashLSE.apply(q.contiguous(), k, v, mask, scale)
    if empty:
        out = torch.where(some, out, torch.zeros((), dtype=out.dtype, device=out.device))
        lse = torch.where(some[..., 0], lse,
                          torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device))
    if sink is not None:
        out, lse = add_sink(out, lse, sink)
    return out, lse
