"""LLM-style causal sliding-window attention with attention sinks (StreamingLLM), on CPU.

Shows: the StreamingLLM pattern ``causal() & (window(W, right=0) | sink(4))`` on a 1-D
sequence, why the parentheses matter (``(causal() & window) | sink(4)`` lets the first queries
see *future* sink tokens), ALiBi plus a Gemma-style logit softcap as the score, and a
learnable per-head sink logit (``md.sink_logit``, the "off-by-one softmax" / gpt-oss sink) that
receives gradients. Every output and gradient is checked against ``md.reference.attention``.

Run:  python examples/llm_sliding_window_sinks.py
"""
import torch

import maskdsl as md

TOL = 1e-4  # fp32


def max_err(a, b):
    return (a - b).abs().max().item()


def main():
    torch.manual_seed(0)
    n, heads, head_dim, batch, window, sinks = 512, 4, 32, 2, 64, 4
    shape = (n,)

    pattern = md.causal() & (md.window(window, right=0) | md.sink(sinks))
    wrong = (md.causal() & md.window(window, right=0)) | md.sink(sinks)
    print(f"pattern: {pattern!r}")
    m = md.reference.mask(pattern, shape, heads)[0]
    w = md.reference.mask(wrong, shape, heads)[0]
    future = torch.triu(w, diagonal=1)
    print(f"keys per query: min {int(m.sum(1).min())}, max {int(m.sum(1).max())} "
          f"(window {window} + current token + {sinks} sinks)")
    print(f"precedence pitfall: {wrong!r} allows {int(future.sum())} future (query, key) pairs, "
          f"e.g. query 0 sees keys {future[0].nonzero().flatten().tolist()}; the pattern above "
          f"allows {int(torch.triu(m, diagonal=1).sum())}")

    worst = 0.0
    # 1) ALiBi + softcap.
    score = md.alibi() + md.softcap(30.0)
    attn = md.compile(pattern, shape=shape, heads=heads, score=score)
    s = attn.stats()
    print(f"[alibi + softcap] backend: {attn.backend}; token density {s['token_density']:.3f}, "
          f"block density {s['block_density']:.3f}, ideal speedup {s['ideal_speedup']:.2f}x")
    q, k, v = (torch.randn(batch, heads, n, head_dim) for _ in range(3))
    err = max_err(attn(q, k, v), md.reference.attention(q, k, v, pattern, shape, score=score))
    worst = max(worst, err)
    print(f"[alibi + softcap] max |{attn.backend} - reference| = {err:.2e}")

    # 2) A learnable per-head sink logit: one extra logit in each softmax denominator.
    sink_logit = torch.nn.Parameter(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    score = md.sink_logit(sink_logit)
    attn = md.compile(pattern, shape=shape, heads=heads, score=score)
    print(f"[sink_logit] score: {score!r}; backend: {attn.backend}")
    q, k, v = (torch.randn(batch, heads, n, head_dim, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    ref = md.reference.attention(q, k, v, pattern, shape, score=score)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sink_logit), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, sink_logit), g)
    err = max_err(out, ref)
    gerr = max(max_err(a, b) for a, b in zip(grads, ref_grads))
    worst = max(worst, err, gerr)
    # With a sink logit s_h each query's output is the sink-free output times Z / (Z + exp(s_h)):
    # the probability mass the real keys keep (a larger sink logit absorbs more of it).
    plain = md.compile(pattern, shape=shape, heads=heads, backend="tiles")(q, k, v).detach()
    kept = (out.detach().norm(dim=-1) / plain.norm(dim=-1)).mean(dim=(0, 2))
    print(f"[sink_logit] mass kept by real keys per head "
          f"{[round(x, 3) for x in kept.tolist()]} for sink logits {sink_logit.tolist()}")
    print(f"[sink_logit] d loss / d sink_logit = {[round(x, 4) for x in grads[3].tolist()]}")
    print(f"[sink_logit] max |{attn.backend} - reference| = {err:.2e}, gradients {gerr:.2e}")

    if not worst <= TOL:
        print(f"FAIL: error {worst:.2e} above tolerance {TOL:.0e}")
        raise SystemExit(1)
    print("OK: llm_sliding_window_sinks matches the reference")


if __name__ == "__main__":
    main()
