"""inspect: what an adapter holds, from its header alone (bytes only with spectrum=True)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import IncompatibleError
from loratool.formats import Findings, comfyui_names, read

SCHEMA = 1
Progress = Callable[[int, int], None]


@dataclass
class ModuleSpectrum:
    singular_values: list[float]  # of the effective ΔW (scale included), descending
    rank_90: int  # smallest k keeping 90% of the Frobenius energy Σσ²
    rank_99: int


@dataclass
class InspectReport:
    """Everything `loratool inspect` shows; to_dict() is the --json document."""

    adapter: Adapter
    path: Path
    file_size: int
    spectra: dict[str, ModuleSpectrum] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # reader warnings, e.g. alpha implied

    @property
    def modules(self) -> list[LoraModule]:
        return list(self.adapter.modules.values())

    def summary(self) -> dict[str, Any]:
        mods = self.modules
        ranks = [m.rank for m in mods]
        alpha_sources = Counter(m.alpha_source for m in mods)
        return {
            "ranks": {
                "min": min(ranks) if ranks else None,
                "max": max(ranks) if ranks else None,
                "most_common": Counter(ranks).most_common(1)[0][0] if ranks else None,
            },
            "alphas": _counts(_num(m.alpha) for m in mods),
            "alpha_sources": dict(alpha_sources.most_common()),
            "scales": _counts(round(m.scale, 6) for m in mods),
            "targets": dict(Counter(m.short_name for m in mods).most_common()),
            "kinds": dict(Counter(m.kind for m in mods).most_common()),
            "dora_axes": dict(Counter(m.dora_axis for m in mods if m.magnitude is not None).most_common()),
            "dtypes": dict(Counter(t.dtype for m in mods for t in (m.down, m.up)).most_common()),
            "experts": _experts(mods),
        }

    def to_dict(self) -> dict[str, Any]:
        from loratool.variants import detect

        a = self.adapter
        modules = []
        for m in self.modules:
            row: dict[str, Any] = {
                "name": m.name,
                "kind": m.kind,
                "out_features": m.out_features,
                "in_features": m.in_features,
                "rank": m.rank,
                "alpha": _num(m.alpha),
                "alpha_source": m.alpha_source,
                "scale": m.scale,
                "rslora": m.rslora,
                "dora": m.magnitude is not None,
                "dora_axis": m.dora_axis if m.magnitude is not None else None,
                "fan_in_fan_out": m.fan_in_fan_out,
                "dtype": m.dtype,
                "down_shape": list(m.down.shape),
                "up_shape": list(m.up.shape),
                "expert": None if m.expert is None else {
                    "param": m.expert.param, "index": m.expert.index, "count": m.expert.count},
            }
            if m.name in self.spectra:
                sp = self.spectra[m.name]
                row.update(singular_values=sp.singular_values, rank_90=sp.rank_90, rank_99=sp.rank_99)
            modules.append(row)
        lyco = [
            {
                "name": m.name,
                "algo": m.algo,
                "kind": m.kind,
                "out_features": m.out_features,
                "in_features": m.in_features,
                "rank": m.rank,
                "alpha": None if m.alpha is None else _num(m.alpha),
                "alpha_source": m.alpha_source,
                "scale": m.scale,
                "bias": m.bias is not None,
                "dora": m.magnitude is not None,
                "dora_axis": m.dora_axis if m.magnitude is not None else None,
                "dtype": m.dtype,
                "tensors": {role: list(ref.shape) for role, ref in m.refs()},
            }
            for m in a.lycoris.values()
        ]
        summary = self.summary()
        return {
            "schema": SCHEMA,
            "format": a.source_format,
            "dialect": "comfyui" if comfyui_names(a) and a.source_format != "comfyui" else None,
            "path": str(self.path),
            "base_model": a.base_model,
            "num_modules": len(a.modules),
            "lora_params": a.lora_params,
            "file_size": self.file_size,
            "fan_in_fan_out": a.fan_in_fan_out,
            "rslora": a.rslora,
            "dora": a.dora,
            **summary,
            "dora_axes": dict((Counter(summary["dora_axes"]) + Counter(
                m.dora_axis for m in a.lycoris.values() if m.magnitude is not None)).most_common()),
            "metadata": dict(a.metadata),
            "config": a.config or None,
            "extras": [{"name": k, "shape": list(t.shape), "dtype": t.dtype} for k, t in a.extras.items()],
            "unsupported": list(a.unsupported),
            "variants": [{"name": v.name, "setting": v.setting, "convertible": v.convertible} for v in detect(a)],
            "family": _family(a),
            "num_lycoris": len(lyco),
            "lycoris_kinds": dict(Counter(m.algo for m in a.lycoris.values()).most_common()),
            "lycoris_params": sum(m.params for m in a.lycoris.values()),
            "lycoris_modules": lyco,
            "warnings": self.warnings,
            "modules": modules,
        }


def _experts(mods: list[LoraModule]) -> list[dict[str, Any]]:
    """Experts of fused parameters (docs/moe.md) by parameter name: how many parameters (one per
    layer), experts per parameter, and the ranks of the experts."""
    groups: dict[str, list[LoraModule]] = {}
    for m in mods:
        if m.expert is not None:
            groups.setdefault(m.short_name, []).append(m)
    return [{
        "parameter": name,
        "parameters": len({m.expert.param for m in group if m.expert}),
        "experts": sorted({m.expert.count for m in group if m.expert}),
        "ranks": dict(sorted(Counter(m.rank for m in group).items())),
    } for name, group in groups.items()]


def _family(a: Adapter) -> dict[str, Any]:
    """The family detection, judged (as convert judges it) without the text-encoder modules an
    image LoRA may carry beside its transformer's; their count is `text_encoder_modules`."""
    from loratool.families import detect, get, same_conversion
    from loratool.ops.convert import FAMILY_TARGETS, text_encoder_modules

    te = text_encoder_modules(a)
    names = [*a.modules, *a.lycoris]
    det = detect(names, a.metadata)
    if te and det.matched and set(det.unmatched) <= te:
        names = [n for n in names if n not in te]
        det = detect(names, a.metadata)
    else:
        te = set()
    needs = False
    if det.ambiguous:  # convert proceeds without --family only where every tied table writes the same names
        fits = [(get(f), d) for f, d, n in det.candidates if n == det.matched and f in det.tied]
        fits = [fd for k, fd in enumerate(fits) if fd[0].name not in {f.name for f, _ in fits[:k]}]
        needs = not all(same_conversion(names, fits, t) for t in FAMILY_TARGETS)
    return {**det.to_dict(), "text_encoder_modules": len(te), "convert_needs_family": needs}


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _counts(values: Any) -> dict[str, int]:
    return {str(k): v for k, v in Counter(values).most_common()}


