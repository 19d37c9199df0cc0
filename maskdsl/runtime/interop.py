"""FlexAttention interop (ARCHITECTURE.md, "Flex interop"): the generated artefacts in the
user's row-major token order, or in the tiled order the flex backend runs, with the permutation
that order needs.

``attn.mask_mod``, ``attn.score_mod``, ``attn.source`` and ``attn.block_mask()`` are row-major:
passed to ``flex_attention`` with the user's own q, k, v they give the reference's answer.
``attn.flex_inputs(layout="tiled")`` hands out what the backend itself runs (fewer non-empty
blocks for N-D neighborhoods), plus ``to_layout`` / ``from_layout`` to move tensors in and out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from maskdsl._errors import MaskDSLError
from maskdsl.codegen.layout_search import row_major
from maskdsl.codegen.program import BLOCK_SIZE, Program
from maskdsl.dsl.inputs import check_device
from maskdsl.kernels.flex import permutation, block_mask

__all__ = ["FlexInputs", "LAYOUTS", "row_major_program", "flex_inputs"]

LAYOUTS = ("row-major", "tiled")


@dataclass(frozen=True, eq=False)
class FlexInputs:
    """What ``flex_attention`` needs for one compiled pattern, in one token layout.

    Attributes:
        layout: ``"row-major"`` (the user's order: q, k, v go in as they are) or ``"tiled"``.
        mask_mod, score_mod: flex signatures; score_mod is None without additive score terms.
        block_mask: the analytic BlockMask (sequence lengths: N row-major, ``n_padded`` tiled).
        gather: int64 [n_padded]: position -> index into ``cat([x, zeros(1)])`` along the token
            dim (padding reads the zero row); None for row-major.
        scatter: int64 [N]: the user's token -> its position; None for row-major.
        n, n_padded: tokens of the grid, and positions of the layout.

    Example (tiled)::

        fi = attn.flex_inputs(layout="tiled")
        out = fi.from_layout(flex_attention(fi.to_layout(q), fi.to_layout(k), fi.to_layout(v),
                                            score_mod=fi.score_mod, block_mask=fi.block_mask))
    """

    layout: str
    mask_mod: Callable
    score_mod: Optional[Callable]
    block_mask: object
    gather: Optional[torch.Tensor]
    scatter: Optional[torch.Tensor]
    n: int
    n_padded: int

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, D] in the user's order -> [B, H, n_padded, D] in this layout (zero padding)."""
        self._check(x, self.n, "to_layout")
        if self.gather is None:
            return x
        pad = x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])
        return torch.cat([x, pad], 2).index_select(2, self.gather.to(x.device))

    def from_layout(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, n_padded, D] in this layout -> [B, H, N, D] in the user's order."""
        self._check(out, self.n_padded, "from_layout")
        if self.scatter is None:
            return out
        return out.index_select(2, self.scatter.to(out.device))

    def _check(self, x, n: int, where: str):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[2] != n:
            got = list(x.shape) if isinstance(x, torch.Tensor) else repr(x)
            raise MaskDSLError(f"{where}: expected a [B, H, {n}, D] tensor, got {got}")


def row_major_program(attn):
    """The Program of ``attn``'s pattern in row-major token order: the flex backend's own program
    when it is already prepared and its layout is row-major order, otherwise the row-major-order
    layout (a tiling equal to row-major where one exists, so the tile classes stay per-dimension
    and cheap), built without the layout search the tiled program needs."""
    tiled = attn.prepared_state("flex")
    if tiled is not None and tiled.layout.row_major_order:
        return tiled
    return Program(attn.pattern, attn.score, attn.shape, attn.heads,
                   tile=row_major(attn.shape, BLOCK_SIZE))


def row_major_block_mask(program, device):
    """The BlockMask of a row-major-order program, with the user's sequence length N (flex
    refuses a BlockMask made for another length)."""
    return block_mask(program, device, seq_len=program.n)


def flex_inputs(attn, layout: str, device) -> FlexInputs:
    if layout not in LAYOUTS:
        raise MaskDSLError(f"layout={layout!r}: expected one of {', '.join(map(repr, LAYOUTS))}")
    device = check_device(device)
    if layout == "row-major":
        prog = attn.row_major_program()
        mask_mod, score_mod = prog.mods(device, flex=True)
        return FlexInputs(layout, mask_mod, score_mod, row_major_block_mask(prog, device),
                          None, None, prog.n, prog.n)
    prog = attn.backend_state("flex")     # what the flex backend runs: 128-token N-D tiles
    mask_mod, score_mod = prog.mods(device, flex=True)
    bm = block_mask(prog, device)
    gather, scatter = permutation(prog, device)
    return FlexInputs(layout, mask_mod, score_mod, bm, gather, scatter, prog.n,
                      prog.layout.n_padded)
