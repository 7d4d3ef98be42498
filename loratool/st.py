"""safetensors plumbing: header-only reads, lazy tensors, checkpoints, streaming writes, atomic outputs.

This is the only module that touches the bytes of a file. The header is parsed in pure Python (no
torch import) and checked against the file size, so a corrupt or truncated file fails here with one
clean FormatError that names the file and the tensor key, before any tensor is read.

Format: 8 bytes little-endian header length N, N bytes of JSON header, then raw little-endian
tensor bytes; each header entry gives dtype, shape and [begin, end) offsets into the data section.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from loratool.errors import (
    FormatError,
    IncompatibleError,
    LoratoolError,
    LoratoolWarning,
    OutputExistsError,
    known_secrets,
    scrub,
    scrub_bytes,
)

if TYPE_CHECKING:
    import torch

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


# ---------------------------------------------------------------------------------------------
# checkpoints (base models): one file, a directory with model.safetensors, or a sharded index


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


@dataclass
class Checkpoint:
    """A base checkpoint's tensor list (header-only) across one or more safetensors files."""

    root: Path  # the directory holding the files (or the file's parent)
    files: list[Path]  # weight files in index/file order
    tensors: dict[str, TensorInfo]  # every tensor, in file then header order
    index: dict[str, Any] | None = None  # parsed model.safetensors.index.json, if sharded
    metadata: dict[Path, dict[str, str]] = field(default_factory=dict)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a base model: a .safetensors file, a directory with model.safetensors, or a sharded dir.

    Raises:
        FormatError: nothing readable, a bad index, or a corrupt shard.
    """
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise FormatError(
                f"{p}: pickle checkpoints are not supported as a base",
                hint="convert the base to .safetensors first",
            )
        st = read_header(p)
        return Checkpoint(p.parent, [p], dict(st.tensors), None, {p: st.metadata})
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise FormatError(f"{p}: several safetensors indexes ({', '.join(i.name for i in indexes)})",
                          hint="pass the component directory or a single file")
    if indexes:
        return _open_sharded(p, folder_file(p, indexes[0].name))
    singles = [p / n for n in SINGLE_NAMES if (p / n).is_file()] or sorted(p.glob("*.safetensors"))
    if len(singles) == 1:
        single = folder_file(p, singles[0].name)
        st = read_header(single)
        return Checkpoint(p, [single], dict(st.tensors), None, {single: st.metadata})
    found = sorted(x.name for x in p.iterdir())[:10]
    raise FormatError(
        f"{p}: no model.safetensors or {INDEX_NAME} (found: {', '.join(found) or 'nothing'})",
        hint="pass a .safetensors file or a Hugging Face model directory",
    )


def _open_sharded(p: Path, index_path: Path) -> Checkpoint:
    duplicates: list[str] = []
    try:
        text = read_side_file(index_path).decode("utf-8")
        index = json.loads(text, object_pairs_hook=_pairs_recording(duplicates))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except OSError as e:
        raise FormatError(f"{index_path}: cannot read ({_strerror(e)})") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise FormatError(f"{index_path}: not a valid safetensors index ({e})") from None
    if duplicates:
        raise FormatError(f"{index_path}: key '{duplicates[0]}' appears more than once",
                          hint="the index is corrupt; re-create or re-download it")
    files: list[Path] = []
    for fname in weight_map.values():
        fp = member_path(p, fname, source=index_path)
        if fp not in files:
            files.append(fp)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[Path, dict[str, str]] = {}
    for fp in files:
        st = read_header(fp)
        metadata[fp] = st.metadata
        for key, info in st.tensors.items():
            if key in tensors:
                raise FormatError(f"{p}: tensor '{key}' is stored in both {tensors[key].path.name} and {fp.name}",
                                  hint="the checkpoint is corrupt; re-create or re-download it")
            tensors[key] = info
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise FormatError(
            f"{index_path}: {len(missing)} tensor(s) listed in weight_map are in no shard, "
            f"e.g. '{missing[0]}' (expected in {weight_map[missing[0]]})"
        )
    return Checkpoint(p, files, tensors, index, metadata)


def unsafe_name(name: str) -> str | None:
    """Why a relative file name read from a file or the Hub could leave its folder, or None if it cannot.

    Absolute paths, drive letters, backslashes, `..` components and NUL bytes are refused; `.` and
    empty components are harmless (a/./b is a/b).
    """
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if "\\" in name:
        return "contains a backslash"
    if ".." in name.split("/"):
        return "contains '..' (leads out of its folder)"
    if all(part in ("", ".") for part in name.split("/")):
        return "is empty"
    return None


def member_path(root: Path, name: Any, *, source: str | os.PathLike[str]) -> Path:
    """`root / name` for a file name that `source` (an index, a repo listing) names, kept inside root.

    Besides unsafe_name's rules, the file must not be reached through a symbolic link that leads out
    of root, except into the blob store of the Hugging Face cache that root is a snapshot of.

    Raises:
        FormatError: naming source and the entry.
    """
    if not isinstance(name, str):
        raise FormatError(f"{source}: entry {name!r} is not a file name")
    problem = unsafe_name(name)
    if problem:
        raise FormatError(f"{source}: file name {name!r} {problem}",
                          hint="refusing a name that could lead outside its folder: the file is corrupt or hostile")
    path = root / PurePosixPath(name)
    real = leads_out(path, root)
    if real is not None:
        raise FormatError(f"{source}: file name {name!r} is a symbolic link leading out of {root} (to {real})",
                          hint=_LINK_HINT)
    return path


_LINK_HINT = ("loratool never follows a link out of an input folder; copy the file into the folder (or pass "
              "the file itself)")


def folder_file(root: Path, name: str) -> Path:
    """`root / name` for a file that a reader of the input folder `root` opens (its config, weights,
    index): every read of a file inside an input folder goes through here or member_path.

    A missing file is returned as is (the caller says what is missing); a file that resolves outside
    root (a symbolic link, of the file or of a folder on the way, to /proc/self/environ, a device,
    someone else's file) is refused, except a link into the blob store of the Hugging Face cache
    that root is a snapshot of.

    Raises:
        FormatError: naming the file and where it leads.
    """
    path = root / name
    real = leads_out(path, root)
    if real is not None:
        raise FormatError(f"{path}: is a symbolic link leading out of the input folder {root} (to {real}); "
                          "refusing to read it", hint=_LINK_HINT)
    return path


def leads_out(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str | None:
    """Where `path` really leads, when that is outside the folder `root` (and outside the blob store
    of the Hugging Face cache repo whose snapshot holds root); None when it stays inside or does not
    exist at all. The one test of "a link out of an input folder"."""
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    allowed = [os.path.realpath(root), *_hf_blob_stores(root)]
    return None if any(_inside(real, a) for a in allowed) else real


def _hf_blob_stores(root: str | os.PathLike[str]) -> list[str]:
    """The blobs folder of the Hugging Face cache repo whose snapshot holds root, if any:
    root is <cache>/models--OWNER--NAME/snapshots/<revision>[/...]."""
    parts = Path(os.path.abspath(root)).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i >= 1 and i + 1 < len(parts) and re.match(r"^(models|datasets|spaces)--", parts[i - 1]):
            blobs = Path(*parts[:i]) / "blobs"
            if blobs.is_dir() and not blobs.is_symlink():
                return [os.path.realpath(blobs)]
    return []


def _inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """path is folder or below it (both absolute, already normalised or resolved)."""
    p, f = os.fspath(path), os.fspath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


# ---------------------------------------------------------------------------------------------
# writing


def _header_bytes(
    entries: list[tuple[str, str, tuple[int, ...]]],
    metadata: Mapping[str, str],
    header_order: list[str] | None = None,
) -> bytes:
    """The 8-byte length + JSON header; data offsets follow `entries` order, JSON keys `header_order`."""
    layout: dict[str, Any] = {}
    offset = 0
    for key, dtype, shape in entries:
        n = math.prod(shape) * ITEMSIZE[dtype]
        layout[key] = {"dtype": CODE_OF[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    # no Hub token reaches an output, whatever an input's metadata held (errors.scrub)
    header: dict[str, Any] = {METADATA_KEY: {scrub(k): scrub(v) for k, v in metadata.items()}} if metadata else {}
    for key in header_order or layout:
        header[key] = layout[key]
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


# Files at least this large are written with O_DIRECT where the filesystem allows it: the bytes go
# from one reused, page-aligned staging buffer to the disk, without a copy into freshly allocated
# page-cache pages (on a VM that returns freed pages to its host, that copy cost a merge of a 2.2 GB
# model over 5 s of CPU time; see docs/benchmarks.md). LORATOOL_DIRECT_IO=0 turns it off.
DIRECT_MIN_BYTES = 256 << 20
_STAGE_BYTES = 16 << 20  # a multiple of every block size O_DIRECT asks for alignment to
_ALIGN = 4096


class _DirectSink:
    """Appends bytes to a file through O_DIRECT in whole, aligned staging chunks.

    The last chunk is written padded to the alignment; the owner truncates the file to its real
    size afterwards. Where the filesystem refuses O_DIRECT (tmpfs on older kernels, FUSE, an
    alignment it does not accept), the first write fails with EINVAL and every byte goes through
    `fallback_fd` (a buffered descriptor of the same file) from then on.
    """

    def __init__(self, fd: int, fallback_fd: int) -> None:
        import mmap

        self.fd: int | None = fd
        self.fallback_fd = fallback_fd
        self.stage = mmap.mmap(-1, _STAGE_BYTES)  # anonymous maps are page-aligned
        self.view = memoryview(self.stage)
        self.filled = 0
        self.flushed = 0  # file offset of the staging buffer's first byte

    @classmethod
    def open(cls, path: Path, fallback_fd: int) -> _DirectSink | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or os.environ.get("LORATOOL_DIRECT_IO", "1") == "0":
            return None
        try:
            fd = os.open(path, os.O_WRONLY | flag)
        except OSError:
            return None
        return cls(fd, fallback_fd)

    @property
    def position(self) -> int:
        return self.flushed + self.filled

    def put(self, data: memoryview) -> None:
        while data:
            n = min(len(data), _STAGE_BYTES - self.filled)
            self.view[self.filled:self.filled + n] = data[:n]
            self.filled += n
            data = data[n:]
            if self.filled == _STAGE_BYTES:
                self._flush_full()


    def put_from(self, src_fd: int, offset: int, nbytes: int) -> None:
        """nbytes of another file from offset, read straight into the staging buffer."""
        done = 0
        while done < nbytes:
            k = min(nbytes - done, _STAGE_BYTES - self.filled)
            got = os.preadv(src_fd, [self.view[self.filled:self.filled + k]], offset + done)
            if got == 0:
                raise ended_early(src_fd, offset + done)
            self.filled += got
            done += got
            if self.filled == _STAGE_BYTES:
                self._flush_full()

    def _flush_full(self) -> None:
        self._flush(_STAGE_BYTES)
        self.flushed += _STAGE_BYTES
        self.filled = 0

    def _flush(self, length: int) -> None:
        """Write the first `length` staged bytes (a multiple of the alignment) at self.flushed."""
        done = 0
        while done < length:
            if self.fd is not None:
                try:
                    done += os.pwrite(self.fd, self.view[done:length], self.flushed + done)
                    continue
                except OSError as e:
                    if e.errno != errno.EINVAL or done:
                        raise
                    os.close(self.fd)  # O_DIRECT not accepted here: buffered from now on
                    self.fd = None
            done += os.pwrite(self.fallback_fd, self.view[done:length], self.flushed + done)

    def finish(self) -> int:
        """Write what is staged (padded to the alignment); the file's real size is returned."""
        size = self.position
        if self.filled:
            pad = -self.filled % _ALIGN
            self.view[self.filled:self.filled + pad] = bytes(pad)
            self._flush(self.filled + pad)
            self.flushed, self.filled = size, 0
        return size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            self.view.release()
            self.stage.close()
        except BufferError:  # a slice still held by an interrupted write's traceback: freed with it
            pass


class StreamingWriter:
    """Writes a safetensors file one tensor at a time: header first, then bytes in `entries` order.

    Peak memory is one tensor: the layout (keys, dtypes, shapes) is known before any data.
    `header_order` lists the keys in the order the JSON header should show them (default: entries).
    A file of DIRECT_MIN_BYTES or more bypasses the page cache (O_DIRECT through a staging buffer,
    see _DirectSink); `write_at` and `patch_header` are then applied when the file is closed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        header_order: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._entries = entries
        self._next = 0
        self._header = _header_bytes(entries, metadata or {}, header_order)
        self._reserved: dict[str, tuple[int, str, tuple[int, ...]]] = {}  # key -> (file offset, dtype, shape)
        self._deferred: list[tuple[int, bytes]] = []  # (offset, bytes) written at close (direct mode)
        # unbuffered: raw writes and copy_file_range share one file offset
        self._f = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed by close()/abort()
        total = len(self._header) + sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in entries)
        self._direct = _DirectSink.open(self.path, self._f.fileno()) if total >= DIRECT_MIN_BYTES else None
        self._put(memoryview(self._header))

    def _put(self, data: memoryview) -> None:
        if self._direct is not None:
            self._direct.put(data)
        else:
            _write_all(self._f.fileno(), data)

    def _expect(self, key: str, nbytes: int) -> None:
        exp_key, exp_dtype, exp_shape = self._entries[self._next]
        if key != exp_key or nbytes != math.prod(exp_shape) * ITEMSIZE[exp_dtype]:
            raise ValueError(f"writer expected {exp_key} ({exp_dtype} {exp_shape}), got {key} ({nbytes} bytes)")

    def write(self, key: str, tensor: torch.Tensor) -> None:
        exp_key, exp_dtype, exp_shape = self._entries[self._next]
        got_dtype = str(tensor.dtype).removeprefix("torch.")
        if key != exp_key or got_dtype != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise ValueError(
                f"writer expected {exp_key} {exp_dtype} {exp_shape}, got {key} {got_dtype} "
                f"{tuple(tensor.shape)}"
            )
        if tensor.numel():
            t = tensor.detach().to("cpu").contiguous().reshape(-1).view(_torch().uint8)
            self._put(memoryview(t.numpy()).cast("B"))  # type: ignore[arg-type]
        self._next += 1

    def reserve(self, key: str) -> None:
        """Leave `key`'s bytes for later (write_at), keeping the file order: the next entry follows it."""
        exp_key, exp_dtype, exp_shape = self._entries[self._next]
        if key != exp_key:
            raise ValueError(f"writer expected {exp_key}, got {key} to reserve")
        n = math.prod(exp_shape) * ITEMSIZE[exp_dtype]
        if self._direct is not None:
            offset = self._direct.position
            self._direct.put(memoryview(bytes(n)))  # reserved entries are small (recomputed scales)
        else:
            offset = os.lseek(self._f.fileno(), n, os.SEEK_CUR) - n
        self._reserved[key] = (offset, exp_dtype, exp_shape)
        self._next += 1

    def write_at(self, key: str, tensor: torch.Tensor) -> None:
        """Fill a reserved entry (a small tensor known only after a later one, e.g. recomputed scales)."""
        offset, exp_dtype, exp_shape = self._reserved.pop(key)
        got_dtype = str(tensor.dtype).removeprefix("torch.")
        if got_dtype != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise ValueError(f"writer expected {key} {exp_dtype} {exp_shape}, got {got_dtype} {tuple(tensor.shape)}")
        if tensor.numel():
            raw = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(_torch().uint8).numpy())  # type: ignore[arg-type]
            self._pwrite(offset, raw)

    def _pwrite(self, offset: int, raw: memoryview | bytes) -> None:
        if self._direct is not None:  # bytes staged or sent with O_DIRECT may cover this range: at close
            self._deferred.append((offset, bytes(raw)))
            return
        view = memoryview(raw).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._f.fileno(), view[done:], offset + done)

    def copy_range(self, key: str, src_fd: int, offset: int, nbytes: int) -> None:
        """Append `nbytes` of another file from `offset`, in the kernel where it can (no user copy)."""
        self._expect(key, nbytes)
        if self._direct is not None:
            self._direct.put_from(src_fd, offset, nbytes)
            self._next += 1
            return
        dst = self._f.fileno()
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, dst, nbytes - done, offset + done)
                if n == 0:
                    raise ended_early(src_fd, offset + done)
                done += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            while done < nbytes:  # filesystems without copy_file_range: plain chunked copy
                chunk = os.pread(src_fd, min(_CHUNK, nbytes - done), offset + done)
                if not chunk:
                    raise ended_early(src_fd, offset + done) from None
                _write_all(dst, chunk)
                done += len(chunk)
        self._next += 1

    def patch_header(self, placeholder: str, value: str) -> None:
        """Overwrite a same-length placeholder in the written header (e.g. a sha256 known only later)."""
        old, new = placeholder.encode(), value.encode()
        if len(old) != len(new) or self._header.count(old) != 1:
            raise ValueError("header placeholder must occur once and keep its length")
        pos = self._header.index(old)
        self._pwrite(pos, new)
        self._header = self._header.replace(old, new)

    def close(self) -> None:
        if self._next != len(self._entries) or self._reserved:
            self.abort()
            raise ValueError(f"writer closed after {self._next} of {len(self._entries)} tensors"
                             + (f", {sorted(self._reserved)} never written" if self._reserved else ""))
        if self._direct is not None:
            size = self._direct.finish()
            self._direct.close()
            self._direct = None
            os.ftruncate(self._f.fileno(), size)  # the last chunk was written padded
            for offset, raw in self._deferred:
                self._pwrite(offset, raw)
            self._deferred.clear()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        self._f.close()


