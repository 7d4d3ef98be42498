"""merge: stream adapters into base weights, W' = W + Σ w_i·ΔW_i, in bounded memory.

The base is processed file by file and tensor by tensor, in on-disk order, in a pipeline: a reader
thread reads tensor i+1, the main thread merges tensor i, a writer thread writes tensor i-1 (and
finishes a file while the next is merged), and a fourth thread computes the base files' sha256
from the start (while torch is imported), at most 1 GiB ahead of the merge. Tensors without a
delta are copied byte for byte in the kernel. All buffers are reused from tensor to tensor, so
peak memory is a few times the largest tensor plus the adapters, whatever the model or shard size.
The output mirrors the base: same file names, shard split, header key order, data order and
dtypes (unless --dtype), the index, and every other file.

Maths per merged tensor, in float32: acc = Σ w_i·ΔW_i (ΔW = scale·up@down in the base layout);
W' = W + acc (or W − acc with unmerge); DoRA: W' = m / ||W + acc||_row · (W + acc) (PEFT's
convention). The result is cast to the output dtype once.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError, IncompatibleError
from loratool.st import (
    BackgroundSha256,
    Checkpoint,
    SafetensorsFile,
    StreamingWriter,
    TensorInfo,
    TensorRef,
    copy_input_file,
)

if TYPE_CHECKING:
    import torch

SCHEMA = 1
Progress = Callable[[int, int], None]
OUT_DTYPES = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_FLOAT = ("float64", "float32", "float16", "bfloat16")


@dataclass
class Contribution:
    """One adapter module's weighted delta aimed at one base tensor."""

    module: LoraModule
    weight: float
    adapter: Path


@dataclass
class Plan:
    """Which base tensors change, and how. Built from headers only."""

    deltas: dict[str, list[Contribution]] = field(default_factory=dict)  # base weight key -> deltas
    biases: dict[str, list[Contribution]] = field(default_factory=dict)  # base bias key -> lora_B.bias deltas
    replacements: dict[str, TensorRef] = field(default_factory=dict)  # base key -> modules_to_save tensor
    unmatched: list[str] = field(default_factory=list)
    num_modules: int = 0


@dataclass
class TensorStat:
    key: str
    file: str
    modules: list[str]
    delta_fro: float  # ||Σ w_i ΔW_i||_F (0 for replaced tensors)
    rel_change: float  # ||W' − W||_F / ||W||_F, measured in float32 before the cast
    max_cast_error: float  # max |W'_fp32 − cast(W'_fp32)|
    replaced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
            "files": self.files,
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
        return doc


# ---------------------------------------------------------------------------------------------
# planning (headers only)


