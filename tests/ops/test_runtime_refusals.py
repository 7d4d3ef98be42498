"""validate --for / convert --for: settings a runtime refuses at load, in its own words, per release.

The words and the versions are those of vLLM's PEFTHelper (vllm/lora/peft_helper.py, read in the
0.8.5 ... 0.34.0 wheels) and SGLang 0.5.23's lora_manager.py; tests/runtimes/test_vllm_peft_helper.py
runs vLLM's own PEFTHelper on the outputs where its wheel is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file

PREFIX = "base_model.model."
MODULES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (8, 16)}

# setting -> (config keys, what vLLM 0.34 says, what convert --for vllm does: "drop" writes a config
# without it (or fixed), "refuse" exits 2 naming it)
VLLM_SETTINGS = {
    "bias": ({"bias": "lora_only"}, "Adapter bias is not supported.", "drop"),
    "lora_bias": ({"lora_bias": True}, "vLLM does not support LoRA bias (lora_bias).", "drop"),
    "init_lora_weights": ({"init_lora_weights": "pissa"}, "vLLM does not support init_lora_weights='pissa'",
                          "refuse"),
    "alora_invocation_tokens": ({"alora_invocation_tokens": [5, 6]}, "vLLM does not support Activated LoRA (aLoRA).",
                                "refuse"),
    "layer_replication": ({"layer_replication": [[0, 2], [1, 2]]}, "vLLM does not support layer_replication.",
                          "refuse"),
    "use_qalora": ({"use_qalora": True}, "vLLM does not support QALoRA.", "refuse"),
    "use_bdlora": ({"use_bdlora": {"target_modules_bd_a": ["q_proj"], "nblocks": 2}},
                   "vLLM does not support block-diagonal LoRA (BD-LoRA).", "refuse"),
    "target_modules": (None, "Missing required configuration fields: {'target_modules'}", "drop"),
}


def _adapter(make_adapter, setting: str) -> Path:
    keys, _, _ = VLLM_SETTINGS[setting]
    src = make_adapter(modules=MODULES, rank=4, config=keys or {})
    if keys is None:  # a config without target_modules
        cfg_path = src / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("target_modules")
        cfg_path.write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("setting", sorted(VLLM_SETTINGS))
def test_each_vllm_refusal_is_named_with_its_words_and_convert_fixes_or_refuses_it(make_adapter, tmp_path, setting):
    src = _adapter(make_adapter, setting)
    _, words, action = VLLM_SETTINGS[setting]
    code, out, err = run_cli(["validate", src, "--for", "vllm", "--json"])
    assert code == 1, out + err
    errors = [f for f in json.loads(out)["findings"] if f["severity"] == "error"]
    assert errors and all(f["code"] == "runtime-rejects" for f in errors)
    assert any(setting in f["message"] and words in f["message"] and "fix:" in f["message"] for f in errors), errors
    assert any("peft_helper.py:" in f["message"] for f in errors)  # the source line read
    # the release before these refusals: vLLM 0.31 loads them (and then computes something else)
    if setting not in ("bias", "target_modules"):
        old = run_cli(["validate", src, "--for", "vllm@0.31", "--json"])[1]
        assert not any(setting in f["message"] for f in json.loads(old)["findings"] if f["code"].startswith("runtime-"))

    out_dir = tmp_path / "served"
    code, _, err = run_cli(["convert", src, "--for", "vllm", "-o", out_dir])
    if action == "refuse":
        assert code == 2 and err.startswith("Error:") and setting in err and "Hint:" in err
        assert not out_dir.exists()
        return
    assert code == 0, err
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert not cfg.get("lora_bias") and cfg.get("bias", "none") == "none" and cfg.get("target_modules")
    if setting == "bias":
        assert "written as 'none'" in err
    code, out, err = run_cli(["validate", out_dir, "--for", "vllm"])
    assert code == 0, out + err


def test_vllm_lora_bias_deltas_are_a_refusal_and_older_releases_need_the_flag(make_adapter, tmp_path):
    name = "model.layers.0.self_attn.q_proj"
    src = make_adapter(modules=MODULES, rank=4, config={"lora_bias": True},
                       extra_tensors={f"{PREFIX}{name}.lora_B.bias": torch.ones(16)})
    code, out, _ = run_cli(["validate", src, "--for", "vllm", "--json"])
    found = [f for f in json.loads(out)["findings"] if f["module"] == name]
    assert code == 1 and [f["code"] for f in found] == ["runtime-rejects"]
    assert "refuses the LoRA bias delta" in found[0]["message"] and "lora_bias" in found[0]["message"]
    # vLLM 0.8-0.11.0 applied bias deltas when started with --enable-lora-bias
    code, out, _ = run_cli(["validate", src, "--for", "vllm@0.8", "--json"])
    found = [f for f in json.loads(out)["findings"] if f["module"] == name]
    assert [(f["severity"], f["code"]) for f in found] == [("warning", "runtime-setting")]
    assert "--enable-lora-bias" in found[0]["message"]
    code, _, err = run_cli(["convert", src, "--for", "vllm", "-o", tmp_path / "x"])
    assert code == 2 and "LoRA bias deltas" in err
    code, _, err = run_cli(["convert", src, "--for", "vllm", "-o", tmp_path / "y", "--drop"])
    assert code == 0 and "dropped LoRA bias deltas" in err
    assert not any(k.endswith(".bias") for k in load_file(str(tmp_path / "y" / "adapter_model.safetensors")))
    assert run_cli(["validate", tmp_path / "y", "--for", "vllm"])[0] == 0


def test_sglang_refuses_dora_in_its_words():
    dora = Path(__file__).resolve().parents[2] / "fixtures" / "peft_dora"
    code, out, _ = run_cli(["validate", dora, "--for", "sglang", "--json"])
    errors = [f for f in json.loads(out)["findings"] if f["severity"] == "error" and "DoRA" in f["message"]]
    assert code == 1 and errors and {f["code"] for f in errors} == {"runtime-rejects"}
    assert all("refuses DoRA module" in f["message"] and "doesn't support DoRA adapters" in f["message"]
               for f in errors)


def test_vllm_loads_one_classification_head_since_0_31(make_adapter, tmp_path):
    src = make_adapter(modules=MODULES, rank=4, config={"modules_to_save": ["score"], "task_type": "SEQ_CLS"},
                       extra_tensors={f"{PREFIX}score.weight": torch.zeros(2, 16)})
    assert run_cli(["validate", src, "--for", "vllm"])[0] == 0
    code, out, _ = run_cli(["validate", src, "--for", "vllm@0.30", "--json"])
    assert code == 1 and any(f["module"] == "score.weight" and "modules_to_save" in f["message"]
                             for f in json.loads(out)["findings"])
    code, _, err = run_cli(["convert", src, "--for", "vllm", "-o", tmp_path / "x"])
    assert code == 0, err
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"]
    assert f"{PREFIX}score.weight" in load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