_CHUNK = 64 << 20


def fd_name(fd: int) -> str:
    """The path an open file descriptor refers to, for messages (Linux /proc), or 'an input file'."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "an input file"


def ended_early(fd: int, at: int) -> FormatError:
    return FormatError(f"{fd_name(fd)}: ended at byte {at} while being read (truncated while loratool was "
                       "reading it?)", hint="leave the inputs alone while the command runs, then run it again")


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until done (one write() call moves at most ~2 GB on Linux)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[:_CHUNK])
        view = view[n:]


def _torch() -> Any:
    import torch

    return torch


def save_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors (in mapping order) to a safetensors file. Not atomic: see atomic_output."""
    entries = [(k, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()]
    w = StreamingWriter(path, entries, metadata)
    try:
        for k, t in tensors.items():
            w.write(k, t)
    except BaseException:
        w.abort()
        raise
    w.close()


# ---------------------------------------------------------------------------------------------
# outputs: checked, claimed, written aside, moved into place atomically
#
# The rules (docs/cli.md, "Safety"): an output is never an input, inside one or around one; two
# outputs of one command never coincide or nest; `--force` replaces only a regular file or a folder
# that looks like an earlier output of the same kind of command, never a link, a device, a FIFO or
# a folder holding anything else; one run at a time writes a given output (a lock beside it); the
# new output is swapped in by one rename, so the path holds the old or the new output, never
# neither or a mix; temporaries carry their owner's pid and a later run removes those of dead runs.

# What a folder written by each kind of command may hold (anything else: --force refuses it).
OUTPUT_KINDS = ("adapter", "model", "download")
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "adapters.safetensors", "README.md"})
MODEL_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken", ".jinja", ".md", ".py", ".vocab",
                  ".spm", ".bpe")
