"""Memory a request needs, checked before it is allocated (ARCHITECTURE.md, "Bad input").

A shape, head count or batch too large for what was asked (a dense [H, N, N] mask of a
million-token grid, a tile-class table of a billion tokens) is a user mistake: it must end in a
one-line ``MaskDSLError`` that says how much was asked for and what to do, never in an
out-of-memory traceback or a machine thrashing into swap. Two layers:

* ``check_allocation(what, nbytes, hint)`` refuses a request whose size is known in advance and
  exceeds what this process may allocate (physical memory, and ``RLIMIT_AS`` when one is set);
* ``guarded(what, hint)`` turns an allocation failure that still happens (numpy's MemoryError,
  torch's "can't allocate memory") into the same error.
"""
from __future__ import annotations

import contextlib
import functools
import os

from ._errors import MaskDSLError

__all__ = ["check_allocation", "guarded", "guard", "budget", "fmt_bytes"]

_SHARE = 0.75   # of what is left: leave room for the caller's own tensors


def _physical() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 40


def _address_space_left() -> int:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return 1 << 62
    if soft == resource.RLIM_INFINITY:
        return 1 << 62
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - no procfs
        used = 0
    return max(0, soft - used)


def budget() -> int:
    """Bytes one request may allocate: a share of physical memory and of the address space
    left under ``RLIMIT_AS``."""
    return int(_SHARE * min(_physical(), _address_space_left()))


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def check_allocation(what: str, nbytes: float, hint: str = "") -> None:
    """MaskDSLError if ``what`` (about ``nbytes``) cannot fit in this process's budget."""
    left = budget()
    if nbytes > left:
        raise MaskDSLError(
            f"{what} would need about {fmt_bytes(nbytes)}, more than the {fmt_bytes(left)} this "
            f"process can allocate" + (f"; {hint}" if hint else ""))


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text
        or "out of memory" in text.lower())


@contextlib.contextmanager
def guarded(what: str, hint: str = ""):
    """Allocation failures inside become a one-line MaskDSLError naming ``what``."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        raise MaskDSLError(
            f"{what}: out of memory ({type(e).__name__})" + (f"; {hint}" if hint else "")
        ) from None


def guard(what: str, hint: str = ""):
    """Decorator form of :func:`guarded`."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with guarded(what, hint):
                return fn(*args, **kwargs)

        return wrapper

    return deco
