"""The multi-process half of tests/test_distributed.py: ``run(rank, world, port, out)`` runs
every case of ``cases(world)`` under ``torch.multiprocessing.spawn`` with gloo over 127.0.0.1,
each strategy that can run, and compares this rank's share with the single-process reference
(``md.reference.attention`` on the whole tensors, every rank builds them from one seed).
Rank 0 writes one JSON record per (case, strategy, balance) to ``out``; the test functions read
them (one spawn per world size keeps CI to a few seconds per world size).

Gradients: q, k, v pass through ``cp.shard`` (this rank's part of the gradient, zeros elsewhere)
and the output through ``cp.unshard``, the loss is the same on every rank; after an all-reduce
(sum) the gradients of q, k, v and of learnable score tables equal the single-process ones
(ARCHITECTURE.md, "Context parallelism").
"""
from __future__ import annotations

import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

import maskdsl as md
from maskdsl.parallel import distributed as mdd

TOL = 1e-9


def cases(world):
    """(name, dict) of every case; tensors float64, small."""
    g = torch.Generator().manual_seed(7)
    table = (torch.randn(2, 2 * 9 - 1, 2 * 8 - 1, generator=g, dtype=torch.float64) * 0.5)
    sinkl = torch.tensor([0.3, -0.2], dtype=torch.float64)
    out = [
        ("window-1d-sinks-gqa", dict(p=md.causal() & md.window(9) | md.sink(3), shape=(41,),
                                     H=2, Hk=1, lse=True)),
        ("nbhd-2d-dil-stride-causal", dict(
            p=md.neighborhood((3, 5), stride=(1, 2), dilation=(2, 1), causal=(True, False)),
            shape=(13, 10), H=2)),
        ("nbhd-3d-dilation", dict(p=md.neighborhood((3, 3, 3), dilation=(1, 2, 1)),
                                  shape=(7, 6, 5), H=2, lse=True)),
        ("block-shift", dict(p=md.block((4, 4), shift=(2, 2)), shape=(10, 8), H=2)),
        ("radial", dict(p=md.radial(decay=1.0, min_window=4, sink_frames=1), shape=(8, 12),
                        H=2)),
        ("per-head", dict(p=md.heads([md.neighborhood((3, 3)),
                                      md.neighborhood((5, 3), dilation=(1, 2))]),
                          shape=(11, 7), H=2)),
        ("score-terms", dict(p=md.neighborhood((3, 3)), shape=(9, 8), H=2,
                             learn=dict(table=table, sink=sinkl),
                             score=lambda t: (md.relative_bias(t["table"])
                                              + md.distance_decay(md.per_head([0.1, 0.3]))
                                              + md.softcap(4.0) + md.sink_logit(t["sink"])))),
        ("extra-all-gqa", dict(p=md.neighborhood((3, 3)), shape=(8, 6), H=2, Hk=1, E=5,
                               mode="all", lse=True,
                               score=lambda t: md.softcap(6.0) + md.sink_logit(md.per_head([0.2, 0.1])))),
        ("extra-all-4-heads", dict(p=md.causal() & md.window(3), shape=(20,), H=4, E=3,
                                   mode="all", lse=True,
                                   score=lambda t: md.softcap(5.0) + md.sink_logit(
                                       md.per_head([0.2, -0.3, 0.0, 0.5])))),
        ("extra-keys", dict(p=md.window(4), shape=(30,), H=2, E=4, mode="keys")),
        ("causal-balanced", dict(p=md.causal(), shape=(512,), H=4, Hk=2,
                                 balances=(None, "head-tail"))),
        ("heads-8-kv-4", dict(p=md.neighborhood((3, 3), causal=(True, False)), shape=(9, 5),
                              H=8, Hk=4)),
        ("heads-6-kv-3", dict(p=md.causal() & md.window(5), shape=(25,), H=6, Hk=3)),
        ("nonfinite", dict(p=md.window(3), shape=(29,), H=2, nan=(0, 1, 17), grads=False)),
        # alibi()'s geometric slopes come from the head count: Ulysses must not rebind them to
        # H / W heads (issue 21, finding 2: world 4 was 1.99 off, and auto picked it)
        ("alibi-geometric", dict(p=md.causal(), shape=(32,), H=8,
                                 score=lambda t: md.alibi())),
    ]
    return out


def _tensors(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, D = 2, 4
    N = 1
    for s in c["shape"]:
        N *= s
    E = c.get("E", 0)
    nq = N + (E if c.get("mode", "all") == "all" else 0)
    H, Hk = c["H"], c.get("Hk", c["H"])
    q = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, N + E, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, N + E, D + 1, generator=g, dtype=torch.float64)
    if "nan" in c:
        b, h, i = c["nan"]
        k[b, h, i, 0] = float("nan")
    go = torch.randn(B, H, nq, D + 1, generator=g, dtype=torch.float64)
    return q, k, v, go


def _err(a, b):
    if a.shape != b.shape:
        return float("inf")
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    ok = ~torch.isnan(a)
    return float((a[ok] - b[ok]).abs().max().detach()) if ok.any() else 0.0


def _one(c, world, rank, strategy, balance):
    learn = {k: v.clone().requires_grad_(True) for k, v in c.get("learn", {}).items()}
    score = c["score"](learn) if "score" in c else None
    E, mode = c.get("E", 0), c.get("mode", "all")
    attn = md.compile(c["p"], shape=c["shape"], heads=c["H"], score=score, backend="tiles",
                      extra_tokens=E, extra=mode)
    q, k, v, go = _tensors(c)
    grads = c.get("grads", True)
    for t in (q, k, v):
        t.requires_grad_(grads)
    lse = c.get("lse", False)
    ref = md.reference.attention(q, k, v, c["p"], c["shape"], score=score, extra_tokens=E,
                                 extra=mode, return_lse=lse)
    rec = {"case": c["name"], "strategy": strategy, "balance": balance}
    try:
        cp = mdd.context_parallel(attn, strategy=strategy, balance=balance, kv_heads=k.shape[1],
                                  head_dim=4, head_dim_v=5, batch=2, dtype=torch.float64)
    except md.MaskDSLError as e:
        rec["refused"] = str(e)
        return rec
    rec["chosen"], rec["reason"] = cp.strategy, cp.reason
    with torch.inference_mode():        # the plan built here must serve the training call
        first = cp(cp.shard(q), cp.shard(k), cp.shard(v), return_lse=lse)
    got = cp(cp.shard(q), cp.shard(k), cp.shard(v), return_lse=lse)
    rec["inference_mode_equal"] = all(
        torch.equal(a.nan_to_num(), b.detach().nan_to_num())
        for a, b in zip(first if lse else [first], got if lse else [got]))
    out = cp.unshard(got[0] if lse else got)
    rec["local_rows"] = int((got[0] if lse else got).shape[2])
    rec["whole_sequence"] = cp.__dict__.get("_whole", (0, None))[1] is not None
    errs = {"out": _err(out, ref[0] if lse else ref)}
    if lse:
        errs["lse"] = _err(cp.unshard(got[1].unsqueeze(-1)).squeeze(-1), ref[1])
    traffic = [None] * world
    dist.all_gather_object(traffic, cp.traffic)
    plan = cp.plan(return_lse=lse)
    rec["plan"] = plan
    rec["traffic"] = traffic
    if grads:
        ins = [q, k, v] + list(learn.values())
        mine = torch.autograd.grad((out * go).sum(), ins)
        ref_g = torch.autograd.grad(((ref[0] if lse else ref) * go).sum(), ins)
        for name, a, b in zip(["q", "k", "v"] + list(learn), mine, ref_g):
            a = a.clone()
            dist.all_reduce(a)
            errs["d" + name] = _err(a, b)
    rec["errors"] = errs
    return rec


