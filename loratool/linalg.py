"""Pure tensor maths for LoRA factors: deltas, the exact low-rank SVD, rank rules. No I/O.

Notation: up (out, r), down (r, in); ΔW = scale · up @ down. Conv factors are flattened to
(out, r) and (r, in·kh·kw); an embedding's ΔW is (up @ down).T; fan_in_fan_out's ΔW is transposed.
Everything is computed in float32 or wider; callers cast back to the stored dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from loratool.adapter import LoraModule

RankMethod = Literal["sv_ratio", "sv_fro", "sv_cumulative", "max_error"]
RANK_METHODS: tuple[str, ...] = ("sv_ratio", "sv_fro", "sv_cumulative", "max_error")

_TOL = 1e-6  # relative slack: a boundary met up to float32 rounding of the stored factors counts as met


def factors(
    module: LoraModule, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's factors as 2-D matrices: up (out, r) and down (r, in·k), unscaled."""
    import torch

    dtype = dtype or torch.float32
    up = module.up.load().to(device=device, dtype=dtype)
    down = module.down.load().to(device=device, dtype=dtype)
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)  # (out, r), (r, in·k)


def delta(
    module: LoraModule, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The dense ΔW in the base weight's stored layout (module.base_shape), in float32 by default.

    Dense by nature: use it to merge or to test; never to decompose (see lowrank_svd).
    """
    up, down = factors(module, dtype=dtype, device=device)
    d = (up @ down) * module.scale  # (out, r) @ (r, in·k) -> (out, in·k)
    if module.kind == "embedding" or module.fan_in_fan_out:
        return d.T.contiguous()  # (in, out): embedding (vocab, dim), GPT-2 Conv1D
    return d.reshape(module.base_shape)


def lowrank_svd(
    up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of up @ down without forming it.

    With up = Qu·Ru and downᵀ = Qd·Rd (orthonormal Qu, Qd), up·down = Qu·(Ru·Rdᵀ)·Qdᵀ; the SVD of
    the r×r core Ru·Rdᵀ = Uc·S·Vhc gives U = Qu·Uc and Vh = Vhc·Qdᵀ. Cost O((out+in)·r²) instead of
    O(out·in·min(out, in)) for the dense route. The bases come from the r×r Gram matrices (BLAS-3,
    float64) when a factor is well conditioned, else from a Householder QR (see _basis).

    Args:
        up: (out, r); down: (r, in). Any float dtype; computed in float64.

    Returns:
        U (out, r), S (r,) descending, Vh (r, in), in float64.
    """
    import torch

    up64 = up.to(torch.float64)
    downT = down.to(torch.float64).T  # (in, r)
    ru, to_u = _basis(up64)  # up = Qu·Ru
    rd, to_d = _basis(downT)  # downᵀ = Qd·Rd
    uc, s, vhc = torch.linalg.svd(ru @ rd.T)  # r×r core
    return to_u(uc), s, to_d(vhc.T).T  # (out, r), (r,), (r, in)


_GRAM_MIN_RCOND = 1e-10  # eigenvalue ratio of the Gram matrix: κ(factor) up to 1e5 in float64


def _basis(a: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """R (r, r) with a = Q·R for an orthonormal Q (m, r), and a function x -> Q @ x.

    Gram route: aᵀa = V·Λ·Vᵀ, R = Λ^½·Vᵀ, Q = a·V·Λ^-½ (never formed: Q @ x = a @ (V·Λ^-½ @ x)).
    It squares the condition number, so an ill-conditioned or rank-deficient factor takes QR.
    """
    import torch

    lam, v = torch.linalg.eigh(a.T @ a)  # ascending
    if lam[-1] > 0 and lam[0] > _GRAM_MIN_RCOND * lam[-1]:
        root = lam.sqrt()
        w = v / root  # (r, r)
        return root[:, None] * v.T, lambda x: a @ (w @ x)
    q, r = torch.linalg.qr(a)
    return r, lambda x: q @ x


def singular_values(module: LoraModule, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """The exact singular values of the module's effective ΔW (scale included), descending."""
    up, down = factors(module, device=device)
    _, s, _ = lowrank_svd(up, down)
    return s * abs(module.scale)


def energy_rank(s: list[float] | torch.Tensor, share: float) -> int:
    """Smallest k whose top-k singular values keep `share` of the Frobenius norm (sv_fro)."""
    return choose_rank(s, "sv_fro", share)


def choose_rank(
    s: list[float] | torch.Tensor, method: str, threshold: float, cap: int | None = None
) -> int:
    """The SMALLEST rank k that meets the rule (no kohya "+1"), within [1, min(len(s), cap)].

    Rules (s descending):
        sv_ratio t: keep every σ_i ≥ σ_0 / t.
        sv_fro t: sqrt(Σ_{i<k} σ_i²) / ||σ|| ≥ t.
        sv_cumulative t: Σ_{i<k} σ_i / Σ σ ≥ t.
        max_error e: relative Frobenius error sqrt(Σ_{i≥k} σ_i²) / ||σ|| ≤ e.
    An all-zero spectrum gives 1.
    """
    vals = [float(x) for x in s]
    n = len(vals)
    limit = n if cap is None else max(1, min(n, cap))
    if n == 0:
        return 1
    total_sq = sum(v * v for v in vals)
    if vals[0] <= 0.0 or total_sq == 0.0:
        return 1
    k = n
    if method == "sv_ratio":
        floor = vals[0] / threshold
        k = sum(1 for v in vals if v >= floor * (1 - _TOL))
    elif method in ("sv_fro", "max_error", "sv_cumulative"):
        total = sum(vals) if method == "sv_cumulative" else total_sq
        acc = 0.0
        for i, v in enumerate(vals):
            acc += v if method == "sv_cumulative" else v * v
            if method == "sv_fro":
                met = math.sqrt(acc / total) >= threshold * (1 - _TOL)
            elif method == "sv_cumulative":
                met = acc / total >= threshold * (1 - _TOL)
            else:
                met = math.sqrt(max(total - acc, 0.0) / total) <= threshold * (1 + _TOL) + 1e-15
            if met:
                k = i + 1
                break
    else:
        raise ValueError(f"unknown rank method {method!r}")
    return max(1, min(k, limit))


def fro_retained(s: list[float] | torch.Tensor, k: int) -> float:
    """sqrt(Σ_{i<k} σ_i²) / ||σ|| (1.0 for an all-zero spectrum)."""
    vals = [float(x) for x in s]
    total = sum(v * v for v in vals)
    if total == 0.0:
        return 1.0
    return math.sqrt(sum(v * v for v in vals[:k]) / total)
