"""The ``maskdsl`` command line.

    maskdsl show    SPEC --shape 64x64 [--heads H] [--head h] [--query 10,20] [--blocks] [--png FILE]
    maskdsl explain SPEC --shape 64x64 [--heads H] [--score S]
    maskdsl check   SPEC --shape 64x64 [--heads H] [--score S] [--backend B] [--rows R]
    maskdsl bench   SPEC --shape 64x64 [--heads H] [--score S] [--backend B] [--dim D] [--reps R]
    maskdsl names   (every DSL name with its signature)
    maskdsl --version

Bad input prints one line naming what is wrong and exits with code 2. Every subcommand stays
within O(tiles + drawn cells + checked rows) memory (ARCHITECTURE.md, "Command line").
"""
from __future__ import annotations

import argparse
import sys
import inspect
import statistics
import time
import torch
import torch.nn.functional as F
import itertools
import numpy as np
import os

from maskdsl import reference
from maskdsl._version import __version__
from maskdsl._errors import MaskDSLError
from maskdsl._memory import check_allocation
from maskdsl.dsl.node import DSL_NAMES
from maskdsl.dsl.parse import parse
from maskdsl.dsl.pattern import Pattern
from maskdsl.dsl.score import Dropout, Score, score_terms
from maskdsl.runtime.compiled import compile, validate
from maskdsl.runtime.keep import next_keep_mask
from .draw import draw_classes, picture
from .png import write_png

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, never a usage dump
        sub = self.prog.split()[1:]
        raise MaskDSLError(f"{sub[0]}: {message}" if sub else message)


def _shape(text: str) -> tuple:
    try:
        out = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise MaskDSLError(f"--shape={text!r}: expected sizes joined by 'x', e.g. 64x64") from None
    if not 1 <= len(out) <= 3 or any(s < 1 for s in out):
        raise MaskDSLError(f"--shape={text!r}: expected 1 to 3 positive sizes joined by 'x', e.g. 64x64")
    return out


