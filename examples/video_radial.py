"""Radial attention for video on a (frames, height, width) token grid.

Shows: Radial Attention's token-exact mask (``md.radial``: full attention to the same and the
adjacent frame, a spatial band that halves with every doubling of the frame distance, and
beyond ``min_window`` only every other / every 4th ... frame) AND-ed with frame causality
(``md.causal(dims=(0,))``, as in autoregressive video generation) plus a first-frame sink,
with a per-head ``md.distance_decay`` score on the 3-D grid coordinates. Prints the mask
density per frame distance, the compiled statistics, and checks the compiled attention (and
its gradient) against the dense reference.

Run:  python examples/video_radial.py
"""
import torch

import maskdsl as md

TOL = 1e-4  # fp32


def main():
    torch.manual_seed(0)
    shape = (16, 8, 8)            # 16 frames of 8x8 latent patches = 1024 tokens
    heads, head_dim, batch = 4, 32, 1
    frames, per_frame = shape[0], shape[1] * shape[2]

    pattern = md.radial(decay=1.0, min_window=16, sink_frames=1) & md.causal(dims=(0,))
    score = md.distance_decay(md.per_head([0.0, 0.05, 0.1, 0.2]), metric="euclidean")
    attn = md.compile(pattern, shape=shape, heads=heads, score=score)
    print(f"pattern: {pattern!r}")
    print(f"score:   {score!r}")
    print(f"grid: {'x'.join(map(str, shape))} (frames x h x w) = {frames * per_frame} tokens, "
          f"{heads} heads")
    print(f"backend: {attn.backend} ({attn.reason})")

    # Density per frame distance d = query frame - key frame, from the reference mask.
    mask = md.reference.mask(pattern, shape, heads)[0]              # same on every head
    m = mask.reshape(frames, per_frame, frames, per_frame).float().mean(dim=(1, 3))  # [Tq, Tk]
    print("density by frame distance d (keys in frame 0 are sinks, excluded; '-' = no pairs):")
    row = []
    for d in range(frames):
        vals = [m[i, i - d] for i in range(frames) if i - d >= 1]
        row.append(f"d={d}:{torch.stack(vals).mean().item():.2f}" if vals else f"d={d}:-")
    print("  " + "  ".join(row[:8]))
    print("  " + "  ".join(row[8:]))
    print(f"future frames allowed: {int(torch.triu(m, diagonal=1).count_nonzero())} (frame-causal)")

    s = attn.stats()
    print(f"stats: token density {s['token_density']:.3f}, block density {s['block_density']:.3f} "
          f"(row-major {s['block_density_row_major']:.3f}), ideal speedup "
          f"{s['ideal_speedup']:.2f}x, layout {s['layout']}")

    n = frames * per_frame
    q, k, v = (torch.randn(batch, heads, n, head_dim, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    ref = md.reference.attention(q, k, v, pattern, shape, score=score)
    err = (out - ref).abs().max().item()
    g = torch.randn_like(out)
    (gq,) = torch.autograd.grad(out, q, g)
    (rq,) = torch.autograd.grad(ref, q, g)
    gerr = (gq - rq).abs().max().item()
    print(f"max |{attn.backend} - reference| = {err:.2e}   (dq: {gerr:.2e})")
    if not (err <= TOL and gerr <= TOL):
        print(f"FAIL: error above tolerance {TOL:.0e}")
        raise SystemExit(1)
    print("OK: video_radial matches the reference")


if __name__ == "__main__":
    main()
