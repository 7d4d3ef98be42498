"""verify on quantized bases (issue #18): fp8, ComfyUI scaled fp8, block fp8, bitsandbytes nf4/fp4/int8.

The bases and the independent merged files are made with the numpy reference quantization of
tests/quant_refs.py (not loratool's code): MERGED = Q(dequant(W) + B@A) with the
base's scheme. The adapters' factors are multiples of 1/8, so B@A is exact in float32. A right
merge must verify (`merged`, bit for bit the reference requantization); an unmerged copy, a merge
at half weight, and an edited scale must fail with exit 1.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from clirun import run_cli
from quant_refs import (
    E4M3,
    E5M2,
    FP4_LEVELS,
    KEY,
    KINDS,
    NF4_LEVELS,
    OTHER,
    as_np,
    exact_factors,
    fp8_decode,
    make_base,
    ref_block_dequant,
    ref_codebook_dequant,
    ref_int8_dequant,
    ref_nested_dequant,
    requant,
    unpack,
    write_adapter,
)
from safetensors.torch import load_file, save_file

from loratool.ops.merge import merge
from loratool.ops.verify import verify

W = KEY + ".weight"
SCHEME = {"fp8": "fp8 ", "fp8_e5m2": "fp8 ", "scaled": "fp8_scaled", "scaled_rows": "fp8_scaled",
          "block": "fp8_block", "nf4": "bnb_nf4", "nf4_nested": "bnb_nf4", "fp4": "bnb_fp4", "int8": "bnb_int8"}
BIG = 4.0  # ΔW about 25% of ||W||: large against every scheme's rounding (nf4's is about 10%)


def ref_dequant(kind: str, t: dict[str, torch.Tensor]) -> np.ndarray:
    """The weight KEY of a checkpoint's tensors, dequantized with the reference code."""
    stem = KEY
    if kind in ("fp8", "fp8_e5m2"):
        return fp8_decode(as_np(t[W]), E4M3 if kind == "fp8" else E5M2)
    if kind in ("scaled", "scaled_rows"):
        s = t[stem + ".scale_weight"].numpy()
        return (fp8_decode(as_np(t[W]), E4M3) * (s.reshape(-1, 1) if s.ndim else s)).astype(np.float32)
    if kind == "block":
        return ref_block_dequant(as_np(t[W]), t[stem + ".weight_scale_inv"].numpy())
    if kind in ("nf4", "fp4", "nf4_nested"):
        levels = FP4_LEVELS if kind == "fp4" else NF4_LEVELS
        absmax = t[W + ".absmax"].numpy()
        if kind == "nf4_nested":
            state = json.loads(bytes(t[W + ".quant_state.bitsandbytes__nf4"].numpy()))
            absmax = ref_nested_dequant(absmax.astype(np.int64), t[W + ".nested_absmax"].numpy(),
                                        np.float32(state["nested_offset"]))
        return ref_codebook_dequant(unpack(t[W].numpy()), absmax, levels, 64).reshape(48, 64)
    if kind == "int8":
        return ref_int8_dequant(t[W].numpy(), t[stem + ".SCB"].numpy())
    raise AssertionError(kind)


def numpy_merge(base, tensors, deq, b, a, out, *, weight: float = 1.0):
    """MERGED made with the reference code: Q(dequant(W) + weight·B@A), the rest copied."""
    new = (deq + np.float32(weight) * (b @ a)).astype(np.float32)
    kind = base.name[len("base_"):]
    want = requant(kind, W, new, tensors)
    merged = {}
    for k, v in tensors.items():
        if k in want:
            arr = want[k].reshape(as_np(v).shape)
            merged[k] = torch.from_numpy(np.ascontiguousarray(arr)).view(v.dtype) if v.dtype in (
                torch.float8_e4m3fn, torch.float8_e5m2) else torch.from_numpy(np.ascontiguousarray(arr)).to(v.dtype)
        else:
            merged[k] = v
    out.mkdir()
    save_file(merged, str(out / "model.safetensors"))
    shutil.copy(base / "config.json", out / "config.json")
    return out


