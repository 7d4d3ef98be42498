"""loratool.io on its own: header parsing against files the safetensors library writes, the streaming
writer against what the safetensors library reads back, atomic outputs, checkpoints, hashing."""

from __future__ import annotations

import errno
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.errors import FormatError, LoratoolError, OutputExistsError
from loratool.io import writers
from loratool.io.checkpoint import INDEX_NAME, open_checkpoint
from loratool.io.copies import BackgroundSha256, sha256_file
from loratool.io.header import read_header
from loratool.io.outputs import atomic_output
from loratool.io.tensors import TensorRef, load_tensor, read_scalar
from loratool.io.writers import StreamingWriter, _DirectSink, save_tensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=gen),
        "b.bf16": torch.randn(4, generator=gen).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, 1, 1, generator=gen).half(),
        "d.ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.empty": torch.zeros(0, 7),
        "f.scalar": torch.tensor(2.5),
    }


# ---------------------------------------------------------------------------------------------
# header parsing


def test_header_of_a_safetensors_library_file(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path), metadata={"format": "pt", "k": "v"})
    parsed = read_header(path)
    assert parsed.metadata == {"format": "pt", "k": "v"}
    assert parsed.size == path.stat().st_size
    assert set(parsed.tensors) == set(tensors)
    for key, t in tensors.items():
        info = parsed.tensors[key]
        assert (info.dtype, info.shape) == (str(t.dtype).removeprefix("torch."), tuple(t.shape))
        assert info.nbytes == t.numel() * t.element_size()
        assert torch.equal(load_tensor(info), t)
    assert read_scalar(parsed.tensors["f.scalar"]) == 2.5


@pytest.mark.parametrize(("dtype", "value"), [(torch.float32, 0.1), (torch.float16, -3.5), (torch.bfloat16, 1.25),
                                              (torch.float64, 1e-300), (torch.int32, -7), (torch.int64, 2**40)])
def test_scalars_decode_without_torch(tmp_path, dtype, value):
    path = tmp_path / "s.safetensors"
    t = torch.tensor([value], dtype=dtype)
    save_file({"alpha": t}, str(path))
    assert read_scalar(read_header(path).tensors["alpha"]) == float(t.item())


def _raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(("header", "data", "length", "message"), [
    (b"", b"", 3, "exceeds the file size"),
    (b"# loratool\n\nInspect, validate ...", b"", 0x6F746172_6F6C2023, "not a safetensors file"),  # README.md
    (b"not json", b"", None, "header is not valid JSON"),
    ([1, 2], b"", None, "header is a JSON list"),
    ({"__metadata__": {"a": 1}}, b"", None, "__metadata__ must map strings to strings"),
    ({"t": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "tensor 't': unknown dtype"),
    ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "tensor 't': bad shape"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None, "tensor 't': bad data_offsets"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None, "hold 8 bytes but dtype F32"),
    (GOOD, bytes(4), None, "tensor 't': data ends at byte 8 of the data section but the file has only 4"),
    ({"t": [1]}, b"", None, "tensor 't': header entry is not an object"),
])
def test_header_problems_name_the_file_and_key(tmp_path, header, data, length, message):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(FormatError, match=message) as exc:
        read_header(path)
    assert str(path) in str(exc.value)


def test_short_missing_and_directory_paths(tmp_path):
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(FormatError, match="3 bytes"):
        read_header(tmp_path / "short")
    with pytest.raises(FormatError, match="no such file"):
        read_header(tmp_path / "nope")
    with pytest.raises(FormatError, match="is a directory"):
        read_header(tmp_path)


# ---------------------------------------------------------------------------------------------
# TensorRef


def test_tensor_refs_are_lazy_and_equal_to_their_data(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path))
    info = read_header(path).tensors["a.weight"]
    ref = TensorRef.from_info(info)
    assert (ref.shape, ref.dtype, ref.numel, ref.nbytes) == ((3, 5), "float32", 15, 60)
    assert str(path) in ref.source and "'a.weight'" in ref.source
    assert torch.equal(ref.load(), tensors["a.weight"])
    mem = TensorRef.from_tensor(tensors["b.bf16"])
    assert (mem.shape, mem.dtype, mem.nbytes, mem.source) == ((4,), "bfloat16", 8, "<memory>")
    assert TensorRef.from_tensor(torch.tensor([[3.0]])).scalar() == 3.0
    with pytest.raises(FormatError, match="single number"):
        mem.scalar()


# ---------------------------------------------------------------------------------------------
# writing


