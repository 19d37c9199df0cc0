"""The one oracle helper the backend tests share: every backend's output (and gradients) against
``maskdsl.reference`` with ARCHITECTURE.md's tolerance rule.

Tolerance rule ("Testing"): the reference in float64 is the truth (learnable score parameters
included: the truth differentiates float64 copies of them); a backend running in dtype X may be
off by at most ``FACTOR`` times the error the *reference itself* makes in dtype X, plus a floor
of ``FLOOR[X] * max(m**2, |truth|)`` where m = max(1, largest |operand|): the rounding of one
product of two operands, or of the result's own largest value. The floor matters where the reference happens to be exact (a row with one key has
dq = 0 exactly in the reference's formula, but a fused backward rounds ``dp - delta`` at the level
of |dO| |v|, and how much depends on the CPU's vector width). float64 backends are held to ~1e-12
and float32 ones to the float32 reference's own rounding.
"""
from __future__ import annotations

import math

import torch

import maskdsl as md

FACTOR = 8.0
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def inputs(B, H, n, D, dtype=torch.float32, seed=0, grad=False, Dv=None, kv_heads=None):
    """q, k, v [B, H, n, D] (v: Dv; k and v: ``kv_heads`` heads, GQA) from a seeded generator,
    randn * 1 (logits of order 1)."""
    g = torch.Generator().manual_seed(seed)
    dims = (D, D, D if Dv is None else Dv)
    heads = (H, H if kv_heads is None else kv_heads, H if kv_heads is None else kv_heads)
    return [torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(dtype)
            .requires_grad_(grad) for h, d in zip(heads, dims)]


def _reference(attn, q, k, v, dtype, scale, keep, lse=False, score=None):
    cast = [x.detach().to(dtype).requires_grad_(x.requires_grad) for x in (q, k, v)]
    e = attn.extent          # extra tokens and sub-ranges: the reference reads them itself
    kw = {} if e.square else dict(extra_tokens=e.extra, extra=e.mode, q_range=e.q, kv_range=e.kv)
    out = md.reference.attention(*cast, attn.pattern, attn.shape,
                                 score=attn.score if score is None else score, scale=scale,
                                 dropout_keep=keep, return_lse=lse, **kw)
    return out, cast


def _score_with(score, new: dict):
    """A copy of ``score`` whose tensors ``t`` with ``id(t)`` in ``new`` are replaced by
    ``new[id(t)]`` (the float64 truth's own leaves for learnable parameters)."""
    def copy(term):
        fields = {name: new[id(v)] for name, v in vars(term).items()
                  if isinstance(v, torch.Tensor) and id(v) in new}
        if not fields:
            return term
        out = object.__new__(type(term))
        out.__dict__.update(term.__dict__)
        for name, v in fields.items():
            object.__setattr__(out, name, v)
        return out
    if isinstance(score, md.dsl.score.ScoreSum):
        out = object.__new__(type(score))
        out.__dict__.update(score.__dict__)
        object.__setattr__(out, "terms", tuple(copy(t) for t in score.terms))
        return out
    return copy(score) if score is not None else None


def tolerance(error_of_reference: float, dtype, magnitude: float = 1.0) -> float:
    return FACTOR * error_of_reference + FLOOR[dtype] * max(1.0, magnitude) ** 2


def magnitude(*tensors) -> float:
    """The largest |entry| over the operands (the m of the floor)."""
    return max([float(t.detach().abs().max()) for t in tensors if t.numel()] + [1.0])


