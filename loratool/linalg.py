"""Pure tensor maths for LoRA factors: deltas, the exact low-rank SVD, rank rules. No I/O.

Notation: up (out, r), down (r, in); ΔW = scale · up @ down. Conv factors are flattened to
(out, r) and (r, in·kh·kw); an embedding's ΔW is (up @ down).T; fan_in_fan_out's ΔW is transposed.
Everything is computed in float32 or wider; callers cast back to the stored dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from loratool.adapter import DoraAxis, LoraModule, LycoModule

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


# ---------------------------------------------------------------------------------------------
# combine: exact weighted sums in factor form, and the dense merges of peft's merge_utils

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


F32_MAX = 3.4028234663852886e38


@contextlib.contextmanager
def single_threaded(active: bool = True) -> Iterator[None]:
    """Run torch's CPU ops in this thread on one intra-op thread, restoring the setting after.

    Adapter work is many operations on small tensors ((out+in)×r factors, r×r cores, row copies):
    too small for an OpenMP team to pay off, and on a busy machine a descheduled team member makes
    every operation wait at its barrier, 10-3000× slower (measured on 2 cores at load 4-12: combine's
    two r16 adapters 33 s instead of 2.3 s; one torch.cat 80 ms instead of 0.03 ms; the value
    checks before writing a full-size FLUX.1 LoRA 35 s instead of well under one). Dense
    decompositions and merge's big products keep every thread.
    """
    import torch

    before = torch.get_num_threads()
    if active and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def require_finite(name: str, where: str, **tensors: torch.Tensor) -> None:
    """Refuse NaN/Inf in a module's factors before maths that would fail on them or spread them.

    Raises:
        IncompatibleError: naming the module and the factor.
    """
    import torch

    from loratool.errors import IncompatibleError

    for role, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IncompatibleError(f"{where}: module '{name}': {role} holds NaN or Inf values",
                                    hint="check the adapter with: loratool validate ADAPTER")


def product_fro_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F without forming the product: sqrt(Σ (upᵀ·up) ⊙ (down·downᵀ)), in float64.

    Cost O((out + in)·r²). Accurate to about sqrt(float64 eps) relative to ||up||·||down||, which
    is plenty for reporting an error norm of stacked factors [a, -b] @ [c; d].
    """
    import torch

    u = up.to(torch.float64)
    d = down.to(torch.float64)
    return math.sqrt(max(0.0, float(((u.T @ u) * (d @ d.T)).sum())))


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


# ---------------------------------------------------------------------------------------------
# LyCORIS modules: exact deltas and exact (or truncated) LoRA factors, never a dense SVD of ΔW


def _lyco_parts(module: LycoModule, dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
    return {role: ref.load().to(device=device, dtype=dtype) for role, ref in module.tensors.items()}


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_ij core[i, j, ...]·a[i, p]·b[j, q] -> (p, q, ...) (LyCORIS rebuild_tucker; a (r, p), b (r, q))."""
    import torch

    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


def lokr_parts(module: LycoModule, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """LoKr's two Kronecker factors: W1 (a, c) and W2 as a matrix (b, d·k); ΔW = scale·kron(W1, W2).

    A conv's kron(W1[..., None, None], W2 (b, d, kh, kw)) flattened to (a·b, c·d·kh·kw) is exactly
    kron(W1, W2 flattened to (b, d·kh·kw)): the flattened column index j1·(d·kh·kw) + j2' is the
    Kronecker one.
    """
    import torch

    t = _lyco_parts(module, dtype or torch.float32, device)
    w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]  # (a, r) @ (r, c) -> (a, c)
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:
        w2 = _tucker(t["t2"], t["w2a"], t["w2b"])  # (b, d, *k)
    else:
        w2 = t["w2a"] @ t["w2b"]  # (b, r) @ (r, d·k) -> (b, d·k)
    return w1, w2.reshape(w2.shape[0], -1)


def loha_factors(module: LycoModule, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoHa's two products as low-rank factors: ΔW = scale·(u1 @ d1) ⊙ (u2 @ d2), ui (out, R), di (R, in·k).

    Plain LoHa: ui = hada_wi_a, di = hada_wi_b. Tucker LoHa: ui = hada_wi_aᵀ and
    di[r, (j, k)] = Σ_s hada_ti[r, s, k]·hada_wi_b[s, j] (the core folded into the input side).
    """
    import torch

    t = _lyco_parts(module, dtype or torch.float32, device)
    if "t1" in t:
        out = []
        for i in ("1", "2"):
            core, wa, wb = t["t" + i], t[f"w{i}a"], t[f"w{i}b"]  # (R, R, *k), (R, out), (R, in)
            d = torch.einsum("rs...,sj->rj...", core, wb)  # (R, in, *k)
            out += [wa.T, d.reshape(d.shape[0], -1)]
        return out[0], out[1], out[2], out[3]
    return t["w1a"], t["w1b"], t["w2a"], t["w2b"]


def lyco_delta(module: LycoModule, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
               ) -> torch.Tensor:
    """The dense ΔW of a LyCORIS module (scale included), in module.delta_shape, float32 by default.

    Formulas as LyCORIS computes them (lycoris/functional): LoHa (w1a@w1b)⊙(w2a@w2b)·s; LoKr
    kron(W1, W2)·s; LoCon Tucker Σ mid[m, n, k]·up[o, m]·down[n, i]·s; full/norm diffs as stored.
    A bias-only module has no weight delta (an empty tensor).
    """
    import torch

    dtype = dtype or torch.float32
    shape = module.delta_shape
    if module.algo == "loha":
        u1, d1, u2, d2 = loha_factors(module, dtype=dtype, device=device)
        return ((u1 @ d1) * (u2 @ d2) * module.scale).reshape(shape)  # (out, in·k) ⊙ (out, in·k)
    if module.algo == "lokr":
        w1, w2 = lokr_parts(module, dtype=dtype, device=device)
        return (torch.kron(w1, w2) * module.scale).reshape(shape)  # (a·b, c·d·k)
    t = _lyco_parts(module, dtype, device)
    if module.algo == "tucker":
        up = t["up"].reshape(t["up"].shape[0], -1)  # (out, r)
        down = t["down"].reshape(t["down"].shape[0], -1)  # (r, in)
        return _tucker(t["mid"], up.T, down) * module.scale  # (out, in, *k)
    if module.algo == "full":
        return t["diff"]
    if module.algo == "norm":
        return t["w_norm"]
    return torch.zeros(0, dtype=dtype, device=device)


@dataclass
class LoraForm:
    """A LyCORIS module rewritten as LoRA factors: ΔW ≈ up @ down (scale folded in).

    Attributes:
        up: (out, k); down: (k, in·kh·kw) (reshape to the conv layout as needed).
        exact_rank: the rank of the exact LoRA form (k when nothing was dropped).
        fro_retained: sqrt(Σ kept σ²) / ||ΔW||_F (1.0 when exact).
        rel_error: ||ΔW − up @ down||_F / ||ΔW||_F.
    """

    up: torch.Tensor
    down: torch.Tensor
    exact_rank: int
    fro_retained: float
    rel_error: float


def _from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, exact_rank: int) -> LoraForm:
    """Factors from an SVD (s descending, scale included) keeping the top k; σ split as √σ on both sides."""
    k = max(1, min(k, s.shape[0]))
    root = s[:k].clamp_min(0).sqrt()
    kept = fro_retained(s, k)
    return LoraForm((u[:, :k] * root).float(), (root[:, None] * vh[:k]).float(), exact_rank, kept,
                    math.sqrt(max(0.0, 1.0 - kept * kept)))