def plan_merge(
    adapters: list[Adapter], weights: list[float], ckpt: Checkpoint, *, allow_unmatched: bool, unmerge: bool
) -> tuple[Plan, list[str]]:
    """Match every adapter module and saved tensor to one base tensor.

    Raises:
        IncompatibleError: unmatched/ambiguous modules (unless allow_unmatched), shape mismatches,
            DoRA with unmerge or shared with another adapter, conflicting modules_to_save.
    """
    from loratool.formats.peft import base_key as saved_tensor_key
    from loratool.keymap import KeyIndex, match_modules

    plan = Plan()
    warnings: list[str] = []
    index = KeyIndex(list(ckpt.tensors))
    for adapter, w in zip(adapters, weights):
        where = adapter.path
        mods = list(adapter.modules.values())
        plan.num_modules += len(mods)
        match = match_modules(mods, ckpt.tensors)
        if match.shape_mismatch:
            name, key, want, got = match.shape_mismatch[0]
            raise IncompatibleError(
                f"{where}: module '{name}' needs a base weight of shape {want} but {key} is {got}"
                + (f" ({len(match.shape_mismatch)} modules mismatch)" if len(match.shape_mismatch) > 1 else ""),
                hint="is this adapter for this base model? check with: loratool validate ADAPTER --base BASE",
            )
        problems = [*match.unmatched, *match.ambiguous]
        if problems:
            listing = ", ".join(problems[:5]) + (f", ... ({len(problems)} in all)" if len(problems) > 5 else "")
            what = f"{len(match.unmatched)} unmatched"
            if match.ambiguous:
                what += f", {len(match.ambiguous)} ambiguous"
            if not allow_unmatched:
                raise IncompatibleError(
                    f"{where}: {what} module(s) of {len(mods)} in {ckpt.root}: {listing}",
                    hint="merging would silently skip them; check the base with: loratool validate ADAPTER --base "
                    "BASE, or pass --allow-unmatched to merge the rest",
                )
            warnings.append(f"{where}: skipped {what} module(s): {listing}")
            plan.unmatched.extend(problems)
        for name, key in match.matched.items():
            m = adapter.modules[name]
            if m.magnitude is not None:
                if unmerge:
                    raise IncompatibleError(
                        f"{where}: module '{name}' is DoRA; unmerging DoRA needs the pre-merge weight norm",
                        hint="merge into the original base instead of unmerging",
                    )
                if m.kind == "embedding":
                    raise IncompatibleError(f"{where}: module '{name}': DoRA on an embedding is not supported")
            plan.deltas.setdefault(key, []).append(Contribution(m, w, Path(str(where))))
            if m.bias is not None:
                bias_key = key[: -len(".weight")] + ".bias" if key.endswith(".weight") else key + ".bias"
                if bias_key not in ckpt.tensors:
                    raise IncompatibleError(f"{where}: module '{name}' has a lora_B bias but {ckpt.root} has no "
                                            f"'{bias_key}'")
                plan.biases.setdefault(bias_key, []).append(Contribution(m, w, Path(str(where))))
        for stored, ref in adapter.extras.items():
            if ".base_layer." in stored:
                continue  # peft's copy of a LoRA layer's own base weight (save_embedding_layers): not a change
            key = saved_tensor_key(stored)
            hits = [key] if key in ckpt.tensors else (
                index.candidates(key[: -len(".weight")]) if key.endswith(".weight") else [])
            if len(hits) != 1:
                raise IncompatibleError(
                    f"{where}: saved tensor '{stored}' matches {len(hits) or 'no'} tensor(s) in {ckpt.root}",
                    hint="the adapter's modules_to_save do not fit this base",
                )
            if tuple(ckpt.tensors[hits[0]].shape) != tuple(ref.shape):
                raise IncompatibleError(f"{where}: saved tensor '{stored}' is {ref.shape} but {hits[0]} in the base "
                                        f"is {ckpt.tensors[hits[0]].shape}")
            if unmerge:
                raise IncompatibleError(
                    f"{where}: saved tensor '{stored}' replaces a base tensor; --unmerge cannot restore it",
                    hint="merge into the original base instead of unmerging",
                )
            if hits[0] in plan.replacements:
                raise IncompatibleError(f"{where}: '{hits[0]}' is replaced by saved tensors of two adapters")
            plan.replacements[hits[0]] = ref
    for key, contribs in plan.deltas.items():
        if len(contribs) > 1 and any(c.module.magnitude is not None for c in contribs):
            raise IncompatibleError(
                f"base tensor '{key}' is targeted by {len(contribs)} adapters and at least one is DoRA; "
                "the normalised sum is not well defined",
                hint="merge the adapters one after another, DoRA last",
            )
        if key in plan.replacements:
            raise IncompatibleError(f"base tensor '{key}' is both replaced (modules_to_save) and given a LoRA delta")
    return plan, warnings


