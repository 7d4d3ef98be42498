"""safetensors headers: the dtype table, TensorInfo, and header-only reads checked against the file size.

The header is parsed in pure Python (no torch import) and checked against the file size, so a corrupt
or truncated file fails here with one clean FormatError that names the file and the tensor key, before
any tensor is read. Format: 8 bytes little-endian header length N, N bytes of JSON header, then raw
little-endian tensor bytes; each header entry gives dtype, shape and [begin, end) offsets into the data
section. open_input and read_side_file are the guarded opens every input goes through: a regular file
only, and a side file (a config, an index, a model card) no larger than a header may be.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from loratool.errors import FormatError

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
CODE_OF: dict[str, str] = {name: code for code, (name, _) in DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: size for name, size in DTYPES.values()}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
# A side file (config.json, adapter_config.json, an index, a model card) is metadata like a header:
# the same bound, so no input makes loratool read more than this into memory as text.
MAX_SIDE_FILE_BYTES = MAX_HEADER_BYTES
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (absolute byte offsets)."""

    key: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsFile:
    """A parsed, size-checked safetensors header. Reads no tensor bytes."""

    path: Path
    tensors: dict[str, TensorInfo]  # in header order
    metadata: dict[str, str]
    size: int
    header_len: int


def read_header(path: str | os.PathLike[str], *, problems: list[str] | None = None) -> SafetensorsFile:
    """Parse and check the header of a safetensors file.

    The checks are those of the safetensors library: besides well-formed entries that fit the file,
    the tensors' data must tile the data section exactly (no overlap, no gap, no trailing bytes) and
    no key may appear twice. Files that break these rules are refused by every reader that follows
    the format, so loratool refuses them too.

    Args:
        problems: when given (validate), layout problems (overlap, gap, trailing bytes, duplicate
            keys) are appended here instead of raised; malformed entries always raise.

    Raises:
        FormatError: the file is missing, too small, its header is not JSON, an entry is malformed
            or points outside the file (truncated data), or (without `problems`) a layout problem.
    """
    p = Path(path)
    try:
        with open_input(p) as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FormatError(
                    f"{p}: not a safetensors file ({size} bytes; the header length alone takes 8)"
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if (n > size - 8 or n > MAX_HEADER_BYTES) and f.read(1) not in (b"{", b""):  # a text file, an image
                raise FormatError(f"{p}: not a safetensors file (it does not begin with a safetensors header)",
                                  hint="adapters are .safetensors files or PEFT adapter folders")
            if n > size - 8:
                raise FormatError(
                    f"{p}: header length {n} exceeds the file size {size} (truncated or not safetensors)"
                )
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{p}: header length {n} is implausibly large")
            raw = f.read(n)
    except FileNotFoundError:
        raise FormatError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{p}: is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise FormatError(f"{p}: permission denied") from None
    except OSError as e:
        raise FormatError(f"{p}: cannot read ({_strerror(e)})") from None
    duplicates: list[str] = []
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs_recording(duplicates))
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integer literals;
        # RecursionError a maliciously deep nesting
        raise FormatError(f"{p}: header is not valid JSON ({_first_line(e)})",
                          hint="is this a safetensors file?") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: header is a JSON {type(header).__name__}, expected an object")
    found: list[str] = [f"{p}: header key '{k}' appears more than once" for k in duplicates]
    data_start = 8 + n
    data_size = size - data_start
    metadata_raw = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise FormatError(f"{p}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _parse_entry(p, key, entry, data_start, data_size)
    found += _layout_problems(p, tensors, data_start, data_size)
    if found:
        if problems is None:
            raise FormatError(found[0] + (f" (and {len(found) - 1} more layout problem(s))" if len(found) > 1 else ""),
                              hint="the safetensors library refuses this file too; re-create or re-download it")
        problems.extend(found)
    return SafetensorsFile(p, tensors, dict(metadata_raw), size, n)


def open_input(path: str | os.PathLike[str]) -> BinaryIO:
    """Open an input file read-only, refusing what is not a regular file (a FIFO would block, a
    device would read forever) before reading a byte.

    Raises:
        FormatError: not a regular file. OSError: as open() raises it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FormatError(f"{path}: is a directory, expected a file")
        if not stat.S_ISREG(mode):
            raise FormatError(f"{path}: is {_kind_of(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_side_file(path: str | os.PathLike[str], *, limit: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """The bytes of a small input file (a JSON config, an index, a model card, a pattern file) through
    open_input: a FIFO, a device or a link to one is refused before a byte is read, and a file larger
    than `limit` is refused rather than read (a file growing while read is cut at `limit` and refused).

    Raises:
        FormatError: not a regular file, or over `limit` bytes. OSError: as open() raises it.
    """
    with open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise FormatError(f"{path}: {max(size, len(data)):,} bytes, more than the {limit:,} a config or index "
                          "file may have", hint="a config of this size is not what it claims to be")
    return data


def _kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return what
    return "a special file"


def _pairs_recording(duplicates: list[str]) -> Any:
    """A json object_pairs_hook that keeps the last value of a repeated key and records the key."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                duplicates.append(k)
            out[k] = v
        return out

    return hook


def _layout_problems(p: Path, tensors: dict[str, TensorInfo], data_start: int, data_size: int) -> list[str]:
    """Overlaps, gaps and trailing bytes: the data must tile [0, data_size) in offset order."""
    found: list[str] = []
    at, prev = 0, None
    for info in sorted(tensors.values(), key=lambda i: (i.start, i.end)):
        begin = info.start - data_start
        if begin < at:
            found.append(f"{p}: tensor '{info.key}': data starts at byte {begin}, inside tensor '{prev}' "
                         f"(which ends at {at}): overlapping data")
        elif begin > at:
            found.append(f"{p}: tensor '{info.key}': data starts at byte {begin} but the data before it ends "
                         f"at {at}: a gap of {begin - at} unaccounted byte(s)")
        if info.end - data_start >= at:
            at, prev = info.end - data_start, info.key
    if at < data_size:
        found.append(f"{p}: {data_size - at} trailing byte(s) after the last tensor's data (byte {at} of "
                     f"{data_size})")
    return found


def _strerror(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass: true/false are not sizes


def _parse_entry(p: Path, key: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"{p}: tensor '{key}': header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise FormatError(f"{p}: tensor '{key}': unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{p}: tensor '{key}': bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{p}: tensor '{key}': bad data_offsets {offsets!r}")
    name, itemsize = DTYPES[code]
    expected = math.prod(shape) * itemsize
    begin, end = offsets
    if end - begin != expected:
        raise FormatError(
            f"{p}: tensor '{key}': data_offsets {offsets} hold {end - begin} bytes "
            f"but dtype {code} shape {tuple(shape)} needs {expected}"
        )
    if end > data_size:
        raise FormatError(
            f"{p}: tensor '{key}': data ends at byte {end} of the data section "
            f"but the file has only {data_size} (truncated?)",
            hint="re-download or re-create the file",
        )
    return TensorInfo(key, name, tuple(shape), p, data_start + begin, data_start + end)
