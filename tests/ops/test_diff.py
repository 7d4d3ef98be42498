"""diff: the factor formulas against dense numpy, matching across formats, what differs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file

from loratool.maths.compare import delta_distance, dense_lowrank_inner, factor_inner, pair_products, realized_projection
from loratool.ops.diff import diff

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


# ---------------------------------------------------------------------------------------------
# the maths, against dense numpy


@pytest.mark.parametrize("shape,r1,r2", [((7, 5), 2, 3), ((16, 40), 4, 4), ((33, 9), 1, 6)])
def test_factor_inner_matches_dense(shape, r1, r2):
    rng = np.random.default_rng(r1 * 10 + r2)
    out_f, in_f = shape
    b1, a1 = rng.standard_normal((out_f, r1)), rng.standard_normal((r1, in_f))
    b2, a2 = rng.standard_normal((out_f, r2)), rng.standard_normal((r2, in_f))
    d1, d2 = b1 @ a1, b2 @ a2
    t = [torch.from_numpy(x) for x in (b1, a1, b2, a2)]
    assert factor_inner(*t) == pytest.approx(float(np.sum(d1 * d2)), rel=1e-9)
    n1, n2 = factor_inner(t[0], t[1], t[0], t[1]), factor_inner(t[2], t[3], t[2], t[3])
    dist, cos = delta_distance(n1, n2, factor_inner(*t))
    assert dist == pytest.approx(float(np.linalg.norm(d1 - d2)), rel=1e-6)
    assert cos == pytest.approx(float(np.sum(d1 * d2) / np.linalg.norm(d1) / np.linalg.norm(d2)), abs=1e-9)
    r = rng.standard_normal(shape)
    assert dense_lowrank_inner(torch.from_numpy(r), t[0], t[1], chunk_elems=3 * in_f) == pytest.approx(
        float(np.sum(r * d1)), rel=1e-9)


def test_realized_projection_matches_dense():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((20, 12)).astype(np.float32)
    b, a = rng.standard_normal((20, 3)), rng.standard_normal((3, 12))
    m = (w + 0.7 * (b @ a)).astype(np.float32)
    m_sq, r_sq, inner = realized_projection(torch.from_numpy(m), torch.from_numpy(w),
                                            [(torch.from_numpy(b), torch.from_numpy(a))], chunk_elems=25)
    r = m.astype(np.float64) - w.astype(np.float64)
    assert m_sq == pytest.approx(float(np.sum(m.astype(np.float64) ** 2)), rel=1e-12)
    assert r_sq == pytest.approx(float(np.sum(r * r)), rel=1e-12)
    assert inner[0] == pytest.approx(float(np.sum(r * (b @ a))), rel=1e-9)


def _dense_deltas(path: Path) -> dict[str, np.ndarray]:
    """scale · up @ down per module of a PEFT dir written by the factories, in numpy (independent)."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    sd = {k: v.double().numpy() for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    out = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            name = k[len("base_model.model."): -len(".lora_A.weight")]
            b = sd[k.replace("lora_A", "lora_B")]
            r = cfg.get("rank_pattern", {}).get(name, cfg["r"])
            alpha = cfg.get("alpha_pattern", {}).get(name, cfg["lora_alpha"])
            out[name] = (alpha / r) * (b.reshape(b.shape[0], -1) @ a.reshape(r, -1))
    return out


def test_diff_matches_dense_numpy(make_adapter):
    mods = {"m.a": (24, 16), "m.b": (8, 30), "m.c": (12, 12), "m.only_a": (4, 4)}
    a = make_adapter(modules=mods, rank={"m.a": 4, "m.b": 2, "m.c": 3, "m.only_a": 2}, alpha=8, seed=1)
    b = make_adapter(modules={k: v for k, v in mods.items() if k != "m.only_a"} | {"m.only_b": (4, 4)},
                     rank={"m.a": 6, "m.b": 2, "m.c": 3, "m.only_b": 1}, alpha={"m.a": 8, "m.b": 4, "m.c": 8,
                                                                                 "m.only_b": 8}, seed=2)
    da, db = _dense_deltas(a), _dense_deltas(b)
    report = diff(a, b)
    assert report.only_in_a == ["m.only_a"] and report.only_in_b == ["m.only_b"]
    got = {m.name: m for m in report.modules}
    assert set(got) == {"m.a", "m.b", "m.c"}
    for name, m in got.items():
        x, y = da[name], db[name]
        assert m.rel_distance == pytest.approx(np.linalg.norm(x - y) / np.linalg.norm(x), rel=1e-6)
        assert m.cosine == pytest.approx(np.sum(x * y) / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-6)
        assert m.norm_a == pytest.approx(np.linalg.norm(x), rel=1e-6)
    assert got["m.a"].differences == ["rank", "scale"]  # alpha 8 over rank 4 vs 6
    assert got["m.b"].differences == ["alpha", "scale"]
    assert got["m.c"].differences == []
    rels = [m.rel_distance for m in report.modules]
    assert rels == sorted(rels, reverse=True)