def lyco_to_lora(module: LycoModule, rank: int | None = None, *, device: str | torch.device = "cpu") -> LoraForm:
    """LoRA factors of a LyCORIS module's ΔW: exact, or the best rank-`rank` truncation.

    LoHa: (u1 d1) ⊙ (u2 d2) = U @ V with the row-wise Khatri–Rao products U[o, (a, b)] = u1[o, a]·u2[o, b]
    and V[(a, b), i] = d1[a, i]·d2[b, i], rank r1·r2, exact. LoCon Tucker: the core folds into down
    (rank r, exact). LoKr: the SVD of kron(W1, W2) is the Kronecker product of the factors' SVDs, so
    its singular values are the products σ1_i·σ2_j and the top ones are chosen without forming
    ΔW. Full 2-D diffs: a dense SVD of the module's own delta. The factors are computed in
    float64 and returned in float32.

    Args:
        rank: keep at most this many singular directions (the best truncation, error reported);
            None keeps the exact form (LoHa: r1·r2 unless a truncation is asked for).

    Raises:
        ValueError: a module without a LoRA form (norm, bias-only, 1-D diffs).
    """
    import torch

    f64 = torch.float64
    if module.algo == "tucker":
        t = _lyco_parts(module, f64, device)
        up = t["up"].reshape(t["up"].shape[0], -1) * module.scale  # (out, r)
        down = torch.einsum("mn...,ni->mi...", t["mid"], t["down"].reshape(t["down"].shape[0], -1))  # (r, in, *k)
        down = down.reshape(down.shape[0], -1)
        if rank is None or rank >= up.shape[1]:
            return LoraForm(up.float(), down.float(), up.shape[1], 1.0, 0.0)
        u, s, vh = lowrank_svd(up, down)
        return _from_svd(u, s, vh, rank, up.shape[1])
    if module.algo == "loha":
        u1, d1, u2, d2 = loha_factors(module, dtype=f64, device=device)
        up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1) * module.scale  # (out, R1·R2)
        down = (d1[:, None, :] * d2[None, :, :]).reshape(-1, d1.shape[1])  # (R1·R2, in·k)
        if rank is None:
            return LoraForm(up.float(), down.float(), up.shape[1], 1.0, 0.0)
        u, s, vh = lowrank_svd(up, down)
        return _from_svd(u, s, vh, rank, up.shape[1])
    if module.algo == "lokr":
        w1, w2 = lokr_parts(module, dtype=f64, device=device)
        u1, s1, vh1 = _small_svd(w1, module, "1")
        u2, s2, vh2 = _small_svd(w2, module, "2")
        prod = (s1[:, None] * s2[None, :]).reshape(-1) * abs(module.scale)  # σ of kron, unsorted
        order = torch.argsort(prod, descending=True)
        k = prod.shape[0] if rank is None else max(1, min(rank, prod.shape[0]))
        pick = order[:k]
        i, j = pick // s2.shape[0], pick % s2.shape[0]
        sign = 1.0 if module.scale >= 0 else -1.0
        u = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(-1, k) * sign  # (a·b, k)
        vh = (vh1[i][:, :, None] * vh2[j][:, None, :]).reshape(k, -1)  # (k, c·d·k)
        s_all = prod[order]
        kept = fro_retained(s_all, k)
        root = s_all[:k].sqrt()
        return LoraForm((u * root).float(), (root[:, None] * vh).float(), prod.shape[0], kept,
                        math.sqrt(max(0.0, 1.0 - kept * kept)))
    if module.algo == "full" and len(module.delta_shape) >= 2:
        d = _lyco_parts(module, f64, device)["diff"]
        mat = d.reshape(d.shape[0], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        full = s.shape[0]
        return _from_svd(u, s, vh, full if rank is None else rank, full)
    raise ValueError(f"{module.name}: a {module.algo} module has no LoRA form")


def _small_svd(w: torch.Tensor, module: LycoModule, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of one Kronecker factor (a small matrix), through its own low-rank factors when stored so."""
    import torch

    t = module.tensors
    a, b = f"w{which}a", f"w{which}b"
    if f"w{which}" not in t and a in t and b in t and not (which == "2" and "t2" in t):
        return lowrank_svd(t[a].load().to(torch.float64), t[b].load().to(torch.float64).reshape(t[b].shape[0], -1))
    return tuple(torch.linalg.svd(w, full_matrices=False))  # type: ignore[return-value]
# merge: W' = W + Σ w_i·ΔW_i per base tensor, in float32, in reused buffers


class Workspace:
    """Buffers reused from one tensor to the next, so the merge loop allocates nothing large.

    A fresh large allocation is a fresh mapping: every page faults and is zeroed again. For a 1B
    model that is over 8 GB of zeroed pages (the float32 copy of W, the delta, the cast result per
    tensor) and most of the system time; reusing buffers sized to the largest tensor removes it.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, Any, str], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: str) -> torch.Tensor:
        import torch

        numel = math.prod(shape)
        key = (name, dtype, str(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)
            del buf
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:numel].view(tuple(shape))


