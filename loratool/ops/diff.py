"""diff: what differs between two adapters, module by module, computed exactly from the factors.

Per module held by both: rank, alpha, scale, dtype, kind and DoRA differences, and the distance
between the two deltas ΔA = s_A·B_A·A_A and ΔB = s_B·B_B·A_B:

    ||ΔA − ΔB||² = ||ΔA||² + ||ΔB||² − 2<ΔA, ΔB>,   <B₁A₁, B₂A₂> = tr((B₁ᵀB₂)(A₂A₁ᵀ))

(maths.compare.factor_inner: r×r Gram matrices, never a dense out×in matrix), reported relative to ||ΔA||,
with the cosine <ΔA, ΔB> / (||ΔA||·||ΔB||). Modules are sorted by distance, largest first.

Matching works across formats: names are compared as stored first, then by their kohya key stem
(formats.rename.stored_name), so a kohya file and its PEFT or diffusers conversion pair up.
DoRA magnitudes are compared separately (they are not part of B·A).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.ops import natural_key

SCHEMA = 1
Progress = Callable[[int, int], None]


@dataclass
class ModuleDiff:
    name: str  # the module's name in A (B's when only B names it with dots)
    name_b: str
    rank: tuple[int, int]
    alpha: tuple[float, float]
    scale: tuple[float, float]
    dtype: tuple[str, str]
    norm_a: float  # ||ΔA||_F
    norm_b: float  # ||ΔB||_F
    distance: float  # ||ΔA − ΔB||_F
    rel_distance: float | None  # distance / ||ΔA||_F (None when ΔA = 0 and ΔB ≠ 0)
    cosine: float | None  # None when either delta is zero
    differences: list[str] = field(default_factory=list)  # "rank", "alpha", "scale", "dtype", "kind", "dora", ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "name_b": self.name_b,
            "rank_ab": list(self.rank),  # (A, B) pairs: `_ab` keeps each key one JSON type across commands
            "alpha_ab": list(self.alpha),
            "scale_ab": list(self.scale),
            "dtype_ab": list(self.dtype),
            "norm_a": self.norm_a,
            "norm_b": self.norm_b,
            "distance": self.distance,
            "rel_distance": self.rel_distance,
            "cosine": self.cosine,
            "differences": self.differences,
        }


@dataclass
class DiffReport:
    a: Path
    b: Path
    format_a: str
    format_b: str
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    modules: list[ModuleDiff] = field(default_factory=list)
    extras_only_in_a: list[str] = field(default_factory=list)
    extras_only_in_b: list[str] = field(default_factory=list)
    extras_differ: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Same modules, every delta equal (distance 0), nothing else differing."""
        return not (self.only_in_a or self.only_in_b or self.extras_only_in_a or self.extras_only_in_b
                    or self.extras_differ) and all(m.distance == 0.0 for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        rel = [m.rel_distance for m in self.modules if m.rel_distance is not None]
        return {
            "schema": SCHEMA,
            "a": str(self.a),
            "b": str(self.b),
            "format_a": self.format_a,
            "format_b": self.format_b,
            "num_common": len(self.modules),
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "max_rel_distance": max(rel) if rel else None,
            "identical": self.identical,
            "modules": [m.to_dict() for m in self.modules],
            "extras_only_in_a": self.extras_only_in_a,
            "extras_only_in_b": self.extras_only_in_b,
            "extras_differ": self.extras_differ,
            "warnings": [],  # every command's document has a warnings list (docs/json.md)
        }


def pair_modules(a: Adapter, b: Adapter) -> tuple[list[tuple[LoraModule, LoraModule]], list[str], list[str]]:
    """Pairs (module of A, module of B) for the same layer, then the names only in A, only in B.

    Exact names first; the rest by kohya key stem, when that stem is unique on both sides.
    """
    from loratool.formats.rename import stored_name

    def kohya_name(m: LoraModule, _fmt: str) -> str:
        return stored_name("kohya", m.name)

    pairs: list[tuple[LoraModule, LoraModule]] = []
    rest_a = [m for n, m in a.modules.items() if n not in b.modules]
    rest_b = {n: m for n, m in b.modules.items() if n not in a.modules}
    for n, m in a.modules.items():
        if n in b.modules:
            pairs.append((m, b.modules[n]))
    stems_b: dict[str, list[LoraModule]] = {}
    for m in rest_b.values():
        stems_b.setdefault(kohya_name(m, b.source_format), []).append(m)
    stems_a: dict[str, int] = {}
    for m in rest_a:
        stem = kohya_name(m, a.source_format)
        stems_a[stem] = stems_a.get(stem, 0) + 1
    only_a: list[str] = []
    for m in rest_a:
        stem = kohya_name(m, a.source_format)
        hits = stems_b.get(stem, [])
        if len(hits) == 1 and stems_a[stem] == 1:
            pairs.append((m, hits[0]))
            rest_b.pop(hits[0].name)
        else:
            only_a.append(m.name)
    return pairs, only_a, list(rest_b)


def diff_module(ma: LoraModule, mb: LoraModule, *, device: str = "cpu") -> ModuleDiff:
    """Compare two modules adapting the same layer (factor maths only)."""
    import torch

    from loratool.maths.compare import delta_distance, factor_inner, pair_products
    from loratool.maths.delta import factors

    differences = []
    if ma.rank != mb.rank:
        differences.append("rank")
    if ma.alpha != mb.alpha:
        differences.append("alpha")
    if not math.isclose(ma.scale, mb.scale, rel_tol=1e-12, abs_tol=0.0):
        differences.append("scale")
    if ma.rslora != mb.rslora:
        differences.append("rslora")
    if ma.dtype != mb.dtype:
        differences.append("dtype")
    if ma.kind != mb.kind or ma.fan_in_fan_out != mb.fan_in_fan_out:
        differences.append("kind")
    if (ma.magnitude is None) != (mb.magnitude is None):
        differences.append("dora")
    elif ma.magnitude is not None and ma.dora_axis != mb.dora_axis:  # a square layer: same count, other axis
        differences.append("dora_axis")
    elif ma.magnitude is not None and mb.magnitude is not None and not _same_values(ma.magnitude, mb.magnitude):
        differences.append("magnitude")
    if (ma.bias is None) != (mb.bias is None) or (
            ma.bias is not None and mb.bias is not None and not _same_values(ma.bias, mb.bias)):
        differences.append("bias")
    if (ma.out_features, ma.in_features, ma.kernel) != (mb.out_features, mb.in_features, mb.kernel):
        differences.append("shape")
        return ModuleDiff(ma.name, mb.name, (ma.rank, mb.rank), (ma.alpha, mb.alpha), (ma.scale, mb.scale),
                          (ma.dtype, mb.dtype), math.nan, math.nan, math.nan, None, None, differences)
    ua, da = factors(ma, device=device)  # (out, r), (r, in·k), unscaled
    ub, db = factors(mb, device=device)
    sa, sb = ma.scale, mb.scale
    if sa == sb and ua.shape == ub.shape and da.shape == db.shape and torch.equal(ua, ub) and torch.equal(da, db):
        na2 = nb2 = inner = sa * sa * factor_inner(ua, da, ua, da)  # bit-identical deltas
        dist, cosine = 0.0, (1.0 if na2 > 0 else None)
    else:
        pa, pb, pab = pair_products(ua, da, ub, db, scales=(sa, sb))
        na2, nb2, inner = sa * sa * pa, sb * sb * pb, sa * sb * pab
        dist, cosine = delta_distance(na2, nb2, inner)
    norm_a, norm_b = math.sqrt(max(na2, 0.0)), math.sqrt(max(nb2, 0.0))
    rel = dist / norm_a if norm_a > 0 else (0.0 if dist == 0 else None)
    return ModuleDiff(ma.name, mb.name, (ma.rank, mb.rank), (ma.alpha, mb.alpha), (ma.scale, mb.scale),
                      (ma.dtype, mb.dtype), norm_a, norm_b, dist, rel, cosine, differences)


def _same_values(x: Any, y: Any) -> bool:
    import torch

    tx, ty = x.load(), y.load()
    return tuple(tx.shape) == tuple(ty.shape) and bool(torch.equal(tx.to(torch.float64), ty.to(torch.float64)))


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    device: str = "auto",
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> DiffReport:
    """Compare two adapters (any readable formats).

    Returns:
        DiffReport: names only in one, per common module the differences and the exact distance
        and cosine between the deltas, sorted by relative distance (largest first).

    Raises:
        FormatError: an input cannot be read.
    """
    from loratool.device import resolve_device
    from loratool.formats import read
    from loratool.maths.guards import single_threaded

    device = resolve_device(device)

    ad = read(Path(a), allow_pickle=allow_pickle)
    bd = read(Path(b), allow_pickle=allow_pickle)
    pairs, only_a, only_b = pair_modules(ad, bd)
    report = DiffReport(Path(a), Path(b), ad.source_format, bd.source_format, only_a, only_b)
    with single_threaded(str(device) == "cpu"):  # r×r products: one thread is fastest
        for n, (ma, mb) in enumerate(pairs):
            report.modules.append(diff_module(ma, mb, device=device))
            if progress:
                progress(n + 1, len(pairs))
    report.modules.sort(key=_order)
    report.extras_only_in_a = [k for k in ad.extras if k not in bd.extras]
    report.extras_only_in_b = [k for k in bd.extras if k not in ad.extras]
    report.extras_differ = [k for k in ad.extras if k in bd.extras and not _same_values(ad.extras[k], bd.extras[k])]
    return report


def _order(m: ModuleDiff) -> tuple[int, float, tuple[tuple[int, int | str], ...]]:
    if m.rel_distance is None or math.isnan(m.distance):
        return (0, 0.0, natural_key(m.name))  # shape mismatches and "from zero" first
    return (1, -m.rel_distance, natural_key(m.name))  # the largest distance first; names in natural order
