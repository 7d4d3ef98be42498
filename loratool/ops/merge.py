"""merge: stream adapters into base weights, W' = W + Σ w_i·ΔW_i, in bounded memory.

Three pieces, each in its own home: the plan (which base tensor receives which delta, from
headers only) is keymap.plan_merge; the per-tensor maths (float32, in reused buffers) is
linalg.merged_tensor; the streaming read/compute/write over each base file is
pipeline.stream_file, with a fourth thread computing the base files' sha256 from the start
(while torch is imported), at most 1 GiB ahead of the merge. This module ties them together: it
decides per tensor what is written (merged, replaced by a modules_to_save copy, cast, or copied
byte for byte), checks the result, and reports.

The output mirrors the base: same file names, shard split, header key order, data order and
dtypes (unless --dtype), the index, and every other file. Peak memory is a few times the largest
tensor plus the adapters, whatever the model or shard size.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter
from loratool.errors import IncompatibleError
from loratool.keymap import Contribution, MergePlan, plan_merge
from loratool.linalg import Workspace, merge_change, merged_tensor
from loratool.ops import Row
from loratool.pipeline import Buffers, Cast, Compute, copy_other_files, stream_file
from loratool.st import BackgroundSha256, Checkpoint, TensorInfo

if TYPE_CHECKING:
    import torch

SCHEMA = 1
Progress = Callable[[int, int], None]
OUT_DTYPES = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_FLOAT = ("float64", "float32", "float16", "bfloat16")


@dataclass
class TensorStat(Row):
    key: str
    file: str
    modules: list[str]
    delta_fro: float  # ||Σ w_i ΔW_i||_F (0 for replaced tensors)
    rel_change: float  # ||W' − W||_F / ||W||_F, measured in float32 before the cast
    max_cast_error: float  # max |W'_fp32 − cast(W'_fp32)|
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
    size: int = 0
    unmatched: list[str] = field(default_factory=list)
    tensors: list[TensorStat] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # pipeline.Timings: where the wall time went

    def to_dict(self, *, tensors: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "out": str(self.out),
            "base": str(self.base),
            "adapters": [str(a) for a in self.adapters],
            "weights": self.weights,
            "unmerge": self.unmerge,
            "dtype": self.dtype,
            "device": self.device,
            "num_files": self.files,
            "merged_tensors": self.merged,
            "replaced_tensors": self.replaced,
            "copied_tensors": self.copied,
            "size": self.size,
            "unmatched": self.unmatched,
            "max_cast_error": max((t.max_cast_error for t in self.tensors), default=0.0) if self.tensors else None,
            "warnings": self.warnings,
        }
        if tensors:
            doc["tensors"] = [t.to_dict() for t in self.tensors]
            doc["timings"] = self.timings
        return doc


# ---------------------------------------------------------------------------------------------
# per tensor


def _finite_or_raise(new: torch.Tensor, out_dtype: str, key: str, contribs: list[Contribution]) -> None:
    """NaN/Inf in the float32 result, or values the output dtype cannot hold (one pass: aminmax)."""
    import torch

    if not new.is_floating_point() or new.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(new))
    limit = torch.finfo(getattr(torch, out_dtype)).max if out_dtype in _FLOAT else math.inf
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= limit:
        return
    names = ", ".join(sorted({f"{c.adapter}: '{c.module.name}'" for c in contribs})) or "a saved tensor"
    problem = "NaN/Inf values" if not (math.isfinite(lo) and math.isfinite(hi)) else \
        f"values up to {max(-lo, hi):.3g}, beyond what {out_dtype} holds"
    raise IncompatibleError(
        f"merging into '{key}' gives {problem} (from {names})",
        hint="check the adapter with: loratool validate ADAPTER" + (", or keep a wider --dtype"
                                                                     if "beyond" in problem else ""),
    )


def _out_dtype(info: TensorInfo, dtype: str) -> str:
    target = OUT_DTYPES[dtype]
    return target if target is not None and info.dtype in _FLOAT else info.dtype


def _needs_bytes(info: TensorInfo, plan: MergePlan, dtype: str) -> bool:
    return info.key in plan.deltas or info.key in plan.biases or (
        info.key not in plan.replacements and _out_dtype(info, dtype) != info.dtype)


def _tensor_step(
    plan: MergePlan, report: MergeReport, *, name: str, device: str, dtype: str, unmerge: bool, stats: bool,
    work: Workspace,
) -> Compute:
    """What each tensor of one base file becomes: merged, replaced, or as stored (counted in report)."""

    def compute(info: TensorInfo, stored: torch.Tensor | None, cast: Cast) -> torch.Tensor | None:
        import torch

        key = info.key
        out_dtype = _out_dtype(info, dtype)
        if key in plan.deltas or key in plan.biases:
            assert stored is not None
            contribs = plan.deltas.get(key) or plan.biases[key]
            w32, new, acc = merged_tensor(stored, [(c.module, c.weight) for c in contribs], device=device,
                                          unmerge=unmerge, bias=key in plan.biases, keep_delta=stats, work=work)
            _finite_or_raise(new, out_dtype, key, contribs)
            out = cast(new, out_dtype)
            if stats:
                assert acc is not None
                dora = any(getattr(c.module, "magnitude", None) is not None for c in contribs)
                acc_norm, rel_change, cast_error = merge_change(w32, new, acc, out, dora=dora)
                report.tensors.append(TensorStat(key, name, sorted({c.module.name for c in contribs}), acc_norm,
                                                 rel_change, cast_error))
            report.merged += 1
            return out
        if key in plan.replacements:
            saved = plan.replacements[key].load()
            _finite_or_raise(saved.to(torch.float32), out_dtype, key, [])
            if stats:
                report.tensors.append(TensorStat(key, name, [], 0.0, 0.0, 0.0, replaced=True))
            report.replaced += 1
            return saved.to(getattr(torch, out_dtype))
        report.copied += 1  # as stored: byte for byte, or cast to --dtype
        return None

    return compute


# ---------------------------------------------------------------------------------------------
# files


def _provenance(params: dict[str, Any], adapters: list[Adapter], base_file: Path) -> tuple[dict[str, str], str]:
    """Metadata for one output file; the base file's sha256 is a placeholder patched after streaming."""
    from loratool.formats import provenance

    placeholder = secrets.token_hex(32)
    meta = provenance("merge", params, [f for a in adapters for f in a.files], hashes={str(base_file): placeholder})
    return meta, placeholder