Term = tuple["LoraModule | LycoModule", float] | tuple["LoraModule | LycoModule", float, "tuple[int, int] | None"]


def merged_tensor(
    stored: torch.Tensor, terms: Sequence[Term], *, device: str, unmerge: bool,
    bias: bool = False,
    keep_delta: bool = False, work: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W, W', acc = Σ w_i ΔW_i or None), float32 on `device` (float64 for a float64 base, so the
    base's own digits survive), for one base tensor.

    W' = W + acc (W − acc with unmerge); with a DoRA term (a LoRA or LyCORIS module with a
    magnitude), W' = m ⊙ (W + acc) / ‖W + acc‖, the norm per output row or per input column
    (dora_normalise). `terms` are (module, weight) pairs, or (module,
    weight, rows): the delta then covers rows start:stop of W only (one part of a fused weight,
    families/layout.py), and only those rows are computed; with `bias` the deltas are the modules'
    lora_B biases (scale · bias).

    Plain LoRA takes the fast path: each delta is formed and added in place into a float32 copy of W
    (bit-identical to peft's `W + (B @ A) * scale`; no sum tensor is kept), in `work`'s buffers when
    given (W and W' then live there until the next call). DoRA, LoRA biases and keep_delta
    (statistics) hold acc explicitly.
    """
    import torch

    sign = -1.0 if unmerge else 1.0
    from loratool.adapter import LoraModule, LycoModule

    spans = [t[2] if len(t) > 2 else None for t in terms]  # type: ignore[misc]
    pairs = [(t[0], t[1]) for t in terms]
    dora = [m for m, _ in pairs if m.magnitude is not None and not bias]
    if dora and (len(pairs) > 1 or spans[0] is not None):  # keymap.plan_merge refuses these first
        raise ValueError(f"{dora[0].name}: a DoRA module must be the only delta of its whole base tensor")
    acc_dtype = torch.float64 if stored.dtype == torch.float64 else torch.float32
    if not (dora or bias or keep_delta):
        work = work if work is not None else Workspace()
        w = work.get("w", stored.shape, acc_dtype, device).copy_(stored)  # widened exactly
        new = work.get("new", stored.shape, acc_dtype, device).copy_(w)  # W kept: the realized delta needs it
        rows = new.view(new.shape[0], -1)  # conv (out, in, kh, kw) -> (out, in·kh·kw), as down flattens
        for (module, weight), span in zip(pairs, spans):
            target = rows if span is None else rows[span[0]:span[1]]  # a part's rows of a fused weight
            if isinstance(module, LycoModule):
                ld = lyco_delta(module, device=device, dtype=acc_dtype).reshape(target.shape)  # dense ΔW, scaled
                target.add_(ld if weight == 1.0 and not unmerge else ld * (sign * weight))
                continue
            up, down = factors(module, device=device, dtype=acc_dtype)  # (out, r), (r, in·k)
            d = torch.mm(up, down, out=work.get("d", (up.shape[0], down.shape[1]), acc_dtype, device))
            d.mul_(module.scale)  # (out, in·k), rounded exactly as peft's (B @ A) * s
            if weight != 1.0 or unmerge:
                d.mul_(sign * weight)
            transposed = module.kind == "embedding" or module.fan_in_fan_out  # W is (in, out)
            target.add_(d.T if transposed else d)
            del d
        return w, new, None
    w = stored.to(device=device, dtype=acc_dtype)
    acc: torch.Tensor | None = None
    for (module, weight), span in zip(pairs, spans):
        if bias:
            assert module.bias is not None
            d = module.bias.load().to(device=device, dtype=acc_dtype) * module.bias_scale
        elif isinstance(module, LycoModule):
            d = lyco_delta(module, device=device, dtype=acc_dtype)
        else:
            d = delta(module, device=device, dtype=acc_dtype)  # (scale · up @ down) in the base layout, as peft does
        if span is not None:  # a part's rows of a fused weight: zero elsewhere
            part = torch.zeros_like(w)
            part[span[0]:span[1]] = d.reshape(span[1] - span[0], *w.shape[1:])
            d = part
        d = d.reshape(w.shape)  # a 2-D delta onto a (out, in, 1, 1) conv weight
        if weight != 1.0:
            d = d * weight
        acc = d if acc is None else acc + d
    assert acc is not None
    new = w - acc if unmerge else w + acc
    if dora:
        m = dora[0]
        assert m.magnitude is not None
        fan_in_fan_out = isinstance(m, LoraModule) and m.fan_in_fan_out
        rows = new.T if fan_in_fan_out else new  # (out, in, ...)
        rows = dora_normalise(rows, m.magnitude.load().to(device=device, dtype=acc_dtype), m.dora_axis,
                              eps=dora_eps(m))
        new = rows.T if fan_in_fan_out else rows
    return w, new, acc


def dora_eps(module: LoraModule | LycoModule) -> float:
    """What the DoRA weight norm gets added before dividing, as the tools that write the module add it.

    LyCORIS LoHa / LoKr / LoCon (lycoris/functional/general.py `_weight_decompose`) and OneTrainer's
    LoKr add float32's eps (1.19e-7); PEFT (tuners/lora/dora.py), ComfyUI (weight_adapter/base.py
    `weight_decompose`) and OneTrainer's DoRA (norm_epsilon off by default) add nothing. A LoRA
    pair with a magnitude (PEFT, kohya `.dora_scale`) gets 0; a LyCORIS module gets eps. The two
    differ by eps / ‖row‖ relative, below float32 rounding for any norm above 1.
    """
    import torch

    from loratool.adapter import LycoModule

    return float(torch.finfo(torch.float32).eps) if isinstance(module, LycoModule) else 0.0


def dora_normalise(merged: torch.Tensor, magnitude: torch.Tensor, axis: DoraAxis, *, eps: float = 0.0
                   ) -> torch.Tensor:
    """DoRA: m ⊙ V / (‖V‖ + eps) for the merged weight V = W + ΔW in the base layout (out, in, *k), float32.

    axis "out": one magnitude per output row, the norm over (in, *k) (PEFT, LyCORIS wd_on_out=True);
    "in": one per input column, the norm over (out, *k) (LyCORIS wd_on_out=False, OneTrainer DoRA,
    ComfyUI): for a conv, each input channel's norm runs over every output channel and kernel tap,
    as LyCORIS computes it (transpose(0, 1) then flatten). `magnitude` holds out (resp. in) values
    in any shape ((out,), (out, 1, ..), (1, in, ..)). The norm is of V itself, not detached
    or cached: the merged weight, not a training step.
    """
    import torch

    v = merged if merged.dtype == torch.float64 else merged.to(torch.float32)  # float64 kept (a float64 base)
    mag = magnitude.to(device=v.device, dtype=v.dtype).reshape(-1)
    lead = 0 if axis == "out" else 1
    if lead == 0:
        norm = v.reshape(v.shape[0], -1).norm(p=2, dim=1)  # (out,): each row over (in, *k), as peft
    else:  # (in,): each column over (out, *k), without a transposed copy of the weight
        norm = torch.linalg.vector_norm(v, ord=2, dim=[d for d in range(v.dim()) if d != 1])
    if eps:
        norm = norm + eps
    shape = [1] * v.dim()
    shape[lead] = v.shape[lead]
    return v * (mag / norm).reshape(shape)


@dataclass
class BlockedMerge:
    """What merge_blocked measured while writing W' into the output (see realized_delta)."""

    dd_root: float  # ||ΔW||
    de_sum: float  # <R, ΔW>
    err_norm: float  # ||R − ΔW||
    worst: float  # max |R − ΔW|
    w_norm: float  # ||W||
    lo: float  # min and max of W' (float32): NaN/Inf and the output dtype's range are checked on them
    hi: float


BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32 per block buffer: the few buffers of a step stay in cache
BLOCK_WORKERS = 8  # more Python threads contend for the GIL between the small operations of a block

_BLOCK_POOL: Any = None  # (threads, ThreadPoolExecutor) of merge_blocked, made on first use
_BLOCK_LOCAL: Any = None


def _block_pool(threads: int) -> Any:
    """Worker threads for merge_blocked, each running torch single-threaded.

    Small elementwise operations split across torch's own (OpenMP) threads meet at a barrier
    each; on a loaded machine a descheduled partner makes every barrier wait a time slice (a 1 MiB
    copy took 15 ms instead of 50 µs). Whole row ranges per Python thread, torch single-threaded
    in each (OpenMP's thread count is per thread), need no barrier: the GIL is released inside
    every operation.
    """
    global _BLOCK_POOL, _BLOCK_LOCAL
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if _BLOCK_POOL is None or _BLOCK_POOL[0] != threads:
        import torch

        if _BLOCK_POOL is not None:
            _BLOCK_POOL[1].shutdown(wait=True)
        _BLOCK_LOCAL = threading.local()
        _BLOCK_POOL = (threads, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="loratool-block",
                                                   initializer=torch.set_num_threads, initargs=(1,)))
    return _BLOCK_POOL[1]


