"""merge streams a large tensor by pieces of rows (ops.merge.PIECE_BYTES, pipeline `pieces`): read, merged
and written piece by piece, so memory holds a few pieces, not the tensor. The pieces start on the row-blocked
kernel's block edges, so the output is the same bits as the tensor merged whole, and the report's figures
the same to float rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file, save_file

import loratool.maths.merge as maths_merge
import loratool.ops.merge as ops_merge
from loratool.io.writers import StreamingWriter

STEP = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -23}


def _case(tmp: Path, dtype: torch.dtype, shapes: list[tuple[int, ...]]) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A single-file SD-style base with one weight per shape, a kohya LoRA (rank 3, alpha 6) on each."""
    g = torch.Generator().manual_seed(3)
    base, lora = {}, {}
    for i, shape in enumerate(shapes):
        base[f"model.diffusion_model.blocks.{i}.proj.weight"] = (torch.randn(shape, generator=g) * 2).to(dtype)
        tail = [1, 1] if len(shape) == 4 else []
        lora[f"lora_unet_blocks_{i}_proj.lora_down.weight"] = torch.randn(3, *shape[1:], generator=g)
        lora[f"lora_unet_blocks_{i}_proj.lora_up.weight"] = torch.randn(shape[0], 3, *tail, generator=g) * 0.1
        lora[f"lora_unet_blocks_{i}_proj.alpha"] = torch.tensor(6.0)
    save_file(base, str(tmp / "base.safetensors"))
    save_file(lora, str(tmp / "lora.safetensors"))
    return tmp / "base.safetensors", tmp / "lora.safetensors", lora


def _merge(base: Path, lora: Path, out: Path, monkeypatch: pytest.MonkeyPatch, piece: int) -> tuple[dict, list]:
    """Merge with PIECE_BYTES = piece; (the --report document, the rows of each write_piece call)."""
    pieces: list[tuple[str, int, bool]] = []
    real = StreamingWriter.write_piece

    def spy(self, key, tensor, last):  # type: ignore[no-untyped-def]
        pieces.append((key, tensor.shape[0], last))
        return real(self, key, tensor, last)

    with monkeypatch.context() as m:
        m.setattr(ops_merge, "PIECE_BYTES", piece)
        m.setattr(StreamingWriter, "write_piece", spy)
        r = run_cli(["merge", base, lora, "-o", out, "--report", out.with_suffix(".json")])
    assert r.code == 0, r.err
    return json.loads(out.with_suffix(".json").read_text()), pieces


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pieces_give_the_whole_tensor_bits_and_figures(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(maths_merge, "BLOCK_ELEMENTS", 1000)  # several blocks per piece, pieces on block edges
    shapes = [(300, 70), (97, 40, 3, 3), (64, 50)]
    base, lora, factors = _case(tmp_path, dtype, shapes)
    whole, none = _merge(base, lora, tmp_path / "whole.safetensors", monkeypatch, 1 << 30)
    assert none == []
    cut, pieces = _merge(base, lora, tmp_path / "cut.safetensors", monkeypatch, 9000)
    # 300 x 70 rows by pieces of whole blocks (14 rows) within 9000 bytes; the conv by pieces of 2 rows
    # (block 1000 // 360 = 2); the small (64, 50) float32/16 tensor goes whole when it fits
    per_key: dict[str, list[tuple[int, bool]]] = {}
    for key, rows, last in pieces:
        per_key.setdefault(key, []).append((rows, last))
    assert "model.diffusion_model.blocks.0.proj.weight" in per_key
    assert "model.diffusion_model.blocks.1.proj.weight" in per_key
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for i, shape in enumerate(shapes):
        key = f"model.diffusion_model.blocks.{i}.proj.weight"
        got = per_key.get(key)
        if got is None:
            assert np.prod(shape) * itemsize <= 9000
            continue
        rows = [r for r, _ in got]
        assert sum(rows) == shape[0] and len(rows) > 1
        assert [last for _, last in got] == [False] * (len(rows) - 1) + [True]
        unit = max(1, 1000 // int(np.prod(shape[1:])))
        assert all(r % unit == 0 for r in rows[:-1]) and rows[0] * np.prod(shape[1:]) * itemsize <= 9000
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "cut.safetensors"))
    original = load_file(str(base))
    assert list(a) == list(b) == list(original)
    for key, w in original.items():
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
        i = key.split(".")[3]
        up = factors[f"lora_unet_blocks_{i}_proj.lora_up.weight"].double().numpy().reshape(w.shape[0], 3)
        down = factors[f"lora_unet_blocks_{i}_proj.lora_down.weight"].double().numpy().reshape(3, -1)
        ref = w.double().numpy().reshape(w.shape[0], -1) + 2.0 * up @ down  # alpha / rank = 2
        got = b[key].double().numpy().reshape(w.shape[0], -1)
        step = STEP[str(dtype).removeprefix("torch.")]
        assert np.all(np.abs(got - ref) <= step * np.abs(ref) + 1e-6 * np.abs(ref).max()), key
    for field in ("merged_tensors", "copied_tensors"):
        assert cut[field] == whole[field] == (len(shapes) if field == "merged_tensors" else 0)
    for field in ("min_retained", "max_rel_error"):
        assert cut[field] == pytest.approx(whole[field], rel=1e-6, abs=1e-12)
    ta = {t["key"]: t for t in whole["tensors"]}
    for t in cut["tensors"]:
        assert t["modules"] == ta[t["key"]]["modules"]
        for f in ("delta_fro", "rel_change", "retained", "rel_error", "max_cast_error"):
            if t[f] is not None:
                assert t[f] == pytest.approx(ta[t["key"]][f], rel=1e-5, abs=1e-12), (t["key"], f)


