"""pytest plugin for mutation testing (benchmarks/mutation.sh): a small Hypothesis profile.

Loaded with ``-p mutation_plugin --hypothesis-profile=mutation`` (``[tool.mutmut]`` in
pyproject.toml; the script puts this file on PYTHONPATH). It registers the ``mutation``
profile: fixed seeds like the default ``derandomize`` profile, but MASKDSL_MUTATION_EXAMPLES
(default 10) examples per property instead of 100, so that one mutant's tests run in seconds.
Nothing else changes.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mutation",
    derandomize=True,
    database=None,
    max_examples=int(os.environ.get("MASKDSL_MUTATION_EXAMPLES", "10")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
