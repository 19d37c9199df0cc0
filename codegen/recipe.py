"""The recipe: what maskdsl derives from one (pattern, grid shape, heads, block size), frozen.

A recipe holds the lowered IR (per head, and in table form for printing), the chosen token
layout and the sparse tile classes. It is built once and shared by every backend and every
``CompiledAttention`` with the same pattern content: ``recipe()`` keeps a bounded LRU keyed by
content (document ids by a digest of their values; a recipe holds a private copy of them, never
a user tensor), so compiling fresh document ids every step does not grow memory and an in-place
change of the ids is a different key. Score terms are not part of a recipe: their tensors are
read at call time (``codegen.source``).

A user's ``mask_fn`` is keyed by *which function* it is: a serial number given to each function
object the first time it is keyed and never reused (the serial table holds weak references,
so it keeps no function alive and forgets dead ones; a new function, even at a dead one's
address, gets a new serial). Two different functions never share an entry, the same function
always finds its recipe, and the caches stay bounded by their LRU sizes. A recipe, like the
generated mods it caches, keeps its mask_fn (and what that closes over) alive until evicted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import List, Tuple

import torch

from maskdsl._caching import LRU, function_key, outside_inference_mode
from maskdsl._memory import guarded
from maskdsl.dsl.node import Node, walk
from maskdsl.dsl.pattern import Document, Heads, MaskFn, Pattern
from maskdsl.dsl.score import ScoreFn, score_varies_per_head
from maskdsl.dsl.values import PerHead
from .blockmask import HeadClasses
from .ir import Tables, lower_pattern
from .layout_search import choose_layout
from .naming import pattern_name
from .printer_torch import identifier
from .simplify import simplify
from .tiling import Layout

__all__ = ["Recipe", "recipe", "content_key", "varies_per_head", "BLOCK_SIZE", "CACHE_SIZE"]

BLOCK_SIZE = 128
CACHE_SIZE = 32       # recipes kept (least recently used out); each may carry plans and masks


@dataclass(frozen=True, eq=False)
class Recipe:
    """Everything derived from the pattern alone (see the module docstring)."""

    key: tuple                 # the content key it is cached under
    pattern: Pattern           # simplified
    shape: Tuple[int, ...]
    heads: int
    block: int
    name: str                  # for generated functions
    ir: object                 # table form (per-head values as lookups ``NAME[h]``)
    tables: Tables
    irs: List[tuple]           # per head: (ir, tables) specialised to that head
    varies: bool               # whether any head differs (per_head values, heads([...]))
    layout: Layout
    classes: HeadClasses
    tried: dict                # layout description -> non-empty tile pairs

    @property
    def n(self) -> int:
        return math.prod(self.shape)


def content_key(x):
    """A cache key for a pattern or score: document ids by their *content* (the tile classes
    and token masks are built from them, so an in-place change must miss), other tensors by
    their metadata (their values are read at call time, never baked in)."""
    if isinstance(x, Document) and isinstance(x.ids, torch.Tensor):
        ids = x.ids.detach().cpu().contiguous()
        return ("document", str(ids.dtype), tuple(ids.shape),
                hashlib.sha1(ids.numpy().tobytes()).hexdigest())
    if isinstance(x, MaskFn):
        return ("mask_fn", function_key(x.fn), x.name,
                None if x.key_range is None else function_key(x.key_range))
    if isinstance(x, ScoreFn):
        return ("score_fn", function_key(x.fn), x.name)
    if isinstance(x, Node):
        return (type(x).__name__,) + tuple(content_key(getattr(x, f.name))
                                           for f in dataclasses.fields(x))
    if isinstance(x, torch.Tensor):
        return ("<tensor>", tuple(x.shape), str(x.dtype))
    if isinstance(x, (tuple, list)):
        return tuple(content_key(v) for v in x)
    if isinstance(x, PerHead):
        return ("per_head", x.values)
    return (type(x).__name__, x)


def varies_per_head(p, score=None) -> bool:
    """Whether any head of ``p`` differs from the others (per_head values or heads([...]), or a
    mask_fn, which is called with the head and may use it); with ``score``, also whether its
    terms do or depend on the head count (``score.score_varies_per_head``: per_head or tensor
    values, alibi's geometric slopes, score_fn). No pattern parameter is derived from the head
    count. The one test for "every head alike" (tile classes, halo, Ulysses' rebinding)."""
    if score is not None:
        if score_varies_per_head(score):
            return True
    for node in walk(p):
        if isinstance(node, (Heads, MaskFn)):
            return True
        for v in vars(node).values():
            if isinstance(v, PerHead) or (isinstance(v, tuple) and any(isinstance(x, PerHead) for x in v)):
                return True
    return False


def _private(p: Pattern) -> Pattern:
    """``p`` with every document's id tensor replaced by a private CPU copy (a recipe never
    keeps a user tensor alive, and is never changed by the user's in-place edits)."""
    if isinstance(p, Document) and isinstance(p.ids, torch.Tensor):
        return Document(p.ids.detach().cpu().clone())
    kids = p.children()
    if not kids:
        return p
    new = [_private(k) for k in kids]
    if all(a is b for a, b in zip(new, kids)):
        return p
    if isinstance(p, Heads):
        return Heads(tuple(new))
    return type(p)(*new)


class HashedKey(tuple):
    """A content key that hashes once: the key of a pattern with many heads is a large nested
    tuple, and the caches keyed by (recipe key, head, ...) look it up once per head."""

    def __new__(cls, items):
        self = super().__new__(cls, items)
        self._hash = tuple.__hash__(self)
        return self

    def __hash__(self):
        return self._hash


_CACHE = LRU(CACHE_SIZE)


def recipe(pattern: Pattern, shape: tuple, heads: int, block: int = BLOCK_SIZE,
           tile="auto") -> Recipe:
    """The (cached) recipe of a pattern on a grid: IR, layout, tile classes."""
    shape = tuple(shape)
    tile_key = tile.key if isinstance(tile, Layout) else tile
    key = HashedKey((content_key(pattern), shape, heads, block, tile_key))
    found = _CACHE.get(key)
    if found is not None:
        return found
    with guarded(f"compiling {pattern!r} for shape {shape}, heads={heads}"):
        made = _build(key, pattern, shape, heads, block, tile)
    return _CACHE.put(key, made)


@outside_inference_mode
def _build(key, pattern, shape, heads, block, tile) -> Recipe:
    p = simplify(_private(pattern))
    ir, tables = lower_pattern(p, shape, heads)
    varies = varies_per_head(p)
    if varies:
        irs = [lower_pattern(p, shape, heads, head=h, checked=True) for h in range(heads)]
    else:  # every head lowers to the same IR
        irs = [(ir, tables)] * heads
    layout, classes, tried = choose_layout(irs, shape, block, tile)
    return Recipe(key=key, pattern=p, shape=shape, heads=heads, block=block,
                  name=identifier(pattern_name(pattern)), ir=ir, tables=tables, irs=irs,
                  varies=varies, layout=layout, classes=classes, tried=tried)


def cached_recipes() -> int:
    return len(_CACHE)
