"""The dropout keep mask a backend's next call will draw, in the reference's [B, H, N, N] layout,
without advancing the compiled callable's generator (``maskdsl check`` compares a dropout run
against the reference given the backend's own keep mask; ARCHITECTURE.md, "Command line").

Each backend draws differently: dense with the reference's own ``dropout_mask``; tiles one
uniform per gathered (query, key slot) of its plan, query tiles in chunks; Triton in-kernel from
one seed per call (its ``keep_mask`` tool). Flex has no dropout.
"""
from __future__ import annotations

import torch

from maskdsl.dsl.score import score_extras

__all__ = ["next_keep_mask"]


def next_keep_mask(attn, backend: str, batch: int) -> torch.Tensor:
    """bool [B, H, N, N]: the keep mask ``backend``'s next call of ``attn`` draws (CPU)."""
    from maskdsl import reference

    H, n = attn.heads, attn.n
    gen = torch.Generator()
    gen.set_state(attn.dropout_state())         # a copy: the callable's stream stays where it is
    _, drop_p = score_extras(attn.score, H, "cpu", True)
    if backend == "dense":
        return reference.dropout_mask(attn.score, batch, H, n, generator=gen)
    if backend == "triton":
        from maskdsl.kernels.triton_attn import keep_mask

        plan, _ = attn.backend_state("triton")
        seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
        return keep_mask(plan, batch, drop_p, seed, "cpu")
    if backend != "tiles":
        raise ValueError(f"{backend} draws no dropout")
    from maskdsl.kernels.tiles import plan_for

    prog = attn.tiles_program
    plan = plan_for(prog, torch.device("cpu"))
    T, V, K = plan.T, plan.V, plan.K
    chunk = plan.chunk(batch, H, 0)      # the query tiles each step of the call draws for
    ps = drop_p.double().reshape(1, H, 1, 1, 1)
    keep_g = torch.cat([torch.rand((batch, H, min(T, t0 + chunk) - t0, V, K), generator=gen,
                                   dtype=torch.float64) >= ps for t0 in range(0, T, chunk)], 2)
    tok = torch.from_numpy(prog.layout.tokens())
    qtok = tok[plan.q_pos.expand(T, V, 1)].expand(T, V, K)
    out = torch.zeros(batch, H, n, n, dtype=torch.bool)
    for h in range(H):
        ok = plan.allowed[h if plan.allowed.shape[0] > 1 else 0]
        ktok = tok[plan.k_pos[h if plan.Hc > 1 else 0]].expand(T, V, K)
        out[:, h, qtok[ok], ktok[ok]] = keep_g[:, h, ok]
    return out
