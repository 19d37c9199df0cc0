"""A Program: a recipe with one caller's score terms: what the flex and tiles backends run.

Building one is cheap (the recipe and the score's generated source are cached by content in
``codegen.recipe`` and ``codegen.source``); the Program itself only ties them to the caller's
score, whose tensors are read at every call. Layout search, source generation, statistics and
BlockMasks live in their own modules; this class only forwards to them.
"""
from __future__ import annotations

import math

from .recipe import BLOCK_SIZE, Recipe, recipe
from .source import mask_source, mods, score_code, score_mod
from .stats import stats

__all__ = ["Program", "program", "BLOCK_SIZE"]


class Program:
    """The recipe of (pattern, shape, heads, block) plus a score."""

    def __init__(self, pattern, score, shape: tuple, heads: int, block: int = BLOCK_SIZE,
                 tile="auto"):
        self.recipe: Recipe = recipe(pattern, tuple(shape), heads, block, tile)
        self.pattern, self.score = pattern, score
        self.shape, self.heads, self.block = tuple(shape), heads, block
        self.n = math.prod(self.shape)

    # the recipe's parts, by their usual names
    @property
    def layout(self):
        return self.recipe.layout

    @property
    def classes(self):
        """Sparse tile classes per head (``HeadClasses``; ``.dense()`` for small grids)."""
        return self.recipe.classes

    @property
    def irs(self):
        return self.recipe.irs

    @property
    def name(self) -> str:
        return self.recipe.name

    # generated source
    @property
    def mask_source(self) -> str:
        return mask_source(self.recipe)

    @property
    def score_source(self):
        code = score_code(self.recipe, self.score)
        return None if code is None else code.source

    @property
    def source(self) -> str:
        s = self.score_source
        return self.mask_source + ("\n" + s if s else "")

    def mods(self, device, flex: bool = False) -> tuple:
        """(mask_mod, score_mod) on ``device`` in this program's token layout."""
        return mods(self.recipe, self.score, device, flex)

    def score_mod(self, device, flex: bool = False):
        """The score_mod alone (None without additive score terms): no mask_mod is built."""
        return score_mod(self.recipe, self.score, device, flex)

    def stats(self) -> dict:
        return stats(self.recipe)


def program(pattern, score, shape: tuple, heads: int, block: int = BLOCK_SIZE, tile="auto") -> Program:
    return Program(pattern, score, shape, heads, block, tile)
