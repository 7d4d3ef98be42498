"""merge into a GGUF base (llama.cpp / Ollama model files, and the image-model GGUF files such as
city96's FLUX / Wan / Qwen-Image ones), read and written through the gguf package.

Each adapted tensor goes through its storage descriptor (storage.gguf_storage: F32, F16, BF16, the
legacy quants and the K-quants), like a quantized safetensors base: dequantized, the deltas added in
float32, and requantized in its own GGML type as ggml's reference quantizer does (maths/ggml.py), or
written as F32 / F16 / BF16 when `dtype` names one. A type without a descriptor (the i-quants, ...)
is refused by name before anything is written. Every other tensor and every key-value is copied as
it is. An adapted tensor is processed a block of whole rows at a time, straight into the output, so
memory is bounded by a block, not by a float32 copy of the tensor.

Adapters in transformers naming are laid out for the base first (formats.gguf_layout: the gguf
package's tensor-name map for the base's architecture, llama's q/k row permutation), so their
deltas land on the rows llama.cpp stores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import IncompatibleError
from loratool.maths.merge import realized_delta
from loratool.ops.merge_report import MergeReport, Progress, TensorStat
from loratool.storage import GGUF_FLOATS, Storage, dequantize, gguf_storage, requantize

# loratool's --dtype names -> GGML types for the adapted tensors
GGUF_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def is_gguf(path: Path) -> bool:
    from loratool.errors import LoratoolError
    from loratool.io.header import open_input

    try:
        with open_input(path) as f:  # a FIFO is refused, not waited on
            return f.read(4) == b"GGUF"
    except (OSError, LoratoolError):
        return False


# values per row block of an adapted tensor (float32: 4 MiB per working copy)
BLOCK_ELEMENTS = 1 << 20


def _copy_fields(gguf: Any, reader: Any, writer: Any) -> None:
    """Every key-value of the base, as it is (the writer adds general.architecture itself)."""
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def merge_into_gguf(
    base: Path,
    adapters: list[Path],
    out: str | os.PathLike[str],
    *,
    weights: list[float],
    dtype: str = "keep",
    force: bool = False,
    allow_pickle: bool = False,
    allow_unmatched: bool = False,
    stats: bool = False,
    progress: Progress | None = None,
    allow_variant: bool = False,
) -> MergeReport:
    """Merge adapters into a GGUF model file and write a complete copy of it.

    Raises:
        IncompatibleError: unmatched or shape-mismatched modules, DoRA or modules_to_save (a GGUF base
            has no place for their conventions here), a quantization type the gguf package cannot
            write without --dtype, unmerge; FormatError, OutputExistsError.
    """
    import numpy as np

    from loratool.formats import gguf_layout, read, require_plain
    from loratool.formats.gguf_file import _gguf, gguf_reader
    from loratool.io.header import open_input
    from loratool.io.outputs import atomic_output

    gguf = _gguf()
    if dtype != "keep" and dtype not in GGUF_DTYPES:
        raise IncompatibleError(f"--dtype {dtype}: not a GGUF type", hint="use fp32, fp16 or bf16 (or keep)")
    reader = gguf_reader(base)
    kind = reader.fields.get("general.type")
    if kind is not None and kind.contents() == "adapter":
        raise IncompatibleError(f"{base}: is a GGUF adapter, not a model to merge into")
    tensors = {t.name: t for t in reader.tensors}
    report = MergeReport(Path(out), base, list(adapters), weights, False, dtype, "cpu")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    # an architecture the gguf package names tensors for (llama, qwen2, ...) gets its layout; the others
    # (city96's flux, wan, qwen_image, ... files) hold the model's own tensor names, matched like a
    # safetensors base's keys (keymap, with the family's fused <-> split relations)
    llm = arch in gguf.MODEL_ARCH_NAMES.values()
    # module deltas per base tensor name: (module, weight, its rows of a fused tensor or None)
    plan: dict[str, list[tuple[LoraModule, float, tuple[int, int] | None]]] = {}
    unmatched: list[str] = []
    for path, w in zip(adapters, weights):
        a = read(path, allow_pickle=allow_pickle)
        require_plain(a, "merge into a GGUF base")
        from loratool.variants import guard

        report.warnings += guard(a, "merge", allow_variant)  # PiSSA, aLoRA, ...: refused unless allowed
        if any(m.magnitude is not None for m in a.modules.values()):
            raise IncompatibleError(f"{path}: DoRA adapters are not merged into GGUF bases",
                                    hint=f"loratool convert {path} --to peft --dora-to-lora HF_BASE -o PLAIN first")
        if [k for k in a.extras if ".base_layer." not in k]:
            raise IncompatibleError(f"{path}: modules_to_save tensors are not merged into GGUF bases")
        if not llm and a.source_format != "gguf":
            for key, m, span in _match_image_model(path, base, a, tensors, unmatched):
                plan.setdefault(key, []).append((m, w, span))
            continue
        if a.source_format != "gguf":
            a = gguf_layout(a, base)  # refuses modules the base has no tensor for, by name
        for name, m in a.modules.items():
            key = name + ".weight"
            t = tensors.get(key)
            if t is None:
                unmatched.append(name)
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if shape != tuple(m.base_shape):
                raise IncompatibleError(f"{path}: module '{name}' needs a base weight of shape {m.base_shape} but "
                                        f"{base}: '{key}' is {shape}")
            plan.setdefault(key, []).append((m, w, None))
    if unmatched and not allow_unmatched:
        raise IncompatibleError(f"{adapters[0]}: {len(unmatched)} module(s) match no tensor of {base}: "
                                f"{', '.join(unmatched[:6])}", hint="pass --allow-unmatched to skip them")
    report.unmatched = unmatched
    if not plan:
        raise IncompatibleError(f"nothing to merge: no adapter module matches {base}")
    stores: dict[str, tuple[Storage, Storage]] = {}  # key -> (as the base stores it, as the output will)
    for key in plan:
        t = tensors[key]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        src = gguf_storage(key, t.tensor_type.name, shape)
        if not src.supported:
            raise IncompatibleError(
                f"{base}: '{key}' is {src.dtype}, a GGUF type loratool cannot dequantize and requantize",
                hint="merge into a GGUF base in F16, BF16, Q8_0, a legacy quant (Q4_0..Q5_1) or a K-quant "
                "(Q2_K..Q6_K), or into the safetensors base, then quantize the merged model with llama.cpp")
        stores[key] = (src, src if dtype == "keep" else gguf_storage(key, GGUF_DTYPES[dtype], shape))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    done = 0
    with atomic_output(Path(out), force=force, directory=False, inputs=[base, *adapters]) as tmp, \
            open_input(base) as data:  # tensor bytes are read, not touched through the reader's map
        fd = data.fileno()
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_fields(gguf, reader, writer)
        for t in reader.tensors:  # infos first: sizes follow from shape and type, no data needed yet
            qtype = gguf.GGMLQuantizationType[stores[t.name][1].dtype] if t.name in stores else t.tensor_type
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if qtype in _PLAIN(gguf):
                np_dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                itemsize = np.dtype(np_dtype).itemsize
                writer.add_tensor_info(t.name, shape, np.dtype(np_dtype), math.prod(shape) * itemsize)
            else:
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                writer.add_tensor_info(t.name, gguf.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8),
                                       math.prod(shape) // block * size, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:  # then the data, one tensor at a time, an adapted one a row block at a time
            if t.name not in plan:
                writer.write_tensor_data(_Copied(fd, t))  # duck-typed: the writer asks nbytes, then tofile()
                report.copied += 1
            else:
                src, dst = stores[t.name]
                rows = _MergedRows(base, fd, t, src, dst, plan[t.name])
                writer.write_tensor_data(rows)
                if stats:
                    report.tensors.append(rows.stat(Path(out).name, sorted({m.name for m, _, _ in plan[t.name]})))
                report.merged += 1
            done += int(t.n_bytes)
            if progress:
                progress(done, total)
        writer.close()
    report.files = 1
    report.size = Path(out).stat().st_size
    return report


def _PLAIN(gguf: Any) -> tuple[Any, ...]:
    return (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


# bytes per read of a copied tensor
COPY_CHUNK = 16 << 20


class _Copied:
    """A tensor copied as it is stored, as GGUFWriter.write_tensor_data takes an array (nbytes, tofile),
    read from the base a chunk at a time: a memory-mapped copy would keep every page of the base
    resident in this process."""

    def __init__(self, fd: int, t: Any):
        self.fd, self.start, self.nbytes = fd, int(t.data_offset), int(t.n_bytes)

    def tofile(self, fp: Any) -> None:
        from loratool.pipeline import read_range

        buf = bytearray(min(COPY_CHUNK, self.nbytes))
        for off in range(0, self.nbytes, COPY_CHUNK):
            fp.write(read_range(self.fd, self.start + off, min(COPY_CHUNK, self.nbytes - off), buf))


class _MergedRows:
    """One adapted tensor's merged data, as GGUFWriter.write_tensor_data takes an array (nbytes, tofile),
    computed a block of whole rows at a time: dequantize the stored rows (src), add each module's rows of
    ΔW in float32, requantize (dst), write; the realized delta is summed as it goes."""

    def __init__(self, base: Path, fd: int, t: Any, src: Storage, dst: Storage,
                 terms: list[tuple[LoraModule, float, tuple[int, int] | None]]):
        self.base, self.fd, self.t, self.src, self.dst, self.terms = base, fd, t, src, dst, terms
        rows_out = math.prod(dst.shape[:-1])
        self.nbytes = int(t.n_bytes) if dst is src else _row_bytes(dst) * rows_out
        self.dd = self.de = self.ee = self.wn = self.worst = 0.0

    def tofile(self, fp: Any) -> None:
        import numpy as np
        import torch

        from loratool.maths.delta import delta, delta_rows, factors
        from loratool.pipeline import read_range

        shape = self.src.shape
        cols = shape[-1]
        nrows = math.prod(shape[:-1])
        row_bytes = int(self.t.n_bytes) // nrows
        stored_dtype = {"F32": np.float32, "F16": np.float16}.get(self.src.dtype, np.uint8)  # BF16: raw bytes
        lowrank = []  # (up, down, scale · weight, transposed, first row) of the modules delta_rows forms
        dense = []  # (weight · ΔW (rows, cols), first row) of the others (conv, 3-D weights)
        for m, weight, span in self.terms:
            first = span[0] if span else 0  # a part's rows of a fused weight (families/layout.py)
            if len(shape) == 2 and m.kind != "conv":
                up, down = factors(m, dtype=torch.float32)
                lowrank.append((up, down, m.scale * weight, m.kind == "embedding" or m.fan_in_fan_out, first))
            else:
                d = delta(m, dtype=torch.float32)
                dense.append((d.reshape(-1, cols) * weight, first))
        step = max(1, BLOCK_ELEMENTS // max(cols, 1))
        for start in range(0, nrows, step):
            stop = min(nrows, start + step)
            raw = read_range(self.fd, int(self.t.data_offset) + start * row_bytes, (stop - start) * row_bytes)
            w = dequantize(self.src, torch.from_numpy(np.frombuffer(raw, dtype=stored_dtype).reshape(stop - start, -1)),
                           _no_siblings)
            new = w.clone()
            for up, down, scale, transposed, first in lowrank:
                n = down.shape[1] if transposed else up.shape[0]  # the module's rows of W
                lo, hi = max(start, first), min(stop, first + n)
                if lo < hi:
                    new[lo - start:hi - start] += delta_rows(up, down, scale, lo - first, hi - first,
                                                             transposed=transposed)
            for d, first in dense:
                lo, hi = max(start, first), min(stop, first + d.shape[0])
                if lo < hi:
                    new[lo - start:hi - start] += d[lo - first:hi - first]
            if not bool(torch.isfinite(new).all()):
                raise IncompatibleError(f"{self.base}: merging into '{self.t.name}' gives NaN or Inf "
                                        f"(rows {start}..{stop - 1})")
            outs, back = requantize(self.dst, new, _no_siblings)
            stored = outs[self.dst.key]
            fp.write(stored.contiguous().view(torch.uint8).numpy().tobytes())
            self.wn += float(torch.dot(w.view(-1), w.view(-1)))
            dd, de, ee, worst = realized_delta(w, new, back)
            self.dd, self.de, self.ee = self.dd + dd * dd, self.de + de, self.ee + ee * ee
            self.worst = max(self.worst, worst)

    def stat(self, file: str, modules: list[str]) -> TensorStat:
        dd = self.dd
        return TensorStat(self.t.name, file, modules, math.sqrt(dd), math.sqrt(dd) / max(math.sqrt(self.wn), 1e-30),
                          self.worst, self.de / dd if dd > 0 else None,
                          math.sqrt(self.ee) / math.sqrt(dd) if dd > 0 else None,
                          f"gguf {self.src.dtype}" + (f" -> {self.dst.dtype}" if self.dst is not self.src else ""))


def _row_bytes(s: Storage) -> int:
    from loratool.maths.ggml import GGML_BLOCKS

    cols = s.shape[-1]
    if s.dtype in GGUF_FLOATS:
        return cols * {"F32": 4, "F16": 2, "BF16": 2}[s.dtype]
    values, size = GGML_BLOCKS[s.dtype]
    return cols // values * size


def _no_siblings(key: str) -> Any:
    raise AssertionError(f"a GGUF tensor has no sibling tensors ({key})")  # pragma: no cover


def _match_image_model(path: Path, base: Path, adapter: Adapter, tensors: dict[str, Any], unmatched: list[str]
                       ) -> list[tuple[str, LoraModule, tuple[int, int] | None]]:
    """(tensor name, module, rows of a fused tensor or None) for each module of an adapter merged into an
    image-model GGUF, matched by keymap against the tensors' names and logical shapes as a safetensors
    base is; unmatched modules are added to `unmatched`, mismatches and ambiguities refused."""
    from loratool.io.header import TensorInfo
    from loratool.keymap import match_to_base

    infos = {name: TensorInfo(name, "float32", tuple(int(d) for d in reversed(t.shape.tolist())), base, 0, 0)
             for name, t in tensors.items()}
    match, targets, layout = match_to_base(list(adapter.modules.values()), infos, where=base)
    if layout is not None and layout.refused is not None:
        raise layout.refused
    if match.ambiguous:
        name, keys = next(iter(match.ambiguous.items()))
        raise IncompatibleError(f"{path}: module '{name}' matches several tensors of {base}: {', '.join(keys[:4])}")
    if match.shape_mismatch:
        name, key, want, got = match.shape_mismatch[0]
        raise IncompatibleError(f"{path}: module '{name}' needs a base weight of shape {tuple(want)} but "
                                f"{base}: '{key}' is {tuple(got)}")
    unmatched += match.unmatched
    out = []
    for _, m, key, rows in targets:
        if not isinstance(m, LoraModule):
            raise IncompatibleError(f"{path}: '{m.name}' is a LyCORIS module, not merged into GGUF bases")
        out.append((key, m, rows))
    return out
