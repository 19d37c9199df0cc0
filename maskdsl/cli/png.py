"""``maskdsl show --png``: the pictures of ``show`` as an image (matplotlib, imported lazily).

The same scene as the terminal (``draw.scene``: sparse tile classes and one query row, never an
N x N mask), per group of heads that draw the same: the overview of the mask (queries down,
keys across, full / partial / empty cells) with the query's row marked, and the keys the query
sees at a readable scale: 1-D the band around the query plus a box per far run (sinks), 2-D the
grid or the part of it around the keys, 3-D one panel per frame of the key range. With a score,
keys are coloured by its bias on a scale that covers the keys drawn and nothing else.
"""
from __future__ import annotations

import os
import textwrap

import numpy as np
import torch

from maskdsl._errors import MaskDSLError
from . import draw

__all__ = ["write_png", "FORMATS"]

FORMATS = (".png", ".svg", ".pdf")
OVERVIEW_CELLS = 256   # the overview is downsampled to at most this many cells a side
PANEL_CELLS = 96       # 2-D / 3-D panels: the whole frame at one token a pixel-cell up to this
BAND_CELLS = 1024      # 1-D: the band drawn at most this many cells across
MAX_PANELS = 6         # 3-D frames drawn at most (the nearest to the query's frame)
DPI = 80


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MaskDSLError(
            "--png needs matplotlib: install the viz extra, e.g. pip install 'maskdsl[viz]'"
        ) from None
    return plt


def _checked_path(path: str) -> str:
    """The file that will be written, exactly as named: a name without an extension (the
    format would be a guess, and the file written another than the one asked for), an
    unsupported extension or a missing folder is refused before anything is drawn."""
    ext = os.path.splitext(path)[1]
    if not ext:
        raise MaskDSLError(f"--png={path!r}: no file extension; expected a name ending in one "
                           f"of {', '.join(FORMATS)} (e.g. {path + '.png'!r})")
    if ext.lower() not in FORMATS:
        raise MaskDSLError(f"--png={path!r}: unsupported extension {ext!r}; expected one of "
                           f"{', '.join(FORMATS)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MaskDSLError(f"--png={path!r}: the folder {folder!r} does not exist")
    return path


def _title(ax, text: str, width_in: float, size: float = 8):
    """A title wrapped to the axes' width (about 0.55 x size points a character)."""
    chars = max(12, int(width_in * 72 / (0.55 * size)))
    ax.set_title("\n".join(textwrap.wrap(text, chars)), fontsize=size)


def _cells(values: torch.Tensor, allowed: torch.Tensor, f: int):
    """f x f cells of a [h, w] frame: the allowed fraction, and the mean bias over the allowed
    keys of each cell (NaN where none); ``values`` may be None."""
    h, w = allowed.shape
    pad = torch.nn.functional.pad
    a = pad(allowed.float(), (0, -w % f, 0, -h % f))
    shape = (a.shape[0] // f, f, a.shape[1] // f, f)
    cnt = a.reshape(shape).sum((1, 3))
    valid = pad(torch.ones(h, w), (0, -w % f, 0, -h % f)).reshape(shape).sum((1, 3))
    frac = (cnt / valid).numpy()
    if values is None:
        return frac, None
    v = pad(torch.where(allowed, values, torch.zeros(())).float(), (0, -w % f, 0, -h % f))
    mean = (v.reshape(shape).sum((1, 3)) / cnt).numpy()        # NaN where no key
    return frac, mean


def _range(arrays):
    """(vmin, vmax) over the finite values drawn (None when there are none)."""
    vals = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays if a is not None] or [[]])
    if len(vals) == 0:
        return None
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _pct(x: float) -> str:
    """0.0967%, 4.1%, 100%: three significant digits at most."""
    return f"{x * 100:.3g}%"


def _token_label(v, _=None) -> str:
    """A token index as a tick label: 2040, 524.2k, 1M (never an offset text)."""
    for scale, unit in ((1e6, "M"), (1e5, "k")):
        if abs(v) >= scale:
            d = v / (1e6 if unit == "M" else 1e3)
            return f"{d:.4g}{unit}"
    return f"{v:.0f}"


def _tokens_axes(ax, which="xy"):
    from matplotlib.ticker import FuncFormatter

    for axis in ([ax.xaxis] if "x" in which else []) + ([ax.yaxis] if "y" in which else []):
        axis.set_major_formatter(FuncFormatter(_token_label))
    ax.tick_params(labelsize=6)


def _grey():
    from matplotlib.colors import ListedColormap

    return ListedColormap(["#8c8c8c"])


def _bias_text(bias: torch.Tensor, runs) -> str:
    """'bias -8' / 'bias -8.1..-7.9' over the keys of some runs."""
    v = torch.cat([bias[a:e + 1] for a, e in runs])
    lo, hi = float(v.min()), float(v.max())
    return f"bias {lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"bias {lo:.3g}..{hi:.3g}"


