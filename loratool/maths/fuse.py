"""Fused <-> split modules (model families): the row sizes of a fused weight's parts, and the exact
block-diagonal fusion of the parts' LoRA factors into one module. No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



def row_sizes(chunks: Sequence[str], total: int, width: int) -> list[int]:
    """Row counts of a module's chunks: "h" = the input width, "Nh" = N times it, the rest share
    what is left equally ("rest", "half").

    Raises:
        ValueError: the rows do not divide as the table says.
    """
    fixed = {i: (int(c[:-1]) if c[:-1] else 1) * width for i, c in enumerate(chunks) if c.endswith("h")}
    free = [i for i in range(len(chunks)) if i not in fixed]
    left = total - sum(fixed.values())
    if left < 0 or (free and left % len(free)) or (not free and left):
        raise ValueError(f"{total} rows do not split as {list(chunks)} with input width {width}")
    return [fixed.get(i, left // len(free) if free else 0) for i in range(len(chunks))]


def block_diagonal_fuse(
    parts: Sequence[tuple[torch.Tensor | None, torch.Tensor | None, float]], rows: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fuse row blocks: ΔW = [s_1·B_1 A_1; s_2·B_2 A_2; ...] as one LoRA, exactly.

    down = the A_i stacked (Σ r_i, in); up = block-diagonal (Σ rows, Σ r_i) with B_i in its rows and
    in A_i's columns; scale = s_1, the other blocks' s_i / s_1 folded into their B_i (none when the
    scales are equal, so the factors are copied bit for bit). A missing part (None) gives zero rows.

    Args:
        parts: per row block (up_i (rows_i, r_i) or None, down_i (r_i, in) or None, scale_i).
        rows: the row count of every block (missing ones included).

    Returns:
        up, down (in the first present part's dtype), and the scale.
    """
    import torch

    present = [(u, d, s) for u, d, s in parts if u is not None and d is not None]
    u0, _, s0 = present[0]
    dtype = u0.dtype
    ranks = [d.shape[0] for _, d, _ in present]
    up = torch.zeros(sum(rows), sum(ranks), dtype=dtype)  # (Σ rows, Σ r)
    downs = []
    row = col = 0
    for (u, d, s), n in zip(parts, rows):
        if u is not None and d is not None:
            r = d.shape[0]
            block = u if s == s0 else (u.float() * (s / s0)).to(dtype)
            up[row:row + n, col:col + r] = block
            downs.append(d)
            col += r
        row += n
    return up, torch.cat(downs, dim=0), s0
