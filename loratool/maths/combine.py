"""combine's maths: exact weighted sums of LoRA deltas in factor form (concatenated, scaled
factors), and the dense merges of peft's merge_utils (ties, dare_linear, dare_ties,
magnitude_prune: pruning, sign election, disjoint mean) on one module's dense deltas. No I/O.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch



DENSE_MERGES: tuple[str, ...] = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def weighted_concat(
    terms: list[tuple[torch.Tensor, torch.Tensor, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of Σ_i c_i · up_i @ down_i, exactly: up = [±√|c_i|·up_i], down = [√|c_i|·down_i].

    Each coefficient is split as a square root on both factors (balanced magnitudes, so fp16/bf16
    storage loses no range) with its sign on up.

    Args:
        terms: (up_i (out, r_i), down_i (r_i, in), c_i); 2-D factors of one dtype and device.

    Returns:
        up (out, Σ r_i) and down (Σ r_i, in), in the factors' dtype.
    """
    import torch

    ups, downs = [], []
    for up, down, c in terms:
        root = math.sqrt(abs(c))
        ups.append(up * (root if c >= 0 else -root))
        downs.append(down * root)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)  # (out, Σr), (Σr, in)


def prune(
    t: torch.Tensor,
    density: float,
    method: Literal["magnitude", "random"],
    *,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep a `density` share of t's entries (peft merge_utils.prune).

    magnitude: the int(density·numel) largest |t| (torch.topk). random: a Bernoulli(density) mask,
    divided by density when rescale (DARE). The mask is drawn on the CPU from `generator` with
    torch.bernoulli(torch.full_like(t, density)), so a generator seeded with s draws exactly what
    torch.manual_seed(s) followed by peft's prune draws, whatever the device. density ≥ 1 keeps all.
    """
    import torch

    if density >= 1:
        return t
    if method == "magnitude":
        mask = torch.zeros_like(t).reshape(-1)
        k = int(density * t.numel())
        top = torch.topk(t.abs().reshape(-1), k=k, largest=True)
        mask[top[1]] = 1
        return t * mask.reshape(t.shape)
    p = torch.full(t.shape, density, dtype=t.dtype, device="cpu")
    mask = torch.bernoulli(p, generator=generator).to(t.device)
    kept = t * mask
    return kept / density if rescale else kept


def majority_sign_mask(stacked: torch.Tensor, method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES sign election over dim 0 (peft calculate_majority_sign_mask): total sums the values,
    frequency counts the signs; ties go to +. True where an entry has the elected sign."""
    import torch

    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign (peft disjoint_merge)."""
    import torch

    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def merge_dense(
    deltas: list[torch.Tensor],
    weights: list[float],
    method: str,
    *,
    density: float,
    majority_sign: Literal["total", "frequency"] = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One module's dense merge, with the semantics of peft.utils.merge_utils.

    ties: magnitude-prune each delta, elect signs on the pruned (unweighted) deltas, weight, mean
    of the agreeing entries. magnitude_prune: magnitude-prune, then Σ w_i·Δ_i. dare_linear: random
    prune with rescale, then Σ w_i·Δ_i. dare_ties: random prune with rescale, then as ties.

    Args:
        deltas: same-shape float tensors (each input's scaled ΔW), in input order; random masks
            are drawn in this order.
        weights: one per delta.

    Raises:
        ValueError: unknown method.
    """
    import torch

    if method not in DENSE_MERGES:
        raise ValueError(f"unknown dense merge {method!r}")
    random = method.startswith("dare")
    pruned = [prune(d, density, "random" if random else "magnitude", rescale=random, generator=generator)
              for d in deltas]
    stacked = torch.stack(pruned, dim=0)  # (n, *shape)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.view(w.shape + (1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        mask = majority_sign_mask(stacked, majority_sign)
        return disjoint_merge(stacked * w, mask)
    return (stacked * w).sum(dim=0)
