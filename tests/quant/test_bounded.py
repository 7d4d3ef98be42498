"""Quantized merges by row blocks (issue 27): memory bounded by a block, the bits of the whole tensor.

Every scheme loratool requantizes (fp8, scaled fp8, block fp8, bitsandbytes nf4/fp4/int8, nested
absmax) is merged here with blocks made a few rows small, into weights whose shapes leave partial
tiles, absmax blocks and nested blocks at the end; each result is compared bit for bit with the
numpy reference of tests/quant_refs.py, Q(dequant(W) + ΔW) over the whole tensor. A spy shows the
merge went block by block and never through the whole-tensor path; a child process shows the peak
memory of a merge into a large block-fp8 weight stays far below one float32 copy of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from quant_refs import KEY, KINDS, OTHER, as_np, exact_factors, make_base, requant, write_adapter
from safetensors.torch import load_file, save_file

import loratool.maths.merge as kernels
import loratool.ops.merge as merge_op
import loratool.storage as storage
from loratool.maths.merge import merged_tensor
from loratool.ops.merge import merge

SHAPE = (200, 80)  # 80 columns: block-fp8's 32-wide tiles end partial, bnb's 64-blocks cross rows
SMALL = 80 * 40  # elements per block: blocks of 40 rows (32 for block fp8, its tile rows)


@pytest.fixture
def spy(monkeypatch):
    """Small blocks; records the rows of every block dequantized; the whole-tensor path fails."""
    rows: list[int] = []
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", SMALL)
    whole = storage.RowBlocks.dequantize

    def dequantize(self, start, stop):
        rows.append(stop - start)
        return whole(self, start, stop)

    def refuse(*args, **kwargs):
        raise AssertionError("a whole quantized tensor went through merged_tensor")

    monkeypatch.setattr(storage.RowBlocks, "dequantize", dequantize)
    monkeypatch.setattr(merge_op, "merged_tensor", refuse)
    return rows


@pytest.mark.parametrize("kind", KINDS)
def test_blocked_merge_equals_the_whole_tensor_reference(tmp_path, monkeypatch, spy, kind):
    base, tensors, deq = make_base(tmp_path, kind, shape=SHAPE)
    a, b = exact_factors(4, seed=1, scale=0.5, out=SHAPE[0], inp=SHAPE[1])
    lora = write_adapter(tmp_path / "lora", a, b)
    report = merge(base, [lora], tmp_path / "out", stats=True)
    want = requant(kind, KEY + ".weight", (deq + b @ a).astype(np.float32), tensors)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in want.items():
        assert np.array_equal(as_np(got[k]), v.reshape(as_np(got[k]).shape)), f"{kind}: {k} differs"
    assert len(spy) > 3 and max(spy) <= 40 and sum(spy) == SHAPE[0]  # block by block, each row once
    # the realized delta summed over blocks is the whole tensor's (which test_merge_quantized checks
    # against numpy): the whole-tensor path with the spy's refusal lifted
    monkeypatch.setattr(merge_op, "block_rows", lambda s: None)
    monkeypatch.setattr(merge_op, "merged_tensor", merged_tensor)
    whole = merge(base, [lora], tmp_path / "whole", stats=True)
    ((stat,), (ref,)) = report.tensors, whole.tensors
    for field in ("delta_fro", "rel_change", "max_cast_error", "retained", "rel_error"):
        assert getattr(stat, field) == pytest.approx(getattr(ref, field), rel=1e-5, abs=1e-7), field
    assert stat.storage == ref.storage


@pytest.mark.parametrize("kind", ["block", "nf4_nested", "int8", "scaled_rows"])
def test_blocked_dequantized_output(tmp_path, spy, kind):
    """--dtype bf16: the merged tensor and an unmerged quantized neighbour, both dequantized by blocks."""
    other: dict[str, np.ndarray] = {}
    base, _, deq = make_base(tmp_path, kind, shape=SHAPE, other_deq=other)
    a, b = exact_factors(4, seed=2, scale=0.5, out=SHAPE[0], inp=SHAPE[1])
    lora = write_adapter(tmp_path / "lora", a, b)
    merge(base, [lora], tmp_path / "out", dtype="bf16")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = torch.from_numpy((deq + b @ a).astype(np.float32)).bfloat16()
    assert torch.equal(got[KEY + ".weight"], want)
    assert torch.equal(got[OTHER + ".weight"], torch.from_numpy(other[OTHER + ".weight"]).bfloat16())
    assert sum(spy) == 2 * SHAPE[0] and max(spy) <= 40


@pytest.mark.parametrize("kind", ["fp8", "scaled_rows", "block"])
def test_stochastic_rounding_draws_the_same_stream_by_blocks(tmp_path, monkeypatch, kind):
    """Seeded stochastic rounding gives the same bits whole or by blocks (one stream, in row order)."""
    base, _, _ = make_base(tmp_path, kind, shape=SHAPE)
    a, b = exact_factors(4, seed=3, scale=0.125, out=SHAPE[0], inp=SHAPE[1])
    lora = write_adapter(tmp_path / "lora", a, b)
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", SMALL)
    merge(base, [lora], tmp_path / "blocks", rounding="stochastic", seed=5)
    monkeypatch.setattr(merge_op, "block_rows", lambda s: None)  # the whole-tensor path
    merge(base, [lora], tmp_path / "whole", rounding="stochastic", seed=5)
    blocks = load_file(str(tmp_path / "blocks" / "model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert set(blocks) == set(whole)
    for k in blocks:
        assert torch.equal(blocks[k].view(torch.uint8) if blocks[k].dim() else blocks[k],
                           whole[k].view(torch.uint8) if whole[k].dim() else whole[k]), k


def test_peak_memory_is_bounded_by_a_block_not_the_tensor(tmp_path):
    """A 8192 x 4096 block-fp8 weight (32 MB stored, 128 MB as float32): the merge's own peak stays
    below 300 MB (read and output buffers of the stored bytes, a few blocks); the whole-tensor path
    held about five float32 copies (over 600 MB)."""
    rows, cols = 8192, 4096
    torch.manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    q = (torch.rand(rows, cols) * 2 - 1).mul_(400).to(torch.float8_e4m3fn)
    save_file({KEY + ".weight": q, KEY + ".weight_scale_inv": torch.full((rows // 128, cols // 128), 1e-4)},
              str(base / "model.safetensors"))
    del q
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    a, b = torch.randn(8, cols) / cols**0.5, torch.randn(rows, 8) * 1e-3
    write_adapter(tmp_path / "lora", a.numpy(), b.numpy())
    script = textwrap.dedent(f"""
        import resource, torch
        from loratool.ops.merge import merge
        torch.mm(torch.ones(64, 64), torch.ones(64, 64))  # torch's own start-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = merge({str(base)!r}, [{str(tmp_path / 'lora')!r}], {str(tmp_path / 'out')!r})
        assert report.merged == 1
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300)
    grown = float(out.stdout.split()[-1])
    assert grown < 300, f"peak RSS grew {grown:.0f} MB during the merge"
