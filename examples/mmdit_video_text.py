"""An MM-DiT-style video block: a 3-D neighborhood over video tokens plus text tokens.

Shows: ``md.compile(..., extra_tokens=E)``: q, k, v hold the video grid's tokens first, then
E text tokens; every video query attends its 3-D neighborhood plus every text token, every
text token attends everything (the joint attention of SD3/HunyuanVideo with a local video
pattern). Distance decay applies between video tokens only. The same block through
``maskdsl.natten.na3d(..., additional_keys=..., additional_values=...)`` (text as keys only,
NATTEN's additional KV), and ``md.merge`` rebuilding the video rows from the two parts'
log-sum-exps. Outputs and gradients are checked against ``md.reference.attention``.

Run:  python examples/mmdit_video_text.py
"""
import math
import sys

import torch

import maskdsl as md
from maskdsl import natten

TOL = 1e-4  # fp32


def main():
    torch.manual_seed(0)
    shape, text, heads, head_dim = (6, 12, 12), 20, 4, 32
    n = math.prod(shape)
    pattern = md.neighborhood((3, 5, 5))
    score = md.distance_decay(0.05)
    attn = md.compile(pattern, shape, heads, score=score, extra_tokens=text)
    print(f"video {shape} = {n} tokens + {text} text tokens; backend {attn.backend}")

    q, k, v = (torch.randn(2, heads, n + text, head_dim, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    ref = md.reference.attention(q, k, v, pattern, shape, score=score, extra_tokens=text)
    err = (out - ref).abs().max().item()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], g)
    ref_grads = torch.autograd.grad(ref, [q, k, v], g)
    gerr = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads))
    print(f"joint attention: max |out - reference| {err:.2e}, gradients {gerr:.2e}")

    # NATTEN's layout and call: heads-last video tensors, text as additional keys/values
    def heads_last(t):
        return t[:, :, :n].transpose(1, 2).reshape(2, *shape, heads, head_dim)

    with torch.no_grad():
        na = natten.na3d(heads_last(q), heads_last(k), heads_last(v), kernel_size=(3, 5, 5),
                         additional_keys=k[:, :, n:].transpose(1, 2),
                         additional_values=v[:, :, n:].transpose(1, 2), score=score)
        na_err = (na.reshape(2, n, heads, head_dim).transpose(1, 2) - out[:, :, :n]).abs().max().item()
        print(f"natten.na3d with additional_keys/values vs the video rows: {na_err:.2e}")

        # the same video rows from two parts merged by their log-sum-exps
        grid = md.compile(pattern, shape, heads, score=score)
        part_video = grid(q[:, :, :n], k[:, :, :n], v[:, :, :n], return_lse=True)
        logits = (q[:, :, :n] @ k[:, :, n:].transpose(-1, -2)) / math.sqrt(head_dim)
        part_txt = (torch.softmax(logits, -1) @ v[:, :, n:], torch.logsumexp(logits, -1))
        merged, _ = md.merge([part_video, part_txt])
        m_err = (merged - out[:, :, :n]).abs().max().item()
        print(f"md.merge(video part, text part) vs the video rows: {m_err:.2e}")

    ok = max(err, gerr, na_err, m_err) < TOL
    print("OK: mmdit_video_text matches the reference" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
