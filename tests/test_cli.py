"""The command line through subprocess: exit codes, output, one-line errors."""
import os
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "maskdsl", *args], capture_output=True, text=True,
                          timeout=120)


def test_check_runs_compares_and_draws():
    r = run("check", "neighborhood(kernel_size=(5, 5), dilation=(1, 2)) & causal(dims=(0,))",
            "--shape", "12x12", "--heads", "2", "--score", "distance_decay(per_head([0.0, 0.2]))")
    assert r.returncode == 0, r.stderr
    assert "backend: tiles" in r.stdout and ": OK" in r.stdout
    assert "heads 0,1: 2160 of 20736 pairs allowed (10.4%)" in r.stdout
    assert "◆" in r.stdout and "▒" in r.stdout                 # query marker, partial blocks


def test_show_draws_the_query_neighborhood_on_the_grid():
    r = run("show", "neighborhood(3)", "--shape", "5x5", "--query", "0,0")
    assert r.returncode == 0, r.stderr
    grid = r.stdout.split("not seen\n")[1].splitlines()
    assert grid[:3] == ["◆◆████····", "██████····", "██████····"]  # border-shifted 3x3 window
    assert grid[3:5] == ["··········"] * 2


def test_show_blocks_distinguish_full_partial_empty():
    r = run("show", "block(4)", "--shape", "64", "--width", "32")
    assert r.returncode == 0 and "one cell = 4 x 4 tokens" in r.stdout
    picture = r.stdout.split("none)\n")[1].splitlines()[:16]
    assert picture[0] == "██" + "··" * 15            # a 4x4 block fully allowed, the rest empty
    assert picture[15] == "··" * 15 + "██"
    r = run("show", "window(1)", "--shape", "64", "--width", "32")
    picture = r.stdout.split("none)\n")[1].splitlines()[:16]
    assert picture[0] == "▒▒▒▒" + "··" * 14          # a band: partial on and next to the diagonal


