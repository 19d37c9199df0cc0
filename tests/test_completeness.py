"""Adding a primitive is mechanical and checked (ARCHITECTURE.md, "Adding a primitive"): every
DSL node has its rule in every stage that needs one, and every constructor is public."""
from dataclasses import dataclass

import numpy as np
import pytest
import sympy as sp

import maskdsl as md
from maskdsl import reference
from maskdsl.codegen import blockmask, ir
from maskdsl.codegen.layout_search import row_major
from maskdsl.codegen.tileclasses import EMPTY, FULL, PARTIAL
from maskdsl.dsl import node, pattern, score


def _subclasses(cls):
    out, todo = set(), [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return out


def _concrete(cls):
    """The node types a user can build (abstract bases and private chains excluded)."""
    return {c for c in _subclasses(cls) if not c.__name__.startswith("_")}


def test_every_pattern_node_has_a_reference_rule_and_a_lowering_rule():
    for cls in _concrete(pattern.Pattern):
        assert cls in reference._mask.registry or any(
            b in reference._mask.registry for b in cls.__mro__[1:-1]
            if b is not pattern.Pattern), f"{cls.__name__}: no reference rule"
        assert any(b in ir.lower_node.registry for b in cls.__mro__ if b is not object), (
            f"{cls.__name__}: no lowering rule (codegen/ir.py, lower_node.register)")


def test_every_flat_ir_kind_has_a_classifier_and_a_predicate():
    for cls in _subclasses(ir.Flat):
        if not cls.__module__.startswith("maskdsl."):
            continue                     # a test's own kinds (below)
        assert cls in blockmask.classify_flat.registry, (
            f"{cls.__name__}: no tile classifier (codegen/blockmask.py, classify_flat.register)")
        assert any(b in ir._predicate.registry for b in cls.__mro__ if b is not object), (
            f"{cls.__name__}: no predicate rule (codegen/ir.py)")


def test_every_score_term_has_a_role_and_its_rules():
    """Every term states its role (ARCHITECTURE.md, "Adding a score term"); an additive term
    has a reference bias rule and a lowering rule (the other roles are applied by the runtime
    and the printer by role, never by type)."""
    for cls in _concrete(score.Score):
        if cls is score.ScoreSum:
            assert cls.role == "sum"
            continue
        assert cls.role in score.ROLES, f"{cls.__name__}: role {cls.role!r}"
        if cls.role == "additive":
            assert cls in reference._BIAS_RULES, f"{cls.__name__}: no reference bias rule"
            assert cls in ir.lower_term.registry, f"{cls.__name__}: no lowering rule (lower_term)"


def test_every_dsl_constructor_is_public():
    for name, fn in node.DSL_NAMES.items():
        assert getattr(md, name) is fn and name in md.__all__, name


@dataclass(frozen=True)
class _ToyFlat(ir.Flat):
    """A flat kind with no classifier of its own (as a new primitive has at first)."""


def _toy(n):
    return _ToyFlat(sp.Eq(sp.Mod(sp.floor(ir.QF / 3) + sp.floor(ir.KF / 3), 2), 0), label="toy")


def test_a_flat_kind_without_a_classifier_is_refined_within_a_budget():
    """The default classifier leaves every real tile pair to evaluation: the classes are exact
    (checked against the predicate token by token) up to UNCLASSIFIED_MAX_PAIRS, and beyond
    a MaskDSLError names the kind instead of a silent O(N^2) classification."""
    n = 300
    layout = row_major((n,), 128)
    cls = blockmask.classify(_toy(n), ir.Tables(), layout)
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    dense = ((q // 3 + k // 3) % 2 == 0)
    tok = layout.tokens()
    assert len(cls.cls) == 9                 # 3 x 3 tiles, each with allowed pairs
    for r, c, kind in zip(cls.rows(), cls.indices, cls.cls):
        qs, ks = tok[r][tok[r] >= 0], tok[c][tok[c] >= 0]
        block = dense[np.ix_(qs, ks)]
        want = EMPTY if not block.any() else FULL if block.all() and len(qs) == 128 == len(ks) \
            else PARTIAL
        assert kind == want
    big = row_major((8192,), 128)
    with pytest.raises(md.MaskDSLError, match=r"_ToyFlat: this flat kind has no tile "
                                               r"classifier.*UNCLASSIFIED_MAX_PAIRS = 2\*\*24"):
        blockmask.classify(_toy(8192), ir.Tables(), big)
