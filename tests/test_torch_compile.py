"""maskdsl under torch.compile (ARCHITECTURE.md, "torch.compile"): md.compile callables,
maskdsl.nn modules and maskdsl.natten compile with fullgraph=True on CPU, forward and backward,
with zero graph breaks (torch._dynamo.explain), match eager outputs and gradients, do not
recompile across batch sizes beyond torch's one automatic-dynamic recompile (counters), and
still raise MaskDSLError on bad input; every other size, a float scale and a non-tensor argument
that change give a new graph equal to eager or eager's MaskDSLError, and later calls still run."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import maskdsl as md
from maskdsl import natten
from maskdsl.nn import NeighborhoodAttention2D

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class Block(torch.nn.Module):
    """LayerNorm + NeighborhoodAttention2D (a learnable distance_decay rate) + MLP."""

    def __init__(self, dim=16, heads=2, backend="auto"):
        super().__init__()
        self.rate = torch.nn.Parameter(torch.tensor([0.1, 0.3]))
        self.ln = torch.nn.LayerNorm(dim)
        self.na = NeighborhoodAttention2D(dim, heads, 3, score=md.distance_decay(self.rate),
                                          backend=backend)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.na(self.ln(x))
        return x + self.mlp(x)


def _grads(fn, model, x):
    model.zero_grad()
    out = fn(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _breaks(fn, *args):
    explained = torch._dynamo.explain(fn)(*args)
    reasons = [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    counters.clear()
    return explained.graph_break_count, reasons


def test_block_fullgraph_matches_eager_without_graph_breaks_or_batch_recompiles():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 6, 6, 16)
    assert _breaks(model, x) == (0, [])
    compiled = torch.compile(model, fullgraph=True)       # inductor
    got, got_grads = _grads(compiled, model, x)
    want, want_grads = _grads(model, model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and "rate" in got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-4, rtol=1e-4)
    assert want_grads["rate"].abs().sum() > 0              # the learnable score gets a gradient
    assert counters["stats"]["unique_graphs"] == 1
    for batch in (3, 4):                                  # batch 3: torch's automatic dynamic
        xb = torch.randn(batch, 6, 6, 16)
        torch.testing.assert_close(compiled(xb), model(xb), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
    with torch.no_grad():                                 # grad mode: torch's own guard
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3
    with torch.no_grad():
        compiled(torch.randn(5, 6, 6, 16))
    assert counters["stats"]["unique_graphs"] == 3


def test_mark_dynamic_batch_compiles_once():
    model = Block().eval()
    x = torch.randn(2, 6, 6, 16)
    torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch in (2, 3, 5):
        xb = x if batch == 2 else torch.randn(batch, 6, 6, 16)
        torch.testing.assert_close(compiled(xb), model(xb), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", ["dense", "tiles", "auto"])
def test_md_compile_callable_forward_backward(backend):
    torch.manual_seed(1)
    table = torch.randn(2, 5, 5, requires_grad=True)
    attn = md.compile(md.neighborhood((3, 3)) | md.sink(2), shape=(8, 8), heads=2,
                      score=md.relative_bias(table) + md.softcap(20.0), backend=backend)

    def f(q, k, v):
        return attn(q, k, v).sin()

    q, k, v = (torch.randn(2, 2, 64, 8, requires_grad=True) for _ in range(3))
    assert _breaks(f, q, k, v) == (0, [])
    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = g(q, k, v), f(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    inputs = (q, k, v, table)
    got_g = torch.autograd.grad(got.sum(), inputs)
    want_g = torch.autograd.grad(want.sum(), inputs)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_natten_na2d_fullgraph():
    torch.manual_seed(2)
    rate = torch.tensor([0.2, 0.5], requires_grad=True)
    score = md.distance_decay(rate)     # score terms are built outside the compiled function

    def f(q, k, v):
        return natten.na2d(q, k, v, kernel_size=3, dilation=(2, 1), score=score)

    q, k, v = (torch.randn(2, 7, 6, 2, 8, requires_grad=True) for _ in range(3))
    assert _breaks(f, q, k, v) == (0, [])
    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = g(q, k, v), f(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v, rate)),
                    torch.autograd.grad(want.square().sum(), (q, k, v, rate))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_input_raises_maskdsl_error_under_fullgraph():
    attn = md.compile(md.neighborhood(3), shape=(16,), heads=2)
    g = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True, backend="aot_eager")
    bad = torch.randn(1, 2, 15, 8)                      # 15 tokens, compiled for 16
    with pytest.raises(md.MaskDSLError, match="N=15 tokens"):
        g(bad, bad, bad)
    layer = NeighborhoodAttention2D(16, 2, kernel_size=5)
    gl = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with pytest.raises(md.MaskDSLError, match="NeighborhoodAttention2D"):
        gl(torch.randn(1, 4, 4, 16))                    # 5 > 4: the kernel cannot fit
    gn = torch.compile(lambda q: natten.na1d(q, q, q, kernel_size=2), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(md.MaskDSLError, match="na1d"):
        gn(torch.randn(1, 8, 2, 4, 4))                  # 5-D: na1d wants 4-D
    flex = md.compile(md.neighborhood(3), shape=(16,), heads=2, backend="flex")
    gf = torch.compile(lambda q: flex(q, q, q), fullgraph=True, backend="aot_eager")
    with pytest.raises(md.MaskDSLError, match="flex has no backward on CPU"):
        gf(torch.randn(1, 2, 16, 8, requires_grad=True))


def test_dropout_keeps_the_per_call_stream():
    """Two callables with the same seed: one eager, one compiled; the same outputs call after
    call (the stream advances once per call) and the backward drops what the forward did."""
    def make():
        return md.compile(md.neighborhood(5), shape=(32,), heads=2, backend="tiles",
                          score=md.dropout(0.3, seed=7))

    eager, comp = make(), make()
    g = torch.compile(lambda q, k, v: comp(q, k, v), fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    for _ in range(2):
        q, k, v = (torch.randn(2, 2, 32, 8, requires_grad=True) for _ in range(3))
        got, want = g(q, k, v), eager(q, k, v)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)),
                        torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_nonfinite_rows_stay_isolated_under_compile():
    attn = md.compile(md.window(2), shape=(24,), heads=1, backend="tiles")
    g = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 1, 24, 8) for _ in range(3))
    k[0, 0, 10, 3] = float("nan")
    got, want = g(q, k, v), attn(q, k, v)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any(-1).sum() == 5
    torch.testing.assert_close(got.nan_to_num(7.0), want.nan_to_num(7.0))


# ---------------------------------------------------------------- sizes other than batch change
# Issue 21, finding 7: under fullgraph=True a changed size used to reach
# assume_constant_result as a SymInt (torch's automatic dynamic marks a dim dynamic on its
# first recompile) and every later recompile failed, the original shapes and a grad-mode call
# included. Every size but batch is specialized (ARCHITECTURE.md, "torch.compile"): a new size
# is a new graph equal to the eager call, or the eager call's MaskDSLError; the calls after it
# still work.

def _same_as_eager(compiled, eager, *args, grad=False):
    """compiled(*args) equals eager(*args) (and, with ``grad``, so do the gradients of both with
    respect to every tensor argument)."""
    if not grad:
        torch.testing.assert_close(compiled(*args), eager(*args), atol=1e-5, rtol=1e-5)
        return
    args = [a.detach().requires_grad_() for a in args]
    got, want = compiled(*args), eager(*args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), args),
                    torch.autograd.grad(want.square().sum(), args)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_md_compile_callable_after_a_changed_size():
    torch.manual_seed(5)
    attn = md.compile(md.neighborhood(3), shape=(16,), heads=2)
    ext = md.compile(md.neighborhood(3), shape=(16,), heads=2, extra_tokens=2)

    def f(q, k, v):
        return attn(q, k, v)

    def fe(q, k, v):
        return ext(q, k, v)

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    ge = torch.compile(fe, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    _same_as_eager(g, f, q, k, v)
    d4, dv6 = torch.randn(1, 2, 16, 4), torch.randn(1, 2, 16, 6)
    _same_as_eager(g, f, d4, d4, dv6)                     # head dim 4, value dim 6: a new graph
    bad = torch.randn(1, 2, 15, 8)
    with pytest.raises(md.MaskDSLError, match=r"has N=15 tokens but shape \(16,\) has 16"):
        g(bad, bad, bad)
    bad = torch.randn(1, 3, 16, 8)
    with pytest.raises(md.MaskDSLError, match="H=3 heads but the pattern was compiled for "
                                              "heads=2"):
        g(bad, bad, bad)
    _same_as_eager(g, f, q, k, v)                         # the original shapes
    _same_as_eager(g, f, q, k, v, grad=True)              # grad mode: a recompile
    _same_as_eager(g, f, d4, d4, dv6, grad=True)
    qx, kx, vx = (torch.randn(1, 2, 18, 8) for _ in range(3))   # extra_tokens=2: 18 tokens
    _same_as_eager(ge, fe, qx, kx, vx)
    x3 = torch.randn(1, 2, 19, 8)                         # 3 extra tokens, compiled for 2
    with pytest.raises(md.MaskDSLError, match=r"has 19 tokens; expected \[B, H, 18, D\] for "
                                              r"shape \(16,\) with extra_tokens=2"):
        ge(x3, x3, x3)
    _same_as_eager(ge, fe, qx, kx, vx, grad=True)


def test_neighborhood_attention_2d_without_shape_runs_every_resolution_compiled():
    torch.manual_seed(6)
    model = NeighborhoodAttention2D(16, 2, 3).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 6, 6, 16)
    with torch.no_grad():
        _same_as_eager(compiled, model, x)
        for grid in ((8, 8), (5, 7)):                     # new resolutions: new graphs
            _same_as_eager(compiled, model, torch.randn(1, *grid, 16))
        with pytest.raises(md.MaskDSLError, match=r"kernel_size\[0\]=3 needs shape\[0\] >= 3, "
                                                  r"got 2"):
            compiled(torch.randn(1, 2, 6, 16))
        with pytest.raises(md.MaskDSLError, match="expected the last dim to be dim=16"):
            compiled(torch.randn(1, 6, 6, 8))
        _same_as_eager(compiled, model, x)                # the original shape
    _same_as_eager(compiled, model, x, grad=True)         # grad mode
    _same_as_eager(compiled, model, torch.randn(2, 5, 7, 16), grad=True)


def test_natten_after_a_changed_size_or_additional_kv_count():
    torch.manual_seed(7)

    def f(q, k, v, ak, av):
        return natten.na1d(q, k, v, kernel_size=3, additional_keys=ak, additional_values=av)

    g = torch.compile(f, fullgraph=True, backend="aot_eager")

    def run(n, heads, d, n_add, grad=False):
        q, k, v = (torch.randn(1, n, heads, d) for _ in range(3))
        ak, av = (torch.randn(1, n_add, heads, d) for _ in range(2))
        _same_as_eager(g, f, q, k, v, ak, av, grad=grad)

    run(16, 2, 8, 3)
    run(16, 2, 8, 5)                                      # N_add
    run(12, 2, 8, 5)                                      # N
    run(12, 2, 4, 5)                                      # head dim
    run(12, 1, 4, 5)                                      # heads
    q = torch.randn(1, 2, 2, 8)
    with pytest.raises(md.MaskDSLError, match="na1d"):
        g(q, q, q, q, q)                                  # 2 tokens: kernel_size 3 cannot fit
    run(16, 2, 8, 3)                                      # the original shapes
    run(16, 2, 8, 3, grad=True)                           # grad mode


def test_non_tensor_arguments_raise_eagers_error_under_fullgraph():
    """A non-tensor q/k/v, module input or NATTEN argument raises eager's MaskDSLError under
    fullgraph=True (it used to end in Dynamo's "Observed exception")."""
    attn = md.compile(md.neighborhood(3), shape=(16,), heads=2)
    layer = NeighborhoodAttention2D(16, 2, 3)
    q, qn = torch.randn(1, 2, 16, 8), torch.randn(1, 16, 2, 8)
    cases = [
        (lambda q: attn(q, 3, q, return_lse=True)[1], q,
         r"^k: expected a torch.Tensor \[B, H, N, D\], got int$"),
        (lambda q: layer([1.0]), q, r"^NeighborhoodAttention2D: x: expected a torch.Tensor "
                                    r"\[B, \*shape, 16\], got list$"),
        (lambda q: natten.na1d(q, None, q, kernel_size=3, additional_keys=q[:, :2]), qn,
         r"^na1d: key: expected a torch.Tensor \[B, L, H, D\], got NoneType$"),
    ]
    for f, x, message in cases:
        for run in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
            with pytest.raises(md.MaskDSLError, match=message):
                run(x)


def test_a_changed_scale_under_fullgraph():
    """A float scale that changes between calls (automatic dynamic makes it a SymFloat) used to
    end in assume_constant_result's "argument conversion failed", later calls included; now the
    graph passes the float to the op, and a bad one raises eager's MaskDSLError."""
    torch.manual_seed(8)
    attn = md.compile(md.neighborhood(3), shape=(16,), heads=2)

    def f(q, k, v, scale):
        return attn(q, k, v, scale=scale)

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    for scale in (0.3, 0.5, -1.5):
        _same_as_eager(g, f, q, k, v, scale)
    for bad, shown in ((float("nan"), "nan"), (torch.tensor(0.3), "<a 0-D float32 torch.Tensor>")):
        with pytest.raises(md.MaskDSLError, match=rf"^scale={shown}: expected a finite number "
                                                  rf"within float32's range"):
            g(q, k, v, bad)
    _same_as_eager(g, f, q, k, v, None)
    _same_as_eager(g, f, q, k, v, 0.3)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    got, want = g(qg, kg, vg, 0.7), f(qg, kg, vg, 0.7)    # grad mode, a new scale
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), (qg, kg, vg)),
                    torch.autograd.grad(want.square().sum(), (qg, kg, vg))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    gn = torch.compile(lambda q, s: natten.na1d(q, q, q, kernel_size=3, scale=s), fullgraph=True,
                       backend="aot_eager")
    qn = torch.randn(1, 16, 2, 8)
    gn(qn, 0.5)
    with pytest.raises(md.MaskDSLError, match=r"^na1d: scale=inf: expected a finite number"):
        gn(qn, float("inf"))


