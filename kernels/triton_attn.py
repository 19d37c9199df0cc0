"""The ``triton`` backend, host side: the plan (per-head table, tiles), the autograd Function,
the launches and the backend protocol. The kernels are in ``triton_kernels`` (read them top to
bottom like Triton's fused-attention tutorial); tools (``keep_mask``, ``compile_ahead``) in
``triton_tools``.

Gradients flow into q, k, v, the relative_bias table, sink logits and learnable rates, slopes and
caps, without atomics (deterministic). On CPU this runs only under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional

import torch

from maskdsl._caching import LRU, outside_inference_mode
from maskdsl._errors import MaskDSLError
from maskdsl.codegen.recipe import content_key
from maskdsl.dsl.node import walk
from maskdsl.dsl.pattern import MaskFn
from maskdsl.dsl.score import (Alibi, DistanceDecay, Dropout, RelativeBias, ScoreFn, SinkLogit,
                               Softcap, geometric_slopes, per_head_tensor, score_terms)
from .backends import whole_grid_only
from .tiles import rows_with_keys, tiles_program
from .triton_params import HeadParams, check_score, group_tiles, lower_pattern, pack

try:  # Triton is optional: the tiles and flex backends do not need it
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

if triton is not None:
    from .triton_kernels import (ScoreParams, _attn_bwd_dkdv, _attn_bwd_dkdv_sink, _attn_bwd_dq,
        _attn_bwd_relb, _attn_fwd, block_tokens, kernel_constexprs, launch_options, pow2 as _pow2)

__all__ = ["available", "why_unavailable", "TritonPlan", "run_triton", "keep_mask",
           "compile_ahead"]

LOG2E = 1.4426950408889634   # natural log -> base 2 (the kernels run in exp2)
METRICS = {"euclidean": 0, "manhattan": 1, "chebyshev": 2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
RELB_PARTIALS_BYTES = 256 << 20   # the relative-bias gradient's partial sums: at most this much


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(device) -> Optional[str]:
    """None if the Triton kernel can run on ``device``, else why not."""
    if triton is None:
        return "triton is not installed (pip install triton)"
    dev = torch.device(device)
    if dev.type == "cuda" or (dev.type == "cpu" and interpreted()):
        return None
    return f"the Triton kernel runs on CUDA (on {dev.type} only under TRITON_INTERPRET=1)"


def available(device) -> bool:
    return why_unavailable(device) is None


# ---------------------------------------------------------------------- host side

def tile_shape(total: int, shape3: tuple, params: List[HeadParams]) -> tuple:
    """Split ``total`` (a power of two) lanes over 3 dims: double the dim with the most
    in-group tokens left per tile lane, never beyond the group length (rounded up to 2^k)."""
    group = [math.ceil(S / min(hp.dims[i].dilation for hp in params)) for i, S in enumerate(shape3)]
    tile = [1, 1, 1]
    while math.prod(tile) < total:
        room = [group[i] / tile[i] if tile[i] < _pow2(group[i]) else 0 for i in range(3)]
        i = max(range(3), key=lambda j: (room[j], j))
        if room[i] == 0:
            i = 2                     # all dims covered: widen the last one (padding lanes)
        tile[i] *= 2
    return tuple(tile)


class TritonPlan:
    """Everything a launch needs except the tensors: per-head ints, tile shapes, score flags."""

    def __init__(self, pattern, score, shape: tuple, heads: int):
        self.params = lower_pattern(pattern, shape, heads)
        self.shape, self.heads = tuple(shape), heads
        self.shape3 = (1,) * (3 - len(shape)) + tuple(shape)
        self.n = math.prod(shape)
        self.score_terms = check_score(score)
        self.has_sink = any(hp.sink > 0 for hp in self.params)
        self.max_sink = max(hp.sink for hp in self.params)
        decay = self.score_terms.get(DistanceDecay)
        off = 3 - len(shape)
        self.decay_dims = (0, 0, 0)
        if decay is not None:
            dims = decay.bind(shape, heads)[0]["dims"]
            self.decay_dims = tuple(int(i - off in dims) for i in range(3))
            self.metric = METRICS[decay.metric]
        relb = self.score_terms.get(RelativeBias)
        self.radius = (0, 0, 0)
        self.has_relb, self.relb_hs = relb is not None, 0   # relb_hs: entries per head (0: shared)
        if relb is not None:
            bound = relb.bind(shape, heads)[0]
            self.radius = (0,) * off + tuple(bound["radius"])
            self.relb_hs = 0 if bound["shared"] else math.prod(2 * r + 1 for r in self.radius)
        # per-head float parameters: name -> (term kind, field); tensor-valued ones are read
        # from the caller's score at every call (a plan is shared by every score of this shape)
        fields = {"rate": (DistanceDecay, "rate"), "slope": (Alibi, "slopes"), "cap": (Softcap, "cap")}
        self.param_terms = {}
        self._fixed_terms = {}
        for name, (kind, field) in fields.items():
            term = self.score_terms.get(kind)
            if term is None:
                continue
            if isinstance(getattr(term, field), torch.Tensor):
                self.param_terms[name] = (kind, field)
            else:
                self._fixed_terms[name] = (term, field)
        # only which kinds are present stays: the plan keeps no user tensor
        self.score_terms = {kind: None for kind in self.score_terms}
        self._packed, self._fixed = {}, {}

    @outside_inference_mode
    def packed(self, device):
        if device not in self._packed:
            self._packed[device] = pack(self.params, device)
        return self._packed[device]

    @outside_inference_mode
    def fixed_values(self, device) -> dict:
        """float32 [H] tensors of the number-valued parameters (geometric ALiBi slopes too) and
        a zero placeholder, built once per device."""
        if device not in self._fixed:
            zero = torch.zeros(1, dtype=torch.float32, device=device)
            out = {"zero": zero, "rate": zero, "slope": zero, "cap": zero}
            for name, (term, field) in self._fixed_terms.items():
                value = getattr(term, field)
                vals = (geometric_slopes(self.heads) if isinstance(value, str) else
                        per_head_tensor(value, term, field, self.heads, "cpu", self.shape).tolist())
                out[name] = torch.tensor(vals, dtype=torch.float32, device=device)
            self._fixed[device] = out
        return self._fixed[device]

    def tiles(self, lanes: int) -> tuple:
        t = tile_shape(lanes, self.shape3, self.params)
        return t, t


def _check_inputs(q, k, v):
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise MaskDSLError(
            f"backend='triton': q, k, v dtype {q.dtype}/{k.dtype}/{v.dtype}: expected one of "
            f"float16, bfloat16, float32 for all three (float64 runs on backend='tiles')")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and interpreted():
        # the interpreter's bf16 tl.dot is wrong (a 16x16 probe: errors of ~1e10), so refuse
        # rather than return garbage; on CUDA bf16 is fine
        raise MaskDSLError(
            "backend='triton': bfloat16 under TRITON_INTERPRET=1 (Triton's CPU interpreter "
            "computes bf16 tl.dot wrongly); use float16/float32 there, or run on CUDA")
    D, Dv = q.shape[-1], v.shape[-1]
    for name, d in (("q/k head dim", D), ("v head dim", Dv)):
        if not 16 <= d <= 256:
            raise MaskDSLError(f"backend='triton': {name} {d}: expected 16 to 256")
    # the kernels address a row within one (batch, head) as int32 token * D: refuse what would
    # wrap around (the (batch, head) base offset itself is int64)
    N = q.shape[-2]
    if N * max(D, Dv) >= 2**31:
        raise MaskDSLError(
            f"backend='triton': N x head dim = {N} x {max(D, Dv)} = {N * max(D, Dv)}: expected "
            f"less than 2**31 (the kernels' int32 offsets within one batch and head); use "
            f"backend='tiles' or 'flex'")


class _Fn(torch.autograd.Function):
    """Autograd around the kernels. Inputs after q, k, v: the relative_bias table, sink logits
    and the learnable rate / slopes / cap as float32 [H] (None where absent or fixed); ``sc``
    holds the per-head values the kernels read, fixed for this call."""

    @staticmethod
    def forward(ctx, q, k, v, relb, sinkl, rate, slope, cap, plan, consts, sc, scale, seed):
        out, lse = _launch_fwd(plan, consts, sc, q, k, v, relb, sinkl, scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, relb, sinkl)
        ctx.plan, ctx.consts, ctx.sc, ctx.scale, ctx.seed = plan, consts, sc, scale, seed
        return out, lse / LOG2E                  # the kernels' base-2 lse -> natural log

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, out, lse, relb, sinkl = ctx.saved_tensors
        grads = _launch_bwd(ctx.plan, ctx.consts, ctx.sc, q, k, v, out, lse, relb, sinkl, do,
                            ctx.scale, ctx.seed, ctx.needs_input_grad, dlse)
        return (*grads, None, None, None, None, None)


def _consts(plan: TritonPlan, q, dtype):
    lanes = block_tokens(dtype, max(q.shape[-1], 16), q.device.type == "cpu")
    (TM, TN) = plan.tiles(lanes)
    terms = plan.score_terms
    return dict(
        TM0=TM[0], TM1=TM[1], TM2=TM[2], TN0=TN[0], TN1=TN[1], TN2=TN[2],
        BD=max(16, _pow2(q.shape[-1])), IEEE=dtype == torch.float32,
        HAS_DECAY=DistanceDecay in terms, METRIC=getattr(plan, "metric", 0),
        DEC0=plan.decay_dims[0], DEC1=plan.decay_dims[1], DEC2=plan.decay_dims[2],
        HAS_ALIBI=Alibi in terms, HAS_RELB=RelativeBias in terms, HAS_CAP=Softcap in terms,
        HAS_DROP=Dropout in terms)


def _common_args(plan, q, k, v):
    """Strides of q, k, v (one tuple each) and KVG, the query heads per key/value head (GQA:
    query head h reads kv head h // KVG; 1 without GQA)."""
    return (q.stride(), k.stride(), v.stride(), q.shape[1] // k.shape[1])


def _launch_fwd(plan, consts, sc, q, k, v, relb, sinkl, scale, seed):
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    P, NS = plan.packed(q.device)
    TM = (consts["TM0"], consts["TM1"], consts["TM2"])
    NT = group_tiles(plan.params, plan.shape3, TM)
    out = torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    relb_t = relb if relb is not None else sc["zero"]
    sp = ScoreParams(sc["rate"], sc["slope"], sc["cap"], sc["dropp"], relb_t, plan.relb_hs,
                     plan.radius)
    _attn_fwd[(NT[0] * NT[1] * NT[2], B * H)](
        q, k, v, out, lse, P, NS, sinkl if sinkl is not None else sc["zero"], sp,
        *_common_args(plan, q, k, v), out.stride(), H, N, plan.shape3, NT, D, Dv, float(scale),
        int(seed), BDV=max(16, _pow2(Dv)), HAS_SINKL=sinkl is not None, HAS_SINK=plan.has_sink,
        **kernel_constexprs(consts), **launch_options(q.dtype, max(D, Dv)))
    return out, lse


def _launch_bwd(plan, consts, sc, q, k, v, out, lse, relb, sinkl, do, scale, seed, needs,
                dlse=None):
    """Gradients of q, k, v, the table, sink logits, rate, slopes, cap (None: not needed).
    ``dlse``: the gradient of the (natural) lse output; since d lse / d s_ij = p_ij it enters
    every kernel as ``delta - dlse`` (ds = p (dp - delta) + p dlse)."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    P, NS = plan.packed(q.device)
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1)                        # rowsum(dO * O) [B, H, N]
    if dlse is not None:
        delta = delta - dlse.float()
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    # dk, dv per query head (GQA: summed over each kv head's group below)
    dk = torch.empty(B, H, N, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, N, Dv, dtype=v.dtype, device=q.device)
    relb_grad = relb is not None and needs[3]
    relb_t = relb if relb is not None else sc["zero"]
    sp = ScoreParams(sc["rate"], sc["slope"], sc["cap"], sc["dropp"], relb_t, plan.relb_hs,
                     plan.radius)
    cx = kernel_constexprs(consts)
    TM = (consts["TM0"], consts["TM1"], consts["TM2"])
    TN = (consts["TN0"], consts["TN1"], consts["TN2"])
    NTq = group_tiles(plan.params, plan.shape3, TM)
    NTk = group_tiles(plan.params, plan.shape3, TN)
    common = _common_args(plan, q, k, v)
    BDV = max(16, _pow2(Dv))
    opts = launch_options(q.dtype, max(D, Dv))
    param_grad = tuple(bool(needs[i]) for i in (5, 6, 7))     # rate, slopes, cap
    gpar = (torch.zeros(3, B * H, N, dtype=torch.float32, device=q.device) if any(param_grad)
            else sc["zero"])
    _attn_bwd_dq[(NTq[0] * NTq[1] * NTq[2], B * H)](
        q, k, v, do, dq, lse, delta, P, NS, gpar, B * H * N, sp, *common, H, N, plan.shape3, NTq,
        D, Dv, float(scale), int(seed), BDV=BDV, HAS_SINK=plan.has_sink, PARAM_GRAD=param_grad,
        **cx, **opts)
    nbs = max(plan.shape3).bit_length() + 1
    _attn_bwd_dkdv[(NTk[0] * NTk[1] * NTk[2], B * H)](
        q, k, v, do, dk, dv, lse, delta, P, NS, sp, *common, H, N, plan.shape3, NTk, D, Dv,
        float(scale), int(seed), BDV=BDV, NBS=nbs, **cx, **opts)
    if plan.has_sink:
        bn = math.prod(TN)
        _attn_bwd_dkdv_sink[(math.ceil(plan.max_sink / bn), B * H)](
            q, k, v, do, dk, dv, lse, delta, NS, sp, *common, H, N, plan.shape3, D, Dv,
            float(scale), int(seed), BDV=BDV, **cx, **opts)
    drelb = None
    if relb_grad:
        # deterministic: one private row of partial sums per (batch*head, program), summed here
        T = math.prod(2 * r + 1 for r in plan.radius)
        ntiles = NTq[0] * NTq[1] * NTq[2]
        npar = max(1, min(ntiles, RELB_PARTIALS_BYTES // (4 * B * H * T)))
        part = torch.zeros(B * H, npar, T, dtype=torch.float32, device=q.device)
        _attn_bwd_relb[(npar, B * H)](
            q, k, v, do, lse, delta, P, NS, part, sp, *common, H, N, plan.shape3, NTq, ntiles,
            npar, T, D, Dv, float(scale), int(seed), CH=min(256, _pow2(T)), BDV=BDV,
            HAS_SINK=plan.has_sink, TM=cx["TM"], BD=cx["BD"], F=cx["F"], **opts)
        drelb = part.view(B, H, npar, T).sum((0, 2))
        drelb = (drelb.sum(0) if plan.relb_hs == 0 else drelb).reshape(relb.shape)
    dsink = None
    if sinkl is not None and needs[4]:
        # d/d(sink) = -sum_q p_sink(q) * delta(q), p_sink = exp(sink - lse) (lse in base 2)
        p_sink = torch.exp2(sinkl.float().reshape(1, H, 1) * LOG2E - lse)
        dsink = -(p_sink * delta).sum((0, 2)).to(sinkl.dtype)
    # each query row's share, summed over batch and rows in a fixed order: [3, H]
    per_head = gpar.view(3, B, H, N).sum((1, 3)) if any(param_grad) else None
    dparams = [per_head[i] if param_grad[i] else None for i in range(3)]
    Hkv = k.shape[1]
    if Hkv != H:    # GQA: a kv head's gradient is the sum over its query heads (fp32 sum)
        dk, dv = (g.view(B, Hkv, H // Hkv, N, g.shape[-1]).sum(2, dtype=torch.float32)
                  .to(g.dtype) for g in (dk, dv))
    return (dq, dk, dv, drelb, dsink, *dparams)


def run_triton(plan: TritonPlan, q, k, v, scale: float, *, score=None, sink=None,
               dropout_p=None, seed: int = 0):
    """([B, H, N, D] attention, its natural-log lse [B, H, N] float32) through the Triton
    kernels (k, v: H or, for GQA, H_kv heads dividing H, read in place; autograd: q, k, v,
    the relative_bias table, sink logits, learnable rate / slopes /
    cap, through both outputs). An empty row's lse reads 0 here: ``run`` marks it -inf.
    ``score``: the caller's score terms, whose tensors are read now. ``dropout_p``: per-head
    probabilities (None: no dropout)."""
    _check_inputs(q, k, v)
    dev = q.device
    H = plan.heads
    fixed = plan.fixed_values(dev)
    learn = {}
    terms = check_score(score)
    for name, (kind, field) in plan.param_terms.items():   # tensors: read per call (learnable)
        term = terms[kind]
        t = per_head_tensor(getattr(term, field), term, field, H, dev, plan.shape)
        t = t.to(dev, torch.float32)
        learn[name] = t if t.requires_grad else None
        fixed = dict(fixed, **{name: t.detach().contiguous()})
    sc = dict(fixed, dropp=(dropout_p.detach().to(device=dev, dtype=torch.float32).reshape(-1)
                            .expand(H).contiguous() if dropout_p is not None else fixed["zero"]))
    consts = _consts(plan, q, q.dtype)
    if dropout_p is None:
        consts["HAS_DROP"] = False
    relb = None
    if plan.has_relb:
        relb = terms[RelativeBias].table.to(device=dev, dtype=torch.float32)
        relb = (relb.reshape(-1) if plan.relb_hs == 0 else relb.reshape(H, -1)).contiguous()
    if sink is not None:
        sink = sink.to(device=dev, dtype=torch.float32).reshape(-1)
        sink = sink.expand(H) if sink.numel() == 1 else sink
    out, lse = _Fn.apply(q, k, v, relb, sink, learn.get("rate"), learn.get("slope"),
                         learn.get("cap"), plan, consts, sc, float(scale), int(seed))
    return out, lse


def keep_mask(plan, batch: int, dropout_p, seed: int, device) -> torch.Tensor:
    """The kernels' dropout keep mask (``triton_tools.keep_mask``)."""
    # deferred: triton_tools compiles its probe kernels with triton at import
    from .triton_tools import keep_mask as _keep_mask

    return _keep_mask(plan, batch, dropout_p, seed, device)


def compile_ahead(dtype: str = "fp16", head_dim: int = 128, arch: int = 90, **kw) -> dict:
    """The kernels compiled for an NVIDIA target without a GPU (``triton_tools.compile_ahead``)."""
    # deferred: triton_tools compiles its probe kernels with triton at import
    from .triton_tools import compile_ahead as _compile_ahead

    return _compile_ahead(dtype, head_dim, arch, **kw)


# ---------------------------------------------------------------------- the backend protocol

TRITON_MIN_TOKENS = 262144   # from here a BlockMask holds >= 2048^2 tile entries per head
_PLANS = None


def _beyond_flex(score):
    return next((t for t in score_terms(score) if isinstance(t, (SinkLogit, Dropout))), None)


def _python_leaf(pattern):
    return next((n for n in walk(pattern) if isinstance(n, MaskFn)), None)


def refusal(spec, device) -> Optional[str]:
    whole = whole_grid_only("the triton kernels run", spec)
    if whole is not None:
        return whole
    leaf = _python_leaf(spec.pattern) or next(
        (t for t in score_terms(spec.score) if isinstance(t, ScoreFn)), None)
    if leaf is not None:
        return (f"the Triton kernel cannot call Python, and {leaf!r} is a Python function; "
                f"use backend='tiles', 'flex' or 'dense'")
    if triton is None:
        return "triton is not installed (pip install triton)"
    dev = torch.device(device)
    if not (dev.type == "cuda" or (dev.type == "cpu" and interpreted())):
        return f"the Triton kernel runs on CUDA (on {dev.type} only under TRITON_INTERPRET=1)"
    try:
        prepare(spec)
    except MaskDSLError as e:
        return str(e).replace("backend='triton': ", "")
    return None


def preference(spec, device) -> Optional[str]:
    if _beyond_flex(spec.score) is None and spec.n < TRITON_MIN_TOKENS:
        return (f"flex runs this pattern and {spec.n} tokens < {TRITON_MIN_TOKENS} keep its "
                f"BlockMask small")
    return None


def strength(spec, device) -> str:
    node = _beyond_flex(spec.score)
    if node is not None:
        return (f"FlexAttention cannot express {node._name}; the Triton kernel runs it fused "
                f"(forward and backward)")
    tiles = (spec.n + 127) // 128
    return (f"{spec.n} tokens; a BlockMask would hold {tiles}^2 tile entries per head, the Triton "
            f"kernel computes key ranges in-kernel")


def call_refusal(spec, q, k, v, return_lse: bool = False) -> Optional[str]:
    why = why_unavailable(q.device)
    if why is not None:
        return why
    try:
        _check_inputs(q, k, v)
    except MaskDSLError as e:
        return str(e).replace("backend='triton': ", "")
    return None


def prepare(spec):
    global _PLANS
    if _PLANS is None:
        _PLANS = LRU(64)
    key = (content_key(spec.pattern), content_key(spec.score), tuple(spec.shape), spec.heads)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, TritonPlan(spec.pattern, spec.score, spec.shape, spec.heads))
    return plan, spec


def run(state, q, k, v, call) -> torch.Tensor:
    plan, spec = state
    # one seed per call from the compiled callable's generator: reproducible, advancing
    seed = (int(torch.randint(0, 2**31 - 1, (), generator=call.generator))
            if call.dropout_p is not None else 0)
    out, lse = run_triton(plan, q, k, v, call.scale, score=spec.score, sink=call.sink,
                          dropout_p=call.dropout_p, seed=seed)
    if not call.return_lse:
        return out
    if call.sink is None:       # the kernels store 0 for a row with no key: mark it -inf
        has = rows_with_keys(tiles_program(spec.pattern, spec.score, spec.shape, spec.heads),
                             q.device)
        lse = torch.where(has[None], lse, torch.full((), float("-inf"), device=q.device))
    return out, lse


def next_keep(spec, state, batch: int, drop_p, generator) -> torch.Tensor:
    """bool [B, H, N, N] on the CPU: the keep mask ``run`` draws in-kernel from the seed it
    takes off ``generator`` (a copy of the call's), ARCHITECTURE.md "Command line"."""
    plan, _ = state
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    return keep_mask(plan, batch, drop_p, seed, "cpu")