def inspect_adapter(
    path: str | os.PathLike[str],
    *,
    spectrum: bool = False,
    allow_pickle: bool = False,
    device: str = "cpu",
    progress: Progress | None = None,
) -> InspectReport:
    """Describe an adapter. Header-only (no torch import) unless spectrum=True.

    Args:
        spectrum: also compute each module's exact singular values by the low-rank route.
        device: where the spectrum is computed.
        progress: called with (done, total) modules while computing spectra.

    Raises:
        FormatError, IncompatibleError: the adapter cannot be read.
    """
    from loratool.hub import resolve_path

    p = resolve_path(path)
    findings = Findings()  # strict: errors raise; warnings (implied alpha, missing config) are kept
    adapter = read(p, allow_pickle=allow_pickle, findings=findings)
    size = sum(f.stat().st_size for f in adapter.files if f.exists())
    report = InspectReport(adapter, p, size, warnings=[f.message for f in findings.items])
    if spectrum:
        from loratool.device import resolve_device
        from loratool.maths.svd import energy_rank

        device = resolve_device(device)
        mods = report.modules
        for i, m in enumerate(mods):
            s = _spectrum(m, p, device)
            report.spectra[m.name] = ModuleSpectrum(s, energy_rank(s, 0.9), energy_rank(s, 0.99))
            if progress:
                progress(i + 1, len(mods))
    return report


def _spectrum(m: LoraModule, path: Path, device: str) -> list[float]:
    """The module's singular values; NaN/Inf factors are the user's file, not a bug: a clean error."""
    import torch

    from loratool.maths.svd import singular_values

    try:
        s = singular_values(m, device=device)
    except torch.linalg.LinAlgError:
        s = None
    if s is None or not bool(torch.isfinite(s).all()):
        # .float(): torch.isfinite has no float8 kernel
        bad = next((ref for ref in (m.down, m.up) if not bool(torch.isfinite(ref.load().float()).all())), m.down)
        raise IncompatibleError(
            f"{bad.source}: module '{m.name}' has NaN or Inf values; its spectrum is undefined",
            hint=f"loratool validate {path}",
        )
    return [float(x) for x in s.cpu().tolist()]