def _merge_rows(rows_in: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scales: tuple[float, ...],
                rows_out: torch.Tensor, start: int, stop: int, step: int, work: Workspace | None, w_norm: bool
                ) -> tuple[float, float, float, float, float, float, float]:
    """Rows start:stop of merge_blocked, block by block: (dd, de, ee, wn, worst, lo, hi). Each
    block's rows of B @ A are formed here, then multiplied by each of `scales` in turn (peft's
    `(B @ A) * scale`, then the weight).

    A 16-bit W enters each operation as it is stored: mixed-dtype operations compute in float32,
    and widening is exact, so `W + d` here is the float32 sum merged_tensor forms from a widened copy.
    """
    import torch

    if work is None:  # a block worker: its own buffers
        assert _BLOCK_LOCAL is not None
        work = getattr(_BLOCK_LOCAL, "work", None)
        if work is None:
            work = _BLOCK_LOCAL.work = Workspace()
    cols = rows_in.shape[1]
    wb = work.get("block_w", (step, cols), torch.float32, "cpu")
    nb = work.get("block_new", (step, cols), torch.float32, "cpu")
    eb = work.get("block_err", (step, cols), torch.float32, "cpu")
    dd = de = ee = wn = 0.0
    worst, lo, hi = 0.0, math.inf, -math.inf
    for s in range(start, stop, step):
        e = min(stop, s + step)
        k = e - s
        dw, new, err = wb[:k], nb[:k], eb[:k]
        w = rows_in[s:e]
        torch.mm(up[s:e], down, out=err)  # this block's rows of B @ A (err is free until below)
        for f in scales:  # ΔW = (B @ A) · scale
            err.mul_(f)
        torch.add(w, err, out=new)  # W' = W + ΔW in float32
        mn, mx = (float(v) for v in torch.aminmax(new))  # NaN when the block holds one
        if not (math.isfinite(mn) and math.isfinite(mx)):
            lo, hi = min(lo, mn) if math.isfinite(mn) else mn, max(hi, mx) if math.isfinite(mx) else mx
            break  # the caller refuses the tensor: nothing more to measure
        lo, hi = min(lo, mn), max(hi, mx)
        rows_out[s:e].copy_(new)  # the cast
        torch.sub(rows_out[s:e], new, out=err)  # R − ΔW: the storage's rounding of the sum
        if w_norm:
            dw.copy_(w)
            wn += float(torch.dot(dw.view(-1), dw.view(-1)))
        torch.sub(new, w, out=dw)  # ΔW = W' − W, as realized_delta forms it
        dv, ev = dw.view(-1), err.view(-1)
        dd += float(torch.dot(dv, dv))
        de += float(torch.dot(dv, ev))
        ee += float(torch.dot(ev, ev))
        emn, emx = torch.aminmax(ev)  # max |R − ΔW| (vector_norm(ord=inf) is 20× slower here)
        worst = max(worst, -float(emn), float(emx))
    return dd, de, ee, wn, worst, lo, hi


