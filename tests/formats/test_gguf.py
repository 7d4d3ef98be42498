"""GGUF LoRA adapters for llama.cpp: files read back by the gguf package, llama.cpp's scale rule applied here.

llama.cpp (src/llama-adapter.h) scales each lora_a / lora_b pair by adapter.lora.alpha / r, with r the
pair's own rank (lora_b's ne[0]); its converter names tensors through gguf's tensor-name map and, for
llama models, permutes the q / k rows as convert_hf_to_gguf.py's LlamaModel.permute does. Both rules
are written out below with numpy; the references for the inputs use peft's own pattern rules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from clirun import run_cli
from gguf_tools import HEADS, HIDDEN, KV_HEADS, LAYERS, write_llama_gguf
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from loratool.errors import IncompatibleError, LoratoolError  # noqa: E402
from loratool.formats import read  # noqa: E402
from loratool.ops.convert import convert  # noqa: E402

PREFIX = "base_model.model."
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
MODULES = {
    "model.layers.0.self_attn.q_proj": (32, 32),
    "model.layers.0.self_attn.k_proj": (16, 32),
    "model.layers.1.self_attn.v_proj": (16, 32),
    "model.layers.1.mlp.down_proj": (32, 64),
    "lm_head": (128, 32),
}
RANKS = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.k_proj": 4,
         "model.layers.1.self_attn.v_proj": 4, "model.layers.1.mlp.down_proj": 2, "lm_head": 4}
ALPHAS = {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.k_proj": 16,
          "model.layers.1.self_attn.v_proj": 3, "model.layers.1.mlp.down_proj": 16, "lm_head": 16}


def llama_config(root: Path, *, tied: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS,
        "intermediate_size": 64, "vocab_size": 128, "tie_word_embeddings": tied}))
    return root


def peft_deltas(path: Path) -> dict[str, np.ndarray]:
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for key, a in t.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = t[PREFIX + name + ".lora_B.weight"]
            r = rp.get(get_pattern_key(list(rp), name), cfg["r"])
            alpha = ap.get(get_pattern_key(list(ap), name), cfg["lora_alpha"])
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            out[name] = scale * (b.double().numpy() @ a.double().numpy())
    return out


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, written out."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_deltas(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """ΔW per GGUF tensor as llama.cpp applies it (user scale 1), and the file's key-values."""
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    alpha = float(kv["adapter.lora.alpha"])
    t = {x.name: np.array(x.data, dtype=np.float64) for x in r.tensors}
    out = {}
    for name, a in t.items():
        if name.endswith(".lora_a"):
            b = t[name.removesuffix(".lora_a") + ".lora_b"]
            rank = b.shape[1]  # numpy (out, r): ggml ne[0] = r
            out[name.removesuffix(".lora_a")] = (alpha / rank if alpha else 1.0) * (b @ a)
    return out, kv


def expected_name(module: str) -> str:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    return tmap.get_name(module + ".weight", try_suffixes=(".weight",))


@pytest.fixture
def patterned(make_adapter):
    return make_adapter(modules=MODULES, rank=RANKS, alpha=ALPHAS, rslora=True)


def test_written_adapter_reads_back_with_the_gguf_package(patterned, tmp_path):
    out = tmp_path / "adapter.gguf"
    base = llama_config(tmp_path / "base")
    convert(patterned, out, to="gguf", base=base)
    got, kv = gguf_deltas(out)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["general.architecture"] == "llama"
    # provenance names the base (issue 24 item 5; source_label: its last two path parts)
    assert json.loads(str(kv["loratool.params"]))["base"] == f"{base.parent.name}/{base.name}"
    assert {n for n in got} == {expected_name(m) for m in MODULES}
    assert "blk.0.attn_q.weight" in got and "output.weight" in got
    want = peft_deltas(patterned)
    for module, delta in want.items():
        name = expected_name(module)
        if module.endswith("q_proj"):
            delta = llama_permute(delta, HEADS)
        elif module.endswith("k_proj"):
            delta = llama_permute(delta, KV_HEADS)
        np.testing.assert_allclose(got[name], delta, rtol=1e-6, atol=1e-7 * np.abs(delta).max())


def test_gguf_adapter_is_read_and_rewritten_unchanged(patterned, tmp_path):
    first = tmp_path / "a.gguf"
    convert(patterned, first, to="gguf", base=llama_config(tmp_path / "base"))
    adapter = read(first)
    assert adapter.source_format == "gguf" and "blk.0.attn_q" in adapter.modules
    second = tmp_path / "b.gguf"
    convert(first, second, to="gguf")
    a, _ = gguf_deltas(first)
    b, _ = gguf_deltas(second)
    assert set(a) == set(b)
    for n in a:
        np.testing.assert_allclose(b[n], a[n], rtol=1e-6, atol=1e-9)


def test_a_gguf_base_names_and_checks_the_tensors(patterned, tmp_path):
    base = write_llama_gguf(tmp_path / "base.gguf", tied=True)
    with pytest.raises(IncompatibleError, match="lm_head"):  # tied embeddings: no output.weight to adapt
        convert(patterned, tmp_path / "x.gguf", to="gguf", base=base)


