"""rescale: change an adapter's strength, or its alpha/scaling convention while keeping ΔW.

Exactness: --factor and the rslora conversions change only alpha (and the sign of up for a
negative factor), so the stored factors stay bit-identical. --alpha and --normalize keep ΔW by
multiplying both factors by sqrt(old_scale / new_scale) in float32 and casting back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.adapter import LoraModule, scale_for
from loratool.errors import IncompatibleError
from loratool.io.tensors import TensorRef
from loratool.ops import Row, output_size, written
from loratool.ops.resize import select

MODES = ("factor", "alpha", "normalize", "to_rslora", "from_rslora")


@dataclass
class ModuleRescale(Row):
    name: str
    old_alpha: float
    new_alpha: float
    old_scale: float
    new_scale: float
    delta_factor: float  # ΔW_new = delta_factor · ΔW_old


@dataclass
class RescaleReport:
    out: Path
    format: str
    mode: str
    value: float | None
    modules: list[ModuleRescale] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # --module-weights / --blocks weight 0
    warnings: list[str] = field(default_factory=list)
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **written(self.out, self.format),
            "mode": self.mode,
            "value": self.value,
            "num_modules": len(self.modules) + len(self.skipped) + len(self.removed),
            "size": self.size,
            "modules": [m.to_dict() for m in self.modules],
            "skipped": self.skipped,
            "removed": self.removed,
            "warnings": self.warnings,
        }


def _scaled_factors(m: LoraModule, ratio: float) -> tuple[TensorRef, TensorRef]:
    """Both factors times sqrt(|ratio|), the sign on up: up'·down' = ratio · up·down."""
    import torch

    root = math.sqrt(abs(ratio))
    up = m.up.load().to(torch.float32) * (root if ratio >= 0 else -root)
    down = m.down.load().to(torch.float32) * root
    return (TensorRef.from_tensor(down.to(getattr(torch, m.down.dtype))),
            TensorRef.from_tensor(up.to(getattr(torch, m.up.dtype))))


def rescale_module(m: LoraModule, mode: str, value: float | None) -> tuple[LoraModule, ModuleRescale]:
    """One module rescaled; see the module docstring for which modes touch the factors."""
    new = m
    factor = 1.0
    if mode == "factor":
        assert value is not None
        factor = value
        alpha = m.alpha * abs(value)
        new = m.with_(alpha=alpha)
        if value < 0:
            import torch

            new = new.with_(up=TensorRef.from_tensor(torch.neg(m.up.load())))
    elif mode in ("alpha", "normalize"):
        alpha = float(m.rank) if mode == "normalize" else float(value)  # type: ignore[arg-type]
        new_scale = scale_for(alpha, m.rank, m.rslora)
        if new_scale == 0.0:
            raise IncompatibleError(f"module '{m.name}': alpha 0 would make the delta zero",
                                    hint="pick a non-zero alpha")
        ratio = m.scale / new_scale
        if ratio != 1.0:
            down, up = _scaled_factors(m, ratio)
            new = m.with_(down=down, up=up)
        new = new.with_(alpha=alpha)
    elif mode == "to_rslora":
        new = m.with_(rslora=True, alpha=m.scale * math.sqrt(m.rank))
    elif mode == "from_rslora":
        new = m.with_(rslora=False, alpha=m.scale * m.rank)
    else:
        raise IncompatibleError(f"unknown rescale mode {mode!r}")
    if m.bias is not None and new.bias_scale != 0.0:
        # the bias delta as applied (stored · bias_scale) follows the weight delta: × factor
        ratio_b = factor * m.bias_scale / new.bias_scale
        if ratio_b != 1.0:
            bias = m.bias.load()
            new = new.with_(bias=TensorRef.from_tensor((bias.float() * ratio_b).to(bias.dtype)))
    if new.alpha != m.alpha:
        new = new.with_(alpha_source="config" if m.alpha_source in ("config", "pattern") else new.alpha_source)
    return new, ModuleRescale(m.name, m.alpha, new.alpha, m.scale, new.scale, factor)


def check_options(mode: str, value: float | None, *, per_module: bool = False) -> None:
    """Refuse meaningless option values before reading any file (no torch: the CLI calls it first).

    Raises:
        IncompatibleError: an unknown mode, a value that is not finite, --factor 0 or --alpha 0
            (every delta zero: an adapter that does nothing), per-module weights without --factor.
    """
    if mode not in MODES:
        raise IncompatibleError(f"unknown rescale mode {mode!r}")
    if mode in ("factor", "alpha"):
        if value is None or not math.isfinite(value):
            raise IncompatibleError(f"--{mode} needs a finite number, got {value}")
        if value == 0:
            raise IncompatibleError(f"--{mode} 0 would make every delta zero: an adapter that does nothing",
                                    hint="to leave modules out, give them weight 0: --module-weights 'REGEX=0'")
    if per_module and mode != "factor":
        raise IncompatibleError("--module-weights and --blocks scale deltas: they go with --factor (or alone), "
                                f"not with --{mode.replace('_', '-')}")


def rescale(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mode: str,
    value: float | None = None,
    modules: str | None = None,
    fmt: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    module_weights: str | None = None,
    blocks: str | None = None,
) -> RescaleReport:
    """Rescale an adapter and write it.

    Args:
        mode: factor (ΔW *= value), alpha (set alpha = value, keep ΔW), normalize (alpha = rank,
            keep ΔW), to_rslora / from_rslora (switch the scaling rule, keep ΔW).
        modules: regex (re.search) choosing modules; others are copied unchanged.
        module_weights, blocks: per-module factors ('REGEX=W,...', 'PRESET:W1,...'; formats/blocks.py)
            multiplying --factor (mode factor only); a chosen module at weight 0 is left out.

    Raises:
        IncompatibleError: bad option values; FormatError; OutputExistsError.
    """
    from loratool.formats import check_writable, read, require_plain, write
    from loratool.formats.registry import written_as
    from loratool.hub import resolve_path

    per_module = module_weights is not None or blocks is not None
    check_options(mode, value, per_module=per_module)
    adapter = read(resolve_path(path), allow_pickle=allow_pickle)
    require_plain(adapter, "rescale")
    check_writable(adapter, fmt or written_as(adapter.source_format))  # before the maths; write checks again
    chosen = set(select(adapter, modules))
    report = RescaleReport(Path(out), fmt or adapter.source_format, mode, value)
    weights: dict[str, float] = {}
    if per_module:
        from loratool.formats.blocks import module_weights as resolve

        mw = resolve([n for n in adapter.modules if n in chosen], module_weights, blocks)
        weights = mw.weights
        report.warnings = mw.warnings(blocks.partition(":")[0] if blocks else None)
    new_modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        if name in chosen:
            w = weights.get(name, 1.0)
            if w == 0.0:
                report.removed.append(name)
                continue
            new_modules[name], row = rescale_module(m, mode, value * w if value is not None else value)
            report.modules.append(row)
        else:
            new_modules[name] = m
            report.skipped.append(name)
    if not new_modules:
        raise IncompatibleError("every module has weight 0: the output would hold no module")
    result = adapter.with_modules(new_modules)
    params: dict[str, Any] = {"mode": mode, "value": value, "modules": modules}
    params.update({k: v for k, v in (("module_weights", module_weights), ("blocks", blocks)) if v is not None})
    written = write(result, out, fmt=fmt, force=force, op="rescale", params=params, sources=adapter.files)
    report.size = output_size(written)
    return report
