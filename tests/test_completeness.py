"""Adding a primitive is mechanical and checked (ARCHITECTURE.md, "Adding a primitive"): every
DSL node has its rule in every stage that needs one, and every constructor is public."""
import maskdsl as md
from maskdsl import reference
from maskdsl.codegen import blockmask, ir
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
