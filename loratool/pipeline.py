"""The streaming read/compute/write pipeline over safetensors files (merge's engine).

One base file is rewritten tensor by tensor, in on-disk order, in three stages in step: a reader
thread reads tensor i+1, the calling thread computes tensor i, a writer thread writes tensor i-1
(and finishes a file, header patch and fsync, while the next file is computed). A tensor the caller
splits (`pieces`) goes through the stages piece by piece, each piece computed on the caller's
workers while the next is read and queued. Tensors without a change are copied byte for byte in the
kernel. Read buffers and cast-result slots are reused from tensor to tensor (and across files), so
peak memory is a few times the largest tensor that is not split, whatever the model or shard size.
What each tensor becomes is the caller's business (`compute`); this module only moves bytes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.io.checkpoint import Checkpoint
from loratool.io.header import SafetensorsFile, TensorInfo, read_side_file
from loratool.io.writers import StreamingWriter, ended_early
from loratool.maths.merge import Workspace

if TYPE_CHECKING:
    import torch

# compute(info, stored, cast, rows) -> the tensor to write, or None for "as stored" (copied byte for
# byte when its bytes were not read, else cast to the output dtype), or a dict holding this key's
# tensor and those of later or reserved entries it determines (a quantized weight's recomputed
# scales). `stored` is None when needs_bytes(info) is false; cast(new, dtype) copies a result into
# a reused output slot. rows is None for the whole tensor, or (start, stop) of its first axis for a
# tensor streamed by pieces (`pieces`): `stored` is then those rows, and the result is Pending.
Cast = Callable[["torch.Tensor", str], "torch.Tensor"]
# (the output's rows, settle, inputs free): a piece still being computed elsewhere. settle() waits for it (and
# may raise), on the writer's thread, before its rows are written; `stored` may be reused once the event is set.
Pending = tuple["torch.Tensor", Callable[[], None], threading.Event]
Compute = Callable[[TensorInfo, "torch.Tensor | None", Cast, "tuple[int, int] | None"],
                   "torch.Tensor | dict[str, torch.Tensor] | Pending | None"]
# pieces(info) -> row ranges of the first axis, in order and covering it, to read, compute and write the
# tensor by (memory then holds a few pieces, not the tensor), or None to take it whole
Pieces = Callable[[TensorInfo], "list[tuple[int, int]] | None"]
# out_entry(info) -> (dtype, shape) written for this tensor, or None to leave it out
OutEntry = Callable[[TensorInfo], "tuple[str, tuple[int, ...]] | None"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while files stream (or torch is imported), back on (as it
    was) afterwards.

    The per-block tensor objects of a merge trigger collections that walk every object the torch
    import created (a few percent of a merge's CPU time); the pipeline makes no reference cycles
    worth collecting meanwhile.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_range(fd: int, start: int, n: int, into: bytearray | None = None) -> bytearray | memoryview:
    """n bytes of fd from start, into `into` (reused) when given, else into a new bytearray."""
    buf = bytearray(n) if into is None else into
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        chunk = os.preadv(fd, [view[got:]], start + got)
        if chunk == 0:
            raise ended_early(fd, start + got)
        got += chunk
    return buf if into is None else view


def tensor_from(data: bytearray | memoryview, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A tensor viewing `data` (no copy), with info's dtype and shape (rows start:stop of it, if given)."""
    import torch

    dtype = getattr(torch, info.dtype)
    shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
    if not len(data):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _piece_range(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int]:
    """(file offset, byte count) of rows start:stop of a tensor (all of it for None)."""
    if rows is None:
        return info.start, info.nbytes
    row = info.nbytes // info.shape[0]
    return info.start + rows[0] * row, (rows[1] - rows[0]) * row


