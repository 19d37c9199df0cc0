"""Log-sum-exp and merging (ARCHITECTURE.md, "Semantics"): the reference's ``return_lse`` and
``md.merge`` over disjoint key sets, the oracle the backends' lse will be held to."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import maskdsl as md
from maskdsl import reference


def _qkv(B, H, n, d=8, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g, dtype=torch.float64).requires_grad_(grad)
            for _ in range(3)]


PATTERNS = [
    (md.neighborhood((3, 5)) | md.sink(2), (6, 9), md.alibi()),
    (md.causal() & md.window(7), (40,), md.distance_decay(0.2) + md.softcap(4.0)),
    (md.neighborhood((3, 3, 3)) & md.causal(dims=(0,)), (3, 4, 5), None),
    (md.block(4) & ~md.window(0), (24,), None),         # some rows with no key at all
]


def test_lse_is_the_log_of_the_softmax_denominator():
    p, shape, s = md.causal() & md.window(3), (12,), md.alibi()
    q, k, v = _qkv(1, 2, 12)
    out, lse = reference.attention(q, k, v, p, shape, score=s, return_lse=True)
    logits = (q @ k.transpose(-1, -2)) / 8 ** 0.5 + reference.bias(s, shape, 2, dtype=torch.float64)
    logits = logits.masked_fill(~reference.mask(p, shape, 2), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    assert lse.dtype == torch.float64 and lse.shape == (1, 2, 12)
    _, lse32 = reference.attention(q.float(), k.float(), v.float(), p, shape, score=s, return_lse=True)
    assert lse32.dtype == torch.float32


def test_lse_counts_the_sink_logit_and_is_minus_inf_without_keys():
    q, k, v = _qkv(1, 1, 16)
    _, plain = reference.attention(q, k, v, md.window(2), (16,), return_lse=True)
    _, sunk = reference.attention(q, k, v, md.window(2), (16,), score=md.sink_logit(0.5), return_lse=True)
    torch.testing.assert_close(sunk, torch.logaddexp(plain, torch.tensor(0.5, dtype=torch.float64)))
    out, none = reference.attention(q, k, v, md.empty(), (16,), return_lse=True)
    assert torch.isneginf(none).all() and (out == 0).all()


def test_lse_of_sampled_rows_equals_the_full_rows():
    p, shape, s = PATTERNS[0]
    q, k, v = _qkv(2, 2, 54)
    out, lse = reference.attention(q, k, v, p, shape, score=s, return_lse=True)
    rows = torch.tensor([53, 0, 17, 18])
    o2, l2 = reference.attention(q, k, v, p, shape, score=s, rows=rows, return_lse=True)
    torch.testing.assert_close(o2, out[:, :, rows])
    torch.testing.assert_close(l2, lse[:, :, rows])


@settings(max_examples=20)
@given(case=st.sampled_from(range(len(PATTERNS))), parts=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_merging_disjoint_key_parts_equals_the_whole(case, parts, seed):
    """Split the keys into random disjoint parts (each part a pattern & mask_fn of its keys),
    attend each part, merge: the whole attention's rows, output and lse, with gradients."""
    p, shape, s = PATTERNS[case]
    n = torch.Size(shape).numel()
    part_of = torch.randint(0, parts, (n,), generator=torch.Generator().manual_seed(seed))
    q, k, v = _qkv(1, 2, n, seed=seed, grad=True)
    whole, whole_lse = reference.attention(q, k, v, p, shape, score=s, return_lse=True)
    pieces = []
    for j in range(parts):
        only = md.mask_fn(lambda b, h, qi, ki, j=j: part_of[ki] == j, name=f"part{j}")
        pieces.append(reference.attention(q, k, v, p & only, shape, score=s, return_lse=True))
    out, lse = md.merge(pieces)
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)
    g1 = torch.autograd.grad((out.square().sum() + lse[torch.isfinite(lse)].sum()), (q, k, v))
    g2 = torch.autograd.grad((whole.square().sum() + whole_lse[torch.isfinite(whole_lse)].sum()), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()


def test_merge_keeps_empty_rows_zero_and_poisoned_rows_nan():
    q, k, v = _qkv(1, 1, 8)
    k[0, 0, 3] = float("nan")
    a = reference.attention(q, k, v, md.window(1), (8,), return_lse=True)
    b = reference.attention(q, k, v, md.empty(), (8,), return_lse=True)
    out, lse = md.merge([a, b])
    poisoned = torch.isnan(a[0]).any(-1)
    assert torch.equal(torch.isnan(out).any(-1), poisoned) and torch.equal(torch.isnan(lse), poisoned)
    torch.testing.assert_close(out[~poisoned], a[0][~poisoned])
    out, lse = md.merge([b, b])
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("parts,message", [
    ([], "at least one"),
    ("ab", "expected a list"),
    ([(torch.zeros(1, 1, 4, 2),)], r"parts\[0\]: expected a pair"),
    ([(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 3))], r"parts\[0\]: out \[1, 1, 4, 2\] and lse \[1, 1, 3\]"),
    ([(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4)), (torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 4))],
     r"parts\[1\]: out \[1, 2, 4, 2\] differs"),
])
def test_merge_bad_input(parts, message):
    with pytest.raises(md.MaskDSLError, match=message):
        md.merge(parts)
