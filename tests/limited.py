"""Run code in a fresh interpreter with at most a given amount of address space left to it
(the resource-bomb tests: tests/test_adversarial.py, tests/test_kvcache.py)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_limited(code: str, limit_gb: float = 3.0, timeout: float = 120):
    """Run ``code`` (``md`` and ``torch`` imported) in a fresh interpreter whose RLIMIT_AS leaves
    ``limit_gb`` GB of address space beyond what the imports took; returns the CompletedProcess.

    The limit is set after importing, on top of the address space then in use: torch's CUDA
    builds (torch 2.14.1's wheel) map ~3 GB of libraries, so a fixed limit that fits the CPU
    wheel's ~0.6 GB would not even let them import, and what the test measures would depend
    on the build."""
    prelude = textwrap.dedent(f"""
        import os, resource, sys
        import torch
        import maskdsl as md
        with open("/proc/self/statm") as _f:
            _used = int(_f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _limit = _used + {int(limit_gb * 2**30)}
        resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))
    """)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
