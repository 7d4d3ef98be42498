"""inspect and validate on PEFT target_parameters adapters: experts shown, no false findings, real
mismatches against the base's expert parameters found."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from moe_models import make_base
from safetensors.torch import load_file, save_file

from loratool.ops.inspect import inspect_adapter
from loratool.ops.validate import validate_adapter


def test_inspect_lists_experts_ranks_and_parameters(moe_dir: Path) -> None:
    doc = inspect_adapter(moe_dir / "qwen3_moe" / "lora").to_dict()
    assert doc["num_modules"] == 2 + 2 * 2 * 4  # q_proj per layer + 4 experts of 2 parameters per layer
    assert doc["experts"] == [
        {"parameter": "gate_up_proj", "parameters": 2, "experts": [4], "ranks": {4: 8}},
        {"parameter": "down_proj", "parameters": 2, "experts": [4], "ranks": {4: 8}},
    ]
    row = next(m for m in doc["modules"] if m["name"] == "model.layers.1.mlp.experts.down_proj[3]")
    assert row["expert"] == {"param": "model.layers.1.mlp.experts.down_proj", "index": 3, "count": 4}
    assert (row["rank"], row["out_features"], row["in_features"]) == (4, 32, 16)
    r = run_cli(["inspect", str(moe_dir / "qwen3_moe" / "lora")])
    assert r.code == 0 and "gate_up_proj: 2 parameter(s) × 4 experts (8 at rank 4)" in r.out, r.out


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_validate_has_no_false_findings(moe_dir: Path, name: str) -> None:
    """Without a base (the stacked factors once read as one module of rank E·r gave config-rank-mismatch)
    and against its own base, fused (gpt_oss) or one Linear per expert (qwen3_moe, mixtral)."""
    alone = validate_adapter(moe_dir / name / "lora")
    assert alone.ok and not alone.findings, [f.to_dict() for f in alone.findings]
    based = validate_adapter(moe_dir / name / "lora", base=moe_dir / name / "base")
    assert based.ok and not based.findings, [f.to_dict() for f in based.findings]
    assert len(based.matched) == 18


def test_validate_finds_a_real_rank_mismatch(moe_dir: Path, tmp_path: Path) -> None:
    lora = tmp_path / "lora"
    shutil.copytree(moe_dir / "qwen3_moe" / "lora", lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"model.layers.0.mlp.experts.down_proj": 3}  # 16 rows of lora_A: not 3·E
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    report = validate_adapter(lora)
    codes = [(f.code, f.module) for f in report.errors]
    assert codes == [("config-rank-mismatch", "model.layers.0.mlp.experts.down_proj")]


def test_validate_against_a_base_with_other_expert_shapes(moe_dir: Path, tmp_path: Path) -> None:
    """Per-expert Linears of another width: every expert a base-shape-mismatch naming the key."""
    base = tmp_path / "base"
    make_base("qwen3_moe", base)
    tensors = load_file(base / "model.safetensors")
    for k in [k for k in tensors if ".experts.0.down_proj" in k]:
        tensors[k] = torch.zeros(32, 8)
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    report = validate_adapter(moe_dir / "qwen3_moe" / "lora", base=base)
    bad = sorted(f.module for f in report.errors if f.code == "base-shape-mismatch")
    assert bad == ["model.layers.0.mlp.experts.down_proj[0]", "model.layers.1.mlp.experts.down_proj[0]"]
    assert "experts.0.down_proj.weight" in report.errors[0].message


def test_validate_against_a_per_expert_base_with_more_experts(moe_dir: Path, tmp_path: Path) -> None:
    """An adapter for 4 experts against a per-expert checkpoint of 6: the last expert's modules say so."""
    base = tmp_path / "base"
    make_base("qwen3_moe", base)
    tensors = load_file(base / "model.safetensors")
    for k in [k for k in tensors if ".experts.3." in k]:
        for e in (4, 5):
            tensors[k.replace(".experts.3.", f".experts.{e}.")] = tensors[k].clone()
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    report = validate_adapter(moe_dir / "qwen3_moe" / "lora", base=base)
    bad = [f for f in report.errors if f.code == "base-shape-mismatch"]
    assert sorted(f.module for f in bad) == [f"model.layers.{i}.mlp.experts.{p}[3]"
                                             for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    down = next(f.message for f in bad if f.module == "model.layers.1.mlp.experts.down_proj[3]")
    assert "(4, 32, 16)" in down and "(6, 32, 16)" in down and "'model.layers.1.mlp.experts.5.down_proj.weight'" in down


def test_formats_without_experts_refuse_them_by_name(moe_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.safetensors"
    r = run_cli(["convert", str(moe_dir / "qwen3_moe" / "lora"), "--to", "kohya", "-o", str(out)])
    assert r.code == 2
    assert "experts.gate_up_proj[0]" in r.err and "expert of a fused MoE parameter" in r.err, r.err
    assert not out.exists()
