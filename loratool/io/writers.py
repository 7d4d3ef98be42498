"""Writing safetensors: the header bytes, StreamingWriter (one tensor at a time) and save_tensors.

StreamingWriter writes the header first and then each tensor's bytes in the order its entries give, so
an output of any size needs memory for one tensor only; files of DIRECT_MIN_BYTES or more go through
_DirectSink (O_DIRECT from one reused, page-aligned staging buffer, where the filesystem allows it).
Header metadata and text outputs (write_text_output) are scrubbed of Hub tokens. The writers write
where they are told: the temporary that outputs.atomic_output hands them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import FormatError, scrub
from loratool.io.header import CODE_OF, ITEMSIZE, METADATA_KEY

if TYPE_CHECKING:
    import torch




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
        self._rows = 0  # rows of entry _next written so far by write_piece
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

    def write_piece(self, key: str, piece: torch.Tensor, last: bool) -> None:
        """Append the next rows of `key` (pieces in order, the last one with last=True): a tensor streamed
        by pieces, never whole in memory. The pieces must add up to the tensor, dtype and trailing shape."""
        exp_key, exp_dtype, exp_shape = self._entries[self._next]
        got_dtype = str(piece.dtype).removeprefix("torch.")
        if key != exp_key or got_dtype != exp_dtype or tuple(piece.shape[1:]) != exp_shape[1:]:
            raise ValueError(f"writer expected rows of {exp_key} {exp_dtype} {exp_shape}, got {key} {got_dtype} "
                             f"{tuple(piece.shape)}")
        self._rows += piece.shape[0]
        if self._rows > exp_shape[0] or (last and self._rows != exp_shape[0]):
            raise ValueError(f"writer got {self._rows} rows of {exp_key}, which has {exp_shape[0]}")
        if piece.numel():
            t = piece.detach().to("cpu").contiguous().reshape(-1).view(_torch().uint8)
            self._put(memoryview(t.numpy()).cast("B"))  # type: ignore[arg-type]
        if last:
            self._rows = 0
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


def write_text_output(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file of an output (a config, an index, a report): UTF-8, scrubbed of Hub tokens."""
    Path(path).write_text(scrub(text), encoding="utf-8")
