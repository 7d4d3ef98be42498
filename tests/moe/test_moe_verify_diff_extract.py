"""verify, diff and extract with experts of fused MoE parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from moe_models import peft_model
from safetensors.torch import load_file, save_file
from test_moe_ops import _deltas

from loratool.ops.diff import diff


def _peft_merge(name: str, moe_dir: Path, out: Path, scale: float = 1.0) -> Path:
    """The model merged by peft itself (merge_and_unload + save_pretrained), the adapter at `scale`."""
    pm = peft_model(moe_dir / name / "base", moe_dir / name / "lora")
    if scale != 1.0:
        from peft.tuners.lora import LoraLayer

        for module in pm.modules():
            if isinstance(module, LoraLayer):
                module.scaling["default"] *= scale
    pm.merge_and_unload().save_pretrained(out)
    return out


def _verdicts(merged: Path, adapter: Path, base: Path, rows: dict[str, dict] | None = None) -> dict[str, str]:
    r = run_cli(["verify", str(merged), str(adapter), "--base", str(base), "--json"])
    doc = json.loads(r.out)
    if rows is not None:
        rows.update({t["key"]: t for t in doc["tensors"]})
    return {t["key"]: t["verdict"] for t in doc["tensors"] if t["verdict"] != "unchanged"}


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_verify_judges_expert_tensors(moe_dir: Path, name: str, tmp_path: Path) -> None:
    """peft's own merge is `merged` (fused (E, in, out) tensors for gpt-oss, one Linear per expert for
    qwen3); twice the delta `merged twice`; the base `not merged`; one expert changed `other change`."""
    base, lora = moe_dir / name / "base", moe_dir / name / "lora"
    once = _peft_merge(name, moe_dir, tmp_path / "once")
    assert set(_verdicts(once, lora, base).values()) == {"merged"}
    twice = _peft_merge(name, moe_dir, tmp_path / "twice", scale=2.0)
    assert set(_verdicts(twice, lora, base).values()) == {"merged twice"}
    assert set(_verdicts(base, lora, base).values()) == {"not merged"}
    tensors = load_file(once / "model.safetensors")
    key = ("model.layers.1.mlp.experts.gate_up_proj" if name == "gpt_oss"
           else "model.layers.1.mlp.experts.2.up_proj.weight")
    original = load_file(base / "model.safetensors")[key]
    if name == "gpt_oss":
        tensors[key][2] = original[2]  # expert 2 left unmerged, the other experts merged
    else:
        tensors[key] = original
    save_file(tensors, once / "model.safetensors", {"format": "pt"})
    rows: dict[str, dict] = {}
    verdicts = _verdicts(once, lora, base, rows)
    assert verdicts[key] == ("wrong weight" if name == "gpt_oss" else "not merged"), verdicts
    assert sum(v != "merged" for v in verdicts.values()) == 1
    if name == "gpt_oss":  # the factor per expert, in expert order: 1, 1, 0, 1
        assert rows[key]["factors"] == pytest.approx([1, 1, 0, 1], abs=1e-4)


def test_diff_pairs_experts(moe_dir: Path, tmp_path: Path) -> None:
    lora = moe_dir / "gpt_oss" / "lora"
    r = run_cli(["rescale", str(lora), "--factor", "-1", "-o", str(tmp_path / "neg")])
    assert r.code == 0, r.err
    doc = diff(lora, tmp_path / "neg", device="cpu").to_dict()
    rows = {m["name"]: m for m in doc["modules"]}
    assert len([n for n in rows if "[" in n]) == 16
    for row in rows.values():
        assert row["rel_distance"] == pytest.approx(2.0, rel=1e-6) and row["cosine"] == pytest.approx(-1.0, rel=1e-6)


@pytest.mark.parametrize("name", ["gpt_oss", "qwen3_moe"])
def test_extract_from_a_fine_tuned_moe(moe_dir: Path, name: str, tmp_path: Path) -> None:
    """The fine-tune is base + adapter merged by peft; extract at the adapter's rank recovers every
    expert's ΔW (as peft computes it from the extracted adapter) to float32 rounding: fused experts
    as target_parameters (gpt-oss), one Linear per expert as ordinary modules (qwen3 on disk)."""
    base, lora = moe_dir / name / "base", moe_dir / name / "lora"
    tuned = _peft_merge(name, moe_dir, tmp_path / "tuned")
    r = run_cli(["extract", str(base), str(tuned), "--rank", "4", "-o", str(tmp_path / "ex")])
    assert r.code == 0, r.err
    cfg = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    if name == "gpt_oss":
        assert len(cfg["target_parameters"]) == 4 and cfg["target_modules"] == ["q_proj"]
        want, got = _deltas(base, lora), _deltas(base, tmp_path / "ex")
        assert set(want) == set(got) and len(want) == 16
        for key, d in want.items():
            np.testing.assert_allclose(got[key], d, rtol=0, atol=1e-4 * np.abs(d).max(), err_msg=str(key))
    else:  # per-expert Linears on disk: 2·4·3 expert modules + q_proj, each the merged change
        assert "target_parameters" not in cfg
        ours = load_file(tmp_path / "ex" / "adapter_model.safetensors")
        a = ours["base_model.model.model.layers.0.mlp.experts.3.up_proj.lora_A.weight"]
        b = ours["base_model.model.model.layers.0.mlp.experts.3.up_proj.lora_B.weight"]
        change = (load_file(tuned / "model.safetensors")["model.layers.0.mlp.experts.3.up_proj.weight"]
                  - load_file(base / "model.safetensors")["model.layers.0.mlp.experts.3.up_proj.weight"])
        torch.testing.assert_close(b @ a, change, rtol=0, atol=1e-4 * float(change.abs().max()))
