"""maskdsl benchmarks: one command, one table, one results file.

    python benchmarks/run.py                 # everything that runs on this device
    python benchmarks/run.py --only build    # sections: build, scale, cli, tiling, attention, tiles, beyond, triton, compile, sweep, steady
    python benchmarks/run.py --quick         # fewer repetitions, smaller attention cases
    python benchmarks/run.py --only triton --case "2-D 256x256 window 80x80"   # one case by name

Every ratio is measured in one run on one machine (ours / peer: < 1 means we are faster; the
"speedup" columns are peer / ours). Results go to benchmarks/results/<device>-<date>.{json,md}
with the device, torch version and the exact command.

Sections:
  build      what a user calls, md.compile(...).block_mask() (row-major, the user's token
             order; cold: lowering + layout search + sparse classes + BlockMask with the
             q-indices the backward needs, caches cleared), and flex_inputs("tiled") (the tiled
             order the flex backend runs)
             vs torch.compile(create_block_mask) steady state (its first call, the compile,
             reported separately); the 3-D 524,288-token build runs in a child process so its
             peak memory is its own.
  scale      fresh processes: a 4M-token window's compile + tile classes, 128 heads([...]) vs
             the per_head equivalent, the RSS of 200 compiles of fresh document ids.
  cli        fresh processes: maskdsl show / check on 1-D 1,048,576 tokens and 3-D 32x128x128
             (wall time and peak RSS; the targets are < 60 s and < 2 GB each).
  tiling     block density row-major vs token-tiled (128-token tiles).
  attention  forward time: flex backend vs SDPA with a materialised bool mask vs dense SDPA
             (no mask) vs NATTEN (when installed), plus the ideal = dense x block density.
  tiles      the tiles backend, forward and forward+backward, vs NATTEN (CPU: its eager Flex
             path), SDPA with a materialised mask, dense SDPA and the ideal; peak memory of the
             3-D case in a fresh process.
  beyond     beyond square self-attention: KV-cache decode per token at 8192 and 131072
             tokens of context (held tokens; vs SDPA over the whole cache), GQA on tiles with
             H/H_kv = 8 vs the same call with k/v repeated (time, peak RSS of fresh processes),
             77 extra tokens beside a 3-D 16x32x32 grid vs the grid alone plus dense stripes.
  compile    a small model (2 x [LayerNorm + NeighborhoodAttention2D + MLP]) under
             torch.compile(fullgraph=True) vs eager on CPU: the first call (the compile, caches
             off) and steady forward / forward+backward; not in the default list (minutes of
             compiling): run it with --only compile.
  sweep      auto against torch's best SDPA call for the same mask (is_causal for the causal
             mask, no mask for full, else a materialised bool or float mask, whichever is
             faster), forward and forward+backward, at 1 and 2 threads: causal, causal &
             window(w) for w from 64 to N/2, 2-D/3-D neighborhoods, N from 256 to 16,384;
             not in the default list (about 15 minutes): run it with --only sweep.
  steady     identical forward calls back to back (1-D 1,024 tokens, 2-D 32x32): min / median /
             p99 / max at 1 and 2 threads, idle and with another process spinning on one core;
             not in the default list: run it with --only steady.
  triton     (CUDA) the Triton kernel on NATTEN's published use cases and a 1M-token sliding
             window, fp16/bf16, D=128: vs dense SDPA, our flex backend and NATTEN (if
             installed), forward and forward+backward. On CPU, TRITON_INTERPRET=1 runs it on
             two tiny smoke cases (no meaningful timings).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import maskdsl as md  # noqa: E402
from maskdsl.codegen import blockmask as _bm, ir as _ir, program as _prog  # noqa: E402

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def clear_caches():
    from maskdsl._caching import clear_all

    clear_all()
    _bm._DIM_CACHE.clear()
    _ir._neighborhood_dim.cache_clear()


CASE_FILTER: set = set()    # --case: run only the cases with these exact names (empty: all)
CASES_SEEN: set = set()


def wanted(name: str) -> bool:
    if not CASE_FILTER:
        return True
    if name in CASE_FILTER:
        CASES_SEEN.add(name)
        return True
    return False


def timeit(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------- build

BUILD_CASES = [
    ("2-D 256x256 neighborhood((13, 13))", "neighborhood((13, 13))", (256, 256), True),
    ("1-D 65536 causal() & window(1024)", "causal() & window(1024)", (65536,), True),
    ("3-D 32x128x128 neighborhood((3, 13, 13))", "neighborhood((3, 13, 13))", (32, 128, 128), False),
    ("1-D 4194304 causal() & window(1024)", "causal() & window(1024)", (4194304,), False),
]


def ours_build(spec: str, shape: tuple, layout: str = "row-major") -> dict:
    """What a user calls: md.compile(...).block_mask() (row-major, the user's token order, with
    the q-indices the backward needs), or ``flex_inputs(layout="tiled")`` (the flex backend's
    own tiled order, fewer non-empty blocks)."""
    p = md.parse(spec)
    t0 = time.perf_counter()
    attn = md.compile(p, shape, 1, backend="flex")
    bm = attn.block_mask() if layout == "row-major" else attn.flex_inputs(layout).block_mask
    prog = attn.row_major_program() if layout == "row-major" else attn.program
    return {"seconds": time.perf_counter() - t0, "layout": prog.layout.describe(),
            "blocks": int((bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()).item())}


def child_build(spec: str, shape: tuple) -> dict:
    """Cold build in a fresh process: time and peak RSS (total, and above the import baseline)."""
    code = PEAK_RSS + (
        "import json, time, sys; sys.path.insert(0, %r)\n"
        "import maskdsl as md\n"
        "md.compile(md.window(1), (300,), backend='flex').block_mask()\n"
        "base = peak_mb()\n"
        "t0 = time.perf_counter(); a = md.compile(md.parse(%r), %r, 1, backend='flex')\n"
        "a.block_mask(); t = time.perf_counter() - t0\n"
        "peak = peak_mb()\n"
        "t0 = time.perf_counter(); a.flex_inputs('tiled'); t_tiled = time.perf_counter() - t0\n"
        "print(json.dumps({'seconds': t, 'peak_rss_mb': peak, 'above_import_mb': peak - base,"
        " 'layout': a.row_major_program().layout.describe(), 'tiled_extra_seconds': t_tiled,"
        " 'tiled_layout': a.program.layout.describe()}))\n" % (os.path.join(HERE, ".."), spec, tuple(shape)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _user_mask_mod(spec: str, shape: tuple):
    """The mask_mod a Flex user writes for the case (attention-gym's formulas: its sliding
    window, its NATTEN-style neighborhood with the window centre clamped inside the grid)."""
    if spec.startswith("causal() & window("):
        w = int(spec[len("causal() & window("):-1])

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)
        return sliding_window
    if spec.startswith("neighborhood((") and len(shape) == 2:
        kh, kw = (int(x) for x in spec[len("neighborhood(("):-2].split(","))
        rows, cols = shape

        def natten(b, h, q_idx, kv_idx):
            qr, qc, kr, kc = q_idx // cols, q_idx % cols, kv_idx // cols, kv_idx % cols
            cr = qr.clamp(kh // 2, rows - 1 - kh // 2)
            cc = qc.clamp(kw // 2, cols - 1 - kw // 2)
            return ((cr - kr).abs() <= kh // 2) & ((cc - kc).abs() <= kw // 2)
        return natten
    raise ValueError(f"no hand-written mask_mod for {spec}")


def peer_build(spec: str, shape: tuple, reps: int) -> dict:
    """torch.compile(create_block_mask) with the mask_mod a user writes: its first call (the
    compile) and its steady state; its blocks are checked against ours."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = _user_mask_mod(spec, shape)
    n = math.prod(shape)
    cbm = torch.compile(create_block_mask)
    t0 = time.perf_counter()
    theirs = cbm(mask_mod, 1, 1, n, n, device="cpu")
    first = time.perf_counter() - t0
    steady = timeit(lambda: cbm(mask_mod, 1, 1, n, n, device="cpu"), reps, warmup=1)
    ours = md.compile(md.parse(spec), shape, 1).block_mask()
    if not torch.equal(theirs.to_dense(), ours.to_dense()):
        raise AssertionError(f"{spec}: the hand-written mask_mod's blocks differ from ours")
    return {"first_call_seconds": first, "steady_seconds": steady,
            "peer": f"torch.compile(create_block_mask)({mask_mod.__name__}, hand-written)"}