def _coords(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise MaskDSLError(f"--query={text!r}: expected comma-separated ints, e.g. 10,20") from None


def _common(p: argparse.ArgumentParser):
    p.add_argument("spec", help="the pattern, e.g. 'neighborhood((7, 7)) & causal(dims=(0,))'")
    p.add_argument("--shape", required=True, type=str, help="token grid, e.g. 64x64")
    p.add_argument("--heads", type=int, default=1, help="number of heads (default 1)")
    p.add_argument("--score", default=None, help="score terms, e.g. 'softcap(30.0)'")


def _build_parser() -> _Parser:
    parser = _Parser(prog="maskdsl", description="Compile, draw and check attention locality patterns.",
                     epilog="DSL names (maskdsl names lists their signatures): " + ", ".join(_names())
                     + ". Combine patterns with & | ~ and score terms with +.")
    parser.add_argument("--version", action="version", version=f"maskdsl {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    show = sub.add_parser("show", help="draw the mask in the terminal (or a PNG)")
    _common(show)
    show.add_argument("--head", type=int, default=None, help="draw only this head")
    show.add_argument("--query", type=str, default=None,
                      help="grid coordinates of the query to draw on the grid (default: the centre)")
    show.add_argument("--width", type=int, default=64,
                      help=f"columns of the pictures, {_WIDTH[0]} to {_WIDTH[1]} (default 64)")
    show.add_argument("--blocks", action="store_true",
                      help="also draw the compiled tiles (after token tiling): full / partial / empty")
    show.add_argument("--png", default=None, metavar="FILE",
                      help="also write the pictures to a PNG (needs the viz extra: matplotlib)")
    explain = sub.add_parser("explain", help="what the pattern compiles to, and why")
    _common(explain)
    explain.add_argument("--backend", default="auto", help=_BACKEND_HELP)
    bench = sub.add_parser("bench", help="time the compiled attention against SDPA on this device")
    _common(bench)
    bench.add_argument("--backend", default="auto",
                       help=_BACKEND_HELP + "; a comma list times several, e.g. auto,tiles")
    bench.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    bench.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
    bench.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is reported (default 3)")
    check = sub.add_parser("check", help="run the compiled attention against the reference")
    _common(check)
    check.add_argument("--backend", default="auto", help=_BACKEND_HELP)
    check.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    check.add_argument("--dim", type=int, default=16, help="head dim D (default 16)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random q, k, v (default 0)")
    check.add_argument("--rows", type=int, default=256,
                       help="query rows compared against the reference: all of them when N <= ROWS, "
                            "else the first, last, grid-corner and tile-boundary rows plus a random "
                            "sample (default 256; fewer, down to 64, when rows x N > 2**26)")
    check.add_argument("--quiet", action="store_true", help="skip the picture")
    sub.add_parser("names", help="every DSL name with its signature and one line")
    return parser


_WIDTH = (8, 400)
_BACKEND_HELP = "auto (default: the best for this device, with the reason), flex, triton, tiles or dense"


def _names() -> list:
    return list(DSL_NAMES)


def _cmd_names(args) -> int:
    for name in _names():
        fn = DSL_NAMES[name]
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        try:
            sig = str(inspect.signature(fn))
        except (TypeError, ValueError):    # pragma: no cover - every DSL name is a function
            sig = "(...)"
        print(f"{name}{sig}")
        print(f"    {doc[0] if doc else ''}")
    return 0


def _spec(args):
    p = parse(args.spec)
    if not isinstance(p, Pattern):
        raise MaskDSLError(f"SPEC: {args.spec!r} is a score; expected a pattern (scores go in --score)")
    s = parse(args.score) if args.score else None
    if s is not None and not isinstance(s, Score):
        raise MaskDSLError(f"--score: {args.score!r} is a pattern; expected score terms")
    return p, s


def _picture(p, shape, heads, only_head, query, width) -> str:
    return picture(p, shape, heads, only_head, query, width)


def _cmd_show(args) -> int:
    if not _WIDTH[0] <= args.width <= _WIDTH[1]:
        raise MaskDSLError(f"--width={args.width}: expected an int in [{_WIDTH[0]}, {_WIDTH[1]}] "
                           f"(columns of the pictures)")
    p, s = _spec(args)
    shape = validate(p, _shape(args.shape), args.heads, s)
    query = _coords(args.query) if args.query else None
    print(f"{p!r}  shape={'x'.join(map(str, shape))}  heads={args.heads}")
    print(_picture(p, shape, args.heads, args.head, query, args.width))
    if args.blocks:
        print()
        print(_tile_picture(p, s, shape, args.heads, args.head, args.width))
    if args.png:
        path = write_png(args.png, p, s, shape, args.heads, args.head, query)
        print(f"wrote {path}")
    return 0


def _tile_picture(p, s, shape, heads, only_head, width) -> str:
    """The compiled tiles the chosen backend runs, in its tiled token layout, drawn from the
    sparse tile classes (never a dense T x T table)."""
    prog = compile(p, shape, heads, score=s).program
    st = prog.stats()
    lines = [f"compiled tiles: {st['layout']}, {prog.layout.n_tiles} x {prog.layout.n_tiles} "
             f"tile pairs, {st['block_density']:.1%} non-empty "
             f"(row-major: {st['block_density_row_major']:.1%})"]
    groups = []                                   # [classes, heads drawing them]
    for h in ([only_head] if only_head is not None else range(heads)):
        cls = prog.classes.head(h)
        g = next((g for g in groups if g[0].same_as(cls)), None)
        if g is None:
            groups.append([cls, [h]])
        else:
            g[1].append(h)
    for cls, members in groups:
        label = "" if heads == 1 else f"head{'s' if len(members) > 1 else ''} {','.join(map(str, members))}: "
        lines.append(label + draw_classes(cls, width))
    return "\n".join(lines)


def _cmd_explain(args) -> int:
    p, s = _spec(args)
    attn = compile(p, _shape(args.shape), args.heads, score=s, backend=args.backend)
    st = attn.stats()
    shape = "x".join(map(str, attn.shape))
    print(f"pattern:  {p!r}")
    if s is not None:
        print(f"score:    {s!r}")
    print(f"shape:    {shape} ({attn.n} tokens), heads: {attn.heads}")
    print(f"backend:  {attn.backend}")
    print(f"why:      {attn.reason}")
    print(f"layout:   {st['layout']} ({st['block_size']}-token blocks)")
    ranked = sorted(st["layouts_tried"].items(), key=lambda kv: kv[1])
    tried = "; ".join(f"{k}: {v}" for k, v in ranked[:4])
    more = f"; and {len(ranked) - 4} more layouts" if len(ranked) > 4 else ""
    print(f"tried:    non-empty tile pairs, fewest first: {tried}{more}")
    print(f"density:  tokens {st['token_density']:.3%}, blocks {st['block_density']:.2%} "
          f"(row-major {st['block_density_row_major']:.2%}); partial {st['partial_blocks']:.2%}, "
          f"full {st['full_blocks']:.2%}")
    print(f"ideal:    {st['ideal_speedup']:.1f}x faster than dense attention "
          f"(dense time x non-empty tile fraction)")
    print("generated source:")
    print(attn.source.rstrip())
    return 0


def _cmd_bench(args) -> int:
    p, s = _spec(args)
    shape = _shape(args.shape)
    if args.reps < 1 or args.dim < 1 or args.batch < 1:
        raise MaskDSLError(f"--reps, --dim, --batch: expected positive ints, got "
                           f"{args.reps}, {args.dim}, {args.batch}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = [b.strip() for b in args.backend.split(",")]
    attns = [compile(p, shape, args.heads, score=s, backend=b, device=device) for b in backends]
    n = attns[0].n
    check_allocation(f"bench inputs q, k, v of {args.batch} x {args.heads} x {n} x {args.dim}",
                     4 * 4 * args.batch * args.heads * n * args.dim, "use a smaller --batch or --dim")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, n, args.dim, generator=g).to(device)
               for _ in range(3))
    runs = [(f"maskdsl {b} ({a.backend})" if b == "auto" else f"maskdsl {a.backend}",
             (lambda a=a: a(q, k, v))) for b, a in zip(backends, attns)]
    pairs = args.batch * args.heads * n * n
    # peers that would not fit (or would run for minutes) are skipped, and the output says so
    if pairs <= _BENCH_DENSE_PAIRS:
        runs.append(("sdpa dense (no mask)", lambda: F.scaled_dot_product_attention(q, k, v)))
    else:
        print(f"(sdpa dense skipped: {args.batch} x {args.heads} x {n}^2 = {pairs:.2e} pairs, "
              f"more than {_BENCH_DENSE_PAIRS:.0e})")
    if args.heads * n * n <= 2 ** 28:
        mask = reference.mask(p, shape, args.heads, device)[None]
        runs.append(("sdpa + materialised mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
    else:
        print(f"(sdpa + materialised mask skipped: {args.heads} x {n}^2 mask)")
    results = []
    with torch.no_grad():
        for i, (name, fn) in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {name} ...", file=sys.stderr, flush=True)
            fn()                                   # warm up / compile
            times = []
            for _ in range(args.reps):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            results.append((name, statistics.median(times)))
    base_name = "sdpa dense (no mask)" if pairs <= _BENCH_DENSE_PAIRS else results[0][0]
    base = dict(results)[base_name]
    print(f"{p!r}  shape={'x'.join(map(str, shape))}  heads={args.heads}  D={args.dim}  "
          f"device={device}  torch {torch.__version__}")
    for name, t in results:
        print(f"  {name:28} {t * 1e3:9.2f} ms   {base / t:6.2f}x vs {base_name}")
    return 0


_BENCH_DENSE_PAIRS = 2 ** 31     # B x H x N^2 beyond which unmasked SDPA is not timed


def _check_rows(attn, budget: int, seed: int):
    """The query rows ``check`` compares: all when N <= budget; else the first and last, the
    grid's corners and centre, the first and last token of a few tiles of the layout the backend
    runs (where tiling and padding bugs live), and a seeded random sample up to ``budget``."""
    n, shape = attn.n, attn.shape
    if n <= budget:
        return torch.arange(n)
    # the reference costs O(rows x N): on very large grids fewer rows (at least 64)
    budget = min(budget, max(64, _REFERENCE_ENTRIES // n))
    picks = {0, n - 1}
    for corner in itertools.product(*[sorted({0, L // 2, L - 1}) for L in shape]):
        flat = 0
        for c, L in zip(corner, shape):
            flat = flat * L + c
        picks.add(flat)
    lay = attn.program.layout
    tok = lay.tokens()
    for t in np.unique(np.linspace(0, lay.n_tiles - 1, 8).astype(np.int64)):
        for pos in (t * lay.block, t * lay.block + lay.block - 1):
            if tok[pos] >= 0:
                picks.add(int(tok[pos]))
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, n, (max(0, budget - len(picks)) * 2,), generator=g).tolist()
    for r in extra:
        if len(picks) >= budget:
            break
        picks.add(r)
    return torch.tensor(sorted(picks))


_REFERENCE_ENTRIES = 2 ** 26   # check's reference: at most this many (row, key) pairs past 64 rows
_KEEP_PAIRS = 2 ** 24    # B x H x N^2 up to which check draws the backend's dropout keep mask


def _cmd_check(args) -> int:
    p, s = _spec(args)
    attn = compile(p, _shape(args.shape), args.heads, score=s, backend=args.backend)
    if args.batch < 1 or args.dim < 1:
        raise MaskDSLError(f"--batch={args.batch}, --dim={args.dim}: expected positive ints")
    if not 0 <= args.seed < 2**63:
        raise MaskDSLError(f"--seed={args.seed}: expected an int in [0, 2**63)")
    if not 1 <= args.rows <= 65536:
        raise MaskDSLError(f"--rows={args.rows}: expected an int in [1, 65536]")
    B, H, n, D = args.batch, args.heads, attn.n, args.dim
    check_allocation(f"check inputs q, k, v of {B} x {H} x {n} x {D}", 4 * 5 * B * H * n * D,
                     "use a smaller --batch or --dim")
    torch.manual_seed(args.seed)
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    rows = _check_rows(attn, args.rows, args.seed)
    notes = []
    dropout = any(isinstance(t, Dropout) for t in score_terms(s))
    if dropout and B * H * n * n > _KEEP_PAIRS:
        attn.training = False
        notes.append(f"dropout off for this check: its keep mask is {B} x {H} x {n}^2 pairs")
    state = attn.dropout_state() if dropout else None
    out = attn(q, k, v)
    keep = None
    if dropout and attn.training:
        ran = attn.last_backend
        attn.set_dropout_state(state)            # the draws the call just made, drawn again
        keep = next_keep_mask(attn, ran, B)
        notes.append(f"dropout compared with the {ran} backend's own keep mask")
    with torch.no_grad():
        ref = reference.attention(q.double(), k.double(), v.double(), p, attn.shape, score=s,
                                  dropout_keep=keep, rows=rows)
        err = (out[:, :, rows].double() - ref).abs().max().item()
    tol = 1e-4
    print(f"{p!r}  shape={'x'.join(map(str, attn.shape))}  heads={args.heads}"
          + (f"  score={s!r}" if s is not None else ""))
    print(f"backend: {attn.backend}")
    print(f"why: {attn.reason}")
    if not args.quiet:
        print(_picture(p, attn.shape, args.heads, None, None, 64))
    which = "all" if len(rows) == n else f"{len(rows)} sampled (first, last, corners, tile boundaries, random)"
    print(f"rows compared: {which} of {n}" + "".join(f"; {x}" for x in notes))
    verdict = "OK" if err <= tol else "MISMATCH"
    print(f"max |compiled - reference(fp64)| = {err:.3e}  (fp32, tolerance {tol:.0e}): {verdict}")
    return 0 if err <= tol else 1


def main(argv=None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        commands = {"show": _cmd_show, "check": _cmd_check, "explain": _cmd_explain,
                    "bench": _cmd_bench, "names": _cmd_names}
        code = commands[args.command](args)
        sys.stdout.flush()
        return code
    except MaskDSLError as e:
        print(f"maskdsl: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``maskdsl show ... | head``): stop quietly, like cat does
        _drop_stdout()
        return 141
    except OSError as e:
        # the machine, not the spec: stdout cannot be written (``> /dev/full``, a full disk) or
        # a file cannot be used; one line, no traceback
        if e.filename is None:
            _drop_stdout()
            print(f"maskdsl: error: cannot write the output: {e.strerror or e}", file=sys.stderr)
        else:
            print(f"maskdsl: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maskdsl: interrupted", file=sys.stderr)
        return 130


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what could not be
    written raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):     # no file descriptor (stdout replaced, e.g. in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
