"""merge into quantized bases (issue #13): fp8, ComfyUI scaled fp8, block fp8, bitsandbytes nf4/fp4/int8.

Every base is built here with plain numpy quantization code written in this file (not loratool's),
and every merged tensor is compared bit for bit with Q(dequant(W) + ΔW) computed by that same
reference code. The adapters' factors are small multiples of 1/8, so ΔW = B @ A is exact in
float32 whatever the BLAS (the comparison depends on no summation order); dequantization and the
add are single IEEE float32 operations, identical in numpy and torch.

Second references, where they run on this CPU:
- transformers loads a merged block-fp8 checkpoint with `FineGrainedFP8Config(dequantize=True)`
  (its CPU path) and must see the same weights as our reference dequantization;
- bitsandbytes (its CPU build installs from PyPI; it is in the test extras, so CI runs these) makes a
  real serialized nf4 base and dequantizes our merged output with its own `dequantize_4bit`; the
  tests that need it are skipped only where it is not installed (e.g. a platform without a wheel).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from factories import save_quantized_base
from quant_refs import (
    BLOCK,
    E4M3,
    IN,
    KEY,
    KINDS,
    NF4_LEVELS,
    OTHER,
    OUT,
    as_np,
    exact_factors,
    fp8_decode,
    fp8_tensor,
    fp8_values,
    make_base,
    ref_block_dequant,
    ref_block_quant,
    ref_codebook_dequant,
    ref_codebook_quant,
    ref_fp8_bits,
    ref_int8_dequant,
    ref_nested_dequant,
    requant,
    t,
    unpack,
    write_adapter,
)
from safetensors.torch import load_file, save_file

from loratool.ops.merge import merge

# ---------------------------------------------------------------------------------------------
# merged tensors equal Q(dequant(W) + ΔW), bit for bit


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_with_the_same_scheme(tmp_path, kind):
    base, tensors, deq = make_base(tmp_path, kind)
    a, b = exact_factors(4, seed=1, scale=0.5)
    lora = write_adapter(tmp_path / "lora", a, b)
    report = merge(base, [lora], tmp_path / "out", stats=True)
    new = (deq + b @ a).astype(np.float32)  # exact ΔW; one float32 add
    want = requant(kind, KEY + ".weight", new, tensors)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert list(got) == list(load_file(str(base / "model.safetensors")))  # same keys, nothing added or lost
    for k, v in tensors.items():
        if k in want:
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert np.array_equal(as_np(got[k]), want[k].reshape(as_np(got[k]).shape)), f"{kind}: {k} differs"
        else:
            assert torch.equal(got[k].view(torch.uint8) if got[k].dim() else got[k],
                               v.view(torch.uint8) if v.dim() else v), f"{kind}: {k} should be copied as it is"
    assert report.merged == 1
    (stat,) = report.tensors
    scheme = {"block": "fp8_block", "scaled": "fp8_scaled", "scaled_rows": "fp8_scaled", "fp8_e5m2": "fp8",
              "nf4_nested": "bnb_nf4", "nf4": "bnb_nf4", "fp4": "bnb_fp4", "int8": "bnb_int8"}.get(kind, kind)
    assert stat.storage.startswith(scheme)


@pytest.mark.parametrize("kind", ["block", "nf4_nested", "int8", "scaled"])
def test_reported_retention_is_the_realized_delta(tmp_path, kind):
    """retained = <R, ΔW>/||ΔW||², rel. error = ||R − ΔW||/||ΔW||, with R = dequant(stored W') − W."""
    base, _, deq = make_base(tmp_path, kind)
    a, b = exact_factors(4, seed=2, scale=0.125)
    lora = write_adapter(tmp_path / "lora", a, b)
    report = merge(base, [lora], tmp_path / "out", stats=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    # dequantize the written tensors with this file's reference code
    new = (deq + b @ a).astype(np.float32)
    stem = KEY
    if kind == "block":
        written = ref_block_dequant(as_np(out[KEY + ".weight"]), out[stem + ".weight_scale_inv"].numpy())
    elif kind == "int8":
        written = ref_int8_dequant(out[KEY + ".weight"].numpy(), out[stem + ".SCB"].numpy())
    elif kind == "scaled":
        written = fp8_decode(as_np(out[KEY + ".weight"]), E4M3) * out[stem + ".scale_weight"].numpy()
    else:
        offset = np.float32(json.loads(bytes(out[KEY + ".weight.quant_state.bitsandbytes__nf4"].numpy()))[
            "nested_offset"])
        absmax = ref_nested_dequant(out[KEY + ".weight.absmax"].numpy().astype(np.int64),
                                    out[KEY + ".weight.nested_absmax"].numpy(), offset)
        written = ref_codebook_dequant(unpack(out[KEY + ".weight"].numpy()), absmax, NF4_LEVELS, 64).reshape(new.shape)
    dw = (new - deq).astype(np.float64)
    r = (written - deq).astype(np.float64)
    retained = float((r * dw).sum() / (dw * dw).sum())
    rel_error = float(np.linalg.norm(r - dw) / np.linalg.norm(dw))
    (stat,) = report.tensors
    assert stat.retained == pytest.approx(retained, rel=1e-4, abs=1e-5)
    assert stat.rel_error == pytest.approx(rel_error, rel=1e-4, abs=1e-5)
    doc = report.to_dict()
    assert doc["min_retained"] == pytest.approx(retained, rel=1e-4, abs=1e-5)
    assert doc["min_retained_tensor"] == KEY + ".weight"


# ---------------------------------------------------------------------------------------------
# the two cases of the issue


def test_issue_scaled_fp8_merges_through_the_scale(tmp_path):
    """ComfyUI scaled fp8 (`scale_weight`): the delta is divided by the scale, not added to q."""
    key = "model.layers.0.q.weight"
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((32, 64)) * 0.02).astype(np.float32)
    s = np.float32(np.abs(w).max() / 448)
    bits = ref_fp8_bits((w / s).astype(np.float32), E4M3)
    base = tmp_path / "flux.safetensors"
    save_file({key: fp8_tensor(bits, E4M3), "model.layers.0.q.scale_weight": torch.tensor(s),
               "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, str(base))
    a = (rng.integers(-2, 3, (4, 64)) / 8).astype(np.float32)
    b = (rng.integers(-2, 3, (32, 4)) / 8 / 128).astype(np.float32)  # ΔW about 10% of |W|
    lora = write_adapter(tmp_path / "lora", a, b, name="model.layers.0.q")
    report = merge(base, [lora], tmp_path / "out.safetensors")
    got = load_file(str(tmp_path / "out.safetensors"))
    deq = fp8_decode(bits, E4M3) * s
    want = ref_fp8_bits(((deq + b @ a) / s).astype(np.float32), E4M3)
    assert np.array_equal(as_np(got[key]), want)
    assert float(got["model.layers.0.q.scale_weight"]) == s  # the fixed scale is kept
    changed = (as_np(got[key]) != bits).mean()
    assert changed > 0.25, f"only {changed:.0%} of the elements changed"  # the bug changed 6 of 2048
    assert report.to_dict()["min_retained"] > 0.5


def test_issue_plain_fp8_small_delta_reports_retention_honestly(tmp_path, capsys):
    """Plain e4m3 base, ΔW about 5% of |W|: much of it rounds away, and the report says how much."""
    from loratool.cli import main

    key = KEY + ".weight"
    rng = np.random.default_rng(6)
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    bits = ref_fp8_bits(w, E4M3)
    base = tmp_path / "base.safetensors"
    save_file({key: fp8_tensor(bits, E4M3)}, str(base))
    a, b = exact_factors(4, seed=7, scale=1.0)
    deq = fp8_decode(bits, E4M3)
    ratio = np.linalg.norm(b @ a) / np.linalg.norm(deq)
    assert 0.02 < ratio < 0.1
    lora = write_adapter(tmp_path / "lora", a, b)
    with pytest.raises(SystemExit) as e:
        main(["merge", str(base), str(lora), "-o", str(tmp_path / "out.safetensors"), "--json"])
    assert e.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    written = fp8_decode(ref_fp8_bits((deq + b @ a).astype(np.float32), E4M3), E4M3)
    dw, r = (b @ a).astype(np.float64), (written - deq).astype(np.float64)
    retained = float((r * dw).sum() / (dw * dw).sum())
    assert doc["min_retained"] == pytest.approx(retained, rel=1e-4)
    assert doc["max_rel_error"] == pytest.approx(float(np.linalg.norm(r - dw) / np.linalg.norm(dw)), rel=1e-4)
    assert doc["storage"].startswith("1 × fp8 float8_e4m3fn")
    assert retained < 0.99  # the rounding loss is real, and it is what is reported


# ---------------------------------------------------------------------------------------------
# thresholds, strict, and a merge that changes nothing


def test_low_retention_warns_and_strict_refuses(tmp_path, capsys):
    from loratool.cli import main

    base, _, _ = make_base(tmp_path, "fp8")
    a, b = exact_factors(4, seed=3, scale=1 / 64)  # ~3% of |W|: below the half-ulp of most e4m3 values
    lora = write_adapter(tmp_path / "lora", a, b)
    report = merge(base, [lora], tmp_path / "out", min_retained=0.9)
    worst = report.worst_retained
    assert worst is not None and worst[1] < 0.9
    assert any("kept less than 90% of their delta" in w for w in report.warnings)
    with pytest.raises(SystemExit) as e:
        main(["merge", str(base), str(lora), "-o", str(tmp_path / "strict"), "--min-retained", "0.9", "--strict"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Error:" in err and "kept less than 90% of their delta" in err and "Traceback" not in err
    assert not (tmp_path / "strict").exists()


def test_a_merge_that_changes_nothing_is_an_error(tmp_path, capsys):
    from loratool.cli import main

    base, _, _ = make_base(tmp_path, "fp8")
    a, b = exact_factors(4, seed=3, scale=2.0 ** -16)  # far below fp8's resolution
    lora = write_adapter(tmp_path / "lora", a, b)
    with pytest.raises(SystemExit) as e:
        main(["merge", str(base), str(lora), "-o", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "changed no stored value" in err and "Hint:" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# stochastic rounding


def test_stochastic_rounding_is_unbiased_and_seeded(tmp_path):
    """Each element goes to one of its two fp8 neighbours, with the mean over seeds converging on the exact value."""
    base, _, deq = make_base(tmp_path, "block")
    a, b = exact_factors(4, seed=4, scale=1 / 32)
    lora = write_adapter(tmp_path / "lora", a, b)
    new = (deq + b @ a).astype(np.float32)
    _, inv = ref_block_quant(new)  # the tile scales do not depend on the rounding
    top = np.float32(448)
    scale = np.zeros_like(new)
    for i in range(0, OUT, BLOCK[0]):
        for j in range(0, IN, BLOCK[1]):
            tile = new[i:i + BLOCK[0], j:j + BLOCK[1]]
            scale[i:i + BLOCK[0], j:j + BLOCK[1]] = top * (np.float32(1) / np.float32(np.abs(tile).max()))
    y = (new * scale).astype(np.float64)  # the exact value, in fp8 units
    vals = fp8_values(E4M3)
    hi_idx = np.clip(np.searchsorted(vals, np.abs(y)), 0, len(vals) - 1)
    lo_v, hi_v = vals[np.clip(hi_idx - 1, 0, None)], vals[hi_idx]
    exact = np.isclose(vals[hi_idx], np.abs(y), rtol=0, atol=0)
    p = np.where(exact, 0.0, (np.abs(y) - lo_v) / np.where(hi_v > lo_v, hi_v - lo_v, 1))
    var = (hi_v - lo_v) ** 2 * p * (1 - p)
    draws = []
    n = 32
    for seed in range(n):
        merge(base, [lora], tmp_path / f"o{seed}", rounding="stochastic", seed=seed)
        got = load_file(str(tmp_path / f"o{seed}" / "model.safetensors"))
        assert np.array_equal(got[KEY + ".weight_scale_inv"].numpy(), inv)
        q = fp8_decode(as_np(got[KEY + ".weight"]), E4M3).astype(np.float64)
        assert np.all((np.abs(q) == np.where(exact, np.abs(y), lo_v)) | (np.abs(q) == hi_v) | (q == 0))
        draws.append(q)
    mean = np.mean(draws, axis=0)
    err = mean - y
    # unbiased: the total error is what n Bernoulli draws per element give (about one standard deviation)
    assert abs(err.sum()) < 4 * np.sqrt(var.sum() / n)
    assert (err ** 2).sum() < 2 * var.sum() / n
    # reproducible with a seed, different across seeds
    merge(base, [lora], tmp_path / "again", rounding="stochastic", seed=3)
    again, first = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("again", "o3"))
    assert torch.equal(again[KEY + ".weight"].view(torch.uint8), first[KEY + ".weight"].view(torch.uint8))
    assert not np.array_equal(draws[0], draws[1])


def test_seed_without_stochastic_rounding_is_refused(tmp_path):
    from loratool.errors import IncompatibleError

    base, _, _ = make_base(tmp_path, "fp8")
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1))
    with pytest.raises(IncompatibleError, match="--seed"):
        merge(base, [lora], tmp_path / "out", seed=1)


# ---------------------------------------------------------------------------------------------
# --dtype on a quantized base: a dequantized merged model


@pytest.mark.parametrize("kind", ["block", "nf4_nested", "scaled", "int8"])
def test_dtype_writes_a_dequantized_model(tmp_path, kind):
    base, _, deq = make_base(tmp_path, kind)
    a, b = exact_factors(4, seed=1, scale=0.5)
    lora = write_adapter(tmp_path / "lora", a, b)
    merge(base, [lora], tmp_path / "out", dtype="bf16")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted([KEY + ".weight", OTHER + ".weight", "model.norm.weight"])
    want = torch.from_numpy((deq + b @ a).astype(np.float32)).bfloat16()
    assert got[KEY + ".weight"].dtype == torch.bfloat16 and torch.equal(got[KEY + ".weight"], want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"


def test_transformers_loads_the_merged_block_fp8_checkpoint(tmp_path):
    """Second reference: transformers' own fp8 dequantization (its CPU path) of our merged output."""
    transformers = pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "bf")
    sd = load_file(str(tmp_path / "bf" / "model.safetensors"))
    quantized, deqs = {}, {}
    for k, v in sd.items():
        if k.endswith("_proj.weight"):
            bits, inv = ref_block_quant(v.float().numpy())
            quantized[k], quantized[k[: -len("weight")] + "weight_scale_inv"] = fp8_tensor(bits, E4M3), t(inv)
            deqs[k] = ref_block_dequant(bits, inv)
        else:
            quantized[k] = v
    base = save_quantized_base(tmp_path, "fp8", quantized, json.loads((tmp_path / "bf" / "config.json").read_text()),
                               {"quant_method": "fp8", "activation_scheme": "dynamic",
                                "weight_block_size": list(BLOCK), "fmt": "e4m3"})
    a, b = exact_factors(4, seed=9, scale=0.25, out=64, inp=64)
    lora = write_adapter(tmp_path / "lora", a, b)
    merge(base, [lora], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=FineGrainedFP8Config(dequantize=True, weight_block_size=list(BLOCK)),
        dtype=torch.float32)
    seen = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    bits, inv = ref_block_quant((deqs[KEY + ".weight"] + b @ a).astype(np.float32))
    assert np.array_equal(seen, ref_block_dequant(bits, inv)), transformers.__version__
    untouched = model.model.layers[0].self_attn.k_proj.weight.detach().float().numpy()
    assert np.array_equal(untouched, deqs[OTHER + ".weight"])


# ---------------------------------------------------------------------------------------------
# bitsandbytes as a second reference (where its CPU build is installed)


def test_bitsandbytes_dequantizes_our_merged_nf4(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    w = torch.randn(OUT, IN)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed = state.as_dict(packed=True)
    key = KEY + ".weight"
    base = tmp_path / "base"
    base.mkdir()
    save_file({key: q, **{f"{key}.{k}": v for k, v in packed.items()}}, str(base / "model.safetensors"))
    a, b = exact_factors(4, seed=1, scale=0.5)
    lora = write_adapter(tmp_path / "lora", a, b)
    report = merge(base, [lora], tmp_path / "out", stats=True)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    out_state = F.QuantState.from_dict({k[len(key) + 1:]: v for k, v in got.items() if k.startswith(key + ".")},
                                       device=torch.device("cpu"))
    theirs = F.dequantize_4bit(got[key], out_state).numpy()
    new = F.dequantize_4bit(q, state).numpy() + b @ a
    # bitsandbytes reads what we wrote as the same numbers our reference gives, within nf4's resolution
    ours = ref_codebook_dequant(unpack(got[key].numpy()),
                                ref_codebook_dequant(got[key + ".absmax"].numpy().astype(np.int64),
                                                     got[key + ".nested_absmax"].numpy(),
                                                     got[key + ".nested_quant_map"].numpy(), 256)
                                + np.float32(out_state.offset), NF4_LEVELS, 64).reshape(new.shape)
    assert np.allclose(theirs, ours, rtol=1e-6, atol=1e-7)
    assert np.linalg.norm(theirs - new) / np.linalg.norm(new) < 0.15  # nf4's own resolution
    assert report.tensors[0].retained is not None


def test_bitsandbytes_requantization_matches_ours_without_nesting(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    torch.manual_seed(1)
    w = torch.randn(OUT, IN)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    key = KEY + ".weight"
    base = tmp_path / "base"
    base.mkdir()
    save_file({key: q, **{f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()}},
              str(base / "model.safetensors"))
    a, b = exact_factors(4, seed=2, scale=0.5)
    lora = write_adapter(tmp_path / "lora", a, b)
    merge(base, [lora], tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    q2, s2 = F.quantize_4bit(F.dequantize_4bit(q, state) + torch.from_numpy(b @ a), blocksize=64, quant_type="nf4")
    assert torch.equal(got[key], q2)
    assert torch.equal(got[key + ".absmax"], s2.absmax)


# ---------------------------------------------------------------------------------------------
# QLoRA: merge into the base the adapter trained on


def test_qlora_base_merges_into_the_nf4_roundtrip(tmp_path):
    rng = np.random.default_rng(11)
    w = rng.standard_normal((OUT, IN)).astype(np.float32)
    base = tmp_path / "base.safetensors"
    save_file({KEY + ".weight": t(w)}, str(base))
    a, b = exact_factors(4, seed=12, scale=0.25)
    lora = write_adapter(tmp_path / "lora", a, b)
    merge(base, [lora], tmp_path / "out.safetensors", qlora_base="nf4")
    got = load_file(str(tmp_path / "out.safetensors"))[KEY + ".weight"].numpy()
    codes, absmax = ref_codebook_quant(w, NF4_LEVELS, 64)
    roundtrip = ref_codebook_dequant(codes, absmax, NF4_LEVELS, 64).reshape(w.shape)
    assert np.array_equal(got, (roundtrip + b @ a).astype(np.float32))


def test_qlora_base_is_refused_on_a_quantized_base(tmp_path):
    from loratool.errors import IncompatibleError

    base, _, _ = make_base(tmp_path, "nf4")
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1))
    with pytest.raises(IncompatibleError, match="already stored quantized"):
        merge(base, [lora], tmp_path / "out", qlora_base="nf4")


# ---------------------------------------------------------------------------------------------
# unsupported schemes are refused up front


@pytest.mark.parametrize(("keys", "scheme"), [
    ({KEY + ".qweight": ((IN // 8, OUT), torch.int32), KEY + ".qzeros": ((1, OUT // 8), torch.int32),
      KEY + ".scales": ((1, OUT), torch.float16)}, "GPTQ/AWQ"),
    ({KEY + ".weight": ((OUT, IN // 2), torch.uint8), KEY + ".weight_scale": ((OUT, IN // 32), torch.float8_e4m3fn),
      KEY + ".weight_scale_2": ((), torch.float32)}, "nvfp4"),  # a block scale per 32 values: not NVFP4's 16
    ({KEY + ".weight_packed": ((OUT, IN // 8), torch.int32), KEY + ".weight_scale": ((OUT, 1), torch.bfloat16)},
     "compressed-tensors"),
])
def test_unsupported_schemes_are_refused_with_one_error(tmp_path, keys, scheme):
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: torch.zeros(shape, dtype=dt) for k, (shape, dt) in keys.items()}, str(base / "model.safetensors"))
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1))
    res = subprocess.run([sys.executable, "-m", "loratool", "merge", str(base), str(lora), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("Error:") and scheme in lines[0] and KEY in lines[0], lines
    assert lines[1].startswith("Hint:") and "unquantized" in lines[1]
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_validate_base_says_how_the_base_is_stored(tmp_path):
    base, _, _ = make_base(tmp_path, "block")
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1))
    res = subprocess.run([sys.executable, "-m", "loratool", "validate", str(lora), "--base", str(base), "--json"],
                         capture_output=True, text=True)
    doc = json.loads(res.stdout)
    assert doc["base_storage"]["schemes"] == {"fp8_block float8_e4m3fn 32x32": 1}
    assert doc["matched"] == 1


def test_extract_against_a_quantized_base_uses_its_dequantized_weights(tmp_path):
    """extract shares the storage descriptors: ΔW = W_tuned − dequant(W_base), nothing silently skipped."""
    from loratool.ops.extract import extract

    base, tensors, deq = make_base(tmp_path, "block")
    a, b = exact_factors(4, seed=13, scale=0.5)
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    save_file({KEY + ".weight": t((deq + b @ a).astype(np.float32)), OTHER + ".weight": tensors[OTHER + ".weight"],
               "model.norm.weight": tensors["model.norm.weight"]}, str(tuned / "model.safetensors"))
    report = extract(base, tuned, tmp_path / "lora", rank=4)
    assert [m.name for m in report.modules] == [KEY]
    got = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    up = got[f"base_model.model.{KEY}.lora_B.weight"].float()
    down = got[f"base_model.model.{KEY}.lora_A.weight"].float()
    delta = (up @ down).numpy() * json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["lora_alpha"] / 4
    assert np.linalg.norm(delta - b @ a) / np.linalg.norm(b @ a) < 1e-3


def test_extract_refuses_an_unsupported_base(tmp_path):
    from loratool.errors import IncompatibleError
    from loratool.ops.extract import extract

    base = tmp_path / "base"
    base.mkdir()
    save_file({KEY + ".qweight": torch.zeros((8, OUT), dtype=torch.int32)}, str(base / "model.safetensors"))
    with pytest.raises(IncompatibleError, match="GPTQ"):
        extract(base, base, tmp_path / "lora", rank=4)
