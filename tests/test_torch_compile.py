"""maskdsl under torch.compile (ARCHITECTURE.md, "torch.compile"): md.compile callables,
maskdsl.nn modules and maskdsl.natten compile with fullgraph=True on CPU, forward and backward,
with zero graph breaks (torch._dynamo.explain), match eager outputs and gradients, do not
recompile across batch sizes beyond torch's one automatic-dynamic recompile (counters), and
still raise MaskDSLError on bad input."""
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
