"""The README's Python snippets run (tour first: it imports torch and maskdsl)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_readme_python_blocks_run(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3
    tour = next(b for b in blocks if "import maskdsl as md" in b)
    env = {}
    exec(compile(tour, "README tour", "exec"), env)
    for i, block in enumerate(b for b in blocks if b is not tour):
        exec(compile(block, f"README block {i}", "exec"), env)
    assert "def mask_neighborhood_13x13" in capsys.readouterr().out


def test_readme_command_line_example_is_what_the_cli_prints():
    import shlex
    import subprocess
    import sys

    text = README.read_text()
    block = re.search(r"```\n\$ (maskdsl show .*?)\n(.*?)```", text, re.S)
    argv = shlex.split(block.group(1))[1:]
    r = subprocess.run([sys.executable, "-m", "maskdsl", *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == block.group(2).rstrip("\n")
