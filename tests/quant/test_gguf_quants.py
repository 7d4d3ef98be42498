"""GGUF tensor types as storage schemes (storage.gguf_storage, loratool/maths/ggml.py), checked against
references that are not loratool's: the gguf package's own gguf.quants (quantize for the legacy types,
dequantize for every type), and llama.cpp's own reference quantizers (ggml-quants.c
quantize_row_<type>_ref, built by tests/runtimes/build_ggml_quants.sh; those checks skip, saying so,
where it is not built). Merges go into GGUF bases written by the gguf package and are read back with
gguf.GGUFReader.

The adapters' factors are multiples of 1/8 and their scales powers of two, so every ΔW is exact in
float32 whatever the order of a product's terms: the merged weight W + ΔW is one float32 rounding on
every machine, and the requantized bytes can be compared exactly.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from clirun import run_cli
from gguf_tools import LLAMA_CPP_DIR, LLAMA_CPP_VERSION
from safetensors.numpy import save_file

gguf = pytest.importorskip("gguf")

from loratool.maths import ggml  # noqa: E402
from loratool.ops import merge_gguf  # noqa: E402

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
REF = LLAMA_CPP_DIR / "bin" / "ggml-quantize-ref"
needs_ref = pytest.mark.skipif(not REF.is_file(), reason=f"ggml-quantize-ref not built at {REF} "
                               f"(tests/runtimes/build_ggml_quants.sh builds it from the llama-cpp-python "
                               f"{LLAMA_CPP_VERSION} sdist; .ci/run calls it)")


def qtype(name: str):
    return gguf.GGMLQuantizationType[name]


def llama_cpp_quantize(name: str, x: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize_row_<name>_ref of float32 rows -> uint8 (rows, bytes per row)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    run = subprocess.run([str(REF), name, str(x.size)], input=x.tobytes(), capture_output=True, check=True,
                         timeout=60)
    return np.frombuffer(run.stdout, dtype=np.uint8).reshape(x.shape[0], -1)


def hard_rows(seed: int, rows: int = 24, cols: int = 512) -> np.ndarray:
    """Gaussian rows at four magnitudes, with the groups quantizers special-case: all zero, partly
    zero, one sign only, a constant, one outlier."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= np.array([1e-3, 0.02, 1.0, 300.0], dtype=np.float32).repeat(rows // 4)[:, None]
    x[1, :100] = 0
    x[2] = 0
    x[3, ::7] = 0
    x[5] = np.abs(x[5])
    x[6] = -np.abs(x[6])
    x[7] = 0.25
    x[9, 17] = 1e4
    return x


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_legacy_quantize_equals_gguf_quants(name, seed):
    x = hard_rows(seed)
    ours = ggml.quantize(name, x)
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, gguf.quants.quantize(x, qtype(name)))


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_dequantize_equals_gguf_quants_on_arbitrary_blocks(name):
    # random bytes are valid blocks except for the half-float scales: make those finite
    values, size = ggml.GGML_BLOCKS[name]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(16, 4 * size), dtype=np.uint8)
    halves = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[name]
    blocks = raw.reshape(-1, size)
    for at in halves:
        blocks[:, at:at + 2] = rng.uniform(-2, 2, len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    want = gguf.quants.dequantize(raw, qtype(name))
    got = ggml.dequantize(name, raw)
    assert got.shape == (16, 4 * values) and got.dtype == np.float32
    assert np.array_equal(got, want)


# bounds on the relative Frobenius error of decode(encode(x)) for the Gaussian rows below (llama.cpp's
# own quantizers reach 0.310, 0.156, 0.073, 0.038 and 0.0204 on them)
ROUND_TRIP = {"Q2_K": 0.33, "Q3_K": 0.17, "Q4_K": 0.08, "Q5_K": 0.042, "Q6_K": 0.023}


@pytest.mark.parametrize("name", KQUANTS)
def test_k_quant_round_trip_through_gguf_quants(name):
    x = hard_rows(3)
    raw = ggml.quantize(name, x)
    back = gguf.quants.dequantize(raw, qtype(name))  # the gguf package decodes what we encoded
    assert np.array_equal(back, ggml.dequantize(name, raw))
    assert not back[2].any()  # an all-zero row stays zero
    gauss = hard_rows(3, cols=2048)[[0, 4, 8, 12, 16, 20]]
    got = gguf.quants.dequantize(ggml.quantize(name, gauss), qtype(name))
    rel = np.linalg.norm(got - gauss, axis=1) / np.linalg.norm(gauss, axis=1)
    assert rel.max() < ROUND_TRIP[name], rel


@needs_ref
@pytest.mark.parametrize("name", LEGACY + KQUANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_equals_llama_cpp_reference_bit_for_bit(name, seed):
    x = hard_rows(seed)
    assert np.array_equal(ggml.quantize(name, x), llama_cpp_quantize(name, x))


# ---------------------------------------------------------------------------------------------
# merges into GGUF bases

SHAPES = {"v": (256, 512), "up": (512, 256), "down": (256, 512)}  # (rows, columns), numpy order
MODULES = {"model.layers.0.self_attn.v_proj": ("blk.0.attn_v.weight", SHAPES["v"]),
           "model.layers.0.mlp.up_proj": ("blk.0.ffn_up.weight", SHAPES["up"]),
           "model.layers.0.mlp.down_proj": ("blk.0.ffn_down.weight", SHAPES["down"])}


def write_base(path: Path, name: str, *, arch: str = "llama", seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF (the gguf package's writer) with its adapted weights stored as `name`
    (encoded by gguf.quants for the legacy types, by llama.cpp's quantizer or ours for the K-quants)
    and an F32 norm; returns the raw stored weights."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_embedding_length(512)
    stored = {}
    for key, shape in MODULES.values():
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if name in LEGACY:
            raw = gguf.quants.quantize(x, qtype(name))
        else:
            raw = llama_cpp_quantize(name, x) if REF.is_file() else ggml.quantize(name, x)
        w.add_tensor(key, raw, raw_shape=gguf.quant_shape_to_byte_shape(shape, qtype(name)), raw_dtype=qtype(name))
        stored[key] = raw
    w.add_tensor("blk.0.attn_norm.weight", np.ones(512, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def write_adapter(root: Path, *, rank: int = 4, alpha: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    """A PEFT adapter whose factors are multiples of 1/8 (ΔW exact in float32); returns each base key's ΔW."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    tensors, deltas = {}, {}
    for module, (key, (rows, cols)) in MODULES.items():
        a = rng.integers(-4, 5, (rank, cols)).astype(np.float32) / 8
        b = rng.integers(-4, 5, (rows, rank)).astype(np.float32) / 8
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        deltas[key] = (b.astype(np.float64) @ a.astype(np.float64) * (alpha / rank)).astype(np.float32)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["v_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM"}))
    return deltas


def reference_merge(name: str, stored: np.ndarray, delta: np.ndarray, weight: float) -> np.ndarray:
    """The base's own scheme applied to dequant(W) + weight·ΔW, by the reference quantizer."""
    new = gguf.quants.dequantize(stored, qtype(name)).astype(np.float32) + np.float32(weight) * delta
    if name in LEGACY:
        return gguf.quants.quantize(new, qtype(name))
    return llama_cpp_quantize(name, new)


@pytest.mark.parametrize("name", [*LEGACY, *(pytest.param(n, marks=needs_ref) for n in KQUANTS)])
def test_merge_requantizes_like_the_reference_and_reads_back(name, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_gguf, "BLOCK_ELEMENTS", 48 * 512)  # several row blocks per tensor, one partial
    stored = write_base(tmp_path / "base.gguf", name)
    deltas = write_adapter(tmp_path / "lora")
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(["merge", tmp_path / "base.gguf", tmp_path / "lora", "-o", out, "--weights", "0.5",
                            "--report", tmp_path / "report.json"])
    assert code == 0, err
    reader = gguf.GGUFReader(out)  # the gguf package reads the merged model
    after = {t.name: t for t in reader.tensors}
    assert list(after) == [*(k for k, _ in MODULES.values()), "blk.0.attn_norm.weight"]
    for key, raw in stored.items():
        t = after[key]
        assert t.tensor_type == qtype(name)
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == dict(MODULES.values())[key]
        assert np.array_equal(np.asarray(t.data).reshape(raw.shape), reference_merge(name, raw, deltas[key], 0.5)), key
    assert np.array_equal(after["blk.0.attn_norm.weight"].data, np.ones(512, np.float32))
    doc = json.loads((tmp_path / "report.json").read_text())
    rows = {r["key"]: r for r in doc["tensors"]}
    for key in stored:  # the realized delta is reported: most of ΔW survives the requantization
        assert rows[key]["storage"] == f"gguf {name}"
        assert rows[key]["retained"] > {"Q2_K": 0.5, "Q3_K": 0.7}.get(name, 0.9), rows[key]


def test_merge_without_the_llama_cpp_program_still_round_trips_k_quants(tmp_path):
    # always runs: a Q4_K merge decodes (gguf.quants) to dequant(W) + ΔW within Q4_K's rounding
    stored = write_base(tmp_path / "base.gguf", "Q4_K")
    deltas = write_adapter(tmp_path / "lora", alpha=1)
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(["merge", tmp_path / "base.gguf", tmp_path / "lora", "-o", out])
    assert code == 0, err
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for key, raw in stored.items():
        want = gguf.quants.dequantize(raw, qtype("Q4_K")) + deltas[key]
        got = gguf.quants.dequantize(np.asarray(after[key].data), qtype("Q4_K")).reshape(want.shape)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.08


@pytest.mark.parametrize("dtype,ggml_type", [("fp16", "F16"), ("fp32", "F32"), ("bf16", "BF16")])
def test_merge_with_dtype_writes_the_float_sum(tmp_path, dtype, ggml_type):
    stored = write_base(tmp_path / "base.gguf", "Q5_K")
    deltas = write_adapter(tmp_path / "lora")
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(["merge", tmp_path / "base.gguf", tmp_path / "lora", "-o", out, "--dtype", dtype])
    assert code == 0, err
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for key, raw in stored.items():
        t = after[key]
        assert t.tensor_type == qtype(ggml_type)
        want = gguf.quants.dequantize(raw, qtype("Q5_K")).astype(np.float32) + deltas[key]
        got = gguf.quants.dequantize(np.asarray(t.data), qtype(ggml_type)).astype(np.float32).reshape(want.shape)
        expect = {"F32": want, "F16": want.astype(np.float16).astype(np.float32),
                  "BF16": gguf.quants.dequantize(gguf.quants.quantize(want, qtype("BF16")), qtype("BF16"))}
        assert np.array_equal(got, expect[ggml_type]), key


def test_row_blocks_bound_the_memory_of_a_tensor(tmp_path, monkeypatch):
    # every dequantize / requantize call sees one block of rows, never the whole tensor
    from loratool import storage

    seen = []
    real = storage.dequantize

    def spy(s, stored, load):
        seen.append(stored.shape[0])
        return real(s, stored, load)

    monkeypatch.setattr(merge_gguf, "dequantize", spy)
    monkeypatch.setattr(merge_gguf, "BLOCK_ELEMENTS", 64 * 512)
    write_base(tmp_path / "base.gguf", "Q6_K")
    write_adapter(tmp_path / "lora")
    code, _, err = run_cli(["merge", tmp_path / "base.gguf", tmp_path / "lora", "-o", tmp_path / "m.gguf"])
    assert code == 0, err
    # (256, 512): 4 blocks of 64 rows; (512, 256): 128 rows a block; 2 + 4 + 4 blocks in all
    assert sorted(seen) == sorted([64] * 8 + [128] * 4)


# ---------------------------------------------------------------------------------------------
# image-model GGUF files (city96's FLUX / Wan / Qwen-Image): the model's own tensor names, an
# architecture the gguf package has no tensor-name map for; small tensors left in F16

HID = 256
FLUX = {"double_blocks.0.img_attn.qkv.weight": ((3 * HID, HID), "Q4_K"),
        "double_blocks.0.img_attn.proj.weight": ((HID, HID), "Q8_0"),
        "double_blocks.0.img_mlp.0.weight": ((2 * HID, HID), "F16"),
        "double_blocks.0.img_attn.norm.query_norm.scale": ((HID,), "F32")}


def write_flux_gguf(path: Path) -> dict[str, np.ndarray]:
    """A FLUX-shaped GGUF as city96's convert.py writes one (general.architecture flux, BFL names)."""
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(path, "flux")
    values = {}
    for key, (shape, name) in FLUX.items():
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if name == "F32":
            w.add_tensor(key, x)
        elif name == "F16":
            x = x.astype(np.float16)
            w.add_tensor(key, x)
        else:
            raw = gguf.quants.quantize(x, qtype(name)) if name in LEGACY else ggml.quantize(name, x)
            w.add_tensor(key, raw, raw_shape=gguf.quant_shape_to_byte_shape(shape, qtype(name)), raw_dtype=qtype(name))
            x = gguf.quants.dequantize(raw, qtype(name))
        values[key] = x.astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def eighths(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-4, 5, shape).astype(np.float32) / 8


def test_image_model_gguf_merges_kohya_and_split_diffusers_loras(tmp_path):
    base = tmp_path / "flux1-dev-Q4_K.gguf"
    before = write_flux_gguf(base)
    rng = np.random.default_rng(6)
    r = 4
    # kohya, BFL names: the fused qkv and proj directly (alpha = rank: scale 1)
    kohya, want = {}, {k: np.zeros(s, np.float32) for k, (s, _) in FLUX.items()}
    for stem, key in (("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight"),
                      ("lora_unet_double_blocks_0_img_attn_proj", "double_blocks.0.img_attn.proj.weight"),
                      ("lora_unet_double_blocks_0_img_mlp_0", "double_blocks.0.img_mlp.0.weight")):
        rows = FLUX[key][0][0]
        a, b = eighths(rng, (r, HID)), eighths(rng, (rows, r))
        kohya.update({f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b,
                      f"{stem}.alpha": np.array(r, np.float32)})
        want[key] += b @ a
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    # diffusers, split q / k / v: each lands on its third of the fused qkv rows
    diffusers = {}
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        a, b = eighths(rng, (r, HID)), eighths(rng, (HID, r))
        diffusers[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"] = a
        diffusers[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"] = b
        want["double_blocks.0.img_attn.qkv.weight"][i * HID:(i + 1) * HID] += 0.5 * (b @ a)
    save_file(diffusers, str(tmp_path / "diffusers.safetensors"))
    out = tmp_path / "merged.gguf"
    code, _, err = run_cli(["merge", base, tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors",
                            "-o", out, "--weights", "1,0.5"])
    assert code == 0, err
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "flux"
    after = {t.name: t for t in reader.tensors}
    for key, (shape, name) in FLUX.items():
        t = after[key]
        assert t.tensor_type == qtype(name), key
        new = before[key] + want[key]
        if name in ("F32", "F16"):
            expect = new.astype(np.float16 if name == "F16" else np.float32)
            assert np.array_equal(np.asarray(t.data).reshape(shape), expect), key
        elif name in LEGACY:
            assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(new, qtype(name)).reshape(t.data.shape))
        elif REF.is_file():  # llama.cpp's own quantizer
            assert np.array_equal(np.asarray(t.data).reshape(shape[0], -1), llama_cpp_quantize(name, new)), key
        else:  # the round trip through the gguf package's decoder, within Q4_K's rounding
            got = gguf.quants.dequantize(np.asarray(t.data), qtype(name)).reshape(shape)
            assert np.linalg.norm(got - new) / np.linalg.norm(new) < 0.08