DOWNLOAD_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".model", ".tiktoken", ".jinja", ".bin", ".pt",
                     ".pth", ".ckpt")
_NAME_MAX = 255


@dataclass
class OutputState:
    """What happened to one output path in this process (for an honest message on interrupt)."""

    path: Path
    existed: bool
    written: bool = False

    def describe(self) -> str:
        if self.written:
            return f"{self.path} was written"
        return f"{self.path} was not written" + (" (the previous one is unchanged)" if self.existed else "")


OUTPUTS: list[OutputState] = []  # every output this process started, in order


def output_states() -> list[str]:
    """One phrase per output this process started: written, or not (and whether an old one is intact)."""
    return [o.describe() for o in OUTPUTS]


INPUTS: list[str] = []  # every path the running command reads (the CLI records its path arguments here)


def note_inputs(paths: Iterable[str | os.PathLike[str] | None]) -> None:
    """Record paths this process's command reads: every later check_output refuses to write them,
    inside them or around them, whatever `inputs` its caller passed. loratool.cli records every
    path parameter of the command (and each hf:// input's local copy) before the command runs;
    it clears the list when the command is over."""
    INPUTS.extend(os.fspath(p) for p in paths if p is not None and os.fspath(p) != "")


def check_output(
    out: str | os.PathLike[str],
    *,
    force: bool,
    directory: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    others: Iterable[str | os.PathLike[str]] = (),
    kind: str | None = None,
) -> None:
    """Refuse an output path that would destroy what is not ours.

    Args:
        force: an existing `out` may be replaced, if it is a regular file (file outputs) or a folder
            that looks like an earlier output of this `kind` (folder outputs).
        directory: the output is a folder.
        inputs: the command's inputs (files or folders): `out` may be none of them, nor inside nor
            around one. The paths in INPUTS (note_inputs: every path the CLI command was given)
            count too.
        others: the command's other outputs: `out` must differ from each and not nest with it.
        kind: for folder outputs, "adapter" (PEFT), "model" (merge) or "download" (pull).

    Raises:
        OutputExistsError: `out` exists (and force is False, or it is not ours to replace).
        IncompatibleError: `out` collides with an input or another output, or is the current
            folder, one above it or the root.
        LoratoolError: the name is longer than the filesystem allows.
    """
    shown = Path(out)
    target = Path(os.path.abspath(out))
    _check_place(shown, target)
    _check_collisions(shown, target, [*inputs, *INPUTS], others)
    if not target.parent.is_dir():
        raise FormatError(f"{shown}: parent directory {shown.parent} does not exist")
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as e:
        raise LoratoolError(f"{shown}: cannot look at it ({_strerror(e)})") from None
    reason = _not_replaceable(target, info, directory=directory, kind=kind)
    if not force:
        raise OutputExistsError(
            f"{shown}: already exists" + (f" ({reason})" if reason else ""),
            hint="pass --force to replace it" if reason is None else "write elsewhere with -o; --force would "
            "not replace it either",
        )
    if reason:
        raise OutputExistsError(
            f"{shown}: refusing to replace it: {reason}",
            hint="--force replaces only a regular file or an earlier output of this command; "
            "remove it yourself or write elsewhere with -o",
        )


