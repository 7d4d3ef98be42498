"""compressed-tensors pack-quantized int4/int8 bases (issue 27): dequantized exactly, requantized as
compressed-tensors' own quantizer does it.

Every base is made by compressed-tensors itself (calculate_qparams on the weight's min and max, its
PackedQuantizationCompressor), and every merged tensor is compared bit for bit with that same
compressor applied to its own decompression of the base plus ΔW (the factors are multiples of 1/8:
ΔW and the float32 add are exact). Symmetric and asymmetric, int4 and int8, per group, channel and
tensor; a base merged by row blocks gives the same bits; GPTQ act-order (g_idx) stays refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from quant_refs import KEY, exact_factors, write_adapter
from safetensors.torch import load_file, save_file

import loratool.maths.merge as kernels
from loratool.errors import IncompatibleError
from loratool.ops.merge import merge

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.naive_quantized import IntQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

ROWS, COLS = 96, 128


def qparams(w: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' scales and zero points from w's min and max (its min-max observer's reduction)."""
    if args.strategy == "group":
        g = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = g.amin(-1), g.amax(-1)
    elif args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        lo, hi = w.amin(), w.amax()
    return calculate_qparams(lo, hi, args)


COMPRESSORS = {"pack-quantized": PackedQuantizationCompressor, "int-quantized": IntQuantizationCompressor}


def compress(w: torch.Tensor, args: QuantizationArgs, fmt: str = "pack-quantized") -> dict[str, torch.Tensor]:
    scale, zero = qparams(w, args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return dict(COMPRESSORS[fmt].compress(
        {"weight": w, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero}, scheme))


def make_base(tmp_path, args: QuantizationArgs, *, g_idx: bool = False, fmt: str = "pack-quantized"):
    torch.manual_seed(0)
    w = torch.randn(ROWS, COLS) * 0.05
    stored = compress(w, args, fmt)
    tensors = {f"{KEY}.{k}": v.contiguous() for k, v in stored.items()}
    if g_idx:
        tensors[f"{KEY}.weight_g_idx"] = torch.arange(COLS, dtype=torch.int32) // 32
    tensors["model.norm.weight"] = torch.ones(COLS, dtype=torch.bfloat16)
    base = tmp_path / "base"
    base.mkdir()
    save_file(tensors, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json")}}}}))
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    deq = COMPRESSORS[fmt].decompress(dict(stored), scheme)["weight"]
    return base, stored, deq.to(torch.float32)


CASES = [(bits, sym, strategy) for bits in (4, 8) for sym in (True, False)
         for strategy in ("group", "channel", "tensor")]


@pytest.mark.parametrize(("bits", "symmetric", "strategy"), CASES)
def test_merge_requantizes_as_compressed_tensors_does(tmp_path, bits, symmetric, strategy):
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    base, _, deq = make_base(tmp_path, args)
    a, b = exact_factors(4, seed=1, scale=0.125, out=ROWS, inp=COLS)
    lora = write_adapter(tmp_path / "lora", a, b)
    report = merge(base, [lora], tmp_path / "out", stats=True)
    want = compress(deq + torch.from_numpy(b @ a), args)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in want.items():
        assert torch.equal(got[f"{KEY}.{k}"], v.reshape(got[f"{KEY}.{k}"].shape).to(got[f"{KEY}.{k}"].dtype)), k
    assert set(got) == set(load_file(str(base / "model.safetensors")))
    (stat,) = report.tensors
    assert stat.storage.startswith(f"compressed-tensors int{bits}")
    assert report.changed == 1


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", ["group", "channel", "tensor"])
def test_int_quantized_w8a8_weights(tmp_path, symmetric, strategy):
    """format int-quantized (W8A8): `<m>.weight` int8, zero points unpacked; the activation scheme is left as it is."""
    args = QuantizationArgs(num_bits=8, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    base, _, deq = make_base(tmp_path, args, fmt="int-quantized")
    a, b = exact_factors(4, seed=5, scale=0.125, out=ROWS, inp=COLS)
    report = merge(base, [write_adapter(tmp_path / "lora", a, b)], tmp_path / "out", stats=True)
    want = compress(deq + torch.from_numpy(b @ a), args, "int-quantized")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in want.items():
        assert torch.equal(got[f"{KEY}.{k}"], v.reshape(got[f"{KEY}.{k}"].shape).to(got[f"{KEY}.{k}"].dtype)), k
    assert got[f"{KEY}.weight"].dtype == torch.int8
    assert report.tensors[0].storage.startswith("compressed-tensors int8")


@pytest.mark.parametrize("symmetric", [True, False])
def test_row_blocks_give_the_same_bits(tmp_path, monkeypatch, symmetric):
    """Blocks of 32 rows (zero points pack 32 rows into `bits` words) or of single rows (symmetric)."""
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32)
    base, _, deq = make_base(tmp_path, args)
    a, b = exact_factors(4, seed=2, scale=0.125, out=ROWS, inp=COLS)
    lora = write_adapter(tmp_path / "lora", a, b)
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", COLS * 8)
    merge(base, [lora], tmp_path / "out")
    want = compress(deq + torch.from_numpy(b @ a), args)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in want.items():
        assert torch.equal(got[f"{KEY}.{k}"], v.reshape(got[f"{KEY}.{k}"].shape).to(got[f"{KEY}.{k}"].dtype)), k


def test_act_order_is_refused_by_name(tmp_path):
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    base, _, _ = make_base(tmp_path, args, g_idx=True)
    a, b = exact_factors(4, seed=3, out=ROWS, inp=COLS)
    lora = write_adapter(tmp_path / "lora", a, b)
    with pytest.raises(IncompatibleError, match="act-order") as e:
        merge(base, [lora], tmp_path / "out")
    assert "weight_packed" in str(e.value) and e.value.hint
    assert not (tmp_path / "out").exists()


def test_searched_scales_are_refused_by_name(tmp_path):
    """An mse observer searched its scales: requantizing with min-max ones would not be its quantizer."""
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    base, _, _ = make_base(tmp_path, args)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["observer"] = "mse"
    (base / "config.json").write_text(json.dumps(config))
    a, b = exact_factors(4, seed=3, out=ROWS, inp=COLS)
    with pytest.raises(IncompatibleError, match="mse observer"):
        merge(base, [write_adapter(tmp_path / "lora", a, b)], tmp_path / "out")


def test_dtype_is_refused_for_packed_weights(tmp_path):
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
    base, _, _ = make_base(tmp_path, args)
    a, b = exact_factors(4, seed=3, out=ROWS, inp=COLS)
    with pytest.raises(IncompatibleError, match=r"weight_packed' is ct_int .*would be '.*q_proj\.weight', renamed"):
        merge(base, [write_adapter(tmp_path / "lora", a, b)], tmp_path / "out", dtype="bf16")


def test_pack_int32_is_compressed_tensors_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from loratool.maths.quant import pack_int32, unpack_int32

    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 8):
        q = torch.from_numpy(rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (5, 77)).astype(np.int8))
        packed = pack_to_int32(q, bits)
        assert torch.equal(pack_int32(q, bits), packed)
        assert torch.equal(unpack_int32(packed, bits, 77), q.to(torch.int64))


