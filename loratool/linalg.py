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


def merged_tensor(
    stored: torch.Tensor, terms: list[tuple[LoraModule, float]], *, device: str, unmerge: bool, bias: bool = False,
    keep_delta: bool = False, work: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W, W', acc = Σ w_i ΔW_i or None), float32 on `device`, for one base tensor.

    W' = W + acc (W − acc with unmerge); with a DoRA term, W' = m / ||W + acc||_row · (W + acc),
    the norm per output row (PEFT's convention). `terms` are (module, weight) pairs; with `bias`
    the deltas are the modules' lora_B biases (scale · bias).

    Plain LoRA takes the fast path: each delta is formed and added in place into a float32 copy of W
    (bit-identical to peft's `W + (B @ A) * scale`; no sum tensor is kept), in `work`'s buffers when
    given (the result then lives there until the next call). DoRA, LoRA biases and keep_delta
    (statistics) hold acc explicitly.
    """
    import torch

    sign = -1.0 if unmerge else 1.0
    dora = [m for m, _ in terms if m.magnitude is not None and not bias]
    if not (dora or bias or keep_delta):
        work = work if work is not None else Workspace()
        w = work.get("w", stored.shape, torch.float32, device).copy_(stored)  # widened exactly
        rows = w.view(w.shape[0], -1)  # conv (out, in, kh, kw) -> (out, in·kh·kw), as down flattens
        for module, weight in terms:
            up, down = factors(module, device=device)  # (out, r), (r, in·k)
            d = torch.mm(up, down, out=work.get("d", (up.shape[0], down.shape[1]), torch.float32, device))
            d.mul_(module.scale)  # (out, in·k), rounded exactly as peft's (B @ A) * s
            if weight != 1.0 or unmerge:
                d.mul_(sign * weight)
            transposed = module.kind == "embedding" or module.fan_in_fan_out  # W is (in, out)
            rows.add_(d.T if transposed else d)
            del d
        return w, w, None
    w = stored.to(device=device, dtype=torch.float32)
    acc: torch.Tensor | None = None
    for module, weight in terms:
        if bias:
            assert module.bias is not None
            d = module.bias.load().to(device=device, dtype=torch.float32) * module.scale
        else:
            d = delta(module, device=device)  # (scale · up @ down) in the base layout, as peft computes it
        d = d.reshape(w.shape)  # a 2-D delta onto a (out, in, 1, 1) conv weight
        if weight != 1.0:
            d = d * weight
        acc = d if acc is None else acc + d
    assert acc is not None
    new = w - acc if unmerge else w + acc
    if dora:
        m = dora[0]
        assert m.magnitude is not None
        rows = new.T if m.fan_in_fan_out else new  # (out, ...)
        norm = rows.reshape(rows.shape[0], -1).norm(p=2, dim=1)  # per output row, as peft
        factor = m.magnitude.load().to(device=device, dtype=torch.float32).reshape(-1) / norm
        rows = rows * factor.reshape(-1, *([1] * (rows.dim() - 1)))
        new = rows.T if m.fan_in_fan_out else rows
    return w, new, acc


def merge_change(w: torch.Tensor, new: torch.Tensor, acc: torch.Tensor, out: torch.Tensor, *, dora: bool
                 ) -> tuple[float, float, float]:
    """(||acc||_F, ||W' − W||_F / ||W||_F, max |W' − cast(W')|) for one merged tensor.

    Without DoRA W' − W = ±acc, so its norm is acc's; `out` is W' as written (the cast result).
    """
    import torch

    acc_norm = float(acc.norm())
    change = float((new - w).norm()) if dora else acc_norm
    out32 = out.to(device=new.device, dtype=torch.float32)  # out lives on the CPU, new on the merge's device
    cast = float((out32 - new).abs().max()) if out.numel() else 0.0
    return acc_norm, change / max(float(w.norm()), 1e-30), cast


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
    w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float, magnitude: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` plain LoRA for a DoRA module on base weight `w` (an approximation).

    DoRA's merged weight is W' = diag(g)·(W + s·up@down) with g = m / ||W + s·up@down||_row (per
    output row, peft's convention), so W' − W = diag(g)·s·up@down + diag(g − 1)·W: the second term is
    full rank unless g = 1. Its best rank-k factors come from the SVD of the dense difference.

    Args:
        w: the base weight as (out, in·k), float32. up (out, r), down (r, in·k); magnitude (out,).

    Returns:
        up (out, k), down (k, in·k) with scale 1, and the relative Frobenius error
        ||(W' − W) − up@down|| / ||W' − W|| (0 when the difference is zero).
    """
    import torch

    merged = w + scale * (up.to(torch.float32) @ down.to(torch.float32))  # (out, r) @ (r, in) -> (out, in)
    g = magnitude.to(torch.float32).reshape(-1) / merged.norm(p=2, dim=1)
    diff = merged * g[:, None] - w
    new_up, new_down, s = truncate_dense(diff, rank)
    total = float((s.double() ** 2).sum())
    kept = float((s[: new_up.shape[1]].double() ** 2).sum())
    err = math.sqrt(max(0.0, total - kept) / total) if total > 0 else 0.0
    return new_up, new_down, err
