"""LLM decoding with a KV cache: sliding window + attention sinks, grouped-query attention.

Shows: ``attn.lookback`` (what the cache keeps, read off the pattern: the 4 sinks and the
last W tokens), a chunked prefill and token-by-token decoding through the same call
(``cache.step``), 8 query heads reading 2 key/value heads (GQA, no repeated copies), and the
log-sum-exp of each step. Every output row is checked against the full (non-incremental)
``md.reference.attention`` over the whole sequence.

Run:  python examples/llm_decode.py
"""
import sys

import torch

import maskdsl as md

TOL = 1e-4  # fp32


def main():
    torch.manual_seed(0)
    n, heads, kv_heads, head_dim, window, sinks = 1024, 8, 2, 32, 128, 4
    pattern = md.causal() & (md.window(window, right=0) | md.sink(sinks))
    attn = md.compile(pattern, (n,), heads, score=md.softcap(30.0))
    print(f"pattern: {pattern!r}")
    print(f"lookback: {attn.lookback}")

    q = torch.randn(1, heads, n, head_dim)
    k = torch.randn(1, kv_heads, n, head_dim)
    v = torch.randn(1, kv_heads, n, head_dim)
    cache = attn.kv_cache(batch=1, kv_heads=kv_heads, head_dim=head_dim)
    outs, lses, held = [], [], 0
    with torch.no_grad():
        prompt = 700                                       # prefill in chunks of 256
        for t in range(0, prompt, 256):
            c = min(256, prompt - t)
            o, lse = cache.step(q[:, :, t:t + c], k[:, :, t:t + c], v[:, :, t:t + c],
                                return_lse=True)
            outs.append(o)
            lses.append(lse)
        for t in range(prompt, n):                         # then one token at a time
            o, lse = cache.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                return_lse=True)
            outs.append(o)
            lses.append(lse)
            held = max(held, cache.held)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    print(f"decoded {n - prompt} tokens after a {prompt}-token prefill; the cache held at most "
          f"{held} tokens ({cache.capacity} slots) of {n}")

    ref, ref_lse = md.reference.attention(q.double(), k.double(), v.double(), pattern, (n,),
                                          score=md.softcap(30.0), return_lse=True)
    err, err_lse = (out.double() - ref).abs().max().item(), (lse.double() - ref_lse).abs().max().item()
    print(f"max |cache - reference|: output {err:.2e}, lse {err_lse:.2e}")
    ok = err < TOL and err_lse < TOL and held == sinks + window
    print("OK: llm_decode matches the reference" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
