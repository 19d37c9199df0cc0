"""Print IR expressions as torch source and exec them into named functions.

One ``_print_<Node>`` method per sympy node (sympy's own printers are the model); nodes with no
method raise :class:`UnsupportedNode`. The generated functions only use integer tensor ops
(``//``, ``%``, ``torch.minimum``, comparisons, ``& | ~``) for masks, plus ``torch.sqrt``,
``torch.tanh``, ``torch.abs`` for scores, and calls of captured user functions (``mask_fn``:
``CallMask`` prints ``fn(b, h, q_flat, kv_flat)`` on flat indices). Per-head parameters and data tables are captured
tensors passed in as globals of the exec'd function — never Python floats in closures.
"""
from __future__ import annotations

import keyword
import re
from typing import Dict, Iterable, List, Tuple

import sympy as sp
from sympy.printing.str import StrPrinter
import torch

from .ir import CallMask, CallScore


__all__ = ["TorchPrinter", "UnsupportedNode", "emit_function", "exec_source", "identifier",
           "FloorDiv", "PosMod"]


class FloorDiv(sp.Function):
    """``a // b`` kept atomic: common-subexpression elimination must not split ``floor(a / b)``
    into a reciprocal and a product (that would print a float division); layout decodes are
    built from it directly (no sympy evaluation of floor: fast, and never rewritten)."""
    is_integer = True


class PosMod(sp.Function):
    """``a % b`` of non-negative integers, kept atomic (layout decodes): sympy's ``Mod``
    evaluates its arguments with assumptions (slow) and once rewrote a hand-built tree wrongly."""
    is_integer = True


def _atomic_floors(e):
    if not isinstance(e, sp.Basic):
        return e
    return e.replace(lambda x: isinstance(x, sp.floor),
                     lambda x: FloorDiv(*x.args[0].as_numer_denom()))


class UnsupportedNode(TypeError):
    """The printer met a sympy node it has no rule for (an internal error, not user input)."""