# ---------------------------------------------------------------------------------------------
# maths per tensor


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
    stored: torch.Tensor, contribs: list[Contribution], *, device: str, unmerge: bool, bias: bool = False,
    keep_delta: bool = False, work: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W, W', acc = Σ w_i ΔW_i or None), float32 on `device`, for one base tensor.

    Plain LoRA takes the fast path: each delta is formed and added in place into a float32 copy of W
    (bit-identical to peft's `W + (B @ A) * scale`; no sum tensor is kept), in `work`'s buffers when
    given (the result then lives there until the next call). DoRA, LoRA biases and keep_delta
    (statistics) hold acc explicitly.
    """
    import torch

    from loratool.linalg import delta, factors

    sign = -1.0 if unmerge else 1.0
    dora = [c.module for c in contribs if c.module.magnitude is not None and not bias]
    if not (dora or bias or keep_delta):
        work = work if work is not None else Workspace()
        w = work.get("w", stored.shape, torch.float32, device).copy_(stored)  # widened exactly
        rows = w.view(w.shape[0], -1)  # conv (out, in, kh, kw) -> (out, in·kh·kw), as down flattens
        for c in contribs:
            up, down = factors(c.module, device=device)  # (out, r), (r, in·k)
            d = torch.mm(up, down, out=work.get("d", (up.shape[0], down.shape[1]), torch.float32, device))
            d.mul_(c.module.scale)  # (out, in·k), rounded exactly as peft's (B @ A) * s
            if c.weight != 1.0 or unmerge:
                d.mul_(sign * c.weight)
            transposed = c.module.kind == "embedding" or c.module.fan_in_fan_out  # W is (in, out)
            rows.add_(d.T if transposed else d)
            del d
        return w, w, None
    w = stored.to(device=device, dtype=torch.float32)
    acc: torch.Tensor | None = None
    for c in contribs:
        if bias:
            assert c.module.bias is not None
            d = c.module.bias.load().to(device=device, dtype=torch.float32) * c.module.scale
        else:
            d = delta(c.module, device=device)  # (scale · up @ down) in the base layout, as peft computes it
        d = d.reshape(w.shape)  # a 2-D delta onto a (out, in, 1, 1) conv weight
        if c.weight != 1.0:
            d = d * c.weight
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


# ---------------------------------------------------------------------------------------------
# streaming


def _read_range(fd: int, start: int, n: int, into: bytearray | None = None) -> bytearray | memoryview:
    """n bytes of fd from start, into `into` (reused) when given, else into a new bytearray."""
    buf = bytearray(n) if into is None else into
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        chunk = os.preadv(fd, [view[got:]], start + got)
        if chunk == 0:
            raise FormatError(f"{_name_of(fd)}: ended at byte {start + got} while being read (truncated "
                              "during the merge?)", hint="leave the base alone while merging, then run again")
        got += chunk
    return buf if into is None else view


def _name_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "an input file"


def _stat(key: str, file: str, contribs: list[Contribution], w: torch.Tensor, new: torch.Tensor, acc: torch.Tensor,
          out: torch.Tensor) -> TensorStat:
    import torch

    acc_norm = float(acc.norm())
    dora = any(c.module.magnitude is not None for c in contribs)
    change = float((new - w).norm()) if dora else acc_norm  # without DoRA, W' − W = ±acc
    cast = float((out.to(torch.float32) - new).abs().max()) if out.numel() else 0.0
    return TensorStat(key, file, sorted({c.module.name for c in contribs}), acc_norm,
                      change / max(float(w.norm()), 1e-30), cast)


def _tensor_from(data: bytearray | memoryview, info: TensorInfo) -> torch.Tensor:
    import torch

    dtype = getattr(torch, info.dtype)
    if not len(data):
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(info.shape)


def _out_dtype(info: TensorInfo, dtype: str) -> str:
    target = OUT_DTYPES[dtype]
    return target if target is not None and info.dtype in _FLOAT else info.dtype


@dataclass
class _Buffers:
    """What the files of one merge share: read buffers, output slots, the float32 workspace."""

    work: Workspace = field(default_factory=Workspace)
    # two cast-result slots, each busy until the write that uses it is done
    out_slots: list[tuple[Workspace, Future[None] | None]] = field(
        default_factory=lambda: [(Workspace(), None), (Workspace(), None)])
    reads: list[bytearray] = field(default_factory=list)

    def read_buffers(self, nbytes: int) -> list[bytearray]:
        if not self.reads or len(self.reads[0]) < nbytes:
            self.reads = [bytearray(nbytes), bytearray(nbytes)]
        return self.reads


def _stream_file(
    src: SafetensorsFile,
    dst: Path,
    plan: Plan,
    report: MergeReport,
    meta: dict[str, str],
    placeholder: str,
    *,
    name: str,
    device: str,
    dtype: str,
    unmerge: bool,
    stats: bool,
    tick: Callable[[int], None],
    digest: Future[str],
    buffers: _Buffers,
) -> Future[None]:
    """Merge one base file into `dst`: three stages in step, each in its own thread.

    A reader reads tensor i+1, the main thread merges tensor i, a writer writes tensor i-1; the
    file's sha256 (for the provenance) comes from `digest`, computed alongside. Byte buffers are
    reused in rotation (two for reading, two for cast results), and the float32 work in one
    Workspace, so memory stays at a few times the largest tensor.

    Returns the future of the file's completion (its last writes, header patch and fsync), which
    runs while the next file is merged.
    """
    import torch

    order = sorted(src.tensors.values(), key=lambda i: i.start)  # on-disk order: sequential reads
    entries = [(i.key, _out_dtype(i, dtype), i.shape) for i in order]
    writer = StreamingWriter(dst, entries, meta, header_order=list(src.tensors))
    fd = os.open(src.path, os.O_RDONLY)
    reader = ThreadPoolExecutor(max_workers=1)  # one worker: reads strictly in file order
    writes = ThreadPoolExecutor(max_workers=1)  # one worker: writes strictly in file order
    pending: list[Future[None]] = []

    def needs_bytes(info: TensorInfo) -> bool:
        return info.key in plan.deltas or info.key in plan.biases or (
            info.key not in plan.replacements and _out_dtype(info, dtype) != info.dtype)

    largest = max((i.nbytes for i in order if needs_bytes(i)), default=0)
    in_bufs = buffers.read_buffers(largest) if largest else []
    out_slots = buffers.out_slots
    work = buffers.work

    def read(n: int) -> bytearray | memoryview | None:
        """Tensor n's bytes (in buffer n % 2) when they are needed; None for those copied as they are."""
        info = order[n]
        return _read_range(fd, info.start, info.nbytes, into=in_bufs[n % 2]) if needs_bytes(info) else None

    def fetch(n: int) -> Future[bytearray | memoryview | None] | None:
        # buffer n % 2 was last used by tensor n - 2: the main thread is done with it (it converts
        # a tensor's bytes before it asks for the next one)
        return reader.submit(read, n) if n < len(order) else None

    def submit(fn: Callable[..., None], *args: Any) -> Future[None]:
        while pending and pending[0].done():
            pending.pop(0).result()  # a failed write (ENOSPC, ...) surfaces here, not at the end
        fut = writes.submit(fn, *args)
        pending.append(fut)
        return fut

    def cast(new: torch.Tensor, out_dtype: str, n: int) -> tuple[torch.Tensor, int]:
        """new cast to out_dtype on the CPU, in the output slot that is free again."""
        slot = n % 2
        ws, busy = out_slots[slot]
        if busy is not None:
            busy.result()  # written out: its buffer may be reused
        return ws.get("out", new.shape, getattr(torch, out_dtype), "cpu").copy_(new), slot

    try:
        ahead = fetch(0)
        for n, info in enumerate(order):
            assert ahead is not None
            data = ahead.result()
            ahead = fetch(n + 1)  # into the other buffer: read the next tensor meanwhile
            out_dtype = _out_dtype(info, dtype)
            key = info.key
            if key in plan.deltas or key in plan.biases:
                assert data is not None
                contribs = plan.deltas.get(key) or plan.biases[key]
                w32, new, acc = merged_tensor(_tensor_from(data, info), contribs, device=device, unmerge=unmerge,
                                              bias=key in plan.biases, keep_delta=stats, work=work)
                del data
                _finite_or_raise(new, out_dtype, key, contribs)
                out, slot = cast(new, out_dtype, n)
                if stats:
                    assert acc is not None
                    report.tensors.append(_stat(key, name, contribs, w32, new, acc, out))
                del w32, new, acc
                out_slots[slot] = (out_slots[slot][0], submit(writer.write, key, out))
                report.merged += 1
            elif key in plan.replacements:
                saved = plan.replacements[key].load()
                _finite_or_raise(saved.to(torch.float32), out_dtype, key, [])
                out = saved.to(getattr(torch, out_dtype))
                if stats:
                    report.tensors.append(TensorStat(key, name, [], 0.0, 0.0, 0.0, replaced=True))
                submit(writer.write, key, out)
                report.replaced += 1
            elif data is not None:  # a dtype change only
                out, slot = cast(_tensor_from(data, info), out_dtype, n)
                out_slots[slot] = (out_slots[slot][0], submit(writer.write, key, out))
                report.copied += 1
            else:
                submit(writer.copy_range, key, fd, info.start, info.nbytes)  # byte for byte, in the kernel
                report.copied += 1
            tick(info.nbytes)
        earlier = list(pending)

        def finish() -> None:
            for fut in earlier:  # run before this one, in order: a failed write fails the file
                fut.result()
            writer.patch_header(placeholder, digest.result())
            writer.close()
            os.close(fd)

        done = submit(finish)
    except BaseException:
        writes.shutdown(wait=True, cancel_futures=True)  # no write may touch the file after abort
        writer.abort()
        os.close(fd)
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
    writes.shutdown(wait=False)  # its thread finishes the queued writes and finish(), then ends
    return done


def _provenance(params: dict[str, Any], adapters: list[Adapter], base_file: Path) -> tuple[dict[str, str], str]:
    """Metadata for one output file; the base file's sha256 is a placeholder patched after streaming."""
    from loratool.formats import provenance

    placeholder = secrets.token_hex(32)
    meta = provenance("merge", params, [f for a in adapters for f in a.files], hashes={str(base_file): placeholder})
    return meta, placeholder


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
    progress: Progress | None = None,
) -> MergeReport:
    """Merge adapters into a base checkpoint and write a complete copy of it.

    Args:
        base: a .safetensors file, a directory with model.safetensors, or a sharded directory.
        adapters: one or more adapter paths (any supported format).
        weights: one per adapter (default 1.0 each); negative allowed.
        dtype: keep | fp32 | fp16 | bf16 for floating tensors of the output.
        device: auto | cpu | cuda | cuda:N (auto: cuda when available).
        unmerge: subtract the deltas instead (refused for DoRA and modules_to_save).
        allow_unmatched: skip modules that match no base weight (with a warning) instead of failing.
        stats: measure per merged tensor the delta norm, relative change and max cast error
            (report.tensors; costs three passes over each merged tensor).
        progress: called with (bytes done, bytes total).

    Raises:
        IncompatibleError, FormatError, OutputExistsError, LoratoolError (disk full).
    """
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
    base_path = Path(base)
    ckpt = open_checkpoint(base_path)
    # the base's sha256 starts now, while torch is imported and the adapters are read (a core is
    # idle then), and later stays at most 1 GiB ahead of the merge, so the disk is read once
    sha256 = BackgroundSha256(list(ckpt.files), lead=1 << 30)
    try:
        return _merge(ckpt, sha256, base_path, adapters, out, weights, dtype=dtype, device=device, unmerge=unmerge,
                      allow_unmatched=allow_unmatched, force=force, allow_pickle=allow_pickle, stats=stats,
                      progress=progress)
    finally:
        sha256.stop()


