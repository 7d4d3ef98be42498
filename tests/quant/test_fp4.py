"""4-bit float bases (issue 27): MXFP4 in gpt-oss's layout, NVFP4 (compressed-tensors and ModelOpt).

References independent of loratool:
- transformers' own MXFP4 dequantizer (`convert_moe_packed_tensors`, what it runs when loading gpt-oss
  with `Mxfp4Config(dequantize=True)`) must read our stored tensors as our dequantize does;
- gguf.quants.MXFP4 (gguf-py's quantizer, the OCP scale rule 2^(floor(log2 amax) − 2)) gives the
  reference requantization; its block layout (e8m0, then code j | code j+16 << 4) is turned into
  gpt-oss's (code 2j | code 2j+1 << 4) by numpy written here;
- the compressed-tensors package's own NVFP4 scale rule (generate_gparam, calculate_qparams) and
  compressor (NVFP4PackedCompressor.compress / decompress) for its layout;
- ModelOpt's NVFP4QTensor rules written in numpy here (ModelOpt itself needs CUDA to install).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import save_quantized_base
from safetensors.torch import load_file, save_file

from loratool.io.checkpoint import open_checkpoint
from loratool.storage import dequantize, detect, requantize

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"
Q_PROJ = "model.layers.0.self_attn.q_proj"


# ---------------------------------------------------------------------------------------------
# references: gguf's MXFP4 quantizer in gpt-oss's layout (numpy)


def ref_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gpt-oss (blocks (E, rows, k/32, 16), scales (E, rows, k/32)) of a logical (E, k, rows) float32 w,
    quantized by gguf.quants.MXFP4."""
    rows_major = np.ascontiguousarray(np.swapaxes(w, 1, 2))  # (E, rows, k): blocks run along k
    q = gguf_quants.quantize(rows_major, GGMLQuantizationType.MXFP4)  # (E, rows, k/32 · 17)
    e_, r_, k_ = rows_major.shape
    q = q.reshape(e_, r_, k_ // 32, 17)
    scales, qs = q[..., 0], q[..., 1:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # gguf: byte j holds codes j and j + 16
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, scales.astype(np.uint8)


def gguf_dequant(w: np.ndarray) -> np.ndarray:
    rows_major = np.ascontiguousarray(np.swapaxes(w, 1, 2))
    back = gguf_quants.dequantize(gguf_quants.quantize(rows_major, GGMLQuantizationType.MXFP4),
                                  GGMLQuantizationType.MXFP4)
    return np.ascontiguousarray(np.swapaxes(back, 1, 2)).astype(np.float32)


def transformers_dequant(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                      dtype=torch.float32).numpy()


def gpt_oss_base(tmp_path: Path, *, experts: int = 2, k: int = 64, rows: int = 96, seed: int = 0):
    """A folder with gpt-oss MXFP4 experts (gguf-quantized), a bf16 q_proj and config.json."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((experts, k, rows)).astype(np.float32)
    blocks, scales = ref_mxfp4(w)
    tensors = {EXPERTS + "_blocks": torch.from_numpy(blocks), EXPERTS + "_scales": torch.from_numpy(scales),
               EXPERTS + "_bias": torch.zeros(experts, rows, dtype=torch.bfloat16),
               Q_PROJ + ".weight": torch.from_numpy(rng.standard_normal((48, 64)).astype(np.float32)).bfloat16()}
    base = save_quantized_base(tmp_path, "base", tensors, {"model_type": "gpt_oss"},
                               {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]})
    return base, tensors, w


def write_adapter(path: Path, a: np.ndarray, b: np.ndarray, name: str = Q_PROJ) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{name}.lora_A.weight": torch.from_numpy(a),
               f"base_model.model.{name}.lora_B.weight": torch.from_numpy(b)}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": a.shape[0], "lora_alpha": a.shape[0], "target_modules": ["q_proj"]}))
    return path


def load_from(tensors: dict[str, torch.Tensor]):
    return lambda k: tensors[k]


def exact_lora(path: Path, rows: int, cols: int, seed: int = 3) -> tuple[Path, np.ndarray, np.ndarray]:
    """A rank-4 PEFT LoRA on q_proj whose factors are multiples of 1/8: B @ A is exact in float32."""
    rng = np.random.default_rng(seed)
    a = (rng.integers(-2, 3, (4, cols)) / 8).astype(np.float32)
    b = (rng.integers(-2, 3, (rows, 4)) / 8).astype(np.float32)
    return write_adapter(path, a, b), a, b


def refused_merge(base: Path, lora: Path, out: Path, *options: str) -> list[str]:
    """stderr lines of a `loratool merge` that must exit 2 with one Error line, no traceback, no output."""
    res = subprocess.run([sys.executable, "-m", "loratool", "merge", str(base), str(lora), "-o", str(out), *options],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("Error:"), lines
    return lines


# ---------------------------------------------------------------------------------------------
# MXFP4


def test_mxfp4_gpt_oss_layout_is_detected_with_its_logical_shape(tmp_path):
    base, _, w = gpt_oss_base(tmp_path)
    storage = detect(open_checkpoint(base))
    s = storage.of(EXPERTS + "_blocks")
    assert s is not None and s.supported and s.scheme == "mxfp4"
    assert s.shape == w.shape  # transformers' (E, k, rows)
    assert storage.siblings == {EXPERTS + "_scales": EXPERTS + "_blocks"}
    assert s.changing == [EXPERTS + "_scales"]
    assert storage.unsupported == []


def test_mxfp4_dequantize_equals_transformers(tmp_path):
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 40, 2, 16), dtype=np.uint8)
    scales = rng.integers(118, 134, (3, 40, 2), dtype=np.uint8)
    tensors = {EXPERTS + "_blocks": torch.from_numpy(blocks), EXPERTS + "_scales": torch.from_numpy(scales)}
    base = tmp_path / "b"
    base.mkdir()
    save_file(tensors, str(base / "model.safetensors"))
    s = detect(open_checkpoint(base)).of(EXPERTS + "_blocks")
    assert s is not None
    got = dequantize(s, tensors[EXPERTS + "_blocks"], load_from(tensors))
    want = transformers_dequant(blocks, scales)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape == (3, 64, 40)
    assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("seed", [0, 1])
def test_mxfp4_requantize_equals_gguf_bit_for_bit(tmp_path, seed):
    """Q(dequant(W) + ΔW) with the stored layout: blocks and recomputed scales equal gguf's MXFP4."""
    base, tensors, _ = gpt_oss_base(tmp_path, seed=seed)
    s = detect(open_checkpoint(base)).of(EXPERTS + "_blocks")
    assert s is not None
    load = load_from(tensors)
    w = dequantize(s, tensors[EXPERTS + "_blocks"], load)
    rng = np.random.default_rng(seed + 10)
    delta = (rng.integers(-4, 5, w.shape) / 8).astype(np.float32)  # exact in float32
    new = (w.numpy() + delta).astype(np.float32)
    outs, read_back = requantize(s, torch.from_numpy(new), load)
    blocks, scales = ref_mxfp4(new)
    assert set(outs) == {EXPERTS + "_blocks", EXPERTS + "_scales"}
    assert outs[EXPERTS + "_blocks"].dtype == torch.uint8 and outs[EXPERTS + "_scales"].dtype == torch.uint8
    assert np.array_equal(outs[EXPERTS + "_blocks"].numpy(), blocks)
    assert np.array_equal(outs[EXPERTS + "_scales"].numpy(), scales)
    assert np.array_equal(read_back.numpy(), gguf_dequant(new))  # what a loader sees
    assert np.array_equal(read_back.numpy(), transformers_dequant(blocks, scales))


def test_mxfp4_ties_saturation_and_zero_blocks_follow_gguf():
    """Values exactly halfway between e2m1 levels, above 6 · scale, tiny and all-zero blocks."""
    from loratool.storage import Storage, quantize

    halves = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -2.5, -5.0, 4.0, 7.9, -7.9, 0.0]
    row0 = np.array(halves * 2, np.float32)  # amax 7.9: scale 2^(2 − 2) = 1, 7.9 saturates to 6
    row1 = np.zeros(32, np.float32)  # all zero: e8m0 0, codes 0
    row2 = (np.array(halves * 2, np.float32) * np.float32(2.0 ** -20))  # a small scale
    w = np.stack([row0, row1, row2])[None].transpose(0, 2, 1).copy()  # logical (1, 32, 3)
    s = Storage(EXPERTS + "_blocks", "mxfp4", "uint8", w.shape, {"scales": EXPERTS + "_scales"}, (32,))
    outs = quantize(s, torch.from_numpy(w), load_from({}))
    blocks, scales = ref_mxfp4(w)
    assert np.array_equal(outs[EXPERTS + "_scales"].numpy(), scales)
    assert np.array_equal(outs[EXPERTS + "_blocks"].numpy(), blocks)


def test_mxfp4_stochastic_rounding_is_unbiased_and_seeded():
    from loratool.maths.fp4 import mxfp4_dequantize, mxfp4_quantize

    x = torch.full((2000, 32), 0.3, dtype=torch.float32)  # between e2m1 levels 0 and 0.5 at scale 2^-2 ...
    x[:, 0] = 1.5  # ... an amax of 1.5 gives scale 2^(0 − 2): 0.3 / 0.25 = 1.2, between 1 and 1.5
    runs = []
    for seed in (7, 7, 8):
        g = torch.Generator().manual_seed(seed)
        codes, e = mxfp4_quantize(x, generator=g)
        runs.append(mxfp4_dequantize(codes, e))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    vals = set(runs[0][:, 1:].unique().tolist())
    assert vals == {0.25, 0.375}  # only the two neighbours
    assert abs(float(runs[0][:, 1:].mean()) - 0.3) < 0.003  # E = x: 62k draws, sd of the mean ~2.4e-4


def test_merge_into_a_gpt_oss_base_keeps_the_mxfp4_experts(tmp_path):
    """Before issue 27 the whole base was refused; now a LoRA on attention merges and the experts are
    copied byte for byte (loratool has no LoRA on 3-D expert parameters to merge into them)."""
    from loratool.ops.merge import merge

    base, tensors, _ = gpt_oss_base(tmp_path)
    lora, a, b = exact_lora(tmp_path / "lora", 48, 64, seed=3)
    report = merge(base, [lora], tmp_path / "out")
    assert report.merged == 1
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert list(got) == list(load_file(str(base / "model.safetensors")))  # nothing added or lost
    for k in (EXPERTS + "_blocks", EXPERTS + "_scales", EXPERTS + "_bias"):
        assert torch.equal(got[k], tensors[k]), k
    want = (tensors[Q_PROJ + ".weight"].float() + torch.from_numpy(b @ a)).bfloat16()
    assert torch.equal(got[Q_PROJ + ".weight"], want)


def test_dequantized_output_of_a_gpt_oss_base_is_refused_by_name(tmp_path):
    base, _, _ = gpt_oss_base(tmp_path)
    lora, _, _ = exact_lora(tmp_path / "lora", 48, 64, seed=3)
    lines = refused_merge(base, lora, tmp_path / "o", "--dtype", "bf16")
    assert EXPERTS + "_blocks" in lines[0] and "mxfp4 (gpt-oss)" in lines[0], lines
    assert lines[1].startswith("Hint:") and "--dtype keep" in lines[1]


@pytest.mark.slow
def test_transformers_loads_the_merged_gpt_oss_checkpoint(tmp_path):
    """A tiny gpt-oss saved by transformers, its experts stored MXFP4 as gpt-oss ships them: after the
    merge transformers loads it (Mxfp4Config(dequantize=True), its CPU path) and sees the experts as
    gguf dequantizes them and q_proj as W + ΔW."""
    transformers = pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM, Mxfp4Config

    from loratool.ops.merge import merge

    cfg = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                       vocab_size=64, layer_types=["full_attention"])
    torch.manual_seed(0)
    GptOssForCausalLM(cfg).save_pretrained(tmp_path / "f32")
    sd = load_file(str(tmp_path / "f32" / "model.safetensors"))
    stored, want = {}, {}
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = ref_mxfp4(v.numpy())
            stored[k + "_blocks"], stored[k + "_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
            want[k] = gguf_dequant(v.numpy())
        else:
            stored[k] = v
    base = save_quantized_base(tmp_path, "mxfp4", stored, json.loads((tmp_path / "f32" / "config.json").read_text()),
                               {"quant_method": "mxfp4", "modules_to_not_convert": [
                                   "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"]})
    lora, a, b = exact_lora(tmp_path / "lora", 64, 64, seed=5)
    merge(base, [lora], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        seen = getattr(experts, name).detach().float().numpy()
        assert np.array_equal(seen, want[f"model.layers.0.mlp.experts.{name}"]), (name, transformers.__version__)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(q, (sd[Q_PROJ + ".weight"].numpy() + b @ a).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# NVFP4: compressed-tensors (its own compressor is the reference) and ModelOpt (numpy below)

LINEAR = "model.layers.0.mlp.down_proj"
E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)


def ct_scheme():
    pytest.importorskip("compressed_tensors")  # in the test extras; skipped where it does not install
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme("NVFP4", ["Linear"])


def ct_compress(w: torch.Tensor, global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """compressed-tensors' NVFP4: its global scale (unless given), its group scales, its compressor."""
    scheme = ct_scheme()
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    g = generate_gparam(w.min(), w.max()) if global_scale is None else global_scale
    groups = w.reshape(w.shape[0], -1, 16)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=g)
    return NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": g}, scheme)


def ct_decompress(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    scheme = ct_scheme()
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor

    return NVFP4PackedCompressor.decompress(dict(tensors), scheme)["weight"]


def e2m1_values(codes: np.ndarray) -> np.ndarray:
    mag = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)[codes & 7]
    return np.where(codes & 8, -mag, mag).astype(np.float32)


def ref_modelopt(w: np.ndarray, s2: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """ModelOpt's NVFP4QTensor.quantize with weights_scaling_factor_2 = s2, in numpy (torch only for the
    fp8 cast): block scale amax / (6 · s2) (0 -> 1) in fp8, e2m1 by its bounds with ties to even."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 16, 16)
    amax = np.abs(blocks).max(-1)
    s = (amax / (np.float32(6.0) * s2)).astype(np.float32)
    s[s == 0] = 1.0
    s8 = torch.from_numpy(np.minimum(s, np.float32(448))).to(torch.float8_e4m3fn)
    eff = (s8.float().numpy() * s2).astype(np.float32)
    scaled = (blocks / eff[..., None]).astype(np.float32).reshape(rows, cols)
    mag = np.abs(scaled)
    ordinal = np.searchsorted(E2M1_BOUNDS, mag, side="left") + np.isin(mag, E2M1_BOUNDS[[1, 3, 5]])
    codes = (ordinal | (np.where(scaled < 0, 8, 0))).astype(np.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), s8.view(torch.uint8).numpy()


def modelopt_dequant(packed: np.ndarray, s8_bits: np.ndarray, s2: np.float32) -> np.ndarray:
    codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1)
    eff = (torch.from_numpy(s8_bits).view(torch.float8_e4m3fn).float().numpy() * s2).astype(np.float32)
    return (e2m1_values(codes).reshape(eff.shape[0], -1, 16) * eff[..., None]).reshape(codes.shape)


def nvfp4_base(tmp_path: Path, layout: str, *, rows: int = 48, cols: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :16] = 0  # an all-zero block
    tensors: dict[str, torch.Tensor] = {"model.norm.weight": torch.ones(cols)}
    if layout == "compressed-tensors":
        tensors |= {f"{Q_PROJ}.{k}": v for k, v in ct_compress(torch.from_numpy(w)).items()}
        qcfg = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}
    else:
        s2 = np.float32(np.abs(w).max() / np.float32(6.0 * 448.0))
        packed, s8 = ref_modelopt(w, s2)
        tensors |= {Q_PROJ + ".weight": torch.from_numpy(packed),
                    Q_PROJ + ".weight_scale": torch.from_numpy(s8).view(torch.float8_e4m3fn),
                    Q_PROJ + ".weight_scale_2": torch.tensor(s2), Q_PROJ + ".input_scale": torch.tensor(0.0125)}
        qcfg = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    return save_quantized_base(tmp_path, "base", tensors, {"model_type": "llama"}, qcfg), tensors


def test_nvfp4_compressed_tensors_dequantize_equals_its_decompressor(tmp_path):
    base, tensors = nvfp4_base(tmp_path, "compressed-tensors")
    s = detect(open_checkpoint(base)).of(Q_PROJ + ".weight_packed")
    assert s is not None and s.supported and s.scheme == "nvfp4" and s.shape == (48, 64)
    assert s.changing == [Q_PROJ + ".weight_scale"]
    got = dequantize(s, tensors[Q_PROJ + ".weight_packed"], load_from(tensors))
    want = ct_decompress({k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(Q_PROJ)})
    assert got.dtype == torch.float32 and torch.equal(got.to(want.dtype), want)  # it decompresses to bf16
    # and in float32, numpy: e2m1 · (fp8 scale / global scale)
    packed = tensors[Q_PROJ + ".weight_packed"].numpy()
    codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(48, 64)
    eff = (tensors[Q_PROJ + ".weight_scale"].float().numpy() / tensors[Q_PROJ + ".weight_global_scale"].numpy())
    assert np.array_equal(got.numpy(), (e2m1_values(codes).reshape(48, 4, 16) * eff[..., None]).reshape(48, 64))


@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4_compressed_tensors_requantize_equals_its_compressor(tmp_path, seed):
    """Block scales recomputed by compressed-tensors' own calculate_qparams with the stored global scale
    (kept: llm-compressor gives fused q/k/v and gate/up one), packed by its own compressor."""
    base, tensors = nvfp4_base(tmp_path, "compressed-tensors", seed=seed)
    s = detect(open_checkpoint(base)).of(Q_PROJ + ".weight_packed")
    assert s is not None
    load = load_from(tensors)
    w = dequantize(s, tensors[Q_PROJ + ".weight_packed"], load)
    delta = (np.random.default_rng(seed + 5).integers(-4, 5, w.shape) / 16).astype(np.float32)
    new = torch.from_numpy((w.numpy() + delta).astype(np.float32))
    outs, read_back = requantize(s, new, load)
    want = ct_compress(new, tensors[Q_PROJ + ".weight_global_scale"])
    assert set(outs) == {Q_PROJ + ".weight_packed", Q_PROJ + ".weight_scale"}
    assert torch.equal(outs[Q_PROJ + ".weight_packed"], want["weight_packed"])
    assert torch.equal(outs[Q_PROJ + ".weight_scale"].view(torch.uint8), want["weight_scale"].view(torch.uint8))
    assert torch.equal(read_back.to(torch.bfloat16), ct_decompress(want | {
        "weight_global_scale": tensors[Q_PROJ + ".weight_global_scale"]}))


def test_nvfp4_ties_and_negative_zero_follow_compressed_tensors():
    from loratool.storage import Storage, quantize

    g = torch.tensor([448.0 * 6.0 / 6.0])  # global scale 448: a block of amax 6 gets fp8 scale 448 -> eff 1
    row = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, -0.1, 0.1, 5.5, -6.0, 0.0])
    w = torch.stack([row, -row, row * 0.5, torch.zeros(16)])
    s = Storage(Q_PROJ + ".weight_packed", "nvfp4", "uint8", (4, 16),
                {"scale": "s", "global_scale": "g"}, (16,), {"layout": "compressed-tensors"})
    outs = quantize(s, w, load_from({"g": g}))
    want = ct_compress(w, g)
    assert torch.equal(outs[Q_PROJ + ".weight_packed"], want["weight_packed"])
    assert torch.equal(outs["s"].view(torch.uint8), want["weight_scale"].view(torch.uint8))


def test_nvfp4_modelopt_merge_equals_the_reference_bit_for_bit(tmp_path):
    from loratool.ops.merge import merge

    base, tensors = nvfp4_base(tmp_path, "modelopt")
    storage = detect(open_checkpoint(base))
    s = storage.of(Q_PROJ + ".weight")
    assert s is not None and s.scheme == "nvfp4" and s.params["layout"] == "modelopt" and s.shape == (48, 64)
    assert storage.unsupported == []
    s2 = np.float32(tensors[Q_PROJ + ".weight_scale_2"].numpy())
    deq = modelopt_dequant(tensors[Q_PROJ + ".weight"].numpy(), tensors[Q_PROJ + ".weight_scale"].view(
        torch.uint8).numpy(), s2)
    lora, a, b = exact_lora(tmp_path / "lora", 48, 64, seed=3)
    report = merge(base, [lora], tmp_path / "out", stats=True)
    assert report.merged == 1 and report.tensors[0].storage == "nvfp4"
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    packed, s8 = ref_modelopt((deq + b @ a).astype(np.float32), s2)
    assert np.array_equal(got[Q_PROJ + ".weight"].numpy(), packed)
    assert np.array_equal(got[Q_PROJ + ".weight_scale"].view(torch.uint8).numpy(), s8)
    for k in (Q_PROJ + ".weight_scale_2", Q_PROJ + ".input_scale"):  # kept
        assert torch.equal(got[k], tensors[k]), k
    # the realized delta is measured on what a loader reads back
    written = modelopt_dequant(packed, s8, s2)
    dd = b @ a
    retained = float(((written - deq) * dd).sum() / (dd * dd).sum())
    assert report.realized[0][1] == pytest.approx(retained, rel=1e-4)


def test_nvfp4_modelopt_stochastic_rounding_is_seeded(tmp_path):
    from loratool.ops.merge import merge

    base, _ = nvfp4_base(tmp_path, "modelopt")
    lora, _, _ = exact_lora(tmp_path / "lora", 48, 64, seed=3)
    outs = []
    for i, seed in enumerate((1, 1, 2)):
        merge(base, [lora], tmp_path / f"o{i}", rounding="stochastic", seed=seed)
        outs.append(load_file(str(tmp_path / f"o{i}" / "model.safetensors"))[Q_PROJ + ".weight"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_nvfp4_modelopt_dequantized_output(tmp_path):
    from loratool.ops.merge import merge

    base, tensors = nvfp4_base(tmp_path, "modelopt")
    s2 = np.float32(tensors[Q_PROJ + ".weight_scale_2"].numpy())
    deq = modelopt_dequant(tensors[Q_PROJ + ".weight"].numpy(), tensors[Q_PROJ + ".weight_scale"].view(
        torch.uint8).numpy(), s2)
    lora, a, b = exact_lora(tmp_path / "lora", 48, 64, seed=3)
    merge(base, [lora], tmp_path / "out", dtype="fp32")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == {Q_PROJ + ".weight", "model.norm.weight"}  # the scales are left out
    assert np.array_equal(got[Q_PROJ + ".weight"].numpy(), (deq + b @ a).astype(np.float32))


def test_nvfp4_compressed_tensors_dequantized_output_is_refused_by_name(tmp_path):
    base, _ = nvfp4_base(tmp_path, "compressed-tensors")
    lora, _, _ = exact_lora(tmp_path / "lora", 48, 64, seed=3)
    lines = refused_merge(base, lora, tmp_path / "o", "--dtype", "bf16")
    assert Q_PROJ + ".weight_packed" in lines[0] and "nvfp4" in lines[0], lines


def test_nvfp4_compressed_tensors_merge_equals_its_compressor(tmp_path):
    """A merge into `<m>.weight_packed` (the adapter names `<m>`): the written tensors are
    compressed-tensors' own compression of dequant(W) + ΔW with the stored global scale."""
    from loratool.ops.merge import merge

    base, tensors = nvfp4_base(tmp_path, "compressed-tensors", seed=2)
    s = detect(open_checkpoint(base)).of(Q_PROJ + ".weight_packed")
    assert s is not None
    deq = dequantize(s, tensors[Q_PROJ + ".weight_packed"], load_from(tensors)).numpy()
    lora, a, b = exact_lora(tmp_path / "lora", 48, 64, seed=4)
    report = merge(base, [lora], tmp_path / "out")
    assert report.merged == 1
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert list(got) == list(load_file(str(base / "model.safetensors")))
    want = ct_compress(torch.from_numpy((deq + b @ a).astype(np.float32)), tensors[Q_PROJ + ".weight_global_scale"])
    assert torch.equal(got[Q_PROJ + ".weight_packed"], want["weight_packed"])
    assert torch.equal(got[Q_PROJ + ".weight_scale"].view(torch.uint8), want["weight_scale"].view(torch.uint8))
    assert torch.equal(got[Q_PROJ + ".weight_global_scale"], tensors[Q_PROJ + ".weight_global_scale"])


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_validate_base_matches_an_nvfp4_base(tmp_path, layout):
    base, _ = nvfp4_base(tmp_path, layout)
    lora, _, _ = exact_lora(tmp_path / "lora", 48, 64, seed=3)
    res = subprocess.run([sys.executable, "-m", "loratool", "validate", str(lora), "--base", str(base), "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["base_storage"]["schemes"] == {"nvfp4": 1} and doc["base_storage"]["unsupported"] == []
    assert doc["matched"] == 1


@pytest.mark.slow
def test_transformers_loads_the_merged_compressed_tensors_nvfp4_checkpoint(tmp_path):
    """A tiny Llama saved by transformers and compressed to NVFP4 by compressed-tensors, with the
    config its QuantizationConfig writes: after the merge transformers loads it (dequantize=True, its
    CPU path) and sees q_proj as compressed-tensors' compression of dequant(W) + ΔW, k_proj as it was."""
    pytest.importorskip("transformers")
    ct_scheme()
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

    from loratool.ops.merge import merge

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "f32")
    stored: dict[str, torch.Tensor] = {}
    for k, v in load_file(str(tmp_path / "f32" / "model.safetensors")).items():
        if k.endswith("_proj.weight"):
            stored |= {k[: -len("weight")] + part: t for part, t in ct_compress(v.float()).items()}
        else:
            stored[k] = v
    qcfg = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("NVFP4A16", ["Linear"])},
                              format="nvfp4-pack-quantized", quantization_status="compressed", ignore=["lm_head"])
    base = save_quantized_base(tmp_path, "nvfp4", stored, json.loads((tmp_path / "f32" / "config.json").read_text()),
                               qcfg.model_dump(mode="json") | {"quant_method": "compressed-tensors"})
    s = detect(open_checkpoint(base)).of(Q_PROJ + ".weight_packed")
    assert s is not None
    deq = dequantize(s, stored[Q_PROJ + ".weight_packed"], load_from(stored)).numpy()
    lora, a, b = exact_lora(tmp_path / "lora", 64, 64, seed=6)
    merge(base, [lora], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    attn = model.model.layers[0].self_attn
    g = stored[Q_PROJ + ".weight_global_scale"]
    merged = ct_compress(torch.from_numpy((deq + b @ a).astype(np.float32)), g)
    want = ct_decompress(merged | {"weight_global_scale": g})
    assert torch.equal(attn.q_proj.weight.detach().to(want.dtype), want)
    k_proj = "model.layers.0.self_attn.k_proj"
    before = ct_decompress({k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(k_proj + ".weight")})
    assert torch.equal(attn.k_proj.weight.detach().to(before.dtype), before)


# ---------------------------------------------------------------------------------------------
# ComfyUI mixed precision (comfy_quant): each layer in its own format, numpy references


def comfy_marker(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def ref_comfy_fp8(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.float32]:
    """ComfyUI's requantization of a patched fp8 layer (scale="recalculate"): scale = amax / max,
    q = fp8(clamp(w · (1 / scale))), with this repository's numpy fp8 rounding (tests/ops)."""
    from quant_refs import fp8_values, ref_fp8_bits

    top = np.float32(fp8_values(fmt)[-1])
    scale = np.float32(np.abs(w).max() / top)
    return ref_fp8_bits((w * (np.float32(1) / scale)).astype(np.float32), fmt), scale


def comfy_base(tmp_path: Path, fmt: str, *, seed: int = 0):
    """One ComfyUI file: q_proj in `fmt` (marker, weight_scale, input_scale), k_proj bf16, v_proj in
    float8_e5m2, o_proj in nvfp4 (its swizzled block scales: refused, so not in the merged tests)."""
    from quant_refs import fp8_decode

    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    deq = {}
    for name, f in ((Q_PROJ, fmt), ("model.layers.0.self_attn.v_proj", "float8_e5m2")):
        w = rng.standard_normal((48, 64)).astype(np.float32)
        bits, scale = ref_comfy_fp8(w, f)
        tensors |= {name + ".weight": torch.from_numpy(bits).view(getattr(torch, f)),
                    name + ".weight_scale": torch.tensor(scale), name + ".input_scale": torch.tensor(0.5),
                    name + ".comfy_quant": comfy_marker(f)}
        deq[name] = (fp8_decode(bits, f) * scale).astype(np.float32)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(48, 64).bfloat16()
    path = tmp_path / "comfy.safetensors"
    save_file(tensors, str(path))
    return path, tensors, deq


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_comfy_quant_fp8_layer_merges_in_its_own_format(tmp_path, fmt):
    from quant_refs import as_np

    from loratool.ops.merge import merge

    base, tensors, deq = comfy_base(tmp_path, fmt)
    storage = detect(open_checkpoint(base))
    s = storage.of(Q_PROJ + ".weight")
    assert s is not None and s.scheme == "comfy_fp8" and s.params["format"] == fmt
    assert storage.unsupported == [] and Q_PROJ + ".comfy_quant" in storage.siblings
    lora, a, b = exact_lora(tmp_path / "lora", 48, 64)
    report = merge(base, [lora], tmp_path / "out.safetensors", stats=True)
    assert report.merged == 1 and report.tensors[0].storage == "comfy_fp8"
    got = load_file(str(tmp_path / "out.safetensors"))
    assert list(got) == list(load_file(str(base)))
    bits, scale = ref_comfy_fp8((deq[Q_PROJ] + b @ a).astype(np.float32), fmt)
    assert np.array_equal(as_np(got[Q_PROJ + ".weight"]), bits)
    assert got[Q_PROJ + ".weight_scale"].dtype == torch.float32 and float(got[Q_PROJ + ".weight_scale"]) == scale
    for k, v in tensors.items():  # the marker, input_scale and every other layer: as stored
        if k not in (Q_PROJ + ".weight", Q_PROJ + ".weight_scale"):
            assert torch.equal(got[k].view(torch.uint8) if got[k].dim() else got[k],
                               v.view(torch.uint8) if v.dim() else v), k


def test_comfy_quant_int8_layer_is_refused_by_its_format(tmp_path):
    base, tensors, _ = comfy_base(tmp_path, "float8_e4m3fn")
    o_proj = "model.layers.0.self_attn.o_proj"
    tensors |= {o_proj + ".weight": torch.zeros(48, 64, dtype=torch.int8), o_proj + ".weight_scale": torch.tensor(1.0),
                o_proj + ".comfy_quant": comfy_marker("int8_tensorwise")}
    save_file(tensors, str(base))
    lora, _, _ = exact_lora(tmp_path / "lora", 48, 64)
    lines = refused_merge(base, lora, tmp_path / "out.safetensors")
    assert o_proj + ".weight" in lines[0] and "comfy_quant format int8_tensorwise" in lines[0], lines


def test_comfy_quant_nvfp4_is_never_read_as_modelopt(tmp_path):
    """ComfyUI's nvfp4 has ModelOpt's key names, but swizzled block scales and high-first nibbles: for a
    (128, 64) weight the swizzled scales have ModelOpt's (128, 4) shape, and the marker decides."""
    o_proj = "model.layers.0.self_attn.o_proj"
    tensors = {o_proj + ".weight": torch.zeros(128, 32, dtype=torch.uint8),
               o_proj + ".weight_scale": torch.zeros(128, 4).to(torch.float8_e4m3fn),
               o_proj + ".weight_scale_2": torch.tensor(1.0), o_proj + ".comfy_quant": comfy_marker("nvfp4")}
    save_file(tensors, str(tmp_path / "c.safetensors"))
    s = detect(open_checkpoint(tmp_path / "c.safetensors")).of(o_proj + ".weight")
    assert s is not None and s.scheme == "comfy_nvfp4" and s.params["layout"] == "comfy"


def ref_swizzle(s: np.ndarray) -> np.ndarray:
    """cuBLAS's block-scale layout, from its definition: 128 x 4 tiles of 512 bytes, row-major over
    tiles, the byte of (r, c) inside a tile at (r % 32) · 16 + (r // 32) · 4 + c % 4; zero padded."""
    rows, cols = s.shape
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    flat = np.zeros(rp * cp, s.dtype)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * (cp // 4) + c // 4
            flat[tile * 512 + (r % 128 % 32) * 16 + (r % 128 // 32) * 4 + c % 4] = s[r, c]
    return flat.reshape(rp, cp)


def ref_comfy_nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """comfy-kitchen's quantize_nvfp4 (eager) with scale="recalculate", in numpy (torch for the fp8
    cast): g = amax / (448 · 6); block fp8 = min((amax_b / 6) / g, 448); x / (g · fp8) to e2m1 (ties
    to even, sign kept), codes high nibble first; the fp8 scales swizzled."""
    rows, cols = w.shape
    g = np.float32(np.abs(w).max() / np.float32(448.0 * 6.0))
    blocks = w.reshape(rows, cols // 16, 16)
    s = np.minimum((np.abs(blocks).max(-1) / np.float32(6.0)).astype(np.float32) / g, np.float32(448))
    s8 = torch.from_numpy(s.astype(np.float32)).to(torch.float8_e4m3fn)
    total = (g * s8.float().numpy()).astype(np.float32)
    scaled = np.where(total[..., None] > 0, blocks / np.where(total > 0, total, 1)[..., None], 0)
    mag = np.abs(scaled.astype(np.float32)).reshape(rows, cols)
    ordinal = np.searchsorted(E2M1_BOUNDS, mag, side="left") + np.isin(mag, E2M1_BOUNDS[[1, 3, 5]])
    codes = (ordinal | np.where(scaled.reshape(rows, cols) < 0, 8, 0)).astype(np.uint8)
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).astype(np.uint8)
    return packed, ref_swizzle(s8.view(torch.uint8).numpy()), g


def comfy_nvfp4_dequant(packed: np.ndarray, swizzled: np.ndarray, g: np.float32, rows: int, cols: int) -> np.ndarray:
    codes = np.stack([packed >> 4, packed & 0xF], -1).reshape(rows, cols)
    s8 = np.zeros((rows, cols // 16), np.uint8)
    flat = swizzled.reshape(-1)
    for r in range(rows):
        for c in range(cols // 16):
            s8[r, c] = flat[((r // 128) * (swizzled.shape[1] // 4) + c // 4) * 512 + (r % 32) * 16
                            + (r % 128 // 32) * 4 + c % 4]
    total = (g * torch.from_numpy(s8).view(torch.float8_e4m3fn).float().numpy()).astype(np.float32)
    return (e2m1_values(codes).reshape(rows, -1, 16) * total[..., None]).reshape(rows, cols)


@pytest.mark.parametrize("shape", [(48, 64), (160, 96)])  # partial 128-row and 4-column scale tiles
def test_comfy_quant_nvfp4_layer_merges_in_its_own_format(tmp_path, shape):
    from loratool.ops.merge import merge

    rows, cols = shape
    rng = np.random.default_rng(8)
    w = rng.standard_normal(shape).astype(np.float32)
    w[1, 16:32] = 0  # an all-zero block keeps scale 0
    packed, swizzled, g = ref_comfy_nvfp4(w)
    tensors = {Q_PROJ + ".weight": torch.from_numpy(packed),
               Q_PROJ + ".weight_scale": torch.from_numpy(swizzled).view(torch.float8_e4m3fn),
               Q_PROJ + ".weight_scale_2": torch.tensor(g), Q_PROJ + ".input_scale": torch.tensor(0.25),
               Q_PROJ + ".comfy_quant": comfy_marker("nvfp4"), "model.norm.weight": torch.ones(cols)}
    base = tmp_path / "comfy.safetensors"
    save_file(tensors, str(base))
    s = detect(open_checkpoint(base)).of(Q_PROJ + ".weight")
    assert s is not None and s.scheme == "comfy_nvfp4" and s.shape == shape
    deq = comfy_nvfp4_dequant(packed, swizzled, g, rows, cols)
    assert np.array_equal(dequantize(s, tensors[Q_PROJ + ".weight"], load_from(tensors)).numpy(), deq)
    lora, a, b = exact_lora(tmp_path / "lora", rows, cols)
    merge(base, [lora], tmp_path / "out.safetensors")
    got = load_file(str(tmp_path / "out.safetensors"))
    want_packed, want_scales, want_g = ref_comfy_nvfp4((deq + b @ a).astype(np.float32))
    assert np.array_equal(got[Q_PROJ + ".weight"].numpy(), want_packed)
    assert np.array_equal(got[Q_PROJ + ".weight_scale"].view(torch.uint8).numpy(), want_scales)
    assert float(got[Q_PROJ + ".weight_scale_2"]) == want_g
    for k in (Q_PROJ + ".input_scale", Q_PROJ + ".comfy_quant"):
        assert torch.equal(got[k], tensors[k]), k


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_verify_accepts_an_nvfp4_merge_and_refuses_an_unmerged_copy(tmp_path, layout, rounding):
    import shutil

    from loratool.ops.merge import merge
    from loratool.ops.verify import verify

    base, _ = nvfp4_base(tmp_path, layout)
    lora, _, _ = exact_lora(tmp_path / "lora", 48, 64)
    merge(base, [lora], tmp_path / "out", rounding=rounding, seed=3 if rounding == "stochastic" else None)
    report = verify(tmp_path / "out", base, [lora])
    assert report.ok, [t.to_dict() for t in report.findings]
    shutil.copytree(base, tmp_path / "copy")
    assert not verify(tmp_path / "copy", base, [lora]).ok


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_nvfp4_merges_by_row_blocks_with_the_whole_tensors_bits(tmp_path, monkeypatch, layout):
    """NVFP4 splits by rows (its block scales lie along a row, the tensor scale is kept): blocks of 8
    rows give the reference's bits (nearest), and a seeded stochastic merge draws the same stream as
    the whole-tensor path."""
    import loratool.maths.merge as kernels
    import loratool.ops.merge as merge_op
    import loratool.storage as storage
    from loratool.ops.merge import merge

    rows: list[int] = []
    whole_rows = storage.RowBlocks.dequantize

    def spy(self, start, stop):
        rows.append(stop - start)
        return whole_rows(self, start, stop)

    monkeypatch.setattr(storage.RowBlocks, "dequantize", spy)
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 8 * 64)
    base, tensors = nvfp4_base(tmp_path, layout, seed=1)
    weight = Q_PROJ + (".weight_packed" if layout == "compressed-tensors" else ".weight")
    s = detect(open_checkpoint(base)).of(weight)
    assert s is not None
    deq = dequantize(s, tensors[weight], load_from(tensors)).numpy()
    lora, a, b = exact_lora(tmp_path / "lora", 48, 64, seed=4)
    merge(base, [lora], tmp_path / "out")
    assert rows and max(rows) == 8 and sum(rows) == 48  # by blocks, never the whole tensor
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    new = (deq + b @ a).astype(np.float32)
    if layout == "compressed-tensors":
        want = ct_compress(torch.from_numpy(new), tensors[Q_PROJ + ".weight_global_scale"])
        packed, s8 = want["weight_packed"].numpy(), want["weight_scale"].view(torch.uint8).numpy()
    else:
        packed, s8 = ref_modelopt(new, np.float32(tensors[Q_PROJ + ".weight_scale_2"].numpy()))
    assert np.array_equal(got[weight].numpy(), packed)
    assert np.array_equal(got[Q_PROJ + ".weight_scale"].view(torch.uint8).numpy(), s8)

    merge(base, [lora], tmp_path / "blocks", rounding="stochastic", seed=5)
    monkeypatch.setattr(merge_op, "block_rows", lambda s: None)  # the whole-tensor path
    merge(base, [lora], tmp_path / "whole", rounding="stochastic", seed=5)
    blocks = load_file(str(tmp_path / "blocks" / "model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    for k in (weight, Q_PROJ + ".weight_scale"):
        assert torch.equal(blocks[k].view(torch.uint8), whole[k].view(torch.uint8)), k
    assert not torch.equal(blocks[weight], got[weight])  # stochastic rounding did change some codes


def test_gpt_oss_mxfp4_experts_merge_a_peft_target_parameters_adapter(tmp_path):
    """A peft `target_parameters` LoRA on gpt-oss's fused experts, merged into the experts stored MXFP4 as
    gpt-oss ships them: the result is gguf's MXFP4 of what peft's merge_and_unload gives on the dequantized
    model, bit for bit (factors are multiples of 1/8, so W + ΔW is exact in float32 on both sides)."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import GptOssConfig, GptOssForCausalLM

    from loratool.ops.merge import merge

    cfg = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                       vocab_size=64, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg)
    stored, params = {}, ("gate_up_proj", "down_proj")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(params):  # the model peft merges into holds what the MXFP4 base dequantizes to
                p.copy_(torch.from_numpy(gguf_dequant(p.detach().numpy())))
    for k, v in model.state_dict().items():
        if k.endswith(params):
            blocks, scales = ref_mxfp4(v.numpy())
            stored[k + "_blocks"], stored[k + "_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
        else:
            stored[k] = v.contiguous()
    model.config.save_pretrained(tmp_path / "cfg")
    base = save_quantized_base(tmp_path, "mxfp4", stored, json.loads((tmp_path / "cfg" / "config.json").read_text()),
                               {"quant_method": "mxfp4", "modules_to_not_convert": [
                                   "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"]})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, target_modules=[],
                                                      target_parameters=[f"mlp.experts.{p}" for p in params]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randint(-2, 3, p.shape, generator=gen).float() / 8)
    lora.save_pretrained(tmp_path / "lora")
    want = {k: v for k, v in lora.merge_and_unload().state_dict().items() if k.endswith(params)}
    assert len(want) == 2

    merge(base, [tmp_path / "lora"], tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, w in want.items():
        blocks, scales = ref_mxfp4(w.detach().numpy())
        assert not np.array_equal(blocks, stored[k + "_blocks"].numpy())  # the delta moved codes
        assert np.array_equal(got[k + "_blocks"].numpy(), blocks), k
        assert np.array_equal(got[k + "_scales"].numpy(), scales), k
