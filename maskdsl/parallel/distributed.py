"""Context parallelism on torch.distributed (ARCHITECTURE.md, "Context parallelism").

The token grid is split along dim 0 into contiguous slabs, one per rank (``md.shard``); each
rank calls ``cp(q_local, k_local, v_local)`` and gets its own queries' output, with autograd
through every exchange. Three strategies, all on torch.distributed's P2P operations
(``batch_isend_irecv``: NCCL on GPUs, gloo on CPU):

* ``halo``: each rank receives exactly the key/value rows its queries attend that other ranks
  own (from the row-major tile classes, ``plan.need``), extra tokens once from their
  owner; the backward returns the halo's gradients to their owners, which add them.
* ``ulysses``: all-to-all from sequence-sharded to head-sharded, the whole sequence on this
  rank's heads (per-head patterns at their own heads), all-to-all back.
* ``allgather``: every rank receives every key/value row (patterns without bounded reach).

``strategy="auto"`` picks the one moving the fewest bytes for this pattern, shape and world
size (``cp.plan()``, computed analytically; ``cp.reason`` says why). The local attention is the
rectangle path over the key tiles the tile classes list (``rect.tiled_rect``), any device.

Agreement: every call (``cp(q, k, v)``, ``md.unshard``) starts with one small all_gather of
its metadata (``_agree``) before any other message, so ranks that disagree, or a rank whose
own checks refuse the call, make every rank raise the same MaskDSLError (no hang, no abort).

Gradients: ``cp``'s inputs get exact gradients (the halo's come back from the ranks that used
them). Replicated things get this rank's part of the gradient, as under DDP or FSDP: learnable
score-term tables and a tensor passed through ``md.shard`` (zeros outside this rank's slab);
all-reduce (sum) them over the group for the whole gradient. ``md.unshard``'s gradient is this
rank's slab of the incoming one.
"""
from __future__ import annotations

import math
import numbers
import struct
import zlib
from typing import Optional

import torch
import torch.distributed as dist

try:
    from torch.distributed.device_mesh import DeviceMesh
except ImportError:                                    # pragma: no cover - older torch
    DeviceMesh = ()

from maskdsl._caching import outside_inference_mode
from maskdsl._errors import MaskDSLError
from maskdsl.codegen.recipe import varies_per_head
from maskdsl.dsl.inputs import check_qkv, check_scale
from maskdsl.dsl.node import check_shape
from maskdsl.dsl.score import (Dropout, check_params_device, check_tensor_params, score_extras,
                               score_terms)
from maskdsl.kernels.softmax import combine
from maskdsl.runtime.compiled import CompiledAttention, compile as md_compile
from maskdsl.kernels.rect import dense_stripe, softcap_values, tiled_rect
from maskdsl.runtime.rect import row_major
from . import plan as P

__all__ = ["context_parallel", "ContextParallel", "shard", "unshard", "STRATEGIES"]

STRATEGIES = ("auto",) + P.STRATEGIES


# ---------------------------------------------------------------------- process groups

def _resolve(group):
    """(ProcessGroup, rank, world) of ``group``: None (the default group), a ProcessGroup or a
    1-D DeviceMesh."""
    if not dist.is_available() or not dist.is_initialized():
        raise MaskDSLError("context parallelism: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group(...) first (gloo on CPU, nccl "
                           "on GPUs), e.g. under torchrun")
    if group is None:
        group = dist.group.WORLD
    elif DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise MaskDSLError(f"group: a {group.ndim}-D DeviceMesh; expected a 1-D mesh (pass "
                               f"one of its dimensions, e.g. mesh['cp'])")
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise MaskDSLError(f"group={group!r}: expected None (the default group), a "
                           f"torch.distributed ProcessGroup or a 1-D DeviceMesh")
    return group, dist.get_rank(group), dist.get_world_size(group)