@dataclass
class Timings:
    """Where the calling thread's time went, in seconds, summed over the files of one run.

    read_wait: waiting for the reader thread; compute: the tensor maths and casts; write_wait:
    waiting for an output slot to be written out; finish_wait: waiting for the files' last writes,
    header patches (hence the sha256) and fsyncs. A pipeline at disk speed spends its time waiting.
    """

    read_wait: float = 0.0
    compute: float = 0.0
    write_wait: float = 0.0
    finish_wait: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class Buffers:
    """What the files of one run share: read buffers, output slots, the float32 workspace."""

    work: Workspace = field(default_factory=Workspace)
    # two cast-result slots, each busy until the write that uses it is done
    out_slots: list[tuple[Workspace, Future[None] | None]] = field(
        default_factory=lambda: [(Workspace(), None), (Workspace(), None)])
    # four more for pieces (a piece is small): the writer, which waits for a piece's rows and then for the
    # disk, may fall behind by a few pieces without holding up the workers
    piece_slots: list[tuple[Workspace, Future[None] | None]] = field(
        default_factory=lambda: [(Workspace(), None) for _ in range(4)])
    reads: list[bytearray] = field(default_factory=list)
    # tensors computed before their turn (siblings of a weight that comes earlier), and the keys
    # already written: a later computation of the same key is dropped (computations are seeded)
    stash: dict[str, torch.Tensor] = field(default_factory=dict)
    written: set[str] = field(default_factory=set)
    timings: Timings = field(default_factory=Timings)

    def read_buffers(self, nbytes: int) -> list[bytearray]:
        if not self.reads or len(self.reads[0]) < nbytes:
            self.reads = [bytearray(nbytes), bytearray(nbytes)]
        return self.reads


