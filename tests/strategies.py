"""Hypothesis strategies: random grid shapes, head counts, valid patterns and score terms.

Patterns are drawn *for* a shape and a head count, so every draw is valid: per-dim values fit
the shape (K * dilation <= L, ...) and per_head lists have one entry per head.
"""
import math

import torch
from hypothesis import strategies as st

import maskdsl as md


@st.composite
def shapes(draw, max_tokens=144, min_size=1):
    rank = draw(st.integers(1, 3))
    limits = {1: max_tokens, 2: 16, 3: 6}[rank]
    out = []
    for _ in range(rank):
        budget = max(min_size, min(limits, max_tokens // max(1, math.prod(out))))
        out.append(draw(st.integers(min_size, max(min_size, budget))))
    return tuple(out)


def _maybe_per_head(draw, values):
    """``values`` is one value per head; collapse to a plain value when they agree or by chance."""
    if len(set(values)) == 1 or not draw(st.booleans()):
        return values[0]
    return md.per_head(list(values))


def _per_dim(draw, per_dim_values):
    """A tuple of per-dim values, or a single int when all dims agree (and by chance)."""
    if len(set(per_dim_values)) == 1 and draw(st.booleans()):
        return per_dim_values[0]
    return tuple(per_dim_values)


@st.composite
def neighborhoods(draw, shape, heads):
    if min(shape) < 2:
        return draw(windows(shape, heads))
    per_head_params = []
    for _ in range(heads if draw(st.booleans()) else 1):
        ks, ss, ds = [], [], []
        for L in shape:
            d = draw(st.integers(1, max(1, min(3, L // 2))))
            k = draw(st.integers(2, L // d))
            s = draw(st.integers(1, k))
            ks.append(k), ss.append(s), ds.append(d)
        per_head_params.append((tuple(ks), tuple(ss), tuple(ds)))
    while len(per_head_params) < heads:
        per_head_params.append(per_head_params[0])
    causal = tuple(draw(st.booleans()) for _ in shape)
    fields = []
    for i in range(3):  # kernel_size, stride, dilation: keep per_head lists whenever heads differ
        vals = [p[i][0] if len(set(p[i])) == 1 else p[i] for p in per_head_params]
        if len(set(vals)) > 1:
            fields.append(md.per_head([p[i] for p in per_head_params]))
        else:
            fields.append(_per_dim(draw, list(per_head_params[0][i])))
    k, s, d = fields
    c = causal if len(set(causal)) > 1 or draw(st.booleans()) else causal[0]
    return md.neighborhood(k, stride=s, dilation=d, causal=c)


@st.composite
def windows(draw, shape, heads):
    def one():
        return tuple(draw(st.integers(0, L)) for L in shape)
    left = [one() for _ in range(heads)] if draw(st.booleans()) else [one()] * heads
    right = left if draw(st.booleans()) else [one() for _ in range(heads)]
    return md.window(_maybe_per_head(draw, left), right=_maybe_per_head(draw, right))


@st.composite
def blocks(draw, shape, heads):
    sizes = [tuple(draw(st.integers(1, L)) for L in shape) for _ in range(heads)]
    if not draw(st.booleans()):
        return md.block(_maybe_per_head(draw, sizes))
    shifts = [tuple(draw(st.integers(0, b - 1)) for b in size) for size in sizes]
    if len(set(sizes)) == 1 and len(set(shifts)) == 1:
        return md.block(sizes[0], shift=shifts[0])
    return md.block(md.per_head(sizes), shift=md.per_head(shifts))


@st.composite
def causals(draw, shape, heads):
    if draw(st.booleans()):
        return md.causal()
    dims = draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    return md.causal(dims=tuple(dims))


@st.composite
def sinks(draw, shape, heads):
    n = math.prod(shape)
    return md.sink(_maybe_per_head(draw, [draw(st.integers(0, min(n, 8))) for _ in range(heads)]))


@st.composite
def documents(draw, shape, heads):
    n = math.prod(shape)
    cuts = sorted(draw(st.lists(st.integers(1, n), max_size=4)))
    ids, doc = [], 0
    for i in range(n):
        while cuts and cuts[0] == i:
            cuts.pop(0)
            doc += 1
        ids.append(doc)
    return md.document(ids)


@st.composite
def radials(draw, shape, heads):
    decay = _maybe_per_head(draw, [draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in range(heads)])
    mw = draw(st.sampled_from([1, 2, 4, 8, 128]))
    sf = draw(st.integers(0, min(2, shape[0])))
    return md.radial(decay=decay, min_window=mw, sink_frames=sf)


@st.composite
def powers(draw, shape, heads):
    return md.power(_maybe_per_head(draw, [draw(st.integers(1, 8)) for _ in range(heads)]))


def leaves(shape, heads):
    return st.one_of(
        neighborhoods(shape, heads), windows(shape, heads), radials(shape, heads),
        powers(shape, heads), blocks(shape, heads), causals(shape, heads), sinks(shape, heads),
        documents(shape, heads), st.just(md.full()), st.just(md.empty()),
    )


def patterns(shape, heads, max_leaves=5):
    def extend(children):
        pairs = st.tuples(children, children)
        return st.one_of(
            pairs.map(lambda t: t[0] & t[1]),
            pairs.map(lambda t: t[0] | t[1]),
            pairs.map(lambda t: t[0] & ~t[1]),
            st.lists(children, min_size=heads, max_size=heads).map(md.heads),
            children.map(lambda p: ~p),
        )
    return st.recursive(leaves(shape, heads), extend, max_leaves=max_leaves)


@st.composite
def cases(draw, max_tokens=144, max_heads=3):
    """(shape, heads, pattern) with the pattern valid for the shape."""
    shape = draw(shapes(max_tokens))
    heads = draw(st.integers(1, max_heads))
    return shape, heads, draw(patterns(shape, heads))


@st.composite
def literal_scores(draw, shape, heads):
    """Score terms without tensors (so they round-trip through repr and parse)."""
    def rate():
        return _maybe_per_head(draw, [draw(st.sampled_from([0.0, 0.05, 0.25, 1.5])) for _ in range(heads)])
    terms = draw(st.lists(st.sampled_from(["decay", "alibi", "softcap", "sink", "dropout"]),
                          min_size=1, max_size=4, unique=True))
    out = []
    for t in terms:
        if t == "decay":
            out.append(md.distance_decay(rate(), metric=draw(st.sampled_from(["euclidean", "manhattan", "chebyshev"]))))
        elif t == "alibi":
            out.append(md.alibi() if draw(st.booleans()) else md.alibi(rate()))
        elif t == "softcap":
            out.append(md.softcap(draw(st.sampled_from([1.0, 5.0, 30.0]))))
        elif t == "sink":
            out.append(md.sink_logit(rate()))
        else:
            out.append(md.dropout(draw(st.sampled_from([0.1, 0.5])), seed=draw(st.integers(0, 3))))
    return sum(out)


def relative_table(shape, heads, requires_grad=False, shared=False, radius=None):
    sizes = [2 * (L - 1 if radius is None else radius) + 1 for L in shape]
    t = torch.randn(*([] if shared else [heads]), *sizes, dtype=torch.float64) * 0.5
    return t.requires_grad_(requires_grad)


# --------------------------------------------------------------------------- production sizes
# The corners the 3-D decode bug and the tiling paths live in need the backends' own block sizes
# (64/128 tokens) on grids that straddle them: 3-D first, dilation with stride and per-dim
# causality, sizes that are not multiples of any tile.

@st.composite
def grid_shapes(draw, max_tokens=2400):
    rank = draw(st.sampled_from([1, 2, 3, 3]))
    if rank == 1:
        return (draw(st.integers(2, min(700, max_tokens))),)
    limits = {2: (48, 48), 3: (10, 16, 34)}[rank]
    out = []
    for i, lim in enumerate(limits):
        room = max_tokens // max(1, math.prod(out)) // max(1, 2 ** (rank - i - 1))
        out.append(draw(st.integers(2, max(2, min(lim, room)))))
    return tuple(out)


@st.composite
def gna(draw, shape, heads):
    """A NATTEN neighborhood with dilation, stride and per-dim causality on every dim."""
    ks, ss, ds, cs = [], [], [], []
    for L in shape:
        d = draw(st.integers(1, max(1, min(4, L // 2))))
        k = draw(st.integers(2, max(2, min(9, L // d))))
        ks.append(k), ss.append(draw(st.integers(1, k))), ds.append(d)
        cs.append(draw(st.booleans()))
    kernel = tuple(ks)
    if heads > 1 and draw(st.booleans()):   # a per-head kernel on the last dim
        alt = [max(2, min(kernel[-1] - i, shape[-1] // ds[-1])) for i in range(heads)]
        kernel = kernel[:-1] + (md.per_head(alt),)
        ss[-1] = 1
    return md.neighborhood(kernel, stride=tuple(ss), dilation=tuple(ds), causal=tuple(cs))


@st.composite
def grid_patterns(draw, shape, heads):
    base = draw(gna(shape, heads)) if min(shape) >= 2 else draw(windows(shape, heads))
    extra = draw(st.sampled_from(["none", "causal", "window", "sink", "not_block", "heads", "tree"]))
    if extra == "causal":
        return base & draw(causals(shape, heads))
    if extra == "window":
        return base & draw(windows(shape, heads))
    if extra == "sink":
        return base | draw(sinks(shape, heads))
    if extra == "not_block":
        return base & ~draw(blocks(shape, heads))
    if extra == "heads" and heads > 1:
        return md.heads([base] + [draw(gna(shape, heads)) for _ in range(heads - 1)])
    if extra == "tree":
        return base | draw(patterns(shape, heads, max_leaves=3))
    return base


@st.composite
def grid_cases(draw, max_tokens=2400, max_heads=3):
    """(shape, heads, pattern) at production sizes."""
    shape = draw(grid_shapes(max_tokens))
    heads = draw(st.integers(1, max_heads))
    return shape, heads, draw(grid_patterns(shape, heads))


@st.composite
def grid_scores(draw, shape, heads, learnable=True):
    """None, literal terms, or a relative_bias table (learnable or not) with other terms."""
    kind = draw(st.sampled_from(["none", "literal", "table"]))
    if kind == "none":
        return None
    lit = draw(literal_scores(shape, heads))
    lit = [t for t in md.dsl.score.score_terms(lit) if not isinstance(t, md.dsl.score.Dropout)]
    if kind == "table":
        radius = draw(st.integers(1, 4))
        lit.append(md.relative_bias(relative_table(shape, heads, requires_grad=learnable,
                                                   radius=radius).float().detach()
                                    .requires_grad_(learnable)))
    return sum(lit, 0) or None
