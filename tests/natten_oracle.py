"""NATTEN as an external oracle: imported once for every test module that compares with it.

Locally a module that needs NATTEN skips when it is not installed; in CI (CI=true) it must run,
so a missing NATTEN fails collection. The one private torch name the NATTEN tests rely on is
set here, and only here.
"""
import os

import pytest

INSTALL = "pip install --no-build-isolation natten==0.21.7"

if os.environ.get("CI") == "true":
    try:
        import natten
    except ImportError as e:
        pytest.fail(f"NATTEN is required in CI ({e}); install it with: {INSTALL}", pytrace=False)
else:
    natten = pytest.importorskip("natten", reason=f"NATTEN not installed ({INSTALL})")

MARKS = [
    pytest.mark.natten,
    # flex_attention run eagerly (no torch.compile, which CPU CI does not need) warns once per
    # process that it is unfused, and NATTEN 0.21.7 still uses its deprecated return_lse argument.
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning"),
    pytest.mark.filterwarnings("ignore:return_lse is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def eager_flex_without_dynamo():
    """Speed: eager flex_attention (NATTEN's CPU path) is normally wrapped in
    dynamo(backend="eager"), ~0.1-0.5 s per new shape; this private torch flag calls the math
    implementation directly (about 10x faster here, identical forward outputs; unsafe only for
    backward, which NATTEN never runs on CPU). Restored afterwards; a no-op without the flag."""
    import torch.nn.attention.flex_attention as flex

    name = "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"
    if not hasattr(flex, name):
        yield
        return
    old = getattr(flex, name)
    setattr(flex, name, True)
    try:
        yield
    finally:
        setattr(flex, name, old)