def assert_close_by_rule(got, truth, same_dtype_ref, what: str, m: float = 1.0):
    """``got`` vs the float64 ``truth`` within FACTOR x the same-dtype reference's error.
    NaN must sit exactly where the truth has NaN, and infinities exactly where it has the same
    infinity (non-finite rows, -inf lse of rows without keys; ARCHITECTURE.md)."""
    got, truth, same = got.detach().double(), truth.detach().double(), same_dtype_ref.detach().double()
    bad = ~torch.isfinite(truth)
    assert torch.equal(bad, ~torch.isfinite(got)), (
        f"{what}: non-finite entries differ from the reference's "
        f"({int((~torch.isfinite(got)).sum())} vs {int(bad.sum())})")
    assert torch.equal(torch.isnan(truth), torch.isnan(got)), f"{what}: NaN entries differ"
    assert torch.equal(got[bad & ~torch.isnan(truth)], truth[bad & ~torch.isnan(truth)]), (
        f"{what}: infinities of the wrong sign")
    ok = ~bad
    if not ok.any():
        return
    ref_err = float((same[ok] - truth[ok]).abs().max()) if ok.any() else 0.0
    err = float((got[ok] - truth[ok]).abs().max())
    # the floor also scales with the result itself: a value of magnitude x cannot be held
    # tighter than a few of its own roundings (a parameter's gradient, a sum over every pair,
    # can be far larger than the operands)
    tol = tolerance(ref_err, same_dtype_ref.dtype, max(m, float(truth[ok].abs().max()) ** 0.5))
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} ({FACTOR} x the " \
                       f"{same_dtype_ref.dtype} reference's {ref_err:.3g})"


def _cotangent(x, seed):
    """A seeded random cotangent for ``x`` in float64, zero where ``x`` is not finite."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g.masked_fill(~torch.isfinite(x.detach()).to(g.device), 0)


def assert_matches_reference(attn, q, k, v, grads=True, scale=None, keep=None, out=None,
                             lse=False):
    """``attn(q, k, v)`` (or a given ``out``) and its gradients against the reference.

    grads: compare the gradients of q, k, v and of every learnable score tensor for one random
    cotangent. keep: the dropout keep mask [B, H, N, N] the backend used (reference given the
    same draws). lse: call with ``return_lse=True`` (``out``, when given, is the pair) and hold
    the log-sum-exp to the reference's too, with a random cotangent on it in the gradients.
    k and v may have fewer heads than q (GQA): the reference reads them the same way."""
    dtype = q.dtype
    params = [t for t in _score_tensors(attn.score) if t.requires_grad] if grads else []
    # the truth's learnable parameters are float64 leaves of the same values: a float32
    # parameter's gradient would otherwise be rounded to float32 in the truth too, and the
    # float32 reference's error on it would read 0 (a sum of thousands of terms is not exact)
    params64 = [t.detach().double().requires_grad_(True) for t in params]
    score64 = _score_with(attn.score, {id(a): b for a, b in zip(params, params64)})
    if out is None:
        out = attn(q, k, v, scale=scale, return_lse=lse)
    truth, cast64 = _reference(attn, q, k, v, torch.float64, scale, keep, lse, score=score64)
    same, cast_same = _reference(attn, q, k, v, dtype, scale, keep, lse) \
        if dtype != torch.float64 else (truth, cast64)
    outs, truths, sames = (list(x) if lse else [x] for x in (out, truth, same))
    m = magnitude(q, k, v)
    for name, a, b, c in zip(("output", "lse"), outs, truths, sames):
        assert_close_by_rule(a, b, c, name, m)
    if lse:
        assert outs[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert outs[1].shape == outs[0].shape[:3]
    if not grads or not outs[0].requires_grad:
        return out
    cots = [_cotangent(t, 7 + i) for i, t in enumerate(truths)]
    got = torch.autograd.grad(outs, [q, k, v] + params, [g.to(o.dtype) for g, o in zip(cots, outs)],
                              allow_unused=True)
    exp = torch.autograd.grad(truths, cast64 + params64, cots, allow_unused=True)
    exp_same = (torch.autograd.grad(sames, cast_same + params,
                                    [g.to(o.dtype) for g, o in zip(cots, sames)],
                                    allow_unused=True)
                if sames[0] is not truths[0] else exp)
    names = ["dq", "dk", "dv"] + [f"d(score param {i})" for i in range(len(params))]
    for name, a, b, c in zip(names, got, exp, exp_same):
        if b is None:
            continue
        assert a is not None, f"{name}: no gradient reached it"
        assert_close_by_rule(a, b, c, name, max(m, magnitude(*cots)))
    return out


def _score_tensors(score):
    out = []
    for term in md.dsl.score.score_terms(score):
        for v in vars(term).values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def n_tokens(shape) -> int:
    return math.prod(shape)


def triton_available() -> bool:
    """Whether the Triton backend can run here (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from maskdsl.kernels import backends

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = backends.Spec(md.window(1), None, (8,), 1)
    return backends.get("triton").refusal(spec, dev) is None
