"""Inner products and norms of low-rank deltas for diff and verify, never a dense out×in product:
<B₁A₁, B₂A₂> from r×r Gram matrices, ||up @ down|| without the product, a dense matrix against a
low-rank delta in row blocks, the projection of a realized change R onto the deltas E_t (least
squares on their Gram matrix), and the same numbers for a merge into quantized storage. No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



def product_fro_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F without forming the product: sqrt(Σ (upᵀ·up) ⊙ (down·downᵀ)), in float64.

    Cost O((out + in)·r²). Accurate to about sqrt(float64 eps) relative to ||up||·||down||, which
    is plenty for reporting an error norm of stacked factors [a, -b] @ [c; d].
    """
    import torch

    u = up.to(torch.float64)
    d = down.to(torch.float64)
    return math.sqrt(max(0.0, float(((u.T @ u) * (d @ d.T)).sum())))


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