def test_gguf_needs_a_base_and_refuses_dora(patterned, tmp_path, capsys):
    code, _, err = run_cli(["convert", patterned, "--to", "gguf", "-o", tmp_path / "x.gguf"])
    assert code == 2 and "--base" in err
    code, _, err = run_cli(["convert", FIXTURES / "peft_dora", "--to", "gguf",
                                     "--base", FIXTURES / "base_llama", "-o", tmp_path / "y.gguf"])
    assert code == 2 and "DoRA" in err and "--dora-to-lora" in err


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    import sys

    from loratool.formats import gguf as gguf_format

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(LoratoolError, match="'gguf' package") as exc:
        gguf_format._gguf()
    assert "pip install gguf" in (exc.value.hint or "") and ".[gguf]" in (exc.value.hint or "")


def test_validate_for_llama_cpp_predicts_the_converter_scales(patterned):
    from loratool.ops.validate import validate_adapter

    report = validate_adapter(patterned, for_runtime="llama.cpp")
    mis = {f.module for f in report.findings if f.code == "runtime-misscales"}
    cfg = json.loads((patterned / "adapter_config.json").read_text())
    want = peft_deltas(patterned)
    t = load_file(str(patterned / "adapter_model.safetensors"))
    wrong = set()
    for name, delta in want.items():  # convert_lora_to_gguf.py: the config's lora_alpha / each rank
        a, b = t[PREFIX + name + ".lora_A.weight"], t[PREFIX + name + ".lora_B.weight"]
        served = cfg["lora_alpha"] / a.shape[0] * (b.double().numpy() @ a.double().numpy())
        if not np.allclose(served, delta, rtol=1e-6):
            wrong.add(name)
    assert mis == wrong and wrong


# ---------------------------------------------------------------------------------------------
# merge into a GGUF base


def _fields(path: Path) -> dict[str, object]:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _dequant(t) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.array(t.data, dtype=np.float64).reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)


LLAMA_MODULES = {
    "model.layers.0.self_attn.q_proj": (32, 32),
    "model.layers.0.self_attn.k_proj": (16, 32),
    "model.layers.1.mlp.down_proj": (32, 64),
    "lm_head": (128, 32),
}


@pytest.mark.parametrize("qtype", [None, "Q8_0"])
def test_merge_into_gguf_base_is_dequantized_base_plus_delta(make_adapter, tmp_path, capsys, qtype):
    q = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
    base = write_llama_gguf(tmp_path / "base.gguf", qtype=q)
    src = make_adapter(modules=LLAMA_MODULES, rank={**dict.fromkeys(LLAMA_MODULES, 4), "lm_head": 2},
                       alpha={**dict.fromkeys(LLAMA_MODULES, 8), "model.layers.0.self_attn.k_proj": 3}, rslora=True)
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(["merge", base, src, "-o", out, "--weights", "0.5"])
    assert code == 0, err
    want = peft_deltas(src)
    before = {t.name: t for t in gguf.GGUFReader(base).tensors}
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert list(after) == list(before)
    assert _fields(out) == _fields(base)  # every key-value copied
    merged = set()
    for module, delta in want.items():
        name = expected_name(module)
        if module.endswith("q_proj"):
            delta = llama_permute(delta, HEADS)
        elif module.endswith("k_proj"):
            delta = llama_permute(delta, KV_HEADS)
        expect = _dequant(before[name]) + 0.5 * delta
        got = _dequant(after[name])
        assert after[name].tensor_type == before[name].tensor_type  # the base's own type
        if q is None:
            np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
        else:  # Q8_0: 32 values per block share one fp16 scale max|x| / 127: rounding within half a step
            blocks = expect.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            ratio = (np.abs(got.reshape(-1, 32) - blocks) / step).max()
            assert ratio <= 0.6, ratio  # half a step, plus the fp16 rounding of the block scale
        merged.add(name)
    for name, t in before.items():
        if name not in merged:
            assert after[name].tensor_type == t.tensor_type and np.array_equal(after[name].data, t.data), name


def test_merge_refuses_a_type_it_cannot_requantize_unless_dtype(make_adapter, tmp_path, capsys):
    # a Q4_K tensor (the gguf package dequantizes k-quants but cannot quantize them)
    q4k = gguf.GGMLQuantizationType.Q4_K
    path = tmp_path / "q4k.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    block, size = gguf.GGML_QUANT_SIZES[q4k]
    shape = (64, 256)
    raw = np.zeros((64, 256 // block * size), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=gguf.quant_shape_to_byte_shape(shape, q4k), raw_dtype=q4k)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = make_adapter(modules={"model.layers.0.mlp.up_proj": shape}, rank=4, alpha=8)
    code, _, err = run_cli(["merge", path, src, "-o", tmp_path / "x.gguf"])
    assert code == 2 and "Q4_K" in err and "--dtype" in err and not (tmp_path / "x.gguf").exists()
    code, _, err = run_cli(["merge", path, src, "-o", tmp_path / "y.gguf", "--dtype", "fp16"])
    assert code == 0, err
    t = gguf.GGUFReader(tmp_path / "y.gguf").tensors[0]
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_allclose(_dequant(t), peft_deltas(src)["model.layers.0.mlp.up_proj"], rtol=2e-3, atol=2e-3)


def test_round_trip_peft_gguf_peft_identical_deltas(tmp_path, capsys):
    src, base = FIXTURES / "peft_llama", FIXTURES / "base_llama"
    convert(src, tmp_path / "a.gguf", to="gguf", base=base)
    code, _, err = run_cli(["convert", tmp_path / "a.gguf", "--to", "peft", "-o", tmp_path / "x"])
    assert code == 2 and "--base" in err  # GGUF names need the checkpoint to map back
    convert(tmp_path / "a.gguf", tmp_path / "back", to="peft", base=base)
    want, got = peft_deltas(src), peft_deltas(tmp_path / "back")
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7 * np.abs(want[n]).max())