def stream_file(
    src: SafetensorsFile,
    dst: Path,
    meta: dict[str, str],
    placeholder: str,
    *,
    out_entry: OutEntry,
    needs_bytes: Callable[[TensorInfo], bool],
    compute: Compute,
    produced_by: Callable[[str], str | None] = lambda key: None,
    pieces: Pieces = lambda info: None,
    tick: Callable[[int], None],
    digest: Future[str],
    buffers: Buffers,
) -> Future[None]:
    """Rewrite one safetensors file into `dst`: three stages in step, each in its own thread.

    A reader reads tensor i+1, the calling thread computes tensor i, a writer writes tensor i-1;
    the file's sha256 (for the provenance, patched over `placeholder` in the header) comes from
    `digest`, computed alongside. Byte buffers are reused in rotation (two for reading, two for
    cast results), so memory stays at a few times the largest tensor; a tensor that `pieces` splits
    goes through the three stages piece by piece, so only its pieces count.

    A tensor that `produced_by` names another key for (a scale recomputed with its weight) is
    written from the stash when that key came first, or reserved and filled in place when it comes
    later in this file; the caller stashes, before streaming, those whose producer lies in a later file.

    Returns the future of the file's completion (its last writes, header patch and fsync), which
    runs while the next file is computed.
    """
    import torch

    layout = {i.key: out_entry(i) for i in src.tensors.values()}
    order = [i for i in sorted(src.tensors.values(), key=lambda i: i.start) if layout[i.key] is not None]
    # what goes through the stages: a tensor, or one piece of a tensor that `pieces` splits
    units: list[tuple[TensorInfo, tuple[int, int] | None]] = []
    for info in order:
        split = pieces(info) if needs_bytes(info) and produced_by(info.key) is None else None
        units.extend((info, rows) for rows in split) if split else units.append((info, None))
    position = {info.key: n for n, (info, rows) in reversed(list(enumerate(units)))}  # a tensor's first unit
    entries = [(i.key, *layout[i.key]) for i in order]  # type: ignore[misc]
    writer = StreamingWriter(dst, entries, meta, header_order=[k for k in src.tensors if layout[k] is not None])
    reserved: set[str] = set()
    stash = buffers.stash
    fd = os.open(src.path, os.O_RDONLY)
    reader = ThreadPoolExecutor(max_workers=1)  # one worker: reads strictly in file order
    writes = ThreadPoolExecutor(max_workers=1)  # one worker: writes strictly in file order
    pending: list[Future[None]] = []

    largest = max((_piece_range(i, rows)[1] for i, rows in units if needs_bytes(i)), default=0)
    in_bufs = buffers.read_buffers(largest) if largest else []
    out_slots = buffers.out_slots
    timings = buffers.timings

    in_use: list[threading.Event | None] = [None, None]  # a piece still computed from read buffer 0 or 1

    def read(n: int, busy: threading.Event | None) -> bytearray | memoryview | None:
        """Unit n's bytes (in buffer n % 2) when they are needed; None for those copied as they are."""
        info, rows = units[n]
        if busy is not None:
            busy.wait()  # no worker reads the piece before it in this buffer any more
        return read_range(fd, *_piece_range(info, rows), into=in_bufs[n % 2]) if needs_bytes(info) else None

    def fetch(n: int) -> Future[bytearray | memoryview | None] | None:
        # buffer n % 2 was last used by unit n - 2: the main thread is done with it (it converts a
        # unit's bytes before it asks for the next one), and a piece's computation once it has settled
        return reader.submit(read, n, in_use[n % 2]) if n < len(units) else None

    def submit(fn: Callable[..., None], *args: Any) -> Future[None]:
        while pending and pending[0].done():
            pending.pop(0).result()  # a failed write (ENOSPC, ...) surfaces here, not at the end
        fut = writes.submit(fn, *args)
        pending.append(fut)
        return fut

    slot_used: list[int] = []  # the output slot the current tensor's result lives in, if any

    def cast_into_slot(n: int, out_slots: list[tuple[Workspace, Future[None] | None]]) -> Cast:
        def slot_buffer(shape: tuple[int, ...] | torch.Size, dtype: str) -> torch.Tensor:
            """The output slot that is free again, as an uninitialised tensor to be filled."""
            slot = n % len(out_slots)
            ws, busy = out_slots[slot]
            if busy is not None:
                t = time.perf_counter()
                if busy.exception() is not None:  # waits; writes after a failed one fail too:
                    for fut in pending:  # surface the first failure (ENOSPC), not a later symptom
                        if fut.done() and fut.exception() is not None:
                            fut.result()
                busy.result()  # written out: its buffer may be reused
                timings.write_wait += time.perf_counter() - t
            slot_used.append(slot)
            return ws.get("out", shape, getattr(torch, dtype), "cpu")

        def cast(new: torch.Tensor, dtype: str) -> torch.Tensor:
            """new cast to dtype on the CPU, in the output slot that is free again."""
            return slot_buffer(new.shape, dtype).copy_(new)

        cast.buffer = slot_buffer  # type: ignore[attr-defined]  # fill it block by block (maths.merge.merge_blocked)
        return cast

    skipped = sum(i.nbytes for i in src.tensors.values() if layout[i.key] is None)
    if skipped:
        tick(skipped)  # tensors left out of the output (a dequantized base's scales)
    try:
        ahead = fetch(0)
        for n, (info, rows) in enumerate(units):
            assert ahead is not None
            t = time.perf_counter()
            data = ahead.result()
            t_read = time.perf_counter()
            timings.read_wait += t_read - t
            wait_before = timings.write_wait
            ahead = fetch(n + 1)  # into the other buffer: read the next tensor meanwhile
            key = info.key
            if rows is not None:  # one piece of a tensor: computed (on the workers, meanwhile) and written on its own
                slot_used.clear()
                cast = cast_into_slot(n, buffers.piece_slots)
                assert data is not None
                part = tensor_from(data, info, rows)
                del data
                result = compute(info, part, cast, rows)
                assert isinstance(result, tuple)
                piece, settle, free = result
                del part, result
                timings.compute += time.perf_counter() - t_read - (timings.write_wait - wait_before)
                fut = submit(_write_piece, writer, key, piece, rows[1] == info.shape[0], settle)
                in_use[n % 2] = free
                for slot in slot_used:
                    buffers.piece_slots[slot] = (buffers.piece_slots[slot][0], fut)
                if rows[1] == info.shape[0]:
                    buffers.written.add(key)
                del piece
                tick(_piece_range(info, rows)[1])
                continue
            in_use[n % 2] = None
            if key in stash:  # computed with an earlier tensor
                submit(writer.write, key, stash.pop(key))
                buffers.written.add(key)
                tick(info.nbytes)
                continue
            producer = produced_by(key)
            if producer is not None and producer in position and position[producer] > n:
                submit(writer.reserve, key)  # filled in place once its producer is computed
                reserved.add(key)
                tick(info.nbytes)
                continue
            slot_used.clear()
            cast = cast_into_slot(n, out_slots)
            stored = tensor_from(data, info) if data is not None else None
            del data
            result = compute(info, stored, cast, None)
            out: torch.Tensor | None
            if isinstance(result, dict):
                out = result.pop(key)
                for other, value in result.items():
                    if other in reserved:
                        reserved.discard(other)
                        submit(writer.write_at, other, value)
                    elif other not in buffers.written:
                        stash[other] = value
            else:
                assert not isinstance(result, tuple), "a whole tensor's result is ready"
                out = result
            if out is None and stored is not None:  # a dtype change only
                entry = layout[key]
                assert entry is not None
                out = cast(stored, entry[0])
            del stored, result
            timings.compute += time.perf_counter() - t_read - (timings.write_wait - wait_before)
            if out is None:
                submit(writer.copy_range, key, fd, info.start, info.nbytes)  # byte for byte, in the kernel
            else:
                fut = submit(writer.write, key, out)
                for slot in slot_used:
                    out_slots[slot] = (out_slots[slot][0], fut)
            buffers.written.add(key)
            del out
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
        for busy in in_use:  # a cancelled piece never settles: the reader must not wait for it
            if busy is not None:
                busy.set()
        writer.abort()
        os.close(fd)
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
    writes.shutdown(wait=False)  # its thread finishes the queued writes and finish(), then ends
    return done


