"""Every bad spec and bad input raises MaskDSLError naming the field, the value and the legal
range. One table; each row pinned to its message with ``match=``."""

import pytest
import torch

import maskdsl as md

T = torch.randn(1, 2, 16, 8)

# (what, callable, regex the message must match)
CASES = [
    # --- pattern construction
    ("kernel 1", lambda: md.neighborhood(1), r"neighborhood: kernel_size=1 is out of range: expected an int in \[2, 2\*\*31 - 1\]"),
    ("kernel per-dim 0", lambda: md.neighborhood((3, 0)), r"kernel_size\[1\]=0 is out of range: expected an int in \[2, 2\*\*31 - 1\]"),
    ("kernel float", lambda: md.neighborhood(2.5), r"kernel_size=2.5: expected an int in \[2, 2\*\*31 - 1\]"),
    ("kernel bool", lambda: md.neighborhood(True), r"kernel_size=True: expected an int in \[2, 2\*\*31 - 1\]"),
    ("kernel str", lambda: md.neighborhood("7"), r"kernel_size='7': expected an int in \[2, 2\*\*31 - 1\]"),
    ("kernel 4 dims", lambda: md.neighborhood((3, 3, 3, 3)), r"kernel_size=\(3, 3, 3, 3\): expected one entry per grid dimension \(1 to 3"),
    ("stride 0", lambda: md.neighborhood(3, stride=0), r"stride=0 is out of range: expected an int in \[1, 2\*\*31 - 1\]"),
    ("stride > kernel", lambda: md.neighborhood((7, 3), stride=(2, 5)), r"stride\[1\]=5 exceeds kernel_size\[1\]=3; expected 1 <= stride <= kernel_size"),
    ("dilation 0", lambda: md.neighborhood(3, dilation=0), r"dilation=0 is out of range: expected an int in \[1, 2\*\*31 - 1\]"),
    ("dims disagree", lambda: md.neighborhood((3, 3), dilation=(1, 2, 1)), r"disagree on the number of dimensions: kernel_size has 2, dilation has 3"),
    ("causal int", lambda: md.neighborhood(3, causal=1), r"causal=1: expected a bool or one bool per dimension"),
    ("causal length", lambda: md.neighborhood((3, 3), causal=(True,)), r"causal=\(True,\) has 1 entries but kernel_size/stride/dilation name 2"),
    ("bare list", lambda: md.sink([3, 5]), r"sink: n=\[3, 5\]: a list is ambiguous here; write per_head\(\[3, 5\]\)"),
    ("per_head empty", lambda: md.per_head([]), r"per_head: values=\[\]: expected a non-empty list"),
    ("per_head nested", lambda: md.per_head([md.per_head([1])]), r"per_head lists cannot be nested"),
    ("per_head lengths", lambda: md.neighborhood(md.per_head([3, 5]), dilation=md.per_head([1, 1, 2])), r"per_head lists must all have the same length; kernel_size has 2, dilation has 3"),
    ("per_head bad value", lambda: md.window(md.per_head([4, -1])), r"left\[head 1\]=-1 is out of range: expected an int in \[0, 2\*\*31 - 1\]"),
    ("per_head tuple str", lambda: md.per_head([(3, "a")]), r"per_head: values\[0\]=\(3, 'a'\): expected a number or a tuple of numbers"),
    ("per_head not per-dim", lambda: md.softcap(md.per_head([(1.0, 2.0)])), r"softcap: cap=per_head\(\[\(1.0, 2.0\)\]\): per_head values must be numbers, got \(1.0, 2.0\)"),
    ("seed per head", lambda: md.dropout(0.1, seed=md.per_head([1, 2])), r"dropout: seed=per_head\(\[1, 2\]\): this parameter cannot vary per head"),
    ("tuple not per-dim", lambda: md.sink((1, 2)), r"sink: n=\(1, 2\): expected a single value, an int in \[0, 2\*\*31 - 1\]"),
    ("window fraction", lambda: md.window(3.5), r"window: left=3.5: expected an int in \[0, 2\*\*31 - 1\]"),
    ("window negative", lambda: md.window(-1), r"window: left=-1 is out of range: expected an int in \[0, 2\*\*31 - 1\]"),
    ("block 0", lambda: md.block(0), r"block: size=0 is out of range: expected an int in \[1, 2\*\*31 - 1\]"),
    ("sink negative", lambda: md.sink(-2), r"sink: n=-2 is out of range: expected an int in \[0, 2\*\*31 - 1\]"),
    ("causal dims", lambda: md.causal(dims=(0, 0)), r"causal: dims=\(0, 0\): expected a tuple of distinct dimension indices"),
    ("radial decay", lambda: md.radial(decay=-1.0), r"radial: decay=-1.0 is out of range: expected a number in \[0, 3.4e38\]"),
    ("radial min_window", lambda: md.radial(min_window=0), r"radial: min_window=0 is out of range: expected a number in \(0, 3.4e38\]"),
    ("radial inf", lambda: md.radial(decay=float("inf")), r"decay=inf: expected a finite number"),
    ("power block", lambda: md.power(0), r"power: block=0 is out of range: expected an int in \[1, 2\*\*31 - 1\]"),
    ("document floats", lambda: md.document([0.5, 1]), r"document: ids=\[0.5, 1\]: expected a non-empty list of ints"),
    ("document float tensor", lambda: md.document(torch.zeros(4)), r"document: ids: expected a 1-D integer tensor, got dtype torch.float32"),
    ("heads empty", lambda: md.heads([]), r"heads: patterns=\(\): expected a non-empty list of patterns"),
    ("heads non-pattern", lambda: md.heads([md.window(1), 3]), r"heads: patterns\[1\]=3: expected a pattern"),
    ("and with score", lambda: md.window(1) & md.softcap(2.0), r"& combines patterns, got the score term softcap\(2.0\)"),
    ("and with int", lambda: md.window(1) & 3, r"& expects a pattern on both sides, got 3"),
    ("plus patterns", lambda: md.window(1) + md.window(2), r"\+ combines score terms, got the pattern window\(1\)"),
    # --- score construction
    ("softcap 0", lambda: md.softcap(0.0), r"softcap: cap=0.0 is out of range: expected a number in \(0, 3.4e38\]"),
    ("dropout 1", lambda: md.dropout(1.0), r"dropout: p=1.0 is out of range: expected a probability in \[0, 1\)"),
    ("dropout seed", lambda: md.dropout(0.1, seed=-1), r"dropout: seed=-1 is out of range"),
    ("metric", lambda: md.distance_decay(0.1, metric="cosine"), r"metric='cosine': expected one of 'euclidean', 'manhattan', 'chebyshev'"),
    ("alibi slopes", lambda: md.alibi("linear"), r"alibi: slopes='linear': expected 'geometric'"),
    ("rate nan", lambda: md.distance_decay(float("nan")), r"rate=nan: expected a finite number"),
    ("relative_bias list", lambda: md.relative_bias([[0.0]]), r"relative_bias: table=\[\[0.0\]\]: expected a floating-point tensor"),
    ("two softcaps", lambda: md.softcap(1.0) + md.softcap(2.0), r"softcap appears twice"),
    ("rate tensor int", lambda: md.distance_decay(torch.tensor([1, 2])), r"distance_decay: rate: expected a floating-point tensor, got dtype torch.int64"),
    # --- against a shape (compile / reference)
    ("kernel > shape", lambda: md.compile(md.neighborhood((7, 9)), (16, 8)), r"neighborhood: kernel_size\[1\]=9 needs shape\[1\] >= 9, got 8"),
    ("kernel*dilation > shape", lambda: md.compile(md.neighborhood((7, 9), dilation=(1, 2)), (16, 16)), r"kernel_size\[1\]=9 with dilation 2 needs shape\[1\] >= 18, got 16"),
    ("per-head kernel > shape", lambda: md.compile(md.neighborhood(md.per_head([3, 9])), (8,), heads=2), r"kernel_size\[0\]=9 needs shape\[0\] >= 9, got 8 \(head 1\)"),
    ("per_head wrong length", lambda: md.compile(md.window(md.per_head([1, 2, 3])), (8,), heads=4), r"window: left=per_head\(\[1, 2, 3\]\) has 3 values but heads=4; give one value per head"),
    ("heads wrong length", lambda: md.compile(md.heads([md.window(1), md.full()]), (8,), heads=3), r"heads: got 2 patterns but heads=3"),
    ("rank mismatch", lambda: md.compile(md.neighborhood((3, 3)), (8,)), r"kernel_size=\(3, 3\) has 2 entries but the shape has 1 dimension"),
    ("causal dim out of range", lambda: md.compile(md.causal(dims=(2,)), (4, 4)), r"causal: dims=\(2,\) names dim 2 but the shape \(4, 4\) has dims 0..1"),
    ("block > shape", lambda: md.compile(md.block(16), (8,)), r"block: size\[0\]=16 exceeds shape\[0\]=8"),
    ("sink > tokens", lambda: md.compile(md.sink(20), (4, 4)), r"sink: n=20 exceeds the 16 tokens of shape \(4, 4\)"),
    ("document length", lambda: md.compile(md.document([0, 1]), (4,)), r"document: ids has 2 entries but shape \(4,\) has 4 tokens"),
    ("radial sink frames", lambda: md.compile(md.radial(sink_frames=5), (4, 2)), r"radial: sink_frames=5 exceeds the 4 frames"),
    ("shape zero", lambda: md.compile(md.full(), (0, 4)), r"shape\[0\]=0: expected a positive int"),
    ("shape 4-D", lambda: md.compile(md.full(), (2, 2, 2, 2)), r"shape=\(2, 2, 2, 2\): expected a tuple of 1 to 3 positive ints"),
    ("heads 0", lambda: md.compile(md.full(), (4,), heads=0), r"heads=0: expected a positive int"),
    ("pattern is a score", lambda: md.compile(md.softcap(1.0), (4,)), r"pattern: expected a pattern such as neighborhood\(7\), got softcap\(1.0\) \(score terms go in score=...\)"),
    ("score is a pattern", lambda: md.compile(md.full(), (4,), score=md.window(1)), r"score: expected score terms"),
    ("backend", lambda: md.compile(md.full(), (4,), backend="cuda"), r"backend='cuda': expected one of 'auto', 'dense'"),
    ("table heads", lambda: md.compile(md.full(), (4, 4), heads=2, score=md.relative_bias(torch.zeros(3, 7, 7))), r"relative_bias: table has shape \[3, 7, 7\]: its first dim is 3 but heads=2"),
    ("table even", lambda: md.compile(md.full(), (4, 4), score=md.relative_bias(torch.zeros(7, 6))), r"relative_bias: table size 6 on grid dim 1 is even; expected an odd size 2\*R\+1 \(e.g. 7"),
    ("rate tensor heads", lambda: md.compile(md.full(), (4,), heads=2, score=md.distance_decay(torch.zeros(3))), r"distance_decay: rate is a tensor of shape \[3\]; expected shape \[\] or \[2\]"),
    # --- tensors at call time
    ("q not tensor", lambda: md.compile(md.full(), (4, 4), 2)([1], T, T), r"q: expected a torch.Tensor \[B, H, N, D\], got list"),
    ("q 3-D", lambda: md.compile(md.full(), (4, 4), 2)(T[0], T, T), r"q: expected a 4-D tensor \[B, H, N, D\], got shape \[2, 16, 8\]"),
    ("wrong N", lambda: md.compile(md.full(), (4, 5), 2)(T, T, T), r"q: shape \[1, 2, 16, 8\] has N=16 tokens but shape \(4, 5\) has 20"),
    ("wrong heads", lambda: md.compile(md.full(), (4, 4), 4)(T, T, T), r"q: shape \[1, 2, 16, 8\] has H=2 heads but the pattern was compiled for heads=4"),
    ("int dtype", lambda: md.compile(md.full(), (4, 4), 2)(T.long(), T.long(), T.long()), r"q: dtype torch.int64 is not supported; expected one of float16, bfloat16, float32, float64"),
    ("mixed dtypes", lambda: md.compile(md.full(), (4, 4), 2)(T, T.double(), T), r"q, k, v: dtypes differ \(torch.float32, torch.float64, torch.float32\)"),
    ("k shape", lambda: md.compile(md.full(), (4, 4), 2)(T, T[..., :4], T), r"k: shape \[1, 2, 16, 4\] differs from q's \[1, 2, 16, 8\]"),
    ("v batch", lambda: md.compile(md.full(), (4, 4), 2)(T, T, torch.cat([T, T])), r"v: shape \[2, 2, 16, 8\] differs from k's \[1, 2, 16, 8\] in \[B, H_kv, N\]"),
    ("scale nan", lambda: md.compile(md.full(), (4, 4), 2)(T, T, T, scale=float("nan")), r"scale=nan: expected a finite number"),
    ("keep shape", lambda: md.reference.attention(T, T, T, md.full(), (4, 4), score=md.dropout(0.1), dropout_keep=torch.ones(3, dtype=torch.bool)), r"dropout_keep: expected a bool tensor of shape \[1, 2, 16, 16\]"),
    # --- parser
    ("parse syntax", lambda: md.parse("neighborhood(7"), r"parse: invalid syntax"),
    ("parse unknown", lambda: md.parse("os.system('x')"), r"parse: only DSL constructors can be called"),
    ("parse name", lambda: md.parse("neighborhood(k)"), r"parse: unknown name 'k'"),
    ("parse kwarg", lambda: md.parse("window(3, up=2)"), r"window\(\): unknown keyword argument 'up'; it takes window\(left, right=None\)"),
    ("parse and", lambda: md.parse("full() and empty()"), r"'and'/'or' \(use & and \|\)"),
    ("parse number", lambda: md.parse("3"), r"parse: '3' is a number, not a pattern or score"),
    ("parse empty", lambda: md.parse("   "), r"parse: empty spec"),
    ("parse uncalled", lambda: md.parse("full & empty()"), r"full must be called"),
]


def test_table_rows_are_distinct():
    """Every row is a different input (a duplicated id would hide a row from the report)."""
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({c[2] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("what,fn,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_with_its_message(what, fn, message):
    with pytest.raises(md.MaskDSLError, match=message):
        fn()


def test_near_misses_are_normalised_not_refused():
    """What is unambiguous is accepted in its normal form: an integral float for an int, an
    int or a list for dims, a list inside per_head, an existing per_head list."""
    assert md.window(3.0) == md.window(3)
    assert md.causal(dims=0) == md.causal(dims=[0]) == md.causal(dims=(0,))
    assert md.per_head([[3, 3], [5, 5]]) == md.per_head([(3, 3), (5, 5)])
    ph = md.per_head([1, 2])
    assert md.per_head(ph) is ph


def test_error_is_a_value_error():
    assert issubclass(md.MaskDSLError, ValueError)


def test_learnable_parameter_on_another_device_is_an_error():
    meta = torch.zeros(2, device="meta")
    attn = md.compile(md.full(), (4, 4), 2, score=md.distance_decay(meta))
    with pytest.raises(md.MaskDSLError, match=r"distance_decay: rate is on meta but q is on cpu"):
        attn(T, T, T)