def test_a_nan_in_a_later_piece_is_refused_and_leaves_no_output(tmp_path, monkeypatch, capsys):
    base, lora, _ = _case(tmp_path, torch.float32, [(300, 70)])
    t = load_file(str(base))
    t["model.diffusion_model.blocks.0.proj.weight"][250, 3] = float("nan")
    save_file(t, str(base))
    monkeypatch.setattr(ops_merge, "PIECE_BYTES", 9000)
    r = run_cli(["merge", base, lora, "-o", tmp_path / "out.safetensors"])
    assert r.code == 2 and r.err.count("Error:") == 1 and "NaN" in r.err, r.err
    assert "model.diffusion_model.blocks.0.proj.weight" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "lora.safetensors"]


def test_writer_refuses_pieces_that_do_not_add_up(tmp_path):
    w = StreamingWriter(tmp_path / "x.safetensors", [("a", "float32", (4, 2)), ("b", "float32", (1,))])
    w.write_piece("a", torch.zeros(3, 2), False)
    with pytest.raises(ValueError, match="rows of a"):
        w.write_piece("a", torch.zeros(2, 2), True)  # 5 rows of 4
    w.abort()
    w = StreamingWriter(tmp_path / "y.safetensors", [("a", "float32", (4, 2)), ("b", "float32", (1,))])
    with pytest.raises(ValueError, match="rows of a"):
        w.write_piece("a", torch.zeros(3, 2), True)  # last, but 3 rows of 4
    w.abort()
    w = StreamingWriter(tmp_path / "z.safetensors", [("a", "float32", (4, 2)), ("b", "float32", (1,))])
    with pytest.raises(ValueError, match="expected rows of a"):
        w.write_piece("a", torch.zeros(3, 3), False)  # another trailing shape
    w.write_piece("a", torch.ones(1, 2), False)
    w.write_piece("a", torch.full((3, 2), 2.0), True)
    w.write("b", torch.tensor([5.0]))
    w.close()
    got = load_file(str(tmp_path / "z.safetensors"))
    assert got["a"].tolist() == [[1, 1], [2, 2], [2, 2], [2, 2]] and got["b"].tolist() == [5.0]


def test_peak_memory_is_bounded_by_a_piece_not_the_tensor(tmp_path):
    """One 256 MB float32 tensor merged: before pieces the read buffer and the output slot held it whole
    (over 500 MB); now a few 16 MB pieces."""
    base = tmp_path / "big.safetensors"
    rows, cols = 8192, 8192
    w = StreamingWriter(base, [("model.diffusion_model.blocks.0.proj.weight", "float32", (rows, cols))])
    w.write_piece("model.diffusion_model.blocks.0.proj.weight", torch.full((rows // 2, cols), 0.5), False)
    w.write_piece("model.diffusion_model.blocks.0.proj.weight", torch.full((rows // 2, cols), 0.25), True)
    w.close()
    save_file({"lora_unet_blocks_0_proj.lora_down.weight": torch.randn(4, cols),
               "lora_unet_blocks_0_proj.lora_up.weight": torch.randn(rows, 4)}, str(tmp_path / "lora.safetensors"))
    script = ("import resource, sys; from loratool.ops.merge import merge; "
              "merge(sys.argv[1], [sys.argv[2]], sys.argv[3]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", script, str(base), str(tmp_path / "lora.safetensors"),
                          str(tmp_path / "o.safetensors")], capture_output=True, text=True, check=True)
    peak_mb = int(res.stdout.split()[-1]) / 1024
    baseline = subprocess.run([sys.executable, "-c", "import resource, torch, loratool.ops.merge; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, check=True)
    base_mb = int(baseline.stdout.split()[-1]) / 1024
    assert peak_mb - base_mb < 150, f"merge peak {peak_mb:.0f} MB vs {base_mb:.0f} MB after imports (tensor 256 MB)"
    got = load_file(str(tmp_path / "o.safetensors"))["model.diffusion_model.blocks.0.proj.weight"]
    assert got.shape == (rows, cols) and float(got[0, 0]) != 0.5 and float(got[-1, -1]) != 0.25


def test_cache_lead_is_a_quarter_of_available_memory(tmp_path, monkeypatch):
    from loratool.io import copies

    real_open = open

    def fake(text):  # type: ignore[no-untyped-def]
        f = tmp_path / "meminfo"
        f.write_text(text)
        return lambda path, mode="r", *a, **k: real_open(f if path == "/proc/meminfo" else path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", fake("MemTotal: 33554432 kB\nMemAvailable:   16777216 kB\n"))
    assert copies.cache_lead() == 4 << 30  # 16 GiB available
    monkeypatch.setattr("builtins.open", fake("MemAvailable:   1024 kB\n"))
    assert copies.cache_lead() == 1 << 30  # the floor
    monkeypatch.setattr("builtins.open", fake("garbage\n"))
    assert copies.cache_lead(floor=123) == 123
