"""A GGUF file's bytes, read safely: the header scanned first (every count, length and string checked
against the file's size before the gguf package reads it), then the gguf package's reader, and each
tensor as a lazy ref (dequantized to float32 on load when quantized). The GGUF adapter format
(formats/gguf.py), the container sniffing (formats/_common.py) and merge into a GGUF base all read
GGUF files through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loratool.errors import FormatError, optional_module
from loratool.formats.tensorfile import TensorFile
from loratool.io.tensors import TensorRef


def _gguf() -> Any:
    """The gguf package, imported lazily; a clear error when it is not installed."""
    return optional_module("gguf", needed_by="GGUF", extra="gguf")


# ---------------------------------------------------------------------------------------------
# reading

# GGUF value types (gguf.GGUFValueType) -> bytes of one value; 8: string (u64 length + bytes), 9: array
_VALUE_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 8
_HEADER_SCAN_LIMIT = 1 << 30  # the key-values and tensor infos of a real model are a few MB


class _Scan:
    """A bounds-checked walk over a GGUF file's key-values and tensor infos: every count and length
    is checked against the bytes that remain before anything is read or allocated, so an absurd count
    (2^60 array elements) is refused at once instead of looped over."""

    def __init__(self, path: Path, data: bytes, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: not a readable GGUF file ({what} at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            if self.pos + n > self.size:
                raise self.fail(f"{what} of {n:,} bytes runs past the end of the {self.size:,}-byte file")
            raise self.fail(f"{what} of {n:,} bytes: key-values beyond {_HEADER_SCAN_LIMIT:,} bytes")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "little")

    def string(self, what: str) -> str:
        raw = self.take(self.uint(8, f"{what} length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> None:
        if vtype == _STRING:
            self.string(f"string value of '{key}'")
        elif vtype == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise self.fail(f"'{key}': arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            etype = self.uint(4, f"array type of '{key}'")
            count = self.uint(8, f"array length of '{key}'")
            least = _VALUE_SIZE.get(etype, 8)  # a string or an array takes 8 bytes at least
            if count * least > len(self.data) - self.pos:
                raise self.fail(f"'{key}' claims {count:,} array elements, more than the file can hold")
            if etype in _VALUE_SIZE:
                self.take(count * _VALUE_SIZE[etype], f"array '{key}'")
            elif etype in (_STRING, _ARRAY):
                for _ in range(count):
                    self.value(etype, key, depth + 1)
            else:
                raise self.fail(f"'{key}' has an unknown array element type {etype}")
        elif vtype in _VALUE_SIZE:
            self.take(_VALUE_SIZE[vtype], f"value of '{key}'")
        else:
            raise self.fail(f"'{key}' has an unknown value type {vtype}")


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's key-values and tensor infos with every count bounded by the file (see
    _Scan), before the gguf package reads it (it trusts the counts and text).

    Raises:
        FormatError: naming the file, the key and the byte.
    """
    from loratool.io.header import open_input

    try:
        with open_input(path) as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(min(size, _HEADER_SCAN_LIMIT))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    s = _Scan(path, data, size)
    if s.take(4, "magic") != b"GGUF":
        raise s.fail("no GGUF magic")
    version = s.uint(4, "version")
    if version not in (2, 3):
        raise s.fail(f"version {version}; loratool reads GGUF versions 2 and 3")
    n_tensors = s.uint(8, "tensor count")
    n_kv = s.uint(8, "key-value count")
    if n_kv * 13 > size or n_tensors * 24 > size:  # the smallest key-value / tensor info
        raise s.fail(f"{n_kv:,} key-values and {n_tensors:,} tensors claimed by a {size:,}-byte file")
    for _ in range(n_kv):
        key = s.string("key")
        s.value(s.uint(4, f"type of '{key}'"), key)
    for _ in range(n_tensors):
        name = s.string("tensor name")
        n_dims = s.uint(4, f"dimension count of '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise s.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {_MAX_DIMS})")
        dims = [s.uint(8, f"shape of '{name}'") for _ in range(n_dims)]
        if any(d <= 0 or d >= 1 << 62 for d in dims):
            raise s.fail(f"tensor '{name}' has shape {dims}")
        s.take(12, f"type and offset of '{name}'")


def gguf_reader(path: Path) -> Any:
    """gguf.GGUFReader over a file check_gguf accepted; its errors are FormatErrors naming the file."""
    gguf = _gguf()
    check_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf's reader raises many types (struct, numpy, enum) on a corrupt file
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def open_gguf(path: Path) -> TensorFile:
    """A GGUF file's tensors (numpy order, dequantized to float32 when quantized) and its string-able
    key-values as metadata.

    Raises:
        FormatError: not a readable GGUF file.
    """

    gguf = _gguf()
    reader = gguf_reader(path)
    metadata: dict[str, str] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.contents()
        metadata[name] = str(value)
    tensors: dict[str, TensorRef] = {}
    for t in reader.tensors:
        if _plain_dtype(t.tensor_type, gguf) is None and not _can_dequantize(t.tensor_type, gguf):
            kind = getattr(t.tensor_type, "name", str(t.tensor_type))
            raise FormatError(f"{path}: tensor '{t.name}' is {kind}, neither floating-point nor a quantized type "
                              "loratool can dequantize", hint="LoRA factors are stored as F32, F16 or quantized")
        tensors[t.name] = GGUFTensorRef(path, t, gguf)
    return TensorFile(path, tensors, metadata)


def _plain_dtype(qtype: Any, gguf: Any) -> str | None:
    """The torch dtype name of an unquantized float GGML type (read as is), else None."""
    for name, dtype in (("F32", "float32"), ("F16", "float16"), ("F64", "float64")):
        if qtype == getattr(gguf.GGMLQuantizationType, name, None):
            return dtype
    return None


def _can_dequantize(qtype: Any, gguf: Any) -> bool:
    traits = getattr(gguf.quants, "_type_traits", None)  # the types gguf.quants.dequantize implements
    return traits is None or qtype in traits


class GGUFTensorRef(TensorRef):
    """A GGUF tensor: shape (numpy order) known at once; bytes read, and dequantized to float32 when
    quantized, on load()."""

    __slots__ = ("_gguf", "_path", "_tensor")

    def __init__(self, path: Path, tensor: Any, gguf: Any) -> None:
        dtype = _plain_dtype(tensor.tensor_type, gguf)
        super().__init__(tuple(int(d) for d in reversed(tensor.shape.tolist())), dtype or "float32", None, None)
        self._path, self._tensor, self._gguf = path, tensor, gguf

    @property
    def source(self) -> str:
        return f"{self._path}: '{self._tensor.name}'"

    def load(self) -> Any:
        import numpy as np
        import torch

        t = self._tensor
        if _plain_dtype(t.tensor_type, self._gguf) is not None:
            data = np.array(t.data)  # a copy: the reader's memmap is read-only
        else:
            data = self._gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(data).reshape(self.shape))
