"""The pictures of ``show`` (maskdsl/cli/draw.py, maskdsl/cli/png.py), in process (fast): what each
rank draws, that the overview drawn from sparse tile classes is the dense mask's, that no
picture builds an N x N mask, and what ``--png`` writes and reports."""
import tracemalloc

import numpy as np
import pytest
import torch

from maskdsl import parse, reference
from maskdsl.cli.main import main
from maskdsl.cli.draw import EMPTY, FULL, PARTIAL, QUERY, picture, scene
from maskdsl._errors import MaskDSLError


def body(text: str) -> str:
    """The picture without its legend lines (which name the marker once)."""
    return "\n".join(line for line in text.splitlines() if "query," not in line)


def words(text: str) -> str:
    """The text with its lines joined (phrases may wrap at the width)."""
    return " ".join(text.splitlines())


def keys_part(text: str) -> list:
    """The lines of the keys picture: after the legend line ending in 'not seen'."""
    return text.split("not seen\n", 1)[1].splitlines()


def test_2d_small_grid_is_drawn_whole_with_the_query_marked_once():
    out = picture(parse("neighborhood(3)"), (5, 5), 1, None, (0, 0), 64)
    assert "keys seen by query (0,0): 9 keys; the whole 5x5 grid, 1 token a cell" in words(out)
    grid = keys_part(out)[:5]
    assert grid == ["◆◆████····", "██████····", "██████····", "··········", "··········"]
    assert body(out).count(QUERY) == 2                    # one cell, two characters wide
    assert all(len(line) <= 64 for line in out.splitlines())


def test_2d_large_grid_draws_the_box_around_the_keys_at_one_token_a_cell():
    # 13 x 13 keys at dilation 2 around (32, 32): coordinates 20, 22, ..., 44 on each dim
    out = picture(parse("neighborhood((13, 13), dilation=2)"), (64, 64), 1, None, None, 64)
    assert "rows 19..45 x cols 19..45 of 64x64, 1 token a cell" in words(out)
    grid = keys_part(out)
    assert len(grid) == 27 and all(len(line) == 54 for line in grid)
    lattice = "··" + "██··" * 13
    for y, line in enumerate(grid):
        expect = lattice if y % 2 == 1 else "··" * 27
        if y == 32 - 19:                                   # the query's row
            expect = expect[:2 * 13] + "◆◆" + expect[2 * 14:]
        assert line == expect, y
    assert body(out).count(QUERY) == 2


@pytest.mark.parametrize("spec,frames", [
    ("neighborhood((3, 7, 7))", [7, 8, 9]),
    ("neighborhood((3, 7, 7)) & causal(dims=(0,))", [7, 8]),
])
def test_3d_draws_one_2d_panel_per_frame_of_the_key_range(spec, frames):
    out = picture(parse(spec), (16, 32, 32), 1, None, None, 64)
    lines = out.splitlines()
    labels = [line for line in lines if line.startswith("t=")]
    assert len(labels) == 1                                   # the panels fit side by side
    assert labels[0].split() == [f"t={t}" for t in frames]
    assert f"frames t={','.join(map(str, frames)) if len(frames) < 3 else '7..9'}," in words(out)
    assert "rows 12..20 x cols 12..20 of 32x32, 1 token a cell" in words(out)
    panels = lines[lines.index(labels[0]) + 1:]
    assert len(panels) == 9                                   # 7 rows of keys and a margin
    for row in panels:
        cells = row.split("  ")
        assert len(cells) == len(frames) and all(len(c) == 18 for c in cells)
    key_rows = ["··" + "██" * 7 + "··"] * len(frames)
    assert panels[1].split("  ") == key_rows
    assert panels[0].split("  ") == ["··" * 9] * len(frames)
    query_row = panels[1 + 16 - 13].split("  ")
    assert query_row[frames.index(8)] == "··" + "██" * 3 + "◆◆" + "██" * 3 + "··"
    assert body(out).count(QUERY) == 2
    assert "\n".join(panels).count(FULL) == 2 * (49 * len(frames) - 1)  # every key, once
    assert all(len(line) <= 64 for line in lines)


def test_3d_panels_wrap_and_far_frames_are_named_when_many_frames_have_keys():
    out = picture(parse("neighborhood((15, 5, 5))"), (16, 16, 16), 1, None, (8, 8, 8), 40)
    labels = [line.split() for line in out.splitlines() if line.startswith("t=")]
    drawn = [int(t[2:]) for row in labels for t in row]
    assert drawn == list(range(4, 12))                        # the 8 frames nearest t=8
    assert len(labels) > 1                                    # wrapped at width 40
    assert "keys also in frames t=1..3,12..15 (not drawn)" in words(out)
    assert all(len(line) <= 40 for line in out.splitlines())


