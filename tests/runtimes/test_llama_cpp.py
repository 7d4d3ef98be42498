"""llama.cpp for real: its own `llama-export-lora` merges loratool's GGUF adapter (`convert --to gguf
--base`) into a GGUF base, and every tensor of its output equals `loratool merge` of the same PEFT
adapter into the same base.

The binary is built from the llama.cpp source that the llama-cpp-python sdist carries (its
vendor/llama.cpp) by tests/runtimes/build_llama_cpp.sh, which .ci/run calls before pytest, into
~/.cache/loratool-tests/llama.cpp-VERSION/bin (LORATOOL_LLAMA_CPP_DIR overrides the place). Without
the binary these tests skip, saying so.

llama-export-lora (tools/export-lora/export-lora.cpp) computes, per base tensor with a lora_a / lora_b
pair, base + user_scale * (adapter.lora.alpha / rank) * B @ A in float32 and writes an F32 base
tensor as F32; every other tensor is copied. The base here is all F32, so both sides are float32 and
the comparison needs only the float32 rounding of one low-rank product: a stated tolerance of 1e-6
of the tensor's largest magnitude (at least 1e-6 absolute); the largest difference observed is
9.6e-7 absolute on tensors of magnitude up to about 4.5 (a weight off by 10% gives 1.3).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from clirun import run_cli
from gguf_tools import LLAMA_CPP_DIR, LLAMA_CPP_VERSION, write_llama_gguf

from loratool.runtimes import RUNTIMES

gguf = pytest.importorskip("gguf")

VERSION = LLAMA_CPP_VERSION  # the sdist whose vendor/llama.cpp loratool's llama.cpp record was read from
EXPORT_LORA = LLAMA_CPP_DIR / "bin" / "llama-export-lora"

pytestmark = pytest.mark.slow
needs_binary = pytest.mark.skipif(not EXPORT_LORA.is_file(),
                                  reason=f"llama-export-lora not built at {EXPORT_LORA} "
                                         f"(tests/runtimes/build_llama_cpp.sh builds it from the llama-cpp-python "
                                         f"{VERSION} sdist; .ci/run calls it)")

# every kind of linear layer of the tiny GGUF llama (tests/gguf_tools.py), q and k included (their
# rows are permuted in GGUF), and the output head
MODULES = {
    "model.layers.0.self_attn.q_proj": (32, 32),
    "model.layers.0.self_attn.k_proj": (16, 32),
    "model.layers.0.self_attn.v_proj": (16, 32),
    "model.layers.0.self_attn.o_proj": (32, 32),
    "model.layers.0.mlp.gate_proj": (64, 32),
    "model.layers.1.self_attn.q_proj": (32, 32),
    "model.layers.1.mlp.up_proj": (64, 32),
    "model.layers.1.mlp.down_proj": (32, 64),
    "lm_head": (128, 32),
}
GGUF_NAMES = {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
              "blk.0.ffn_gate.weight", "blk.1.attn_q.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight",
              "output.weight"}
# llama.cpp's own converter (convert_lora_to_gguf.py) mis-scales this one: per-module ranks and
# alphas, rsLoRA; loratool bakes the scales into the GGUF file
PATTERNED = {
    "rank": {**dict.fromkeys(MODULES, 8), "model.layers.0.self_attn.k_proj": 4, "lm_head": 2,
             "model.layers.1.mlp.down_proj": 3},
    "alpha": {**dict.fromkeys(MODULES, 16), "model.layers.0.self_attn.v_proj": 3,
              "model.layers.1.mlp.up_proj": 5},
    "rslora": True,
}
ADAPTERS = {"plain": {"rank": 4, "alpha": 8}, "patterned_rslora": PATTERNED}


def test_the_record_names_this_source():
    assert f"llama-cpp-python {VERSION}" in RUNTIMES["llama.cpp"].version


def _tensors(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = (int(t.tensor_type), np.array(t.data, dtype=np.float32).reshape(shape))
    return out


def _export_lora(base: Path, lora_arg: list[str], out: Path) -> None:
    proc = subprocess.run([str(EXPORT_LORA), "-m", str(base), *lora_arg, "-o", str(out), "-t", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@needs_binary
@pytest.mark.parametrize("weight", [None, 0.5])
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_export_lora_of_our_gguf_adapter_equals_our_merge(make_adapter, tmp_path, capsys, kind, weight):
    base = write_llama_gguf(tmp_path / "base.gguf")
    src = make_adapter(modules=MODULES, **ADAPTERS[kind])
    adapter = tmp_path / "adapter.gguf"
    code, _, err = run_cli(["convert", src, "--to", "gguf", "--base", base, "-o", adapter])
    assert code == 0, err

    theirs, ours = tmp_path / "llama_cpp.gguf", tmp_path / "loratool.gguf"
    lora_arg = ["--lora", str(adapter)] if weight is None else ["--lora-scaled", f"{adapter}:{weight}"]
    _export_lora(base, lora_arg, theirs)
    code, _, err = run_cli(["merge", base, src, "-o", ours, *([] if weight is None else ["--weights", str(weight)])])
    assert code == 0, err

    before, got, want = _tensors(base), _tensors(theirs), _tensors(ours)
    assert set(got) == set(want) == set(before)
    f32 = int(gguf.GGMLQuantizationType.F32)
    changed = set()
    for name, (base_type, base_data) in before.items():
        (got_type, g), (want_type, w) = got[name], want[name]
        assert base_type == got_type == want_type == f32, name  # float32 on both sides
        assert g.shape == w.shape == base_data.shape, name
        diff = float(np.abs(g - w).max())
        assert diff <= 1e-6 * max(1.0, float(np.abs(w).max())), (name, diff)
        if not np.array_equal(g, base_data):
            changed.add(name)
    assert changed == GGUF_NAMES  # llama.cpp merged every adapted tensor and copied the rest unchanged
    for name in GGUF_NAMES:  # and the adapter is not negligible next to the tolerance
        assert np.abs(got[name][1] - before[name][1]).max() > 1e-3, name
