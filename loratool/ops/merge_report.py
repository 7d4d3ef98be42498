"""What a merge reports: per-tensor statistics and the run's summary (with its JSON document), shared by
the safetensors merge (ops/merge.py) and the GGUF merge (ops/merge_gguf.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.ops import Row

SCHEMA = 1


def run_inputs(base: Path, adapters: list[Path], weights: list[float]) -> dict[str, Any]:
    """The inputs of a merge or verify run, as their --json documents give them."""
    return {"base": str(base), "adapters": [str(a) for a in adapters], "weights": weights}
Progress = Callable[[int, int], None]


@dataclass
class TensorStat(Row):
    key: str
    file: str
    modules: list[str]
    delta_fro: float  # ||ΔW||_F, the float32 change W' − W (0 for replaced tensors)
    rel_change: float  # ||W' − W||_F / ||W||_F, measured in float32 before the cast
    max_cast_error: float  # max |stored(W') − W'|, the storage's rounding of the merged tensor
    retained: float | None = None  # <R, ΔW> / ||ΔW||², R = stored(W') − W (None: ΔW = 0)
    rel_error: float | None = None  # ||R − ΔW|| / ||ΔW||
    storage: str = "float"  # how the tensor is stored (storage.Storage.describe())
    replaced: bool = False


@dataclass
class MergeReport:
    out: Path
    base: Path
    adapters: list[Path]
    weights: list[float]
    unmerge: bool
    dtype: str
    device: str
    files: int = 0
    merged: int = 0  # tensors that received a delta
    replaced: int = 0  # tensors replaced by modules_to_save copies
    copied: int = 0  # tensors copied byte for byte
    changed: int = 0  # merged tensors whose stored values changed, plus replaced ones
    size: int = 0
    storage: str = "plain float (no quantized weights)"  # what the base's weights are stored as
    rounding: str = "nearest"
    min_retained: float = 0.5
    unmatched: list[str] = field(default_factory=list)
    layouts: list[str] = field(default_factory=list)  # adapters mapped onto the base's other family layout
    tensors: list[TensorStat] = field(default_factory=list)  # per tensor (with stats)
    warnings: list[str] = field(default_factory=list)
    # (key, retained, rel_error, max_cast_error) of every merged tensor, kept even without stats
    realized: list[tuple[str, float | None, float | None, float]] = field(default_factory=list)

    @property
    def worst_retained(self) -> tuple[str, float] | None:
        vals = [(k, r) for k, r, _, _ in self.realized if r is not None]
        return min(vals, key=lambda kv: kv[1]) if vals else None

    @property
    def worst_rel_error(self) -> tuple[str, float] | None:
        vals = [(k, e) for k, _, e, _ in self.realized if e is not None]
        return max(vals, key=lambda kv: kv[1]) if vals else None

    @property
    def low_retained(self) -> list[str]:
        return [k for k, r, _, _ in self.realized if r is not None and r < self.min_retained]
    timings: dict[str, float] = field(default_factory=dict)  # pipeline.Timings: where the wall time went

    def to_dict(self, *, tensors: bool = False) -> dict[str, Any]:
        worst_r, worst_e = self.worst_retained, self.worst_rel_error
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "out": str(self.out),
            **run_inputs(self.base, self.adapters, self.weights),
            "unmerge": self.unmerge,
            "dtype": self.dtype,
            "device": self.device,
            "num_files": self.files,
            "merged_tensors": self.merged,
            "replaced_tensors": self.replaced,
            "copied_tensors": self.copied,
            "size": self.size,
            "unmatched": self.unmatched,
            "storage": self.storage,
            "rounding": self.rounding,
            "max_cast_error": max((c for *_, c in self.realized), default=0.0) if self.tensors else None,
            "min_retained": worst_r[1] if worst_r else None,
            "min_retained_tensor": worst_r[0] if worst_r else None,
            "max_rel_error": worst_e[1] if worst_e else None,
            "max_rel_error_tensor": worst_e[0] if worst_e else None,
            "low_retained_tensors": len(self.low_retained),
            "layouts": self.layouts,
            "warnings": self.warnings,
        }
        if tensors:
            doc["tensors"] = [t.to_dict() for t in self.tensors]
            doc["timings"] = self.timings
        return doc
