"""Shared by the GGUF tests (tests/formats/test_gguf.py, tests/runtimes/test_llama_cpp.py): a tiny
llama base written as a GGUF file with the gguf package (an independent producer, not loratool's
writer). The shapes are those of a Llama with the sizes below."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 32, 2

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendor/llama.cpp the runtime tests build
# where tests/runtimes/build_llama_cpp.sh and build_ggml_quants.sh install their programs (bin/)
LLAMA_CPP_DIR = Path(os.environ.get("LORATOOL_LLAMA_CPP_DIR",
                                    Path.home() / ".cache" / "loratool-tests" / f"llama.cpp-{LLAMA_CPP_VERSION}"))


def write_llama_gguf(path: Path, *, tied: bool = False, qtype=None, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(64)
    w.add_context_length(64)
    shapes = {"token_embd.weight": (128, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (128, HIDDEN)
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.attn_q.weight": (32, 32), f"blk.{i}.attn_k.weight": (16, 32),
                       f"blk.{i}.attn_v.weight": (16, 32), f"blk.{i}.attn_output.weight": (32, 32),
                       f"blk.{i}.ffn_down.weight": (32, 64), f"blk.{i}.ffn_up.weight": (64, 32),
                       f"blk.{i}.ffn_gate.weight": (64, 32), f"blk.{i}.attn_norm.weight": (HIDDEN,)})
    for name, shape in shapes.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype is not None and len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data if len(shape) == 2 else np.ones(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
