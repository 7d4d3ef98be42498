"""Benchmark: loratool merge into a Q4_K GGUF base (dequantize, merge, requantize as llama.cpp's
reference quantizer does, a block of rows at a time).

Input: a generated llama GGUF of the dimensions of bench_merge_quantized.py (hidden 2048,
intermediate 8192, 32 / 8 heads, vocab 32000, untied; 16 layers is about 1.1B parameters) written
with the gguf package, every weight matrix in Q4_K (the output head in Q6_K, as llama-quantize's
Q4_K_M leaves it), norms in F32; random blocks (only sizes matter: the half-float scales are set to
small finite values, the rest of each block is random bytes). A PEFT r16 adapter on q, k, v and o
(64 merged tensors, 0.17B values requantized).

Contenders, each whole-process with `sync` after it: `cp BASE X`, `loratool merge` (Q4_K kept),
`loratool merge --dtype bf16` (the adapted tensors written as BF16, the others copied). Peak RSS is
each child's ru_maxrss (bench_merge_quantized.rss_of). Check: the gguf package reads the merged file,
with the base's tensors, types and shapes.

Run: python tests/perf/bench_merge_gguf.py [--layers 16] [--workdir /tmp/bench_merge_gguf] [--keep]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench_merge_quantized import HEADS, HIDDEN, INTER, KV, VOCAB, bench_args, finish, make_adapter, run_rows

# GGUF tensor (numpy order: rows, columns) per layer, with the transformers module it adapts
KV_ROWS = KV * HIDDEN // HEADS
LAYER = {"attn_q": ((HIDDEN, HIDDEN), "self_attn.q_proj"), "attn_k": ((KV_ROWS, HIDDEN), "self_attn.k_proj"),
         "attn_v": ((KV_ROWS, HIDDEN), "self_attn.v_proj"), "attn_output": ((HIDDEN, HIDDEN), "self_attn.o_proj"),
         "ffn_gate": ((INTER, HIDDEN), None), "ffn_up": ((INTER, HIDDEN), None), "ffn_down": ((HIDDEN, INTER), None)}
HALVES = {"Q4_K": (0, 2), "Q6_K": (208,)}  # byte offsets of each block's half-float scales


def random_blocks(rng, name: str, shape: tuple[int, int]):
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in HALVES[name]:
        blocks[:, at:at + 2] = rng.uniform(1e-4, 2e-3, len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def make_base(path: Path, layers: int) -> int:
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_context_length(4096)
    tensors: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (VOCAB, HIDDEN), "Q4_K")]
    for i in range(layers):
        tensors += [(f"blk.{i}.{n}.weight", shape, "Q4_K") for n, (shape, _) in LAYER.items()]
        tensors += [(f"blk.{i}.attn_norm.weight", (HIDDEN,), "F32"), (f"blk.{i}.ffn_norm.weight", (HIDDEN,), "F32")]
    tensors += [("output_norm.weight", (HIDDEN,), "F32"), ("output.weight", (VOCAB, HIDDEN), "Q6_K")]
    params = 0
    for key, shape, name in tensors:  # infos first, then the data a tensor at a time: memory stays small
        params += int(np.prod(shape))
        if name == "F32":
            w.add_tensor_info(key, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            qtype = gguf.GGMLQuantizationType[name]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor_info(key, gguf.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8),
                              int(np.prod(shape)) // block * size, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _key, shape, name in tensors:
        w.write_tensor_data(np.ones(shape, np.float32) if name == "F32" else random_blocks(rng, name, shape))
    w.close()
    return params


def main() -> None:
    args, work = bench_args("/tmp/bench_merge_gguf")
    work.mkdir(parents=True)
    base, adapter = work / "base.gguf", work / "adapter"
    params = make_base(base, args.layers)
    make_adapter(adapter, args.layers, tuple(m for _, m in LAYER.values() if m))
    subprocess.run(["sync"], check=True)
    lt = [sys.executable, "-m", "loratool", "merge", str(base), str(adapter)]
    rows = {
        "cp && sync": ["cp", str(base), str(work / "cp.gguf")],
        "loratool merge (Q4_K kept)": [*lt, "-o", str(work / "q4k.gguf"), "--json"],
        "loratool merge --dtype bf16": [*lt, "-o", str(work / "bf16.gguf"), "--dtype", "bf16", "--json"],
    }
    print(f"{args.layers} layers, {params / 1e9:.2f}B params, {base.stat().st_size / 1e9:.2f} GB (Q4_K, output Q6_K)")
    run_rows(rows)
    import gguf

    layout = [[(t.name, t.tensor_type, tuple(t.shape)) for t in gguf.GGUFReader(p).tensors]
              for p in (base, work / "q4k.gguf")]
    assert layout[0] == layout[1], "the merged GGUF does not mirror the base"
    finish(args, work)


if __name__ == "__main__":
    main()
