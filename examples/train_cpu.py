"""Training on CPU through the ``tiles`` backend: a tiny local-attention model learns to blur.

Shows: autograd through compiled attention on CPU, with two learnable score terms:
a relative-position bias table (``md.relative_bias``, NAT/Swin RPB, one [2K-1, 2K-1] table per
head) and a per-head distance-decay rate tensor (``md.distance_decay`` with a ``requires_grad``
tensor). The synthetic task, predicting the 3x3 box blur of random features on a 2-D grid, is
exactly what a 5x5 neighborhood with the right relative bias can express. Prints the loss
every 10 steps, checks it fell to well below half its starting value, then checks the trained
model's attention output and the gradients of both learnable terms against the dense reference.

Run:  python examples/train_cpu.py
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

import maskdsl as md

TOL = 1e-4       # fp32 outputs
GRAD_TOL = 1e-3  # fp32 gradients (the table's sums over many pairs)
STEPS = 60


class LocalAttentionModel(nn.Module):
    def __init__(self, grid, channels=8, heads=4, head_dim=16, kernel=5):
        super().__init__()
        self.grid, self.heads, self.head_dim = tuple(grid), heads, head_dim
        self.qk = nn.Linear(channels, 2 * heads * head_dim)
        self.v = nn.Linear(channels, heads * head_dim)
        self.out = nn.Linear(heads * head_dim, channels)
        # Offsets k - q of a K-neighborhood span -(K-1)..K-1 (the window shifts at borders).
        self.table = nn.Parameter(torch.zeros(heads, 2 * kernel - 1, 2 * kernel - 1))
        self.rate = nn.Parameter(torch.zeros(heads))
        self.pattern = md.neighborhood(kernel_size=(kernel, kernel))
        self.score = md.relative_bias(self.table) + md.distance_decay(self.rate, metric="euclidean")
        self.attn = md.compile(self.pattern, shape=self.grid, heads=heads, score=self.score,
                               backend="tiles")

    def qkv(self, x):
        B, N, _ = x.shape
        q, k = self.qk(x).reshape(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        v = self.v(x).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x):
        B, N, _ = x.shape
        a = self.attn(*self.qkv(x))                           # [B, H, N, D]
        return self.out(a.transpose(1, 2).reshape(B, N, -1))


def make_batch(batch, grid, channels, generator):
    x = torch.randn(batch, channels, *grid, generator=generator)
    y = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)   # 3x3 blur
    flat = lambda t: t.flatten(2).transpose(1, 2)                          # [B, N, C]
    return flat(x), flat(y)


def main():
    torch.manual_seed(0)
    grid, channels, batch = (8, 8), 8, 16
    gen = torch.Generator().manual_seed(0)
    model = LocalAttentionModel(grid, channels)
    print(f"pattern: {model.pattern!r} on {grid[0]}x{grid[1]}, score: {model.score!r}")
    print(f"backend: {model.attn.backend} ({model.attn.reason})")
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)

    t0 = time.perf_counter()
    losses = []
    for step in range(STEPS + 1):
        x, y = make_batch(batch, grid, channels, gen)
        loss = F.mse_loss(model(x), y)
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
        if step == STEPS:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    first, last = losses[0], sum(losses[-5:]) / 5
    print(f"{STEPS} steps in {elapsed:.1f} s; loss {first:.4f} -> {last:.4f} "
          f"({last / first:.2f}x of the initial loss)")
    print(f"learned decay rates per head: {[round(r, 3) for r in model.rate.tolist()]}")
    centre = model.table.detach()[:, 3:6, 3:6].mean().item()
    ring = (model.table.detach()[:, 2:7, 2:7].sum() - model.table.detach()[:, 3:6, 3:6].sum())
    print(f"learned relative bias: mean {centre:+.3f} on the 3x3 offsets, "
          f"{ring.item() / (16 * model.heads):+.3f} on the ring around them")
    ok = last < 0.5 * first

    # The trained model's attention and the gradients of its learnable terms vs the reference.
    x, _ = make_batch(2, grid, channels, gen)
    q, k, v = (t.detach().requires_grad_() for t in model.qkv(x))
    out = model.attn(q, k, v)
    ref = md.reference.attention(q, k, v, model.pattern, grid, score=model.score)
    g = torch.randn_like(out)
    params = (q, k, v, model.table, model.rate)
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    err = (out - ref).abs().max().item()
    gerr = max((a - b).abs().max().item() for a, b in zip(got, want))
    print(f"max |{model.attn.backend} - reference| = {err:.2e}, gradients (q, k, v, table, rate) "
          f"{gerr:.2e}")
    if not ok:
        print(f"FAIL: final loss {last:.4f} is not below half the initial loss {first:.4f}")
        raise SystemExit(1)
    if not (err <= TOL and gerr <= GRAD_TOL):
        print(f"FAIL: error above tolerance ({TOL:.0e} outputs, {GRAD_TOL:.0e} gradients)")
        raise SystemExit(1)
    print("OK: train_cpu learned the task and matches the reference")


if __name__ == "__main__":
    main()
