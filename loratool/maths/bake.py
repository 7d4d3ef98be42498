"""Runtime layouts (vLLM, SGLang, MLX, llama.cpp) want one rank and one scale for every module:
factors zero-padded to a common rank, a scale baked into up (widened to float32 when a 16-bit dtype
would round it), and the best plain-LoRA approximation of a DoRA module on its base weight. No I/O.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loratool.maths.delta import dora_normalise
from loratool.maths.svd import truncate_dense

if TYPE_CHECKING:
    import torch

    from loratool.adapter import DoraAxis


def pad_rank(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors to `rank`: up gets zero columns, down zero rows; up @ down is unchanged.

    Works on any layout with the rank on up's dim 1 and down's dim 0 (linear, conv, embedding).
    """
    import torch

    extra = rank - down.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {down.shape[0]} down to {rank}")
    if extra == 0:
        return up, down
    up_pad = torch.zeros((up.shape[0], extra, *up.shape[2:]), dtype=up.dtype)
    down_pad = torch.zeros((extra, *down.shape[1:]), dtype=down.dtype)
    return torch.cat([up, up_pad], dim=1), torch.cat([down, down_pad], dim=0)


def exact_in(factor: float) -> bool:
    """True when multiplying by `factor` rounds nothing in any float dtype: factor is 0 or ±2^k
    (the exponent moves, the mantissa stays; barring overflow)."""
    return factor == 0 or math.frexp(abs(factor))[0] == 0.5


def bake_scale(up: torch.Tensor, factor: float) -> tuple[torch.Tensor, bool]:
    """up · factor, in the stored dtype when that is exact, else in float32.

    A 16-bit up times a factor that is not a power of two would round every value; float32 keeps
    the product to float32 rounding (the runtime computes in 16 bits or wider anyway).

    Returns:
        (the scaled up, whether the dtype was widened to float32).
    """
    import torch

    if factor == 1.0:
        return up, False
    widen = up.dtype in (torch.float16, torch.bfloat16) and not exact_in(factor)
    out_dtype = torch.float32 if widen else up.dtype
    return (up.to(torch.float64) * factor).to(out_dtype), widen


def dora_as_lora(
    w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float, magnitude: torch.Tensor, rank: int,
    axis: DoraAxis = "out",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` plain LoRA for a DoRA module on base weight `w` (an approximation).

    DoRA's merged weight is W' = diag(g)·(W + s·up@down) with g = m / ||W + s·up@down||_row (per
    output row, peft's convention; per input column the diagonal scales columns instead), so
    W' − W = diag(g)·s·up@down + diag(g − 1)·W: the second term is full rank unless g = 1. Its best
    rank-k factors come from the SVD of the dense difference.

    Args:
        w: the base weight, float32, as stored ((out, in) or a conv's (out, in, kh, kw)).
            up (out, r), down (r, in·k); magnitude: out values (axis "out") or in values ("in").

    Returns:
        up (out, k), down (k, in·k) with scale 1, and the relative Frobenius error
        ||(W' − W) − up@down|| / ||W' − W|| (0 when the difference is zero).
    """
    import torch

    flat = w.reshape(w.shape[0], -1)
    merged = flat + scale * (up.to(torch.float32) @ down.to(torch.float32))  # (out, r) @ (r, in·k) -> (out, in·k)
    diff = dora_normalise(merged.reshape(w.shape), magnitude, axis).reshape(flat.shape) - flat
    new_up, new_down, s = truncate_dense(diff, rank)
    total = float((s.double() ** 2).sum())
    kept = float((s[: new_up.shape[1]].double() ** 2).sum())
    err = math.sqrt(max(0.0, total - kept) / total) if total > 0 else 0.0
    return new_up, new_down, err