@pytest.mark.parametrize("args,message", [
    (("show", "neighborhood(1)", "--shape", "8"), "neighborhood: kernel_size=1 is out of range"),
    (("show", "neighborhood(9)", "--shape", "8"), "kernel_size[0]=9 needs shape[0] >= 9, got 8"),
    (("check", "foo(3)", "--shape", "8"), "unknown function 'foo'"),
    (("check", "window(2)", "--shape", "8x"), "--shape='8x'"),
    (("show", "window(2)"), "the following arguments are required: --shape"),
    (("show", "softcap(2.0)", "--shape", "8"), "is a score; expected a pattern"),
    (("show", "window(2)", "--shape", "8", "--query", "9"), "--query=9: expected 1 coordinates within shape (8,)"),
    (("bogus",), "invalid choice: 'bogus'"),
    (("check", "window(per_head([1, 2]))", "--shape", "8", "--heads", "3"), "has 2 values but heads=3"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("maskdsl: error: ") and message in r.stderr


def test_explain_shows_backend_layout_densities_and_source():
    r = run("explain", "neighborhood((13, 13))", "--shape", "128x128", "--heads", "2",
            "--score", "distance_decay(0.1)")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "backend:  tiles" in out and "why:      tiles: on cpu" in out
    assert "layout:   8x8 tiles (64-token blocks)" in out
    assert "density:  tokens 1.031%" in out and "ideal:" in out
    assert "def mask_neighborhood_13x13(b, h, q_idx, kv_idx):" in out
    assert "def score_distance_decay(score, b, h, q_idx, kv_idx):" in out


def test_bench_times_backends_against_sdpa_with_progress():
    r = run("bench", "window(8)", "--shape", "300", "--heads", "2", "--dim", "16",
            "--backend", "tiles,dense", "--reps", "1")
    assert r.returncode == 0, r.stderr
    for name in ("maskdsl tiles", "maskdsl dense", "sdpa dense (no mask)", "sdpa + materialised mask"):
        assert name in r.stdout
    assert "[1/4] maskdsl tiles ..." in r.stderr and "[4/4]" in r.stderr


def test_show_blocks_draws_the_compiled_tiles():
    r = run("show", "neighborhood((13, 13))", "--shape", "64x64", "--blocks", "--width", "32")
    assert r.returncode == 0, r.stderr
    assert "compiled tiles: 8x8 tiles, 64 x 64 tile pairs, 11.8% non-empty (row-major: 20.3%)" in r.stdout


def test_show_png_is_written_and_has_the_mask_in_it(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "mask.png"
    r = run("show", "neighborhood((5, 5)) | sink(2)", "--shape", "24x24", "--heads", "2",
            "--score", "distance_decay(per_head([0.1, 0.5]))", "--png", str(path))
    assert r.returncode == 0, r.stderr
    assert f"wrote {path}" in r.stdout
    pixels = image.imread(str(path))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 400          # two heads, two panels each
    gray = pixels[..., :3].mean(-1)
    assert (gray < 0.2).mean() > 0.01                               # dark mask diagonals drawn
    assert (gray > 0.9).mean() > 0.3                                # on a light background
    colourful = (pixels[..., :3].max(-1) - pixels[..., :3].min(-1)) > 0.3
    assert colourful.mean() > 0.002                                 # the score colour map


def test_png_without_matplotlib_names_the_viz_extra(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from maskdsl.cli.main import main; "
            f"sys.exit(main(['show', 'window(2)', '--shape', '8', '--png', {str(tmp_path / 'x.png')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "install the viz extra, e.g. pip install 'maskdsl[viz]'" in r.stderr


def test_version_names_and_help_list_the_dsl():
    import maskdsl as md

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"maskdsl {md.__version__}"
    r = run("names")
    assert r.returncode == 0, r.stderr
    for name in ("neighborhood", "window", "causal", "sink", "radial", "softcap", "per_head"):
        assert f"\n{name}(" in "\n" + r.stdout
    assert "neighborhood(kernel_size, stride=1, dilation=1, causal=False)" in r.stdout
    lines = r.stdout.splitlines()
    assert all(lines[i + 1].startswith("    ") and lines[i + 1].strip() for i in range(0, len(lines), 2))
    r = run("--help")
    assert "DSL names" in r.stdout and "neighborhood" in r.stdout and "alibi" in r.stdout
    for sub, flags in (("bench", ("--backend", "--batch", "--reps")), ("check", ("--seed", "--batch", "--rows"))):
        text = run(sub, "--help").stdout
        for flag in flags:       # every option says what it is
            line = next(x for x in text.splitlines() if x.strip().startswith(flag))
            rest = text.split(line, 1)[1].splitlines()[0] if line.strip() == flag.split()[0] else line
            assert len(line.split()) > 2 or rest.strip(), (sub, flag, line)


def test_broken_pipe_ends_quietly():
    r = subprocess.run(f"{sys.executable} -m maskdsl show 'neighborhood(3)' --shape 32x32 | head -1",
                       shell=True, capture_output=True, text=True, timeout=120)
    assert r.stdout.count("\n") == 1
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_an_unwritable_stdout_is_one_line_and_exit_2():
    """Issue 21, finding 10: ``show ... > /dev/full`` printed a traceback and exited 1."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "maskdsl", "show", "window(2)", "--shape", "16"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == "maskdsl: error: cannot write the output: No space left on device\n"


def test_check_samples_rows_of_a_large_grid_and_says_so():
    r = run("check", "causal() & window(64) | sink(2)", "--shape", "40000", "--quiet",
            "--backend", "tiles", "--rows", "64", "--dim", "8")
    assert r.returncode == 0, r.stderr
    assert "rows compared: 64 sampled (first, last, corners, tile boundaries, random) of 40000" in r.stdout
    assert ": OK" in r.stdout


def test_check_sample_covers_first_last_corners_and_tile_edges():
    import maskdsl as md
    from maskdsl.cli.main import _check_rows

    attn = md.compile(md.neighborhood((3, 3)), (40, 50), backend="tiles")
    rows = _check_rows(attn, 64, 0).tolist()
    assert len(rows) == 64 and rows == sorted(set(rows))
    for flat in (0, 40 * 50 - 1, 49, 39 * 50, 20 * 50 + 25):     # first, corners, centre, last
        assert flat in rows
    lay = attn.program.layout
    tok = lay.tokens()
    edges = [int(tok[t * lay.block + o]) for t in range(lay.n_tiles) for o in (0, lay.block - 1)]
    assert sum(e in rows for e in edges if e >= 0) >= 8          # first/last tokens of tiles
    assert _check_rows(attn, 4096, 0).tolist() == list(range(2000))   # small N: every row


@pytest.mark.parametrize("backend", ["dense", "tiles", "auto", "triton"])
def test_check_with_dropout_uses_the_backends_own_keep_mask(backend):
    """It used to report MISMATCH on correct runs (a reference with another keep mask)."""
    if backend == "triton":
        pytest.importorskip("triton")
    r = run("check", "neighborhood((3, 3))", "--shape", "12x12", "--heads", "2", "--quiet",
            "--score", "dropout(per_head([0.2, 0.5]), seed=4) + alibi()", "--backend", backend)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backend's own keep mask" in r.stdout and ": OK" in r.stdout


def test_bench_labels_auto_and_explicit_rows_apart():
    r = run("bench", "window(3)", "--shape", "64", "--reps", "1", "--dim", "8",
            "--backend", "auto,tiles")
    assert r.returncode == 0, r.stderr
    assert "maskdsl auto (tiles)" in r.stdout and "maskdsl tiles" in r.stdout


def test_bench_skips_dense_sdpa_that_would_not_fit():
    r = run("bench", "causal() & window(16)", "--shape", "70000", "--reps", "1", "--dim", "8",
            "--backend", "tiles")
    assert r.returncode == 0, r.stderr
    assert "(sdpa dense skipped:" in r.stdout and "(sdpa + materialised mask skipped" in r.stdout
    assert "x vs maskdsl tiles" in r.stdout


def test_explain_tried_line_stays_short():
    r = run("explain", "neighborhood((7, 7), dilation=(1, 2))", "--shape", "64x64")
    line = next(x for x in r.stdout.splitlines() if x.startswith("tried:"))
    assert len(line) < 400 and "more layouts" in line
    assert "(0 * " not in r.stdout and "* 1)" not in r.stdout