class TorchPrinter(StrPrinter):
    """sympy -> torch expression source. ``float_like``: an expression whose dtype distances
    (``abs``, ``sqrt`` of integer coordinates) and table values take (``score.dtype`` in
    score_mods): int tensor x Python float, and float32 tables, would otherwise compute a
    float64 score in float32."""

    float_like = None
    # sympy objects' own ``_sympystr`` (Indexed has one) must not bypass the rules below
    printmethod = "_maskdsl_torch"

    def _float(self, e) -> str:
        text = self._print(e)
        return f"({text}).to({self.float_like})" if self.float_like else text

    def emptyPrinter(self, expr):  # noqa: N802 (sympy's name)
        raise UnsupportedNode(f"no torch printing rule for {type(expr).__name__}: {expr}")

    def _print(self, expr, **kwargs):
        # sympy dispatches on the first class of the node's MRO with a ``_print_<Class>``;
        # StrPrinter's generic rules (Function, Basic, NumberSymbol, ...) would print ``sin(a)``
        # or ``pi``, names the exec'd code does not have: only this class's rules may answer.
        if isinstance(expr, sp.Basic):
            for cls in type(expr).__mro__:
                name = "_print_" + cls.__name__
                if hasattr(self, name):
                    if name not in _RULES:
                        raise UnsupportedNode(
                            f"no torch printing rule for {type(expr).__name__}: {expr}")
                    break
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, e):
        return e.name

    def _print_Integer(self, e):
        return str(int(e))

    def _print_Zero(self, e):
        return "0"

    def _print_One(self, e):
        return "1"

    def _print_NegativeOne(self, e):
        return "-1"

    def _print_Float(self, e):
        return repr(float(e))

    def _print_Rational(self, e):
        return repr(float(e))

    def _print_Half(self, e):
        return "0.5"

    def _print_Indexed(self, e):
        text = f"{e.base}[{', '.join(self._print(i) for i in e.indices)}]"
        return f"{text}.to({self.float_like})" if self.float_like else text

    def _wrap(self, e) -> str:
        text = self._print(e)
        atom = e.is_Symbol or e.is_Integer or isinstance(e, sp.Indexed)
        return text if atom or (text.startswith("(") and text.endswith(")") and _balanced(text[1:-1])) else f"({text})"

    def _print_floor(self, e):
        num, den = e.args[0].as_numer_denom()
        if den == 1:
            return self._print(num)
        return f"({self._wrap(num)} // {self._wrap(den)})"

    def _print_FloorDiv(self, e):
        num, den = e.args
        if den == 1:
            return self._print(num)
        return f"({self._wrap(num)} // {self._wrap(den)})"

    def _print_Mod(self, e):
        a, b = e.args
        return f"({self._wrap(a)} % {self._wrap(b)})"

    _print_PosMod = _print_Mod

    def _fold(self, fn: str, clamp: str, args) -> str:
        nums = [a for a in args if a.is_number]
        rest = [self._print(a) for a in args if not a.is_number]
        if not rest:   # only numbers (a Min/Max left unevaluated under sp.evaluate(False))
            return self._print(min(nums) if fn == "minimum" else max(nums))
        out = rest[0]
        for r in rest[1:]:
            out = f"torch.{fn}({out}, {r})"
        for n in nums:
            out = f"torch.clamp({out}, {clamp}={self._print(n)})"
        return out

    def _print_Min(self, e):
        return self._fold("minimum", "max", e.args)

    def _print_Max(self, e):
        return self._fold("maximum", "min", e.args)

    def _print_Abs(self, e):
        text = f"torch.abs({self._print(e.args[0])})"
        return f"{text}.to({self.float_like})" if self.float_like else text

    def _print_Pow(self, e):
        base, exp = e.args
        if exp == sp.Rational(1, 2):
            return f"torch.sqrt({self._float(base)})"
        if exp == -1:
            return f"(1.0 / ({self._print(base)}))"
        if exp.is_Integer and exp > 0:
            return f"(({self._print(base)}) ** {int(exp)})"
        raise UnsupportedNode(f"no torch printing rule for the power {e}")

    def _print_Mul(self, e):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"(-{self._print(rest)})"
        factors = [self._print(a) for a in e.as_ordered_factors()]
        return "(" + " * ".join(factors) + ")"

    def _print_Add(self, e):
        # positive terms first, numbers last: q0 + 1, q0 - k0 - 3
        terms = sorted(e.args, key=lambda t: (t.is_number, t.could_extract_minus_sign()))
        out = self._print(terms[0])
        for t in terms[1:]:
            c, rest = t.as_coeff_Mul()
            if c.is_number and c < 0:
                out += f" - {self._print(-t)}"
            else:
                out += f" + {self._print(t)}"
        return f"({out})"

    def _print_tanh(self, e):
        return f"torch.tanh({self._print(e.args[0])})"

    def _rel(self, e, op):
        return f"({self._print(e.lhs)} {op} {self._print(e.rhs)})"

    def _print_LessThan(self, e):
        return self._rel(e, "<=")

    def _print_StrictLessThan(self, e):
        return self._rel(e, "<")

    def _print_GreaterThan(self, e):
        return self._rel(e, ">=")

    def _print_StrictGreaterThan(self, e):
        return self._rel(e, ">")

    def _print_Equality(self, e):
        return self._rel(e, "==")

    def _print_Unequality(self, e):
        return self._rel(e, "!=")

    def _print_And(self, e):
        return _chain(" & ", [self._print(a) for a in e.args])

    def _print_Or(self, e):
        return _chain(" | ", [self._print(a) for a in e.args])

    def _print_Not(self, e):
        return f"(~{self._print(e.args[0])})"

    def _print_BooleanTrue(self, e):
        return "TRUE"

    def _print_BooleanFalse(self, e):
        return "FALSE"

    def _print_CallMask(self, e):
        # a user's mask_fn on flat indices: b is 0 (masks never vary per batch) and a head
        # known at compile time becomes a tensor like the indices (fn is broadcast-safe)
        name, h, q, k = e.args
        qs, ks = self._print(q), self._print(k)
        zero = f"({qs} * 0)"
        hs = f"({zero} + {self._print(h)})" if h.is_number else self._print(h)
        return f"{name}({zero}, {hs}, {qs}, {ks})"

    def _print_CallScore(self, e):
        # a user's score_fn on flat indices, b zero (scores never vary per batch); its result
        # in the dtype the score is computed in (``score``, the mod's argument), as the
        # reference casts it: a float64 capture or a half result is never a dtype error
        name, score, h, q, k = e.args
        qs, ks = self._print(q), self._print(k)
        return (f"{name}({self._print(score)}, ({qs} * 0), {self._print(h)}, {qs}, {ks})"
                f".to(score.dtype)")

    def _print_IsPow2(self, e):
        x = self._wrap(e.args[0])
        return f"(({x} & ({x} - 1)) == 0)"


_RULES = frozenset(n for n in vars(TorchPrinter) if n.startswith("_print_"))


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += (c == "(") - (c == ")")
        if depth < 0:
            return False
    return depth == 0


CHAIN = 32   # operands of one & or | per parenthesised group in generated source


def _chain(op: str, texts: List[str]) -> str:
    """``(a op b op ...)``; a long chain (a union of thousands of patterns, a mask of thousands
    of heads) in nested groups of ``CHAIN``: Python's compiler recurses once per operand of a
    flat chain and refuses a few thousand. ``&`` and ``|`` are associative: the same value."""
    while len(texts) > CHAIN:
        texts = ["(" + op.join(texts[i:i + CHAIN]) + ")" for i in range(0, len(texts), CHAIN)]
    return "(" + op.join(texts) + ")"


