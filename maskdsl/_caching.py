"""What every cache of maskdsl's obeys (ARCHITECTURE.md, "Caches"): what it keeps is built as
ordinary tensors, never inference tensors, so a first call under ``torch.inference_mode()``
cannot break a later call with autograd."""
from __future__ import annotations

import functools

import torch

__all__ = ["outside_inference_mode"]


def outside_inference_mode(fn):
    """Run ``fn`` with inference mode off: the tensors it builds (and a cache keeps) are normal
    tensors that autograd may save. Inside ``torch.inference_mode()`` this is still cheap: the
    callers only build once per cache entry."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper
