"""maskdsl: a compiler for attention locality patterns.

Write a pattern in a small declarative DSL, compile it for a token grid, call it::

    import maskdsl as md
    p = md.neighborhood(kernel_size=(7, 7), dilation=(1, 2)) & md.causal(dims=(0,))
    attn = md.compile(p, shape=(64, 64), heads=4)
    out = attn(q, k, v)                      # q, k, v: [B, H, N, D], N = 64 * 64

``md.reference`` holds the dense semantics every backend is tested against.
"""
from . import reference
from maskdsl.runtime.compiled import CompiledAttention, compile
from ._errors import MaskDSLError
from maskdsl.runtime.merge import merge
from maskdsl.dsl.parse import parse
# the DSL constructors (public through __all__, which the @dsl registry spells out)
from maskdsl.dsl.pattern import (Pattern, block, causal, document, empty, full, heads, mask_fn,
    neighborhood, power, radial, sink, window)
from maskdsl.dsl.score import (Score, alibi, distance_decay, dropout, relative_bias, score_fn,
    sink_logit, softcap)
from maskdsl.dsl.values import per_head  # noqa: F401
from maskdsl.parallel.distributed import context_parallel, shard, unshard

__version__ = "0.1.0"

from maskdsl.dsl.node import DSL_NAMES as _DSL_NAMES

__all__ = [
    # every DSL constructor (patterns, score terms, per_head): the parser's names, one registry
    *_DSL_NAMES,
    # compiling and checking
    "compile", "CompiledAttention", "parse", "reference", "MaskDSLError", "merge",
    # context parallelism (maskdsl.distributed)
    "context_parallel", "shard", "unshard",
    "Pattern", "Score",
    # drop-in modules (imported on first use)
    "nn", "natten",
]


def __getattr__(name):
    if name in ("nn", "natten"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
