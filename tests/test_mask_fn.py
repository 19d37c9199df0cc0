"""``md.mask_fn``: a user-written mask_mod (flex's signature, flat row-major indices) as a DSL
leaf. The masks below are attention-gym's, written the way attention-gym writes them (closures
returned by ``generate_*`` functions, broadcast-safe tensor code) from their definitions, and
each is checked against the DSL's own primitive: through ``maskdsl.reference.mask``, through
the generated artefacts on row-major and tiled layouts, and through the dense, tiles and flex
backends (flex: CPU forward under no_grad; its compiles are slow, so its cases are few)."""
import gc
import warnings

import pytest
import torch

import maskdsl as md
from maskdsl import _caching
from maskdsl.codegen.blockmask import MASK_FN_MAX_PAIRS
from maskdsl.kernels.flex import run_flex
from maskdsl.codegen.program import Program
from maskdsl.codegen.recipe import CACHE_SIZE, cached_recipes, function_key
from maskdsl.kernels.tiles import run_tiles
from oracle import assert_close_by_rule, assert_matches_reference, inputs


# ----------------------------------------------------------------------------- the masks
# attention-gym's style: a mask_mod is ``mask_mod(b, h, q_idx, kv_idx)`` on flat indices,
# parameterised by a ``generate_*`` closure factory.

def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def generate_sliding_window(window_size):
    def sliding_window(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        in_window = q_idx - kv_idx <= window_size
        return causal & in_window
    return sliding_window


def generate_prefix_lm_mask(prefix_length):
    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)
    return prefix_lm


def generate_doc_mask_mod(inner_mask_mod, lengths):
    """Packed sequences: documents of the given lengths back to back; a pair is allowed iff both
    tokens are in the same document and the inner mask allows their *in-document* indices."""
    lengths = torch.as_tensor(lengths)
    doc_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])

    def doc_mask_mod(b, h, q_idx, kv_idx):
        same_doc = doc_id[q_idx] == doc_id[kv_idx]
        q_logical = q_idx - offsets[doc_id[q_idx]]
        kv_logical = kv_idx - offsets[doc_id[kv_idx]]
        return same_doc & inner_mask_mod(b, h, q_logical, kv_logical)
    return doc_mask_mod, doc_id


def generate_dilated_sliding_window(window_size, dilation):
    def dilated_sliding_window(b, h, q_idx, kv_idx):
        diff = torch.abs(q_idx - kv_idx)
        in_window = diff <= window_size * dilation
        is_dilated = (diff % dilation) == 0
        return in_window & is_dilated
    return dilated_sliding_window


