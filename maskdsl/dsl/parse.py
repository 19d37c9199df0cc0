"""``md.parse``: the DSL's text form, read by a whitelist over Python's ``ast`` (no ``eval``).

Accepted: calls of DSL constructors (by name, positional and keyword arguments), numbers
(with unary ``-``/``+``), strings, ``True``/``False``/``None``, tuples, lists, and the operators
``& | ~`` (patterns) and ``+`` (score terms). Anything else — attribute access, other names,
subscripts, lambdas, comprehensions — is a MaskDSLError naming what was found and where.
Constructors that take Python code (``mask_fn``) are refused too: code is never parsed from
text, so ``parse(repr(p)) == p`` holds for every pattern built without them.
"""
from __future__ import annotations

import ast
import inspect
import numbers
import io
import operator
import tokenize
import difflib

from . import pattern as _pattern
from . import score as _score  # noqa: F401  (importing them registers their constructors)
from maskdsl._errors import MaskDSLError
from .node import Node
from .pattern import Pattern
from .score import Score

__all__ = ["parse", "NAMES"]

from .node import DSL_NAMES

#: The parser's whitelist: exactly the registered DSL constructors (never anything else).
NAMES = DSL_NAMES

MAX_LENGTH = 100_000   # characters
MAX_DEPTH = 64         # nested calls/containers/operators


def parse(text: str):
    """Read a pattern (or score terms) written in the DSL's text form.

    ``parse(repr(p)) == p`` for every pattern and literal score built without ``mask_fn``
    (which takes Python code: the parser refuses it).

    Example:
        >>> import maskdsl as md
        >>> md.parse("neighborhood(kernel_size=(7, 7)) & causal(dims=(0,))")
        neighborhood(kernel_size=(7, 7)) & causal(dims=(0,))
    """
    if not isinstance(text, str):
        raise MaskDSLError(f"parse: expected a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise MaskDSLError(f"parse: spec has {len(text)} characters; expected at most {MAX_LENGTH}")
    if not text.strip():
        raise MaskDSLError("parse: empty spec; expected a pattern such as neighborhood(7)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        col = f" at column {e.offset}" if e.offset else ""
        raise MaskDSLError(f"parse: invalid syntax{col} in {_clip(text)!r}: {e.msg}") from None
    except RecursionError:
        return _parse_long(text)
    except (ValueError, MemoryError, OverflowError) as e:
        raise MaskDSLError(f"parse: cannot read {_clip(text)!r}: {type(e).__name__}") from None
    try:
        out = _Reader(text).read(tree.body, 0)
    except RecursionError:
        raise MaskDSLError(f"parse: spec nests too deeply; expected at most {MAX_DEPTH} levels") from None
    if not isinstance(out, (Pattern, Score)):
        raise MaskDSLError(
            f"parse: {_clip(text)!r} is {_describe(out)}, not a pattern or score; expected e.g. "
            f"neighborhood(7) or softcap(30.0)"
        )
    return out


def _parse_long(text: str):
    """A spec too long for Python's own parser (which recurses once per operand: a union of
    a few thousand patterns): split at the operators outside any brackets, ``|`` (the loosest)
    first, then ``&``, parse each operand, and combine them left to right, as Python would."""
    starts, total = [0], 0
    for line in text.splitlines(keepends=True):
        total += len(line)
        starts.append(total)
    for op, combine in (("|", operator.or_), ("&", operator.and_)):
        cuts, depth = [], 0
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type != tokenize.OP:
                    continue
                if tok.string in "([{":
                    depth += 1
                elif tok.string in ")]}":
                    depth -= 1
                elif tok.string == op and depth == 0:
                    cuts.append(starts[tok.start[0] - 1] + tok.start[1])
        except (tokenize.TokenError, SyntaxError):
            break
        if cuts:
            pieces = [text[a + 1:b] for a, b in zip([-1] + cuts, cuts + [len(text)])]
            out = parse(pieces[0])
            for piece in pieces[1:]:
                b = parse(piece)
                for x in (out, b):
                    if not isinstance(x, Node):
                        raise MaskDSLError(f"parse: {op} combines patterns or scores, got "
                                           f"{_describe(x)} ({_clip(text)!r})")
                out = combine(out, b)
            return out
    raise MaskDSLError(f"parse: spec nests too deeply; expected at most {MAX_DEPTH} levels "
                       f"({_clip(text)!r})")


def _takes_code(fn) -> bool:
    """Whether a DSL constructor takes Python code (``mask_fn``): never built from text."""
    return bool(getattr(fn, "_takes_code", False))


def _textual():
    """The constructors text may call, sorted (for messages)."""
    return sorted(n for n, f in NAMES.items() if not _takes_code(f))


def _clip(text: str, n: int = 60) -> str:
    text = text.strip()
    return text if len(text) <= n else text[: n - 3] + "..."


def _describe(v) -> str:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, numbers.Number):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (tuple, list)):
        return "a tuple" if isinstance(v, tuple) else "a list"
    return type(v).__name__


