"""validate --for vllm|sglang|llama.cpp on mixture-of-experts LoRA: per-expert modules
(`experts.N.<projection>`) and fused 3-D expert parameters (PEFT target_parameters), against the facts
loratool.runtimes records from each runtime's source (vLLM 0.34.0, SGLang 0.5.23, llama.cpp as vendored
by llama-cpp-python 0.3.36)."""

from __future__ import annotations

import json

import pytest
from clirun import run_cli

from loratool.ops.validate import validate_adapter
from loratool.runtimes import RUNTIMES, resolve

H, FF, E = 16, 8, 4  # hidden size, expert intermediate size, experts


def _experts(layers=(0,), experts=range(E), projs=("gate_proj", "up_proj", "down_proj"), parent="mlp.experts"):
    shapes = {"gate_proj": (FF, H), "up_proj": (FF, H), "down_proj": (H, FF), "w1": (FF, H), "w3": (FF, H),
              "w2": (H, FF)}
    return {f"model.layers.{layer}.{parent}.{e}.{p}": shapes[p] for layer in layers for e in experts for p in projs}


def _codes(report, code):
    return [f for f in report.findings if f.code == code]


@pytest.fixture
def per_expert(make_adapter):
    def make(**kw):
        modules = kw.pop("modules", None) or _experts()
        targets = kw.pop("targets", ["gate_proj", "up_proj", "down_proj"])
        return make_adapter(modules=modules, config={"target_modules": targets}, **kw)
    return make


def test_the_facts_are_recorded_with_sources():
    for name in ("vllm", "sglang", "llama.cpp"):
        rt = RUNTIMES[name]
        assert rt.moe_experts is True
        assert rt.where("moe_experts") and rt.where("moe_fused")
    assert RUNTIMES["vllm"].moe_fused == "models" and "GptOssForCausalLM" in RUNTIMES["vllm"].moe_fused_models
    assert RUNTIMES["sglang"].moe_fused == "no" and RUNTIMES["llama.cpp"].moe_fused == "no"
    # only the release read is claimed
    assert resolve("vllm", "0.33.0").moe_experts is None and resolve("vllm", "0.33.0").moe_fused is None


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "llama.cpp"])
def test_a_full_per_expert_adapter_has_no_moe_finding(per_expert, runtime):
    report = validate_adapter(per_expert(), for_runtime=runtime)
    assert not [f for f in report.findings if f.code in ("runtime-moe", "runtime-ignores")]


@pytest.mark.parametrize("runtime", ["vllm", "llama.cpp"])
def test_experts_of_one_projection_with_different_ranks(per_expert, runtime):
    odd = "model.layers.0.mlp.experts.2.up_proj"
    report = validate_adapter(per_expert(rank={n: (8 if n == odd else 4) for n in _experts()}), for_runtime=runtime)
    hits = _codes(report, "runtime-moe")
    assert [f.module for f in hits] == ["model.layers.0.mlp.experts.*.up_proj"]
    assert "rank 4 (experts 0, 1, 3), rank 8 (experts 2)" in hits[0].message
    assert "lora_weights.py:178-184" in hits[0].message or "torch.stack" in hits[0].message


def test_sglang_pads_every_rank_itself(per_expert):
    odd = "model.layers.0.mlp.experts.2.up_proj"
    report = validate_adapter(per_expert(rank={n: (8 if n == odd else 4) for n in _experts()}), for_runtime="sglang")
    assert not _codes(report, "runtime-moe")


def test_llama_cpp_needs_every_expert_projection(per_expert):
    modules = _experts()
    del modules["model.layers.0.mlp.experts.3.down_proj"]
    report = validate_adapter(per_expert(modules=modules), for_runtime="llama.cpp")
    hits = _codes(report, "runtime-moe")
    assert [f.module for f in hits] == ["model.layers.0.mlp.experts"]
    assert "lacks 3.down_proj" in hits[0].message
    # vLLM packs what is there (a missing expert projection is a None sub-LoRA)
    assert not _codes(validate_adapter(per_expert(modules=modules), for_runtime="vllm"), "runtime-moe")