def _write_piece(writer: StreamingWriter, key: str, piece: torch.Tensor, last: bool, settle: Callable[[], None]
                 ) -> None:
    """On the writer's thread: wait for a piece's rows (settle), then append them to the file."""
    settle()
    writer.write_piece(key, piece, last)


def copy_other_files(ckpt: Checkpoint, tmp: Path, *, dtype_changed: bool, dropped: set[str] | None = None,
                     drop_quantization: bool = False) -> None:
    """Copy every non-weight file (config, tokenizer, ...) and rewrite the index's total_size.

    Hidden entries (.git, .cache) stay behind. Symbolic links are followed (a Hugging Face cache
    snapshot is made of them); a file that cannot be read, a special file, a broken link or a loop
    fails the merge, naming it, rather than leaving an incomplete copy. `dropped` keys leave the
    index's weight_map; drop_quantization removes config.json's quantization_config (a dequantized
    copy of a quantized base).
    """
    from loratool.io.copies import copy_input_file, copy_tree_files
    from loratool.io.header import read_header
    from loratool.io.writers import write_text_output

    weight_files = {os.path.abspath(f) for f in ckpt.files}
    for src, rel in copy_tree_files(ckpt.root):
        if os.path.abspath(src) in weight_files:
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if re.search(r"\.safetensors\.index\.json$", src.name) and ckpt.index is not None and src.parent == ckpt.root:
            index = dict(ckpt.index)  # as parsed and checked by open_checkpoint
            if dropped and isinstance(index.get("weight_map"), dict):
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in dropped}
            if dtype_changed:
                total = 0
                for f in ckpt.files:
                    total += sum(i.nbytes for i in read_header(tmp / f.relative_to(ckpt.root)).tensors.values())
                index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
            write_text_output(dst, json.dumps(index, indent=2) + "\n")
        elif drop_quantization and Path(rel) == Path("config.json"):
            config = json.loads(read_side_file(src).decode("utf-8"))
            config.pop("quantization_config", None)
            write_text_output(dst, json.dumps(config, indent=2) + "\n")
        else:
            copy_input_file(src, dst)