def _one(report):
    (check,) = [t for t in report.tensors if t.key == W]
    return check


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("maker", ["numpy", "loratool"])
def test_a_right_merge_verifies(tmp_path, kind, maker):
    base, tensors, deq = make_base(tmp_path, kind)
    a, b = exact_factors(4, seed=1, scale=BIG)
    lora = write_adapter(tmp_path / "lora", a, b)
    out = tmp_path / "out"
    if maker == "numpy":
        numpy_merge(base, tensors, deq, b, a, out)
    else:
        merge(base, [lora], out)
    report = verify(out, base, [lora])
    assert report.ok, [t.to_dict() for t in report.findings]
    assert report.quantized and SCHEME[kind].strip() in report.storage
    check = _one(report)
    assert check.verdict == "merged" and check.exact is True
    assert check.storage is not None and check.storage.startswith(SCHEME[kind].strip())
    # every other tensor (the bf16 neighbour, the norm, fixed scales and codebooks) is unchanged
    assert {t.verdict for t in report.tensors if t.key != W} == {"unchanged"}
    assert OTHER + ".weight" in {t.key for t in report.tensors}
    # the expected error bound is the requantization's own error, measured here with numpy
    stored = ref_dequant(kind, load_file(str(out / "model.safetensors"))).astype(np.float64)
    x = (deq + b @ a).astype(np.float64)
    err = np.linalg.norm(stored - x) / np.linalg.norm(stored)
    assert check.requant_error == pytest.approx(err, rel=1e-6)
    assert check.residual == pytest.approx(err, rel=1e-6)  # bit-identical to the requantization
    assert check.tolerance >= 2 * err
    # k: how much of ΔW the stored values keep, <R, ΔW>/||ΔW||² in numpy
    dw, r = b @ a, stored - deq
    assert check.factor == pytest.approx(float((r * dw).sum() / (dw * dw).sum()), rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_an_unmerged_copy_fails(tmp_path, kind):
    base, _, _ = make_base(tmp_path, kind)
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1, scale=BIG))
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    code, stdout, _ = run_cli(["verify", copy, "--base", base, lora, "--json"])
    assert code == 1
    doc = json.loads(stdout)
    assert not doc["ok"] and doc["quantized"] is True
    (t,) = [t for t in doc["tensors"] if t["key"] == W]
    assert t["verdict"] == "not merged" and t["expected"] == "merged" and t["storage"].startswith(SCHEME[kind].strip())
    assert doc["verdicts"]["not merged"] == 1 and doc["num_findings"] == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("maker", ["numpy", "loratool"])
def test_a_merge_at_half_weight_fails(tmp_path, kind, maker):
    base, tensors, deq = make_base(tmp_path, kind)
    a, b = exact_factors(4, seed=1, scale=BIG)
    lora = write_adapter(tmp_path / "lora", a, b)
    out = tmp_path / "half"
    if maker == "numpy":
        numpy_merge(base, tensors, deq, b, a, out, weight=0.5)
    else:
        merge(base, [lora], out, weights=[0.5])
    report = verify(out, base, [lora])
    assert not report.ok
    check = _one(report)
    assert check.verdict == "wrong weight" and check.label.startswith("wrong weight (≈ 0.")
    assert 0.3 < check.factor < 0.6  # the realized share: 0.5, less what rounding takes
    assert verify(out, base, [lora], weights=[0.5]).ok  # and at the weight it was made with it is right


@pytest.mark.parametrize("kind", ["fp8", "scaled_rows", "block"])
def test_stochastic_rounding_verifies(tmp_path, kind):
    base, _, _ = make_base(tmp_path, kind)
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1, scale=1.0))
    for seed in (1, 2):
        merge(base, [lora], tmp_path / f"s{seed}", rounding="stochastic", seed=seed)
        report = verify(tmp_path / f"s{seed}", base, [lora])
        assert report.ok, [t.to_dict() for t in report.findings]
        check = _one(report)
        assert check.verdict == "merged" and check.exact is False
        assert check.residual <= check.tolerance


@pytest.mark.parametrize("kind", ["block", "nf4_nested", "int8"])
def test_a_dequantized_merge_verifies_with_its_dtype(tmp_path, kind):
    base, _, _ = make_base(tmp_path, kind)
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1, scale=BIG))
    merge(base, [lora], tmp_path / "bf16", dtype="bf16")
    report = verify(tmp_path / "bf16", base, [lora], dtype="bf16")
    assert report.ok and not report.missing, [t.to_dict() for t in report.findings]
    assert _one(report).verdict == "merged"
    # checked as a quantized one instead, the dtype is a finding
    other = verify(tmp_path / "bf16", base, [lora])
    assert not other.ok and _one(other).dtype_changed


def test_a_delta_below_the_storage_resolution_is_not_merged(tmp_path):
    """The merge refuses (nothing would change); a copy of the base passed off as merged is named."""
    base, _, _ = make_base(tmp_path, "fp8")
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=3, scale=2.0 ** -16))
    code, stdout, _ = run_cli(["verify", base, "--base", base, lora, "--json", "--device", "cpu"])
    assert code == 1
    doc = json.loads(stdout)
    assert doc["device"] == "cpu"
    (t,) = [t for t in doc["tensors"] if t["key"] == W]
    assert t["verdict"] == "not merged" and "below what the storage can hold" in t["label"]


def test_an_edited_fixed_scale_is_found(tmp_path):
    base, _, _ = make_base(tmp_path, "scaled_rows")
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1, scale=BIG))
    merge(base, [lora], tmp_path / "out")
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    t[KEY + ".scale_weight"] = t[KEY + ".scale_weight"] * 1.01
    save_file(t, str(tmp_path / "out" / "model.safetensors"))
    report = verify(tmp_path / "out", base, [lora])
    verdicts = {c.key: c.verdict for c in report.findings}
    assert verdicts[KEY + ".scale_weight"] == "other change"  # a scale merge keeps is compared byte for byte
    assert not report.ok


def test_cli_names_the_storage(tmp_path):
    base, _, _ = make_base(tmp_path, "block")
    lora = write_adapter(tmp_path / "lora", *exact_factors(4, seed=1, scale=BIG))
    merge(base, [lora], tmp_path / "half", weights=[0.5])
    code, stdout, _ = run_cli(["verify", tmp_path / "half", "--base", base, lora, "--device", "cpu"])
    assert code == 1
    assert "Base stored quantized: 1 × fp8_block float8_e4m3fn 32x32" in stdout
    assert "wrong weight (≈ 0.5×)" in stdout and "bound" in stdout
