"""What every cache of maskdsl's obeys (ARCHITECTURE.md, "Caches"): it is bounded (``LRU``), keyed
by content, and what it keeps is built as ordinary tensors, never inference tensors, so a first
call under ``torch.inference_mode()`` cannot break a later call with autograd."""
from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections import OrderedDict

import torch

__all__ = ["outside_inference_mode", "LRU", "clear_all", "function_key"]

_ALL = []   # every LRU made (clear_all: benchmarks measuring cold builds, tests)


class LRU:
    """A bounded, thread-safe mapping that forgets its least recently used entry: at most
    ``maxsize`` entries and, with ``weigh``, at most ``max_bytes`` of them (``weigh(value)`` in
    bytes, read when entries are added; the newest entry always stays)."""

    def __init__(self, maxsize: int, max_bytes: int = None, weigh=None):
        self.maxsize, self.max_bytes, self.weigh = maxsize, max_bytes, weigh
        self._data: "OrderedDict" = OrderedDict()
        self._lock = threading.Lock()
        _ALL.append(self)

    def get(self, key, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key, value):
        """Store ``value`` unless another thread stored one first; returns the stored value."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            self._data[key] = value
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
            if self.weigh is not None:
                total = sum(self.weigh(v) for v in self._data.values())
                while total > self.max_bytes and len(self._data) > 1:
                    _, old = self._data.popitem(last=False)
                    total -= self.weigh(old)
            return value

    def clear(self):
        with self._lock:
            self._data.clear()

    def __len__(self):
        return len(self._data)


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


def clear_all() -> None:
    """Empty every maskdsl cache (recipes, generated code, plans, BlockMasks, statistics)."""
    for cache in _ALL:
        cache.clear()


# ------------------------------------------------ keys for user functions (mask_fn, score_fn)
# A user's function is keyed by *which function* it is: a serial number given to each function
# object the first time it is keyed and never reused. The table holds weak references, so it
# keeps no function alive and forgets dead ones; a new function, even at a dead one's address,
# gets a new serial.

class _Identity:
    """A strong reference compared by identity (a callable that cannot be weakly referenced)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


_SERIALS: dict = {}                 # id(fn) -> (weakref to fn, serial)
_NEXT_SERIAL = itertools.count()
_SERIAL_LOCK = threading.RLock()    # re-entrant: a weakref callback may run inside it (GC)


def _forget(ident: int, serial: int) -> None:
    with _SERIAL_LOCK:
        found = _SERIALS.get(ident)
        if found is not None and found[1] == serial:
            del _SERIALS[ident]


def function_key(fn) -> tuple:
    """A cache key for a Python function: a serial number that no other function object ever
    gets (see the module docstring); callables without weak references are held by identity."""
    with _SERIAL_LOCK:
        found = _SERIALS.get(id(fn))
        if found is not None and found[0]() is fn:
            return ("fn", found[1])
        serial = next(_NEXT_SERIAL)
        try:
            ref = weakref.ref(fn, lambda _, i=id(fn), s=serial: _forget(i, s))
        except TypeError:
            return ("fn-object", _Identity(fn))
        _SERIALS[id(fn)] = (ref, serial)
        return ("fn", serial)
