"""Context parallelism: bytes moved per rank, halo vs all-gather vs Ulysses vs ring.

    python benchmarks/context_parallel.py              # plans at world 2-8, runs at 2-4
    python benchmarks/context_parallel.py --no-run     # plans only

Cases (the issue's): 3-D 16x64x64 ``neighborhood((3, 7, 7))`` and 1-D 131,072 tokens
``causal() & window(4096)``; 8 heads (and 8 kv heads), head dim 64, bf16, batch 1, one forward.

* The plan table is ``cp.plan()``'s arithmetic (``maskdsl.parallel.plan.bytes_of``) on the exact halo
  of each world size; ring attention is counted analytically (each rank forwards world - 1
  K/V slabs around the ring: its own, then the ones it received), as torch's ring and
  all-gather context parallelism move them.
* The run check spawns 2, 3 and 4 gloo processes on this CPU (127.0.0.1), calls ``cp(q, k, v)``
  once per strategy with 4 heads, head dim 8, float32 (smaller, to fit 2 cores) and compares
  the bytes each rank moved (``cp.traffic``) with ``cp.plan()`` for those sizes, and the
  output with the single-process tiles call on rank 0's slab. Wall times are one cold call
  (plans and, for Ulysses, the compiled attention built inside it) on shared CPU cores (all
  ranks on 2 cores): they show the check ran, not a speed.

Results: benchmarks/results/<device>-<date>-context-parallel.{json,txt}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = {
    "3-D 16x64x64 neighborhood((3, 7, 7))": ("neighborhood((3, 7, 7))", (16, 64, 64)),
    "1-D 131072 causal() & window(4096)": ("causal() & window(4096)", (131072,)),
}
SIZES = dict(heads=8, kv_heads=8, batch=1, head_dim=64, head_dim_v=64, dtype=torch.bfloat16)


def _attn(spec, shape, heads):
    import maskdsl as md

    return md.compile(md.parse(spec), shape=shape, heads=heads, backend="tiles")


def ring_bytes(lay, sizes):
    """Ring attention: rank r sends, over world - 1 steps, the K/V slabs of ranks r, r-1, ...,
    r-W+2 and receives those of r-1, ..., r-W+1."""
    W = lay.world
    isz = torch.empty(0, dtype=sizes["dtype"]).element_size()
    row = sizes["batch"] * sizes["kv_heads"] * (sizes["head_dim"] + sizes["head_dim_v"]) * isz
    n = [lay.count(r) for r in range(W)]
    sent = [sum(n[(r - i) % W] for i in range(W - 1)) * row for r in range(W)]
    recv = [sum(n[(r - 1 - i) % W] for i in range(W - 1)) * row for r in range(W)]
    return {"sent": sent, "received": recv}


def plans(worlds):
    from maskdsl.parallel import plan as P
    from maskdsl.runtime.rect import row_major

    rows = []
    for name, (spec, shape) in CASES.items():
        prog = row_major(_attn(spec, shape, SIZES["heads"]))
        for W in worlds:
            lay = P.layout(shape, W)
            t0 = time.perf_counter()
            hp = P.halo_plan(prog, lay)
            t_plan = time.perf_counter() - t0
            kw = {k: v for k, v in SIZES.items()}
            row = {"case": name, "world": W, "halo_plan_s": round(t_plan, 3)}
            row["halo"] = P.bytes_of("halo", lay, halo=hp, **kw)
            row["allgather"] = P.bytes_of("allgather", lay, **kw)
            if SIZES["heads"] % W == 0 and SIZES["kv_heads"] % W == 0:
                row["ulysses"] = P.bytes_of("ulysses", lay, **kw)
            row["ring"] = ring_bytes(lay, SIZES)
            rows.append(row)
    return rows


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, path):
    import torch.distributed as dist

    import maskdsl as md

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    recs = []
    for name, (spec, shape) in CASES.items():
        H, D = 4, 8
        attn = _attn(spec, shape, H)
        g = torch.Generator().manual_seed(0)
        N = attn.n
        q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
        for strategy in ("halo", "allgather", "ulysses"):
            try:
                cp = md.context_parallel(attn, strategy=strategy, head_dim=D,
                                         dtype=torch.float32)
            except md.MaskDSLError as e:
                recs.append({"case": name, "strategy": strategy, "refused": str(e)})
                continue
            ql, kl, vl = cp.shard(q), cp.shard(k), cp.shard(v)
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = cp(ql, kl, vl)
            dt = time.perf_counter() - t0
            traffic = [None] * world
            dist.all_gather_object(traffic, cp.traffic)
            err = None
            if rank == 0 and strategy == "halo":
                # rank 0's slab against the single-process call (sub-range of the same pattern)
                a, b = cp.layout.parts[0][0]
                one = md.compile(attn.pattern, shape=shape, heads=H, backend="tiles",
                                 q_range=(a, b))
                with torch.no_grad():
                    err = float((one(q[:, :, a:b], k, v) - out).abs().max())
            plan = cp.plan()[strategy]
            if rank == 0:
                print(f"  W={world} {name} {strategy}: forward {dt:.1f} s", flush=True)
            recs.append({"case": name, "strategy": strategy, "forward_s": round(dt, 3),
                         "traffic": traffic, "plan": plan, "max_err_rank0": err,
                         "bytes_equal_plan": [t["sent"] for t in traffic] == plan["sent"]
                         and [t["received"] for t in traffic] == plan["received"]})
    if rank == 0:
        with open(path, "w") as f:
            json.dump(recs, f)
    dist.destroy_process_group()


def runs(worlds):
    import tempfile

    import torch.multiprocessing as mp

    out = {}
    for W in worlds:
        path = os.path.join(tempfile.mkdtemp(), "r.json")
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(W, _port(), path), nprocs=W)
        with open(path) as f:
            out[W] = json.load(f)
        print(f"  ran world {W} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _mb(x):
    return f"{x / 2**20:8.1f}"


def table(plan_rows, run_recs):
    lines = []
    lines.append("Bytes received per rank in one forward (max over ranks, MiB), 8 heads, head dim "
                 "64, bf16, batch 1; halo / all-gather = the ratio of the two")
    lines.append(f"{'case':40s} {'W':>2s} {'halo':>8s} {'allgath':>8s} {'ulysses':>8s} "
                 f"{'ring':>8s} {'halo/ag':>8s}  halo per rank (MiB)")
    for r in plan_rows:
        h, a = max(r["halo"]["received"]), max(r["allgather"]["received"])
        u = _mb(max(r["ulysses"]["received"])) if "ulysses" in r else f"{'-':>8s}"
        per = " ".join(f"{x / 2**20:.0f}" for x in r["halo"]["received"])
        lines.append(f"{r['case']:40s} {r['world']:2d} {_mb(h)} {_mb(a)} {u} "
                     f"{_mb(max(r['ring']['received']))} {h / a:8.3f}  [{per}]")
    if run_recs:
        lines.append("")
        lines.append("Run check (gloo, this CPU): 4 heads, head dim 8, float32; bytes each rank "
                     "moved vs cp.plan(), rank 0's output vs the single-process call")
        for W, recs in run_recs.items():
            for rec in recs:
                if "refused" in rec:
                    lines.append(f"  W={W} {rec['case']:40s} {rec['strategy']:9s} refused: "
                                 f"{rec['refused']}")
                    continue
                got = sum(t["received"] for t in rec["traffic"])
                lines.append(f"  W={W} {rec['case']:40s} {rec['strategy']:9s} received "
                             f"{_mb(got)} MiB in all, equal to the plan: "
                             f"{rec['bytes_equal_plan']}, "
                             + (f"max |err| rank 0 {rec['max_err_rank0']:.1e}, "
                                if rec["max_err_rank0"] is not None else "")
                             + f"forward {rec['forward_s']:.1f} s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-run", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    plan_rows = plans(range(2, 9))
    run_recs = {} if args.no_run else runs((2, 3, 4))
    text = table(plan_rows, run_recs)
    sys.path.insert(0, HERE)
    from run import device_name

    cpu = device_name()
    head = (f"device: {cpu}, torch {torch.__version__}, "
            f"python {platform.python_version()}\ncommand: python benchmarks/"
            f"context_parallel.py {' '.join(sys.argv[1:])}\n"
            f"date: {datetime.date.today()}\n")
    print(head + text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"cpu-{datetime.date.today()}-context-parallel")
    with open(stem + ".txt", "w") as f:
        f.write(head + text + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"device": cpu, "torch": torch.__version__, "command": sys.argv,
                   "plans": plan_rows, "runs": run_recs}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
