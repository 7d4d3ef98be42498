"""LyCORIS files through the operations: merge (exact deltas), convert --to lora (exact or truncated
with the error reported), resize of the converted form, validate and inspect.

References are numpy formulas written here from LyCORIS' definitions (lycoris/functional), applied
to the tensors as stored; nothing is computed with loratool's maths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

from loratool.errors import IncompatibleError
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge
from loratool.ops.resize import resize
from loratool.ops.validate import validate_adapter

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LYCO = FIXTURES / "lycoris_sd.safetensors"
BASE = FIXTURES / "base_sd.safetensors"
U = "model.diffusion_model."
BLK = U + "input_blocks.4.1.transformer_blocks.0."
TE = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
KB = "lora_unet_input_blocks_4_1_transformer_blocks_0_"


def np_deltas(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Base key -> ΔW of every module of lycoris_sd.safetensors, from LyCORIS' formulas (float64)."""
    f = {k: v.astype(np.float64) for k, v in t.items()}
    out: dict[str, np.ndarray] = {}
    q = KB + "attn1_to_q."
    s = f[q + "alpha"] / f[q + "hada_w1_b"].shape[0]
    w1, w2 = f[q + "hada_w1_a"] @ f[q + "hada_w1_b"], f[q + "hada_w2_a"] @ f[q + "hada_w2_b"]
    out[BLK + "attn1.to_q.weight"] = w1 * w2 * s
    c = "lora_unet_input_blocks_1_0_in_layers_2."
    s = f[c + "alpha"] / f[c + "hada_w1_b"].shape[0]
    r1 = np.einsum("ijkl,jr,ip->prkl", f[c + "hada_t1"], f[c + "hada_w1_b"], f[c + "hada_w1_a"])
    r2 = np.einsum("ijkl,jr,ip->prkl", f[c + "hada_t2"], f[c + "hada_w2_b"], f[c + "hada_w2_a"])
    out[U + "input_blocks.1.0.in_layers.2.weight"] = r1 * r2 * s
    k = KB + "attn1_to_k."
    s = f[k + "alpha"] / f[k + "lokr_w2_b"].shape[0]
    out[BLK + "attn1.to_k.weight"] = np.kron(f[k + "lokr_w1"], f[k + "lokr_w2_a"] @ f[k + "lokr_w2_b"]) * s
    v = KB + "attn1_to_v."
    out[BLK + "attn1.to_v.weight"] = np.kron(f[v + "lokr_w1"], f[v + "lokr_w2"])  # both full: scale 1
    p = "lora_unet_input_blocks_4_1_proj_in."
    s = f[p + "alpha"] / f[p + "lora_down.weight"].shape[0]
    out[U + "input_blocks.4.1.proj_in.weight"] = np.einsum(
        "mnkl,im,nj->ijkl", f[p + "lora_mid.weight"], f[p + "lora_up.weight"][:, :, 0, 0],
        f[p + "lora_down.weight"][:, :, 0, 0]) * s
    o = KB + "attn1_to_out_0."
    out[BLK + "attn1.to_out.0.weight"] = f[o + "diff"]
    out[BLK + "attn1.to_out.0.bias"] = f[o + "diff_b"]
    n = "lora_unet_input_blocks_4_1_norm."
    out[U + "input_blocks.4.1.norm.weight"] = f[n + "w_norm"]
    out[U + "input_blocks.4.1.norm.bias"] = f[n + "b_norm"]
    tv = "lora_te1_text_model_encoder_layers_0_self_attn_v_proj."
    s = f[tv + "alpha"] / f[tv + "lora_down.weight"].shape[0]
    out[TE + "self_attn.v_proj.weight"] = f[tv + "lora_up.weight"] @ f[tv + "lora_down.weight"] * s
    out[TE + "self_attn.v_proj.bias"] = f[tv + "diff_b"]  # unscaled
    out[TE + "self_attn.q_proj.bias"] = f["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.diff_b"]
    return out


