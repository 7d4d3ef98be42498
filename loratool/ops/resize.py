"""resize: truncate every module to a lower rank by the exact low-rank SVD (DESIGN.md section 5).

Per module: QR of up and of downᵀ, SVD of the r×r core, keep the top k singular triplets, store
up' = U_k·sqrt(S_k), down' = sqrt(S_k)·Vh_k and an alpha that keeps the module's scale. The
result is the best rank-k approximation of the input ΔW (Eckart-Young); no dense out×in matrix is
ever formed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import IncompatibleError
from loratool.io.tensors import TensorRef
from loratool.ops import Progress, Row, output_size, written
from loratool.patterns import SafePattern, compile_pattern


@dataclass
class ModuleResize(Row):
    name: str
    old_rank: int
    new_rank: int
    fro_retained: float  # sqrt(Σ kept σ²) / ||σ||
    rel_error: float  # ||ΔW - ΔW_k||_F / ||ΔW||_F
    # the rank asked for exceeded the layer's smaller dimension (a 6-class head): kept exact at that
    # dimension, the largest rank its delta can have
    at_min_dimension: bool = False


@dataclass
class ResizeReport:
    out: Path
    format: str
    method: str
    threshold: float | None
    rank: int | None
    modules: list[ModuleResize] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not matched by --modules, copied as they were
    size: int = 0
    old_params: int = 0
    new_params: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def mean_fro_retained(self) -> float:
        return sum(m.fro_retained for m in self.modules) / len(self.modules) if self.modules else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **written(self.out, self.format),
            "method": self.method,
            "threshold": self.threshold,
            "rank": self.rank,
            "num_modules": len(self.modules) + len(self.skipped),
            "old_params": self.old_params,
            "new_params": self.new_params,
            "mean_fro_retained": self.mean_fro_retained,
            "size": self.size,
            "modules": [m.to_dict() for m in self.modules],
            "skipped": self.skipped,
            "warnings": self.warnings,
        }


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def target_dtype(option: str, stored: str) -> str:
    """--dtype keep|fp32|fp16|bf16 -> a torch dtype name."""
    if option == "keep":
        return stored
    if option not in DTYPES:
        raise IncompatibleError(f"--dtype {option}: unknown", hint="use keep, fp32, fp16 or bf16")
    return DTYPES[option]


def modules_pattern(pattern: str) -> SafePattern:
    """The compiled --modules regex (checked by the CLI before anything is read), matched in bounded time."""
    try:
        return compile_pattern(pattern)
    except re.error as e:
        raise IncompatibleError(f"--modules {pattern!r}: not a valid regular expression ({e})") from None


def select(adapter: Adapter, pattern: str | None) -> list[str]:
    """Names of the modules matched by a --modules regex (re.search), all when None."""
    if pattern is None:
        return list(adapter.modules)
    rx = modules_pattern(pattern)
    names = [n for n in adapter.modules if rx.search(n)]
    if not names:
        raise IncompatibleError(
            f"--modules {pattern!r} matches none of the {len(adapter.modules)} modules",
            hint="see the names with: loratool inspect PATH --modules",
        )
    return names


def truncate_module(
    m: LoraModule, method: str | None, threshold: float | None, rank: int | None, *, device: str, dtype: str
) -> tuple[LoraModule, ModuleResize]:
    """The best rank-k approximation of one module, with k from a fixed rank or a dynamic rule."""
    import torch

    from loratool.maths.delta import factors
    from loratool.maths.guards import require_finite
    from loratool.maths.svd import choose_rank, fro_retained, lowrank_svd

    up, down = factors(m, device=device)
    require_finite(m.name, m.down.file, up=up, down=down)
    u, s, vh = lowrank_svd(up, down)  # (out, r), (r,), (r, in·k)
    sigma = (s * abs(m.scale)).cpu().tolist()
    if method is None:
        assert rank is not None
        k = max(1, min(rank, m.rank))
    else:
        assert threshold is not None
        k = choose_rank(sigma, method, threshold, cap=rank)
    # the delta's rank is at most min(out, in, r): s has that many values
    at_min_dimension = k > len(sigma)
    k = min(k, len(sigma))
    root = s[:k].sqrt()
    new_up = u[:, :k] * root  # (out, k)
    new_down = root[:, None] * vh[:k]  # (k, in·k)
    out_dtype = getattr(torch, dtype)
    new_up = new_up.reshape(m.up.shape[0], k, *m.up.shape[2:]).to(out_dtype).cpu().contiguous()
    new_down = new_down.reshape(k, *m.down.shape[1:]).to(out_dtype).cpu().contiguous()
    alpha = m.scale * (k**0.5 if m.rslora else k)  # keeps the module's scale exactly
    kept = fro_retained(sigma, k)
    resized = m.with_(
        down=TensorRef.from_tensor(new_down), up=TensorRef.from_tensor(new_up), alpha=alpha,
        alpha_source="tensor" if m.alpha_source == "tensor" else m.alpha_source,
    )
    err = max(0.0, 1.0 - kept * kept) ** 0.5
    return resized, ModuleResize(m.name, m.rank, k, kept, err, at_min_dimension)


def resize(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    method: str | None = None,
    threshold: float | None = None,
    conv_rank: int | None = None,
    modules: str | None = None,
    fmt: str | None = None,
    device: str = "cpu",
    dtype: str = "keep",
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    allow_variant: bool = False,
) -> ResizeReport:
    """Resize an adapter's modules to a fixed rank or by a dynamic rule, and write it.

    Args:
        rank: fixed target rank, or the cap of a dynamic rule.
        method, threshold: sv_ratio | sv_fro | sv_cumulative | max_error with its threshold.
        conv_rank: fixed rank for conv modules with kernels larger than 1x1 (default: rank).
        modules: regex (re.search) choosing the modules to resize; others are copied unchanged.
        fmt: output format (default: the input's).

    Raises:
        IncompatibleError: bad option combination, no module selected, unsupported tensors.
        FormatError, OutputExistsError.
    """
    from loratool.device import resolve_device
    from loratool.formats import check_writable, read, require_plain, write
    from loratool.formats.registry import written_as
    from loratool.hub import resolve_path

    check_options(rank, method, threshold, conv_rank)
    adapter = read(resolve_path(path), allow_pickle=allow_pickle)
    device = resolve_device(device)
    require_plain(adapter, "resize", diffs=True)  # full / norm / bias diffs are written back unchanged
    check_writable(adapter, fmt or written_as(adapter.source_format))  # before the maths; write checks again
    chosen = set(select(adapter, modules))
    report = ResizeReport(Path(out), fmt or adapter.source_format, method or "rank", threshold, rank)
    from loratool.variants import guard

    report.warnings += guard(adapter, "resize", allow_variant)  # PiSSA, aLoRA, ...: refused unless allowed
    new_modules: dict[str, LoraModule] = {}
    total = len(adapter.modules)
    for i, (name, m) in enumerate(adapter.modules.items()):
        if name not in chosen:
            new_modules[name] = m
            report.skipped.append(name)
        else:
            out_dtype = target_dtype(dtype, m.dtype)
            if conv_rank is not None and m.kind == "conv" and any(k > 1 for k in m.kernel):
                new_modules[name], row = truncate_module(m, None, None, conv_rank, device=device, dtype=out_dtype)
            else:
                new_modules[name], row = truncate_module(m, method, threshold, rank, device=device, dtype=out_dtype)
            report.modules.append(row)
        if progress:
            progress(i + 1, total)
    exact = [r for r in report.modules if r.at_min_dimension]
    if exact:
        first = adapter.modules[exact[0].name]
        report.warnings.append(
            f"{len(exact)} module(s) have a smaller dimension than the rank asked for and were kept exact at "
            f"rank = that dimension (e.g. {exact[0].name}: {first.out_features} x {first.in_features}, rank "
            f"{exact[0].new_rank})"
        )
    if adapter.dora:
        report.warnings.append(
            "DoRA: the low-rank part was resized and the magnitude kept; the normalised merge changes slightly"
        )
    resized = adapter.with_modules(new_modules, metadata=_metadata(adapter, method))
    report.old_params = adapter.lora_params
    report.new_params = resized.lora_params
    params = {"rank": rank, "method": method, "threshold": threshold, "conv_rank": conv_rank, "modules": modules,
              "dtype": dtype}
    written = write(resized, out, fmt=fmt, force=force, op="resize", params=params, sources=adapter.files)
    report.size = output_size(written)
    return report


def check_options(rank: int | None, method: str | None, threshold: float | None, conv_rank: int | None) -> None:
    """Refuse option combinations and values before reading anything (no torch: the CLI calls it first).

    Raises:
        IncompatibleError: naming the option and what is expected.
    """
    from loratool.maths.svd import RANK_METHODS

    if threshold is not None and method is None:
        raise IncompatibleError("--threshold needs --method", hint="e.g. --method sv_fro --threshold 0.9")
    if method is None and rank is None:
        raise IncompatibleError("resize needs --rank K or --method M --threshold T",
                                hint="e.g. --rank 16, or --method sv_fro --threshold 0.9")
    if method is not None:
        if method not in RANK_METHODS:
            raise IncompatibleError(f"--method {method}: unknown", hint=f"use one of {', '.join(RANK_METHODS)}")
        if threshold is None:
            raise IncompatibleError(f"--method {method} needs --threshold T")
        _check_threshold(method, threshold)
    for opt, val in (("--rank", rank), ("--conv-rank", conv_rank)):
        if val is not None and val < 1:
            raise IncompatibleError(f"{opt} {val}: must be at least 1")


def _check_threshold(method: str, t: float) -> None:
    if method == "sv_ratio":
        if not t >= 1.0:
            raise IncompatibleError(f"--threshold {t}: sv_ratio keeps σ_i ≥ σ_0 / T, so T must be ≥ 1")
    elif method == "max_error":
        if not 0.0 <= t < 1.0:
            raise IncompatibleError(f"--threshold {t}: max_error is a relative error in [0, 1)")
    elif not 0.0 < t <= 1.0:
        raise IncompatibleError(f"--threshold {t}: {method} is a share in (0, 1]")


def _metadata(adapter: Adapter, method: str | None) -> dict[str, str]:
    meta = dict(adapter.metadata)
    for key in ("ss_network_dim", "ss_network_alpha"):
        meta.pop(key, None)  # the kohya writer recomputes them from the new ranks
        if method is not None:
            meta[key] = "Dynamic"
    return meta
