"""Triton tools that are not the attention kernels: the dropout keep mask the kernels draw
(tests compare with it), the in-kernel key range probe (tests compare it with the IR's), and
``compile_ahead`` (the real compiler for an NVIDIA target, without a GPU). It imports the
kernels' module only, never ``triton_attn`` (which imports this one)."""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from . import triton_kernels
from .triton_params import pack
from .triton_kernels import (ScoreParams, _dim_params, _keep, _key_range, block_tokens,
                             kernel_constexprs, launch_options, pow2)

__all__ = ["keep_mask", "key_ranges", "compile_ahead"]


@triton.jit
def _keep_kernel(OUT, DROPP, seed, H, N, BLOCK: tl.constexpr):
    """The dropout keep mask [B, H, N, N] the kernels draw (tests compare with it)."""
    bh = tl.program_id(1)
    qf = tl.program_id(0) + tl.zeros([1], dtype=tl.int32)
    pd = tl.load(DROPP + bh % H)
    for start in range(0, N, BLOCK):
        kf = start + tl.arange(0, BLOCK)
        keep = _keep(seed, bh, N, qf[:, None], kf[None, :], pd)
        ptr = OUT + (bh.to(tl.int64) * N + qf[:, None]) * N + kf[None, :]
        tl.store(ptr, keep.to(tl.int8), mask=kf[None, :] < N)


@triton.jit
def _key_range_probe(OUT, P, X, n, S, h, dim: tl.constexpr, BLOCK: tl.constexpr):
    """For coordinates X[0..n) on one dim: the in-kernel in-group key range [jlo, jhi]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0)
    lo, hi = _key_range(x, S, _dim_params(P, h, dim))
    tl.store(OUT + offs * 2, lo, mask=ok)
    tl.store(OUT + offs * 2 + 1, hi, mask=ok)


def key_ranges(plan, head: int, dim: int, xs: torch.Tensor) -> torch.Tensor:
    """int32 [len(xs), 2]: the kernel's in-group key range of each coordinate (dim of the
    3-D padded grid) for ``head`` (tests: the kernel's ranges equal the IR's)."""
    P, _ = pack(plan.params, xs.device)
    out = torch.empty(len(xs), 2, dtype=torch.int32, device=xs.device)
    S = plan.shape3[dim]
    _key_range_probe[(triton.cdiv(len(xs), 64),)](out, P, xs.to(torch.int32).contiguous(),
                                                   len(xs), S, head, dim, BLOCK=64)
    return out


def keep_mask(plan, batch: int, dropout_p, seed: int, device) -> torch.Tensor:
    """The bool keep mask [B, H, N, N] the kernels use for ``seed`` (small N: tests)."""
    H, N = plan.heads, plan.n
    out = torch.empty(batch, H, N, N, dtype=torch.int8, device=device)
    dp = dropout_p.to(device=device, dtype=torch.float32).reshape(-1).expand(H).contiguous()
    _keep_kernel[(N, batch * H)](out, dp, int(seed), H, N, BLOCK=16)
    return out.bool()


def compile_ahead(dtype: str = "fp16", head_dim: int = 128, arch: int = 90,
                  kernels=("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv", "_attn_bwd_dkdv_sink",
                           "_attn_bwd_relb")) -> dict:
    """Compile the kernels for an NVIDIA target without a GPU (every feature on, 2-D tiles of
    ``block_tokens`` lanes, the launches' ``launch_options``); returns {kernel: shared memory
    bytes}. Needs Triton's real compiler: run with TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fp = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    bd = max(16, pow2(head_dim))
    lanes = block_tokens(fp, head_dim, False)
    t1 = 8 if lanes == 64 else 4
    flat = dict(TM0=1, TM1=t1, TM2=8, TN0=1, TN1=t1, TN2=8, BD=bd, IEEE=dtype == "fp32",
                HAS_DECAY=True, METRIC=0, DEC0=0, DEC1=1, DEC2=1, HAS_ALIBI=True, HAS_RELB=True,
                HAS_CAP=True, HAS_DROP=True)
    consts = dict(kernel_constexprs(flat), BDV=bd, HAS_SINKL=True, HAS_SINK=True,
                  PARAM_GRAD=(True, True, True), NBS=18, CH=256)
    # argument types by name; tuples (strides, grid, score parameters) element by element
    types = {n: "*" + dtype for n in ("Q", "K_", "V_", "O", "DO", "DQ", "DK", "DV_")}
    types.update({n: "*fp32" for n in ("LSE", "DELTA", "SINKL", "PART", "GPAR")})
    types.update({n: ("i32",) * 4 for n in ("sq", "sk", "sv", "so")})
    types.update(P="*i32", NS="*i32", scale="fp32", seed="i64", S=("i32",) * 3, NT=("i32",) * 3,
                 sp=ScoreParams(*("*fp32",) * 5, "i32", ("i32",) * 3))
    out = {}
    for name in kernels:
        fn = getattr(triton_kernels, name)
        const = {n: v for n, v in consts.items() if n in fn.arg_names}
        sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", arch, 32), options=launch_options(fp, head_dim))
        out[name] = k.metadata.shared
    return out