def test_save_tensors_is_read_back_by_the_safetensors_library(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = _tensors()
    save_tensors(path, tensors, {"who": "loratool"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for key, t in tensors.items():
        assert torch.equal(back[key], t), key
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"who": "loratool"}
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0  # the data section starts 8-byte aligned, as safetensors writes it


def test_streaming_writer_layout_order_copy_and_patch(tmp_path):
    src = tmp_path / "src.safetensors"
    big = torch.arange(1000, dtype=torch.float32)
    save_file({"big": big}, str(src))
    info = read_header(src).tensors["big"]
    small = torch.ones(2, 3, dtype=torch.float16)
    entries = [("z.small", "float16", (2, 3)), ("a.big", "float32", (1000,))]
    placeholder = "0" * 64
    out = tmp_path / "out.safetensors"
    w = StreamingWriter(out, entries, {"sha": placeholder}, header_order=["a.big", "z.small"])
    w.write("z.small", small)
    with open(src, "rb") as f:
        w.copy_range("a.big", f.fileno(), info.start, info.nbytes)
    digest = hashlib.sha256(b"x").hexdigest()
    w.patch_header(placeholder, digest)
    w.close()
    parsed = read_header(out)
    assert list(parsed.tensors) == ["a.big", "z.small"]  # header order as asked
    assert parsed.tensors["z.small"].start < parsed.tensors["a.big"].start  # data in entries order
    assert parsed.metadata == {"sha": digest}
    back = load_file(str(out))
    assert torch.equal(back["a.big"], big) and torch.equal(back["z.small"], small)


def _write_mixed(path: Path, src: Path) -> dict[str, torch.Tensor]:
    """Every writer operation, with sizes that cross staging chunks and end off the alignment."""
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "a": torch.randn(3000, generator=gen),  # 12000 bytes: crosses an 8 KiB chunk
        "b.scales": torch.randn(5, generator=gen),  # reserved, filled after "c"
        "c": torch.randn(777, generator=gen).to(torch.bfloat16),
        "d.copied": torch.arange(2500, dtype=torch.float32),
        "e": torch.randn(3, generator=gen).half(),  # ends the file off the 4 KiB alignment
    }
    save_file({"d.copied": tensors["d.copied"]}, str(src))
    info = read_header(src).tensors["d.copied"]
    entries = [(k, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()]
    placeholder = "0" * 64
    w = StreamingWriter(path, entries, {"sha": placeholder})
    w.write("a", tensors["a"])
    w.reserve("b.scales")
    w.write("c", tensors["c"])
    w.write_at("b.scales", tensors["b.scales"])
    with open(src, "rb") as f:
        w.copy_range("d.copied", f.fileno(), info.start, info.nbytes)
    w.write("e", tensors["e"])
    w.patch_header(placeholder, "f" * 64)
    w.close()
    return tensors


@pytest.mark.parametrize("refuse", [False, True], ids=["direct", "direct-refused"])
def test_streaming_writer_direct_io_writes_the_same_bytes(tmp_path, monkeypatch, refuse):
    """Large files bypass the page cache (O_DIRECT via an aligned staging buffer); the bytes are the
    buffered writer's, whatever the chunking, and a filesystem that refuses O_DIRECT (EINVAL) gets
    them through the buffered descriptor."""
    import os

    buffered = tmp_path / "buffered.safetensors"
    expected = _write_mixed(buffered, tmp_path / "src1.safetensors")
    monkeypatch.setattr(writers, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(writers, "_STAGE_BYTES", 8192)
    opened: list[_DirectSink] = []
    real_open, real_pwrite = _DirectSink.open.__func__, os.pwrite  # type: ignore[attr-defined]

    def spy_open(cls, path, fallback_fd):
        sink = real_open(cls, path, fallback_fd)
        opened.append(sink)
        return sink

    def pwrite(fd, data, offset):
        if refuse and any(s.fd == fd for s in opened if s is not None):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(_DirectSink, "open", classmethod(spy_open))
    monkeypatch.setattr(os, "pwrite", pwrite)
    direct = tmp_path / "direct.safetensors"
    _write_mixed(direct, tmp_path / "src2.safetensors")
    assert len(opened) == 1  # (None where the filesystem cannot open with O_DIRECT: buffered then)
    assert direct.read_bytes() == buffered.read_bytes()
    back = load_file(str(direct))
    assert all(torch.equal(back[k], t) for k, t in expected.items())
    assert read_header(direct).metadata == {"sha": "f" * 64}


def test_streaming_writer_direct_io_off_by_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setenv("LORATOOL_DIRECT_IO", "0")
    w = StreamingWriter(tmp_path / "o.safetensors", [("a", "float32", (2,))])
    assert w._direct is None
    w.write("a", torch.ones(2))
    w.close()
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["a"], torch.ones(2))


def test_streaming_writer_refuses_what_its_layout_did_not_announce(tmp_path):
    w = StreamingWriter(tmp_path / "o.safetensors", [("a", "float32", (2,)), ("b", "float32", (1,))])
    with pytest.raises(ValueError, match="expected a float32"):
        w.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="expected a float32"):
        w.write("b", torch.zeros(1))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed after 1 of 2"):
        w.close()
    with pytest.raises(ValueError, match="placeholder"):
        StreamingWriter(tmp_path / "p.safetensors", [], {"k": "v"}).patch_header("nothere", "nothing")


# ---------------------------------------------------------------------------------------------
# atomic outputs


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("directory", [False, True])
def test_atomic_output_appears_only_when_complete(tmp_path, directory):
    out = tmp_path / "out"
    with atomic_output(out, force=False, directory=directory) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and not out.exists()
        if directory:
            (tmp / "f").write_text("new")
        else:
            tmp.write_text("new")
    assert _entries(tmp_path) == ["out"]
    assert (out / "f" if directory else out).read_text() == "new"


@pytest.mark.parametrize("directory", [False, True])
def test_atomic_output_failure_leaves_the_previous_output(tmp_path, directory):
    out = tmp_path / "out"
    if directory:
        out.mkdir()
        (out / "f.json").write_text("old")
        save_file({"w": torch.zeros(1)}, str(out / "w.safetensors"), metadata={"loratool.op": "merge"})
    else:
        out.write_text("old")
    kind = "model" if directory else None  # force replaces only a folder that looks like an earlier output
    with pytest.raises(RuntimeError, match="boom"), \
            atomic_output(out, force=True, directory=directory, kind=kind) as tmp:
        (tmp / "f.json" if directory else tmp).write_text("half")
        raise RuntimeError("boom")
    assert _entries(tmp_path) == ["out"]
    assert (out / "f.json" if directory else out).read_text() == "old"
    with atomic_output(out, force=True, directory=directory, kind=kind) as tmp:  # force replaces it whole
        (tmp / "g.json" if directory else tmp).write_text("new")
    assert _entries(tmp_path) == ["out"]
    if directory:
        assert _entries(out) == ["g.json"]
    else:
        assert out.read_text() == "new"


def test_atomic_output_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"), \
            atomic_output(tmp_path / "file", force=False, directory=False):
        pass
    with pytest.raises(OutputExistsError, match="is a directory"), \
            atomic_output(tmp_path / "dir", force=True, directory=False):
        pass
    with pytest.raises(OutputExistsError, match="is a file"), \
            atomic_output(tmp_path / "file", force=True, directory=True):
        pass
    with pytest.raises(FormatError, match="parent directory"), \
            atomic_output(tmp_path / "no" / "out", force=False, directory=False):
        pass
    assert _entries(tmp_path) == ["dir", "file"] and (tmp_path / "file").read_text() == "x"


def test_disk_full_is_a_user_error_and_leaves_nothing(tmp_path):
    with pytest.raises(LoratoolError, match=r"no space left on device while writing.*nothing was written") as exc, \
            atomic_output(tmp_path / "out", force=False, directory=False) as tmp:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert exc.value.hint and "free some space" in exc.value.hint
    assert _entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# checkpoints and hashing


def test_checkpoint_layouts(tmp_path):
    a, b = {"x.weight": torch.ones(2, 2)}, {"y.weight": torch.zeros(3)}
    single = tmp_path / "single.safetensors"
    save_file({**a, **b}, str(single))
    assert list(open_checkpoint(single).tensors) == ["x.weight", "y.weight"]

    d = tmp_path / "dir"
    d.mkdir()
    save_file(a, str(d / "model.safetensors"))
    ckpt = open_checkpoint(d)
    assert ckpt.files == [d / "model.safetensors"] and ckpt.index is None

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file(a, str(sharded / "m-1.safetensors"))
    save_file(b, str(sharded / "m-2.safetensors"))
    index = {"metadata": {}, "weight_map": {"x.weight": "m-1.safetensors", "y.weight": "m-2.safetensors"}}
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    ckpt = open_checkpoint(sharded)
    assert [f.name for f in ckpt.files] == ["m-1.safetensors", "m-2.safetensors"]
    assert ckpt.tensors["y.weight"].path == sharded / "m-2.safetensors"

    index["weight_map"]["z.weight"] = "m-2.safetensors"
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FormatError, match=r"'z\.weight'"):
        open_checkpoint(sharded)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match="pickle checkpoints are not supported"):
        open_checkpoint(tmp_path / "w.bin")


def test_background_sha256_matches_hashlib(tmp_path):
    files = []
    for i, size in enumerate((0, 1000, 3 << 20)):
        p = tmp_path / f"f{i}"
        p.write_bytes(np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes())
        files.append(p)
    hasher = BackgroundSha256(files, lead=1 << 20)
    hasher.advance(10 << 20)
    want = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert hasher.result() == want
    assert sha256_file(files[2]) == want[str(files[2])]
