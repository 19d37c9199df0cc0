"""Checks on the tensors a user passes in: q, k, v, dropout keep masks, scales."""
from __future__ import annotations

import math
import numbers

import torch

from maskdsl._errors import MaskDSLError
from .score import check_params_device, check_tensor_params
from .values import FLOAT_MAX

__all__ = ["check_qkv", "check_scale", "check_device", "check_count"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v, shape: tuple, heads=None, dtypes=FLOATS, extent=None):
    """Check q, k, v against the grid ``shape`` (and ``heads``; ``extent``: the query and key
    token counts of extra tokens or sub-ranges, ``extent.Extent``); returns (B, H, N, D)."""
    n = math.prod(shape)
    counts = {"q": extent.nq, "k": extent.nk, "v": extent.nk} if extent is not None else \
        {"q": n, "k": n, "v": n}
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise MaskDSLError(f"{name}: expected a torch.Tensor [B, H, N, D], got {type(t).__name__}")
        if t.layout != torch.strided:
            raise MaskDSLError(
                f"{name}: expected a dense (strided) tensor [B, H, N, D], got layout {t.layout}; "
                f"convert it with .to_dense()"
            )
        if t.dim() != 4:
            raise MaskDSLError(
                f"{name}: expected a 4-D tensor [B, H, N, D], got shape {list(t.shape)}"
            )
        if t.dtype not in dtypes:
            raise MaskDSLError(
                f"{name}: dtype {t.dtype} is not supported; expected one of "
                f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}"
            )
        want = counts[name]
        if t.shape[2] != want:
            hint = ""
            if t.shape[1] == want:
                hint = (f"; it looks heads-last [B, N, H, D]: pass {name}.transpose(1, 2) "
                        f"(maskdsl.natten takes heads-last tensors as they are)")
            if extent is not None and not extent.square:
                raise MaskDSLError(
                    f"{name}: shape {list(t.shape)} has {t.shape[2]} tokens; expected "
                    f"[B, H, {want}, D] for shape {shape} with {extent.describe()}{hint}")
            raise MaskDSLError(
                f"{name}: shape {list(t.shape)} has N={t.shape[2]} tokens but shape {shape} has "
                f"{n}; expected [B, H, {n}, D]{hint}"
            )
        if name == "q" and heads is not None and t.shape[1] != heads:
            raise MaskDSLError(
                f"{name}: shape {list(t.shape)} has H={t.shape[1]} heads but the pattern was "
                f"compiled for heads={heads}"
            )
    b, h, _, d = q.shape
    hk = k.shape[1]
    # grouped-query attention (ARCHITECTURE.md, "GQA"): k and v may carry H_kv heads, H % H_kv
    # == 0; query head i reads key/value head i // (H // H_kv)
    if k.shape[0] != b or k.shape[3] != d or hk == 0 or h % hk:
        what = "batch size" if k.shape[0] != b else "head dim" if k.shape[3] != d else "heads"
        raise MaskDSLError(
            f"k: shape {list(k.shape)} differs from q's {list(q.shape)} in its {what}; expected "
            f"[{b}, H_kv, {k.shape[2]}, {d}] with H_kv dividing q's {h} heads (grouped-query "
            f"attention) or equal to it")
    if v.shape[:3] != k.shape[:3]:
        raise MaskDSLError(
            f"v: shape {list(v.shape)} differs from k's {list(k.shape)} in [B, H_kv, N]"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise MaskDSLError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); expected one dtype")
    if not (q.device == k.device == v.device):
        raise MaskDSLError(
            f"q, k, v: devices differ ({q.device}, {k.device}, {v.device}); expected one device"
        )
    if d == 0 or v.shape[3] == 0:
        raise MaskDSLError(f"q, v: head dims {d} and {v.shape[3]}: expected >= 1")
    return b, h, n, d


def check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)
            or abs(scale) > FLOAT_MAX):
        raise MaskDSLError(f"scale={scale!r}: expected a finite number within float32's range "
                           f"(|scale| <= 3.4e38; default 1/sqrt(D))")
    return float(scale)


def check_device(device, where: str = "device", usable: bool = True) -> torch.device:
    """A ``torch.device`` from a user's ``device=`` (a string, a torch.device, or an int index of
    an accelerator). ``usable``: the device must exist on this machine (tensors will be made
    there); without it, any well-formed device is accepted (``md.compile(..., device="cuda")``
    plans for a machine the callable will run on)."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, numbers.Integral)):
        raise MaskDSLError(
            f"{where}={device!r}: expected a device such as 'cpu', 'cuda' or 'cuda:0'")
    if isinstance(device, numbers.Integral) and (
            device < 0 or not torch.cuda.is_available() or device >= torch.cuda.device_count()):
        raise MaskDSLError(
            f"{where}={device!r}: an int names a CUDA device index, but this machine has "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA devices; "
            f"expected e.g. 'cpu' or 'cuda:0'")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MaskDSLError(
            f"{where}={device!r}: not a device; expected e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if usable:
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError, TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MaskDSLError(f"{where}={device!r}: this machine cannot use it ({first})") from None
    return dev


def check_count(where: str, value, lo: int = 0) -> int:
    """A non-negative (or >= lo) int argument such as a batch size or token count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= 2**31 - 1:
        raise MaskDSLError(f"{where}={value!r}: expected an int in [{lo}, 2**31 - 1]")
    return int(value)


def check_call(score, device, scale, head_dim: int, return_lse) -> float:
    """The checks every call on a compiled attention runs on its arguments before any work
    (``attn(q, k, v)`` and the KV cache's ``cache.step``): ``return_lse`` a bool, the scale,
    the score's tensors on q's device and in range as they are now (tensors are read at call
    time). Returns the scale (default 1/sqrt(head_dim))."""
    if not isinstance(return_lse, bool):
        raise MaskDSLError(f"return_lse={return_lse!r}: expected True or False")
    scale = check_scale(scale, head_dim)
    check_params_device(score, device)
    check_tensor_params(score)
    return scale
