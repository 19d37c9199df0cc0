"""Parameter values: plain numbers, per-dimension tuples and ``per_head`` lists.

Every numeric parameter of a pattern or score node may be

* a number (the same on every dimension and every head),
* a tuple with one entry per grid dimension (for per-dimension parameters),
* ``per_head([v0, v1, ...])`` with one value per head (each value may itself be a
  per-dimension tuple), or a tuple whose entries are ``per_head`` lists.

This module normalises and checks such values at construction time (what can be checked
without a shape) and resolves them for one head at bind time.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Optional
import torch

from maskdsl._errors import MaskDSLError

__all__ = ["PerHead", "per_head"]


@dataclass(frozen=True, eq=True)
class PerHead:
    """One value per attention head; build it with :func:`per_head`."""

    values: tuple

    def __repr__(self) -> str:
        return "per_head([" + ", ".join(_fmt(v) for v in self.values) + "])"

    def __len__(self) -> int:
        return len(self.values)


def per_head(values) -> PerHead:  # a DSL name: registered in _node
    """Give a numeric parameter a different value on each head.

    Args:
        values: a non-empty list or tuple with one number (or per-dimension tuple) per head.
            Its length must equal the ``heads`` the pattern is compiled with.

    Example:
        >>> import maskdsl as md
        >>> md.window(md.per_head([64, 128, 256, 512]))
        window(per_head([64, 128, 256, 512]))
    """
    if isinstance(values, PerHead):
        return values
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise MaskDSLError(
            f"per_head: values={values!r}: expected a non-empty list with one value per head"
        )
    out = []
    for i, v in enumerate(values):
        if isinstance(v, PerHead):
            raise MaskDSLError(f"per_head: values[{i}]={v!r}: per_head lists cannot be nested")
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(v, tuple):
            if len(v) == 0 or any(not _is_number(x) for x in v):
                raise MaskDSLError(
                    f"per_head: values[{i}]={v!r}: expected a number or a tuple of numbers"
                )
        elif not _is_number(v):
            raise MaskDSLError(f"per_head: values[{i}]={v!r}: expected a number or a tuple of numbers")
        out.append(v)
    return PerHead(tuple(out))


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


def fmt_value(v) -> str:
    """The DSL spelling of a parameter value (used by node reprs)."""
    if _is_tensor(v):
        return "<tensor [" + ", ".join(str(s) for s in v.shape) + "]>"
    return _fmt(v)


def _is_tensor(x) -> bool:
    # Imported lazily so that building patterns never needs torch's import time.
    return isinstance(x, torch.Tensor)


# --------------------------------------------------------------------------- checking

INT_MAX = 2**31 - 1                 # every int parameter: what generated int64 code (and the
                                    # Triton kernel's int32 coordinates, after clamping) can hold
FLOAT_MAX = 3.4028234663852886e38   # float32's largest finite value: the fast backends compute
                                    # in float32, so a parameter beyond it would become inf there


def _bound_text(v) -> str:
    if v == INT_MAX:
        return "2**31 - 1"
    if isinstance(v, int) and v > INT_MAX and (v & (v - 1)) == 0:
        return f"2**{v.bit_length() - 1}"
    if isinstance(v, float) and abs(v) == FLOAT_MAX:
        return "-3.4e38" if v < 0 else "3.4e38"
    return repr(v)


class Check:
    """What one numeric field accepts: ``kind`` "int" or "float" and the closed (or open)
    interval ``[lo, hi]``. Ints are bounded by ``INT_MAX`` and floats by ``FLOAT_MAX`` unless
    the field names other bounds; ``legal`` is the range as messages print it."""

    def __init__(self, kind: str, lo=None, hi=None, *, lo_open: bool = False,
                 hi_open: bool = False, what: Optional[str] = None, per_dim: bool = False,
                 per_head: bool = True, tensor: bool = False):
        big = INT_MAX if kind == "int" else FLOAT_MAX
        self.kind = kind
        self.lo = -big if lo is None else lo
        self.hi = big if hi is None else hi
        self.lo_open, self.hi_open = lo_open, hi_open
        self.per_dim, self.per_head, self.tensor = per_dim, per_head, tensor
        noun = what or ("an int" if kind == "int" else "a number")
        self.legal = (f"{noun} in {'(' if lo_open else '['}{_bound_text(self.lo)}, "
                      f"{_bound_text(self.hi)}{')' if hi_open else ']'}")

    def scalar_only(self) -> "Check":
        """The same range for one entry of a per-dimension tuple."""
        out = copy.copy(self)
        out.per_dim = False
        return out

    def ok(self, v) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return bool(above and below)


def _scalar(node: str, field: str, v, check: Check, shown: Optional[str] = None):
    """Normalise one scalar (int-like -> int, real -> float) and range-check it."""
    name = shown or field
    if v is None:
        raise MaskDSLError(f"{node}: {name}=None: expected {check.legal}")
    if check.kind == "int":
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise MaskDSLError(f"{node}: {name}={v!r}: expected {check.legal}")
        v = int(v)
    else:
        if not _is_number(v):
            raise MaskDSLError(f"{node}: {name}={v!r}: expected {check.legal}")
        v = int(v) if isinstance(v, numbers.Integral) else float(v)
        if not math.isfinite(v):
            raise MaskDSLError(f"{node}: {name}={v!r}: expected a finite number, {check.legal}")
    if not check.ok(v):
        raise MaskDSLError(f"{node}: {name}={v!r} is out of range: expected {check.legal}")
    return v


def check_tensor_values(node: str, field: str, t, check: Check) -> None:
    """Range-check a tensor-valued parameter when it is read (at call time: its values may
    have changed since compile). NaN is let through on purpose: it propagates to the output
    (never a finite wrong answer); anything else outside the field's range is refused."""
    vals = t.detach().reshape(-1).tolist()          # [] or [heads]: a host copy of a few floats
    for i, x in enumerate(vals):
        if math.isnan(x):
            continue
        if not math.isfinite(x) or not check.ok(x):
            where = f"[{i}]" if len(vals) > 1 else ""
            raise MaskDSLError(
                f"{node}: {field}{where}={x!r} (a tensor value) is out of range: expected "
                f"{check.legal}; NaN propagates to the output")