def merge_blocked(stored: torch.Tensor, module: LoraModule, factor: float, out: torch.Tensor, *,
                  work: Workspace, block: int = BLOCK_ELEMENTS, threads: int | None = None,
                  w_norm: bool = True) -> BlockedMerge:
    """W' = W + factor · ΔW of one plain LoRA into `out` (the stored output dtype), on the CPU, by
    row blocks that stay in cache.

    Each row block forms its rows of B @ A (a rank-r product, cheap, and it never leaves the cache;
    formed whole it was a float32 out×in matrix written to memory and read back, the largest cost of
    a merge after the start-up), then `· scale`, `· factor`, widen W, add, cast into `out`, and
    measure the realized delta (widen what was stored, ‖ΔW‖, ⟨R, ΔW⟩, ‖R − ΔW‖, max |R − ΔW|) and
    the range of W'. Every element of a product is the same r-term dot product whichever rows are
    formed together; a BLAS may still order its terms differently for a very short block (it did,
    here, for blocks of 1 and 3 rows), so W' can differ from merged_tensor's in the last bit of a
    float32 sum, never more. One pass over memory instead of about ten whole-tensor passes; row ranges go
    to `threads` workers (default: torch's thread count, at most BLOCK_WORKERS), each single-threaded
    (see _block_pool). ‖W‖ (w_norm) costs one more pass per block: only the statistics report uses it.
    """
    import torch

    up, down = factors(module)
    up, down = up.contiguous(), down.contiguous()
    scales = (module.scale,) if factor == 1.0 else (module.scale, factor)
    rows_in = stored.reshape(stored.shape[0], -1)
    rows_out = out.view(out.shape[0], -1)
    n, cols = rows_in.shape
    step = max(1, block // max(cols, 1))
    threads = threads or min(torch.get_num_threads(), BLOCK_WORKERS)
    blocks = -(-n // step)
    if threads <= 1 or blocks < 2:
        parts = [_merge_rows(rows_in, up, down, scales, rows_out, 0, n, step, work, w_norm)]
    else:
        pool = _block_pool(threads)
        per = -(-blocks // (threads * 4))  # a few ranges per worker, for balance
        ranges = [(b * step, min(n, (b + per) * step)) for b in range(0, blocks, per)]
        parts = [f.result() for f in [pool.submit(_merge_rows, rows_in, up, down, scales, rows_out, a, z, step,
                                                  None, w_norm) for a, z in ranges]]
    dd = sum(p[0] for p in parts)
    de = sum(p[1] for p in parts)
    ee = sum(p[2] for p in parts)
    wn = sum(p[3] for p in parts)
    worst = max(p[4] for p in parts)
    los, his = [p[5] for p in parts], [p[6] for p in parts]
    lo = next((v for v in los if not math.isfinite(v) and v != math.inf), min(los))
    hi = next((v for v in his if not math.isfinite(v) and v != -math.inf), max(his))
    return BlockedMerge(math.sqrt(dd), dd + de, math.sqrt(ee), worst, math.sqrt(wn), lo, hi)


# ---------------------------------------------------------------------------------------------
# quantized storage: exact dequantization to float32 and requantization with the same scheme
# (the descriptors that choose among these live in storage.py)

NF4_CODE: tuple[float, ...] = (  # the 16 NormalFloat4 levels of QLoRA (bitsandbytes' quant_map for nf4)
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_INV127 = 7.874015718698502e-3  # bitsandbytes' float32 1/127 for LLM.int8 dequantization


def fp8_max(dtype: str) -> float:
    import torch

    return float(torch.finfo(getattr(torch, dtype)).max)


def round_fp8(x: torch.Tensor, dtype: str, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (float32) saturated to ±max and rounded to float8 `dtype`.

    Nearest (ties to even, torch's conversion) without a generator; with one, stochastic: each value
    goes to the fp8 neighbour above with probability (x − lo) / (hi − lo), so E[result] = x exactly.
    """
    import torch

    fdtype = getattr(torch, dtype)
    top = fp8_max(dtype)
    x = x.clamp(-top, top)
    if generator is None:
        return x.to(fdtype)
    mag = x.abs()
    near = mag.to(fdtype)  # a neighbour of |x|, bits 0..max (sign 0)
    bits = near.view(torch.uint8).to(torch.int16)
    near_val = near.to(torch.float32)
    above = near_val < mag
    below = near_val > mag
    other = torch.where(above, bits + 1, torch.where(below, bits - 1, bits)).to(torch.uint8)
    other_val = other.view(fdtype).to(torch.float32)
    lo = torch.where(above, near_val, other_val)
    hi = torch.where(above, other_val, near_val)
    gap = hi - lo
    p = torch.where(gap > 0, (mag - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    pick_hi = u < p
    chosen = torch.where(pick_hi, torch.where(above, other, bits.to(torch.uint8)),
                         torch.where(above, bits.to(torch.uint8), other))
    sign = (x < 0).to(torch.uint8) << 7
    return (chosen | sign).view(fdtype)


def _tiled(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x (rows, cols) as (rows/b0, b0, cols/b1, b1) tiles: a view when the blocks divide it, else zero-padded."""
    import torch

    rows, cols = x.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    if nr * br != rows or nc * bc != cols:
        x = torch.nn.functional.pad(x, (0, nc * bc - cols, 0, nr * br - rows))
    return x.reshape(nr, br, nc, bc)


def block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 W = q · scale per (block[0] × block[1]) tile; edge tiles may be partial. q is (out, in)."""
    import torch

    rows, cols = q.shape
    tiles = _tiled(q.to(torch.float32), block)
    tiles.mul_(scale.to(torch.float32)[:, None, :, None])
    return tiles.reshape(tiles.shape[0] * tiles.shape[1], -1)[:rows, :cols]


def block_quantize_fp8(w: torch.Tensor, block: tuple[int, int], dtype: str, *, pow2: bool = False,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale_inv) per tile as transformers' fine-grained fp8 quantizer computes them: scale =
    max · (1 / amax) (two float32 roundings, as torch evaluates `max / amax`), scale_inv = 1 / scale,
    q = clamp(w · scale) rounded to fp8; an all-zero tile keeps scale 1.
    pow2 rounds scale_inv up to a power of two first (scale_fmt "ue8m0")."""
    import torch

    rows, cols = w.shape
    tiles = _tiled(w, block)  # padding zeros change no tile's amax
    amax = torch.maximum(tiles.amax(dim=(1, 3)), -tiles.amin(dim=(1, 3)))  # (nr, nc), without an |w| copy
    top = fp8_max(dtype)
    scale = torch.where(amax > 0, top * torch.reciprocal(torch.where(amax > 0, amax, torch.ones_like(amax))),
                        torch.ones_like(amax))
    inv = 1.0 / scale
    if pow2:
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scale = 1.0 / inv
    scaled = (tiles * scale[:, None, :, None]).reshape(tiles.shape[0] * tiles.shape[1], -1)[:rows, :cols]
    return round_fp8(scaled, dtype, generator=generator), inv.to(torch.float32)


def codebook_dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                        numel: int) -> torch.Tensor:
    """Flat float32 values code[codes[i]] · absmax[i // blocksize] for i < numel (bitsandbytes blockwise)."""
    import torch

    vals = code.to(torch.float32)[codes[:numel].to(torch.int64)]
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:numel]
    return vals * scale


def codebook_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 (numel,), absmax float32 (blocks,)) for flat x: per block absmax, then the nearest
    level of the sorted-or-not codebook to x / absmax (clamped to [-1, 1]); ties go to the lower level,
    as bitsandbytes' bucketize over the midpoints does."""
    import torch

    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = -(-n // blocksize)
    pad = torch.nn.functional.pad(flat, (0, blocks * blocksize - n))
    absmax = pad.abs().reshape(blocks, blocksize).amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (pad.reshape(blocks, blocksize) * inv[:, None]).clamp(-1, 1).reshape(-1)[:n]
    levels = code.to(torch.float32)
    order = torch.argsort(levels, stable=True)
    ordered = levels[order]
    bounds = (ordered[:-1] + ordered[1:]) / 2
    idx = torch.bucketize(scaled, bounds)
    return order[idx], absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (first of each pair in the high nibble, bitsandbytes' order) -> (ceil(n/2), 1) uint8."""
    import torch

    c = codes.to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> int64 codes, two per byte, high nibble first."""
    import torch

    b = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)


def int8_row_dequantize(q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 weights: W = q · SCB_row / 127 (bitsandbytes' vectorwise dequantization)."""
    import torch

    return q.to(torch.float32) * scb.to(torch.float32).reshape(-1, 1) * _INV127


def int8_row_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, SCB float32): SCB = row absmax, q = round(w · 127 / SCB) (half to even)."""
    import torch

    scb = w.abs().amax(dim=1).to(torch.float32)
    q = torch.round(w * (127.0 / scb.reshape(-1, 1))).nan_to_num(0.0).clamp(-127, 127).to(torch.int8)
    return q, scb


def nf4_roundtrip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """dequant(quant_nf4(w)) in float32, as a QLoRA adapter saw its frozen base (absmax per block, float32)."""
    import torch

    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    codes, absmax = codebook_quantize(w, code, blocksize)
    return codebook_dequantize(codes, absmax, code, blocksize, w.numel()).reshape(w.shape)


def realized_delta(w: torch.Tensor, new: torch.Tensor, written: torch.Tensor) -> tuple[float, float, float, float]:
    """How much of the intended change survived the storage: (||ΔW||, <R, ΔW>, ||R − ΔW||, max|R − ΔW|).

    ΔW = new − w (the float32 merge), R = written − w (what the stored result changes). retained =
    <R, ΔW> / ||ΔW||² and the relative error ||R − ΔW|| / ||ΔW|| follow. Overwrites w (with ΔW)
    and new (with R − ΔW = written − new): the callers pass their work buffers.
    """
    import torch

    torch.sub(new, w, out=w)  # ΔW
    torch.sub(written, new, out=new)  # R − ΔW, the storage's rounding of the sum
    dw, err = w.reshape(-1), new.reshape(-1)
    dd = float(torch.dot(dw, dw))
    de = float(torch.dot(dw, err))
    ee = float(torch.dot(err, err))
    worst = float(err.abs().max()) if err.numel() else 0.0
    return math.sqrt(dd), dd + de, math.sqrt(ee), worst


# ---------------------------------------------------------------------------------------------
# runtime layouts: one rank and one scale for every module (vLLM, SGLang, MLX, llama.cpp)


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


# ---------------------------------------------------------------------------------------------
# fused <-> split modules (model families): exact row splits and block-diagonal fusion


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


# ---------------------------------------------------------------------------------------------
# inner products of low-rank deltas (diff, verify): never a dense out×in product


def factor_inner(up1: torch.Tensor, down1: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor) -> float:
    """<up1 @ down1, up2 @ down2>_F exactly from the factors, in float64.

    <B₁A₁, B₂A₂> = tr(A₁ᵀB₁ᵀB₂A₂) = tr((B₁ᵀB₂)(A₂A₁ᵀ)) = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ): two small
    (r₁, r₂) Gram matrices, cost O((out + in)·r₁·r₂).

    Args:
        up1: (out, r1); down1: (r1, in); up2: (out, r2); down2: (r2, in). Any float dtype.
    """
    import torch

    u1, d1 = up1.to(torch.float64), down1.to(torch.float64)
    u2, d2 = up2.to(torch.float64), down2.to(torch.float64)
    return float(((u1.T @ u2) * (d1 @ d2.T)).sum())  # (r1, r2) ⊙ (r1, r2)


def dense_lowrank_inner(
    r: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, chunk_elems: int = 1 << 20
) -> float:
    """<r, up @ down>_F for a dense r (out, in) without forming up @ down, in float64.

    <R, BA> = tr(Rᵀ B A) = Σ B ⊙ (R Aᵀ): R is taken a block of rows at a time (each block widened
    to float64), so the extra memory is one block plus (out, r), whatever the matrix size.

    Args:
        r: (out, in), any float dtype; up: (out, k); down: (k, in).
    """
    import torch

    d64 = down.to(torch.float64)  # (k, in)
    u64 = up.to(torch.float64)  # (out, k)
    rows = max(1, chunk_elems // max(1, r.shape[1]))
    total = 0.0
    for i in range(0, r.shape[0], rows):
        block = r[i:i + rows].to(torch.float64)  # (rows, in)
        total += float((u64[i:i + rows] * (block @ d64.T)).sum())  # (rows, in) @ (in, k) -> (rows, k)
    return total


def sq_norm(t: torch.Tensor, *, chunk_elems: int = 1 << 22) -> float:
    """||t||_F² in float64, a chunk at a time (no full-size float64 copy)."""
    import torch

    flat = t.reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), chunk_elems):
        total += float(torch.linalg.vector_norm(flat[i:i + chunk_elems], dtype=torch.float64) ** 2)
    return total


def pair_products(up1: torch.Tensor, down1: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor, *,
                  scales: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float, float]:
    """(||B₁A₁||², ||B₂A₂||², <B₁A₁, B₂A₂>) from one Gram matrix per side: [B₁ B₂]ᵀ[B₁ B₂] and
    [A₁; A₂][A₁; A₂]ᵀ, each ((r₁+r₂), (r₁+r₂)); the three numbers are sums over its blocks.

    Computed in float32 first; when s₁B₁A₁ and s₂B₂A₂ (`scales`, applied only to decide) nearly
    cancel — their distance under 1% of their size, where float32 loses the digits — again in
    float64, so the distance of nearly equal deltas keeps ~1e-8 of their norm.
    """
    import torch

    r1 = up1.shape[1]
    s1, s2 = scales
    for dtype in (torch.float32, torch.float64):
        u = torch.cat([up1.to(dtype), up2.to(dtype)], dim=1)  # (out, r1 + r2)
        d = torch.cat([down1.to(dtype), down2.to(dtype)], dim=0)  # (r1 + r2, in)
        g = (u.T @ u) * (d @ d.T)  # (r1 + r2, r1 + r2)
        n1, n2, inner = float(g[:r1, :r1].sum()), float(g[r1:, r1:].sum()), float(g[:r1, r1:].sum())
        size = s1 * s1 * n1 + s2 * s2 * n2
        if dtype == torch.float64 or size - 2 * s1 * s2 * inner > 1e-2 * size:
            break
    return n1, n2, inner


def delta_distance(n1_sq: float, n2_sq: float, inner: float) -> tuple[float, float | None]:
    """(||Δ₁ − Δ₂||_F, cosine) from ||Δ₁||², ||Δ₂||² and <Δ₁, Δ₂> (cosine None for a zero delta).

    ||Δ₁ − Δ₂||² = ||Δ₁||² + ||Δ₂||² − 2<Δ₁, Δ₂>, clamped at 0: in float64 the distance of two
    nearly equal deltas is resolved to about 1e-8 of their norm.
    """
    dist = math.sqrt(max(0.0, n1_sq + n2_sq - 2.0 * inner))
    denom = math.sqrt(n1_sq) * math.sqrt(n2_sq)
    cosine = max(-1.0, min(1.0, inner / denom)) if denom > 0 else None
    return dist, cosine


def realized_projection(
    merged: torch.Tensor, base: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]], *,
    chunk_elems: int = 1 << 20, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
) -> tuple[float, float, list[float]]:
    """What a merge changed, measured against low-rank expected deltas, without dense products.

    With R = merged − base (the realized delta) and E_t = up_t @ down_t (the expected ones, weights
    and scales folded into up_t), returns ||merged||², ||R||² and [<R, E_t>] (= Σ up_t ⊙ (R down_tᵀ)).
    Rows are taken a block at a time and widened to float64, so R is exact and the extra memory is
    one block; the (r_t, r_s) Gram matrices <E_t, E_s> come from factor_inner.

    Args:
        merged, base: (out, in·k) views in the layout of up @ down (transpose embeddings and
            fan_in_fan_out weights before calling); any float dtype.
        terms: (up (out, r), down (r, in·k)) per expected delta.
        dtype: the working precision, float64 by default. float32 suffices for 16-bit tensors: the
            difference of two bf16 / fp16 values is exact in float32, and the products' rounding
            (~1e-6 relative) stays far below one rounding of a 16-bit dtype.
        device: where the blocks are computed (each block of rows is copied there).
    """
    import torch

    work = dtype or torch.float64
    downs_t = [d.to(device=device, dtype=work).T.contiguous() for _, d in terms]  # (in·k, r)
    ups = [u.to(device=device, dtype=work) for u, _ in terms]  # (out, r)
    cols = merged.shape[1]
    rows = max(1, min(merged.shape[0], chunk_elems // max(1, cols)))
    # blocks go through buffers allocated once: a fresh block per step costs page faults
    m_buf = torch.empty((rows, cols), dtype=work, device=device)
    r_buf = torch.empty((rows, cols), dtype=work, device=device)
    p_bufs = [torch.empty((rows, d.shape[1]), dtype=work, device=device) for d in downs_t]
    m_sq = r_sq = 0.0
    inner = [0.0] * len(terms)
    for i in range(0, merged.shape[0], rows):
        n = min(rows, merged.shape[0] - i)
        m, r = m_buf[:n], r_buf[:n]
        m.copy_(merged[i:i + n])  # (n, in·k)
        r.copy_(base[i:i + n])
        torch.sub(m, r, out=r)  # R: exact in float64; in float32 for 16-bit inputs
        # per-row dot products, summed in float64: accurate to ~1e-9 where one long float32 dot drifts
        m_sq += float(torch.linalg.vecdot(m, m, dim=1).sum(dtype=torch.float64))
        r_sq += float(torch.linalg.vecdot(r, r, dim=1).sum(dtype=torch.float64))
        for t, (u, dt) in enumerate(zip(ups, downs_t)):
            prod = torch.mm(r, dt, out=p_bufs[t][:n])  # (n, in·k) @ (in·k, r) -> (n, r)
            inner[t] += float(torch.linalg.vecdot(prod, u[i:i + n], dim=1).sum(dtype=torch.float64))
    return m_sq, r_sq, inner


@dataclass
class RequantNumbers:
    """verify on quantized storage: W (base), M (merged), X = W + ΔW (exact float32 merge), and the
    references Q(X) read back; every number a sum over all elements in float64."""

    m_sq: float  # ||M||²
    r_sq: float  # ||R||², R = M − W (the realized change)
    re: float  # <R, E>, E = X − W (the expected change)
    e_sq: float  # ||E||²
    res_sq: float  # ||M − X||²
    ref_sq: list[float]  # ||Q_j(X) − X||² per reference rounding
    ref_re: list[float]  # <Q_j(X) − W, E>: how much of E each reference keeps (× ||E||²)
    ref_noise: list[float]  # Σ E_i² (Q_j(X) − X)_i²: the variance <ε, E> would have, ε the rounding errors
    r_zero: bool  # M == W: nothing changed
    exact: bool  # M == the first reference: the same stored values as that requantization
    ref_zero: bool  # the first reference == W: the storage cannot hold E at all


def requant_numbers(w: torch.Tensor, m: torch.Tensor, x: torch.Tensor, refs: Sequence[torch.Tensor], *,
                    chunk_elems: int = 1 << 22) -> RequantNumbers:
    """The projection numbers of a quantized tensor's merge, a chunk of elements at a time.

    Args:
        w, m, x: (any shape, the same), float32 on one device; refs: read-backs of requantized x.
    """
    import torch

    flats = [t.reshape(-1) for t in (w, m, x, *refs)]
    n = flats[0].numel()
    k = len(refs)
    out = RequantNumbers(0.0, 0.0, 0.0, 0.0, 0.0, [0.0] * k, [0.0] * k, [0.0] * k, True, bool(refs), bool(refs))
    for i in range(0, n, chunk_elems):
        w64, m64, x64, *r64 = (f[i:i + chunk_elems].to(torch.float64) for f in flats)
        r, e = m64 - w64, x64 - w64  # (chunk,)
        out.m_sq += float(torch.dot(m64, m64))
        out.r_sq += float(torch.dot(r, r))
        out.re += float(torch.dot(r, e))
        out.e_sq += float(torch.dot(e, e))
        out.res_sq += float(torch.dot(m64 - x64, m64 - x64))
        for j, ref in enumerate(r64):
            err = ref - x64
            out.ref_sq[j] += float(torch.dot(err, err))
            out.ref_re[j] += float(torch.dot(ref - w64, e))
            out.ref_noise[j] += float(torch.dot(e * e, err * err))
        out.r_zero = out.r_zero and bool(torch.equal(m64, w64))
        if refs:
            out.exact = out.exact and bool(torch.equal(m64, r64[0]))
            out.ref_zero = out.ref_zero and bool(torch.equal(r64[0], w64))
    return out


def project(r_sq: float, inner: list[float], gram: list[list[float]]) -> tuple[list[float], float]:
    """Least-squares coefficients k of R on the span of the E_t, and ||R − Σ k_t E_t||_F.

    Solves G k = b with G_ts = <E_t, E_s>, b_t = <R, E_t> (minimum-norm when G is singular, e.g. two
    identical deltas); the residual is sqrt(||R||² − bᵀk), clamped at 0.
    """
    import numpy as np

    g = np.asarray(gram, dtype=np.float64)
    b = np.asarray(inner, dtype=np.float64)
    if not b.size or not np.any(g):
        return [0.0] * len(inner), math.sqrt(max(r_sq, 0.0))
    k = np.linalg.lstsq(g, b, rcond=1e-12)[0]
    return [float(x) for x in k], math.sqrt(max(0.0, r_sq - float(b @ k)))