def identifier(text: str, limit: int = 96) -> str:
    """A Python identifier made from ``text`` (for generated function names)."""
    s = re.sub(r"[^0-9a-zA-Z_]+", "_", text).strip("_") or "fn"
    if s[0].isdigit() or keyword.iskeyword(s):
        s = "f_" + s
    return s[:limit].rstrip("_")


def emit_function(name: str, params: List[str], prologue: List[Tuple[str, sp.Basic]],
                  result: sp.Basic, doc: str = "", true_like: str = "",
                  captured: Iterable[str] = (), float_like: str = None) -> str:
    """Source of ``def name(params): ...`` computing ``result``.

    ``prologue`` binds names to expressions first (e.g. grid coordinates decoded from
    ``q_idx``); common subexpressions of the result are hoisted into ``xN`` temporaries.
    ``true_like`` names a tensor whose shape a constant True/False result takes.
    ``captured`` names tensors the function closes over: the source is then a factory
    ``make_<name>(tables...)`` returning the function, so that one code object serves every
    set of tables (torch.compile guards on the code object; closure tensors are its inputs).
    """
    captured = [c for c in captured if c in _names(result, prologue)]
    result = _atomic_floors(result)
    prologue = [(n, _atomic_floors(e)) for n, e in prologue]
    p = TorchPrinter()
    lines = [f"def {name}({', '.join(params)}):"]
    if doc:
        lines.append(f'    """{doc}"""')
    used = result.free_symbols
    for sym, expr in reversed(prologue):  # keep only what the result (transitively) needs
        if sp.Symbol(sym) in used or any(s.name == sym for s in used):
            used |= expr.free_symbols if isinstance(expr, sp.Basic) else set()
    body: List[str] = []
    for sym, expr in prologue:
        if any(s.name == sym for s in used):
            if isinstance(expr, sp.Basic) and expr.is_number:   # keep it a tensor
                body.append(f"    {sym} = {true_like} * 0 + {p._print(expr)}")
            else:
                body.append(f"    {sym} = {p._print(expr) if isinstance(expr, sp.Basic) else expr}")
    hoist = _Hoister(result)
    hoist.float_like = float_like
    text = hoist.doprint(result)
    body += [f"    {line}" for line in hoist.lines]
    if "TRUE" in text or "FALSE" in text:
        body.append(f"    TRUE = {true_like} >= 0")
        body.append(f"    FALSE = {true_like} < 0")
    lines += body
    lines.append(f"    return {text}")
    if captured:
        lines = [f"def make_{name}({', '.join(captured)}):"] + ["    " + x for x in lines]
        lines.append(f"    return {name}")
    return "\n".join(lines) + "\n"


class _Hoister(TorchPrinter):
    """Common-subexpression elimination in one linear pass: a compound subexpression that
    occurs twice or more is printed once into a temporary ``xN`` (children before parents)."""

    def __init__(self, expr):
        super().__init__()
        self.counts: Dict[sp.Basic, int] = {}
        self._count(expr)
        self.names: Dict[sp.Basic, str] = {}
        self.lines: List[str] = []

    def _count(self, e):
        if not isinstance(e, sp.Basic) or not e.args or isinstance(e, sp.Indexed):
            return
        seen = self.counts.get(e, 0)
        self.counts[e] = seen + 1
        if seen == 0:
            for a in e.args:
                self._count(a)

    def _print(self, expr, **kwargs):
        name = self.names.get(expr) if isinstance(expr, sp.Basic) else None
        if name is not None:
            return name
        text = super()._print(expr, **kwargs)
        if isinstance(expr, sp.Basic) and self.counts.get(expr, 0) > 1 and not expr.is_Boolean:
            name = f"x{len(self.names)}"
            self.names[expr] = name
            self.lines.append(f"{name} = {text}")
            return name
        return text


def _names(result, prologue) -> set:
    """The captured names an expression reads: table bases and called user functions."""
    out = set()
    for e in [result] + [x for _, x in prologue]:
        if isinstance(e, sp.Basic):
            out |= {str(b.label) for b in e.atoms(sp.Indexed) for b in [b.base]}
            out |= {str(c.args[0]) for c in e.atoms(CallMask, CallScore)}
    return out


def exec_source(src: str, env: dict = None):
    """Exec generated source once and return its first function (a mod, or a ``make_*``
    factory taking the captured tables). The one place generated code is exec'd; ``torch`` and
    ``env`` are its globals, and the code object is named after the function for tracebacks."""
    name = src.split("(", 1)[0].split()[-1]
    g = {"torch": torch, **(env or {})}
    exec(compile(src, f"<maskdsl:{name}>", "exec"), g)
    return g[name]
