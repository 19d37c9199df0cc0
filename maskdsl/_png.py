"""``maskdsl show --png``: the mask and one query's keys as an image (matplotlib, lazy)."""
from __future__ import annotations

import math
import os

import torch

from ._errors import MaskDSLError

__all__ = ["write_png"]

MAX_PIXELS = 512    # the N x N panel is downsampled to at most this many pixels a side


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MaskDSLError(
            "--png needs matplotlib: install the viz extra, e.g. pip install 'maskdsl[viz]'"
        ) from None
    return plt


def _fraction_image(m: torch.Tensor) -> torch.Tensor:
    """Allowed fraction per cell of an [N, N] bool mask, at most MAX_PIXELS a side."""
    n = m.shape[0]
    b = max(1, math.ceil(n / MAX_PIXELS))
    pad = -n % b
    f = torch.nn.functional.pad(m.float(), (0, pad, 0, pad))
    return f.reshape(f.shape[0] // b, b, -1, b).mean((1, 3))


FORMATS = (".png", ".svg", ".pdf")


def _checked_path(path: str) -> str:
    """The file that will be written: ``.png`` appended when there is no extension; an
    unsupported extension or a missing folder is refused before anything is drawn."""
    root, ext = os.path.splitext(path)
    if not ext:
        path, ext = path + ".png", ".png"
    if ext.lower() not in FORMATS:
        raise MaskDSLError(f"--png={path!r}: unsupported extension {ext!r}; expected one of "
                           f"{', '.join(FORMATS)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MaskDSLError(f"--png={path!r}: the folder {folder!r} does not exist")
    return path


def write_png(path: str, p, score, shape: tuple, heads: int, only_head, query) -> str:
    """Per head: the N x N mask (grey = partial cells when downsampled) and the keys one query
    sees on the grid, coloured by the score terms' bias when a score is given. Returns the path."""
    from . import reference

    path = _checked_path(path)
    plt = _matplotlib()
    m = reference.mask(p, shape, heads)
    bias = reference.bias(score, shape, heads) if score is not None else None
    if query is None:
        query = tuple(s // 2 for s in shape)
    flat = 0
    for c, s in zip(query, shape):
        flat = flat * s + c
    shown = [only_head] if only_head is not None else list(range(heads))
    fig, axes = plt.subplots(len(shown), 2, figsize=(8, 4 * len(shown)), squeeze=False)
    for row, h in enumerate(shown):
        ax = axes[row][0]
        n = m.shape[-1]
        ax.imshow(_fraction_image(m[h]).numpy(), cmap="Greys", vmin=0, vmax=1,
                  interpolation="nearest", extent=(0, n, n, 0))   # axes in tokens
        ax.set_title(f"head {h}: mask ({m[h].float().mean().item():.2%} allowed)")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax = axes[row][1]
        keys = m[h, flat].reshape(shape)
        grid = keys.reshape(shape[0], -1) if len(shape) == 3 else keys.reshape(-1, shape[-1]) \
            if len(shape) == 2 else keys.reshape(1, -1)
        if bias is not None:
            vals = bias[h, flat].reshape(grid.shape).masked_fill(~grid, float("nan"))
            img = ax.imshow(vals.numpy(), cmap="viridis", interpolation="nearest", aspect="auto")
            fig.colorbar(img, ax=ax, label="score bias")
        else:
            ax.imshow(grid.float().numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest",
                      aspect="auto")
        ax.set_title(f"keys seen by query {','.join(map(str, query))}"
                     + (" (frames side by side)" if len(shape) == 3 else ""))
    fig.suptitle(f"{p!r}  shape {'x'.join(map(str, shape))}", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=80)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise MaskDSLError(f"--png={path!r}: cannot write it ({why})") from None
    finally:
        plt.close(fig)
    return os.path.abspath(path)
