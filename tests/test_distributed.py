"""Context parallelism (ARCHITECTURE.md, "Context parallelism").

Two halves: the plan checked in this process (the split, the exact halo against the reference
mask, the byte counts, every refusal, on a one-rank gloo group), and the strategies run for real
in 2, 3 and 4 gloo processes (tests/cp_worker.py), each against the single-process reference.
"""
from __future__ import annotations

import json
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import maskdsl as md
from maskdsl.parallel import plan as P
from maskdsl.runtime.rect import row_major

import cp_worker


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- the split

def test_slabs_are_as_even_as_possible_along_dim_0():
    lay = P.layout((10, 3), 4)
    rows = [[(a // 3, b // 3) for a, b in lay.parts[r]] for r in range(4)]
    assert rows == [[(0, 3)], [(3, 6)], [(6, 8)], [(8, 10)]]
    assert [lay.count(r) for r in range(4)] == [9, 9, 6, 6]
    assert torch.equal(torch.cat([lay.positions(r) for r in range(4)]), torch.arange(30))


def test_head_tail_gives_rank_r_slabs_r_and_2w_minus_1_minus_r():
    lay = P.layout((8,), 2, balance="head-tail")
    assert lay.parts == (((0, 2), (6, 8)), ((2, 4), (4, 6)))
    assert lay.extra_owner == 0                      # owns the last grid token


def test_extra_tokens_follow_the_last_grid_token():
    lay = P.layout((6,), 3, extra=4)
    assert lay.extra_owner == 2 and lay.count(2) == 6 and lay.grid_count(2) == 2
    assert lay.positions(2).tolist() == [4, 5, 6, 7, 8, 9]
    assert [lay.positions(r).tolist() for r in (0, 1)] == [[0, 1], [2, 3]]   # no extra there


@pytest.mark.parametrize("shape, world, balance, extra", [
    ((4,), 4, None, 0),                  # one row per rank: the fewest rows that split
    ((8, 3), 4, "head-tail", 2),         # 2W slabs of one row each
    ((13, 2), 3, "head-tail", 5),
])
def test_owner_positions_and_local_index_agree(shape, world, balance, extra):
    lay = P.layout(shape, world, extra=extra, balance=balance)
    assert lay.balance == balance
    owner, local = lay.owner(), lay.local_index()
    n = lay.n + extra
    seen = torch.zeros(n, dtype=torch.long)
    for r in range(world):
        pos = lay.positions(r)
        assert pos.dtype == torch.int64 and len(pos) == lay.count(r)
        assert (owner[pos.numpy()] == r).all()
        assert local[pos.numpy()].tolist() == list(range(lay.count(r)))   # slabs in order
        seen[pos] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("kw, words", [
    (dict(shape=(3, 8), world=4), "grid dim 0 has 3 rows"),
    (dict(shape=(5,), world=3, balance="head-tail"),
     r"world size 3 with balance='head-tail' \(6 slabs\) needs at least 6 rows"),
    (dict(shape=(3,), world=4), r"over world size 4 needs at least 4 rows"),
    (dict(shape=(8,), world=2, balance="zigzag"), "balance='zigzag'"),
])
def test_a_split_that_cannot_be_made_is_refused(kw, words):
    with pytest.raises(md.MaskDSLError, match=words):
        P.layout(kw["shape"], kw["world"], balance=kw.get("balance"))


# ---------------------------------------------------------------------- the halo is exact

PATTERNS = [
    ("window-sinks", md.causal() & md.window(5) | md.sink(2), (23,), 1),
    ("nbhd-2d", md.neighborhood((3, 5), stride=(1, 2), dilation=(2, 1),
                                causal=(True, False)), (9, 10), 1),
    ("nbhd-3d", md.neighborhood((3, 3, 3), dilation=(1, 2, 1)), (6, 6, 5), 1),
    ("block-shift", md.block((4, 4), shift=(2, 2)), (10, 8), 1),
    ("radial", md.radial(decay=1.0, min_window=4, sink_frames=1), (8, 12), 1),
    ("per-head", md.heads([md.window(2), md.causal() & md.window(7)]), (31,), 2),
    ("document", md.document(torch.tensor([0] * 7 + [1] * 9 + [2] * 6)), (22,), 1),
    ("power", md.power(2), (40,), 1),
    # many 128-token tiles: FULL pairs across slabs, tiles inside one slab and across a boundary
    ("window-tiles", md.causal() & md.window(300), (1000,), 1),
    ("block-sinks-tiles", md.block(256) | md.sink(3), (1024,), 1),
    ("nbhd-2d-tiles", md.neighborhood((17, 17)), (40, 40), 2),
    # head 0's pairs are all FULL (no token to evaluate), head 1's are not
    ("per-head-tiles", md.heads([md.block(128), md.window(200)]), (700,), 2),
    ("one-token-last-tile", md.block(256) | md.sink(2), (1025,), 1),
]


@pytest.mark.parametrize("name, p, shape, heads", PATTERNS, ids=[x[0] for x in PATTERNS])
@pytest.mark.parametrize("world, balance", [(2, None), (3, None), (2, "head-tail")])
def test_need_is_exactly_the_keys_other_ranks_own_that_a_rank_attends(name, p, shape, heads,
                                                                    world, balance):
    attn = md.compile(p, shape=shape, heads=heads, backend="tiles")
    lay = P.layout(shape, world, balance=balance)
    got = P.need(row_major(attn), lay)
    mask = md.reference.mask(p, shape, heads).any(0)             # [N, N]
    owner = torch.from_numpy(lay.owner())
    for r in range(world):
        want = mask[owner == r].any(0) & (owner != r)
        assert torch.equal(got[r] & (owner != r), want), (name, r)


def test_the_halo_plan_lists_rows_by_owner_and_sends_extra_tokens_once():
    attn = md.compile(md.window(2), shape=(12,), heads=1, backend="tiles", extra_tokens=3)
    lay = P.layout((12,), 3, extra=3)
    hp = P.halo_plan(row_major(attn), lay)
    assert hp.positions[0][1].tolist() == [2, 3] and hp.positions[1][0].tolist() == [4, 5]
    assert hp.positions[2][0].tolist() == [12, 13, 14]          # only the extra tokens
    assert hp.positions[2][1].tolist() == [8, 9, 12, 13, 14]
    assert hp.rows[2][1].tolist() == [0, 1, 4, 5, 6]             # rows of rank 2's buffer


@pytest.mark.parametrize("p, shape, heads", [
    (md.neighborhood(md.per_head([5, 7])), (512,), 2),     # heads differ, tile classes shared
    (md.causal() & md.window(40), (600,), 3),               # heads alike: one head evaluated
    (md.heads([md.window(9), md.causal() & md.window(200)]), (640,), 2),   # classes per head
])
def test_the_budget_counts_exactly_the_token_pairs_the_halo_need_evaluates(p, shape, heads,
                                                                          monkeypatch):
    """need(budget=b) plans iff b >= the pairs its mask_mod evaluates (counted by a spy)."""
    prog = row_major(md.compile(p, shape=shape, heads=heads, backend="tiles"))
    lay = P.layout(shape, 3)
    real = prog.mods
    count = [0]

    def mods(device, flex=False):
        mask_mod, score_mod = real(device, flex)

        def spy(b, h, q, k):
            out = mask_mod(b, h, q, k)
            count[0] += out.numel()
            return out
        return spy, score_mod
    monkeypatch.setattr(prog, "mods", mods)
    want = P.need(prog, lay)
    evaluated = count[0]
    assert evaluated > 0
    assert torch.equal(P.need(prog, lay, budget=evaluated), want)
    assert P.need(prog, lay, budget=evaluated - 1) is None


def test_a_pattern_past_the_budget_has_no_halo_plan():
    attn = md.compile(md.document(torch.arange(64) % 3), shape=(64,), heads=1,
                      backend="tiles")
    assert P.need(row_major(attn), P.layout((64,), 2), budget=10) is None


def test_work_is_even_under_head_tail_for_a_causal_pattern():
    attn = md.compile(md.causal(), shape=(1024,), heads=2, backend="tiles")
    prog = row_major(attn)
    plain = P.work(prog, P.layout((1024,), 2))
    assert plain[1] > 2 * plain[0]
    even = P.work(prog, P.layout((1024,), 2, balance="head-tail"))
    assert abs(even[0] - even[1]) <= 0.1 * even[0] and sum(even) == sum(plain)


@pytest.mark.parametrize("p, H, shared", [
    (md.heads([md.causal() & md.window(100), md.block(256), md.window(3)]), 3, False),
    (md.causal() & md.window(100), 2, True),
])
def test_work_counts_each_heads_non_empty_tile_pairs_by_the_rows_a_rank_owns(p, H, shared):
    """work == sum over heads and query tiles of the non-empty key tiles (from the reference
    mask) times the share of the tile's rows the rank owns; per-head and shared tile classes."""
    shape = (900,)
    prog = row_major(md.compile(p, shape=shape, heads=H, backend="tiles"))
    assert prog.recipe.classes.shared == shared
    V, n = prog.layout.block, 900
    T = -(-n // V)
    mask = torch.zeros(H, T * V, T * V, dtype=torch.bool)
    mask[:, :n, :n] = md.reference.mask(p, shape, H)
    per_tile = mask.reshape(H, T, V, T, V).any(4).any(2).sum((0, 2)).double()     # [T]
    for world, balance in ((2, None), (3, None), (2, "head-tail")):
        lay = P.layout(shape, world, balance=balance)
        owner = torch.from_numpy(lay.owner()[:n])
        want = []
        for r in range(world):
            rows = torch.zeros(T * V)
            rows[:n] = (owner == r).double()
            want.append(float((rows.reshape(T, V).sum(1) / V * per_tile).sum()))
        assert P.work(prog, lay) == pytest.approx(want, rel=1e-12), (world, balance)


def test_bytes_of_counts_every_message():
    lay = P.layout((8, 4), 2)
    kw = dict(heads=4, kv_heads=2, batch=3, head_dim=8, head_dim_v=8, dtype=torch.bfloat16)
    ag = P.bytes_of("allgather", lay, **kw)
    assert ag == {"sent": [16 * 3 * 2 * 16 * 2] * 2, "received": [16 * 3 * 2 * 16 * 2] * 2}
    ul = P.bytes_of("ulysses", lay, **kw)
    row = 3 * (2 * 8 + 1 * 16) * 2 + 3 * 2 * 8 * 2               # q, kv in; out back
    assert ul["sent"] == [16 * row] * 2
    # lse comes back beside the output: float32 (4 bytes) per row and head, float64 for
    # float64 inputs
    for dtype, lsz in ((torch.bfloat16, 4), (torch.float16, 4), (torch.float64, 8)):
        kw_d = dict(kw, dtype=dtype)
        plain = P.bytes_of("ulysses", lay, **kw_d)["sent"]
        with_lse = P.bytes_of("ulysses", lay, return_lse=True, **kw_d)["sent"]
        assert [a - b for a, b in zip(with_lse, plain)] == [16 * 3 * 2 * lsz] * 2, dtype
    with pytest.raises(md.MaskDSLError, match=r"strategy='ring': expected one of"):
        P.bytes_of("ring", lay, **kw)


# ---------------------------------------------------------------------- per-head scores

@pytest.mark.parametrize("score, varies", [
    (None, False),
    (md.alibi(), True),                     # geometric slopes come from the head count
    (md.alibi(0.5), False),
    (md.alibi(md.per_head([0.5, 0.25])), True),
    (md.softcap(5.0) + md.alibi(), True),
    (md.softcap(5.0) + md.distance_decay(0.1) + md.sink_logit(0.3), False),
    (md.distance_decay(md.per_head([0.1, 0.2])), True),
    (md.distance_decay(0.1, dims=(0,)), False),
    (md.sink_logit(torch.zeros(2)), True),  # a tensor is read at call time, per head or not
    (md.relative_bias(torch.zeros(3)), True),
    (md.score_fn(lambda s, b, h, q, k: s), True),    # called with the head
])
def test_one_test_decides_whether_a_score_differs_per_head(score, varies):
    """``varies_per_head(pattern, score)`` is the one place that decides whether every head is
    alike (Ulysses rebinds the attention to H / W heads only then; issue 21, finding 2)."""
    from maskdsl.dsl.score import score_varies_per_head
    from maskdsl.codegen.recipe import varies_per_head

    assert score_varies_per_head(score) is varies
    assert varies_per_head(md.causal(), score) is varies
    assert varies_per_head(md.heads([md.causal(), md.window(2)]), score) is True


# ---------------------------------------------------------------------- one rank, in process

@pytest.fixture(scope="module")
def one_rank():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0,
                            world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_context_parallel_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a group is initialised in this process")
    with pytest.raises(md.MaskDSLError, match="init_process_group"):
        md.context_parallel(md.compile(md.window(2), shape=(8,)))


def test_one_rank_is_the_whole_attention(one_rank):
    attn = md.compile(md.neighborhood((3, 3)), shape=(6, 5), heads=2, backend="tiles")
    q, k, v = (torch.randn(1, 2, 30, 4, dtype=torch.float64) for _ in range(3))
    for s in ("halo", "allgather", "ulysses"):
        cp = md.context_parallel(attn, strategy=s)
        out = cp.unshard(cp(cp.shard(q), cp.shard(k), cp.shard(v)))
        torch.testing.assert_close(out, md.reference.attention(q, k, v, attn.pattern, (6, 5)))
        assert cp.traffic == {"sent": 0, "received": 0}


def test_shard_without_shape_is_a_1d_grid_and_plan_takes_other_sizes(one_rank):
    x = torch.randn(1, 2, 10, 3)
    assert torch.equal(md.shard(x), x)            # one rank: the whole 1-D grid of 10 tokens
    attn = md.compile(md.window(2), shape=(8,), heads=2, backend="tiles")
    cp = md.context_parallel(attn, strategy="allgather")
    assert cp.plan(batch=4, dtype=torch.float32) == {s: {"sent": [0], "received": [0]}
                                                      for s in ("halo", "ulysses", "allgather")}
    assert "strategy='allgather'" in repr(cp)


def test_a_one_dimensional_device_mesh_is_a_group(one_rank):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("cp",))
    attn = md.compile(md.window(2), shape=(8,), heads=2, backend="tiles")
    cp = md.context_parallel(attn, group=mesh)
    assert cp.world == 1 and cp.rank == 0
    with pytest.raises(md.MaskDSLError, match="2-D DeviceMesh"):
        md.context_parallel(attn, group=init_device_mesh("cpu", (1, 1)))


def test_shard_and_unshard_take_activations_too(one_rank):
    x = torch.randn(2, 6, 5, 3, requires_grad=True)
    y = md.shard(x, shape=(6, 5))
    assert torch.equal(md.unshard(y, shape=(6, 5)), x)
    t = torch.randn(2, 3, 30, 4)
    assert torch.equal(md.unshard(md.shard(t, shape=(6, 5)), shape=(6, 5)), t)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_shard_and_unshard_take_the_layout_by_name(one_rank):
    """A [B, 1, Y, C] slab of a 2-D grid is also [B, H=1, N=Y, D]: layout= says which (issue
    21, finding 4); layout=None takes the one x fits and refuses x fitting both."""
    x = torch.randn(2, 1, 8, 5)
    for layout in ("grid", "bhnd"):
        y = md.shard(x, shape=(1, 8), layout=layout)
        assert torch.equal(y, x) and torch.equal(md.unshard(y, shape=(1, 8), layout=layout), x)
    a = torch.randn(2, 3, 4, 5)                                  # [B, *shape, C], unambiguous
    assert torch.equal(md.unshard(md.shard(a, shape=(3, 4)), shape=(3, 4), layout="grid"), a)
    cp = md.context_parallel(md.compile(md.window(2), shape=(3, 4), heads=2, backend="tiles"))
    assert torch.equal(cp.unshard(cp.shard(a, layout="grid"), layout="grid"), a)


@pytest.mark.parametrize("make, words", [
    (lambda a: md.shard(torch.randn(2, 1, 8, 5), shape=(1, 8)),
     r"x: shape \[2, 1, 8, 5\] fits both layouts \(\[B, H, N, D\] with N = 8 .* and \[B, 1, 8, C\] "
     r"activations for shape \(1, 8\) .*\); pass layout='bhnd' or layout='grid'"),
    (lambda a: md.unshard(torch.randn(2, 1, 8, 5), shape=(1, 8)), "fits both layouts"),
    (lambda a: md.shard(torch.randn(2, 4, 8), shape=(4,), layout="rows"),
     r"layout='rows': expected None \(the layout x fits\), 'bhnd' \(\[B, H, N\(\+E\), D\]\) or "
     r"'grid'"),
    (lambda a: md.shard(torch.randn(2, 3, 4, 5), shape=(3, 4), layout="bhnd"),
     r"x: shape \[2, 3, 4, 5\] with layout='bhnd': expected \[B, H, N, D\] with N = 12"),
    (lambda a: md.shard(torch.randn(2, 3, 12, 5), shape=(3, 4), layout="grid"),
     r"x: shape \[2, 3, 12, 5\] with layout='grid': expected \[B, 3, 4, C\] activations"),
    (lambda a: md.shard(torch.randn(2, 3, 12, 5), layout="grid"), "shape=None: x must be"),
    (lambda a: md.context_parallel(a).shard(torch.randn(2, 8, 3), layout="bhnd"),
     r"x: shape \[2, 8, 3\] with layout='bhnd'"),
    (lambda a: md.context_parallel(a, strategy="ring"), "strategy='ring'"),
    (lambda a: md.context_parallel(md.compile(md.window(2), shape=(8,), q_range=(0, 4))),
     "q_range"),
    (lambda a: md.context_parallel(md.compile(md.window(2), shape=(8,),
                                              score=md.dropout(0.1))), "dropout"),
    (lambda a: md.context_parallel(a, group="world"), "group='world'"),
    (lambda a: md.context_parallel(a, kv_heads=3), "kv_heads=3"),
    (lambda a: md.context_parallel(a, head_dim=0), "head_dim=0"),
    (lambda a: md.context_parallel("attn"), "attn: expected a CompiledAttention"),
    (lambda a: md.context_parallel(a)(torch.randn(1, 2, 7, 4), torch.randn(1, 2, 8, 4),
                                      torch.randn(1, 2, 8, 4)), r"q: shape \[1, 2, 7, 4\]"),
    (lambda a: md.context_parallel(a)(torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4),
                                      torch.randn(1, 2, 8, 4)), "heads=2"),
    (lambda a: md.shard(torch.randn(2, 5), shape=(8,)), r"x: shape \[2, 5\]"),
    (lambda a: md.unshard(torch.randn(1, 1, 8, 2)), "pass shape="),
    (lambda a: md.shard([1, 2], shape=(8,)), "x: expected a torch.Tensor"),
    (lambda a: md.shard(torch.randn(1, 1, 8, 2), extra_tokens=-1), "extra_tokens=-1"),
    (lambda a: md.shard(torch.randn(8, 2)), "shape=None: x must be"),
    (lambda a: md.context_parallel(a, dtype=torch.int64), "dtype=torch.int64"),
    (lambda a: md.context_parallel(a)(*(torch.randn(1, 2, 8, 4),) * 3, return_lse="yes"),
     "return_lse='yes'"),
])
def test_bad_requests_raise_maskdsl_errors(one_rank, make, words):
    attn = md.compile(md.window(2), shape=(8,), heads=2, backend="tiles")
    with pytest.raises(md.MaskDSLError, match=words):
        make(attn)


def test_without_bounded_reach_auto_falls_back_to_allgather(one_rank, monkeypatch):
    # one rank owns every key, so no budget is ever passed here: stand in for a plan past it
    # (test_a_pattern_past_the_budget_has_no_halo_plan checks the budget itself)
    monkeypatch.setattr(P, "halo_plan", lambda *a, **k: None)
    attn = md.compile(md.document(torch.arange(40) % 4), shape=(40,), heads=2,
                      backend="tiles")
    cp = md.context_parallel(attn)
    assert "halo" not in cp.plan() and "no bounded reach" in cp.reason
    with pytest.raises(md.MaskDSLError, match="no bounded reach"):
        md.context_parallel(attn, strategy="halo")


def test_an_in_place_change_of_document_ids_replans_the_halo(one_rank):
    ids = torch.zeros(16, dtype=torch.int64)
    attn = md.compile(md.document(ids), shape=(16,), heads=1, backend="tiles")
    cp = md.context_parallel(attn, strategy="halo")
    first = cp._halo_plan()
    ids[8:] = 1
    assert cp._halo_plan() is not first


# ---------------------------------------------------------------------- 2, 3, 4 processes

def _spawn(world, tmp_path):
    out = tmp_path / "records.json"
    mp.spawn(cp_worker.run, args=(world, _port(), str(out)), nprocs=world)
    records = json.loads(out.read_text())
    branches = [r for r in records if r["case"] == "parallel-branches"]
    agree = [r for r in records if r["case"].startswith("agree:")]
    return world, [r for r in records if r["case"] != "parallel-branches"
                   and not r["case"].startswith("agree:")], branches, agree


def _expected_refusal(rec, world):
    c = dict(cp_worker.cases(world))[rec["case"]]
    H, Hk = c["H"], c.get("Hk", c["H"])
    return rec["strategy"] == "ulysses" and (H % world or Hk % world)


def _every_strategy_equals_the_single_process_run(spawned):
    world, records, *_ = spawned
    ran = set()
    for rec in records:
        assert "crash" not in rec, rec.get("crash")
        if "refused" in rec:
            assert _expected_refusal(rec, world), rec
            assert "divisible by the world size" in rec["refused"]
            continue
        assert not _expected_refusal(rec, world), rec
        for what, e in rec["errors"].items():
            assert e <= cp_worker.TOL, (rec["case"], rec["strategy"], rec["balance"], what, e)
        ran.add((rec["case"], rec["chosen"]))
    # Ulysses runs a compiled attention on its heads when every head is alike, else the
    # rectangle path at each head's parameters: both ran
    uly = {rec["case"]: rec["whole_sequence"] for rec in records
           if rec.get("chosen") == "ulysses"}
    assert uly.get("heads-8-kv-4", True) and not uly.get("extra-all-4-heads", False), uly
    # alibi()'s geometric slopes come from the head count: never rebound to H / W heads
    assert not uly.get("alibi-geometric", False), uly
    names = {n for n, _ in cp_worker.cases(world)}
    assert {c for c, s in ran if s == "halo"} == names
    assert {c for c, s in ran if s == "allgather"} == names
    assert any(s == "ulysses" for _, s in ran)


def _a_call_in_inference_mode_first_changes_nothing(spawned):
    world, records, *_ = spawned
    assert all(rec["inference_mode_equal"] for rec in records if "errors" in rec)


def _the_bytes_moved_are_the_plans(spawned):
    world, records, *_ = spawned
    for rec in records:
        if "errors" not in rec:
            continue
        plan = rec["plan"][rec["chosen"]]
        assert [t["sent"] for t in rec["traffic"]] == plan["sent"], rec["case"]
        assert [t["received"] for t in rec["traffic"]] == plan["received"], rec["case"]


def _auto_picks_the_fewest_bytes(spawned):
    world, records, *_ = spawned
    for rec in records:
        if rec["strategy"] != "auto" or "errors" not in rec:
            continue
        total = {k: sum(v["sent"]) for k, v in rec["plan"].items()}
        assert total[rec["chosen"]] == min(total.values()), rec["case"]
        assert rec["reason"].startswith(rec["chosen"] + ": the fewest bytes")


def _the_reason_suggests_head_tail_for_a_causal_pattern_only(spawned):
    world, records, *_ = spawned
    for rec in records:
        if "reason" not in rec:
            continue
        want = rec["case"] == "causal-balanced" and rec["balance"] is None
        assert ("balance='head-tail' evens it" in rec["reason"]) == want, (rec["case"],
                                                                          rec["reason"])


def _the_halo_of_a_local_pattern_moves_less_than_allgather(spawned):
    world, records, *_ = spawned
    for rec in records:
        if rec["strategy"] == "halo" and rec["case"].startswith("nbhd") and "errors" in rec:
            halo, ag = (sum(rec["plan"][s]["received"]) for s in ("halo", "allgather"))
            assert halo < ag, (rec["case"], halo, ag)


def _parallel_branches_backpropagate_in_one_order(spawned):
    """Two cp attentions in parallel branches of one graph, one backward: no hang (the
    worker's faulthandler would end it) and the single-process gradients."""
    _, _, branches, _ = spawned
    assert len(branches) == 1, "the parallel-branches record is missing"
    assert "crash" not in branches[0], branches[0]["crash"]
    assert branches[0]["strategies"] == ["halo", "allgather"]
    errs = branches[0]["branch_errors"]
    assert set(errs) == {"loss", "dq", "dk", "dv"}
    assert all(e <= cp_worker.TOL for e in errs.values()), errs


def _disagreement(world):
    """What every rank of ``world`` raises when the last rank differs (cp_worker's
    ``_agreement_scenarios``): a regex per scenario, or None for a call that must succeed."""
    W1 = world - 1
    refused = rf"context parallelism: rank {W1} of {world} refused the call: "
    disagree = "context parallelism: the ranks disagree on "

    def per_rank(a, b):                          # every rank a, the last b
        return ", ".join(f"rank {r}: {a}" for r in range(W1)) + f", rank {W1}: {b}"

    return {
        "batch": disagree + re.escape(f"batch (q.shape[0]) ({per_rank(2, 3)});"),
        "head-dim": disagree + re.escape(f"head dim (q.shape[3]) ({per_rank(4, 3)}); on value "
                                         f"head dim (v.shape[3]) ({per_rank(5, 4)})"),
        "dtype": disagree + re.escape(f"dtype ({per_rank('torch.float64', 'torch.float32')});"),
        "kv-heads": disagree + re.escape(f"kv heads (k.shape[1]) ({per_rank(2, 1)});"),
        "kv-heads-ulysses": refused + re.escape(f"strategy='ulysses': heads={world} and "
                                                f"kv_heads=1 must both be divisible by the world "
                                                f"size {world}"),
        "local-tokens": refused + re.escape("q: shape [2, 2, 3, 4] has 3 tokens; expected "
                                            "[B, H, 4, D]"),
        "local-tokens-allgather": refused + re.escape("q: shape [2, 2, 5, 4] has 5 tokens"),
        "heads": disagree + re.escape(f"heads (q.shape[1]) ({per_rank(2, 4)});"),
        "extra-tokens": disagree + re.escape(f"extra tokens ({per_rank(0, 2)});"),
        "return-lse": disagree + re.escape(f"return_lse ({per_rank(False, True)});"),
        "scale": disagree + re.escape(f"scale ({per_rank(0.5, 0.25)});"),
        "autograd": disagree + re.escape(f"autograd (grad mode on and q, k or v requiring grad) "
                                         f"({per_rank(False, True)});"),
        "strategy": disagree + re.escape(f"strategy ({per_rank(repr('halo'), repr('allgather'))})"),
        "refused-return-lse": refused + re.escape("return_lse='yes': expected True or False"),
        "refused-q-none": refused + re.escape("q: expected a torch.Tensor [B, H, N, D], got "
                                              "NoneType"),
        "pattern": disagree + re.escape("the compiled attention (a digest of its pattern, shape, "
                                        "heads and score)"),
        "document-ids": disagree + re.escape("the halo plan (a digest of its message sizes)"),
        "different-calls": re.escape(
            "context parallelism: the ranks of the group are in different calls ("
            + per_rank("a context-parallel call cp(q, k, v)", "md.unshard") + ")"),
        f"unshard-{world}x8-inferred": (
            rf"md.unshard: ranks {', '.join(map(str, range(world)))} of {world} refused the "
            rf"call: x: shape \[2, 1, 8, 5\] fits both layouts .*pass layout='bhnd' or "
            rf"layout='grid'"),
        f"unshard-{world}x8-grid": None,
        f"unshard-{world + 1}x8-inferred": (
            rf"md.unshard: ranks? {', '.join(map(str, range(1, world)))} of {world} refused "
            rf"the call: x: shape \[2, 1, 8, 5\] fits both layouts"),   # rank 0 holds 2 rows
        f"unshard-{world + 1}x8-grid": None,
        "unshard-dtype": re.escape(f"md.unshard: the ranks disagree on x.dtype "
                                   f"({per_rank('torch.float64', 'torch.float32')})"),
        "unshard-channels": re.escape(f"md.unshard: the ranks disagree on x.shape[3] "
                                      f"({per_rank(3, 5)})"),
        "unshard-slab-length": rf"md.unshard: rank {W1} of {world} refused the call: x: shape "
                               rf"\[1, 2, 3, 3\]: expected \[B, H, N, D\] with N = 4",
    }


def _every_rank_raises_one_error_when_the_ranks_disagree(spawned):
    """Issue 21, finding 6: ranks that disagree on a call's metadata, or one rank refusing it,
    give every rank the same MaskDSLError naming the field and each rank's value (before, a
    gloo abort, a half-filled receive buffer, or a hang); finding 4: [B, *shape, C]
    activations on one-row slabs unshard with layout="grid" and are refused without it."""
    world, _, _, agree = spawned
    want = _disagreement(world)
    got = {r["case"][len("agree:"):]: r for r in agree}
    assert "crash" not in got, got.get("crash", {}).get("crash")
    assert set(got) == set(want) | {"then-a-good-call"}, sorted(got)
    for name, pattern in want.items():
        by_rank = got[name]["by_rank"]
        assert len(by_rank) == world
        if pattern is None:
            assert by_rank == [["ok", "True"]] * world, (name, by_rank)
            continue
        kinds = {kind for kind, _ in by_rank}
        assert kinds == {"MaskDSLError"}, (name, by_rank)
        assert len({msg for _, msg in by_rank}) == 1, (name, by_rank)     # one error, every rank
        assert re.search(pattern, by_rank[0][1]), (name, pattern, by_rank[0][1])
    assert got["then-a-good-call"]["error"] <= cp_worker.TOL


@pytest.mark.parametrize("world", [2, 3, 4])
def test_context_parallel_in_processes(world, tmp_path):
    """One spawn per world size (a few seconds), every check on its records."""
    spawned = _spawn(world, tmp_path)
    _every_strategy_equals_the_single_process_run(spawned)
    _a_call_in_inference_mode_first_changes_nothing(spawned)
    _the_bytes_moved_are_the_plans(spawned)
    _auto_picks_the_fewest_bytes(spawned)
    _the_reason_suggests_head_tail_for_a_causal_pattern_only(spawned)
    _the_halo_of_a_local_pattern_moves_less_than_allgather(spawned)
    _parallel_branches_backpropagate_in_one_order(spawned)
    _every_rank_raises_one_error_when_the_ranks_disagree(spawned)
