"""A compiled pattern: lowered IR, chosen token layout, generated mask_mod/score_mod and the
analytic BlockMask, shared by every CompiledAttention with the same (pattern, score, shape,
heads) so that many layers with one pattern build and compile everything once."""
from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional

import numpy as np
import sympy as sp
import torch

from .._caching import outside_inference_mode
from .._memory import guard, guarded
from .._pattern import And, Heads, Neighborhood, Not, Or, Pattern
from .blockmask import EMPTY, FULL, PARTIAL, UNDECIDED, separable_cost, tile_classes
from .ir import (K, KF, Q, QF, Const, Sep, lower_pattern, lower_score, predicate)
from .printer_torch import emit_function, identifier
from .tiling import Layout, candidate_tiles

__all__ = ["Program", "program", "pattern_name", "BLOCK_SIZE"]

BLOCK_SIZE = 128
MAX_LAYOUT_SEARCH_PAIRS = 4e8   # skip full classification of candidates beyond this many pairs


def pattern_name(p) -> str:
    """An informative identifier for a pattern, e.g. ``neighborhood_7x7_d1x2__and__causal_0``."""
    from .._pattern import Block, Causal, Sink, Window

    def dims(v):
        return "x".join(map(str, v)) if isinstance(v, tuple) else "ph" if not isinstance(v, int) else str(v)

    if isinstance(p, Neighborhood):
        s = f"neighborhood_{dims(p.kernel_size)}"
        if p.stride != 1:
            s += f"_s{dims(p.stride)}"
        if p.dilation != 1:
            s += f"_d{dims(p.dilation)}"
        if p.causal not in (False, ()):
            s += "_causal" if p.causal is True else "_causal" + "".join("1" if c else "0" for c in p.causal)
        return s
    if isinstance(p, Window):
        return f"window_{dims(p.left)}" + ("" if p.right == p.left else f"_{dims(p.right)}")
    if isinstance(p, Causal):
        return "causal" + ("" if p.dims is None else "_" + "_".join(map(str, p.dims)))
    if isinstance(p, Block):
        return f"block_{dims(p.size)}"
    if isinstance(p, Sink):
        return f"sink_{dims(p.n)}"
    if isinstance(p, And):
        return f"{pattern_name(p.a)}__and__{pattern_name(p.b)}"
    if isinstance(p, Or):
        return f"{pattern_name(p.a)}__or__{pattern_name(p.b)}"
    if isinstance(p, Not):
        return f"not_{pattern_name(p.a)}"
    if isinstance(p, Heads):
        return "heads_" + "_".join(pattern_name(x) for x in p.patterns)
    return p._name


def _varies_per_head(p) -> bool:
    from .._compile import walk
    from .._values import PerHead

    for node in walk(p):
        if isinstance(node, Heads):
            return True
        for v in vars(node).values():
            if isinstance(v, PerHead) or (isinstance(v, tuple) and any(isinstance(x, PerHead) for x in v)):
                return True
    return False


def _group_options(irs, rank: int) -> List[tuple]:
    """Residue groupings worth trying: the numeric dilation steps shared by every head."""
    per_dim = []
    for d in range(rank):
        steps = set()
        for ir, _ in irs:
            if isinstance(ir, Sep) and ir.dims[d].steps:
                steps |= {int(s) for s in ir.dims[d].steps if s.is_Integer}
            else:
                steps.add(1)
        per_dim.append(steps.pop() if len(steps) == 1 else 1)
    options = [(1,) * rank]
    if any(g > 1 for g in per_dim):
        options.append(tuple(per_dim))
    return options


def _row_major_tile(shape: tuple, block: int) -> Optional[tuple]:
    """A tile shape whose tiled layout is exactly row-major order (no permutation), if any."""
    tile, rest = [1] * len(shape), block
    for d in reversed(range(len(shape))):
        if rest == 1:
            break
        if shape[d] <= rest and rest % shape[d] == 0:
            tile[d], rest = shape[d], rest // shape[d]
        elif shape[d] % rest == 0:
            tile[d], rest = rest, 1
        else:
            return None
    return tuple(tile) if rest == 1 else None