def test_sglang_ignores_expert_lora_unless_gate_up_and_down_are_targets(per_expert):
    # Mixtral-style names: sglang renames the weights w1/w3/w2 but not the target_modules entries
    adapter = per_expert(modules=_experts(projs=("w1", "w3", "w2"), parent="block_sparse_moe.experts"),
                         targets=["w1", "w2", "w3"])
    report = validate_adapter(adapter, for_runtime="sglang")
    hits = _codes(report, "runtime-ignores")
    assert len(hits) == 1 and "gate_up_proj, down_proj" in hits[0].message
    assert "lora_manager.py:1159-1183" in hits[0].message
    assert not _codes(validate_adapter(adapter, for_runtime="vllm"), "runtime-ignores")
    # gate/up under their own names count as gate_up_proj
    ok = per_expert(targets=["gate_proj", "up_proj", "down_proj"])
    assert not _codes(validate_adapter(ok, for_runtime="sglang"), "runtime-ignores")
    only_down = per_expert(modules=_experts(projs=("down_proj",)), targets=["down_proj"])
    hits = _codes(validate_adapter(only_down, for_runtime="sglang"), "runtime-ignores")
    assert len(hits) == 1 and "name none for gate_up_proj" in hits[0].message


def test_cli_exit_code_and_json(per_expert):
    odd = "model.layers.0.mlp.experts.2.up_proj"
    adapter = per_expert(rank={n: (8 if n == odd else 4) for n in _experts()})
    r = run_cli(["validate", str(adapter), "--for", "vllm", "--json"])
    assert r.code == 1, r.err
    doc = json.loads(r.out)
    assert any(f["code"] == "runtime-moe" for f in doc["findings"])


def test_convert_for_vllm_pads_experts_to_one_rank_per_projection_exactly(per_expert, tmp_path):
    import torch

    from loratool.formats import read
    from loratool.maths.delta import delta

    odd = "model.layers.0.mlp.experts.2.up_proj"
    adapter = per_expert(rank={n: (8 if n == odd else 4) for n in _experts()}, alpha=6.0)
    out = tmp_path / "out"
    r = run_cli(["convert", adapter, "--for", "vllm", "-o", out, "--json"])
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["padded"] == [f"model.layers.0.mlp.experts.{e}.up_proj" for e in (0, 1, 3)]
    before, after = read(adapter), read(out)
    for name, m in before.modules.items():
        assert after.modules[name].rank == (8 if name.endswith("up_proj") else 4)
        torch.testing.assert_close(delta(after.modules[name]), delta(m), rtol=1e-6, atol=1e-7)
    assert not _codes(validate_adapter(out, for_runtime="vllm"), "runtime-moe")


# --- fused 3-D expert parameters: adapters made by peft itself (target_parameters), tests/moe/moe_models.py


def test_fused_experts_per_runtime(moe_dir):
    lora = moe_dir / "qwen3_moe" / "lora"
    vllm = validate_adapter(lora, for_runtime="vllm")
    assert not _codes(vllm, "runtime-moe")
    warned = _codes(vllm, "runtime-setting")
    assert len(warned) == 1 and "--enable-mixed-moe-lora-format" in warned[0].message
    assert "GptOssForCausalLM" in warned[0].message
    for runtime, source in (("sglang", "lora_manager.py:765-797"), ("llama.cpp", "get_base_tensor_name")):
        hits = _codes(validate_adapter(lora, for_runtime=runtime), "runtime-moe")
        assert len(hits) == 1 and "no reader for fused expert LoRA" in hits[0].message and source in hits[0].message
        assert hits[0].module == "model.layers.0.mlp.experts.gate_up_proj"
        if runtime == "llama.cpp":  # loratool writes llama.cpp's expert stacks itself (tests/moe/test_gguf_experts.py)
            assert "--for llama.cpp -o OUT --base BASE" in hits[0].message
    # no false errors from the adapter's own checks
    assert not [f for f in vllm.findings if f.severity == "error"]


@pytest.mark.parametrize("only", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
def test_vllm_needs_gate_up_and_down_fused(moe_dir, tmp_path, only):
    from moe_models import make_adapter as peft_adapter

    out = tmp_path / "one"
    peft_adapter(moe_dir / "qwen3_moe" / "base", out, target_parameters=[only])
    hits = _codes(validate_adapter(out, for_runtime="vllm"), "runtime-moe")
    assert sorted(f.module for f in hits) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    leaf = only.rsplit(".", 1)[1]
    assert "reads 'model.layers.0.mlp.experts.base_layer' as gate_up_proj" in hits[0].message
    assert f"adapts {leaf} there" in hits[0].message and "model_manager.py:983-992" in hits[0].message
