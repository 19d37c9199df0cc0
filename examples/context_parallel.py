"""A 3-D video neighborhood split over 2 processes with a halo exchange (CPU, gloo).

    torchrun --nproc-per-node 2 examples/context_parallel.py

(Run as ``python examples/context_parallel.py`` it launches that torchrun itself, on
127.0.0.1.) Each rank holds a slab of frames; ``cp(q, k, v)`` receives only the key/value rows
its queries attend from the other rank, and the backward sends their gradients back. Rank 0
checks the result against the single-process attention.
"""
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

import maskdsl as md


def main():
    dist.init_process_group("gloo")                    # torchrun sets rank, world, address
    rank = dist.get_rank()
    shape = (8, 12, 12)                                # frames x height x width: 1152 tokens
    pattern = md.neighborhood((3, 5, 5), causal=(True, False, False))
    attn = md.compile(pattern, shape=shape, heads=4)
    cp = md.context_parallel(attn, head_dim=16, dtype=torch.float32)
    if rank == 0:
        print(f"strategy: {cp.reason}")

    # every rank draws the same whole tensors here so it can check itself; a real model
    # holds only its slab: cp.shard(x) for [B, H, N, D], or [B, T, X, Y, C] activations
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, attn.n, 16, generator=g, requires_grad=True)
               for _ in range(3))
    out_local = cp(cp.shard(q), cp.shard(k), cp.shard(v))          # [1, 4, 576, 16]
    out_local.square().sum().backward()
    print(f"rank {rank}: output {list(out_local.shape)}, sent {cp.traffic['sent']:,} bytes, "
          f"received {cp.traffic['received']:,}", flush=True)

    out = cp.unshard(out_local.detach())               # the whole output, on every rank
    grads = [t.grad for t in (q, k, v)]
    for gr in grads:                                   # md.shard's gradient is this rank's
        dist.all_reduce(gr)                            # part: sum it, as DDP does
    dist.barrier()
    if rank == 0:
        plan = cp.plan()
        for name, b in plan.items():
            print(f"plan {name:9s}: received per rank {b['received']}")
        qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        ref = md.reference.attention(qs, ks, vs, pattern, shape)
        ref.square().sum().backward()
        err = max((out - ref).abs().max().item(),
                  *[(a - b.grad).abs().max().item() for a, b in zip(grads, (qs, ks, vs))])
        print(f"max |context parallel - single process| (output and gradients): {err:.1e}")
        assert err < 1e-4, err
        print("OK: context_parallel matches the single-process run")
    dist.destroy_process_group()


def _launch():
    """Re-run this file under torchrun with 2 processes on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), os.path.abspath(__file__)]
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    if "LOCAL_RANK" in os.environ:
        main()
    else:
        _launch()