def _overview(fig, ax, g, s, width_in, draw):
    n = s.n
    shade = np.array([1.0, 0.62, 0.0])[g.cells]         # empty white, partial grey, full black
    C = g.cells.shape[0]
    span = C * s.cell_tokens
    ax.imshow(shade, cmap="gray", vmin=0, vmax=1, interpolation="nearest",
              extent=(0, span, span, 0))
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.plot([0], [s.flat + 0.5], marker=">", color="red", markersize=7, clip_on=False)
    ax.set_xlabel("key (flat index)", fontsize=7)
    ax.set_ylabel("query (flat index)", fontsize=7)
    _tokens_axes(ax)
    unit = "1 token" if s.cell_tokens == 1 else f"{s.cell_tokens}x{s.cell_tokens} tokens"
    lo, hi = g.pairs
    share = (f"{_pct(lo / n ** 2)}" if lo == hi else
             f"{_pct(lo / n ** 2)}..{_pct(hi / n ** 2)} (tile bounds)")
    _title(ax, f"{g.label}: {share} of pairs allowed; cell = {unit}, grey = partial, "
               f"red \u25b6 = the query's row", width_in, 7.5)


def _keys_1d(sf, g, s, draw, cmap):
    """The band around the query (one cell per token up to BAND_CELLS) and a box per far run."""
    from matplotlib import patches

    b = draw.band(g.row, s.flat)
    lo, hi = b.lo, b.hi
    f = max(1, -(-(hi - lo + 1) // BAND_CELLS))
    row = g.row[lo:hi + 1][None]
    vals = None if g.bias is None else g.bias[lo:hi + 1][None]
    frac, mean = _cells(vals, row, f)
    far = b.far[:4]
    if far:
        fx, ax = sf.subplots(1, 2, width_ratios=[1, 3])
    else:
        ax, fx = sf.subplots(1, 1), None
    extent = (lo - 0.5, lo - 0.5 + frac.shape[1] * f, 0, 1)
    bar = None
    if mean is None:
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                  extent=extent)
    else:
        rng = _range([mean])
        bar = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, aspect="auto",
                        interpolation="nearest", extent=extent,
                        vmin=rng[0] if rng else None, vmax=rng[1] if rng else None)
    pad = 0.01 * (hi - lo + 1)
    ax.set_xlim(lo - 0.5 - pad, hi + 0.5 + pad)
    ax.set_ylim(0, 1.3)
    ax.set_yticks([])
    ax.plot([s.flat], [1.15], marker="v", color="red", markersize=8)
    right = s.flat - lo > (hi - lo) / 2
    ax.text(s.flat, 1.15, "query  " if right else "  query", color="red", fontsize=7,
            va="center", ha="right" if right else "left")
    _tokens_axes(ax, "x")
    ax.set_xlabel("key (flat index)", fontsize=7)
    if fx is not None:
        fx.set_xlim(0, len(far))
        fx.set_ylim(0, 1.3)
        fx.set_xticks([])
        fx.set_yticks([])
        for i, (a, e) in enumerate(far):
            fx.add_patch(patches.Rectangle((i + 0.08, 0.0), 0.84, 1.0, color="#2a5d9f"))
            lines = textwrap.wrap(draw.far_text([(a, e)], g.sinks)[0], 12)
            if g.bias is not None:
                lines.append(_bias_text(g.bias, [(a, e)]))
            fx.text(i + 0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=6.5,
                    color="white")
        more = len(b.far) - len(far)
        fx.set_xlabel("far keys" + (f" (+{more} runs)" if more else ""), fontsize=7)
    scale = "one token a cell" if f == 1 else f"{f} tokens a cell"
    head = f"keys seen by query {s.flat}: {int(g.row.sum())}; drawn: keys {lo}..{hi}, {scale}"
    axes = [ax] + ([fx] if fx is not None else [])
    return bar, axes, head


def _region(draw, g, s):
    """The frames and the part of them a PNG draws: whole frames up to PANEL_CELLS a side,
    else the box around the keys with a quarter of its size around it."""
    return draw.region(g.row, s.shape, s.query, g.sinks, 0, max_frames=MAX_PANELS,
                       panel=PANEL_CELLS, margin=0.25)


def _keys_nd(sf, g, s, draw, cmap):
    """2-D the grid or the box around the keys; 3-D one panel per frame of the key range."""
    from matplotlib.ticker import MaxNLocator

    three = len(s.shape) == 3
    r = _region(draw, g, s)
    grid = draw._grid3(g.row, s.shape)
    bias = None if g.bias is None else draw._grid3(g.bias, s.shape)
    tq, yq, xq = (0,) + tuple(s.query) if not three else tuple(s.query)
    far = torch.zeros(grid.numel(), dtype=torch.bool)      # sinks away from the other keys
    for a, e in r.far:
        far[a:e + 1] = True
    far = far.reshape(grid.shape) & grid
    shown = []
    for t in r.frames:
        box = (t, slice(r.y0, r.y1), slice(r.x0, r.x1))
        vals = None if bias is None else bias[box]
        frac, mean = _cells(vals, grid[box] & ~far[box], r.f)   # the colour scale: near keys
        shown.append((t, frac, mean, _cells(None, far[box], r.f)[0]))
    rng = _range([m for _, _, m, _ in shown]) if bias is not None else None
    axes, img = list(sf.subplots(1, len(shown), squeeze=False)[0]), None
    for i, (t, frac, mean, sink) in enumerate(shown):
        ax = axes[i]
        h, w = frac.shape
        extent = (r.x0 - 0.5, r.x0 - 0.5 + w * r.f, r.y0 - 0.5 + h * r.f, r.y0 - 0.5)
        if mean is None:
            img = ax.imshow(np.maximum(frac, sink), cmap="Blues", vmin=0, vmax=1,
                            interpolation="nearest", extent=extent)
        else:
            img = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, interpolation="nearest",
                            extent=extent, vmin=rng[0] if rng else None,
                            vmax=rng[1] if rng else None)
            if sink.any():
                ax.imshow(np.ma.masked_where(sink <= 0, sink), cmap=_grey(), vmin=0, vmax=1,
                          interpolation="nearest", extent=extent)
        ax.set_xlim(r.x0 - 0.5, r.x1 - 0.5)
        ax.set_ylim(r.y1 - 0.5, r.y0 - 0.5)
        ax.set_facecolor("white")
        ax.tick_params(labelsize=6)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        if t == tq:
            ax.plot([xq], [yq], marker="x", color="red", markersize=8, markeredgewidth=2)
        label = (f"t={t}" + (" (query)" if t == tq else "")) if three else None
        if three:
            ax.set_title(label, fontsize=8)
        if i == 0:
            ax.set_ylabel(f"dim {len(s.shape) - 2}", fontsize=7)
        ax.set_xlabel(f"dim {len(s.shape) - 1}", fontsize=7)
    coords = ",".join(map(str, s.query))
    scale = "" if r.f == 1 else f", {r.f}x{r.f} tokens a cell"
    notes = []
    if r.more:
        notes.append(f"keys also in frames t={draw._ranges(r.more)}")
    drawn_far = [run for run in r.far if run not in r.outside]
    if drawn_far and bias is not None:
        notes.append(", ".join(draw.far_text(drawn_far, g.sinks)) + " in grey, off the scale: "
                     + _bias_text(g.bias, drawn_far))
    if r.outside:
        notes.append("also seen: " + ", ".join(draw.far_text(r.outside, g.sinks))
                     + ("" if bias is None else ", " + _bias_text(g.bias, r.outside)))
    head = f"keys seen by query ({coords}): {int(g.row.sum())}{scale}"
    return (img if bias is not None else None), axes, "; ".join([head] + notes)


def write_png(path: str, p, score, shape: tuple, heads: int, only_head, query) -> str:
    """Per group of heads that draw the same: the overview of the mask and the keys one query
    sees (coloured by the score's bias when a score is given). Returns the path written."""
    path = _checked_path(path)
    plt = _matplotlib()
    shape = tuple(shape)
    s = draw.scene(p, shape, heads, only_head, query, OVERVIEW_CELLS, score)
    rank = len(shape)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    if rank == 3:
        n_panels = max(len(_region(draw, g, s).frames) for g in s.groups)
        keys_w = 2.1 * n_panels + 0.6
    else:
        keys_w = 5.5 if rank == 1 else 3.4
    over_w = 2.8
    row_h = 2.0 if rank == 1 else 3.1
    fig_w = over_w + keys_w + 0.4
    fig = plt.figure(figsize=(fig_w, row_h * len(s.groups) + 0.5), layout="constrained")
    title = f"{p!r}  shape {'x'.join(map(str, shape))}" + (f"  score {score!r}" if score is not None else "")
    fig.suptitle("\n".join(textwrap.wrap(title, int(fig_w * 72 / (0.55 * 9)))), fontsize=9)
    rows = fig.subfigures(len(s.groups), 1, squeeze=False)[:, 0]
    for sf, g in zip(rows, s.groups):
        left, right = sf.subfigures(1, 2, width_ratios=[over_w, keys_w])
        _overview(left, left.subplots(1, 1), g, s, over_w, draw)
        bar, axes, head = (_keys_1d if rank == 1 else _keys_nd)(right, g, s, draw, cmap)
        right.suptitle("\n".join(textwrap.wrap(head, int(keys_w * 72 / (0.55 * 8)))), fontsize=8)
        if bar is not None:
            right.colorbar(bar, ax=axes, label="score bias", shrink=0.85)
    try:
        fig.savefig(path, dpi=DPI)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise MaskDSLError(f"--png={path!r}: cannot write it ({why})") from None
    finally:
        plt.close(fig)
    return os.path.abspath(path)
