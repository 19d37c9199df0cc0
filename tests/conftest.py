"""Shared test setup: Hypothesis profiles and the requires_cuda marker.

Profiles: ``derandomize`` (the default, used in CI: fixed seeds, moderate example counts) and
``thorough`` (``pytest --hypothesis-profile=thorough``: random seeds, many more examples).
"""
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (it must be on before they are
# defined, i.e. before maskdsl.kernels.triton_attn is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh inductor cache per test session: inductor's on-disk FX graph cache does not key on
# custom ops' fake implementations, so code compiled against an older maskdsl (or an older
# fake) would be reused and fail its stride asserts (seen locally; CI machines start empty).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="maskdsl-test-inductor-")
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("derandomize", derandomize=True, max_examples=100, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=1000, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomize"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
