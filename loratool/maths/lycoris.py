"""LyCORIS modules (LoHa, LoKr, Tucker, full, norm): their exact dense ΔW, and their
exact (or truncated) LoRA factors, built from the SVDs of the small Kronecker or Hadamard factors,
never from a dense SVD of ΔW. No I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loratool.maths.svd import fro_retained, lowrank_svd

if TYPE_CHECKING:
    import torch

    from loratool.adapter import LycoModule


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