_WHAT = {
    ast.Attribute: "attribute access", ast.Subscript: "subscripts", ast.Lambda: "lambdas",
    ast.BoolOp: "'and'/'or' (use & and |)", ast.Compare: "comparisons", ast.Dict: "dicts",
    ast.Set: "sets", ast.ListComp: "comprehensions", ast.GeneratorExp: "comprehensions",
    ast.SetComp: "comprehensions", ast.DictComp: "comprehensions", ast.IfExp: "if/else",
    ast.JoinedStr: "f-strings", ast.Starred: "* unpacking", ast.NamedExpr: ":=",
    ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
}


class _Reader:
    def __init__(self, text: str):
        self.text = text

    def fail(self, node, what: str):
        where = f"column {node.col_offset + 1} of " if hasattr(node, "col_offset") else ""
        raise MaskDSLError(f"parse: {what} ({where}{_clip(self.text)!r})")

    def _operator(self, node) -> str:
        op = {ast.BitAnd: "&", ast.BitOr: "|", ast.Add: "+"}.get(type(node.op))
        if op is None:
            self.fail(node, f"the operator {type(node.op).__name__} is not allowed; expected "
                            f"& | ~ (patterns) or + (scores)")
        return op

    def _combine(self, node, op: str, a, b):
        if not isinstance(a, Node) or not isinstance(b, Node):
            bad = a if not isinstance(a, Node) else b
            self.fail(node, f"{op} combines patterns or scores, got {_describe(bad)}")
        return a & b if op == "&" else a | b if op == "|" else a + b

    def _refuse_code(self, node, name: str):
        self.fail(node, f"{name}() takes a Python function and code is never parsed from text; "
                        f"build it in Python (md.{name}(fn, name=...)) and combine it with "
                        f"parsed patterns using & | ~")

    def read(self, node, depth: int):
        if depth > MAX_DEPTH:
            self.fail(node, f"nesting deeper than {MAX_DEPTH} levels")
        d = depth + 1
        if isinstance(node, ast.Constant):
            v = node.value
            if v is None or isinstance(v, (bool, int, float, str)):
                return v
            self.fail(node, f"the literal {_clip(repr(v), 30)} is not allowed")
        if isinstance(node, ast.Tuple):
            return tuple(self.read(x, d) for x in node.elts)
        if isinstance(node, ast.List):
            return [self.read(x, d) for x in node.elts]
        if isinstance(node, ast.UnaryOp):
            v = self.read(node.operand, d)
            if isinstance(node.op, ast.Invert):
                if isinstance(v, Node):
                    return ~v
                self.fail(node, f"~ applies to patterns, got {_describe(v)}")
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                if isinstance(v, numbers.Real) and not isinstance(v, bool):
                    return -v if isinstance(node.op, ast.USub) else +v
                self.fail(node, f"unary {'-' if isinstance(node.op, ast.USub) else '+'} applies "
                                f"to numbers, got {_describe(v)}")
            self.fail(node, "'not' is not allowed (use ~)")
        if isinstance(node, ast.BinOp):
            # a chain of one operator, a | b | c | ... (Python: ((a | b) | c) | ...), is one
            # level however long: its left spine is read in a loop, left to right
            op = self._operator(node)
            spine = [node]
            while (isinstance(spine[-1].left, ast.BinOp)
                   and type(spine[-1].left.op) is type(node.op)):
                spine.append(spine[-1].left)
            a = self.read(spine[-1].left, d)
            for n in reversed(spine):
                a = self._combine(n, op, a, self.read(n.right, d))
            return a
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                self.fail(node, "only DSL constructors can be called, e.g. neighborhood(7)")
            fn = NAMES.get(node.func.id)
            if fn is None:
                self.fail(node, f"unknown function {node.func.id!r}{_did_you_mean(node.func.id, _textual())}; "
                                f"expected one of {', '.join(_textual())}")
            if _takes_code(fn):
                self._refuse_code(node, node.func.id)
            args = [self.read(x, d) for x in node.args]
            kwargs = {}
            for kw in node.keywords:
                if kw.arg is None:
                    self.fail(node, "** unpacking is not allowed")
                if kw.arg in kwargs:   # Python's parser accepts f(a=1, a=2); the last would win
                    self.fail(kw.value, f"{node.func.id}(): keyword argument {kw.arg!r} repeated")
                kwargs[kw.arg] = self.read(kw.value, d)
            try:
                inspect.signature(fn).bind(*args, **kwargs)
            except TypeError as e:
                params = list(inspect.signature(fn).parameters)
                wrong = next((k for k in kwargs if k not in params), None)
                if wrong is not None:
                    self.fail(node, f"{node.func.id}(): unknown keyword argument {wrong!r}"
                                    f"{_did_you_mean(wrong, params)}; it takes "
                                    f"{node.func.id}{inspect.signature(fn).replace(return_annotation=inspect.Signature.empty)}")
                self.fail(node, f"{node.func.id}(): {e}")
            return fn(*args, **kwargs)
        if isinstance(node, ast.Name):
            if node.id in NAMES and _takes_code(NAMES[node.id]):
                self._refuse_code(node, node.id)
            if node.id in NAMES:
                self.fail(node, f"{node.id} must be called, e.g. {node.id}(...)")
            self.fail(node, f"unknown name {node.id!r}{_did_you_mean(node.id, _textual())}; only "
                            f"DSL constructors, numbers, strings, tuples and lists are allowed")
        self.fail(node, f"{_WHAT.get(type(node), type(node).__name__)} not allowed")


def _did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
