"""Many heads and long chains (issue 21, finding 8 and the union of finding 10).

``heads([...])`` with hundreds of distinct heads: the answer equals the reference, and the work
per head is O(1) (binding counted, never timed: ARCHITECTURE.md, "Testing"). A union or
intersection of thousands of patterns is one flat chain (repr, parse, reference, every backend,
``maskdsl show``); nesting beyond ``MAX_NESTING`` levels is a MaskDSLError naming the limit.
"""
import functools
import operator
import pickle

import pytest
import sympy as sp
import torch

import maskdsl as md
from maskdsl._caching import clear_all
from maskdsl.dsl.node import Node
from maskdsl.dsl.pattern import MAX_NESTING, And, Heads, Window
from oracle import assert_matches_reference, inputs


def _distinct_heads(H: int):
    """H different per-head patterns of every kind of node (windows, causal, sinks, blocks,
    & | ~, a per_head value), cycling through their parameters."""
    out = []
    for h in range(H):
        i = h // 6
        out.append([
            md.window(i % 9, right=i % 4),
            md.causal() & md.window(i % 13),
            md.sink(1 + i % 5) | md.window(i % 3),
            md.block(1 + i % 8, shift=(i % 8) // 2),
            ~md.window(i % 7) & md.causal(),
            md.window(md.per_head([1 + x % 5 for x in range(H)]), right=i % 3),
        ][h % 6])
    return md.heads(out)


@pytest.mark.parametrize("backend", ["tiles", "dense"])
def test_300_distinct_heads_match_the_reference(backend):
    H, shape = 300, (24,)
    p = _distinct_heads(H)
    q, k, v = inputs(1, H, 24, 4, grad=True, seed=3)
    assert_matches_reference(md.compile(p, shape, H, backend=backend), q, k, v)


def _bind_calls(monkeypatch):
    """Count ``_bind_head`` (resolving one head of one node) on every node class involved."""
    calls = [0]
    for cls in (Node, Window, Heads):
        orig = cls.__dict__["_bind_head"]

        def spy(self, *a, _orig=orig, **kw):
            calls[0] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(cls, "_bind_head", spy)
    return calls


def _run_tiles(H):
    q, k, v = inputs(1, H, 64, 4)
    md.compile(md.heads([md.window(i) for i in range(H)]), (64,), H, backend="tiles")(q, k, v)


def _run_dense(H):
    q, k, v = inputs(1, H, 64, 4)
    md.compile(md.heads([md.window(i) for i in range(H)]), (64,), H, backend="dense")(q, k, v)


def _run_show(H):
    from maskdsl.cli.main import main

    spec = "heads([" + ", ".join(f"window({i})" for i in range(H)) + "])"
    assert main(["show", spec, "--shape", "64", "--heads", str(H), "--head", "1"]) == 0


@pytest.mark.parametrize("run", [_run_tiles, _run_dense, _run_show])
def test_binding_many_heads_is_linear_in_heads(monkeypatch, capsys, run):
    """A node of ``heads([...])`` was bound for every head each time one head was lowered
    (O(H) per head, O(H^2) bindings per compile, O(H^3) time): each head now binds once."""
    counts = {}
    for H in (40, 120):
        clear_all()                         # cold: recipes of earlier tests must not answer
        calls = _bind_calls(monkeypatch)
        run(H)
        counts[H] = calls[0]
        monkeypatch.undo()
    assert counts[120] <= 12 * 120, counts            # a few bindings per head
    assert counts[120] <= 4 * counts[40], counts      # linear: 3x the heads, ~3x the work


def test_bind_is_one_dict_for_heads_alike_and_per_head_otherwise():
    b = md.window(3).bind((16,), 65536)
    assert len(b) == 65536 and b[0] is b[65535] == {"left": (3,), "right": (3,)}
    assert list(b[:2]) == [b[0], b[0]] and sum(1 for _ in b) == 65536
    with pytest.raises(IndexError):
        b[65536]
    w = md.window(md.per_head([1, 2, 3]))
    assert [x["left"] for x in w.bind((16,), 3)] == [(1,), (2,), (3,)]
    assert w.bind_head((16,), 3, 2) == w.bind((16,), 3)[2]
    with pytest.raises(md.MaskDSLError, match=r"window: left=per_head\(\[1, 2, 3\]\) has 3 "
                                              r"values but heads=4; give one value per head"):
        w.bind_head((16,), 4, 0)
    with pytest.raises(md.MaskDSLError, match=r"heads: got 2 patterns but heads=3"):
        md.heads([md.window(1), md.sink(1)]).bind((16,), 3)


def _mix(n):
    return [md.window(i % 97) if i % 2 else md.sink(i % 31) for i in range(n)]


@pytest.mark.parametrize("op", [operator.or_, operator.and_])
def test_a_chain_of_3000_patterns_works(op):
    """``functools.reduce(operator.or_, patterns)`` of 3,000 patterns was refused with
    RecursionError (repr, ==, parse, the reference, compile): a chain of one operator is one
    flat node."""
    parts = _mix(3000)
    p = functools.reduce(op, parts)
    assert isinstance(p, md.Pattern) and p.children() == tuple(parts)
    text = repr(p)
    assert text == f" {'|' if op is operator.or_ else '&'} ".join(map(repr, parts))
    assert md.parse(text) == p and hash(md.parse(text)) == hash(p)
    assert pickle.loads(pickle.dumps(p)) == p
    expected = functools.reduce(op, [md.reference.mask(x, (64,), 1) for x in parts])
    assert torch.equal(md.reference.mask(p, (64,), 1), expected)
    q, k, v = inputs(1, 1, 64, 4, seed=1)
    assert_matches_reference(md.compile(p, (64,), 1, backend="dense"), q, k, v, grads=False)


def test_a_union_of_600_patterns_runs_on_tiles_and_shows(capsys):
    """600 was already past the recursion limit (content keys, the simplifier, lowering)."""
    from maskdsl.cli.main import main

    p = functools.reduce(operator.or_, _mix(600))
    q, k, v = inputs(1, 2, 64, 4, seed=2)
    assert_matches_reference(md.compile(p, (64,), 2, backend="tiles"), q, k, v, grads=False)
    assert main(["show", repr(p), "--shape", "64"]) == 0
    assert "keys seen by query 32: 64 keys" in capsys.readouterr().out


def test_chains_keep_the_binary_structure():
    a, b, c = md.window(1), md.sink(2), md.causal()
    assert (a & b) & c == And(a, b, c) and (a & b & c).a == a & b and (a & b & c).b == c
    assert a & (b & c) != (a & b) & c                   # a right operand stays one part
    assert repr(a & (b & c)) == "window(1) & (sink(2) & causal())"
    assert And(a & b, c).children() == (a, b, c)
    with pytest.raises(md.MaskDSLError, match=r"& expects a pattern on both sides, got 3"):
        And(a, b, 3)


def _alternating(depth):
    p = md.window(1)
    for i in range(depth):
        p = (p & md.window(1 + i % 7)) if i % 2 else (p | md.sink(i % 5))
    return p


def test_nesting_up_to_the_limit_works_everywhere():
    p = _alternating(MAX_NESTING)
    assert md.parse(repr(p)) == p
    q, k, v = inputs(1, 1, 16, 4, seed=4)
    for backend in ("tiles", "dense"):
        assert_matches_reference(md.compile(p, (16,), 1, backend=backend), q, k, v, grads=False)


@pytest.mark.parametrize("build", [
    lambda: functools.reduce(lambda acc, x: x | acc, _mix(3000)),    # a | (b | (c | ...))
    lambda: _alternating(3000),
    lambda: functools.reduce(lambda acc, _: ~acc, range(3000), md.window(1)),
    lambda: functools.reduce(lambda acc, _: md.heads([acc, md.sink(1)]), range(3000), md.window(1)),
])
def test_nesting_beyond_the_limit_is_refused_by_name(build):
    with pytest.raises(md.MaskDSLError, match=rf"the pattern nests {MAX_NESTING + 1} levels deep "
                                              rf".*expected at most {MAX_NESTING} levels"):
        build()


def test_generated_source_of_thousands_of_terms_compiles():
    """A mask_mod of thousands of heads (or of a union's parts) is one long ``|``: Python's
    compiler refused a flat chain of a few thousand operands (RecursionError)."""
    from maskdsl.codegen.printer_torch import emit_function, exec_source

    n = 5000
    src = emit_function("m", ["q_idx"], [], sp.Or(*[sp.Symbol(f"s{i}") for i in range(n)],
                                                   evaluate=False))
    env = {f"s{i}": torch.tensor([i == 4321, False]) for i in range(n)}
    assert exec_source(src, env)(None).tolist() == [True, False]


def test_printer_folds_a_min_or_max_of_numbers_only():
    """Found by the random chains checked against the binary form: a Min/Max of numbers only,
    left unevaluated under ``sp.evaluate(False)`` (met after a few hundred recipes in one
    process), printed the first of no symbolic arguments: IndexError instead of the number."""
    from maskdsl.codegen.printer_torch import TorchPrinter

    assert TorchPrinter()._print(sp.Min(2, 3, evaluate=False)) == "2"
    assert TorchPrinter()._print(sp.Max(2, sp.Rational(7, 2), evaluate=False)) == "3.5"