def section_build(reps: int, rows: list):
    print("\n== BlockMask build (CPU) ==")
    print(f"{'case':44} {'row-major':>10} {'tiled':>9} {'create_block_mask':>18} {'compile':>9} "
          f"{'speedup':>8}")
    for name, spec, shape, with_peer in BUILD_CASES:
        if not wanted(name):
            continue
        if with_peer:
            times, tiled = [], []
            for _ in range(reps):
                clear_caches()
                r = ours_build(spec, shape)
                times.append(r["seconds"])
                clear_caches()
                rt = ours_build(spec, shape, "tiled")
                tiled.append(rt["seconds"])
            ours, ours_tiled = statistics.median(times), statistics.median(tiled)
            peer = peer_build(spec, shape, reps)
            speed = peer["steady_seconds"] / ours
            print(f"{name:44} {ours * 1e3:8.1f}ms {ours_tiled * 1e3:7.1f}ms "
                  f"{peer['steady_seconds'] * 1e3:16.1f}ms {peer['first_call_seconds']:8.1f}s "
                  f"{speed:7.0f}x   blocks {r['blocks']} row-major, {rt['blocks']} {rt['layout']}")
            rows.append({"section": "build", "case": name, "ours_seconds": ours,
                         "ours_tiled_seconds": ours_tiled,
                         "create_block_mask_steady_seconds": peer["steady_seconds"],
                         "create_block_mask_first_call_seconds": peer["first_call_seconds"],
                         "speedup": speed, "peer": peer["peer"], "layout": r["layout"], "blocks": r["blocks"],
                         "tiled_layout": rt["layout"], "tiled_blocks": rt["blocks"]})
        else:
            r = child_build(spec, shape)
            print(f"{name:44} {r['seconds'] * 1e3:8.1f}ms {'':>9} {'(not run)':>18} {'':>9} {'':>8}  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['above_import_mb']:.0f} MB above import), "
                  f"{r['layout']}; tiled ({r['tiled_layout']}) +{r['tiled_extra_seconds'] * 1e3:.0f} ms")
            rows.append(dict(section="build", case=name, ours_seconds=r.pop("seconds"), **r))


# ---------------------------------------------------------------------------------- cli

CLI_CASES = [
    ("show 1-D 1,048,576 causal() & window(1024) | sink(4)",
     ["show", "causal() & window(1024) | sink(4)", "--shape", "1048576"]),
    ("check 1-D 1,048,576 causal() & window(1024) | sink(4)",
     ["check", "causal() & window(1024) | sink(4)", "--shape", "1048576", "--quiet"]),
    ("show 3-D 32x128x128 neighborhood((3, 13, 13))",
     ["show", "neighborhood((3, 13, 13))", "--shape", "32x128x128"]),
    ("check 3-D 32x128x128 neighborhood((3, 13, 13))",
     ["check", "neighborhood((3, 13, 13))", "--shape", "32x128x128", "--quiet"]),
]


def section_cli(rows: list):
    """The command line on large grids, each in a fresh process (wall time, peak RSS)."""
    print("\n== Command line on large grids (fresh process each: wall time, peak RSS) ==")
    for name, argv in CLI_CASES:
        if not wanted(name):
            continue
        code = PEAK_RSS + (
            "import json, sys, time, io, contextlib; sys.path.insert(0, %r)\n"
            "t0 = time.perf_counter()\n"
            "from maskdsl.cli.main import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): code = main(%r)\n"
            "t = time.perf_counter() - t0\n"
            "last = [x for x in buf.getvalue().splitlines() if x.strip()][-1]\n"
            "print(json.dumps({'seconds': t, 'peak_rss_mb': peak_mb(), 'exit': code, 'last_line': last}))\n"
            % (os.path.join(HERE, ".."), argv))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:56} {r['seconds']:7.1f}s  peak RSS {r['peak_rss_mb']:6.0f} MB  exit {r['exit']}"
              f"  | {r['last_line'][:70]}")
        rows.append(dict(section="cli", case=name, command="maskdsl " + " ".join(argv), **r))


# ---------------------------------------------------------------------------------- scale

def _child(code: str) -> dict:
    full = PEAK_RSS + "import json, time, sys; sys.path.insert(0, %r)\nimport torch, maskdsl as md\n" % (
        os.path.join(HERE, "..")) + code
    out = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


