"""Lazy tensors: TensorRef and the reads that turn one header entry into bytes, a tensor or a scalar.

A TensorRef is a tensor that has not been read yet (its TensorInfo) or one already in memory; shape
and dtype come from the header, and the bytes are read only when the tensor is loaded. read_bytes is
the one place a tensor's bytes are read from an input, so an input that cannot be read fails here
with the file and the tensor key named.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loratool.errors import FormatError
from loratool.io.header import ITEMSIZE, TensorInfo

if TYPE_CHECKING:
    import torch


def read_bytes(info: TensorInfo) -> bytes:
    try:
        with open(info.path, "rb") as f:
            f.seek(info.start)
            data = f.read(info.nbytes)
    except OSError as e:  # an input that cannot be read is the input's problem, not the output's
        reason = (e.strerror or type(e).__name__).lower()
        raise FormatError(f"{info.path}: tensor '{info.key}': cannot be read ({reason})") from None
    if len(data) != info.nbytes:
        raise FormatError(f"{info.path}: tensor '{info.key}': file ended early (truncated?)")
    return data


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor."""
    import torch

    dtype = getattr(torch, info.dtype)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buf = bytearray(read_bytes(info))
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def _bf16_to_float(raw: bytes) -> float:
    (bits,) = struct.unpack("<H", raw)
    return float(struct.unpack("<f", struct.pack("<I", bits << 16))[0])


_SCALAR_DECODERS = {
    "float64": lambda b: float(struct.unpack("<d", b)[0]),
    "float32": lambda b: float(struct.unpack("<f", b)[0]),
    "float16": lambda b: float(struct.unpack("<e", b)[0]),
    "bfloat16": _bf16_to_float,
    "int64": lambda b: float(struct.unpack("<q", b)[0]),
    "int32": lambda b: float(struct.unpack("<i", b)[0]),
}


def read_scalar(info: TensorInfo) -> float:
    """Read a one-element tensor (e.g. a kohya .alpha) as a float without importing torch."""
    if math.prod(info.shape) != 1 or info.dtype not in _SCALAR_DECODERS:
        raise FormatError(
            f"{info.path}: tensor '{info.key}': expected a single number, got dtype {info.dtype} "
            f"shape {info.shape}"
        )
    return _SCALAR_DECODERS[info.dtype](read_bytes(info))


class TensorRef:
    """A lazy tensor: shape and dtype known up front, bytes read on load().

    Either backed by a safetensors entry (nothing read until load), by an in-memory tensor, or
    computed on load from other lazy tensors (`computed`: e.g. a weight with a LoRA folded in).
    """

    __slots__ = ("_fn", "_info", "_source", "_value", "dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: str, info: TensorInfo | None, value: Any,
                 fn: Callable[[], torch.Tensor] | None = None, source: str | None = None) -> None:
        self.shape = shape
        self.dtype = dtype
        self._info = info
        self._value = value
        self._fn = fn
        self._source = source

    @classmethod
    def from_info(cls, info: TensorInfo) -> TensorRef:
        return cls(info.shape, info.dtype, info, None)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> TensorRef:
        return cls(tuple(t.shape), str(t.dtype).removeprefix("torch."), None, t)

    @classmethod
    def computed(cls, shape: tuple[int, ...], dtype: str, fn: Callable[[], torch.Tensor], source: str) -> TensorRef:
        """A tensor made by `fn` when loaded (each time: nothing is cached), of the given shape and
        dtype; `source` names where it comes from in messages."""
        return cls(tuple(shape), dtype, None, None, fn, source)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def file(self) -> str:
        """The file it is read from, for error messages."""
        return str(self._info.path) if self._info else (self._source or "<memory>")

    @property
    def source(self) -> str:
        """'file:key' for file-backed tensors, for error messages."""
        return f"{self._info.path}: '{self._info.key}'" if self._info else (self._source or "<memory>")

    def load(self) -> torch.Tensor:
        """The tensor, in its stored dtype, on the CPU."""
        if self._info is not None:
            return load_tensor(self._info)
        if self._fn is not None:
            return self._fn()
        return self._value

    def scalar(self) -> float:
        if self._info is not None:
            return read_scalar(self._info)
        value = self.load()
        if value.numel() != 1:
            raise FormatError(f"expected a single number, got shape {self.shape}")
        return float(value.reshape(()).float().item())