def test_merge_adds_every_lycoris_delta_exactly(tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    report = merge(BASE, [LYCO], out, dtype="fp32")
    base, merged = load_np(str(BASE)), load_np(str(out))
    want = np_deltas(load_np(str(LYCO)))
    assert report.merged == len(want)
    for key, w in base.items():
        got = merged[key].astype(np.float64)
        ref = w.astype(np.float64) + want.get(key, 0.0)
        assert np.abs(got - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max()), key


def test_lycoris_bias_refused_where_the_base_has_none(tmp_path: Path) -> None:
    path = tmp_path / "b.safetensors"
    save_file({KB + "attn2_to_k.diff_b": torch.ones(32)}, str(path))  # attn2.to_k has no bias
    with pytest.raises(IncompatibleError, match=r"no .*attn2\.to_k\.bias"):
        merge(BASE, [path], tmp_path / "m.safetensors")


def test_convert_to_lora_is_exact_and_merges_the_same(tmp_path: Path) -> None:
    out = tmp_path / "lora.safetensors"
    report = convert(LYCO, out, to="lora")
    rows = {m.name: m for m in report.modules}
    assert rows[KB + "attn1_to_q"].from_algo == "loha" and rows[KB + "attn1_to_q"].rank == 16
    assert rows[KB + "attn1_to_k"].from_algo == "lokr" and rows[KB + "attn1_to_k"].rank == 8  # 4 · 2
    assert all(m.rel_error == 0.0 for m in report.modules)
    a = read(out)
    assert {m.algo for m in a.lycoris.values()} == {"full", "norm", "bias"}  # kept as they are (kohya)
    assert len(a.modules) == 6
    # the converted factors are stored in fp16, like the source: merge again and compare in fp32
    merged = tmp_path / "m.safetensors"
    merge(BASE, [out], merged, dtype="fp32")
    base, got = load_np(str(BASE)), load_np(str(merged))
    want = np_deltas(load_np(str(LYCO)))
    for key, d in want.items():
        ref = base[key].astype(np.float64) + d
        err = np.abs(got[key].astype(np.float64) - ref).max()
        assert err <= 2e-3 * max(np.abs(d).max(), 1e-3), key  # fp16 rounding of the new factors


def test_loha_lokr_to_lora_float32_exact_to_1e6(tmp_path: Path) -> None:
    src = tmp_path / "lyco32.safetensors"
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = {"lora_unet_a.hada_w1_a": r(48, 4), "lora_unet_a.hada_w1_b": r(4, 40), "lora_unet_a.hada_w2_a": r(48, 3),
         "lora_unet_a.hada_w2_b": r(3, 40), "lora_unet_a.alpha": torch.tensor(2.0),
         "lora_unet_b.lokr_w1_a": r(6, 2), "lora_unet_b.lokr_w1_b": r(2, 4), "lora_unet_b.lokr_w2_a": r(8, 2),
         "lora_unet_b.lokr_w2_b": r(2, 10), "lora_unet_b.alpha": torch.tensor(1.0)}
    save_file(t, str(src))
    out = tmp_path / "lora.safetensors"
    convert(src, out, to="lora")
    f = {k: v.double().numpy() for k, v in t.items()}
    ref_a = (f["lora_unet_a.hada_w1_a"] @ f["lora_unet_a.hada_w1_b"]) * (
        f["lora_unet_a.hada_w2_a"] @ f["lora_unet_a.hada_w2_b"]) * (2.0 / 4)
    ref_b = np.kron(f["lora_unet_b.lokr_w1_a"] @ f["lora_unet_b.lokr_w1_b"],
                    f["lora_unet_b.lokr_w2_a"] @ f["lora_unet_b.lokr_w2_b"]) * 0.5
    got = load_np(str(out))
    for name, ref, rank in (("lora_unet_a", ref_a, 12), ("lora_unet_b", ref_b, 4)):
        up, down = got[name + ".lora_up.weight"].astype(np.float64), got[name + ".lora_down.weight"].astype(np.float64)
        s = float(got[name + ".alpha"]) / down.shape[0]
        assert down.shape[0] == rank
        assert np.linalg.norm(up @ down * s - ref) / np.linalg.norm(ref) < 1e-6


def test_convert_rank_truncates_and_reports_the_error(tmp_path: Path) -> None:
    report = convert(LYCO, tmp_path / "r4.safetensors", to="lora", rank=4)
    rows = {m.name: m for m in report.modules}
    q = rows[KB + "attn1_to_q"]
    assert q.rank == 4 and q.exact_rank == 16
    ref = np_deltas(load_np(str(LYCO)))[BLK + "attn1.to_q.weight"]
    sv = np.linalg.svd(ref, compute_uv=False)
    assert q.rel_error == pytest.approx(np.linalg.norm(sv[4:]) / np.linalg.norm(sv), rel=1e-4)
    o = rows[KB + "attn1_to_out_0"]  # a full 2-D diff becomes LoRA with --rank
    assert o.from_algo == "full" and o.rank == 4 and o.rel_error > 0


def test_resize_of_the_converted_form(tmp_path: Path) -> None:
    lora = tmp_path / "lora.safetensors"
    convert(LYCO, lora, to="lora")
    out = tmp_path / "r2.safetensors"
    resize(lora, out, rank=2)
    a = read(out)
    m = a.modules[KB + "attn1_to_q"]
    assert m.rank == 2
    ref = np_deltas(load_np(str(LYCO)))[BLK + "attn1.to_q.weight"]
    got = m.up.load().double().numpy() @ m.down.load().double().numpy() * m.scale
    sv = np.linalg.svd(ref, compute_uv=False)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err == pytest.approx(np.linalg.norm(sv[2:]) / np.linalg.norm(sv), rel=5e-2)  # fp16 factors
    assert {lm.algo for lm in a.lycoris.values()} == {"full", "norm", "bias"}  # resize keeps the diffs


def test_convert_to_peft_refuses_diffs_without_a_lora_form(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleError, match="no LoRA form"):
        convert(LYCO, tmp_path / "p", to="peft", base=BASE)


def test_other_operations_refuse_lycoris_with_a_hint(tmp_path: Path) -> None:
    from loratool.ops.rescale import rescale

    with pytest.raises(IncompatibleError, match=r"LoHa|LoKr|Tucker|diff") as e:
        rescale(LYCO, tmp_path / "x.safetensors", mode="factor", value=2.0)
    assert "--to lora" in (e.value.hint or "")


def test_inspect_and_validate(tmp_path: Path) -> None:
    doc = inspect_adapter(LYCO).to_dict()
    assert doc["num_modules"] == 1 and doc["num_lycoris"] == 8
    assert doc["lycoris_kinds"] == {"loha": 2, "lokr": 2, "tucker": 1, "full": 1, "norm": 1, "bias": 1}
    row = next(m for m in doc["lycoris_modules"] if m["name"] == KB + "attn1_to_q")
    assert row["algo"] == "loha" and row["rank"] == 4 and row["alpha"] == 2 and row["scale"] == 0.5
    assert json.loads(json.dumps(doc)) == doc
    report = validate_adapter(LYCO, base=BASE)
    assert report.ok and report.num_modules == 9 and len(report.matched) == 9
    bad = tmp_path / "nan.safetensors"
    t = {k: v for k, v in load_np(str(LYCO)).items()}
    t[KB + "attn1_to_q.hada_w2_b"] = t[KB + "attn1_to_q.hada_w2_b"].copy()
    t[KB + "attn1_to_q.hada_w2_b"][0, 0] = np.nan
    from safetensors.numpy import save_file as save_np

    save_np(t, str(bad))
    report = validate_adapter(bad)
    assert not report.ok and [f.module for f in report.errors] == [KB + "attn1_to_q"]


def test_rescale_scales_a_diff_b_with_the_weight_delta(tmp_path: Path) -> None:
    from loratool.ops.rescale import rescale

    src = tmp_path / "l.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(3, 2),
               "lora_unet_a.alpha": torch.tensor(1.0), "lora_unet_a.diff_b": torch.tensor([1.0, 2.0, 3.0])},
              str(src))
    for mode, value, want in (("factor", -2.0, [-2.0, -4.0, -6.0]), ("alpha", 8.0, [1.0, 2.0, 3.0])):
        out = tmp_path / f"{mode}.safetensors"
        rescale(src, out, mode=mode, value=value)
        assert load_np(str(out))["lora_unet_a.diff_b"].tolist() == want
