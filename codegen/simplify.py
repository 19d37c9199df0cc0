"""The pattern simplifier: identities and annihilators, applied before lowering.

``md.compile`` lowers ``simplify(p)``, so ``window(0, 0) & ~full()`` runs on every backend (the
Triton kernel included, which has no ``~``) as the empty pattern. The rules, bottom-up:

    a & full() -> a          a | empty() -> a        (identities)
    a & empty() -> empty()   a | full() -> full()    (annihilators)
    ~full() -> empty()       ~empty() -> full()      ~~a -> a
    a & a -> a               a | a -> a              (idempotence)
    a & ~a -> empty()        a | ~a -> full()        (complements)
    heads([p, p, ..., p]) -> p

Equality is the DSL's structural equality (tensors by identity). The reference never
simplifies: it reads the user's pattern as written, so the tests compare the two.
"""
from __future__ import annotations

import functools

from maskdsl.dsl.pattern import And, Empty, Full, Heads, Not, Or, Pattern

__all__ = ["simplify"]


@functools.singledispatch
def simplify(p: Pattern) -> Pattern:
    """``p`` with the rules above applied bottom-up (leaves are returned unchanged)."""
    return p


@simplify.register(Not)
def _not(p: Not) -> Pattern:
    a = simplify(p.a)
    if isinstance(a, Full):
        return Empty()
    if isinstance(a, Empty):
        return Full()
    if isinstance(a, Not):
        return a.a
    return p if a is p.a else Not(a)


def _complements(a, b) -> bool:
    return (isinstance(a, Not) and a.a == b) or (isinstance(b, Not) and b.a == a)


def _lattice(p, make, absorbing, neutral) -> Pattern:
    """``&`` (absorbing empty, neutral full) and ``|`` (absorbing full, neutral empty) are duals:
    an absorbing operand or a complementary pair absorbs, a neutral operand or a repeat drops.
    A chain ``a & b & c`` is ``(a & b) & c``: the rules apply pair by pair from the left, in one
    pass over its parts (a chain of thousands of patterns is not walked recursively)."""
    a = simplify(p.parts[0])
    for x in p.parts[1:]:
        b = simplify(x)
        if isinstance(a, absorbing) or isinstance(b, absorbing) or _complements(a, b):
            return absorbing()
        if isinstance(a, neutral) or a == b:
            a = b
        elif not isinstance(b, neutral):
            a = make(a, b)
    if type(a) is type(p) and len(a.parts) == len(p.parts) and all(
            x is y for x, y in zip(a.parts, p.parts)):
        return p
    return a


@simplify.register(And)
def _and(p: And) -> Pattern:
    return _lattice(p, And, Empty, Full)


@simplify.register(Or)
def _or(p: Or) -> Pattern:
    return _lattice(p, Or, Full, Empty)


@simplify.register(Heads)
def _heads(p: Heads) -> Pattern:
    kids = tuple(simplify(x) for x in p.patterns)
    if all(k == kids[0] for k in kids[1:]):
        return kids[0]
    return p if all(k is x for k, x in zip(kids, p.patterns)) else Heads(kids)
