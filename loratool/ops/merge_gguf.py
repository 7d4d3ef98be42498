"""merge into a GGUF base (llama.cpp / Ollama model files), through the gguf package.

Each adapted tensor is dequantized with the gguf package, the deltas are added in float32, and the
result is written in the tensor's own type where the package can quantize to it; when it cannot (the
k-quants, i-quants, ...), the merge is refused before anything is written unless `dtype` names an
output type (F32, F16 or BF16) for the adapted tensors. Every other tensor and every key-value is
copied as it is. The tensors are streamed: one is in memory at a time.

Adapters in transformers naming are laid out for the base first (formats.gguf_layout: the gguf
package's tensor-name map for the base's architecture, llama's q/k row permutation), so their
deltas land on the rows llama.cpp stores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter
from loratool.errors import IncompatibleError
from loratool.ops.merge_report import MergeReport, Progress, TensorStat

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


def _can_quantize(gguf: Any, qtype: Any) -> bool:
    import numpy as np

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except Exception:  # NotImplementedError, gguf.quants.QuantError (k-quants need whole super-blocks), ...
        return False
    return True


def _encode(gguf: Any, values: Any, qtype: Any) -> Any:
    """float32 values (numpy order) as the raw array add_tensor / write_tensor_data expect for qtype."""
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def _decode(gguf: Any, t: Any) -> Any:
    import numpy as np

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.array(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


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
    import torch

    from loratool.formats import gguf_layout, read, require_plain
    from loratool.formats.gguf_file import _gguf, gguf_reader
    from loratool.io.outputs import atomic_output
    from loratool.maths.delta import delta as module_delta

    gguf = _gguf()
    if dtype != "keep" and dtype not in GGUF_DTYPES:
        raise IncompatibleError(f"--dtype {dtype}: not a GGUF type", hint="use fp32, fp16 or bf16 (or keep)")
    reader = gguf_reader(base)
    kind = reader.fields.get("general.type")
    if kind is not None and kind.contents() == "adapter":
        raise IncompatibleError(f"{base}: is a GGUF adapter, not a model to merge into")
    tensors = {t.name: t for t in reader.tensors}
    report = MergeReport(Path(out), base, list(adapters), weights, False, dtype, "cpu")
    # module deltas per base tensor name
    plan: dict[str, list[tuple[Adapter, str, float]]] = {}
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
            plan.setdefault(key, []).append((a, name, w))
    if unmatched and not allow_unmatched:
        raise IncompatibleError(f"{adapters[0]}: {len(unmatched)} module(s) match no tensor of {base}: "
                                f"{', '.join(unmatched[:6])}", hint="pass --allow-unmatched to skip them")
    report.unmatched = unmatched
    if not plan:
        raise IncompatibleError(f"nothing to merge: no adapter module matches {base}")
    out_type = {}
    for key in plan:
        qtype = tensors[key].tensor_type
        if dtype != "keep":
            qtype = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype]]
        if not _can_quantize(gguf, qtype):
            raise IncompatibleError(
                f"{base}: '{key}' is {qtype.name}, which the gguf package cannot quantize to",
                hint="pass --dtype fp16 (or fp32, bf16) to write the merged tensors in that type; the others keep "
                "theirs",
            )
        out_type[key] = qtype
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    total = sum(int(t.n_bytes) for t in reader.tensors)
    done = 0
    with atomic_output(Path(out), force=force, directory=False, inputs=[base, *adapters]) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_fields(gguf, reader, writer)
        for t in reader.tensors:  # infos first: sizes follow from shape and type, no data needed yet
            qtype = out_type.get(t.name, t.tensor_type)
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
        for t in reader.tensors:  # then the data, one tensor in memory at a time
            if t.name not in plan:
                writer.write_tensor_data(t.data)
                report.copied += 1
            else:
                w = _decode(gguf, t)
                acc = np.zeros_like(w, dtype=np.float32)
                for a, name, weight in plan[t.name]:
                    acc += weight * module_delta(a.modules[name], dtype=torch.float32).numpy()
                new = w + acc
                if not np.isfinite(new).all():
                    raise IncompatibleError(f"{base}: merging into '{t.name}' gives NaN or Inf")
                qtype = out_type[t.name]
                data = _encode(gguf, new, qtype)
                if stats:
                    back = _decode_raw(gguf, data, qtype, new.shape)
                    report.tensors.append(TensorStat(
                        t.name, Path(out).name, sorted({n for _, n, _ in plan[t.name]}),
                        float(np.linalg.norm(acc)),
                        float(np.linalg.norm(back - w)) / max(float(np.linalg.norm(w)), 1e-30),
                        float(np.abs(back - new).max()) if new.size else 0.0))
                writer.write_tensor_data(data)
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


def _decode_raw(gguf: Any, data: Any, qtype: Any, shape: tuple[int, ...]) -> Any:
    import numpy as np

    if qtype in _PLAIN(gguf):
        return data.astype(np.float32).reshape(shape)
    return gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(shape)