def normalize(node: str, field: str, v, check: Check):
    """Check a parameter value at construction time and return it normalised
    (lists -> tuples, numpy scalars -> Python numbers)."""
    if check.tensor and _is_tensor(v):
        if not v.is_floating_point():
            raise MaskDSLError(f"{node}: {field}: expected a floating-point tensor, got dtype {v.dtype}")
        if v.dim() > 1:
            raise MaskDSLError(
                f"{node}: {field}: expected a tensor of shape [] or [heads], got {list(v.shape)}"
            )
        return v
    if isinstance(v, (list, PerHead)) and not (check.per_dim and isinstance(v, list)):
        if isinstance(v, list):
            raise MaskDSLError(
                f"{node}: {field}={v!r}: a list is ambiguous here; write per_head({v!r}) "
                f"for one value per head"
            )
        if not check.per_head:
            raise MaskDSLError(f"{node}: {field}={v!r}: this parameter cannot vary per head")
        vals = []
        for i, x in enumerate(v.values):
            if isinstance(x, tuple):
                if not check.per_dim:
                    raise MaskDSLError(
                        f"{node}: {field}={v!r}: per_head values must be numbers, got {x!r}"
                    )
                vals.append(tuple(_scalar(node, field, e, check, f"{field}[head {i}]") for e in x))
            else:
                vals.append(_scalar(node, field, x, check, f"{field}[head {i}]"))
        return PerHead(tuple(vals))
    if isinstance(v, (tuple, list)):
        if not check.per_dim:
            raise MaskDSLError(f"{node}: {field}={v!r}: expected a single value, {check.legal}")
        if len(v) == 0 or len(v) > 3:
            raise MaskDSLError(
                f"{node}: {field}={v!r}: expected one entry per grid dimension (1 to 3 entries)"
            )
        out = []
        for i, x in enumerate(v):
            if isinstance(x, PerHead):
                out.append(normalize(node, f"{field}[{i}]", x, check.scalar_only()))
            else:
                out.append(_scalar(node, field, x, check, f"{field}[{i}]"))
        return tuple(out)
    return _scalar(node, field, v, check)


def head_counts(v) -> set:
    """The lengths of the per_head lists inside a value."""
    if isinstance(v, PerHead):
        return {len(v)}
    if isinstance(v, tuple):
        out = set()
        for x in v:
            out |= head_counts(x)
        return out
    return set()


def dim_count(v) -> Optional[int]:
    """How many per-dimension entries a value names (None when it broadcasts)."""
    if isinstance(v, tuple):
        return len(v)
    if isinstance(v, PerHead):
        counts = {len(x) for x in v.values if isinstance(x, tuple)}
        return counts.pop() if len(counts) == 1 else (None if not counts else -1)
    return None


def at_head(v, h: int):
    """The value for head ``h`` (per_head lists replaced by their h-th entry)."""
    if isinstance(v, PerHead):
        return v.values[h]
    if isinstance(v, tuple):
        return tuple(at_head(x, h) for x in v)
    return v


def check_dims(node: str, dims) -> Optional[tuple]:
    """Normalise a ``dims=`` argument: None (all dims), an int, or distinct indices in 0..2."""
    if dims is None:
        return None
    given = dims
    if isinstance(dims, numbers.Integral) and not isinstance(dims, bool):
        dims = (dims,)
    if isinstance(dims, list):
        dims = tuple(dims)
    if (not isinstance(dims, tuple) or not 1 <= len(dims) <= 3
            or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0 for x in dims)
            or len(set(dims)) != len(dims)):
        raise MaskDSLError(
            f"{node}: dims={given!r}: expected a tuple of distinct dimension indices in 0..2, "
            f"e.g. dims=(0,)"
        )
    return tuple(int(x) for x in dims)


def dims_in_shape(node: str, dims: Optional[tuple], shape: tuple) -> tuple:
    """The dims a node acts on for a grid shape (all when None); each must exist."""
    out = tuple(range(len(shape))) if dims is None else dims
    for x in out:
        if x >= len(shape):
            raise MaskDSLError(
                f"{node}: dims={_fmt(dims)} names dim {x} but the shape {shape} has dims "
                f"0..{len(shape) - 1}"
            )
    return out


def per_dim(node: str, field: str, v, rank: int) -> tuple:
    """Broadcast a resolved (per-head free) value to one entry per dimension."""
    if isinstance(v, tuple):
        if len(v) != rank:
            raise MaskDSLError(
                f"{node}: {field}={_fmt(v)} has {len(v)} entries but the shape has {rank} "
                f"dimension{'s' if rank != 1 else ''}; give one entry per dimension or a single number"
            )
        return v
    return (v,) * rank