def _check_place(shown: Path, target: Path) -> None:
    if target == Path(target.anchor):
        raise IncompatibleError(f"{shown}: is the root folder; refusing to write there",
                                hint="write to a new path with -o")
    real = os.path.realpath(target)
    cwd = os.path.realpath(os.getcwd())
    if _inside(cwd, real):
        what = "the current folder" if cwd == real else "a folder above the current one"
        raise IncompatibleError(f"{shown}: is {what}; refusing to write there", hint="write to a new path with -o")
    name_max = _NAME_MAX
    with contextlib.suppress(OSError, ValueError):
        name_max = os.pathconf(target.parent, "PC_NAME_MAX")
    if len(os.fsencode(target.name)) > name_max:
        raise LoratoolError(f"{shown}: the name is {len(os.fsencode(target.name))} bytes long; the filesystem "
                            f"allows at most {name_max}", hint="choose a shorter output name")


def _forms(p: str | os.PathLike[str]) -> set[str]:
    return {os.path.abspath(p), os.path.realpath(p)}


def _check_collisions(shown: Path, target: Path, inputs: Iterable[str | os.PathLike[str]],
                      others: Iterable[str | os.PathLike[str]]) -> None:
    mine = _forms(target)
    inputs = list(inputs)
    for inp in inputs:
        if mine & _forms(inp):
            raise IncompatibleError(f"{shown}: is an input of this command ({inp}); refusing to write it",
                                    hint="write to a new path with -o")
    for inp in inputs:
        for t in mine:
            for i in _forms(inp):
                if _inside(i, t):
                    raise IncompatibleError(f"{shown}: contains an input of this command ({inp}); refusing to "
                                            "write it", hint="write to a new path with -o")
                if _inside(t, i):
                    raise IncompatibleError(f"{shown}: is inside an input of this command ({inp}); refusing to "
                                            "write there", hint="write to a path outside the inputs with -o")
    for other in others:
        if any(_inside(t, o) or _inside(o, t) for t in mine for o in _forms(other)):
            raise IncompatibleError(f"{shown} and {other}: two outputs of one command must be different paths, "
                                    "neither inside the other", hint="choose separate paths")