def adapter_module_weights(adapters: list[Adapter], module_weights: str | None, blocks: str | None
                           ) -> tuple[list[dict[str, float]] | None, list[str]]:
    """Per adapter, each module's --module-weights / --blocks multiplier (None when neither is given)."""
    from loratool.formats.blocks import module_weights as resolve

    if module_weights is None and blocks is None:
        return None, []
    out, warnings = [], []
    for a in adapters:
        mw = resolve([*a.modules, *a.lycoris], module_weights, blocks)
        out.append(mw.weights)
        warnings += [f"{a.path}: {w}" for w in mw.warnings(blocks.partition(":")[0] if blocks else None)]
    return out, warnings


def merge(
    base: str | os.PathLike[str],
    adapters: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    dtype: str = "keep",
    device: str = "cpu",
    unmerge: bool = False,
    allow_unmatched: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    stats: bool = False,
    module_weights: str | None = None,
    blocks: str | None = None,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge adapters into a base checkpoint and write a complete copy of it.

    Args:
        base: a .safetensors file, a directory with model.safetensors, a sharded directory, or a GGUF
            model file (ops/merge_gguf.py: each adapted tensor dequantized, merged, and written in its
            own type where the gguf package can quantize to it, else refused unless `dtype` is given).
        adapters: one or more adapter paths (any supported format).
        weights: one per adapter (default 1.0 each); negative allowed.
        dtype: keep | fp32 | fp16 | bf16 for floating tensors of the output.
        device: auto | cpu | cuda | cuda:N (auto: cuda when available).
        unmerge: subtract the deltas instead (refused for DoRA and modules_to_save).
        allow_unmatched: skip modules that match no base weight (with a warning) instead of failing.
        stats: measure per merged tensor the delta norm, relative change and max cast error
            (report.tensors; costs three passes over each merged tensor).
        module_weights: 'REGEX=W,...' per-module multipliers of every adapter's weight (first
            match wins, on the module names); blocks: 'PRESET:W1,W2,...' per-block multipliers
            (formats/blocks.py). A module at weight 0 is not merged.
        progress: called with (bytes done, bytes total).

    Raises:
        IncompatibleError, FormatError, OutputExistsError, LoratoolError (disk full).
    """
    from loratool.hub import resolve_path
    from loratool.st import open_checkpoint

    if not adapters:
        raise IncompatibleError("merge needs at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise IncompatibleError(f"--weights has {len(weights)} value(s) for {len(adapters)} adapter(s)")
    if not all(math.isfinite(w) for w in weights):
        raise IncompatibleError(f"--weights must be finite numbers, got {weights}")
    if dtype not in OUT_DTYPES:
        raise IncompatibleError(f"--dtype {dtype}: unknown", hint="use keep, fp32, fp16 or bf16")
    base_path = resolve_path(base)
    adapters = [resolve_path(a) for a in adapters]
    from loratool.ops.merge_gguf import is_gguf, merge_into_gguf

    if base_path.is_file() and is_gguf(base_path):  # a llama.cpp model: dequantize, add, requantize
        if unmerge:
            raise IncompatibleError(f"{base_path}: --unmerge is not supported for GGUF bases")
        return merge_into_gguf(base_path, [Path(a) for a in adapters], out, weights=weights, dtype=dtype, force=force,
                               allow_pickle=allow_pickle, allow_unmatched=allow_unmatched, stats=stats,
                               progress=progress)
    ckpt = open_checkpoint(base_path)
    # the base's sha256 starts now, while torch is imported and the adapters are read (a core is
    # idle then), and later stays at most 1 GiB ahead of the merge, so the disk is read once
    sha256 = BackgroundSha256(list(ckpt.files), lead=1 << 30)
    try:
        return _merge(ckpt, sha256, base_path, adapters, out, weights, dtype=dtype, device=device, unmerge=unmerge,
                      allow_unmatched=allow_unmatched, force=force, allow_pickle=allow_pickle, stats=stats,
                      module_weights=module_weights, blocks=blocks, progress=progress)
    finally:
        sha256.stop()


def _merge(
    ckpt: Checkpoint, sha256: BackgroundSha256, base_path: Path, adapters: list[str | os.PathLike[str]],
    out: str | os.PathLike[str], weights: list[float], *, dtype: str, device: str, unmerge: bool,
    allow_unmatched: bool, force: bool, allow_pickle: bool, stats: bool, progress: Progress | None,
    module_weights: str | None = None, blocks: str | None = None,
) -> MergeReport:
    from loratool.device import resolve_device
    from loratool.formats import read, require_plain
    from loratool.st import atomic_output, read_header

    device = resolve_device(device)
    loaded = []
    for p in adapters:
        a = read(Path(p), allow_pickle=allow_pickle)
        require_plain(a, "merge", lycoris=True)
        loaded.append(a)
    per_module, mw_warnings = adapter_module_weights(loaded, module_weights, blocks)
    plan, warnings = plan_merge(loaded, weights, ckpt, allow_unmatched=allow_unmatched, unmerge=unmerge,
                                module_weights=per_module)
    warnings = mw_warnings + warnings
    report = MergeReport(Path(out), base_path, [Path(p) for p in adapters], weights, unmerge, dtype, device,
                         unmatched=plan.unmatched, warnings=warnings)
    if not plan.deltas and not plan.replacements:
        raise IncompatibleError(f"nothing to merge: no adapter module matches {base_path}",
                                hint="check with: loratool validate ADAPTER --base BASE")
    single_file = base_path.is_file()
    params: dict[str, Any] = {"weights": weights, "dtype": dtype, "unmerge": unmerge,
                              "allow_unmatched": allow_unmatched}
    params.update({k: v for k, v in (("module_weights", module_weights), ("blocks", blocks)) if v is not None})
    total = sum(i.nbytes for i in ckpt.tensors.values())
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        sha256.advance(n)
        if progress:
            progress(done, total)

    with atomic_output(out, force=force, directory=not single_file, inputs=[base_path, *ckpt.files, *adapters],
                       kind="model") as tmp:
        headers = [read_header(f) for f in ckpt.files]
        buffers = Buffers()
        finishing: list[Future[None]] = []
        try:
            for src, digest in zip(headers, sha256.digests):
                sha256.advance(src.size - sum(i.nbytes for i in src.tensors.values()))  # header: not ticked
                dst = tmp if single_file else tmp / src.path.relative_to(ckpt.root)
                dst.parent.mkdir(parents=True, exist_ok=True)
                meta, placeholder = _provenance(params, loaded, src.path)
                meta = {**src.metadata, **meta}
                name = Path(out).name if single_file else str(src.path.relative_to(ckpt.root))
                step = _tensor_step(plan, report, name=name, device=device, dtype=dtype, unmerge=unmerge,
                                    stats=stats, work=buffers.work)
                finishing.append(stream_file(
                    src, dst, meta, placeholder, out_dtype=lambda i: _out_dtype(i, dtype),
                    needs_bytes=lambda i: _needs_bytes(i, plan, dtype), compute=step, tick=tick, digest=digest,
                    buffers=buffers))
            t = time.perf_counter()
            for fut in finishing:
                fut.result()
            buffers.timings.finish_wait += time.perf_counter() - t
        except BaseException:
            wait(finishing)  # an earlier file may still be finishing: let it end before tmp is removed
            raise
        if not single_file:
            copy_other_files(ckpt, tmp, dtype_changed=dtype != "keep")
        # re-open what was written before it is moved into place
        for src in headers:
            dst = tmp if single_file else tmp / src.path.relative_to(ckpt.root)
            written = read_header(dst)
            if list(written.tensors) != list(src.tensors) or any(
                written.tensors[k].shape != i.shape for k, i in src.tensors.items()
            ):
                raise IncompatibleError(f"{dst}: written file does not mirror {src.path}")
        report.timings = buffers.timings.to_dict()
        report.files = len(headers)
        report.size = sum(f.stat().st_size for f in (tmp.rglob("*") if not single_file else [tmp]) if f.is_file())
    return report
