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
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import FormatError, LoratoolError, OutputExistsError

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


def read_header(path: str | os.PathLike[str]) -> SafetensorsFile:
    """Parse and check the header of a safetensors file.

    Raises:
        FormatError: the file is missing, too small, its header is not JSON, an entry is malformed
            or points outside the file (truncated data).
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FormatError(
                    f"{p}: not a safetensors file ({size} bytes; the header length alone takes 8)"
                )
            (n,) = struct.unpack("<Q", f.read(8))
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
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integer literals;
        # RecursionError a maliciously deep nesting
        raise FormatError(f"{p}: header is not valid JSON ({_first_line(e)})",
                          hint="is this a safetensors file?") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: header is a JSON {type(header).__name__}, expected an object")
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
    return SafetensorsFile(p, tensors, dict(metadata_raw), size, n)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _parse_entry(p: Path, key: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"{p}: tensor '{key}': header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise FormatError(f"{p}: tensor '{key}': unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise FormatError(f"{p}: tensor '{key}': bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
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

    Either backed by a safetensors entry (nothing read until load) or by an in-memory tensor.
    """

    __slots__ = ("_info", "_value", "dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: str, info: TensorInfo | None, value: Any) -> None:
        self.shape = shape
        self.dtype = dtype
        self._info = info
        self._value = value

    @classmethod
    def from_info(cls, info: TensorInfo) -> TensorRef:
        return cls(info.shape, info.dtype, info, None)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> TensorRef:
        return cls(tuple(t.shape), str(t.dtype).removeprefix("torch."), None, t)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def source(self) -> str:
        """'file:key' for file-backed tensors, for error messages."""
        return f"{self._info.path}: '{self._info.key}'" if self._info else "<memory>"

    def load(self) -> torch.Tensor:
        """The tensor, in its stored dtype, on the CPU."""
        if self._info is not None:
            return load_tensor(self._info)
        return self._value

    def scalar(self) -> float:
        if self._info is not None:
            return read_scalar(self._info)
        if self._value.numel() != 1:
            raise FormatError(f"expected a single number, got shape {self.shape}")
        return float(self._value.reshape(()).float().item())


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
        return _open_sharded(p, indexes[0])
    singles = [p / n for n in SINGLE_NAMES if (p / n).is_file()] or sorted(p.glob("*.safetensors"))
    if len(singles) == 1:
        st = read_header(singles[0])
        return Checkpoint(p, [singles[0]], dict(st.tensors), None, {singles[0]: st.metadata})
    found = sorted(x.name for x in p.iterdir())[:10]
    raise FormatError(
        f"{p}: no model.safetensors or {INDEX_NAME} (found: {', '.join(found) or 'nothing'})",
        hint="pass a .safetensors file or a Hugging Face model directory",
    )


def _open_sharded(p: Path, index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise FormatError(f"{index_path}: not a valid safetensors index ({e})") from None
    files: list[Path] = []
    for fname in weight_map.values():
        fp = p / fname
        if fp not in files:
            files.append(fp)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[Path, dict[str, str]] = {}
    for fp in files:
        st = read_header(fp)
        metadata[fp] = st.metadata
        tensors.update(st.tensors)
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise FormatError(
            f"{index_path}: {len(missing)} tensor(s) listed in weight_map are in no shard, "
            f"e.g. '{missing[0]}' (expected in {weight_map[missing[0]]})"
        )
    return Checkpoint(p, files, tensors, index, metadata)


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
    header: dict[str, Any] = {METADATA_KEY: dict(metadata)} if metadata else {}
    for key in header_order or layout:
        header[key] = layout[key]
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class StreamingWriter:
    """Writes a safetensors file one tensor at a time: header first, then bytes in `entries` order.

    Peak memory is one tensor: the layout (keys, dtypes, shapes) is known before any data.
    `header_order` lists the keys in the order the JSON header should show them (default: entries).
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
        # unbuffered: raw writes and copy_file_range share one file offset
        self._f = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed by close()/abort()
        _write_all(self._f.fileno(), self._header)

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
            _write_all(self._f.fileno(), memoryview(t.numpy()))  # type: ignore[arg-type]
        self._next += 1

    def copy_range(self, key: str, src_fd: int, offset: int, nbytes: int) -> None:
        """Append `nbytes` of another file from `offset`, in the kernel where it can (no user copy)."""
        self._expect(key, nbytes)
        dst = self._f.fileno()
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, dst, nbytes - done, offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"source ended early at byte {offset + done}")
                done += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            while done < nbytes:  # filesystems without copy_file_range: plain chunked copy
                chunk = os.pread(src_fd, min(_CHUNK, nbytes - done), offset + done)
                if not chunk:
                    raise OSError(errno.EIO, f"source ended early at byte {offset + done}") from None
                _write_all(dst, chunk)
                done += len(chunk)
        self._next += 1

    def patch_header(self, placeholder: str, value: str) -> None:
        """Overwrite a same-length placeholder in the written header (e.g. a sha256 known only later)."""
        old, new = placeholder.encode(), value.encode()
        if len(old) != len(new) or self._header.count(old) != 1:
            raise ValueError("header placeholder must occur once and keep its length")
        pos = self._header.index(old)
        os.pwrite(self._f.fileno(), new, pos)
        self._header = self._header.replace(old, new)

    def close(self) -> None:
        if self._next != len(self._entries):
            self._f.close()
            raise ValueError(f"writer closed after {self._next} of {len(self._entries)} tensors")
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


_CHUNK = 64 << 20


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


def check_output(out: str | os.PathLike[str], *, force: bool, directory: bool) -> None:
    """Refuse an existing `out` unless force, and never replace a file by a directory or back.

    Raises:
        OutputExistsError
    """
    target = Path(out)
    if target.exists() or target.is_symlink():
        if not force:
            raise OutputExistsError(f"{target}: already exists", hint="pass --force to replace it")
        if target.is_dir() != directory:
            kind = "a directory" if target.is_dir() else "a file"
            raise OutputExistsError(f"{target}: exists and is {kind}; refusing to replace it with the other kind")


def _inside(p: Path, tmp: Path) -> bool:
    try:
        return p.resolve() == tmp.resolve() or tmp.resolve() in p.resolve().parents
    except OSError:
        return True


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str], *, force: bool, directory: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; move it into place only when the block completes.

    A crash, an exception or Ctrl-C leaves either no output or the previous one, never a
    half-written one. The caller re-opens/validates the temporary inside the block.

    Raises:
        OutputExistsError: `out` exists and force is False.
    """
    target = Path(out)
    check_output(target, force=force, directory=directory)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise FormatError(f"{target}: parent directory {parent} does not exist")
    prefix = f".{target.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno in _USER_OS_ERRORS:
                reason = os.strerror(e.errno) if e.errno else str(e)
                where = e.filename or tmp
                if e.filename and not _inside(Path(os.fsdecode(e.filename)), tmp):
                    # not the output: an input (or another file) could not be read
                    raise LoratoolError(f"{e.filename}: {reason.lower()} (reading it); nothing was written") from None
                raise LoratoolError(
                    f"{target}: {reason.lower()} while writing ({where}); nothing was written",
                    hint="free some space or write elsewhere with -o" if e.errno in _FULL else None,
                ) from None
            raise
        if directory:
            os.chmod(tmp, 0o755)
        else:
            os.chmod(tmp, 0o644)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


_FULL = (errno.ENOSPC, errno.EDQUOT)
_USER_OS_ERRORS = (*_FULL, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


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
            for path, digest in zip(self.paths, self.digests):
                hasher = hashlib.sha256()
                with open(path, "rb", buffering=0) as f:
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
            for digest in self.digests:
                if not digest.done():
                    digest.set_exception(e)