def _parallel_branches(world):
    """Two context-parallel attentions on the same sharded q, k, v, in parallel branches of one
    graph (halo beside all-gather; one branch behind a few more ops), one backward: autograd
    must run their exchanges' backwards in one order on every rank (it orders ready nodes by
    creation, and every rank creates them alike), and the gradients equal the single-process
    ones."""
    c = dict(p=md.causal() & md.window(9) | md.sink(3), shape=(41,), H=2, Hk=1)
    p2 = md.neighborhood(7, dilation=2)
    q, k, v, go = _tensors(c, seed=3)
    for t in (q, k, v):
        t.requires_grad_(True)
    a = mdd.context_parallel(md.compile(c["p"], (41,), 2, backend="tiles"), strategy="halo")
    b = mdd.context_parallel(md.compile(p2, (41,), 2, backend="tiles"), strategy="allgather")
    qs, ks, vs = a.shard(q), a.shard(k), a.shard(v)
    ya = a.unshard(a(qs, ks, vs))
    yb = b.unshard(b(qs * 0.5, ks, vs).tanh() * 2.0)
    loss = (ya * go).sum() + (yb * go.flip(-2)).sum()
    ra = md.reference.attention(q, k, v, c["p"], (41,))
    rb = md.reference.attention(q * 0.5, k, v, p2, (41,)).tanh() * 2.0
    ref = (ra * go).sum() + (rb * go.flip(-2)).sum()
    errs = {"loss": abs(float(loss.detach()) - float(ref.detach()))}
    for name, g, r in zip("qkv", torch.autograd.grad(loss, [q, k, v]),
                          torch.autograd.grad(ref, [q, k, v])):
        g = g.clone()
        dist.all_reduce(g)
        errs["d" + name] = _err(g, r)
    return {"case": "parallel-branches", "strategies": [a.strategy, b.strategy],
            "branch_errors": errs}


# ---------------------------------------------------------------------- agreement

def _attempt(fn):
    """("ok", value) or ("MaskDSLError", message) or (another exception's name, message)."""
    try:
        return "ok", fn()
    except md.MaskDSLError as e:
        return "MaskDSLError", str(e)
    except Exception as e:                 # recorded: the test fails on it
        return type(e).__name__, str(e)


