"""Run every script in examples/ as a user would and check what it prints."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# script -> lines its stdout must contain
EXPECTED = {
    "vit_neighborhood.py": [
        "reason: ",
        "max |tiles - reference|",
        "OK: vit_neighborhood matches the reference",
    ],
    "video_radial.py": [
        "density by frame distance",
        "future frames allowed: 0",
        "OK: video_radial matches the reference",
    ],
    "llm_sliding_window_sinks.py": [
        "pattern: causal() & (window(64, right=0) | sink(4))",
        "[sink_logit] max |",
        "OK: llm_sliding_window_sinks matches the reference",
    ],
    "moa_per_head_windows.py": [
        "head 3: window  128",
        "OK: moa_per_head_windows matches the reference",
    ],
    "train_cpu.py": [
        "step  60  loss",
        "OK: train_cpu learned the task and matches the reference",
    ],
    "llm_decode.py": [
        "lookback: keeps 132 of 1024 tokens: 4 sink(s) and the last 128",
        "the cache held at most 132 tokens",
        "OK: llm_decode matches the reference",
    ],
    "context_parallel.py": [
        "strategy: halo: the fewest bytes",
        "rank 1: output [1, 4, 576, 16]",
        "plan allgather",
        "OK: context_parallel matches the single-process run",
    ],
    "mmdit_video_text.py": [
        "natten.na3d with additional_keys/values vs the video rows",
        "md.merge(video part, text part) vs the video rows",
        "OK: mmdit_video_text matches the reference",
    ],
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name):
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"{name} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    for line in EXPECTED[name]:
        assert line in proc.stdout, f"{name}: {line!r} not in stdout:\n{proc.stdout}"
