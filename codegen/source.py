"""Generated source: the mask_mod and score_mod of a recipe, and the functions on a device.

``mask_source(recipe)`` prints the recipe's table-form IR behind the layout's decode (position ->
grid coordinates); ``score_code(recipe, score)`` does the same for the score terms. Both are
Python source for flex's signatures ``mask_mod(b, h, q_idx, kv_idx)`` and
``score_mod(score, b, h, q_idx, kv_idx)``; per-head parameters and data tables are captured
tensors (the source is a ``make_*`` factory taking them), never Python floats in closures.

A user's ``mask_fn`` is a captured name like the tables: the factory takes the function and the
mod calls it on the decoded flat indices (``q_flat``, ``k_flat``), never on layout positions.

``mods(recipe, score, device)`` gives the functions: the mask_mod is built once per device; the
score_mod is rebuilt from the same code object at every call with the *caller's* score tensors
(learnable tables change between calls; one code object means nothing recompiles).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import sympy as sp
import torch

from maskdsl._caching import LRU, outside_inference_mode
from maskdsl.dsl.node import call_user
from maskdsl.dsl.score import SCORE_MOD_ROLES, terms_with_role
from .ir import K, KF, Q, QF, Tables, lower_score, predicate
from .printer_torch import emit_function, exec_source, identifier
from .recipe import Recipe, content_key

__all__ = ["mask_source", "score_code", "ScoreCode", "mods", "score_mod", "decoded",
           "head_mask_mod"]

_MASK_SOURCES = LRU(256)
_SCORE_CODES = LRU(256)
_FACTORIES = LRU(512)
_STATIC = LRU(256)
_MASK_MODS = LRU(256)


def decoded(layout, rank: int):
    """The decode prologue (positions -> coordinates) and the coordinate symbols."""
    qi = sp.Symbol("q_idx", integer=True, nonnegative=True)
    ki = sp.Symbol("kv_idx", integer=True, nonnegative=True)
    pro = layout.decode(qi, "q") + layout.decode(ki, "k")
    qs = [sp.Symbol(f"q{d}", integer=True, nonnegative=True) for d in range(rank)]
    ks = [sp.Symbol(f"k{d}", integer=True, nonnegative=True) for d in range(rank)]
    qf = sp.Symbol("q_flat", integer=True, nonnegative=True)
    kf = sp.Symbol("k_flat", integer=True, nonnegative=True)
    return pro, qs, ks, qf, kf


def _names(tables: Tables) -> List[str]:
    return sorted(tables.values) + sorted(tables.tensors) + sorted(tables.fns)


def mask_source(r: Recipe) -> str:
    src = _MASK_SOURCES.get(r.key)
    if src is None:
        pro, qs, ks, qf, kf = decoded(r.layout, len(r.shape))
        expr = predicate(r.ir, qs, ks, qf, kf)
        if r.layout.pads:
            expr = sp.And(expr, sp.Symbol("q_valid"), sp.Symbol("k_valid"))
        doc = f"{r.pattern!r} on {'x'.join(map(str, r.shape))}, layout: {r.layout.describe()}"
        src = _MASK_SOURCES.put(r.key, emit_function(
            f"mask_{r.name}", ["b", "h", "q_idx", "kv_idx"], pro, expr,
            doc=doc.replace('"', "'"), true_like="(q_idx + kv_idx)", captured=_names(r.tables)))
    return src


@dataclass(frozen=True, eq=False)
class ScoreCode:
    """A score's generated source and its tables: per-head numbers (static) and the slots of
    the score tensors (read from the caller's score at every call)."""

    source: str
    tables: Tables


def score_code(r: Recipe, score) -> Optional[ScoreCode]:
    if score is None:
        return None
    key = (r.key, content_key(score))
    code = _SCORE_CODES.get(key)
    if code is None:
        tables = Tables()
        expr = lower_score(score, r.shape, r.heads, tables)
        if expr is None:
            return None
        pro, qs, ks, qf, kf = decoded(r.layout, len(r.shape))
        sub = {Q[d]: qs[d] for d in range(len(qs))}
        sub.update({K[d]: ks[d] for d in range(len(ks))})
        sub.update({QF: qf, KF: kf})
        name = identifier("__".join(t._name for t in terms_with_role(score, *SCORE_MOD_ROLES)))
        src = emit_function(f"score_{name}", ["score", "b", "h", "q_idx", "kv_idx"],
                            [x for x in pro if not x[0].endswith("_valid")], expr.xreplace(sub),
                            doc=repr(score).replace('"', "'"), true_like="q_idx",
                            captured=_names(tables), float_like="score.dtype")
        code = _SCORE_CODES.put(key, ScoreCode(src, tables))
    return code


def _factory(src: str):
    fn = _FACTORIES.get(src)
    if fn is None:
        fn = _FACTORIES.put(src, exec_source(src))
    return fn


@outside_inference_mode
def _static_tables(tables: Tables, key, device, flex: bool) -> dict:
    """Per-head number tables on ``device``, built once: int64, or float64 (float32 for flex:
    compiled flex on CPU mis-compiles float64 captures). Data tensors of the pattern (document
    ids: the recipe's private copy) come along."""
    out = _STATIC.get((key, device, flex))
    if out is None:
        out = {}
        for name, v in tables.values.items():
            arr = np.asarray(v)
            dt = (torch.float32 if flex else torch.float64) if arr.dtype.kind == "f" else torch.int64
            out[name] = torch.as_tensor(arr, dtype=dt, device=device)
        for name, t in tables.tensors.items():
            if name not in tables.slots:
                out[name] = t.to(device)
        # users' functions: as they are for flex (torch.compile traces them); elsewhere an
        # exception from the user's code becomes one MaskDSLError naming the function
        out.update(tables.fns if flex else
                   {name: _UserCall(fn, tables.fn_nodes.get(name)) for name, fn in tables.fns.items()})
        out = _STATIC.put((key, device, flex), out)
    return out


class _UserCall:
    """A user's ``mask_fn``/``score_fn`` as the generated code of the PyTorch backends calls it
    at run time: what it raises becomes a MaskDSLError naming it (ARCHITECTURE.md, "Bad
    input"); the compile-time probe has already checked what it returns."""

    __slots__ = ("fn", "node")

    def __init__(self, fn, node):
        self.fn, self.node = fn, node

    def __call__(self, *args):
        return call_user(self.node, "fn", self.fn, args, _at_run_time, grad=True)


def _at_run_time(args) -> str:
    shapes = ", ".join(str(list(a.shape)) if isinstance(a, torch.Tensor) else repr(a)
                       for a in args)
    return f"when called with ({shapes}) at run time"


def _call_tensors(tables: Tables, score, device, flex: bool) -> Dict[str, torch.Tensor]:
    """The caller's score tensors, now (learnable ones keep their graph; for flex on CPU they
    are detached: flex has no backward there, and compiled flex wants float32)."""
    terms = terms_with_role(score, *SCORE_MOD_ROLES)
    out = {}
    for name, (i, field, flatten) in tables.slots.items():
        t = getattr(terms[i], field)
        t = t.reshape(-1) if flatten else t
        if flex and device.type == "cpu":
            t = t.detach()
        if flex and t.is_floating_point():
            t = t.to(torch.float32)
        out[name] = t.to(device)
    return out


def _build(factory, tables: dict):
    if not factory.__name__.startswith("make_"):
        return factory
    code = factory.__code__
    return factory(*[tables[n] for n in code.co_varnames[:code.co_argcount]])


def mods(r: Recipe, score, device, flex: bool = False) -> tuple:
    """(mask_mod, score_mod or None) on ``device``, in the recipe's token layout (``flex``:
    prepared for compiled flex_attention)."""
    device = torch.device(device)
    key = (r.key, device, flex)
    mask = _MASK_MODS.get(key)
    if mask is None:
        with torch.inference_mode(False):
            mask = _build(_factory(mask_source(r)), _static_tables(r.tables, r.key, device, flex))
        mask = _MASK_MODS.put(key, mask)
    return mask, score_mod(r, score, device, flex)


def score_mod(r: Recipe, score, device, flex: bool = False):
    """The score_mod alone (or None), without building the mask_mod: the tiles backend masks
    head by head (``head_mask_mod``), and a table-form mask_mod of many distinct heads is
    O(heads) source."""
    device = torch.device(device)
    code = score_code(r, score)
    if code is None:
        return None
    static = _static_tables(code.tables, (r.key, content_key(score)), device, flex)
    tabs = dict(static, **_call_tensors(code.tables, score, device, flex))
    return _build(_factory(code.source), tabs)


_HEAD_MODS = LRU(1024)


def head_mask_mod(r: Recipe, h: int, device):
    """A mask_mod for head ``h`` alone, from its own specialised IR (in the recipe's layout)."""
    device = torch.device(device)
    ir, tables = r.irs[h]
    key = (r.key, ir, repr(tables.values), device)
    fn = _HEAD_MODS.get(key)
    if fn is None:
        pro, qs, ks, qf, kf = decoded(r.layout, len(r.shape))
        expr = predicate(ir, qs, ks, qf, kf)
        if r.layout.pads:
            expr = sp.And(expr, sp.Symbol("q_valid"), sp.Symbol("k_valid"))
        src = emit_function(f"mask_{r.name}_head", ["b", "h", "q_idx", "kv_idx"], pro, expr,
                            true_like="(q_idx + kv_idx)", captured=_names(tables))
        with torch.inference_mode(False):
            fn = _build(_factory(src), _static_tables(tables, key, device, False))
        fn = _HEAD_MODS.put(key, fn)
    return fn
