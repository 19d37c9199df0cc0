"""A 2-D neighborhood-attention ViT block (NAT/DiNAT style) built on maskdsl.

Shows: one ``md.compile`` call turning a 7x7 neighborhood with per-head dilation
(heads 0-1 local, heads 2-3 dilated by 2, as in DiNAT) into the attention of an ordinary
``torch.nn.Module`` (LayerNorm -> qkv Linear -> attention -> proj, then an MLP), a forward
pass on a 16x16 patch grid, the backend ``auto`` chose and why, the compiled statistics, and a
check of the attention output against the dense reference ``md.reference.attention``.

Run:  python examples/vit_neighborhood.py
"""
import time

import torch
from torch import nn

import maskdsl as md

TOL = 1e-4  # fp32


class NeighborhoodViTBlock(nn.Module):
    """Pre-norm transformer block whose attention is a compiled maskdsl pattern."""

    def __init__(self, dim, heads, grid, pattern, mlp_ratio=4.0, backend="auto"):
        super().__init__()
        self.heads, self.grid, self.pattern = heads, tuple(grid), pattern
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.attn = md.compile(pattern, shape=self.grid, heads=heads, backend=backend)

    def qkv_heads(self, x):
        """x [B, N, C] -> q, k, v [B, H, N, D]."""
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)
        a = self.attn(q, k, v)                               # [B, H, N, D]
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


def main():
    torch.manual_seed(0)
    grid, heads, head_dim, batch = (16, 16), 4, 32, 2
    dim = heads * head_dim
    pattern = md.neighborhood(kernel_size=(7, 7), dilation=md.per_head([1, 1, 2, 2]))
    print(f"pattern: {pattern!r}")
    print(f"grid: {grid[0]}x{grid[1]} patches, {heads} heads, head dim {head_dim}")

    block = NeighborhoodViTBlock(dim, heads, grid, pattern).eval()
    x = torch.randn(batch, grid[0] * grid[1], dim)
    t0 = time.perf_counter()
    with torch.no_grad():
        y = block(x)
    print(f"forward: {tuple(x.shape)} -> {tuple(y.shape)} in {1e3 * (time.perf_counter() - t0):.1f} ms")
    print(f"backend: {block.attn.backend}")
    print(f"reason: {block.attn.reason}")
    stats = block.attn.stats()
    print(f"stats: token density {stats['token_density']:.3f}, block density "
          f"{stats['block_density']:.3f}, ideal speedup {stats['ideal_speedup']:.2f}x, "
          f"layout {stats['layout']}")

    # The same pattern on a larger grid, where token tiling and block sparsity pay off.
    big = md.compile(pattern, shape=(64, 64), heads=heads)
    s = big.stats()
    print(f"same pattern on 64x64: backend {big.backend}, token density {s['token_density']:.4f}, "
          f"block density {s['block_density']:.3f} (row-major {s['block_density_row_major']:.3f}), "
          f"ideal speedup {s['ideal_speedup']:.1f}x")

    # Check the block's attention against the dense oracle, for auto's backend and for tiles.
    with torch.no_grad():
        q, k, v = block.qkv_heads(x)
        ref = md.reference.attention(q, k, v, pattern, grid)
        worst = 0.0
        for backend in (block.attn.backend, "tiles"):
            attn = block.attn if backend == block.attn.backend else md.compile(
                pattern, shape=grid, heads=heads, backend=backend)
            err = (attn(q, k, v) - ref).abs().max().item()
            worst = max(worst, err)
            print(f"max |{backend} - reference| = {err:.2e}")
    if not worst <= TOL:
        print(f"FAIL: error {worst:.2e} above tolerance {TOL:.0e}")
        raise SystemExit(1)
    print("OK: vit_neighborhood matches the reference")


if __name__ == "__main__":
    main()
