"""maskdsl: a compiler for attention locality patterns.

Write a pattern in a small declarative DSL, compile it for a token grid, call it::

    import maskdsl as md
    p = md.neighborhood(kernel_size=(7, 7), dilation=(1, 2)) & md.causal(dims=(0,))
    attn = md.compile(p, shape=(64, 64), heads=4)
    out = attn(q, k, v)                      # q, k, v: [B, H, N, D], N = 64 * 64

``md.reference`` holds the dense semantics every backend is tested against.
"""
import builtins
import importlib

# the DSL modules register every constructor (@dsl) on import; the package exports the registry
from . import reference
from ._errors import MaskDSLError
from ._version import __version__  # noqa: F401
from .dsl import pattern as _pattern, score as _score, values as _values  # noqa: F401
from .dsl.extent import Extent
from .dsl.node import DSL_NAMES as _DSL_NAMES
from .dsl.parse import parse
from .dsl.pattern import Pattern
from .dsl.score import Score
from .parallel.distributed import context_parallel, shard, unshard
from .runtime.compiled import CompiledAttention, compile
from .runtime.interop import FlexInputs
from .runtime.kvcache import KVCache, Lookback
from .runtime.merge import merge

globals().update(_DSL_NAMES)    # md.neighborhood, md.softcap, md.per_head, ...

__all__ = [
    # every DSL constructor (patterns, score terms, per_head): the parser's names, one registry
    *_DSL_NAMES,
    # compiling and checking (md.compile is left out of __all__: `from maskdsl import *` must not
    # shadow the builtin compile)
    "CompiledAttention", "parse", "reference", "MaskDSLError", "merge",
    # context parallelism (maskdsl.parallel)
    "context_parallel", "shard", "unshard",
    # the types users receive: patterns, scores, and what a CompiledAttention hands out
    "Pattern", "Score", "Extent", "FlexInputs", "KVCache", "Lookback",
    # drop-in modules (imported on first use)
    "nn", "natten",
]
assert not set(__all__) & set(dir(builtins)), "import * would shadow a builtin"


def __getattr__(name):
    if name in ("nn", "natten"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