def test_extract_reads_packed_weights_dequantized(tmp_path):
    """extract between a packed base and its merge: the delta is the change of compressed-tensors' own
    decompressions (rank ≤ 4 + rounding, so compared through the leading singular directions)."""
    from loratool.formats import read
    from loratool.ops.extract import extract

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    base, _, deq = make_base(tmp_path, args)
    a, b = exact_factors(4, seed=4, scale=0.25, out=ROWS, inp=COLS)
    merge(base, [write_adapter(tmp_path / "lora", a, b)], tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    new = PackedQuantizationCompressor.decompress(
        {k[len(KEY) + 1:]: v for k, v in merged.items() if k.startswith(KEY)}, scheme)["weight"].float()
    extract(base, tmp_path / "out", tmp_path / "ex", rank=4)
    (m,) = read(tmp_path / "ex").modules.values()
    got = (m.up.load().float() @ m.down.load().float()) * m.scale
    want = new - deq
    assert torch.linalg.norm(got - want) <= 0.1 * torch.linalg.norm(want)


@pytest.mark.slow
def test_transformers_loads_the_merged_model(tmp_path):
    """A tiny Llama whose Linear weights compressed-tensors packed (int4, groups of 32): merged, it
    loads in transformers (CPU, dequantize=True) with q_proj equal to compressed-tensors' own
    requantization of its base plus ΔW, and runs."""
    transformers = pytest.importorskip("transformers")
    from transformers import CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith("proj.weight"):
            for kk, vv in compress(v.float(), args).items():
                tensors[k[: -len("weight")] + kk] = vv.contiguous()
        else:
            tensors[k] = v.contiguous()
    base = tmp_path / "base"
    base.mkdir()
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict() | {"torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json")}}}}
    (base / "config.json").write_text(json.dumps(config))
    a, b = exact_factors(4, seed=6, scale=0.25, out=64, inp=64)
    merge(base, [write_adapter(tmp_path / "lora", a, b)], tmp_path / "out")

    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    stored = {k[len(KEY) + 1:]: v for k, v in tensors.items() if k.startswith(KEY + ".")}
    deq = PackedQuantizationCompressor.decompress(stored, scheme)["weight"].float()
    want = PackedQuantizationCompressor.decompress(compress(deq + torch.from_numpy(b @ a), args), scheme)["weight"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=CompressedTensorsConfig(dequantize=True))
    got = loaded.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(got.to(want.dtype), want)
    assert not torch.equal(want, PackedQuantizationCompressor.decompress(stored, scheme)["weight"])
    assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()
