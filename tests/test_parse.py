"""repr / eval / parse round trips and parser fuzzing: any text gives a DSL node or a
MaskDSLError, never another exception, and never runs anything outside the DSL."""
import pickle

import pytest
import torch
from hypothesis import given, strategies as st

import maskdsl as md
from maskdsl.dsl.parse import NAMES
from strategies import cases, literal_scores

NAMESPACE = {name: getattr(md, name) for name in md.__all__}


@given(cases())
def test_pattern_round_trips(case):
    _, _, p = case
    text = repr(p)
    assert eval(text, NAMESPACE) == p
    assert md.parse(text) == p
    assert hash(md.parse(text)) == hash(p)
    assert pickle.loads(pickle.dumps(p)) == p


@given(cases(max_heads=3), st.data())
def test_score_round_trips(case, data):
    shape, heads, _ = case
    s = data.draw(literal_scores(shape, heads))
    assert md.parse(repr(s)) == s and eval(repr(s), NAMESPACE) == s


@pytest.mark.parametrize("text,expected", [
    ("neighborhood(kernel_size=(7, 7)) & causal(dims=(0,))", md.neighborhood((7, 7)) & md.causal(dims=(0,))),
    ("neighborhood((7, 7), dilation=(1, 2))", md.neighborhood((7, 7), dilation=(1, 2))),
    ("neighborhood([7, 7])", md.neighborhood((7, 7))),
    ("window(3) == window(3, 3)", None),
    ("~(window(1) | sink(4)) & full()", ~(md.window(1) | md.sink(4)) & md.full()),
    ("a | b & c", None),
    ("window(per_head([1, 2]), right=0)", md.window(md.per_head([1, 2]), right=0)),
    ("neighborhood(per_head([(3, 5), (5, 3)]))", md.neighborhood(md.per_head([(3, 5), (5, 3)]))),
    ("neighborhood((per_head([3, 5]), 7))", md.neighborhood((md.per_head([3, 5]), 7))),
    ("heads([window(1), causal()])", md.heads([md.window(1), md.causal()])),
    ("distance_decay(-0.5, metric='manhattan') + softcap(30)", md.distance_decay(-0.5, metric="manhattan") + md.softcap(30.0)),
    ("radial(decay=+2, min_window=64)", md.radial(decay=2.0, min_window=64)),
    ("document([0, 0, 1])", md.document([0, 0, 1])),
])
def test_parse_examples(text, expected):
    if expected is None:
        with pytest.raises(md.MaskDSLError):
            md.parse(text)
    else:
        assert md.parse(text) == expected


def test_precedence_and_parentheses_survive_repr():
    a, b, c = md.window(1), md.sink(2), md.causal()
    for p in (a | b & c, (a | b) & c, a & (b & c), (a & b) & c, ~(a & b), ~a & b, a | (b | c)):
        assert md.parse(repr(p)) == p, repr(p)
    assert repr((a | b) & c) == "(window(1) | sink(2)) & causal()"
    assert repr(a & (b & c)) == "window(1) & (sink(2) & causal())"


def test_window_right_defaults_to_left():
    assert md.window(3) == md.window(3, 3) and repr(md.window(3, 3)) == "window(3)"
    assert repr(md.window(3, right=0)) == "window(3, right=0)"


def test_tensor_terms_print_their_shape_and_compare_by_identity():
    t = torch.zeros(4)
    s = md.sink_logit(t)
    assert repr(s) == "sink_logit(<tensor [4]>)"
    assert s == md.sink_logit(t) and s != md.sink_logit(torch.zeros(4))
    with pytest.raises(md.MaskDSLError):
        md.parse(repr(s))


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo pwned')",
    "open('/etc/passwd')",
    "neighborhood.__class__",
    "[x for x in ()]",
    "lambda: full()",
    "full() if True else empty()",
    "window(**{'left': 1})",
    "window(*[1])",
    "{'a': 1}",
    "full()[0]",
    "window(1 + 2)",
    "not full()",
    "full() - empty()",
    "window(~3)",
    "-full()",
    "f'{full()}'",
    "window(b'1')",
    "window(1j)",
    "(yield)",
    "full(); empty()",
    "x := full()",
    "(" * 200 + "full()" + ")" * 200,
    "~" * 5000 + "full()",
    "window(" * 100 + "1" + ")" * 100,
    "\x00",
    "window(1e999)",
])
def test_parser_refuses_everything_outside_the_dsl(text):
    with pytest.raises(md.MaskDSLError):
        md.parse(text)


TOKENS = st.sampled_from(sorted(NAMES) + [
    "(", ")", "[", "]", ",", "=", "&", "|", "~", "+", "-", " ", "0", "1", "2", "3", "7", "0.5",
    "1e9", "'euclidean'", "True", "None", "kernel_size", "dims", "left", "x", ".", "__class__",
    "**", "*", "(0,)", "lambda", ":"])


@given(st.lists(TOKENS, max_size=25).map("".join))
def test_fuzz_token_soup_gives_a_node_or_a_maskdsl_error(text):
    try:
        out = md.parse(text)
    except md.MaskDSLError:
        return
    assert isinstance(out, (md.Pattern, md.Score))
    assert md.parse(repr(out)) == out


@given(st.text(max_size=80))
def test_fuzz_arbitrary_text_gives_a_node_or_a_maskdsl_error(text):
    try:
        out = md.parse(text)
    except md.MaskDSLError:
        return
    assert isinstance(out, (md.Pattern, md.Score))


@pytest.mark.parametrize("text,hint", [
    ("neighbourhood(3)", "unknown function 'neighbourhood' (did you mean 'neighborhood'?)"),
    ("window(3) & casual()", "unknown function 'casual' (did you mean 'causal'?)"),
    ("window(3) | sinks", "unknown name 'sinks' (did you mean 'sink'?)"),
    ("neighborhood(kernal_size=3)", "unknown keyword argument 'kernal_size' (did you mean 'kernel_size'?); "
                                    "it takes neighborhood(kernel_size, stride=1, dilation=1, causal=False)"),
])
def test_unknown_names_get_a_did_you_mean(text, hint):
    with pytest.raises(md.MaskDSLError) as e:
        md.parse(text)
    assert hint in str(e.value)


def test_no_suggestion_for_names_far_from_any():
    with pytest.raises(md.MaskDSLError) as e:
        md.parse("blah(3)")
    assert "did you mean" not in str(e.value)