def test_1d_band_at_one_token_a_character_and_the_sinks_reported():
    out = picture(parse("window(64) | sink(4)"), (4096,), 1, None, None, 64)
    assert "keys seen by query 2048: 133 keys;" in words(out)
    assert "also seen: keys 0..3 (sinks)" in words(out)
    lines = keys_part(out)
    band = [line for line in lines if line[:4].strip().isdigit()]
    starts = [int(line.split()[0]) for line in band]
    assert starts == [1950, 2000, 2050, 2100]                 # round line starts, 50 a line
    chars = "".join(line[5:] for line in band)
    first = chars.index(FULL)
    assert 1950 + first == 2048 - 64
    assert chars[2048 - 1950] == QUERY
    assert chars.count(FULL) == 128 and chars[first:first + 129].count(EMPTY) == 0
    assert body(out).count(QUERY) == 1
    assert all(len(line) <= 64 for line in out.splitlines())


def test_1d_long_band_is_downsampled_to_at_most_eight_lines():
    out = picture(parse("causal()"), (4096,), 1, None, None, 64)
    assert "10 tokens a character" in words(out)
    band = [line for line in keys_part(out) if line[:4].strip().isdigit()]
    assert 1 < len(band) <= 8 and band[0].startswith("   0 ")
    assert PARTIAL not in "".join(band)[:-8]                  # keys 0..2048 all seen
    assert body(out).count(QUERY) == 1


def test_1d_dilated_keys_stay_in_the_band():
    out = picture(parse("neighborhood(7, dilation=4)"), (4096,), 1, None, None, 64)
    assert "also seen" not in out
    chars = "".join(line.split(" ", 1)[1] for line in keys_part(out) if line[:4].strip().isdigit())
    assert chars.count(FULL) + chars.count(QUERY) == 7