def test_same_adapter_is_identical(make_adapter):
    a = make_adapter(seed=4)
    report = diff(a, a)
    assert report.identical and all(m.distance == 0 and m.cosine == pytest.approx(1.0) for m in report.modules)


def test_scaled_copy_has_cosine_one(make_adapter):
    a = make_adapter(alpha=8, seed=5)
    b = make_adapter(alpha=4, seed=5)  # same factors, half the scale: ΔB = ΔA / 2
    for m in diff(a, b).modules:
        assert m.rel_distance == pytest.approx(0.5, rel=1e-9)
        assert m.cosine == pytest.approx(1.0, abs=1e-12)
        assert m.differences == ["alpha", "scale"]


# ---------------------------------------------------------------------------------------------
# across formats (conversions made by loratool convert: the factors are copied bit for bit)


def test_kohya_against_its_peft_conversion(tmp_path, capsys):
    out = tmp_path / "peft"
    code, _, _ = run_cli(["convert", FIXTURES / "kohya_sd.safetensors", "--to", "peft", "-o", out,
                                   "--base", FIXTURES / "base_sd.safetensors", "-q"])
    assert code == 0
    report = diff(FIXTURES / "kohya_sd.safetensors", out)
    assert len(report.modules) == 10 and not report.only_in_a and not report.only_in_b
    assert all(m.distance == 0.0 for m in report.modules)
    assert report.identical
    # the pairs join a stored kohya name to a dotted one
    pair = next(m for m in report.modules if m.name.endswith("attn1_to_q"))
    assert pair.name_b == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"


def test_diffusers_against_its_kohya_conversion(tmp_path, capsys):
    out = tmp_path / "k.safetensors"
    code, _, _ = run_cli(["convert", FIXTURES / "diffusers_sd.safetensors", "--to", "kohya", "-o", out,
                                   "-q"])
    assert code == 0
    report = diff(FIXTURES / "diffusers_sd.safetensors", out)
    assert len(report.modules) == 6 and report.identical
    assert {m.dtype for m in report.modules} == {("bfloat16", "bfloat16")}


def test_dtype_difference_is_reported(tmp_path, make_adapter):
    a = make_adapter(dtype=torch.float32, seed=6)
    b = make_adapter(dtype=torch.float16, seed=6)
    report = diff(a, b)
    assert all("dtype" in m.differences for m in report.modules)
    assert all(0 < m.rel_distance < 1e-3 for m in report.modules)  # fp16 rounding of the factors


def test_cli_json_and_table(capsys, make_adapter):
    a = make_adapter(seed=7)
    b = make_adapter(seed=8)
    code, out, _ = run_cli(["diff", a, b, "--json"])
    assert code == 0
    doc = json.loads(out)
    assert doc["num_common"] == 3 and doc["identical"] is False and doc["max_rel_distance"] > 0.5
    code, out, _ = run_cli(["diff", a, a])
    assert code == 0 and out.startswith("IDENTICAL: 3 modules in both")


def test_unreadable_input_is_a_clean_error(tmp_path, capsys, make_adapter):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    code, _, err = run_cli(["diff", make_adapter(), bad])
    assert code == 2 and err.startswith("Error: ") and "Traceback" not in err


def test_nearly_equal_deltas_keep_their_distance():
    """Distances far below float32's resolution of the norms (the float64 route) match numpy."""
    rng = np.random.default_rng(11)
    b, a = rng.standard_normal((64, 8)).astype(np.float32), rng.standard_normal((8, 48)).astype(np.float32)
    a2 = a.copy()
    a2[0, 0] += np.float32(1e-4)  # ΔB − ΔA = 1e-4 · b[:, 0] ⊗ e₀: ~1e-5 of the norm
    n1, n2, inner = pair_products(*(torch.from_numpy(x) for x in (b, a, b, a2)))
    dist, _ = delta_distance(n1, n2, inner)
    b64 = b.astype(np.float64)
    want = float(np.linalg.norm(b64 @ a.astype(np.float64) - b64 @ a2.astype(np.float64)))
    assert want < 1e-4 * float(np.linalg.norm(b64 @ a.astype(np.float64)))
    assert dist == pytest.approx(want, rel=1e-3)