SCALE_CODE = {
    # compile + tile classes of a 4M-token sliding window (stats() builds the recipe and reads it)
    "1-D 4,194,304 causal() & window(1024): compile + tile classes": (
        "t0 = time.perf_counter(); a = md.compile(md.causal() & md.window(1024), (4194304,))\n"
        "st = a.stats(); t = time.perf_counter() - t0\n"
        "print(json.dumps({'seconds': t, 'peak_rss_mb': peak_mb(), 'pairs': a.program.classes.nonempty()}))\n"),
    # 128 different patterns per head vs the same windows as per_head values: compile + first call
    "128 heads([window(i + 1)]) on 4096 tokens: compile + first tiles call": (
        "q = torch.randn(1, 128, 4096, 16)\n"
        "t0 = time.perf_counter(); a = md.compile(md.heads([md.window(i + 1) for i in range(128)]),"
        " (4096,), 128, backend='tiles'); a(q, q, q); t = time.perf_counter() - t0\n"
        "print(json.dumps({'seconds': t, 'peak_rss_mb': peak_mb()}))\n"),
    "128 per_head windows on 4096 tokens: compile + first tiles call": (
        "q = torch.randn(1, 128, 4096, 16)\n"
        "t0 = time.perf_counter(); a = md.compile(md.window(md.per_head([i + 1 for i in range(128)])),"
        " (4096,), 128, backend='tiles'); a(q, q, q); t = time.perf_counter() - t0\n"
        "print(json.dumps({'seconds': t, 'peak_rss_mb': peak_mb()}))\n"),
    # fresh document ids every step (sequence packing): the caches must not grow
    # VmRSS counts heap pages glibc keeps after torch frees the per-call temporaries (it raises
    # its mmap threshold after large frees); the second figure is VmRSS right after
    # malloc_trim(0), which returns those pages: the memory the process still holds.
    "200 compiles + calls of fresh document ids (4096 tokens): RSS": (
        "import ctypes\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "def trimmed():\n"
        "    ctypes.CDLL('libc.so.6').malloc_trim(0); return rss()\n"
        "g = torch.Generator().manual_seed(0); q = torch.randn(1, 2, 4096, 16); marks = {}; held = {}\n"
        "t0 = time.perf_counter()\n"
        "for step in range(1, 201):\n"
        "    cuts = torch.sort(torch.randint(0, 4096, (7,), generator=g)).values\n"
        "    ids = torch.bucketize(torch.arange(4096), cuts)\n"
        "    md.compile(md.document(ids), (4096,), 2, backend='tiles')(q, q, q)\n"
        "    if step in (20, 50, 100, 200): marks[step] = rss(); held[step] = trimmed()\n"
        "print(json.dumps({'seconds': time.perf_counter() - t0, 'rss_mb_at_step': marks,"
        " 'rss_mb_after_malloc_trim_at_step': held}))\n"),
}


def section_scale(rows: list):
    print("\n== Scale: memory and time of what users call (fresh process each) ==")
    for name, code in SCALE_CODE.items():
        if not wanted(name):
            continue
        r = _child(code)
        extra = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in r.items() if k != "seconds")
        print(f"{name:70} {r['seconds']:8.2f}s  {extra}")
        rows.append(dict(section="scale", case=name, **r))


# ---------------------------------------------------------------------------------- tiling

TILING_CASES = [
    ("2-D 128x128 neighborhood((13, 13))", "neighborhood((13, 13))", (128, 128)),
    ("2-D 256x256 neighborhood((13, 13))", "neighborhood((13, 13))", (256, 256)),
    ("2-D 128x128 neighborhood((7, 7), dilation=(2, 2))", "neighborhood((7, 7), dilation=(2, 2))", (128, 128)),
    ("3-D 16x32x32 neighborhood((3, 7, 7))", "neighborhood((3, 7, 7))", (16, 32, 32)),
    ("3-D 32x128x128 neighborhood((3, 13, 13))", "neighborhood((3, 13, 13))", (32, 128, 128)),
]


def section_tiling(rows: list):
    print("\n== Token tiling: block density (128-token blocks) ==")
    print(f"{'case':50} {'row-major':>10} {'tiled':>8} {'ratio':>6}  layout")
    for name, spec, shape in TILING_CASES:
        if not wanted(name):
            continue
        st = _prog.Program(md.parse(spec), None, shape, 1).stats()
        ratio = st["block_density"] / st["block_density_row_major"]
        print(f"{name:50} {st['block_density_row_major']:9.2%} {st['block_density']:7.2%} {ratio:6.2f}  {st['layout']}")
        rows.append({"section": "tiling", "case": name, **{k: v for k, v in st.items() if k != "layouts_tried"}})


# ---------------------------------------------------------------------------------- attention

def attention_cases(quick: bool):
    cases = [
        ("2-D 64x64 13x13 H=4 D=64", "neighborhood((13, 13))", (64, 64), 4, 64, (13, 13)),
        ("1-D 8192 causal & window(1024) H=4 D=64", "causal() & window(1024)", (8192,), 4, 64, None),
    ]
    if not quick:
        cases.append(("2-D 128x128 13x13 H=2 D=64", "neighborhood((13, 13))", (128, 128), 2, 64, (13, 13)))
    return cases


def natten_forward(q, k, v, shape, kernel, stride=None):
    """NATTEN's forward (heads-last layout); its eager Flex backend on CPU, its default on CUDA."""
    try:
        import natten
    except ImportError:
        return None
    B, H, N, D = q.shape
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    perm = lambda t: t.permute(0, 2, 1, 3).reshape(B, *shape, H, D).contiguous()
    qn, kn, vn = perm(q), perm(k), perm(v)
    kw = {} if q.is_cuda else {"backend": "flex-fna"}
    if stride is not None:
        kw["stride"] = stride
    return lambda: fn(qn, kn, vn, kernel_size=kernel, **kw)