def _merge(
    ckpt: Checkpoint, sha256: BackgroundSha256, base_path: Path, adapters: list[str | os.PathLike[str]],
    out: str | os.PathLike[str], weights: list[float], *, dtype: str, device: str, unmerge: bool,
    allow_unmatched: bool, force: bool, allow_pickle: bool, stats: bool, progress: Progress | None,
) -> MergeReport:
    from loratool.device import resolve_device
    from loratool.formats import read, require_plain
    from loratool.st import atomic_output, read_header

    device = resolve_device(device)
    loaded = []
    for p in adapters:
        a = read(Path(p), allow_pickle=allow_pickle)
        require_plain(a, "merge")
        loaded.append(a)
    plan, warnings = plan_merge(loaded, weights, ckpt, allow_unmatched=allow_unmatched, unmerge=unmerge)
    report = MergeReport(Path(out), base_path, [Path(p) for p in adapters], weights, unmerge, dtype, device,
                         unmatched=plan.unmatched, warnings=warnings)
    if not plan.deltas and not plan.replacements:
        raise IncompatibleError(f"nothing to merge: no adapter module matches {base_path}",
                                hint="check with: loratool validate ADAPTER --base BASE")
    single_file = base_path.is_file()
    params = {"weights": weights, "dtype": dtype, "unmerge": unmerge, "allow_unmatched": allow_unmatched}
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
        buffers = _Buffers()
        finishing: list[Future[None]] = []
        try:
            for src, digest in zip(headers, sha256.digests):
                sha256.advance(src.size - sum(i.nbytes for i in src.tensors.values()))  # header: not ticked
                dst = tmp if single_file else tmp / src.path.relative_to(ckpt.root)
                dst.parent.mkdir(parents=True, exist_ok=True)
                meta, placeholder = _provenance(params, loaded, src.path)
                meta = {**src.metadata, **meta}
                name = Path(out).name if single_file else str(src.path.relative_to(ckpt.root))
                finishing.append(_stream_file(src, dst, plan, report, meta, placeholder, name=name, device=device,
                                              dtype=dtype, unmerge=unmerge, stats=stats, tick=tick, digest=digest,
                                              buffers=buffers))
            for fut in finishing:
                fut.result()
        except BaseException:
            wait(finishing)  # an earlier file may still be finishing: let it end before tmp is removed
            raise
        if not single_file:
            _copy_other_files(ckpt, tmp, dtype_changed=dtype != "keep")
        # re-open what was written before it is moved into place
        for src in headers:
            dst = tmp if single_file else tmp / src.path.relative_to(ckpt.root)
            written = read_header(dst)
            if list(written.tensors) != list(src.tensors) or any(
                written.tensors[k].shape != i.shape for k, i in src.tensors.items()
            ):
                raise IncompatibleError(f"{dst}: written file does not mirror {src.path}")
        report.files = len(headers)
        report.size = sum(f.stat().st_size for f in (tmp.rglob("*") if not single_file else [tmp]) if f.is_file())
    return report


def _copy_other_files(ckpt: Checkpoint, tmp: Path, *, dtype_changed: bool) -> None:
    """Copy every non-weight file (config, tokenizer, ...) and rewrite the index's total_size.

    Hidden entries (.git, .cache) stay behind. Symbolic links are followed (a Hugging Face cache
    snapshot is made of them); a file that cannot be read, a special file, a broken link or a loop
    fails the merge, naming it, rather than leaving an incomplete copy.
    """
    from loratool.st import copy_tree_files

    weight_files = {os.path.realpath(f) for f in ckpt.files} | {os.path.abspath(f) for f in ckpt.files}
    for src, rel in copy_tree_files(ckpt.root):
        if os.path.abspath(src) in weight_files:
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if re.search(r"\.safetensors\.index\.json$", src.name) and ckpt.index is not None and src.parent == ckpt.root:
            index = dict(ckpt.index)
            if dtype_changed:
                from loratool.st import read_header

                total = 0
                for f in ckpt.files:
                    total += sum(i.nbytes for i in read_header(tmp / f.relative_to(ckpt.root)).tensors.values())
                index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
            dst.write_text(json.dumps(index, indent=2) + "\n")
        else:
            copy_input_file(src, dst)