def generate_natten(canvas_w, canvas_h, kernel_w, kernel_h):
    """NATTEN's neighborhood on a canvas_h x canvas_w image, on flat row-major indices: the
    window centre is clamped so that every query sees kernel_h x kernel_w keys."""
    def get_x_y(idx):
        return idx // canvas_w, idx % canvas_w

    def natten_mask_mod(b, h, q_idx, kv_idx):
        q_y, q_x = get_x_y(q_idx)
        kv_y, kv_x = get_x_y(kv_idx)
        center_x = q_x.clamp(kernel_w // 2, (canvas_w - 1) - kernel_w // 2)
        center_y = q_y.clamp(kernel_h // 2, (canvas_h - 1) - kernel_h // 2)
        hori = (center_x - kv_x).abs() <= kernel_w // 2
        vert = (center_y - kv_y).abs() <= kernel_h // 2
        return hori & vert

    def natten_key_range(q_idx):   # the rows the clamped window can reach, in flat indices
        center_y = (q_idx // canvas_w).clamp(kernel_h // 2, (canvas_h - 1) - kernel_h // 2)
        return (center_y - kernel_h // 2) * canvas_w, (center_y + kernel_h // 2 + 1) * canvas_w
    return natten_mask_mod, natten_key_range


W8 = 8
PREFIX = 10
LENGTHS = [13, 40, 7, 36]                      # 96 tokens in four documents
DOC_CAUSAL, DOC_ID = generate_doc_mask_mod(causal_mask, LENGTHS)
NATTEN, NATTEN_RANGE = generate_natten(37, 20, 7, 5)       # a 20 x 37 canvas, 5 x 7 kernel


def band(w):
    return lambda q: (q - w, q + 1)


# (name, mask_fn pattern, the DSL's equivalent, shape)
CASES = [
    ("causal", md.mask_fn(causal_mask), md.causal(), (96,)),
    ("causal+range", md.mask_fn(causal_mask, key_range=lambda q: (0, q + 1)), md.causal(), (96,)),
    ("sliding_window", md.mask_fn(generate_sliding_window(W8)), md.causal() & md.window(W8), (96,)),
    ("sliding_window+range", md.mask_fn(generate_sliding_window(W8), key_range=band(W8)),
     md.causal() & md.window(W8), (300,)),
    ("prefix_lm", md.mask_fn(generate_prefix_lm_mask(PREFIX)), md.sink(PREFIX) | md.causal(),
     (96,)),
    ("document_causal", md.mask_fn(DOC_CAUSAL, name="doc_causal"),
     md.document(DOC_ID) & md.causal(), (96,)),
    ("dilated_sliding_window", md.mask_fn(generate_dilated_sliding_window(4, 3)),
     md.neighborhood(32, dilation=3) & md.window(12), (96,)),
    ("natten_2d", md.mask_fn(NATTEN), md.neighborhood((5, 7)), (20, 37)),
    ("natten_2d+range", md.mask_fn(NATTEN, key_range=NATTEN_RANGE), md.neighborhood((5, 7)),
     (20, 37)),
]
IDS = [c[0] for c in CASES]


def test_the_equivalents_are_what_attention_gym_means():
    """The DSL equivalents against the definitions, token by token (so a mismatch below is the
    compiler's, not the table's): dilated window and the natten canvas read off by hand."""
    q, k = torch.arange(96)[:, None], torch.arange(96)[None, :]
    d = (q - k).abs()
    assert torch.equal(md.reference.mask(CASES[6][2], (96,))[0], (d <= 12) & (d % 3 == 0))
    m = md.reference.mask(md.neighborhood((5, 7)), (20, 37))[0]
    corner = m[0].reshape(20, 37)               # the corner query sees rows 0..4, columns 0..6
    assert corner[:5, :7].all() and corner.sum() == 35
    inner = m[10 * 37 + 18].reshape(20, 37)     # an inner one its centred 5 x 7 window
    assert inner[8:13, 15:22].all() and inner.sum() == 35


@pytest.mark.parametrize("name,p,dsl,shape", CASES, ids=IDS)
def test_reference_reads_mask_fn_as_the_primitive(name, p, dsl, shape):
    assert torch.equal(md.reference.mask(p, shape), md.reference.mask(dsl, shape))
    rows = torch.tensor([0, 5, len(md.reference.mask(dsl, shape)[0]) - 1])
    assert torch.equal(md.reference.mask(p, shape, rows=rows), md.reference.mask(dsl, shape, rows=rows))


@pytest.mark.parametrize("name,p,dsl,shape", CASES, ids=IDS)
def test_tile_classes_and_generated_mask_match_the_primitive(name, p, dsl, shape):
    """The classes are exact (fn evaluated on every undecided pair) and the generated mask_mod,
    evaluated on every position of the layout, is the reference mask in that layout."""
    prog = Program(p, None, shape, 1, block=16)
    _same_mask_in_layout(prog, md.reference.mask(dsl, shape)[0])
    row_major = Program(p, None, shape, 1, block=16, tile=None)      # flat 16-token blocks
    ref = Program(dsl, None, shape, 1, block=16, tile=None)
    assert row_major.layout.key == ref.layout.key
    assert (row_major.classes.dense() == ref.classes.dense()).all()


def _same_mask_in_layout(prog, truth):
    """The program's mask_mod over all layout positions == truth (user order) permuted."""
    tok = torch.from_numpy(prog.layout.tokens())
    pos = torch.arange(len(tok))
    mask_mod, _ = prog.mods("cpu")
    got = mask_mod(0, torch.zeros((), dtype=torch.long), pos[:, None], pos[None, :])
    got = got.expand(len(tok), len(tok))
    valid = tok >= 0
    want = torch.zeros_like(got)
    t = tok.clamp(min=0)
    want[:] = truth[t[:, None], t[None, :]] & valid[:, None] & valid[None, :]
    assert torch.equal(got, want)
    # the classes agree with the token mask: EMPTY iff no allowed pair, FULL iff every pair of
    # positions is allowed (a pair of tiles with padding is never FULL)
    V, T = prog.layout.block, prog.layout.n_tiles
    cnt = want.reshape(T, V, T, V).sum((1, 3))
    cls = torch.from_numpy(prog.classes.dense()[0]).long()
    assert torch.equal(cls == 0, cnt == 0)
    assert torch.equal(cls == 2, cnt == V * V)


@pytest.mark.parametrize("name,p,dsl,shape", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["dense", "tiles"])
def test_backends_run_mask_fn(name, p, dsl, shape, backend):
    n = torch.Size(shape).numel()
    attn = md.compile(p, shape, 2, backend=backend)
    q, k, v = inputs(1, 2, n, 8, grad=True)
    assert_matches_reference(attn, q, k, v)
    with torch.no_grad():
        out = attn(q, k, v)
        same = md.compile(dsl, shape, 2, backend=backend)(q, k, v)
    torch.testing.assert_close(out, same, atol=2e-6, rtol=1e-5)   # as the primitive computes it


# ----------------------------------------------------------------------------- composition

COMPOSED = [
    (md.mask_fn(causal_mask) & md.window(8), md.causal() & md.window(8), (96,)),
    (~md.mask_fn(generate_prefix_lm_mask(PREFIX)), ~(md.sink(PREFIX) | md.causal()), (96,)),
    (~md.mask_fn(causal_mask, key_range=lambda q: (0, q + 1)), ~md.causal(), (96,)),
    (md.mask_fn(DOC_CAUSAL) | md.sink(3), (md.document(DOC_ID) & md.causal()) | md.sink(3), (96,)),
    (md.mask_fn(NATTEN, key_range=NATTEN_RANGE) & md.causal(dims=(0,)),
     md.neighborhood((5, 7)) & md.causal(dims=(0,)), (20, 37)),
    (md.mask_fn(NATTEN) & md.window((1, 8)), md.neighborhood((5, 7)) & md.window((1, 8)),
     (20, 37)),
]


@pytest.mark.parametrize("p,dsl,shape", COMPOSED, ids=[repr(c[0]) for c in COMPOSED])
def test_composition(p, dsl, shape):
    truth = md.reference.mask(dsl, shape)
    assert torch.equal(md.reference.mask(p, shape), truth)
    _same_mask_in_layout(Program(p, None, shape, 1, block=16), truth[0])
    n = truth.shape[-1]
    q, k, v = inputs(1, 1, n, 8, grad=True, seed=1)
    assert_matches_reference(md.compile(p, shape, 1, backend="tiles"), q, k, v)


@pytest.mark.parametrize("tile", [(4, 8), (8, 8), (2, 32)])
def test_fn_receives_flat_user_indices_on_tiled_layouts(tile):
    """On a tiled, padded layout (20 x 37 in 4x8 / 8x8 / 2x32 tiles, positions far from user
    indices) the generated mods decode positions to flat row-major indices before calling fn:
    the mask in the layout, the tile classes, and tiles attention all match the reference."""
    shape = (20, 37)
    for p, dsl in ((md.mask_fn(NATTEN), md.neighborhood((5, 7))),
                   (md.mask_fn(NATTEN, key_range=NATTEN_RANGE) & md.window((2, 3)),
                    md.neighborhood((5, 7)) & md.window((2, 3)))):
        prog = Program(p, None, shape, 1, block=tile[0] * tile[1], tile=tile)
        assert not prog.layout.identity and prog.layout.pads
        _same_mask_in_layout(prog, md.reference.mask(dsl, shape)[0])
    q, k, v = inputs(1, 1, 740, 8, seed=2)
    want = md.reference.attention(q.double(), k.double(), v.double(), md.neighborhood((5, 7)),
                                  shape)
    out = run_tiles(Program(md.mask_fn(NATTEN), None, shape, 1, block=64, tile=(8, 8)), q, k, v,
                    8 ** -0.5)
    assert_close_by_rule(out, want, md.reference.attention(q, k, v, md.neighborhood((5, 7)), shape),
                         "tiles on an 8x8 tiled layout")


def test_head_and_batch_arguments():
    """h is the head (a head-dependent fn is a per_head pattern on every backend); b is 0."""
    per_head = md.mask_fn(lambda b, h, q, kv: (q - kv).abs() <= h + 1, name="by_head")
    assert torch.equal(md.reference.mask(per_head, (40,), 3),
                       md.reference.mask(md.window(md.per_head([1, 2, 3])), (40,), 3))
    q, k, v = inputs(2, 3, 40, 8, grad=True, seed=3)
    for backend in ("dense", "tiles"):
        assert_matches_reference(md.compile(per_head, (40,), 3, backend=backend), q, k, v)
    seen = []

    def batch_zero(b, h, q_idx, kv_idx):
        seen.append(int(torch.as_tensor(b).max()))
        return (kv_idx <= q_idx) & (b == 0)
    p = md.mask_fn(batch_zero)
    assert torch.equal(md.reference.mask(p, (40,)), md.reference.mask(md.causal(), (40,)))
    assert_matches_reference(md.compile(p, (40,), 3, backend="tiles"), q, k, v)
    assert seen and set(seen) == {0}


# ----------------------------------------------------------------------------- flex (slow)

def test_flex_forward_on_cpu():
    """Flex's CPU forward under torch.compile with user functions inside the generated
    mask_mod: a captured-ids document mask composed with ~, and the 2-D natten fn with its
    key_range on a tiled, padded layout (flat indices decoded from tile positions)."""
    with torch.no_grad():
        p = ~md.mask_fn(DOC_CAUSAL, name="doc_causal") & md.window(20)
        attn = md.compile(p, (96,), 2, backend="flex")
        q, k, v = inputs(1, 2, 96, 16, seed=4)
        assert_matches_reference(attn, q, k, v, grads=False)
        dsl = ~(md.document(DOC_ID) & md.causal()) & md.window(20)
        assert_close_by_rule(attn(q, k, v), md.reference.attention(q.double(), k.double(),
                                                                   v.double(), dsl, (96,)),
                             md.reference.attention(q, k, v, dsl, (96,)), "flex doc mask")
        shape = (20, 37)
        prog = Program(md.mask_fn(NATTEN, key_range=NATTEN_RANGE), None, shape, 1, block=64,
                       tile=(8, 8))
        assert not prog.layout.identity
        q, k, v = inputs(1, 1, 740, 16, seed=5)
        out = run_flex(prog, q, k, v, 16 ** -0.5)
        dsl = md.neighborhood((5, 7))
        assert_close_by_rule(out, md.reference.attention(q.double(), k.double(), v.double(), dsl,
                                                         shape),
                             md.reference.attention(q, k, v, dsl, shape), "flex natten tiled")


# ----------------------------------------------------------------------------- dispatch

def test_triton_refuses_and_auto_picks_another():
    p = md.mask_fn(causal_mask) & md.window(4)
    with pytest.raises(md.MaskDSLError, match=r"backend='triton': the Triton kernel cannot call "
                                              r"Python, and mask_fn\(name='causal_mask'\) is a "
                                              r"Python function"):
        md.compile(p, (300,), backend="triton")
    cuda = md.compile(p, (300,), device="cuda")          # auto's choice for CUDA (no GPU needed)
    assert cuda.backend == "flex" and "not triton: the Triton kernel cannot call Python" in cuda.reason
    assert md.compile(p, (300,)).backend == "tiles"


def test_parser_refuses_mask_fn():
    for text in ("mask_fn(1)", "mask_fn('lambda b, h, q, k: q >= k')", "window(2) & mask_fn",
                 "~mask_fn(name='causal')"):
        with pytest.raises(md.MaskDSLError, match="code is never parsed from text"):
            md.parse(text)
    p = md.mask_fn(causal_mask)
    assert repr(p) == "mask_fn(name='causal_mask')"
    with pytest.raises(md.MaskDSLError, match="code is never parsed from text"):
        md.parse(repr(p))
    assert "mask_fn" in md.__all__ and md.mask_fn is md.dsl.node.DSL_NAMES["mask_fn"]


# ----------------------------------------------------------------------------- identity, caches

def test_equality_and_cache_keys_are_by_function():
    f1, f2 = generate_sliding_window(2), generate_sliding_window(5)   # same code, other closure
    assert f1.__code__ is f2.__code__
    assert md.mask_fn(f1) == md.mask_fn(f1) and md.mask_fn(f1) != md.mask_fn(f2)
    assert md.mask_fn(f1) & md.mask_fn(f1) != md.mask_fn(f1)           # structure as written
    assert function_key(f1) == function_key(f1) != function_key(f2)
    q, k, v = inputs(1, 1, 64, 8, seed=6)
    for f, w in ((f1, 2), (f2, 5)):                     # each compiles its own structure
        attn = md.compile(md.mask_fn(f), (64,), backend="tiles")
        want = md.reference.attention(q, k, v, md.causal() & md.window(w), (64,))
        assert torch.allclose(attn(q, k, v), want, atol=1e-5)
    a = Program(md.mask_fn(f1), None, (64,), 1).recipe
    assert Program(md.mask_fn(f1, name="sliding_window"), None, (64,), 1).recipe is a
    assert Program(md.mask_fn(f2), None, (64,), 1).recipe is not a


def test_dead_functions_never_lend_their_key_and_caches_stay_bounded():
    keys = set()
    before = len(_caching._SERIALS)
    for i in range(40):                        # fresh lambdas, dropped at once: ids get reused
        keys.add(function_key(lambda b, h, q, kv, i=i: q - kv <= i))
    gc.collect()
    assert len(keys) == 40                       # never a shared key, even at a reused address
    assert len(_caching._SERIALS) <= before + 1   # the serial table forgets dead functions
    for w in range(CACHE_SIZE + 4):              # a new mask_fn every step: bounded recipes
        Program(md.mask_fn(generate_sliding_window(w)), None, (32,), 1, block=16)
    assert cached_recipes() <= CACHE_SIZE


# ----------------------------------------------------------------------------- bad input

def test_bad_fields_name_themselves():
    with pytest.raises(md.MaskDSLError, match=r"mask_fn: fn=3: expected a callable"):
        md.mask_fn(3)
    with pytest.raises(md.MaskDSLError, match=r"mask_fn: fn=window\(2\): expected a callable"):
        md.mask_fn(md.window(2))
    with pytest.raises(md.MaskDSLError, match=r"mask_fn: name=7: expected a non-empty string"):
        md.mask_fn(causal_mask, name=7)
    with pytest.raises(md.MaskDSLError, match=r"mask_fn: key_range=\(0, 4\): expected None or a "
                                              r"callable"):
        md.mask_fn(causal_mask, key_range=(0, 4))


@pytest.mark.parametrize("fn,match", [
    (lambda b, h, q, kv: (q >= kv).long(), r"fn returned a torch.int64 tensor .*expected a bool"),
    (lambda b, h, q, kv: True, r"fn returned bool True .*expected a bool tensor"),
    (lambda b, h, q, kv: torch.ones(3, 4, 5, dtype=torch.bool), r"fn returned shape \[3, 4, 5\]"),
    (lambda b, h, q, kv: (q >= kv).reshape(-1), r"fn returned shape \[20\]"),
    # a mask returned transposed ([kv, q]): the first call has one query fewer than keys
    (lambda b, h, q, kv: (q >= kv).mT, r"fn returned shape \[5, 4\] .*broadcastable to \[4, 5\]"),
    (lambda b, h, q, kv: q.item() >= 0, r"fn raised RuntimeError: .*broadcast-safe"),
])
def test_bad_results_are_refused_when_first_evaluated(fn, match):
    p = md.mask_fn(fn, name="bad")
    with pytest.raises(md.MaskDSLError, match=r"mask_fn\(name='bad'\): " + match):
        md.compile(p, (16,), backend="tiles")
    with pytest.raises(md.MaskDSLError, match=match):
        md.reference.mask(p, (16,))


def test_bad_key_ranges_are_refused():
    bad = [(lambda q: q, r"key_range returned tensor"),
           (lambda q: (0.0, 4.0), r"key_range returned \(0.0, 4.0\)"),
           (lambda q: (q, q[:2]), r"key_range returned"),
           (lambda q: 1 / 0, r"key_range raised ZeroDivisionError")]
    for key_range, match in bad:
        with pytest.raises(md.MaskDSLError, match=match):
            md.compile(md.mask_fn(causal_mask, key_range=key_range), (16,), backend="tiles")
    # a range that is not a superset of fn's keys: caught where fn is evaluated (the reference
    # everywhere, codegen on every pair it evaluates), never silently dropped
    narrow = md.mask_fn(causal_mask, key_range=lambda q: (q, q + 1), name="narrow")
    with pytest.raises(md.MaskDSLError, match=r"key_range is not a superset of fn's keys"):
        md.reference.mask(narrow, (64,))
    with pytest.raises(md.MaskDSLError, match=r"key_range is not a superset of fn's keys"):
        Program(narrow, None, (64,), 1, block=16)


def _sink_after_512(b, h, q, k):          # a local band, plus the first 128 keys from query 512 on
    return ((k <= q) & (k >= q - 3)) | ((q >= 512) & (k < 128))


@pytest.mark.parametrize("backend", ["tiles", "auto", "flex", "dense"])
def test_a_too_narrow_key_range_is_an_error_on_every_backend(backend):
    """Issue 21, finding 1: tile pairs outside every query tile's hull were marked EMPTY and
    never evaluated, so a range that leaves out the far keys dropped them without a word (error
    1.5 against the reference). The skipped pairs are now checked (exactly at 1024 tokens)."""
    p = md.mask_fn(_sink_after_512, name="fn",
                   key_range=lambda q: (torch.clamp(q - 3, min=0), q + 1))
    q = k = v = torch.randn(1, 1, 1024, 8)
    with pytest.raises(md.MaskDSLError, match=r"mask_fn\(name='fn', key_range=<lambda>\): "
                       r"key_range is not a superset of fn's keys: fn allows query 512 -> key 0 "
                       r"(\(head 0\) )?but key_range gives \[509, 513\); widen key_range"):
        md.compile(p, (1024,), 1, backend=backend)(q, k, v)


@pytest.mark.parametrize("backend", ["tiles", "dense"])
def test_key_range_with_lo_above_hi_is_an_error(backend):
    """Issue 21, finding 1: lo > hi gave all-zero outputs and no error."""
    p = md.mask_fn(causal_mask, name="inverted", key_range=lambda q: (q + 1, q * 0))
    q = k = v = torch.randn(1, 1, 64, 8)
    with pytest.raises(md.MaskDSLError, match=r"mask_fn\(name='inverted', key_range=<lambda>\): "
                       r"key_range gives lo=1 > hi=0 for query 0; expected lo <= hi"):
        md.compile(p, (64,), 1, backend=backend)(q, k, v)


def test_beyond_exact_checking_the_keys_next_to_each_range_are_checked(monkeypatch):
    """Past KEY_RANGE_EXACT_PAIRS the check evaluates fn on the key just outside each query's
    range (where an off-by-one lives) and a seeded sample: a range one key short at one query
    only is found; a range that is right passes, and fn is evaluated on O(n) pairs, not n^2."""
    from maskdsl.codegen import blockmask

    monkeypatch.setattr(blockmask, "KEY_RANGE_EXACT_PAIRS", 64 * 64)
    n = 256                                        # 65,536 pairs > the lowered exact budget

    def band(b, h, q, k):
        return (k <= q) & (k >= q - 3)
    calls = []

    def counted(b, h, q, k):
        calls.append(int(torch.broadcast_shapes(q.shape, k.shape).numel()))
        return band(b, h, q, k)
    ok = md.mask_fn(counted, name="ok", key_range=lambda q: (torch.clamp(q - 3, min=0), q + 1))
    leaf = blockmask_leaf(ok, n)              # builds the Program: probe, check, refinement
    calls.clear()
    blockmask._KEY_RANGE_CHECKED.clear()
    blockmask.check_key_range(leaf)
    assert 0 < sum(calls) <= 2 * n + blockmask.KEY_RANGE_SAMPLE
    calls.clear()
    blockmask.check_key_range(leaf)           # once per function, range, head and grid size
    assert calls == []
    short_at_100 = md.mask_fn(band, name="short", key_range=lambda q: (
        torch.clamp(q - 3, min=0) + (q == 100).long(), q + 1))
    with pytest.raises(md.MaskDSLError, match=r"fn allows query 100 -> key 97 but key_range "
                                              r"gives \[98, 101\)"):
        md.compile(short_at_100, (n,), 1, backend="tiles")(*torch.randn(3, 1, 1, n, 8))


def blockmask_leaf(p, n):
    """The FnFlat IR leaf of a mask_fn pattern on an n-token grid (head 0)."""
    from maskdsl.codegen.blockmask import _fn_leaves

    prog = Program(p, None, (n,), 1, block=16)
    return _fn_leaves(prog.recipe.irs[0][0])[0]


def test_quadratic_classification_is_refused_without_key_range():
    n = 20000                                             # N^2 = 4e8 > 2**28
    assert n * n > MASK_FN_MAX_PAIRS
    with pytest.raises(md.MaskDSLError, match=r"mask_fn\(name='sliding_window'\): classifying its "
                                              r"tiles would evaluate .*pass key_range="):
        Program(md.mask_fn(generate_sliding_window(64)), None, (n,), 1)
    prog = Program(md.mask_fn(generate_sliding_window(64), key_range=band(64)), None, (n,), 1)
    assert prog.classes.nonempty() <= 2 * prog.layout.n_tiles
    rows = torch.tensor([0, 63, 64, 9999, n - 1])
    mask_mod, _ = prog.mods("cpu")
    got = mask_mod(0, 0, rows[:, None], torch.arange(n)[None, :])
    assert torch.equal(got, md.reference.mask(md.causal() & md.window(64), (n,), rows=rows)[0])


# ----------------------------------------------------------------------------- score_fn

def _softcap20(score, b, h, q_idx, kv_idx):           # attention-gym's tanh soft-capping
    return 20.0 * torch.tanh(score / 20.0)


def _alibi_heads(score, b, h, q_idx, kv_idx):          # ALiBi with slope (h + 1) / 16
    return score - (h + 1) * 0.0625 * (q_idx - kv_idx).abs()


def _relative(score, b, h, q_idx, kv_idx):             # attention-gym's relative position bias
    return score + 0.01 * (q_idx - kv_idx)


SCORE_PORTS = [(_softcap20, md.softcap(20.0)), (_alibi_heads, md.alibi(md.per_head([0.0625, 0.125])))]


@pytest.mark.parametrize("backend", ["dense", "tiles"])
@pytest.mark.parametrize("fn,twin", SCORE_PORTS, ids=["softcap", "alibi"])
def test_score_fn_ports_match_their_dsl_twins(fn, twin, backend):
    p, shape = md.neighborhood((5, 7)) | md.sink(2), (20, 37)     # tiles permutes this grid
    q, k, v = (torch.randn(1, 2, 740, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    got = md.compile(p, shape, 2, score=md.score_fn(fn) + md.distance_decay(0.1), backend=backend)
    want = md.reference.attention(q, k, v, p, shape, score=twin + md.distance_decay(0.1))
    out = got(q, k, v)
    torch.testing.assert_close(out, want)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_score_fn_runs_after_the_additive_terms_and_before_softcap():
    p, shape = md.window(4), (40,)
    s = md.distance_decay(0.3) + md.score_fn(lambda sc, b, h, q, k: 2.0 * sc, name="double") \
        + md.softcap(3.0)
    q, k, v = (torch.randn(1, 1, 40, 8, dtype=torch.float64) for _ in range(3))
    idx = torch.arange(40)
    d = (idx[:, None] - idx[None, :]).abs().double()
    logits = 3.0 * torch.tanh(2.0 * ((q[0, 0] @ k[0, 0].T) / 8 ** 0.5 - 0.3 * d) / 3.0)
    logits = logits.masked_fill(d > 4, float("-inf"))
    want = torch.softmax(logits, -1) @ v[0, 0]
    torch.testing.assert_close(md.reference.attention(q, k, v, p, shape, score=s)[0, 0], want)
    torch.testing.assert_close(md.compile(p, shape, score=s, backend="tiles")(q, k, v)[0, 0], want)


def test_score_fn_learnable_capture_gets_its_gradient_on_tiles():
    w = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    s = md.score_fn(lambda sc, b, h, q, k: sc - w * (q - k).abs(), name="learned_decay")
    p, shape = md.causal() & md.window(16), (200,)
    q, k, v = (torch.randn(1, 1, 200, 8, dtype=torch.float64) for _ in range(3))
    out = md.compile(p, shape, score=s, backend="tiles")(q, k, v)
    (g,) = torch.autograd.grad(out.square().sum(), w)
    (want,) = torch.autograd.grad(md.reference.attention(q, k, v, p, shape, score=s).square().sum(), w)
    torch.testing.assert_close(g, want)


def test_score_fn_on_flex_and_in_the_row_major_score_mod():
    from torch.nn.attention.flex_attention import flex_attention

    p, shape = md.neighborhood((5, 5)), (16, 24)
    s = md.score_fn(_relative) + md.alibi()
    q, k, v = (torch.randn(1, 2, 384, 16) for _ in range(3))
    want = md.reference.attention(q.double(), k.double(), v.double(), p, shape, score=s)
    attn = md.compile(p, shape, 2, score=s, backend="flex")
    with torch.no_grad():
        assert (attn(q, k, v).double() - want).abs().max() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention(q, k, v, score_mod=attn.score_mod, block_mask=attn.block_mask())
    assert (out.double() - want).abs().max() < 1e-5


def test_score_fn_bad_input_and_where_it_cannot_run():
    with pytest.raises(md.MaskDSLError, match=r"score_fn: fn=5: expected a callable"):
        md.score_fn(5)
    with pytest.raises(md.MaskDSLError, match="returned a torch.bool tensor"):
        md.compile(md.window(3), (64,), score=md.score_fn(lambda sc, b, h, q, k: sc > 0))
    with pytest.raises(md.MaskDSLError, match="fn raised ZeroDivisionError"):
        md.compile(md.window(3), (64,), score=md.score_fn(lambda sc, b, h, q, k: 1 / 0))
    with pytest.raises(md.MaskDSLError, match="code is never parsed from text"):
        md.parse("score_fn(3)")
    with pytest.raises(md.MaskDSLError, match="Triton kernel cannot call Python"):
        md.compile(md.window(3), (64,), score=md.score_fn(_softcap20), backend="triton")


def test_generated_functions_are_named_after_the_users_function():
    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < 4)

    attn = md.compile(md.mask_fn(prefix_lm) & md.window(8), (64,))
    assert attn.mask_mod.__name__ == "mask_fn_prefix_lm__and__window_8"
    named = md.compile(md.mask_fn(lambda b, h, q, k: k <= q, name="my causal!"), (64,))
    assert named.mask_mod.__name__ == "mask_fn_my_causal"