class _Comm:
    """P2P messages within one group, with a count of the bytes a forward moves."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.sent = self.received = 0
        # NCCL's first batch_isend_irecv in a group must involve every rank; a rank with
        # nothing to exchange skips it, so one barrier (a collective) sets the group up first
        self._ready = dist.get_backend(group) != "nccl"

    def _peer(self, r: int) -> int:
        return dist.get_global_rank(self.group, r)

    def run(self, sends, recvs, device, count: bool):
        """Post every send [(peer, tensor)] and receive [(peer, shape, dtype)] at once (one
        ``batch_isend_irecv``), wait, return the received tensors. Messages between two ranks
        match in the order posted: every caller builds its lists from the same plan, peers in
        ascending order. Empty messages are skipped on both sides."""
        ops, bufs = [], []
        for peer, t in sends:
            if t.numel():
                t = t.contiguous()
                ops.append(dist.P2POp(dist.isend, t, self._peer(peer), self.group))
                if count:
                    self.sent += t.numel() * t.element_size()
        for peer, shape, dtype in recvs:
            b = torch.empty(shape, dtype=dtype, device=device)
            bufs.append(b)
            if b.numel():
                ops.append(dist.P2POp(dist.irecv, b, self._peer(peer), self.group))
                if count:
                    self.received += b.numel() * b.element_size()
        if not self._ready:
            dist.barrier(group=self.group)
            self._ready = True
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        return bufs


class _Exchange(torch.autograd.Function):
    """Send ``tensors`` (to ``send_to``), receive ``recv_specs``; backward: the received
    tensors' gradients go back to their senders and the sent tensors' gradients come back.

    Every rank must run every backward exchange, in the same order, or its peers wait forever.
    So the last output is an empty token the caller ties into its result (``_Tie``) or into the
    next exchange (``after``: that exchange's backward runs first), and ``anchors`` (empty views
    of the call's q, k and v) are inputs of every exchange: ``torch.autograd.grad`` prunes a node
    with no path to the inputs it was asked for, and a rank that only receives would otherwise
    have none while its peers' exchanges do."""

    @staticmethod
    def forward(ctx, comm, send_to, recv_specs, device, n_fixed, *tensors):
        fixed, tensors = tensors[:n_fixed], tensors[n_fixed:]
        got = comm.run(list(zip(send_to, tensors)), recv_specs, device, True)
        ctx.comm, ctx.device = comm, device
        ctx.fixed = tuple((tuple(t.shape), t.dtype) for t in fixed)
        ctx.send_specs = tuple((p, tuple(t.shape), t.dtype) for p, t in zip(send_to, tensors))
        ctx.recv_specs = recv_specs
        return (*got, torch.zeros(0, device=device))

    @staticmethod
    def backward(ctx, *grads):
        sends = [(p, g if g is not None else torch.zeros(s, dtype=d, device=ctx.device))
                 for (p, s, d), g in zip(ctx.recv_specs, grads)]
        back = ctx.comm.run(sends, list(ctx.send_specs), ctx.device, False)
        fixed = [torch.zeros(s, dtype=d, device=ctx.device) for s, d in ctx.fixed]
        return (None, None, None, None, None, *fixed, *back)


def _exchange(comm, sends, recvs, device, anchors, after=None):
    """(received tensors, token) of one differentiable exchange (see ``_Exchange``)."""
    fixed = [a.narrow(2, 0, 0) for a in anchors if a.requires_grad]
    if after is not None:
        fixed.append(after)
    out = _Exchange.apply(comm, tuple(p for p, _ in sends), tuple(recvs), device, len(fixed),
                          *fixed, *[t for _, t in sends])
    return list(out[:-1]), out[-1]


class _Tie(torch.autograd.Function):
    """``x`` unchanged, with ``token`` as an input: x's backward reaches the exchanges."""

    @staticmethod
    def forward(ctx, x, token):
        ctx.device = token.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, torch.zeros(0, device=ctx.device)


# ---------------------------------------------------------------------- agreement

# ARCHITECTURE.md, "Context parallelism", "Agreement": before any other message of a call, the
# ranks all-gather one int64 row each (the call, whether this rank refused it, and the fields
# that must be equal), so a rank that disagrees or refuses makes every rank raise one
# MaskDSLError instead of an abort, a half-filled buffer or a hang.
_ROW = 32                                        # int64 values per rank, the same for every call
_CALLS = {1: "a context-parallel call cp(q, k, v)", 2: "md.unshard"}
_MESSAGE_BYTES = 4000                            # a refusal's message, utf-8, cut there
_DTYPES = tuple(sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str))


