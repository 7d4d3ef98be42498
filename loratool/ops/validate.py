"""validate: structural and numerical checks of an adapter, optionally against a base checkpoint."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter
from loratool.errors import FormatError
from loratool.formats import Finding, Findings, read, unsupported_family

if TYPE_CHECKING:
    import torch

SCHEMA = 1
Progress = Callable[[int, int], None]


@dataclass
class ValidationReport:
    path: Path
    format: str | None
    num_modules: int
    findings: list[Finding]
    strict: bool = False
    base: Path | None = None
    matched: dict[str, str] = field(default_factory=dict)
    base_storage: dict[str, Any] | None = None  # storage.BaseStorage.summary() of the base
    runtime: str | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors and not (self.strict and self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "path": str(self.path),
            "format": self.format,
            "num_modules": self.num_modules,
            "base": str(self.base) if self.base else None,
            "matched": len(self.matched) if self.base else None,
            "base_storage": self.base_storage,
            "num_errors": len(self.errors),
            "num_warnings": len(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
            **({"runtime": self.runtime} if self.runtime else {}),
        }


def validate_adapter(
    path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    strict: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    for_runtime: str | None = None,
) -> ValidationReport:
    """Check an adapter: structure, config consistency, values (NaN/Inf, zero up), and base fit.

    With `for_runtime` (a loratool.runtimes name), also what that runtime rejects, ignores or
    mis-scales, per module, each message ending in the fix.

    Returns a report whose findings carry stable codes; ok is False when any error (or, with
    strict, any warning) was found.

    Raises:
        FormatError: the adapter (or base) cannot be read at all (corrupt header, not a LoRA file).
    """
    from loratool.hub import resolve_path

    p = resolve_path(path)
    base = resolve_path(base) if base is not None else None
    runtime = None
    if for_runtime is not None:
        from loratool.ops.runtime import get_runtime

        runtime = get_runtime(for_runtime)
    findings = Findings(strict=False)
    adapter = read(p, allow_pickle=allow_pickle, findings=findings)
    # modules the reader had to drop (broken pairs, shape or config mismatches) still count
    broken = {f.module for f in findings.items if f.severity == "error" and f.module} - set(adapter.modules)
    broken -= set(adapter.extras)
    broken -= set(adapter.lycoris)
    report = ValidationReport(p, adapter.source_format, len(adapter.modules) + len(adapter.lycoris) + len(broken),
                              findings.items, strict)
    _check_unsupported(adapter, findings)
    _check_variants(adapter, findings)
    _check_dtypes(adapter, findings)
    from loratool.maths.guards import single_threaded

    with single_threaded():  # many small tensors (see single_threaded)
        _check_values(adapter, findings, progress)
    if base is not None:
        report.base = Path(base)
        report.matched, report.base_storage = _check_base(adapter, Path(base), findings)
    if runtime is not None:
        from loratool.ops.runtime import runtime_findings
        from loratool.runtimes import RUNTIMES

        report.runtime = runtime.name if runtime.version == RUNTIMES[runtime.name].version else runtime.label
        runtime_findings(adapter, runtime, findings)
    return report


def _check_variants(adapter: Adapter, findings: Findings) -> None:
    """PiSSA / OLoRA / CorDA / LoftQ saved without conversion, aLoRA: named, with what a merge would mean."""
    from loratool.variants import detect

    for v in detect(adapter):
        findings.warning("lora-variant", None,
                         f"{adapter.path}: a {v.name} adapter ({v.setting}): {v.meaning('merge')}; merge, combine, "
                         f"resize and convert refuse it unless --allow-variant; {v.hint(adapter.path, 'merge')}")


def _check_unsupported(adapter: Adapter, findings: Findings) -> None:
    if adapter.unsupported and not adapter.modules and not adapter.lycoris and not findings.items:
        key = adapter.unsupported[0]
        findings.error("no-lora-tensors", None,
                       f"{adapter.path}: holds only unsupported tensors ({unsupported_family(key)}, e.g. '{key}'); "
                       "loratool operations will refuse it")
    per_column = [n for n, m in adapter.modules.items() if m.magnitude is not None and m.dora_axis == "in"]
    per_column += [n for n, lm in adapter.lycoris.items() if lm.magnitude is not None and lm.dora_axis == "in"]
    if per_column:
        findings.warning("dora-per-input-column", per_column[0] if len(per_column) == 1 else None,
                         f"{adapter.path}: {len(per_column)} DoRA module(s) with one magnitude per input column "
                         f"(LyCORIS wd_on_out=False / OneTrainer), e.g. '{per_column[0]}': merge applies them "
                         "with the norm per input column; only kohya-style files (.dora_scale (1, in)) hold them, "
                         "so convert to peft / diffusers / mlx (one magnitude per output row) refuses them")
    families = Counter(unsupported_family(k) for k in adapter.unsupported)
    for family, n in families.items():
        example = next(k for k in adapter.unsupported if unsupported_family(k) == family)
        findings.warning("unsupported-tensor", None,
                         f"{adapter.path}: {n} {family} tensor(s), e.g. '{example}'; operations will refuse them")


def _check_dtypes(adapter: Adapter, findings: Findings) -> None:
    dtypes = Counter(t.dtype for m in adapter.modules.values() for t in (m.down, m.up))
    if len(dtypes) > 1:
        shown = ", ".join(f"{d} ({n})" for d, n in dtypes.most_common())
        findings.warning("mixed-dtypes", None, f"{adapter.path}: factor tensors mix dtypes: {shown}")


def _check_values(adapter: Adapter, findings: Findings, progress: Progress | None) -> None:
    import torch

    mods = list(adapter.modules.values())
    for i, m in enumerate(mods):
        for role, ref in (("down", m.down), ("up", m.up), ("magnitude", m.magnitude), ("bias", m.bias)):
            if ref is None:
                continue
            t = _finite_or_finding(ref, m.name, role, findings)
            if t is not None and role == "up" and not bool(t.any()):
                findings.warning("zero-up", m.name,
                                 f"{ref.source}: up of module '{m.name}' is all zeros; the delta is zero")
        if progress:
            progress(i + 1, len(mods))
    for lm in adapter.lycoris.values():
        for role, ref in lm.refs():
            _finite_or_finding(ref, lm.name, role, findings)
    for key, ref in adapter.extras.items():
        try:
            t = _checkable(ref.load())
        except FormatError as e:  # a tensor made from others (a folded modules_to_save LoRA) found them inconsistent
            findings.error("inconsistent-copies", key, str(e))
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            findings.error("non-finite", key, f"{ref.source}: extra tensor '{key}' has NaN or Inf values")


def _finite_or_finding(ref: Any, name: str, role: str, findings: Findings) -> torch.Tensor | None:
    """The tensor behind ref, or None after a non-finite finding naming its NaN and Inf counts."""
    import torch

    t = _checkable(ref.load())
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        findings.error("non-finite", name,
                       f"{ref.source}: {role} of module '{name}' has {nan} NaN and {inf} Inf values")
        return None
    return t


def _checkable(t: torch.Tensor) -> torch.Tensor:
    """float8 tensors widened to float32 (torch has no isfinite for float8_e4m3fn); others as they are."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def _check_base(adapter: Adapter, base: Path, findings: Findings) -> tuple[dict[str, str], dict[str, Any]]:
    from loratool.formats import extra_base_key
    from loratool.io.checkpoint import open_checkpoint
    from loratool.keymap import KeyIndex, match_to_base, moe_transposed, reshaped
    from loratool.storage import detect

    ckpt = open_checkpoint(base)
    storage = detect(ckpt)
    tensors = storage.logical(ckpt.tensors, renamed=True)  # quantized weights as merge sees them, scales left out
    for s in storage.unsupported[:1]:
        more = f" ({len(storage.unsupported)} tensors)" if len(storage.unsupported) > 1 else ""
        findings.error("unsupported-base-storage", None,
                       f"{base}: '{s.key}' is stored as {s.scheme}{more}; merge cannot dequantize it",
                       hint="merge into the unquantized (16-bit) base, then quantize the merged model")
    # the same matching as merge: an image LoRA in the other layout of its family maps through its relations
    match, _, crossed = match_to_base([*adapter.modules.values(), *adapter.lycoris.values()], tensors,
                                      where=adapter.path, transposed=moe_transposed(ckpt.root))
    if crossed is not None and crossed.refused is not None:
        findings.error("unmatched-module", None, str(crossed.refused), hint=crossed.refused.hint)
    for name in match.unmatched:
        findings.error("unmatched-module", name,
                       f"{adapter.path}: module '{name}' matches no weight in {base}")
    for name, keys in match.ambiguous.items():
        findings.error("ambiguous-module", name,
                       f"{adapter.path}: module '{name}' matches {len(keys)} base weights: {', '.join(keys[:4])}")
    for name, key, want, got in match.shape_mismatch:
        new = reshaped(adapter, name, tuple(got))
        if new is not None and all(n >= h for n, h in zip(new, got)):
            continue  # a control LoRA's wider img_in: merge zero-pads the base weight to `new`
        findings.error("base-shape-mismatch", name,
                       f"{adapter.path}: module '{name}' needs a base weight of shape {want} "
                       f"but {base}: '{key}' is {got}")
    index = KeyIndex(list(tensors))
    for stored, ref in adapter.extras.items():
        key = extra_base_key(stored)
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        hits = [key] if key in tensors else [
            k for k in index.candidates(stem) if key.endswith(".weight")
        ]
        if len(hits) != 1:
            findings.error("unmatched-module", key, f"{adapter.path}: saved module tensor '{key}' matches "
                           f"{'no' if not hits else len(hits)} tensor(s) in {base}")
        elif tuple(tensors[hits[0]].shape) != tuple(ref.shape):
            findings.error("base-shape-mismatch", key,
                           f"{adapter.path}: saved module tensor '{key}' is {ref.shape} but {base}: "
                           f"'{hits[0]}' is {tensors[hits[0]].shape}")
    if (adapter.modules or adapter.lycoris) and not match.matched:
        findings.items.append(Finding("error", "no-match", None,
                                      f"{adapter.path}: none of its {len(adapter.modules)} modules match {base}; "
                                      "is this the right base model?"))
    return match.matched, storage.summary() | {"description": storage.line()}