def test_dynamic_true_and_maybe_mark_dynamic_specialize_every_size_but_batch():
    """dynamic=True (every size and the module's float scale symbolic from the first trace) and
    maybe_mark_dynamic on a grid dim: the sizes are specialized, the results are eager's."""
    torch.manual_seed(9)
    model = NeighborhoodAttention2D(16, 2, 3).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for shape in ((1, 6, 6, 16), (2, 6, 6, 16), (1, 5, 7, 16)):
            _same_as_eager(compiled, model, torch.randn(shape))
        x = torch.randn(1, 6, 8, 16)
        torch._dynamo.maybe_mark_dynamic(x, 1)
        _same_as_eager(torch.compile(model, fullgraph=True, backend="aot_eager"), model, x)


def _counting_calls(monkeypatch):
    """Counts the real (run-time) calls of CompiledAttention, not Dynamo's traces."""
    from maskdsl.runtime import compiled

    calls = {"n": 0}
    orig = compiled.CompiledAttention.__call__

    def counted(self, *args, **kw):
        if not torch.compiler.is_compiling():
            calls["n"] += 1
        return orig(self, *args, **kw)

    monkeypatch.setattr(compiled.CompiledAttention, "__call__", counted)
    return calls


@pytest.mark.parametrize("backend", ["tiles", "dense"])
def test_compiled_backward_uses_the_recorded_forward(monkeypatch, backend):
    """A training graph runs attention once per forward+backward (the backward takes the
    forward's recorded autograd graph from the stash) and gets eager's gradients, also when the
    graph writes into the op's output; the entry goes with its backward or with the graph."""
    from maskdsl.runtime import ops

    table = torch.randn(2, 5, 5, requires_grad=True)
    attn = md.compile(md.neighborhood((3, 3)) | md.sink(2), shape=(8, 8), heads=2,
                      score=md.relative_bias(table), backend=backend)

    def f(q, k, v):
        out = attn(q, k, v)
        out.mul_(2.0)                     # the graph writes into the op's output
        return out.square().sum()

    g = torch.compile(f, fullgraph=True)
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 64, 8, requires_grad=True) for _ in range(3))
    inputs = (q, k, v, table)
    want = torch.autograd.grad(f(q, k, v), inputs)
    g(q, k, v)                            # the compile
    before = ops.stashed()
    calls = _counting_calls(monkeypatch)
    loss = g(q, k, v)
    assert ops.stashed() == before + 1 and calls["n"] == 1
    got = torch.autograd.grad(loss, inputs)
    assert calls["n"] == 1 and ops.stashed() == before
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a forward whose graph is dropped without a backward leaves nothing behind
    loss = g(q, k, v)
    assert ops.stashed() == before + 1
    del loss
    assert ops.stashed() == before
    # no gradient wanted: nothing recorded
    with torch.no_grad():
        g(q, k, v)
    assert ops.stashed() == before


def test_a_second_backward_recomputes_with_the_same_dropout(monkeypatch):
    """retain_graph=True and a second backward: the stash entry was taken by the first, so the
    second recomputes the forward, replaying the dropout stream's state: the same gradients."""
    attn = md.compile(md.neighborhood(5), shape=(32,), heads=2, backend="tiles",
                      score=md.dropout(0.3, seed=5))
    g = torch.compile(lambda q, k, v: attn(q, k, v).square().sum(), fullgraph=True)
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 32, 8, requires_grad=True) for _ in range(3))
    g(q, k, v)
    calls = _counting_calls(monkeypatch)
    loss = g(q, k, v)
    first = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
    assert calls["n"] == 1
    second = torch.autograd.grad(loss, (q, k, v))
    assert calls["n"] == 2
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