def _group_device(group) -> torch.device:
    """The device a collective of ``group`` takes tensors on: the current CUDA device for
    NCCL, the CPU otherwise (gloo, mpi, or a group with a CPU backend beside NCCL)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _field(label: str, value, same: bool = True, choices=None, digest: bool = False):
    """(label, int64 code, decode(code) -> str, same) of one agreed value: an int or bool, a
    float (its bits), a torch.dtype, one of ``choices``, or a crc32 (``digest``: shown in
    hex)."""
    if digest:
        return label, int(value), lambda c: f"{c:08x}", same
    if choices is not None:
        code = choices.index(value) if value in choices else -1
        return label, code, lambda c: repr(choices[c]) if 0 <= c < len(choices) else "?", same
    if isinstance(value, torch.dtype):
        return label, _DTYPES.index(value), lambda c: str(_DTYPES[c]), same
    if isinstance(value, bool):
        return label, int(value), lambda c: str(bool(c)), same
    if isinstance(value, float):
        return (label, struct.unpack("<q", struct.pack("<d", value))[0],
                lambda c: repr(struct.unpack("<d", struct.pack("<q", c))[0]), same)
    return label, int(value), str, same


def _agree(group, call: int, fields, failure, what: str):
    """The ranks' rows of one call (``fields``: ``_field`` tuples, this rank's values), agreed
    in one all_gather on the group's device before any other message: the same MaskDSLError on
    every rank when the ranks are in different calls, when a rank refused the call (``failure``:
    the exception its own checks raised; its message goes to every rank in a second all_gather,
    only then), or when a field with ``same`` differs (naming the field and every rank's value).
    Returns every rank's codes ([rank][index of field]; the callers read the fields that may
    differ). One rank: no collective; its own failure is raised as it is."""
    W = dist.get_world_size(group)
    if W == 1:
        if failure is not None:
            raise failure
        return [[c for _, c, _, _ in fields]]
    msg = b""
    if failure is not None:
        text = str(failure) if isinstance(failure, MaskDSLError) else \
            f"{type(failure).__name__}: {failure}"
        msg = text.encode("utf-8", "replace")[:_MESSAGE_BYTES]
        fields = []
    row = [call, int(failure is not None), len(msg), len(fields)] + [c for _, c, _, _ in fields]
    assert len(row) <= _ROW, row
    device = _group_device(group)
    mine = torch.tensor(row + [0] * (_ROW - len(row)), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(every, mine, group=group)
    rows = torch.stack(every).cpu().tolist()
    # every decision below is made from ``rows``, the same on every rank: all raise or none
    calls = [r[0] for r in rows]
    if len(set(calls)) > 1:
        said = ", ".join(f"rank {s}: {_CALLS.get(c, f'an unknown call ({c})')}"
                         for s, c in enumerate(calls))
        raise MaskDSLError(f"context parallelism: the ranks of the group are in different "
                           f"calls ({said}); every rank must make the same context-parallel "
                           f"calls in the same order") from failure
    refused = [s for s in range(W) if rows[s][1]]
    if refused:
        longest = max(rows[s][2] for s in refused)
        texts = [""] * W
        if longest:
            buf = torch.zeros(longest, dtype=torch.uint8, device=device)
            if msg:
                buf[:len(msg)] = torch.tensor(list(msg), dtype=torch.uint8)
            got = [torch.empty_like(buf) for _ in range(W)]
            dist.all_gather(got, buf, group=group)
            texts = [bytes(g.cpu()[:rows[s][2]].tolist()).decode("utf-8", "replace")
                     for s, g in enumerate(got)]
        by_text = {}
        for s in refused:
            by_text.setdefault(texts[s], []).append(s)
        said = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} of {W} "
                         f"refused the call: {t}" for t, rs in by_text.items())
        raise MaskDSLError(f"{what}: {said} (every rank of the group raises this "
                           f"error)") from failure
    bad = []
    for i, (label, _, decode, same) in enumerate(fields):
        vals = [r[4 + i] for r in rows]
        if same and len(set(vals)) > 1:
            bad.append(f"{label} (" + ", ".join(f"rank {s}: {decode(v)}"
                                                for s, v in enumerate(vals)) + ")")
    if bad:
        raise MaskDSLError(f"{what}: the ranks disagree on " + "; on ".join(bad) +
                           "; every rank must make the same call (only its slab of the tokens "
                           "differs)")
    return [r[4:4 + len(fields)] for r in rows]


# ---------------------------------------------------------------------- shard / unshard

LAYOUTS = ("bhnd", "grid")


def _where(x, lay: P.Layout, rank: int, local: bool, layout=None):
    """(dim, unit, with_extra, layout) of x: ``layout="bhnd"``, [B, H, N(+E), D] (tokens on
    dim 2, unit 1), or ``"grid"``, [B, *shape, C] activations (grid dim 0 on dim 1, unit
    prod(shape[1:]) tokens). ``layout=None``: the one x fits; x fitting both (a 2-D grid whose
    slab is one row: [B, 1, Y, C] is also [B, H=1, N=Y, D]) is refused, naming ``layout``."""
    if not isinstance(x, torch.Tensor):
        raise MaskDSLError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if layout is not None and layout not in LAYOUTS:
        raise MaskDSLError(f"layout={layout!r}: expected None (the layout x fits), 'bhnd' "
                           f"([B, H, N(+E), D]) or 'grid' ([B, *shape, C] activations)")
    shape, n, E = lay.shape, lay.n, lay.extra
    per_row = math.prod(shape[1:])
    if local:
        counts = {lay.grid_count(rank): False, lay.count(rank): True}
        rows = lay.grid_count(rank) // per_row
    else:
        counts = {n: False, n + E: True}
        rows = shape[0]
    bhnd = x.dim() == 4 and x.shape[2] in counts
    grid = x.dim() == len(shape) + 2 and x.shape[1] == rows and tuple(x.shape[2:-1]) == shape[1:]
    which = "this rank's slab" if local else "the whole grid"
    ns = f"N = {next(iter(counts))}" if len(counts) == 1 else f"N in {sorted(counts)}"
    want_bhnd = (f"[B, H, N, D] with {ns} (tokens of {which}"
                 f"{', with or without the extra tokens' if E else ''})")
    want_grid = (f"[B, {rows}, {', '.join(map(str, shape[1:]))}{', ' if len(shape) > 1 else ''}"
                 f"C] activations for shape {shape} ({which})")
    if layout is None and bhnd and grid:
        raise MaskDSLError(
            f"x: shape {list(x.shape)} fits both layouts ({want_bhnd}, and {want_grid}); pass "
            f"layout='bhnd' or layout='grid'")
    if layout == "bhnd" or (layout is None and bhnd):
        if bhnd:
            return 2, 1, counts[x.shape[2]], "bhnd"
        if layout == "bhnd":
            raise MaskDSLError(f"x: shape {list(x.shape)} with layout='bhnd': expected "
                               f"{want_bhnd}")
    if grid:
        return 1, per_row, False, "grid"
    if layout == "grid":
        raise MaskDSLError(f"x: shape {list(x.shape)} with layout='grid': expected {want_grid}")
    raise MaskDSLError(f"x: shape {list(x.shape)}: expected {want_bhnd} or {want_grid}")


def _pieces(lay, r, unit, with_extra):
    """(start, length) along the split dim of rank r's intervals, in its local order."""
    ivs = lay.intervals(r) if with_extra else list(lay.parts[r])
    return [(a // unit, (b - a) // unit) for a, b in ivs]


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pieces, dim):
        ctx.pieces, ctx.dim, ctx.shape = pieces, dim, x.shape
        return torch.cat([x.narrow(dim, a, m) for a, m in pieces], dim)

    @staticmethod
    def backward(ctx, g):
        out = g.new_zeros(ctx.shape)
        at = 0
        for a, m in ctx.pieces:
            out.narrow(ctx.dim, a, m).copy_(g.narrow(ctx.dim, at, m))
            at += m
        return out, None, None


def _layout_for(x, group, shape, extra_tokens, balance, local, layout):
    group, rank, world = _resolve(group)
    E = extra_tokens
    if isinstance(E, bool) or not isinstance(E, numbers.Integral) or E < 0:
        raise MaskDSLError(f"extra_tokens={E!r}: expected an int >= 0")
    if shape is None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or layout == "grid":
            raise MaskDSLError("shape=None: x must be [B, H, N, D] (a 1-D grid of N tokens); "
                               "pass shape= for other grids and for [B, *shape, C] activations")
        if local:
            raise MaskDSLError("unshard: pass shape= (the grid's shape; cp.unshard knows it)")
        shape = (x.shape[2] - E,)
    shape = check_shape(shape)
    return group, rank, P.layout(shape, world, int(E), balance)


def shard(x, group=None, *, shape=None, extra_tokens: int = 0, balance=None, layout=None):
    """This rank's slab of ``x``: ``layout="bhnd"``, [B, H, N(+E), D] (tokens of a grid of
    ``shape``, extra tokens after them), or ``layout="grid"``, [B, *shape, C] activations;
    split along grid dim 0 as ``md.context_parallel`` splits it (``balance="head-tail"``: two
    slabs per rank). ``layout=None``: the one x fits (a shape fitting both is refused).
    Differentiable; the gradient is this rank's slab of the whole one (zeros elsewhere):
    all-reduce (sum) over the group for the whole. ``cp.shard(x)`` passes cp's split. Local:
    no message."""
    group, rank, lay = _layout_for(x, group, shape, extra_tokens, balance, False, layout)
    dim, unit, with_extra, _ = _where(x, lay, rank, False, layout)
    return _Shard.apply(x, _pieces(lay, rank, unit, with_extra), dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, lay, dim, unit, sizes):
        r, W = comm.rank, comm.world
        # sizes: every rank's slab length along dim (agreed; a rank may hold the extra tokens
        # or not); the other dims and the dtype are agreed equal
        top = max(sizes)
        pad = list(x.shape)
        pad[dim] = top - x.shape[dim]
        xp = torch.cat([x, x.new_zeros(pad)], dim).contiguous() if pad[dim] else x.contiguous()
        parts = [torch.empty_like(xp) for _ in range(W)]
        dist.all_gather(parts, xp, group=comm.group)
        pieces = []                       # (global start, tensor)
        for s in range(W):
            with_extra = sizes[s] * unit == lay.count(s) and lay.extra > 0 and \
                s == lay.extra_owner
            at = 0
            for a, m in _pieces(lay, s, unit, with_extra):
                pieces.append((a, parts[s].narrow(dim, at, m)))
                at += m
        pieces.sort(key=lambda t: t[0])
        ctx.mine = [(a, m) for a, m in _pieces(lay, r, unit, x.shape[dim] * unit == lay.count(r)
                                               and lay.extra > 0 and r == lay.extra_owner)]
        ctx.dim = dim
        return torch.cat([t for _, t in pieces], dim)

    @staticmethod
    def backward(ctx, g):
        return torch.cat([g.narrow(ctx.dim, a, m) for a, m in ctx.mine], ctx.dim), \
            None, None, None, None, None


_MAX_DIMS = 6                    # x of unshard: [B, H, N, D] or [B, *shape (1 to 3 dims), C]


def unshard(x, group=None, *, shape=None, extra_tokens: int = 0, balance=None, layout=None):
    """The whole tensor from every rank's slab (the inverse of :func:`shard`; ``layout`` as
    there), on every rank; differentiable (the gradient is this rank's slab of the incoming
    one). ``cp.unshard(x)`` passes cp's split. The ranks first agree on the call (one small
    all_gather, which also carries the slabs' lengths): a rank whose x does not fit, or ranks
    whose x, shape, layout or dtype differ, raise one MaskDSLError on every rank."""
    group, rank, _ = _resolve(group)
    failure, fields = None, []
    try:
        _, _, lay = _layout_for(x, group, shape, extra_tokens, balance, True, layout)
        dim, unit, _, form = _where(x, lay, rank, True, layout)
        dims = list(x.shape) + [-1] * (_MAX_DIMS - x.dim())   # _where: x.dim() <= 5
        dims[dim] = 0                                        # the slab's length: below
        gshape = list(lay.shape) + [0] * (3 - len(lay.shape))
        fields = ([_field("layout", form, choices=LAYOUTS), _field("x.dim()", x.dim())]
                  + [_field(f"x.shape[{i}]", d) for i, d in enumerate(dims)]
                  + [_field("x.dtype", x.dtype)]
                  + [_field(f"shape[{i}]", d) for i, d in enumerate(gshape)]
                  + [_field("extra_tokens", lay.extra), _field("balance", lay.balance,
                                                                   choices=P.BALANCES),
                     _field("the slab's length", x.shape[dim], same=False)])
    except Exception as e:                 # agreed below: every rank raises, none waits
        failure = e
    rows = _agree(group, 2, fields, failure, "md.unshard")
    sizes = [int(r[-1]) for r in rows]
    return _Unshard.apply(x, _Comm(group), lay, dim, unit, sizes)


# ---------------------------------------------------------------------- context parallel

def _count(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise MaskDSLError(f"{name}={v!r}: expected an int >= {lo}")
    return int(v)


class _Local:
    """A check_qkv extent for this rank's tensors."""

    square = False

    def __init__(self, nq, nk, rank, world):
        self.nq, self.nk, self.rank, self.world = nq, nk, rank, world

    def describe(self):
        return f"context parallelism (rank {self.rank} of {self.world}: its slab)"


class ContextParallel:
    """``attn`` split over the ranks of a process group; call it as ``cp(q, k, v)`` with this
    rank's slab (``cp.shard(x)``). Attributes: ``strategy`` (the one that runs), ``reason``
    (why), ``layout`` (the split), ``traffic`` ({"sent", "received"}: bytes this rank moved in
    its last forward). :meth:`plan` gives every runnable strategy's bytes."""

    def __init__(self, attn, group=None, strategy="auto", *, balance=None, kv_heads=None,
                 head_dim: int = 64, head_dim_v: Optional[int] = None, batch: int = 1,
                 dtype=torch.bfloat16):
        if not isinstance(attn, CompiledAttention):
            raise MaskDSLError(f"attn: expected a CompiledAttention from md.compile, got "
                               f"{type(attn).__name__}")
        if strategy not in STRATEGIES:
            raise MaskDSLError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
        ext = attn.extent
        if ext.q is not None or ext.kv is not None:
            raise MaskDSLError(f"attn has {ext.describe()}: context parallelism splits the whole "
                               f"grid itself; compile without q_range/kv_range")
        if any(isinstance(t, Dropout) for t in score_terms(attn.score)):
            raise MaskDSLError("attn has a dropout term: context parallelism does not support "
                               "dropout; drop the dropout term")
        self.attn = attn
        self.group, self.rank, self.world = _resolve(group)
        self._comm = _Comm(self.group)
        self.layout = P.layout(attn.shape, self.world, ext.extra, balance)
        self.balance = balance
        self.extra_mode = ext.mode
        H = attn.heads
        kv_heads = H if kv_heads is None else _count("kv_heads", kv_heads)
        if H % kv_heads:
            raise MaskDSLError(f"kv_heads={kv_heads}: expected a divisor of heads={H}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MaskDSLError(f"dtype={dtype!r}: expected a floating torch.dtype")
        head_dim = _count("head_dim", head_dim)
        self._hint = dict(batch=_count("batch", batch), kv_heads=kv_heads, head_dim=head_dim,
                          head_dim_v=head_dim if head_dim_v is None else
                          _count("head_dim_v", head_dim_v), dtype=dtype)
        self._asked = strategy
        self._halo = None                  # (structure versions, HaloPlan or None)
        self._halo_crc = None              # (HaloPlan, crc32 of its message sizes)
        # what every rank must have compiled alike (agreed at each call; reprs show a tensor
        # by its shape, so this is the same on every rank for the same spec)
        self._spec = zlib.crc32(repr((repr(attn.pattern), attn.shape, attn.heads,
                                      repr(attn.score), ext.extra, ext.mode)).encode())
        self.traffic = {"sent": 0, "received": 0}
        self.strategy, self.reason = self._choose(**self._hint, return_lse=False)
        self._chosen_for = (dict(self._hint), False)

    # ------------------------------------------------------------------ planning
    def _halo_plan(self):
        attn = self.attn
        # attn's generation goes up when a document's ids change in place (ARCHITECTURE.md
        # "Caches"): the plan is read anew from the ids as they are now
        key = attn.refresh()
        if self._halo is None or self._halo[0] != key:
            # built outside inference mode: the cached index tensors serve training calls too
            self._halo = (key, outside_inference_mode(P.halo_plan)(row_major(attn),
                                                                   self.layout))
        return self._halo[1]

    def _refusals(self, kv_heads):
        H, W = self.attn.heads, self.world
        out = {}
        if H % W or kv_heads % W:
            out["ulysses"] = (f"heads={H} and kv_heads={kv_heads} must both be divisible by the "
                              f"world size {W}")
        return out

    def plan(self, *, batch=None, kv_heads=None, head_dim=None, head_dim_v=None, dtype=None,
             return_lse: bool = False) -> dict:
        """{strategy: {"sent": [bytes per rank], "received": [bytes per rank]}} of one forward,
        for every strategy that can run (defaults: the sizes given to context_parallel, or
        the last call's)."""
        h = dict(self._hint)
        for k, v in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                     ("head_dim_v", head_dim_v), ("dtype", dtype)):
            if v is not None:
                h[k] = v
        return self._plans(**h, return_lse=return_lse)

    def _plans(self, *, batch, kv_heads, head_dim, head_dim_v, dtype, return_lse):
        refused = self._refusals(kv_heads)
        out = {}
        for name in P.STRATEGIES:
            if name in refused:
                continue
            halo = None
            if name == "halo":
                halo = self._halo_plan()
                if halo is None:
                    continue
            out[name] = P.bytes_of(name, self.layout, heads=self.attn.heads, kv_heads=kv_heads,
                                   batch=batch, head_dim=head_dim, head_dim_v=head_dim_v,
                                   dtype=dtype, extra_mode=self.extra_mode,
                                   return_lse=return_lse, halo=halo)
        return out

    def _choose(self, return_lse, **hint):
        plans = self._plans(**hint, return_lse=return_lse)
        refused = self._refusals(hint["kv_heads"])
        if "halo" not in plans:
            refused["halo"] = ("the pattern has no bounded reach (its halo plan would evaluate "
                               f"more than {P.HALO_BUDGET} token pairs)")
        total = {k: (sum(v["sent"]), max(v["received"])) for k, v in plans.items()}
        said = ", ".join(f"{k} {t[0]:,} bytes" for k, t in total.items())
        no = "; ".join(f"{k} cannot run: {w}" for k, w in refused.items())
        if self._asked != "auto":
            if self._asked in refused:
                raise MaskDSLError(f"strategy={self._asked!r}: {refused[self._asked]}")
            return self._asked, (f"{self._asked}: asked for; one forward moves {said} in all "
                                 f"ranks" + (f" ({no})" if no else "") + self._balance_hint())
        order = ("allgather", "ulysses", "halo")          # ties go to the simpler exchange
        best = min(total, key=lambda k: (total[k], order.index(k)))
        return best, (f"{best}: the fewest bytes for this pattern, shape {self.attn.shape} and "
                      f"world size {self.world} (one forward, all ranks: {said})"
                      + (f"; {no}" if no else "") + self._balance_hint())

    def _balance_hint(self) -> str:
        """A note when the slabs' work is uneven and head-tail balancing would even it (a
        causal pattern without a window), and balancing is off."""
        if self.balance is not None or self.world == 1:
            return ""
        try:
            other = P.layout(self.attn.shape, self.world, self.layout.extra, "head-tail")
        except MaskDSLError:
            return ""
        prog = row_major(self.attn)
        load, even = P.work(prog, self.layout), P.work(prog, other)
        mean = sum(load) / len(load)
        if mean == 0 or max(load) <= 1.25 * mean or max(even) >= 0.8 * max(load):
            return ""
        share = ", ".join(f"{x / mean:.2f}" for x in load)
        return (f"; the slabs' work is uneven (per rank, relative to the mean: {share}): "
                f"balance='head-tail' evens it")

    # ------------------------------------------------------------------ layout helpers
    def shard(self, x, *, layout=None):
        """This rank's slab of x (``layout="bhnd"``: [B, H, N(+E), D]; ``"grid"``: [B, *shape,
        C]; None: the one x fits); see :func:`shard`."""
        return shard(x, self.group, shape=self.attn.shape, extra_tokens=self.layout.extra,
                     balance=self.balance, layout=layout)

    def unshard(self, x, *, layout=None):
        """The whole tensor from every rank's slab (``layout`` as in :meth:`shard`); see
        :func:`unshard`."""
        return unshard(x, self.group, shape=self.attn.shape, extra_tokens=self.layout.extra,
                       balance=self.balance, layout=layout)

    def __repr__(self):
        return (f"ContextParallel({self.attn!r}, world={self.world}, strategy="
                f"{self.strategy!r}" + (f", balance={self.balance!r}" if self.balance else "")
                + ")")

    # ------------------------------------------------------------------ the call
    def __call__(self, q, k, v, *, scale: Optional[float] = None, return_lse: bool = False):
        """This rank's output [B, H, n_local, Dv] (and lse [B, H, n_local]) for its slab of q,
        k, v (k, v may carry H_kv heads dividing H)."""
        # this rank's checks, then the agreement (one all_gather, ARCHITECTURE.md "Context
        # parallelism", "Agreement") before any message: a rank that refuses the call or
        # disagrees with another makes every rank raise the same MaskDSLError
        failure, fields = None, []
        try:
            scale, fields = self._check_call(q, k, v, scale, return_lse)
        except Exception as e:
            failure = e
        _agree(self.group, 1, fields, failure, "context parallelism")
        self._comm.sent = self._comm.received = 0
        run = {"halo": self._run_halo, "allgather": self._run_allgather,
               "ulysses": self._run_ulysses}[self.strategy]
        out, lse, token = run(q, k, v, scale, return_lse)
        out = _Tie.apply(out, token)
        self.traffic = {"sent": self._comm.sent, "received": self._comm.received}
        return (out, lse) if return_lse else out

    def _check_call(self, q, k, v, scale, return_lse):
        """(scale, the agreement's fields) of a call, after this rank's own checks; plans the
        strategy for the call's sizes (the same on every rank once the sizes agree)."""
        if not isinstance(return_lse, bool):
            raise MaskDSLError(f"return_lse={return_lse!r}: expected True or False")
        lay, r = self.layout, self.rank
        nq = lay.count(r) if self.extra_mode == "all" else lay.grid_count(r)
        B, H, _, D = check_qkv(q, k, v, self.attn.shape, self.attn.heads,
                               extent=_Local(nq, lay.count(r), r, self.world))
        scale = check_scale(scale, D)
        check_params_device(self.attn.score, q.device)
        check_tensor_params(self.attn.score)
        hint = dict(batch=B, kv_heads=k.shape[1], head_dim=D, head_dim_v=v.shape[-1],
                    dtype=q.dtype)
        if (hint, return_lse) != self._chosen_for:
            self.strategy, self.reason = self._choose(**hint, return_lse=return_lse)
            self._hint, self._chosen_for = hint, (hint, return_lse)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        halo = self._halo_digest() if self.strategy == "halo" else 0
        return scale, [
            _field("batch (q.shape[0])", B), _field("heads (q.shape[1])", H),
            _field("kv heads (k.shape[1])", k.shape[1]), _field("head dim (q.shape[3])", D),
            _field("value head dim (v.shape[3])", v.shape[3]), _field("dtype", q.dtype),
            _field("scale", scale), _field("return_lse", return_lse),
            _field("autograd (grad mode on and q, k or v requiring grad)", grad),
            _field("strategy", self.strategy, choices=P.STRATEGIES),
            _field("balance", self.balance, choices=P.BALANCES),
            _field("extra tokens", lay.extra), _field("extra", self.extra_mode,
                                                      choices=("all", "keys")),
            _field("the compiled attention (a digest of its pattern, shape, heads and score)",
                   self._spec, digest=True),
            _field("the halo plan (a digest of its message sizes)", halo, digest=True),
        ]

    def _halo_digest(self) -> int:
        """A crc32 of the halo plan's message sizes (document ids changed on one rank only
        give another plan there)."""
        hp = self._halo_plan()
        if self._halo_crc is None or self._halo_crc[0] is not hp:
            W = self.world
            sizes = ",".join(str(hp.count(s, r)) for s in range(W) for r in range(W))
            self._halo_crc = (hp, zlib.crc32(sizes.encode()))
        return self._halo_crc[1]

    # the local attention -------------------------------------------------
    def _extras(self, device, heads=None):
        H = self.attn.heads
        sink, _ = score_extras(self.attn.score, H, device, False)
        cap = softcap_values(self.attn.score, H, device)
        if heads is not None:
            sink = sink[heads] if sink is not None else None
            cap = cap[heads] if cap is not None else None
        return sink, cap

    def _grid(self, q, qpos, K, V, kpos, scale, sink, cap, heads=None):
        """Grid queries at ascending positions ``qpos`` against the key buffer K, V at ``kpos``
        (grid keys through the tile classes, extra keys as a dense stripe)."""
        out, lse = tiled_rect(row_major(self.attn), q, K, V, qpos, kpos, scale, sink=sink,
                              head_ids=heads)
        xs = torch.nonzero(kpos >= self.layout.n).reshape(-1)
        if xs.numel():
            xs = xs.to(K.device)
            stripe = dense_stripe(q, K.index_select(2, xs), V.index_select(2, xs), scale, cap, None)
            out, lse = combine([(out, lse), stripe])
        return out, lse

    def _run_allgather(self, q, k, v, scale, return_lse):
        lay, r, W = self.layout, self.rank, self.world
        B, Hk, _, D = k.shape
        kv = torch.cat([k, v], -1)
        sends = [(t, kv) for t in range(W) if t != r]
        recvs = [(s, (B, Hk, lay.count(s), kv.shape[-1]), kv.dtype) for s in range(W) if s != r]
        got, token = _exchange(self._comm, sends, recvs, q.device, (q, k, v))
        blocks = got[:r] + [kv] + got[r:]
        KV = torch.cat(blocks, 2)
        K, V = KV[..., :D], KV[..., D:]
        kpos = torch.cat([self.layout.positions(s) for s in range(W)])
        sink, cap = self._extras(q.device)
        gc = lay.grid_count(r)
        pos = self.layout.positions(r)
        out, lse = self._grid(q[:, :, :gc], pos[:gc], K, V, kpos, scale, sink, cap)
        if q.shape[2] > gc:                      # the extra queries (their owner): every key
            ox, lx = dense_stripe(q[:, :, gc:], K, V, scale, cap, sink)
            out, lse = torch.cat([out, ox.to(out.dtype)], 2), torch.cat([lse, lx.to(lse.dtype)], 2)
        return out, lse, token

    def _run_halo(self, q, k, v, scale, return_lse):
        lay, r, W = self.layout, self.rank, self.world
        hp = self._halo_plan()
        B, H, _, D = q.shape
        Hk = k.shape[1]
        dev = q.device
        kv = torch.cat([k, v], -1)
        gc = lay.grid_count(r)
        owner = lay.extra_owner
        extra_q = lay.extra and self.extra_mode == "all"
        sends = [(t, kv.index_select(2, hp.rows[r][t].to(dev)))
                 for t in range(W) if t != r and hp.count(r, t)]
        recvs = [(s, (B, Hk, hp.count(s, r), kv.shape[-1]), kv.dtype)
                 for s in range(W) if s != r and hp.count(s, r)]
        nh = len(recvs)
        if extra_q:
            if r == owner:
                sends += [(t, q[:, :, gc:]) for t in range(W) if t != r]
            else:
                recvs.append((owner, (B, H, lay.extra, D), q.dtype))
        got, token = _exchange(self._comm, sends, recvs, dev, (q, k, v))
        halo = got[:nh]
        K = torch.cat([k] + [g[..., :D] for g in halo], 2)
        V = torch.cat([v] + [g[..., D:] for g in halo], 2)
        pos = self.layout.positions(r)
        kpos = torch.cat([pos] + [hp.positions[s][r] for s in range(W)
                                  if s != r and hp.count(s, r)])
        sink, cap = self._extras(dev)
        out, lse = self._grid(q[:, :, :gc], pos[:gc], K, V, kpos, scale, sink, cap)
        if extra_q:
            # the extra queries attend every key: each rank merges in its own grid keys' part
            lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
            E, Dv = lay.extra, v.shape[-1]
            if r == owner:
                own = dense_stripe(q[:, :, gc:], k, v, scale, cap, sink)
                back = []
                for s in range(W):
                    if s != r:
                        back += [(s, (B, H, E, Dv), q.dtype), (s, (B, H, E), lse_dt)]
                parts, token = _exchange(self._comm, [], back, dev, (q, k, v), token)
                ox, lx = combine([own] + [(parts[2 * i].to(own[0].dtype), parts[2 * i + 1])
                                        for i in range(W - 1)])
                out = torch.cat([out, ox.to(out.dtype)], 2)
                lse = torch.cat([lse, lx.to(lse.dtype)], 2)
            else:
                po, pl = dense_stripe(got[nh], k, v, scale, cap, None)
                _, token = _exchange(self._comm, [(owner, po.to(q.dtype)), (owner, pl.to(lse_dt))],
                                     [], dev, (q, k, v), token)
        return out, lse, token

    def _whole_sequence(self, hq: int):
        """Ulysses' local attention as a compiled attention of ``hq`` heads over the whole
        sequence (the backend the device runs: tiles on CPU, flex/triton on CUDA), when no
        head differs from another and nothing depends on the head count
        (``varies_per_head(pattern, score)``: not per-head values, heads([...]), mask_fn,
        tensor score parameters, alibi's geometric slopes or score_fn); None otherwise (the
        rectangle path, at each head's own parameters)."""
        found = self.__dict__.get("_whole")
        if found is not None and found[0] == hq:
            return found[1]
        a = self.attn
        sub = None
        if not varies_per_head(a.pattern, a.score):
            e = a.extent
            sub = md_compile(a.pattern, a.shape, hq, score=a.score,
                             backend=a.requested, device=a.device, extra_tokens=e.extra,
                             extra=e.mode)
        self._whole = (hq, sub)
        return sub

    def _run_ulysses(self, q, k, v, scale, return_lse):
        lay, r, W = self.layout, self.rank, self.world
        B, H, nq, D = q.shape
        Hk, Dv = k.shape[1], v.shape[-1]
        hq, hk = H // W, Hk // W
        dev = q.device
        kv = torch.cat([k, v], -1)
        mode_all = self.extra_mode == "all"
        nq_of = [lay.count(s) if mode_all else lay.grid_count(s) for s in range(W)]
        sends, recvs = [], []
        for t in range(W):
            if t != r:
                sends += [(t, q[:, t * hq:(t + 1) * hq]), (t, kv[:, t * hk:(t + 1) * hk])]
        for s in range(W):
            if s != r:
                recvs += [(s, (B, hq, nq_of[s], D), q.dtype),
                          (s, (B, hk, lay.count(s), D + Dv), kv.dtype)]
        got, token = _exchange(self._comm, sends, recvs, dev, (q, k, v))
        qs, kvs = [], []
        i = 0
        for s in range(W):
            if s == r:
                qs.append(q[:, r * hq:(r + 1) * hq])
                kvs.append(kv[:, r * hk:(r + 1) * hk])
            else:
                qs.append(got[i])
                kvs.append(got[i + 1])
                i += 2
        pos = [self.layout.positions(s) for s in range(W)]
        qpos = torch.cat([p[:m] for p, m in zip(pos, nq_of)])
        kpos = torch.cat(pos)
        order = torch.argsort(qpos)
        Q = torch.cat(qs, 2).index_select(2, order.to(dev))
        KV = torch.cat(kvs, 2)
        K, V = KV[..., :D], KV[..., D:]
        out = lse = None
        sub = self._whole_sequence(hq)
        if sub is not None:       # every head alike: the compiled attention on hq heads
            korder = torch.argsort(kpos).to(dev)
            try:
                got_ = sub(Q, K.index_select(2, korder), V.index_select(2, korder), scale=scale,
                           return_lse=return_lse)
                out, lse = got_ if return_lse else (got_, None)
            except MaskDSLError:  # e.g. flex on CPU has no lse: the rectangle path below
                out = lse = None
        if out is None:
            heads = torch.arange(r * hq, (r + 1) * hq)
            sink, cap = self._extras(dev, heads)
            n = lay.n
            out, lse = self._grid(Q[:, :, :n], qpos[order][:n], K, V, kpos, scale, sink, cap,
                                  heads)
            if Q.shape[2] > n:
                ox, lx = dense_stripe(Q[:, :, n:], K, V, scale, cap, sink)
                out = torch.cat([out, ox.to(out.dtype)], 2)
                lse = torch.cat([lse, lx.to(lse.dtype)], 2)
        back = torch.argsort(order).to(dev)            # global order -> buffer order
        out = out.index_select(2, back)
        lse = lse.index_select(2, back) if return_lse else None
        starts = [0]
        for m in nq_of:
            starts.append(starts[-1] + m)
        sends, recvs = [], []
        for t in range(W):
            if t != r:
                sends.append((t, out[:, :, starts[t]:starts[t + 1]]))
                if return_lse:
                    sends.append((t, lse[:, :, starts[t]:starts[t + 1]]))
        for s in range(W):
            if s != r:
                recvs.append((s, (B, hq, nq, Dv), out.dtype))
                if return_lse:
                    recvs.append((s, (B, hq, nq), lse.dtype))
        got, token = _exchange(self._comm, sends, recvs, dev, (q, k, v), token)
        step = 2 if return_lse else 1
        outs, lses = [], []
        i = 0
        for s in range(W):
            if s == r:
                outs.append(out[:, :, starts[r]:starts[r + 1]])
                if return_lse:
                    lses.append(lse[:, :, starts[r]:starts[r + 1]])
            else:
                outs.append(got[i])
                if return_lse:
                    lses.append(got[i + 1])
                i += step
        return torch.cat(outs, 1), (torch.cat(lses, 1) if return_lse else None), token


def context_parallel(attn, group=None, strategy: str = "auto", *, balance=None, kv_heads=None,
                     head_dim: int = 64, head_dim_v: Optional[int] = None, batch: int = 1,
                     dtype=torch.bfloat16) -> ContextParallel:
    """``attn`` (a CompiledAttention) split over the ranks of ``group`` (None: the default
    group; a ProcessGroup; a 1-D DeviceMesh) along grid dim 0.

    ``strategy``: "halo", "ulysses", "allgather" or "auto" (the fewest bytes; ``cp.reason``).
    ``balance="head-tail"``: two slabs per rank (r and 2W-1-r) so a causal pattern's work is
    even. ``kv_heads``, ``head_dim``, ``head_dim_v``, ``batch``, ``dtype``: the sizes ``auto``
    and :meth:`ContextParallel.plan` count bytes for (a call with other sizes re-plans)."""
    return ContextParallel(attn, group, strategy, balance=balance, kv_heads=kv_heads,
                           head_dim=head_dim, head_dim_v=head_dim_v, batch=batch, dtype=dtype)