def section_attention(reps: int, quick: bool, rows: list):
    import torch.nn.functional as F

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n== Attention forward ({dev}, fp32) ==")
    print(f"{'case':42} {'flex':>9} {'sdpa+mask':>10} {'dense':>9} {'natten':>9} {'ideal':>9} "
          f"{'vs mask':>8} {'vs natten':>9} {'/ideal':>7}")
    for name, spec, shape, H, D, kernel in attention_cases(quick):
        if not wanted(name):
            continue
        p = md.parse(spec)
        n = math.prod(shape)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, n, D, generator=g).to(dev) for _ in range(3))
        attn = md.compile(p, shape, H, backend="flex")
        with torch.no_grad():
            attn(q, k, v)                                   # compile
            t_flex = timeit(lambda: attn(q, k, v), reps)
            mask = md.reference.mask(p, shape, 1, device=dev)[0]
            t_mask = timeit(lambda m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m), reps)
            mask = None                                     # free it before the next peers
            t_dense = timeit(lambda: F.scaled_dot_product_attention(q, k, v), reps)
            fn = natten_forward(q, k, v, shape, kernel) if kernel else None
            t_nat = timeit(fn, max(1, reps // 2)) if fn else float("nan")
        density = attn.stats()["block_density"]
        ideal = t_dense * density
        print(f"{name:42} {t_flex * 1e3:7.1f}ms {t_mask * 1e3:8.1f}ms {t_dense * 1e3:7.1f}ms "
              f"{t_nat * 1e3:7.1f}ms {ideal * 1e3:7.1f}ms {t_mask / t_flex:7.1f}x "
              f"{t_nat / t_flex:8.1f}x {t_flex / ideal:6.1f}x")
        rows.append({"section": "attention", "case": name, "device": dev, "flex_seconds": t_flex,
                     "sdpa_mask_seconds": t_mask, "sdpa_dense_seconds": t_dense,
                     "natten_seconds": t_nat, "ideal_seconds": ideal, "block_density": density,
                     "speedup_vs_sdpa_mask": t_mask / t_flex, "speedup_vs_natten": t_nat / t_flex,
                     "flex_over_ideal": t_flex / ideal, "layout": attn.stats()["layout"]})


# ---------------------------------------------------------------------------------- tiles

TILES_CASES = [
    # name, spec, shape, heads, natten kernel (None: not a NATTEN pattern / too big to run)
    ("1-D 32768 causal & window(1024) H=1", "causal() & window(1024)", (32768,), 1, None),
    ("2-D 64x64 13x13 H=4", "neighborhood((13, 13))", (64, 64), 4, (13, 13)),
    ("2-D 128x128 13x13 H=2", "neighborhood((13, 13))", (128, 128), 2, (13, 13)),
    ("3-D 16x32x32 3x7x7 H=2", "neighborhood((3, 7, 7))", (16, 32, 32), 2, (3, 7, 7)),
]
SDPA_MASK_MAX_SCORES = 2 ** 30      # H * N^2 above this: the materialised-mask peer is not run


PEAK_RSS = (
    # VmHWM belongs to the process's own address space (reset by exec); ru_maxrss is not reset
    # by exec and would report the parent's high-water mark
    "def peak_mb():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) / 1024\n"
    "    import resource; return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n")


def tiles_peak_memory(spec: str, shape: tuple, heads: int, D: int = 64) -> float:
    """Peak RSS (MB) of a fresh process running one tiles forward+backward."""
    code = PEAK_RSS + (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "import maskdsl as md\n"
        "n = 1\nfor s in %r: n *= s\n"
        "q, k, v = (torch.randn(1, %d, n, %d, requires_grad=True) for _ in range(3))\n"
        "attn = md.compile(md.parse(%r), %r, %d, backend='tiles')\n"
        "attn(q, k, v).sum().backward()\n"
        "print(peak_mb())\n"
        % (os.path.join(HERE, ".."), tuple(shape), heads, D, spec, tuple(shape), heads))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def case_inputs(spec: str, shape: tuple, H: int, D: int = 64):
    """(pattern, N, q, k, v): a benchmark case's parsed pattern and seeded fp32 [1, H, N, D]
    inputs."""
    p = md.parse(spec)
    n = math.prod(shape)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
    return p, n, q, k, v


def section_tiles(reps: int, quick: bool, rows: list):
    import torch.nn.functional as F

    print("\n== tiles backend (CPU, fp32, D=64): forward and forward+backward ==")
    print(f"{'case':38} {'fwd':>8} {'natten':>9} {'sdpa+mask':>10} {'dense':>9} {'ideal':>8} "
          f"{'vs natten':>9} {'vs mask':>8} {'/ideal':>7} | {'fwd+bwd':>8} {'mask f+b':>9} {'vs mask':>8}")
    cases = TILES_CASES[1:2] if quick else TILES_CASES
    for name, spec, shape, H, kernel in cases:
        if not wanted(name):
            continue
        p, n, q, k, v = case_inputs(spec, shape, H)
        attn = md.compile(p, shape, H, backend="tiles")
        with torch.no_grad():
            t_tiles = timeit(lambda: attn(q, k, v), reps)
            t_dense = timeit(lambda: F.scaled_dot_product_attention(q, k, v), max(1, reps // 2))
            fn = natten_forward(q, k, v, shape, kernel) if kernel else None
            t_nat = timeit(fn, 1, warmup=1) if fn else float("nan")
            mask = None
            if H * n * n <= SDPA_MASK_MAX_SCORES:
                mask = md.reference.mask(p, shape, 1)[0]
                t_mask = timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), max(1, reps // 2))
            else:
                t_mask = float("nan")
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        t_tiles_fb = timeit(lambda: attn(qg, kg, vg).sum().backward(), max(1, reps // 2))
        if mask is not None:
            t_mask_fb = timeit(lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask).sum().backward(), 1)
        else:
            t_mask_fb = float("nan")
        density = attn.tiles_program.stats()["block_density"]
        ideal = t_dense * density
        print(f"{name:38} {t_tiles * 1e3:6.1f}ms {t_nat * 1e3:7.0f}ms {t_mask * 1e3:8.1f}ms "
              f"{t_dense * 1e3:7.1f}ms {ideal * 1e3:6.1f}ms {t_nat / t_tiles:8.1f}x "
              f"{t_mask / t_tiles:7.1f}x {t_tiles / ideal:6.2f}x | {t_tiles_fb * 1e3:6.1f}ms "
              f"{t_mask_fb * 1e3:7.1f}ms {t_mask_fb / t_tiles_fb:7.1f}x")
        row = {"section": "tiles", "case": name, "tiles_fwd_seconds": t_tiles,
               "natten_fwd_seconds": t_nat, "sdpa_mask_fwd_seconds": t_mask,
               "sdpa_dense_fwd_seconds": t_dense, "ideal_fwd_seconds": ideal,
               "block_density": density, "layout": attn.tiles_program.layout.describe(),
               "tiles_fwd_bwd_seconds": t_tiles_fb, "sdpa_mask_fwd_bwd_seconds": t_mask_fb,
               "speedup_vs_natten": t_nat / t_tiles, "speedup_vs_sdpa_mask": t_mask / t_tiles,
               "tiles_over_ideal": t_tiles / ideal, "fwd_bwd_speedup_vs_sdpa_mask": t_mask_fb / t_tiles_fb}
        if len(shape) == 3:
            row["peak_rss_mb_fwd_bwd"] = tiles_peak_memory(spec, shape, H)
            print(f"{'':38} peak RSS of a fresh process running forward+backward: "
                  f"{row['peak_rss_mb_fwd_bwd']:.0f} MB")
        rows.append(row)


# ---------------------------------------------------------------------------------- steady

STEADY_CASES = [
    ("1-D 1024 causal & window(256)", "causal() & window(256)", (1024,), 4),
    ("1-D 1024 causal", "causal()", (1024,), 4),
    ("2-D 32x32 neighborhood(7)", "neighborhood((7, 7))", (32, 32), 4),
]


def _spin(stop):
    """Busy-loops one core until ``stop`` is set (another process holding a core)."""
    while not stop.is_set():
        pass


def section_steady(rows: list, calls: int = 300):
    """Identical forward calls back to back: min / median / p99 / max, at 1 and 2 threads,
    with the machine idle and with another process spinning on one core."""
    import multiprocessing as mp

    print("\n== steady timings: identical forward calls (CPU, fp32, D=64, B=1), "
          f"{calls} calls each ==")
    print(f"{'case':32} {'thr':>3} {'load':>10} {'backend':>7} {'min':>8} {'median':>8} "
          f"{'p99':>8} {'max':>8} {'max/med':>8}")
    saved = torch.get_num_threads()
    for name, spec, shape, H in STEADY_CASES:
        if not wanted(name):
            continue
        p, n, q, k, v = case_inputs(spec, shape, H)
        attn = md.compile(p, shape, H)
        for load in ("idle", "1 core busy"):
            stop, proc = None, None
            if load != "idle":
                stop = mp.Event()
                proc = mp.Process(target=_spin, args=(stop,), daemon=True)
                proc.start()
                time.sleep(0.2)
            try:
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    times = []
                    with torch.no_grad():
                        for _ in range(20):
                            attn(q, k, v)
                        for _ in range(calls):
                            t0 = time.perf_counter()
                            attn(q, k, v)
                            times.append(time.perf_counter() - t0)
                    times.sort()
                    med = statistics.median(times)
                    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
                    print(f"{name:32} {threads:>3} {load:>10} {attn.backend:>7} "
                          f"{times[0] * 1e3:6.2f}ms {med * 1e3:6.2f}ms {p99 * 1e3:6.2f}ms "
                          f"{times[-1] * 1e3:6.2f}ms {times[-1] / med:7.1f}x")
                    rows.append({"section": "steady", "case": name, "threads": threads,
                                 "load": load, "heads": H, "backend": attn.backend,
                                 "calls": calls, "min_seconds": times[0],
                                 "median_seconds": med, "p99_seconds": p99,
                                 "max_seconds": times[-1]})
            finally:
                if proc is not None:
                    stop.set()
                    proc.join()
    torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------- sweep

def sweep_cases():
    """(name, spec, shape, heads): causal, causal & window(w) for w from 64 to N/2, 2-D
    neighborhoods from 7 to half the grid, 3-D ones, N from 256 to 16,384 (beyond, a
    materialised-mask peer no longer fits this machine's memory)."""
    out = []
    for n in (256, 1024, 4096, 16384):
        H = 4 if n < 16384 else 2
        out.append((f"1-D {n} causal", "causal()", (n,), H))
        for w in sorted({64, n // 8, n // 2}):
            if 64 <= w <= n // 2:
                out.append((f"1-D {n} causal & window({w})", f"causal() & window({w})", (n,), H))
    for side, kernels in ((16, (7, 8)), (32, (7, 16)), (64, (7, 13, 32)), (128, (13, 64))):
        H = 4 if side < 128 else 2
        for kk in kernels:
            out.append((f"2-D {side}x{side} neighborhood({kk})", f"neighborhood(({kk}, {kk}))",
                        (side, side), H))
    out.append(("3-D 8x16x16 neighborhood((3, 7, 7))", "neighborhood((3, 7, 7))", (8, 16, 16), 4))
    out.append(("3-D 16x32x32 neighborhood((3, 7, 7))", "neighborhood((3, 7, 7))", (16, 32, 32),
                2))
    return out


def sdpa_peers(p, shape, H):
    """(name, kwargs) of the SDPA calls that compute this exact attention: no mask when the
    pattern is full, is_causal=True when it is the causal mask, else a materialised bool and a
    float mask (none when H * N^2 > SDPA_MASK_MAX_SCORES: it would not fit)."""
    from maskdsl.kernels.sdpa import kind

    n = math.prod(shape)
    found = kind(p, shape)
    if found == "full":
        return [("sdpa", {})]
    if found == "causal":
        return [("sdpa is_causal", {"is_causal": True})]
    if H * n * n > SDPA_MASK_MAX_SCORES:
        return []
    mask = md.reference.mask(p, shape, 1)[0]
    return [("sdpa + bool mask", {"attn_mask": mask}),
            ("sdpa + float mask", {"attn_mask": torch.zeros(n, n).masked_fill_(~mask,
                                                                              float("-inf"))})]


def interleaved(fns, reps: int) -> list:
    """Median seconds of each of ``fns``, timed in turn within every repetition (one warm-up
    call each), so that drift and noise fall on all of them alike."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def section_sweep(reps: int, quick: bool, rows: list):
    import torch.nn.functional as F

    print("\n== sweep: auto vs torch's best SDPA call for the same mask (CPU, fp32, D=64, B=1) ==")
    print("ratio = best SDPA time / maskdsl time (>= 1: maskdsl at least as fast); each row's "
          "calls timed in turn, median of R repetitions")
    print(f"{'case':40} {'thr':>3} {'backend':>7} {'R':>3} {'fwd':>9} {'best sdpa':>9} "
          f"{'ratio':>6} | {'fwd+bwd':>9} {'best sdpa':>9} {'ratio':>6}  peer")
    cases = sweep_cases()
    if quick:
        cases = [c for c in cases if math.prod(c[2]) <= 1024]
    saved = torch.get_num_threads()
    for name, spec, shape, H in cases:
        if not wanted(name):
            continue
        p, n, q, k, v = case_inputs(spec, shape, H)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        attn = md.compile(p, shape, H)
        peers = sdpa_peers(p, shape, H)
        # sub-millisecond calls need many repetitions for a stable median
        r = 31 if n <= 1024 else reps if n <= 4096 else max(2, reps // 2)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                fwd = interleaved([lambda: attn(q, k, v)] + [
                    (lambda kw=kw: F.scaled_dot_product_attention(q, k, v, **kw))
                    for _, kw in peers], r)
            fb = interleaved([lambda: attn(qg, kg, vg).sum().backward()] + [
                (lambda kw=kw: F.scaled_dot_product_attention(qg, kg, vg, **kw).sum().backward())
                for _, kw in peers], r)
            t_ours, t_ours_fb = fwd[0], fb[0]
            i = min(range(len(peers)), key=lambda j: fwd[1 + j]) if peers else None
            j = min(range(len(peers)), key=lambda j: fb[1 + j]) if peers else None
            t_peer = fwd[1 + i] if peers else float("nan")
            t_peer_fb = fb[1 + j] if peers else float("nan")
            peer = peers[i][0] if peers else "none fits"
            peer_fb = peers[j][0] if peers else "none fits"
            ratio, ratio_fb = t_peer / t_ours, t_peer_fb / t_ours_fb
            print(f"{name:40} {threads:>3} {attn.backend:>7} {r:>3} {t_ours * 1e3:7.2f}ms "
                  f"{t_peer * 1e3:7.2f}ms {ratio:5.2f}x | {t_ours_fb * 1e3:7.2f}ms "
                  f"{t_peer_fb * 1e3:7.2f}ms {ratio_fb:5.2f}x  {peer}"
                  + (f" / {peer_fb}" if peer_fb != peer else ""), flush=True)
            rows.append({"section": "sweep", "case": name, "threads": threads, "heads": H,
                         "backend": attn.backend, "repetitions": r, "ours_fwd_seconds": t_ours,
                         "best_sdpa_fwd_seconds": t_peer, "best_sdpa_fwd": peer,
                         "ratio_fwd": ratio, "ours_fwd_bwd_seconds": t_ours_fb,
                         "best_sdpa_fwd_bwd_seconds": t_peer_fb, "best_sdpa_fwd_bwd": peer_fb,
                         "ratio_fwd_bwd": ratio_fb})
    torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------- triton

# NATTEN's published use cases (forward, fp16, head dim 128) with its Hopper-FNA speedups over
# cuDNN; the target is >= 0.8x of each.
TRITON_CASES = [
    # name, spec, shape, heads, NATTEN's speedup (None: no published number)
    ("1-D 32768 window 2048", "neighborhood(2048)", (32768,), 8, 8.3),
    ("1-D 32768 window 2048 stride 256", "neighborhood(2048, stride=256)", (32768,), 8, 12.6),
    ("2-D 256x256 window 80x80", "neighborhood((80, 80))", (256, 256), 8, 6.0),
    ("2-D 256x256 window 80x80 stride 16", "neighborhood((80, 80), stride=(16, 16))", (256, 256), 8, 12.3),
    ("3-D 30x48x80 window 18x24x24", "neighborhood((18, 24, 24))", (30, 48, 80), 8, 3.6),
    ("3-D 30x48x80 window 18x24x24 stride 16x8x8",
     "neighborhood((18, 24, 24), stride=(16, 8, 8))", (30, 48, 80), 8, 12.1),
    ("1-D 1048576 causal sliding window 2048", "causal() & window(2048)", (1 << 20,), 8, None),
]
TRITON_SMOKE_CASES = [   # CPU under TRITON_INTERPRET=1: exercises the harness only, no timings
    ("1-D 64 window 8 (smoke)", "neighborhood(8)", (64,), 1, None),
    ("2-D 8x8 window 3x3 stride 2 (smoke)", "neighborhood((3, 3), stride=(2, 2))", (8, 8), 1, None),
]
DENSE_MAX_TOKENS_BENCH = 1 << 18     # dense SDPA beyond this is not run (minutes per call)


def section_triton(reps: int, quick: bool, rows: list):
    """The Triton kernel vs dense SDPA (cuDNN/Flash), our flex backend and NATTEN (when
    installed), forward and forward+backward, fp16 and bf16, head dim 128."""
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("\n== triton: skipped (needs CUDA; TRITON_INTERPRET=1 runs a smoke test) ==")
        return
    dev = "cuda" if cuda else "cpu"
    cases = TRITON_CASES if cuda else TRITON_SMOKE_CASES
    dtypes = [torch.float16, torch.bfloat16] if cuda and not quick else [torch.float16]
    D = 128 if cuda else 16
    print(f"\n== triton kernel ({dev}, D={D}): forward and forward+backward ==")
    print(f"{'case':44} {'dtype':>8} {'triton':>9} {'sdpa':>9} {'flex':>9} {'natten':>9} "
          f"{'vs sdpa':>8} {'target':>7} {'vs flex':>8} | {'tri f+b':>9} {'flex f+b':>9}")
    for name, spec, shape, H, published in cases:
        if not wanted(name):
            continue
        p = md.parse(spec)
        n = math.prod(shape)
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, H, n, D, generator=g).to(dev, dtype) for _ in range(3))
            tri = md.compile(p, shape, H, backend="triton")
            nan = float("nan")
            with torch.no_grad():
                t_tri = timeit(lambda: tri(q, k, v), reps)
                t_sdpa = (timeit(lambda: F.scaled_dot_product_attention(q, k, v), reps)
                          if n <= DENSE_MAX_TOKENS_BENCH else nan)
                t_flex = t_nat = nan
                if cuda:
                    try:
                        flex = md.compile(p, shape, H, backend="flex")
                        t_flex = timeit(lambda: flex(q, k, v), reps)
                    except (md.MaskDSLError, RuntimeError, torch.OutOfMemoryError) as e:
                        print(f"  flex not run: {str(e).splitlines()[0][:100]}")
                    kernel = getattr(p, "kernel_size", None)
                    try:
                        fn = (natten_forward(q, k, v, shape, kernel, getattr(p, "stride", None))
                              if kernel is not None else None)
                        t_nat = timeit(fn, reps) if fn else nan
                    except Exception as e:       # NATTEN's own limits (dtype, head dim, GPU arch)
                        print(f"  natten not run: {str(e).splitlines()[0][:100]}")
            t_tri_fb = t_flex_fb = nan
            if cuda:
                qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                t_tri_fb = timeit(lambda: tri(qg, kg, vg).sum().backward(), reps)
                if t_flex == t_flex:
                    t_flex_fb = timeit(lambda: flex(qg, kg, vg).sum().backward(), reps)
            target = 0.8 * published if published else nan
            print(f"{name:44} {str(dtype)[6:]:>8} {t_tri * 1e3:7.2f}ms {t_sdpa * 1e3:7.2f}ms "
                  f"{t_flex * 1e3:7.2f}ms {t_nat * 1e3:7.2f}ms {t_sdpa / t_tri:7.1f}x "
                  f"{target:6.1f}x {t_flex / t_tri:7.2f}x | {t_tri_fb * 1e3:7.2f}ms "
                  f"{t_flex_fb * 1e3:7.2f}ms")
            rows.append({"section": "triton", "case": name, "device": dev, "dtype": str(dtype),
                         "head_dim": D, "heads": H, "triton_fwd_seconds": t_tri,
                         "sdpa_fwd_seconds": t_sdpa, "flex_fwd_seconds": t_flex,
                         "natten_fwd_seconds": t_nat, "speedup_vs_sdpa": t_sdpa / t_tri,
                         "target_speedup_vs_sdpa": target, "speedup_vs_flex": t_flex / t_tri,
                         "triton_fwd_bwd_seconds": t_tri_fb, "flex_fwd_bwd_seconds": t_flex_fb})


# ---------------------------------------------------------------------------------- compile

def _child_peak(code: str) -> float:
    """Peak RSS (MB) of a fresh process running ``code`` (maskdsl importable)."""
    full = PEAK_RSS + ("import sys, torch; sys.path.insert(0, %r)\nimport maskdsl as md\n"
                       % os.path.join(HERE, "..")) + code + "\nprint(peak_mb())\n"
    out = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def section_beyond(reps: int, rows: list):
    """Beyond square self-attention: decode with a KV cache, GQA without copies, extra
    tokens beside a video grid (the targets of ARCHITECTURE.md, "Extra tokens" and "Sub-ranges
    and the KV cache")."""
    import torch.nn.functional as F

    print("\n== KV cache decode (CPU, fp32, H=8, H_kv=2, D=64): causal() & (window(4096) | "
          "sink(4)), one token per step ==")
    print(f"{'context':>8} {'thr':>3} {'held':>6} {'slots':>6} {'lookback':>9} {'ours/token':>11} "
          f"{'sdpa over the whole cache':>26} {'ours/sdpa':>9} {'sdpa over the kept keys':>23} "
          f"{'ours/kept':>9}")
    p = md.causal() & (md.window(4096) | md.sink(4))
    per_token = {}
    for n in (8192, 131072):
        name = f"decode at {n} tokens of context"
        if not wanted(name):
            continue
        attn = md.compile(p, (n,), 8)
        t0 = time.perf_counter()
        lb = attn.lookback
        t_lookback = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        ctx = n - 512                 # room for the timed steps at 1 and 2 threads
        k = torch.randn(1, 2, ctx, 64, generator=g)
        v = torch.randn(1, 2, ctx, 64, generator=g)
        cache = attn.kv_cache(1, 2, 64)
        cache.append(k, v)
        q1, k1, v1 = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)
        # the peer: SDPA of the new query over the whole cache (what a plain KV cache does),
        # with the pattern's row as a bool mask and k/v expanded to 8 heads (SDPA's enable_gqa)
        kf, vf = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
        pos = torch.arange(ctx + 1)
        row = ((pos >= ctx - 4096) | (pos < 4))[None, None, None, :]
        # and SDPA over just the keys the pattern keeps (the 4 sinks and the last 4096 with
        # the new one): what a hand-written sliding cache would run
        kept = torch.cat([torch.arange(4), torch.arange(ctx - 4096 + 1, ctx + 1)])
        kk, vk = kf.index_select(2, kept), vf.index_select(2, kept)
        saved = torch.get_num_threads()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                steps = max(8, 4 * reps)
                fns = [lambda: cache.step(q1, k1, v1),
                       lambda: F.scaled_dot_product_attention(q1, kf, vf, attn_mask=row,
                                                              enable_gqa=True),
                       lambda: F.scaled_dot_product_attention(q1, kk, vk, enable_gqa=True)]
                for _ in range(2):
                    for f in fns:
                        f()
                times = [[] for _ in fns]
                for _ in range(steps):          # in turn: drift falls on all three alike
                    for i, f in enumerate(fns):
                        t0 = time.perf_counter()
                        f()
                        times[i].append(time.perf_counter() - t0)
                t_ours, t_sdpa, t_kept = (statistics.median(t) for t in times)
            if threads == saved:
                per_token[n] = t_ours
            print(f"{n:8d} {threads:3d} {cache.held:6d} {cache.capacity:6d} {t_lookback:8.2f}s "
                  f"{t_ours * 1e3:9.3f}ms {t_sdpa * 1e3:24.3f}ms {t_ours / t_sdpa:8.2f}x "
                  f"{t_kept * 1e3:21.3f}ms {t_ours / t_kept:8.2f}x")
            rows.append({"section": "beyond", "case": name, "threads": threads,
                         "held_tokens": cache.held, "slots": cache.capacity, "lookback": str(lb),
                         "lookback_seconds": t_lookback, "ours_per_token_seconds": t_ours,
                         "sdpa_full_cache_per_token_seconds": t_sdpa,
                         "ours_over_sdpa": t_ours / t_sdpa,
                         "sdpa_kept_keys_per_token_seconds": t_kept,
                         "ours_over_sdpa_kept_keys": t_ours / t_kept})
        torch.set_num_threads(saved)
    if len(per_token) == 2:
        ratio = per_token[131072] / per_token[8192]
        print(f"decode per token at 131072 / at 8192: {ratio:.2f}x (target <= 1.5x)")
        rows.append({"section": "beyond", "case": "decode 131072 / 8192", "ratio": ratio})

    print("\n== GQA on tiles (CPU, fp32, H=8, H_kv=1, D=64): k/v of 1 head vs the same call "
          "with k/v repeated to 8 heads (the repeat included) ==")
    print(f"{'case':36} {'gqa fwd':>9} {'rep fwd':>9} {'gqa/rep':>8} | {'gqa f+b':>9} "
          f"{'rep f+b':>9} {'gqa/rep':>8} | {'gqa MB':>7} {'rep MB':>7}")
    for name, spec, shape in [("2-D 64x64 neighborhood((13, 13))", "neighborhood((13, 13))", (64, 64)),
                              ("1-D 32768 causal() & window(1024)", "causal() & window(1024)", (32768,))]:
        if not wanted(name):
            continue
        n = math.prod(shape)
        attn = md.compile(md.parse(spec), shape, 8, backend="tiles")
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 8, n, 64, generator=g)
        k, v = torch.randn(1, 1, n, 64, generator=g), torch.randn(1, 1, n, 64, generator=g)

        def rep(q, k, v):
            return attn(q, k.repeat_interleave(8, 1), v.repeat_interleave(8, 1))

        with torch.no_grad():
            t_g = timeit(lambda: attn(q, k, v), reps)
            t_r = timeit(lambda: rep(q, k, v), reps)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        t_gb = timeit(lambda: attn(qg, kg, vg).sum().backward(), max(1, reps // 2))
        t_rb = timeit(lambda: rep(qg, kg, vg).sum().backward(), max(1, reps // 2))
        setup = ("n = 1\nfor s in %r: n *= s\nattn = md.compile(md.parse(%r), %r, 8, backend='tiles')\n"
                 "q = torch.randn(1, 8, n, 64, requires_grad=True)\n"
                 "k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(2))\n"
                 % (tuple(shape), spec, tuple(shape)))
        mb_g = _child_peak(setup + "attn(q, k, v).sum().backward()")
        mb_r = _child_peak(setup + "attn(q, k.repeat_interleave(8, 1), v.repeat_interleave(8, 1))"
                                   ".sum().backward()")
        print(f"{name:36} {t_g * 1e3:7.1f}ms {t_r * 1e3:7.1f}ms {t_g / t_r:7.2f}x | "
              f"{t_gb * 1e3:7.1f}ms {t_rb * 1e3:7.1f}ms {t_gb / t_rb:7.2f}x | {mb_g:7.0f} {mb_r:7.0f}")
        rows.append({"section": "beyond", "case": f"gqa {name}", "gqa_fwd_seconds": t_g,
                     "repeated_fwd_seconds": t_r, "gqa_over_repeated_fwd": t_g / t_r,
                     "gqa_fwd_bwd_seconds": t_gb, "repeated_fwd_bwd_seconds": t_rb,
                     "gqa_over_repeated_fwd_bwd": t_gb / t_rb,
                     "gqa_peak_rss_mb_fwd_bwd": mb_g, "repeated_peak_rss_mb_fwd_bwd": mb_r})

    print("\n== extra tokens (CPU, fp32, H=4, D=64): 3-D 16x32x32 neighborhood((3, 7, 7)) + 77 "
          "text tokens vs the grid alone + dense 77-token stripes ==")
    name = "3-D 16x32x32 neighborhood((3, 7, 7)) + 77 extra tokens"
    if wanted(name):
        shape, E, H = (16, 32, 32), 77, 4
        N = math.prod(shape)
        pat = md.neighborhood((3, 7, 7))
        ext = md.compile(pat, shape, H, backend="tiles", extra_tokens=E)
        grid = md.compile(pat, shape, H, backend="tiles")
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, N + E, 64, generator=g) for _ in range(3))
        qg, kg, vg = (x[:, :, :N].contiguous() for x in (q, k, v))

        def parts():
            grid(qg, kg, vg)
            F.scaled_dot_product_attention(qg, k[:, :, N:], v[:, :, N:])    # grid x text
            F.scaled_dot_product_attention(q[:, :, N:], k, v)                 # text x all

        with torch.no_grad():
            t_ext = timeit(lambda: ext(q, k, v), reps)
            t_grid = timeit(lambda: grid(qg, kg, vg), reps)
            t_parts = timeit(parts, reps)
        print(f"extra tokens {t_ext * 1e3:.1f} ms | grid alone {t_grid * 1e3:.1f} ms | grid + "
              f"dense stripes {t_parts * 1e3:.1f} ms | ours / (grid + stripes) "
              f"{t_ext / t_parts:.2f}x (target <= 1.2x)")
        rows.append({"section": "beyond", "case": name, "extra_fwd_seconds": t_ext,
                     "grid_fwd_seconds": t_grid, "grid_plus_stripes_seconds": t_parts,
                     "ours_over_grid_plus_stripes": t_ext / t_parts})


def section_compile(reps: int, rows: list):
    """maskdsl under torch.compile(fullgraph=True): compile time and steady speed vs eager."""
    import torch._dynamo
    import torch._inductor.config
    from maskdsl.nn import NeighborhoodAttention2D

    class Block(torch.nn.Module):
        def __init__(self, dim, heads, kernel):
            super().__init__()
            self.ln = torch.nn.LayerNorm(dim)
            self.na = NeighborhoodAttention2D(dim, heads, kernel)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                           torch.nn.Linear(4 * dim, dim))

        def forward(self, x):
            x = x + self.na(self.ln(x))
            return x + self.mlp(self.ln(x))

    print("\n== torch.compile(fullgraph=True) vs eager (CPU, fp32): 2 x [LayerNorm + "
          "NeighborhoodAttention2D + MLP] ==")
    print(f"{'case':34} {'graphs':>6} {'breaks':>6} {'compile fwd':>11} {'compile f+b':>11} | "
          f"{'eager fwd':>9} {'comp fwd':>9} {'speedup':>7} | {'eager f+b':>9} {'comp f+b':>9} "
          f"{'speedup':>7}")
    torch._inductor.config.force_disable_caches = True      # measure the real compile
    for name, dim, heads, grid, kernel, batch in [
            ("dim 64, 4 heads, 16x16, 7x7, B=2", 64, 4, 16, 7, 2),
            ("dim 128, 4 heads, 32x32, 7x7, B=2", 128, 4, 32, 7, 2)]:
        if not wanted(name):
            continue
        torch.manual_seed(0)
        model = torch.nn.Sequential(Block(dim, heads, kernel), Block(dim, heads, kernel))
        x = torch.randn(batch, grid, grid, dim)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)

        def fwd_bwd(fn):
            model.zero_grad(set_to_none=True)
            fn(x).square().mean().backward()

        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        t_compile_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        fwd_bwd(compiled)
        t_compile_fb = time.perf_counter() - t0
        with torch.no_grad():
            t_eager = timeit(lambda: model(x), reps)
            t_comp = timeit(lambda: compiled(x), reps)
        t_eager_fb = timeit(lambda: fwd_bwd(model), reps)
        t_comp_fb = timeit(lambda: fwd_bwd(compiled), reps)
        print(f"{name:34} {explained.graph_count:6d} {explained.graph_break_count:6d} "
              f"{t_compile_fwd:10.1f}s {t_compile_fb:10.1f}s | {t_eager * 1e3:7.1f}ms "
              f"{t_comp * 1e3:7.1f}ms {t_eager / t_comp:6.2f}x | {t_eager_fb * 1e3:7.1f}ms "
              f"{t_comp_fb * 1e3:7.1f}ms {t_eager_fb / t_comp_fb:6.2f}x")
        rows.append({"section": "compile", "case": name, "graphs": explained.graph_count,
                     "graph_breaks": explained.graph_break_count,
                     "first_call_fwd_seconds": t_compile_fwd,
                     "first_call_fwd_bwd_seconds": t_compile_fb,
                     "eager_fwd_seconds": t_eager, "compiled_fwd_seconds": t_comp,
                     "eager_fwd_bwd_seconds": t_eager_fb, "compiled_fwd_bwd_seconds": t_comp_fb,
                     "fwd_speedup": t_eager / t_comp, "fwd_bwd_speedup": t_eager_fb / t_comp_fb})
    torch._inductor.config.force_disable_caches = False
    torch._dynamo.reset()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="build,scale,cli,tiling,attention,tiles,beyond,triton")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--case", action="append", default=[], metavar="NAME",
                    help="run only the case with exactly this name, as printed (repeatable)")
    args = ap.parse_args()
    CASE_FILTER.update(args.case)
    reps = args.reps or (2 if args.quick else 5)
    torch.manual_seed(0)
    meta = {"device": device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "maskdsl": md.__version__, "threads": torch.get_num_threads(),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"device: {meta['device']} | torch {meta['torch']} | threads {meta['threads']}")
    print(f"command: {meta['command']}")
    rows = []
    only = set(args.only.split(","))
    if "build" in only:
        section_build(reps, rows)
    if "scale" in only:
        section_scale(rows)
    if "cli" in only:
        section_cli(rows)
    if "tiling" in only:
        section_tiling(rows)
    if "attention" in only:
        section_attention(reps, args.quick, rows)
    if "tiles" in only:
        section_tiles(reps, args.quick, rows)
    if "triton" in only:
        section_triton(reps, args.quick, rows)
    if "beyond" in only:
        section_beyond(reps, rows)
    if "compile" in only:
        section_compile(reps, rows)
    if "sweep" in only:
        section_sweep(reps, args.quick, rows)
    if "steady" in only:
        section_steady(rows)
    os.makedirs(args.out, exist_ok=True)
    tag = ("cuda-" if torch.cuda.is_available() else "cpu-") + datetime.date.today().isoformat()
    path = os.path.join(args.out, f"{tag}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=float)
    print(f"\nwrote {os.path.relpath(path)}")
    missing = CASE_FILTER - CASES_SEEN
    if missing:
        print(f"--case: no case named {sorted(missing)} among those --only {args.only}"
              f"{' --quick' if args.quick else ''} runs here", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