def _not_replaceable(target: Path, info: os.stat_result, *, directory: bool, kind: str | None) -> str | None:
    """Why --force must not replace what is at target, or None when it may."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return f"it is a symbolic link (to {os.readlink(target)})"
    if stat.S_ISREG(mode):
        return "it is a file and the output is a directory" if directory else None
    if not stat.S_ISDIR(mode):
        return f"it is {_kind_of(mode)}"
    if not directory:
        return "it is a directory and the output is a file"
    return _foreign_contents(target, kind)


def _foreign_contents(folder: Path, kind: str | None) -> str | None:
    """What in `folder` is not part of an earlier output of `kind`, or None.

    An adapter or model folder is ours only when its weights (at least one .safetensors) carry
    loratool's provenance (`loratool.op`): a folder of config, code or docs alone is not replaced.
    An empty folder may be."""
    links: list[str] = []
    specials: list[str] = []
    foreign: list[str] = []
    not_ours: list[str] = []
    ours: list[str] = []
    others: list[str] = []
    stack = [folder]
    try:
        while stack:
            here = stack.pop()
            for entry in os.scandir(here):
                rel = os.path.relpath(entry.path, folder)
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    links.append(rel)
                elif stat.S_ISDIR(mode):
                    if kind == "adapter":
                        foreign.append(rel + "/")
                    else:
                        stack.append(Path(entry.path))
                elif not stat.S_ISREG(mode):
                    specials.append(rel)
                elif not _belongs(Path(entry.path), kind):
                    foreign.append(rel)
                elif kind in ("adapter", "model") and entry.name.endswith(".safetensors"):
                    (ours if _written_by_loratool(entry.path) else not_ours).append(rel)
                else:
                    others.append(rel)
    except OSError as e:
        return f"its contents cannot be listed ({_strerror(e)})"

    def some(names: list[str]) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")

    if links:
        return f"the folder holds symbolic links ({some(links)})"
    if specials:
        return f"the folder holds special files ({some(specials)})"
    if foreign:
        what = {"adapter": "adapter files", "model": "model files", "download": "downloaded files"}.get(
            kind or "", "files loratool writes")
        return f"the folder holds files other than {what} ({some(foreign)})"
    if not_ours:
        return f"the folder holds weights loratool did not write ({some(not_ours)})"
    if kind in ("adapter", "model") and others and not ours:  # config, code, docs: no earlier output of ours
        return f"the folder holds no weights loratool wrote, only {some(others)}"
    return None


def _belongs(path: Path, kind: str | None) -> bool:
    name = path.name
    if name.startswith("."):
        return False
    if kind == "adapter":
        return name in ADAPTER_FILES
    if kind == "model":
        return name.endswith(MODEL_SUFFIXES)
    if kind == "download":
        return name.endswith(DOWNLOAD_SUFFIXES)
    return False


def _written_by_loratool(path: str) -> bool:
    try:
        return "loratool.op" in read_header(path).metadata
    except LoratoolError:
        return False


def _in_temporary(p: Path, tmp: Path) -> bool:
    try:
        return p.resolve() == tmp.resolve() or tmp.resolve() in p.resolve().parents
    except OSError:
        return True


@contextlib.contextmanager
def atomic_output(
    out: str | os.PathLike[str],
    *,
    force: bool,
    directory: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    others: Iterable[str | os.PathLike[str]] = (),
    kind: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; move it into place only when the block completes.

    The output is checked (check_output), then claimed: a lock file beside it, held for the whole
    run, makes a second run to the same path fail at once (exit 2) instead of racing. Temporaries of
    earlier runs that died (their pid is in the name) are removed, with a LoratoolWarning. The
    temporary is moved into place by one rename that refuses an existing path (renameat2
    RENAME_NOREPLACE), or with force swaps with the old output (RENAME_EXCHANGE) and then removes it;
    SIGINT/SIGTERM arriving during that step are held until it is over. A crash, an exception or an
    interrupt leaves either no output or the previous one, never a half-written one. The caller
    re-opens/validates the temporary inside the block.

    Raises:
        OutputExistsError: `out` exists and force is False or it is not replaceable, or another run
            is writing it. IncompatibleError: see check_output. LoratoolError: the folder cannot be
            written (read-only, permission, disk full).
    """
    check_output(out, force=force, directory=directory, inputs=inputs, others=others, kind=kind)
    shown = Path(out)
    target = Path(os.path.abspath(out))
    parent = target.parent
    stem = _stem(target.name)
    state = OutputState(shown, os.path.lexists(target))
    OUTPUTS.append(state)
    with _Claim(parent, stem, shown):
        _remove_stale(parent, stem, shown, target)
        check_output(out, force=force, directory=directory, kind=kind)  # another run may have finished meanwhile
        state.existed = os.path.lexists(target)
        tmp = _make_temp(parent, stem, directory=directory, shown=shown)
        try:
            try:
                yield tmp
            except OSError as e:
                if e.errno in _USER_OS_ERRORS:
                    where = e.filename or tmp
                    if e.filename and not _in_temporary(Path(os.fsdecode(e.filename)), tmp):
                        # not the output: an input (or another file) could not be read
                        raise LoratoolError(f"{e.filename}: {_strerror(e)} (reading it); nothing was written to "
                                            f"{shown}") from None
                    raise LoratoolError(
                        f"{shown}: {_strerror(e)} while writing ({where}); nothing was written to {shown}"
                        + (" (the previous one is unchanged)" if state.existed else ""),
                        hint="free some space or write elsewhere with -o" if e.errno in _FULL else None,
                    ) from None
                raise
            os.chmod(tmp, 0o755 if directory else 0o644)
            with _signals_held():
                _commit(tmp, target, shown, force=force, directory=directory, kind=kind)
                state.written = True
        except BaseException:
            _remove(tmp)
            raise


