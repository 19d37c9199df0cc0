"""pytest plugin for mutation testing (benchmarks/mutation.sh): a small Hypothesis profile.

Loaded with ``-p mutation_plugin --hypothesis-profile=mutation`` (``[tool.mutmut]`` in
pyproject.toml; the script puts this file on PYTHONPATH). It registers the ``mutation``
profile: fixed seeds like the default ``derandomize`` profile, but MASKDSL_MUTATION_EXAMPLES
(default 10) examples per property instead of 100, so that one mutant's tests run in seconds.

And it empties every cache before each test. mutmut runs the tests once in its own process (to
map tests to functions), then forks one child per mutant: a child inherits the caches that run
filled with the unmutated code's results (maskdsl's LRUs, ``functools.lru_cache``s, sympy's
expression cache, which holds e.g. every evaluated ``IsPow2(n)``), so a mutant behind a cache
would never run and would count as survived.
"""
import functools
import os
import sys

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


def _clear_caches():
    import sympy.core.cache

    sympy.core.cache.clear_cache()
    for name, mod in list(sys.modules.items()):
        if name == "maskdsl" or name.startswith("maskdsl."):
            for obj in list(vars(mod).values()):
                if isinstance(obj, functools._lru_cache_wrapper):
                    obj.cache_clear()
    if "maskdsl._caching" in sys.modules:
        sys.modules["maskdsl._caching"].clear_all()


def pytest_runtest_setup(item):
    _clear_caches()
