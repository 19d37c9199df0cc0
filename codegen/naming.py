"""Names for generated functions, one rule per node type: ``neighborhood_7x7_d1x2__and__causal_0``.

A node without a rule is named by its DSL name (``document``, ``radial``, ...); a new primitive
may register a more informative rule here (``pattern_name.register``)."""
from __future__ import annotations

import functools

from maskdsl.dsl.pattern import (And, Block, Causal, Heads, MaskFn, Neighborhood, Not, Or, Sink,
    Window)

__all__ = ["pattern_name"]


def _dims(v) -> str:
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v) if isinstance(v, int) else "ph"     # per_head values: "ph"


@functools.singledispatch
def pattern_name(p) -> str:
    """An informative identifier for a pattern (feed it to ``printer_torch.identifier``)."""
    return p._name


@pattern_name.register(Neighborhood)
def _(p):
    s = f"neighborhood_{_dims(p.kernel_size)}"
    if p.stride != 1:
        s += f"_s{_dims(p.stride)}"
    if p.dilation != 1:
        s += f"_d{_dims(p.dilation)}"
    if p.causal not in (False, ()):
        s += "_causal" if p.causal is True else "_causal" + "".join("1" if c else "0" for c in p.causal)
    return s


@pattern_name.register(Window)
def _(p):
    return f"window_{_dims(p.left)}" + ("" if p.right == p.left else f"_{_dims(p.right)}")


@pattern_name.register(Causal)
def _(p):
    return "causal" + ("" if p.dims is None else "_" + "_".join(map(str, p.dims)))


@pattern_name.register(Block)
def _(p):
    shift = getattr(p, "shift", 0)
    return f"block_{_dims(p.size)}" + ("" if shift == 0 else f"_shift{_dims(shift)}")


@pattern_name.register(Sink)
def _(p):
    return f"sink_{_dims(p.n)}"


@pattern_name.register(MaskFn)
def _(p):
    return f"fn_{p.name}"      # the user's name (printer_torch.identifier makes it an identifier)


@pattern_name.register(And)
def _(p):
    return "__and__".join(pattern_name(x) for x in p.parts)


@pattern_name.register(Or)
def _(p):
    return "__or__".join(pattern_name(x) for x in p.parts)


@pattern_name.register(Not)
def _(p):
    return f"not_{pattern_name(p.a)}"


@pattern_name.register(Heads)
def _(p):
    return "heads_" + "_".join(pattern_name(x) for x in p.patterns)
