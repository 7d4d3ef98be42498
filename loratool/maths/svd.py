"""Singular value decompositions and the rank rules that read them: the exact SVD of a low-rank
product up @ down without forming it (resize, inspect), the thin SVD of a small dense matrix
truncated to rank k, the randomized SVD of a large dense matrix (extract: the difference of two
checkpoints' weights), and the rules that pick a rank from singular values (sv_ratio, sv_fro,
sv_cumulative, max_error, an energy share). No I/O.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from loratool.maths.delta import factors

if TYPE_CHECKING:
    import torch

    from loratool.adapter import LoraModule


RANK_METHODS: tuple[str, ...] = ("sv_ratio", "sv_fro", "sv_cumulative", "max_error")

_TOL = 1e-6  # relative slack: a boundary met up to float32 rounding of the stored factors counts as met


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
    """Smallest k whose top-k singular values keep `share` of the energy Σσ² (= ||ΔW||_F²).

    Equal to the sv_fro rule at threshold sqrt(share): rank_90 is what
    `resize --method sv_fro --threshold 0.949` keeps.
    """
    return choose_rank(s, "sv_fro", math.sqrt(share))


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


def truncate_dense(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-k factors of a dense (out, in) matrix: torch.linalg.svd (thin) in float32.

    Returns:
        up (out, k) = U_k·√S_k, down (k, in) = √S_k·Vh_k, and every singular value (descending).
    """
    import torch

    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    k = max(1, min(k, s.shape[0]))
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], s


# ---------------------------------------------------------------------------------------------
# truncated SVD of a dense matrix (extract: the difference of two checkpoints' weights)

EXACT_MAX_DIM = 1024  # matrices whose smaller side is at most this take the exact SVD
POWER_ITERATIONS = 4
PROBE_RANK = 64  # first sketch size for a threshold on a large matrix; doubled until the share is met
SEED = 0  # the randomized sketch is seeded per matrix: results do not depend on --modules or order


def _oversample(k: int) -> int:
    return max(10, k // 2)


def randomized_svd(m: torch.Tensor, q: int, *, niter: int = POWER_ITERATIONS, seed: int = SEED
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-q SVD of m (rows, cols) by a Gaussian sketch and `niter` power iterations.

    Each power iteration re-orthonormalises (QR) so small singular directions are not lost to
    rounding. Returns U (rows, q), S (q,) descending, Vh (q, cols), in m's dtype and device.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(m.shape[1], q, generator=gen, dtype=m.dtype).to(m.device)  # (cols, q)
    basis, _ = torch.linalg.qr(m @ omega)  # (rows, q)
    for _ in range(niter):
        z, _ = torch.linalg.qr(m.T @ basis)  # (cols, q)
        basis, _ = torch.linalg.qr(m @ z)  # (rows, q)
    ub, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)  # (q, q), (q,), (q, cols)
    return basis @ ub, s, vh


def energy_share_rank(s: torch.Tensor, total: float, threshold: float) -> int | None:
    """Smallest k with Σ_{i<k} σ_i² ≥ threshold·total, or None when s does not get there.

    `total` is ||m||_F², not Σσ² of `s`: s may be the top of a spectrum (a randomized SVD).
    """
    import torch

    cum = torch.cumsum(s.double() ** 2, dim=0)
    hit = torch.nonzero(cum >= threshold * total * (1 - _TOL))
    return int(hit[0]) + 1 if hit.numel() else None


def truncated_svd(
    m: torch.Tensor, rank: int | None, threshold: float | None, *, exact_max_dim: int = EXACT_MAX_DIM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, float]:
    """The top-k SVD of a float32 matrix, k from `rank` and/or the energy `threshold`.

    Returns:
        U_k (rows, k), S_k (k,), Vh_k (k, cols), "exact" or "randomized", and ||m||_F².
    """
    import torch

    d = min(m.shape)
    cap = d if rank is None else min(rank, d)
    total = float(torch.linalg.vector_norm(m, dtype=torch.float64)) ** 2
    method = "exact"
    u = s = vh = None
    if d > exact_max_dim:
        want = cap if threshold is None else min(cap, PROBE_RANK)
        while 2 * (want + _oversample(want)) <= d:  # beyond that a sketch costs as much as the exact SVD
            u, s, vh = randomized_svd(m, want + _oversample(want))
            if threshold is None or want >= cap or energy_share_rank(s[:want], total, threshold) is not None:
                u, s, vh, method = u[:, :want], s[:want], vh[:want], "randomized"
                break
            want = min(cap, 2 * want)
            u = s = vh = None
    if u is None or s is None or vh is None:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :cap], s[:cap], vh[:cap]
    k = s.shape[0] if threshold is None else (energy_share_rank(s, total, threshold) or s.shape[0])
    k = max(1, min(k, s.shape[0]))
    return u[:, :k], s[:k], vh[:k], method, total