class Program:
    """Everything maskdsl generates for one (pattern, score, shape, heads)."""

    def __init__(self, pattern: Pattern, score, shape: tuple, heads: int,
                 block: int = BLOCK_SIZE, tile="auto"):
        self.pattern, self.score, self.shape, self.heads = pattern, score, shape, heads
        self.block = block
        self.n = math.prod(shape)
        self.name = identifier(pattern_name(pattern))
        self.ir, self.tables = lower_pattern(pattern, shape, heads)
        if _varies_per_head(pattern):
            self.irs = [lower_pattern(pattern, shape, heads, head=h) for h in range(heads)]
        else:  # every head lowers to the same IR
            self.irs = [(self.ir, self.tables)] * heads
        self.score_expr = lower_score(score, shape, heads, self.tables)
        self.candidates: Dict[str, int] = {}
        self.layout, self.classes = self._choose_layout(tile)
        self.mask_source = self._mask_source()
        self.score_source = self._score_source()
        self._mods: Dict[torch.device, tuple] = {}
        self._block_masks: Dict[tuple, object] = {}
        self._stats = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ layout
    def _layouts(self, tile) -> List[Layout]:
        shape, r = self.shape, len(self.shape)
        if tile is None:
            return [Layout(shape, block=self.block)]
        if isinstance(tile, Layout):
            return [tile]
        if tile != "auto":
            return [Layout(shape, tuple(tile), block=self.block)]
        rm = _row_major_tile(shape, self.block) if r > 1 else None
        out = [Layout(shape, rm) if rm is not None else Layout(shape, block=self.block)]
        if r > 1:
            for groups in _group_options(self.irs, r):
                for t in candidate_tiles(shape, self.block):
                    if t == rm and all(g == 1 for g in groups):
                        continue
                    out.append(Layout(shape, t, groups))
        return out

    def _choose_layout(self, tile):
        """The candidate layout with the fewest non-empty tile pairs (ties: the earlier one,
        row-major first). Separable patterns are scored per dim (a product of per-dim counts);
        others by classifying every candidate (without refinement: undecided counts as work)."""
        layouts = self._layouts(tile)
        if len(layouts) == 1:
            classes = tile_classes(self.irs, layouts[0], refine=True)
            self.candidates[layouts[0].describe()] = int((classes != EMPTY).sum())
            return layouts[0], classes
        separable = all(isinstance(ir, Sep) for ir, _ in self.irs)
        best = None
        for i, lay in enumerate(layouts):
            classes = None
            if separable and lay.tile is not None:
                cost = sum(separable_cost(ir, lay) for ir, _ in self.irs)
            elif i > 0 and lay.n_tiles ** 2 * len(self.irs) > MAX_LAYOUT_SEARCH_PAIRS:
                continue
            else:
                classes = tile_classes(self.irs, lay, refine=False)
                cost = int((classes != EMPTY).sum())
            self.candidates[lay.describe()] = cost
            if best is None or cost < best[0]:
                best = (cost, lay, classes)
        _, lay, classes = best
        if classes is None or (classes == UNDECIDED).any():
            classes = tile_classes(self.irs, lay, refine=True)
        return lay, classes

    # ------------------------------------------------------------------ generated source
    def _decoded(self):
        qi = sp.Symbol("q_idx", integer=True, nonnegative=True)
        ki = sp.Symbol("kv_idx", integer=True, nonnegative=True)
        pro = self.layout.decode(qi, "q") + self.layout.decode(ki, "k")
        qs = [sp.Symbol(f"q{d}", integer=True, nonnegative=True) for d in range(len(self.shape))]
        ks = [sp.Symbol(f"k{d}", integer=True, nonnegative=True) for d in range(len(self.shape))]
        qf = sp.Symbol("q_flat", integer=True, nonnegative=True)
        kf = sp.Symbol("k_flat", integer=True, nonnegative=True)
        return pro, qs, ks, qf, kf

    def _mask_source(self) -> str:
        pro, qs, ks, qf, kf = self._decoded()
        expr = predicate(self.ir, qs, ks, qf, kf)
        if self.layout.pads:
            expr = sp.And(expr, sp.Symbol("q_valid"), sp.Symbol("k_valid"))
        doc = f"{self.pattern!r} on {'x'.join(map(str, self.shape))}, layout: {self.layout.describe()}"
        return emit_function(f"mask_{self.name}", ["b", "h", "q_idx", "kv_idx"], pro, expr,
                             doc=doc.replace('"', "'"), true_like="(q_idx + kv_idx)",
                             captured=self._table_names())

    def _score_source(self) -> Optional[str]:
        if self.score_expr is None:
            return None
        pro, qs, ks, qf, kf = self._decoded()
        sub = {Q[d]: qs[d] for d in range(len(qs))}
        sub.update({K[d]: ks[d] for d in range(len(ks))})
        sub.update({QF: qf, KF: kf})
        expr = self.score_expr.xreplace(sub)
        from .._score import Dropout, SinkLogit, score_terms

        name = identifier("__".join(t._name for t in score_terms(self.score)
                                    if not isinstance(t, (SinkLogit, Dropout))))
        return emit_function(f"score_{name}", ["score", "b", "h", "q_idx", "kv_idx"],
                             [x for x in pro if not x[0].endswith("_valid")], expr,
                             doc=repr(self.score).replace('"', "'"), true_like="q_idx",
                             captured=self._table_names(), float_like="score.dtype")

    def _table_names(self) -> List[str]:
        return sorted(self.tables.values) + sorted(self.tables.tensors)

    @property
    def source(self) -> str:
        return self.mask_source + ("\n" + self.score_source if self.score_source else "")

    def _factories(self):
        if not hasattr(self, "_factory_fns"):
            self._factory_fns = (_exec_named(self.mask_source),
                                 _exec_named(self.score_source) if self.score_source else None)
        return self._factory_fns

    @outside_inference_mode
    def _tables_on(self, device, flex: bool) -> dict:
        """Per-head tables (int64 / float32) and the user's tensors on ``device``. For ``flex``,
        user float tensors become float32 (compiled flex on CPU mis-compiles float64 captures)
        and are detached on CPU (no backward there; a captured leaf needing grad fails)."""
        static = self.__dict__.setdefault("_static_tables", {})
        if (device, flex) not in static:   # per-head tables never change: build them once
            tabs = {}
            for name, v in self.tables.values.items():
                arr = np.asarray(v)
                # float tables: float32 for flex (float64 captures mis-compile on CPU), float64
                # otherwise (score_mods cast lookups to the score's dtype)
                dt = (torch.float32 if flex else torch.float64) if arr.dtype.kind == "f" else torch.int64
                tabs[name] = torch.as_tensor(arr, dtype=dt, device=device)
            static[(device, flex)] = tabs
        out = dict(static[(device, flex)])
        for name, t in self.tables.tensors.items():   # user tensors: current values every call
            if flex and device.type == "cpu":
                t = t.detach()
            if flex and t.is_floating_point():
                t = t.to(torch.float32)
            out[name] = t.to(device)
        return out

    def _build(self, factory, tables: dict):
        if factory is None:
            return None
        if not factory.__name__.startswith("make_"):
            return factory
        args = [tables[n] for n in factory.__code__.co_varnames[:factory.__code__.co_argcount]]
        return factory(*args)

    @outside_inference_mode
    def mods(self, device, flex: bool = False) -> tuple:
        """(mask_mod, score_mod) with their tables on ``device`` (``flex``: prepared for
        compiled flex_attention). The mask_mod is built once per device; the score_mod is
        rebuilt when it reads user tensors (learnable parameters change between calls), from
        the same code object, so nothing recompiles."""
        device = torch.device(device)
        mask_factory, score_factory = self._factories()
        key = (device, flex)
        with self._lock:
            if key not in self._mods:
                tables = self._tables_on(device, flex)
                self._mods[key] = (self._build(mask_factory, tables),
                                   self._build(score_factory, tables))
            mask, score = self._mods[key]
        if score is not None and self.tables.tensors:
            score = self._build(score_factory, self._tables_on(device, flex))
        return mask, score

    # ------------------------------------------------------------------ block mask
    @outside_inference_mode
    @guard("block_mask()")
    def block_mask(self, device="cpu", compute_q_blocks: bool = True):
        """The torch BlockMask (in the program's token layout), built from the tile classes."""
        from torch.nn.attention.flex_attention import BlockMask

        device = torch.device(device)
        key = (device, compute_q_blocks)
        with self._lock:
            cached = self._block_masks.get(key)
        if cached is not None:
            return cached
        cls = torch.from_numpy(self.classes)
        if all(np.array_equal(self.classes[0], c) for c in self.classes[1:]):
            cls = cls[:1]
        partial_num, partial_idx = _indices(cls == PARTIAL)
        full_num, full_idx = _indices(cls == FULL)
        mask_mod, _ = self.mods(device, flex=True)
        bm = BlockMask.from_kv_blocks(
            partial_num[None].to(device), partial_idx[None].to(device),
            full_num[None].to(device), full_idx[None].to(device),
            BLOCK_SIZE=self.block, mask_mod=mask_mod,
            seq_lengths=(self.layout.n_padded, self.layout.n_padded),
            compute_q_blocks=compute_q_blocks)
        with self._lock:
            self._block_masks[key] = bm
        return bm

    # ------------------------------------------------------------------ statistics
    @guard("stats()")
    def stats(self) -> dict:
        if self._stats is None:
            nonempty = float((self.classes != EMPTY).mean())
            row_major = Layout(self.shape, block=self.block)
            rm_tile = _row_major_tile(self.shape, self.block)
            if rm_tile is not None:
                row_major = Layout(self.shape, rm_tile)
            if row_major.key == self.layout.key:
                before = nonempty
            elif row_major.n_tiles ** 2 * self.heads <= MAX_LAYOUT_SEARCH_PAIRS:
                before = float((tile_classes(self.irs, row_major) != EMPTY).mean())
            else:
                before = float("nan")
            self._stats = {
                "tokens": self.n,
                "layout": self.layout.describe(),
                "block_size": self.block,
                "token_density": self._token_density(),
                "block_density_row_major": before,
                "block_density": nonempty,
                "ideal_speedup": 1.0 / nonempty if nonempty > 0 else float("inf"),
                "partial_blocks": float((self.classes == PARTIAL).mean()),
                "full_blocks": float((self.classes == FULL).mean()),
                "layouts_tried": dict(self.candidates),
            }
        return dict(self._stats)

    def _token_density(self) -> float:
        """Exact allowed-pair fraction: per-dim counts for separable IR, else the partial tiles
        are evaluated (full tiles count whole)."""
        from .blockmask import _TileSets, flat_evaluator

        total = 0.0
        for h, (ir, tables) in enumerate(self.irs):
            if isinstance(ir, Const):
                total += self.n * self.n if ir.value else 0
            elif isinstance(ir, Sep):
                count = 1
                for d, dr in enumerate(ir.dims):
                    count *= _dim_pairs(dr, self.shape[d])
                total += count
            else:
                ts = _TileSets(self.layout)
                cls = self.classes[h]
                full = np.nonzero(cls == FULL)
                total += float((ts.n_valid[full[0]] * ts.n_valid[full[1]]).sum())
                qi, ki = np.nonzero(cls == PARTIAL)
                pred = flat_evaluator(ir, tables, self.shape)
                tok = torch.from_numpy(ts.tokens)
                step = max(1, (1 << 22) // self.block ** 2)
                for s in range(0, len(qi), step):
                    a, b = torch.from_numpy(qi[s:s + step]), torch.from_numpy(ki[s:s + step])
                    q, k = tok[a][:, :, None], tok[b][:, None, :]
                    ok = (q >= 0) & (k >= 0)
                    total += float((pred(q.clamp(min=0), k.clamp(min=0)) & ok).sum())
        return total / (self.heads * self.n * self.n)


def _dim_pairs(dr, L: int) -> int:
    """Allowed (q, k) coordinate pairs on one dim of a separable IR, in O(L) from the per-query
    key ranges: for each q, the k in [lo, hi) with (k - q) % step == 0."""
    import math as _math

    from .blockmask import key_range

    x = np.arange(L)
    lo, hi = key_range(dr, x, L)
    steps = [int(s) for s in dr.steps]
    step = _math.lcm(*steps) if steps else 1
    first = lo + np.mod(x - lo, step)
    return int(np.where(hi > first, (hi - first + step - 1) // step, 0).sum())


def _indices(mask: torch.Tensor):
    """kv_num_blocks [H, T] and kv_indices [H, T, T] (int32) for a bool [H, T, T] selection,
    built from the nonzeros (O(nnz)), not by sorting every row."""
    H, T, _ = mask.shape
    num = mask.sum(-1, dtype=torch.int32)
    idx = torch.zeros(H, T, T, dtype=torch.int32)
    nz = mask.nonzero()
    if len(nz):
        row = nz[:, 0] * T + nz[:, 1]
        starts = torch.zeros(H * T + 1, dtype=torch.int64)
        starts[1:] = torch.cumsum(num.reshape(-1).to(torch.int64), 0)
        pos = torch.arange(len(nz)) - starts[row]
        idx[nz[:, 0], nz[:, 1], pos] = nz[:, 2].to(torch.int32)
    return num, idx


def _exec_named(src: str):
    """Exec generated source once; returns its (first) function: a factory or a plain mod."""
    name = src.split("(", 1)[0].split()[-1]
    g = {"torch": torch}
    exec(compile(src, f"<maskdsl:{name}>", "exec"), g)
    return g[name]


_CACHE: Dict[tuple, Program] = {}
_CACHE_LOCK = threading.Lock()


def content_key(x):
    """A cache key for a pattern or score: document ids by their *content* (the tile classes
    and token masks are built from it, so an in-place change must miss), other tensors by
    identity (they are read at call time)."""
    import dataclasses
    import hashlib

    from .._node import Node
    from .._pattern import Document
    from .._values import PerHead

    if isinstance(x, Document) and isinstance(x.ids, torch.Tensor):
        ids = x.ids.detach().cpu().contiguous()
        digest = hashlib.sha1(ids.numpy().tobytes()).hexdigest()
        return ("document", str(ids.dtype), tuple(ids.shape), digest)
    if isinstance(x, Node):
        return (type(x).__name__,) + tuple(content_key(getattr(x, f.name))
                                           for f in dataclasses.fields(x))
    if isinstance(x, torch.Tensor):
        return ("<tensor>", id(x))
    if isinstance(x, (tuple, list)):
        return tuple(content_key(v) for v in x)
    if isinstance(x, PerHead):
        return ("per_head", x.values)
    return (type(x).__name__, x)


def program(pattern, score, shape: tuple, heads: int, block: int = BLOCK_SIZE, tile="auto") -> Program:
    """The (cached) Program for this pattern, score, shape and head count."""
    key = (content_key(pattern), content_key(score), tuple(shape), heads, block,
           tile.key if isinstance(tile, Layout) else tile)
    with _CACHE_LOCK:
        p = _CACHE.get(key)
    if p is None:
        with guarded(f"compiling {pattern!r} for shape {tuple(shape)}, heads={heads}"):
            p = Program(pattern, score, tuple(shape), heads, block, tile)
        with _CACHE_LOCK:
            p = _CACHE.setdefault(key, p)
    return p