def _agreement_scenarios(world, rank):
    """(name, fn) of calls on which the last rank differs from the others (or refuses): every
    rank must raise one MaskDSLError (issue 21, finding 6), never abort, hang or compute."""
    last = rank == world - 1
    shape, H = (4 * world,), 2

    def qkv(B=2, Hq=H, Hk=H, D=4, dtype=torch.float64, n=None, grad=False):
        n = 4 if n is None else n
        g = torch.Generator().manual_seed(11)
        q = torch.randn(B, Hq, n, D, generator=g, dtype=torch.float64).to(dtype)
        k = torch.randn(B, Hk, n, D, generator=g, dtype=torch.float64).to(dtype)
        v = torch.randn(B, Hk, n, D + 1, generator=g, dtype=torch.float64).to(dtype)
        return q.requires_grad_(grad), k, v

    def cp(strategy="halo", p=None, heads=H, **kw):
        attn = md.compile(md.causal() & md.window(5) if p is None else p, shape, heads,
                          backend="tiles", **kw)
        return mdd.context_parallel(attn, strategy=strategy)

    def call(strategy="halo", cp_kw=None, **kw):
        def fn():
            c = cp(strategy, **(cp_kw or {}))
            out = c(*qkv(**{k: v for k, v in kw.items() if k not in ("scale", "return_lse")}),
                    **{k: v for k, v in kw.items() if k in ("scale", "return_lse")})
            return list(out.shape)
        return fn

    odd = lambda a, b: b if last else a          # noqa: E731  the last rank's value is b
    out = [
        ("batch", call(B=odd(2, 3))),
        ("head-dim", call(D=odd(4, 3))),
        ("dtype", call(dtype=odd(torch.float64, torch.float32))),
        ("kv-heads", call(Hk=odd(2, 1))),
        ("kv-heads-ulysses", call("ulysses", cp_kw=dict(heads=world), Hq=world,
                                  Hk=odd(world, 1))),
        ("local-tokens", call(n=odd(4, 3))),
        ("local-tokens-allgather", call("allgather", n=odd(4, 5))),
        ("heads", call(cp_kw=dict(heads=odd(2, 4)), Hq=odd(2, 4), Hk=odd(2, 4))),
        ("extra-tokens", call(cp_kw=dict(extra_tokens=odd(0, 2)), n=odd(4, 6))),
        ("return-lse", call(return_lse=odd(False, True))),
        ("scale", call(scale=odd(None, 0.25))),
        ("autograd", call(grad=odd(False, True))),
        ("strategy", call(odd("halo", "allgather"))),
        ("refused-return-lse", call(return_lse=odd(False, "yes"))),
        ("refused-q-none", lambda: list(cp()(None if last else qkv()[0], *qkv()[1:]).shape)),
        ("pattern", call(cp_kw=dict(p=odd(md.causal() & md.window(5), md.window(5))))),
        ("document-ids", lambda: list(cp("halo", p=md.document(
            torch.arange(4 * world) // odd(4, 8)))(*qkv()).shape)),
        ("different-calls", lambda: list(md.unshard(torch.zeros(1, 1, 4, 2), shape=shape).shape)
         if last else call()()),
    ]
    # md.unshard: [B, *shape, C] activations, a 2-D grid whose slabs are one row on some rank
    for rows in (world, world + 1):
        gshape = (rows, 8)
        x = torch.arange(2 * rows * 8 * 5, dtype=torch.float64).reshape(2, rows, 8, 5)
        out += [
            (f"unshard-{rows}x8-inferred", lambda s=gshape, x=x: md.unshard(
                md.shard(x, shape=s, layout="grid"), shape=s)),
            (f"unshard-{rows}x8-grid", lambda s=gshape, x=x: bool(torch.equal(md.unshard(
                md.shard(x, shape=s, layout="grid"), shape=s, layout="grid"), x))),
        ]
    out += [
        ("unshard-dtype", lambda: md.unshard(torch.zeros(1, 2, 4, 3, dtype=odd(
            torch.float64, torch.float32)), shape=shape)),
        ("unshard-channels", lambda: md.unshard(torch.zeros(1, 2, 4, odd(3, 5)), shape=shape)),
        ("unshard-slab-length", lambda: md.unshard(torch.zeros(1, 2, odd(4, 3), 3),
                                                   shape=shape)),
    ]
    return out


def _agreement(world, rank):
    """One record per scenario: what each rank got."""
    records = []
    for name, fn in _agreement_scenarios(world, rank):
        got = _attempt(fn)
        every = [None] * world
        dist.all_gather_object(every, [got[0], got[1] if got[0] != "ok" else repr(got[1])])
        records.append({"case": "agree:" + name, "by_rank": every})
    # after all that, the group still serves a good call on every rank
    q, k, v, _ = _tensors(dict(shape=(4 * world,), H=2))
    attn = md.compile(md.causal() & md.window(5), (4 * world,), 2, backend="tiles")
    c = mdd.context_parallel(attn, strategy="halo")
    out = c.unshard(c(c.shard(q), c.shard(k), c.shard(v)))
    records.append({"case": "agree:then-a-good-call",
                    "error": _err(out, md.reference.attention(q, k, v, attn.pattern,
                                                              (4 * world,)))})
    return records


def run(rank, world, port, out):
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)     # a hang fails the test, not CI
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a collective or P2P message that waits past 60 s raises (a hang fails the test quickly)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    records = []
    try:
        for name, c in cases(world):
            c = dict(c, name=name)
            for strategy in ("halo", "ulysses", "allgather", "auto"):
                for balance in c.get("balances", (None,)):
                    try:
                        records.append(_one(c, world, rank, strategy, balance))
                    except Exception:              # recorded, the test reports it
                        records.append({"case": name, "strategy": strategy, "balance": balance,
                                        "crash": traceback.format_exc()})
        # the head-tail layout of every case that can hold it, halo only
        for name, c in cases(world):
            if "balances" in c or c["shape"][0] < 2 * world:
                continue
            c = dict(c, name=name)
            try:
                records.append(_one(c, world, rank, "halo", "head-tail"))
            except Exception:
                records.append({"case": name, "strategy": "halo", "balance": "head-tail",
                                "crash": traceback.format_exc()})
        try:
            records.append(_parallel_branches(world))
        except Exception:
            records.append({"case": "parallel-branches", "crash": traceback.format_exc()})
        try:
            records += _agreement(world, rank)
        except Exception:
            records.append({"case": "agree:crash", "crash": traceback.format_exc()})
    finally:
        if rank == 0:
            with open(out, "w") as f:
                json.dump(records, f)
        # every rank's last messages delivered before any rank tears its group down: a rank that
        # exits while a peer still sends to it aborts ("terminate called without an active
        # exception", seen about once in eight spawns at world 4 before this barrier)
        dist.barrier()
        dist.destroy_process_group()
