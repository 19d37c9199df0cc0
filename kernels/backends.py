"""Backends behind one dispatcher (ARCHITECTURE.md, "Backends").

Every backend is one module implementing one small protocol (modelled on NATTEN's backend
checks and xformers' ``not_supported_reasons``):

* ``refusal(spec, device)``: None, or one sentence saying why it cannot run this pattern and
  score on this kind of device (a static property of the request);
* ``preference(spec, device)``: under ``auto`` only, why another backend is the better choice even
  though this one could run it (None: take me);
* ``strength(spec, device)``: one sentence saying why it is a good choice (for ``attn.reason``);
* ``call_refusal(spec, q, k, v, return_lse)``: None, or why it cannot run *these* tensors
  (dtype, device, gradients; the lse output), as the message a user who asked for it reads;
* ``prepare(spec)``: the heavy objects it runs (programs, plans), cached inside the module;
* ``run(state, q, k, v, call)``: attention on checked, finite inputs in the user's token order
  (k and v may have H_kv heads dividing H: GQA); ``(out, lse)`` when ``call.return_lse``; for
  a sub-range request (``spec.extent``) q, k and v hold the range's tokens, possibly
  non-finite: the backend isolates such rows itself;
* ``next_keep(spec, state, batch, drop_p, generator)`` (backends with dropout only): the bool
  [B, H, N, N] keep mask ``run`` would draw from ``generator``.

``choose(spec, device)`` walks the device's priority list and returns the first backend with no
refusal and no preference, with ``reason`` assembled from its strength and the reasons of those
ahead of it. Nothing outside this module and the backend modules knows backend internals.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from maskdsl._errors import MaskDSLError

__all__ = ["Spec", "Call", "Choice", "choose", "get", "BACKENDS", "priority", "requested",
           "fallback", "whole_grid_only"]

#: name -> module implementing the protocol (imported on first use: Triton is heavy)
BACKENDS = {
    "dense": "maskdsl.kernels.dense",
    "flex": "maskdsl.kernels.flex",
    "tiles": "maskdsl.kernels.tiles",
    "triton": "maskdsl.kernels.triton_attn",
    "sdpa": "maskdsl.kernels.sdpa",
}
_PRIORITY = {"cuda": ("sdpa", "triton", "flex", "tiles")}
_DEFAULT_PRIORITY = ("sdpa", "tiles")       # dense (the reference) only when asked for


@dataclass(frozen=True, eq=False)
class Spec:
    """What was compiled: the user's pattern (backends lower its simplified form), score terms,
    grid shape and heads; ``extent``: a sub-range request (``dsl.extent.Extent`` with ``q_range``
    and/or ``kv_range``: q holds those queries, k and v those keys, at global coordinates), None
    for the whole grid. Extra tokens never reach a backend: the runtime runs the grid's
    attention and merges the extra tokens' stripes."""

    pattern: object
    score: object
    shape: Tuple[int, ...]
    heads: int
    extent: Optional[object] = None

    @property
    def n(self) -> int:
        return math.prod(self.shape)

    @property
    def ranged(self) -> bool:
        return self.extent is not None


def whole_grid_only(runs: str, spec: Spec) -> Optional[str]:
    """The refusal of a backend whose kernel runs the whole grid, for a sub-range request
    (``runs``: who runs it, "the flex kernels run")."""
    if not spec.ranged:
        return None
    return (f"{spec.extent.describe()}: {runs} the whole grid; sub-ranges run on "
            f"backend='tiles' (PyTorch, any device) or 'dense'")


@dataclass
class Call:
    """One call's options: the logit scale, per-head sink logits and dropout probabilities
    ([H] tensors, None when absent or not training), the dropout generator, and whether
    ``run`` returns ``(out, lse)`` instead of ``out``."""

    scale: float
    sink: Optional[torch.Tensor] = None
    dropout_p: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    return_lse: bool = False


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    skipped: Tuple[Tuple[str, str], ...] = field(default=())


_MODULES: dict = {}


def get(name: str):
    """The backend module ``name`` (imported on first use, then looked up: every call asks)."""
    found = _MODULES.get(name)
    if found is None:
        found = _MODULES[name] = importlib.import_module(BACKENDS[name])
    return found


def priority(device: torch.device) -> tuple:
    return _PRIORITY.get(device.type, _DEFAULT_PRIORITY)


def _assemble(name: str, strength: str, skipped) -> str:
    text = f"{name}: {strength}"
    if skipped:
        text += " (not " + "; not ".join(f"{n}: {why}" for n, why in skipped) + ")"
    return text


def choose(spec: Spec, device: torch.device, start: int = 0) -> Choice:
    """``auto``'s choice for ``device``: the first backend of its priority list (from
    ``start``) that neither refuses the request nor prefers another."""
    skipped: List[Tuple[str, str]] = []
    for name in priority(device)[start:]:
        b = get(name)
        why = b.refusal(spec, device) or b.preference(spec, device)
        if why is None:
            return Choice(name, _assemble(name, b.strength(spec, device), skipped), tuple(skipped))
        skipped.append((name, why))
    raise MaskDSLError(  # pragma: no cover - tiles runs everything
        "no backend can run this: " + "; ".join(f"{n}: {w}" for n, w in skipped))


def requested(name: str, spec: Spec, device: torch.device) -> Choice:
    """An explicitly requested backend: MaskDSLError naming it and what it cannot do."""
    why = get(name).refusal(spec, device)
    if why is not None:
        raise MaskDSLError(f"backend={name!r}: {why}")
    return Choice(name, f"{name} was requested")


def fallback(spec: Spec, current: str, q, k, v, device,
             return_lse: bool = False) -> Tuple[str, List[Tuple[str, str]]]:
    """Under ``auto``: the backend that runs *this call* when ``current`` refuses the tensors:
    the next one in the priority list that takes the request and these tensors, with the
    refusals met on the way."""
    order = priority(device)
    later = order[order.index(current) + 1:] if current in order else order
    met: List[Tuple[str, str]] = []
    for name in (current, *later):
        b = get(name)
        if name != current and (b.refusal(spec, device) or b.preference(spec, device)):
            continue
        why = b.call_refusal(spec, q, k, v, return_lse)
        if why is None:
            return name, met
        met.append((name, why))
    raise MaskDSLError(  # pragma: no cover - tiles takes every float tensor
        "no backend can run this call: " + "; ".join(f"{n}: {w}" for n, w in met))