def overview_from_dense(m: torch.Tensor, k: int) -> np.ndarray:
    """The overview computed from a dense [N, N] mask (small N only): k x k token cells."""
    n = m.shape[0]
    C = -(-n // k)
    out = np.zeros((C, C), np.int8)
    for i in range(C):
        for j in range(C):
            block = m[i * k:(i + 1) * k, j * k:(j + 1) * k]
            out[i, j] = 2 if bool(block.all()) else 0 if not bool(block.any()) else 1
    return out


@pytest.mark.parametrize("spec,shape,heads,cells", [
    ("window(3) | sink(2)", (100,), 1, 16),                    # padded tiles at the edge
    ("neighborhood((5, 5)) & causal(dims=(0,))", (12, 12), 1, 24),
    ("block((2, 4, 4))", (4, 8, 8), 1, 16),
    ("full()", (37,), 1, 8),                                  # every cell full, edges included
    ("neighborhood(5)", (100,), 1, 16),
    ("neighborhood((3, 3)) | sink(3)", (10, 10), 1, 8),        # no row-major tile: padded
    ("heads([window(2), ~window(2)])", (24,), 2, 12),
])
def test_overview_from_sparse_tile_classes_is_the_dense_masks(spec, shape, heads, cells):
    p = parse(spec)
    s = scene(p, shape, heads, None, None, cells)
    m = reference.mask(p, shape, heads)
    for g in s.groups:
        h = g.heads[0]
        assert np.array_equal(g.cells, overview_from_dense(m[h], s.cell_tokens)), h
        assert g.pairs == (int(m[h].sum()),) * 2
        assert torch.equal(g.row, m[h, s.flat])


def test_heads_grouped_by_classes_and_query_row():
    out = picture(parse("neighborhood(per_head([3, 5]))"), (9, 9), 2, None, None, 64)
    assert "head 0: " in out and "head 1: " in out and "heads 0,1" not in out
    out = picture(parse("neighborhood(3) | sink(per_head([0, 0, 0]))"), (9, 9), 3, None, None, 64)
    assert "heads 0..2: 729 of 6561 pairs allowed (11.1%)" in words(out)
    out = picture(parse("neighborhood(per_head([3, 5]))"), (9, 9), 2, 1, None, 64)
    assert "head 1: " in out and "head 0" not in out


@pytest.mark.parametrize("args,message", [
    ({"query": (1, 2)}, "--query=1,2: expected 1 coordinates within shape (8,)"),
    ({"query": (8,)}, "--query=8: expected 1 coordinates within shape (8,)"),
    ({"only_head": 2}, "--head=2: expected 0 <= head < 2"),
])
def test_bad_query_and_head_are_refused(args, message):
    kw = {"only_head": None, "query": None} | args
    with pytest.raises(MaskDSLError) as e:
        picture(parse("window(2)"), (8,), 2, kw["only_head"], kw["query"], 64)
    assert message in str(e.value)


def test_narrow_width_keeps_every_line_within_it():
    for spec, shape in [("window(64) | sink(4)", (4096,)), ("neighborhood((3, 5, 5))", (8, 16, 16)),
                        ("neighborhood((5, 5))", (32, 32))]:
        out = picture(parse(spec), shape, 1, None, None, 24)
        assert all(len(line) <= 24 for line in out.splitlines()), spec
        assert body(out).count(QUERY) == (1 if len(shape) == 1 else 2)


def test_a_million_tokens_draw_from_one_query_row_and_sparse_classes(monkeypatch):
    """O(tiles + cells + N): the reference is asked for one row only, no dense tile table is
    built, and numpy's peak stays a small multiple of N bytes (N x N would be 10^12)."""
    from maskdsl.codegen.tileclasses import TileClasses

    real = reference.mask
    asked = []

    def one_row_only(p, shape, heads=1, device="cpu", rows=None):
        assert rows is not None and len(rows) == 1
        asked.append(rows)
        return real(p, shape, heads, device, rows=rows)

    def no_dense(self):
        raise AssertionError("a dense T x T tile table was built")

    monkeypatch.setattr(reference, "mask", one_row_only)
    monkeypatch.setattr(TileClasses, "dense", no_dense)
    n = 1 << 20
    tracemalloc.start()
    try:
        out = picture(parse("causal() & window(1024) | sink(4)"), (n,), 2, None, None, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert asked and peak < 200 * n
    assert "heads 0,1: " in out and "also seen: keys 0..3 (sinks)" in words(out)
    assert "one cell = 32768 x 32768 tokens" in words(out)
    assert body(out).count(QUERY) == 1


# ------------------------------------------------------------------------------ --png

def figure_of(monkeypatch):
    """Record the figure write_png saves (and still write it)."""
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig

    def keep(self, *a, **k):
        saved.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def texts(fig) -> list:
    out = [" ".join(t.get_text().split()) for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return [t for t in out if t]


def test_png_without_extension_is_refused_not_renamed(tmp_path, capsys):
    """Issue 21, finding 10: ``--png name`` wrote ``name.png``, another file than the one asked
    for; now one line naming --png and exit 2, nothing written."""
    target = tmp_path / "mask"
    assert main(["show", "window(2)", "--shape", "8", "--png", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == (f"maskdsl: error: --png={str(target)!r}: no file extension; expected a name "
                   f"ending in one of .png, .svg, .pdf (e.g. {str(target) + '.png'!r})\n")
    assert list(tmp_path.iterdir()) == []


def test_png_3d_has_one_panel_per_frame_and_marks_the_query(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from maskdsl.cli.png import write_png

    saved = figure_of(monkeypatch)
    path = write_png(str(tmp_path / "a.png"), parse("neighborhood((3, 7, 7)) & causal(dims=(0,))"),
                     None, (16, 32, 32), 1, None, None)
    assert path == str(tmp_path / "a.png")
    fig = saved[0]
    titles = [ax.get_title() for ax in fig.findobj(lambda a: hasattr(a, "get_title"))]
    assert "t=7" in titles and "t=8 (query)" in titles and "t=9" not in titles
    lines = [ln for ln in fig.findobj(lambda a: type(a).__name__ == "Line2D")
             if ln.get_marker() == "x"]
    assert len(lines) == 1 and list(lines[0].get_xdata()) == [16]   # the query, once
    assert any("98" in t for t in texts(fig))                          # 2 frames x 49 keys


def test_png_1d_colour_scale_covers_the_band_not_the_sinks(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from maskdsl.cli.png import write_png

    saved = figure_of(monkeypatch)
    write_png(str(tmp_path / "b.png"), parse("window(64) | sink(4)"), parse("distance_decay(0.05)"),
              (4096,), 1, None, None)
    fig = saved[0]
    images = [im for im in fig.findobj(lambda a: type(a).__name__ == "AxesImage")
              if im.get_cmap().name == "viridis"]
    assert len(images) == 1
    lo, hi = images[0].get_clim()
    assert lo == pytest.approx(-0.05 * 64) and hi == pytest.approx(0.0)   # not -102 (the sinks)
    words = " ".join(texts(fig))
    assert "keys 0..3 (sinks)" in words and "bias -102" in words


def test_png_per_head_draws_each_head(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from maskdsl.cli.png import write_png

    saved = figure_of(monkeypatch)
    write_png(str(tmp_path / "c.png"), parse("neighborhood((5, 5)) | sink(2)"),
              parse("distance_decay(per_head([0.1, 0.5]))"), (24, 24), 2, None, (12, 12))
    words = " ".join(texts(saved[0]))
    assert "head 0:" in words and "head 1:" in words
    assert "keys 0..1 (sinks) in grey, off the scale" in words