def _stem(name: str) -> str:
    """The name temporaries and the lock are derived from (hashed when the name is long)."""
    raw = os.fsencode(name)
    return name if len(raw) <= 200 else hashlib.sha256(raw).hexdigest()[:32]


def _make_temp(parent: Path, stem: str, *, directory: bool, shown: Path) -> Path:
    tmp = parent / f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if directory:
            os.mkdir(tmp, 0o700)
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise LoratoolError(f"{shown}: cannot write in {shown.parent} ({_strerror(e)}); nothing was written",
                            hint="write elsewhere with -o") from None
    return tmp


def _commit(tmp: Path, target: Path, shown: Path, *, force: bool, directory: bool, kind: str | None) -> None:
    """Move tmp to target in one step; an existing target is replaced only with force (and if ours)."""
    if not os.path.lexists(target):
        if _renameat2(tmp, target, _RENAME_NOREPLACE):
            return
        if not directory:
            os.link(tmp, target)  # fails with EEXIST rather than replace what appeared meanwhile
            os.unlink(tmp)
            return
        os.rename(tmp, target)  # a folder renames only onto nothing or an empty folder
        return
    if not force:
        raise OutputExistsError(f"{shown}: appeared while this run was writing it; not replaced",
                                hint="pass --force to replace it")
    reason = _not_replaceable(target, os.lstat(target), directory=directory, kind=kind)
    if reason:
        raise OutputExistsError(f"{shown}: refusing to replace it: {reason}")
    if not directory:
        os.replace(tmp, target)  # atomic for files
        return
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        _remove(tmp)  # tmp now holds the old output
        return
    old = target.parent / f".{_stem(target.name)}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)  # no exchange on this system: a moment with no output, the old one in `old`
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # only this run may put its `old` back (another run never does: _remove_stale)
        raise
    _remove(old)


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2_fn: Any = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2) with flags; False where the system or filesystem does not offer it."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            import ctypes

            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
    if not _renameat2_fn:
        return False
    import ctypes

    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the output is being swapped; deliver them once it is done."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, Any] = {}
    for sig in (int(signal.SIGINT), int(signal.SIGTERM)):
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:
            continue  # installed outside Python or ignored: nothing to hold
        saved[sig] = handler
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if pending:
            handler = saved[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            else:
                os.kill(os.getpid(), pending[0])  # the default action, now that the output is whole


class _Claim:
    """An exclusive lock file beside the output (`.NAME.lock`, holding the owner's pid).

    A lock in place is never opened for writing: the new one is made as a private temporary
    (O_CREAT|O_EXCL|O_NOFOLLOW), given the pid, locked with flock(2), and only then moved to the
    lock's name by a rename that refuses an existing path (or link(2), which refuses one too).
    A lock found in place is judged without writing to it: a symbolic link, a special file, a file
    with other hard links or one that holds no pid is no loratool lock and is refused (exit 2,
    nothing touched); a flock held on it means a live run (exit 2); otherwise its run died and its
    name is removed and the claim tried again. Where flock is unavailable the recorded pid decides.
    """

    def __init__(self, parent: Path, stem: str, shown: Path) -> None:
        self.parent = parent
        self.stem = stem
        self.path = parent / f".{stem}.lock"
        self.shown = shown
        self.fd: int | None = None

    def __enter__(self) -> _Claim:
        for _ in range(20):
            fd, tmp = self._new_lock()
            placed = self._place(tmp, fd)
            if placed is not None:
                self.fd = placed
                return self
            self._judge()  # raises for a live run or a lock that is not ours; returns once a dead run's is gone
        raise self._busy(None)

    def _new_lock(self) -> tuple[int, Path]:
        tmp = self.parent / f".{self.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise LoratoolError(f"{self.shown}: cannot write in {self.shown.parent} ({_strerror(e)}); nothing "
                                "was written", hint="write elsewhere with -o") from None
        try:
            _write_all(fd, f"{os.getpid()}\n".encode())
            try:
                fcntl_flock(fd)
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise  # without flock the file alone is the lock: its pid decides (_judge)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp

    def _place(self, tmp: Path, fd: int) -> int | None:
        """Move the new lock (fd, at tmp) to its name and return the lock's fd, or None when a lock
        is there (it is not touched). fd is closed and tmp removed whenever fd is not returned."""
        ours: int | None = fd
        try:
            try:
                if _renameat2(tmp, self.path, _RENAME_NOREPLACE):
                    ours = None
                    return fd
                os.link(tmp, self.path, follow_symlinks=False)  # no renameat2 here: link(2) refuses a name too
            except FileExistsError:
                return None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                    raise
                os.close(fd)  # no hard links on this filesystem: create the lock by name, exclusively
                ours = None
                return self._create_in_place()
            ours = None
            return fd
        except OSError as e:
            raise LoratoolError(f"{self.shown}: cannot write in {self.shown.parent} ({_strerror(e)}); nothing "
                                "was written", hint="write elsewhere with -o") from None
        finally:
            if ours is not None:
                os.close(ours)
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # after a rename there is nothing left to remove

    def _create_in_place(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return None
        with contextlib.suppress(OSError):
            fcntl_flock(fd)
        _write_all(fd, f"{os.getpid()}\n".encode())
        return fd

    def _judge(self) -> None:
        """A lock is in place: raise if a live run holds it or it is no loratool lock; else remove it."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return  # its run finished meanwhile
        reason = None
        if stat.S_ISLNK(info.st_mode):
            reason = "it is a symbolic link"
        elif not stat.S_ISREG(info.st_mode):
            reason = f"it is {_kind_of(info.st_mode)}"
        elif info.st_nlink != 1:
            reason = f"it has {info.st_nlink} hard links"
        if reason is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            except OSError as e:
                raise LoratoolError(f"{self.path}: cannot read the lock ({_strerror(e)}); nothing was written to "
                                    f"{self.shown}") from None
            try:
                now = os.fstat(fd)
                if (now.st_ino, now.st_dev) != (info.st_ino, info.st_dev):
                    return  # replaced meanwhile: judge again
                raw = os.pread(fd, 64, 0)
                m = re.fullmatch(rb"(\d{1,10})\n?", raw)
                owner = int(m[1]) if m else None
                if raw and owner is None:
                    reason = "it holds no process id"
                else:
                    try:
                        fcntl_flock(fd)
                    except BlockingIOError:
                        raise self._busy(owner) from None
                    except OSError as e:
                        if e.errno not in _NO_FLOCK:
                            raise
                        if owner is not None and _alive(owner):
                            raise self._busy(owner) from None
                    # its run is over: remove the name while holding its lock, if it is still this file
                    again = os.stat(self.path, follow_symlinks=False)
                    if (again.st_ino, again.st_dev) == (info.st_ino, info.st_dev):
                        os.unlink(self.path)
                    return
            except FileNotFoundError:
                return
            finally:
                os.close(fd)
        raise OutputExistsError(f"{self.path}: is not a lock loratool made ({reason}); nothing was written to "
                                f"{self.shown}", hint=f"remove {self.path} yourself, or write elsewhere with -o")

    def _busy(self, owner: int | None) -> OutputExistsError:
        who = f"pid {owner}" if owner else "another process"
        return OutputExistsError(f"{self.shown}: another loratool run ({who}) is writing it; not touched",
                                 hint="wait for that run to finish, or write elsewhere with -o")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                mine = os.fstat(self.fd)
                now = os.stat(self.path, follow_symlinks=False)
                if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                    os.unlink(self.path)  # while still holding the lock
            os.close(self.fd)
            self.fd = None


_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def fcntl_flock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).split()[0])
    return None


_PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT; other systems stay below it too


def _alive(pid: int) -> bool:
    if not 0 < pid <= _PID_MAX:
        return False  # no process has this id (and 0 or -1 would ask about whole process groups)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_stale(parent: Path, stem: str, shown: Path, target: Path) -> None:
    """Remove temporaries that runs which died left for this output (never a live run's), and say so.

    A dead run's `.old-` folder (the previous output, moved aside on a system without
    RENAME_EXCHANGE) is never renamed into place nor removed by another run: it is named in a
    warning and left to the user. A name whose pid no process can have was made by no run and is
    left alone.
    """
    import warnings

    pattern = re.compile(rf"\.{re.escape(stem)}\.(tmp|old)-(\d{{1,10}})-[0-9a-f]+")
    removed: list[str] = []
    kept: list[str] = []
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        pid = int(m[2])
        if not 0 < pid <= _PID_MAX or pid == os.getpid() or _alive(pid):
            continue
        if m[1] == "old":
            kept.append(entry.name)
            continue
        _remove(Path(entry.path))
        removed.append(f"{entry.name} (pid {pid})")
    if removed:
        warnings.warn(f"{shown}: removed {len(removed)} temporary file(s) left by earlier runs that did not finish: "
                      + ", ".join(removed), LoratoolWarning, stacklevel=4)
    for name in kept:
        warnings.warn(f"{shown}: {parent / name} holds an earlier output that a run which did not finish moved "
                      f"aside; left as it is (rename it to {shown} to get it back, or remove it)",
                      LoratoolWarning, stacklevel=4)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_USER_OS_ERRORS = (*_FULL, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENAMETOOLONG)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def copy_tree_files(root: Path, *, refuse_links_out: bool = False) -> Iterator[tuple[Path, Path]]:
    """(file, its path relative to root) for every file under root to copy, links inside root followed.

    Hidden entries (.git, .cache, loratool's own temporaries) are skipped. A file or folder that
    resolves outside root (a symbolic link to /proc/self/environ, /dev/..., another folder; see
    leads_out) is never read: it is skipped, and one LoratoolWarning names what was skipped once the
    walk is done (with refuse_links_out, e.g. for an upload, it raises instead). Nothing else is
    skipped silently: an unreadable folder, a special file (FIFO, device, socket), a broken link
    inside root or a link loop raises.

    Raises:
        FormatError: naming the entry.
    """
    import warnings

    skipped: list[str] = []

    def walk(folder: Path, rel: Path, chain: tuple[str, ...]) -> Iterator[tuple[Path, Path]]:
        real = os.path.realpath(folder)
        if real in chain:
            raise FormatError(f"{folder}: symbolic link loop (leads back to {real})")
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise FormatError(f"{folder}: cannot list this folder ({_strerror(e)}); its files would be missing "
                              "from the output", hint="make it readable, or remove it from the input") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink() and not os.path.exists(path):
                raise FormatError(f"{path}: broken symbolic link (to {os.readlink(path)})",
                                  hint="fix or remove the link")
            out = leads_out(path, root)
            if out is not None:
                if refuse_links_out:
                    raise FormatError(f"{path}: is a symbolic link leading out of the input folder {root} (to "
                                      f"{out}); refusing to read it", hint=_LINK_HINT)
                skipped.append(f"{rel / entry.name} (to {out})")
                continue
            try:
                mode = os.stat(path).st_mode  # through links (inside root)
            except FileNotFoundError:
                raise FormatError(f"{path}: broken symbolic link (to {os.readlink(path)})",
                                  hint="fix or remove the link") from None
            except OSError as e:
                raise FormatError(f"{path}: cannot read ({_strerror(e)})") from None
            if stat.S_ISDIR(mode):
                yield from walk(path, rel / entry.name, (*chain, real))
            elif stat.S_ISREG(mode):
                yield path, rel / entry.name
            else:
                raise FormatError(f"{path}: is {_kind_of(mode)}; refusing to copy it",
                                  hint="remove it from the input folder")

    yield from walk(root, Path(), ())
    if skipped:
        warnings.warn(f"{root}: not copied: {len(skipped)} symbolic link(s) leading out of the input folder "
                      f"(loratool never follows them): {', '.join(skipped[:5])}"
                      + (f", ... ({len(skipped)} in all)" if len(skipped) > 5 else ""),
                      LoratoolWarning, stacklevel=2)


def copy_input_file(src: Path, dst: Path) -> None:
    """Copy a regular file (through links) to a new file `dst`, keeping its mode and times.

    A known Hub token in the bytes (errors.known_secrets) is written as *** (with a warning): no output
    carries the token, even when an input did.

    Raises:
        FormatError: src cannot be read (naming it); OSError from writing dst.
    """
    import warnings

    try:
        fin = open_input(src)
    except OSError as e:
        raise FormatError(f"{src}: cannot read ({_strerror(e)}); it would be missing from the output") from None
    keep = max((len(s.encode("utf-8", "surrogatepass")) for s in known_secrets()), default=1) - 1
    carry = b""
    scrubbed = False
    with fin, open(dst, "xb") as fout:
        while True:
            try:
                chunk = fin.read(_COPY_CHUNK)
            except OSError as e:
                raise FormatError(f"{src}: cannot read ({_strerror(e)})") from None
            data = carry + chunk
            clean = scrub_bytes(data)
            scrubbed = scrubbed or clean != data
            if not chunk:
                fout.write(clean)
                break
            # a token may begin in the last `keep` bytes and end in the next chunk: hold them back
            cut = max(len(clean) - keep, 0)
            fout.write(clean[:cut])
            carry = clean[cut:]
    with contextlib.suppress(OSError):
        shutil.copystat(src, dst)
    if scrubbed:
        warnings.warn(f"{src}: holds a Hub token; the copy in the output has it replaced by ***", LoratoolWarning,
                      stacklevel=2)


def write_text_output(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file of an output (a config, an index, a report): UTF-8, scrubbed of Hub tokens."""
    Path(path).write_text(scrub(text), encoding="utf-8")


_COPY_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BackgroundSha256:
    """sha256 of whole files, computed in a daemon thread while other work goes on (provenance).

    With `lead`, the thread stays at most that many bytes ahead of what the caller reports as
    consumed (`advance`), so a file read by both is still in the page cache the second time and
    the disk is read once. `stop` ends it between chunks: an error or Ctrl-C never waits for the
    rest of a large checkpoint to be hashed.
    """

    def __init__(self, paths: list[Path], *, lead: int | None = None) -> None:
        import threading
        from concurrent.futures import Future

        self.paths = list(paths)
        self.digests: list[Future[str]] = [Future() for _ in self.paths]
        # every file is opened now, so what is hashed is what the caller opened next to it, whenever the
        # thread gets there (a file removed or replaced meanwhile is still the one that was named)
        self._files: list[io.FileIO] = []
        try:
            for path in self.paths:
                self._files.append(open(path, "rb", buffering=0))  # noqa: SIM115 (closed by _run)
        except OSError as e:
            for f in self._files:
                f.close()
            raise FormatError(f"{path}: cannot read it to compute its sha256 ({_strerror(e)})") from None
        self._allowed = math.inf if lead is None else lead
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="loratool-sha256", daemon=True)
        self._thread.start()

    def advance(self, nbytes: int) -> None:
        """The caller has consumed nbytes more: the hasher may run that much further."""
        with self._cond:
            self._allowed += nbytes
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def result(self) -> dict[str, str]:
        """{str(path): hex digest} once every file is hashed; re-raises a read error."""
        return {str(p): d.result() for p, d in zip(self.paths, self.digests)}

    def _run(self) -> None:
        done = 0
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        try:
            for f, digest in zip(self._files, self.digests):
                hasher = hashlib.sha256()
                with f:
                    while True:
                        with self._cond:
                            while not self._stopped and done >= self._allowed:
                                self._cond.wait()
                            if self._stopped:
                                return
                        n = f.readinto(buf)
                        if not n:
                            break
                        hasher.update(view[:n])
                        done += n
                digest.set_result(hasher.hexdigest())
        except BaseException as e:  # handed to whoever waits for a digest
            if isinstance(e, OSError):  # removed or unreadable meanwhile: the user's doing, not a bug
                e = FormatError(f"{getattr(e, 'filename', None) or 'an input file'}: cannot read it to compute "
                                f"its sha256 ({_strerror(e)})", hint="leave the inputs alone while the command runs")
            for digest in self.digests:
                if not digest.done():
                    digest.set_exception(e)
        finally:
            for f in self._files:
                f.close()  # those not reached (stopped early, or an error)
