"""vLLM's own PEFTHelper (vllm/lora/peft_helper.py of the vllm wheel loratool's record was read from)
run on loratool's inputs and `convert --for vllm` outputs.

The vllm wheel is not installed (it needs CUDA and a large dependency tree): .ci/run extracts
peft_helper.py and config/lora.py from it once into ~/.cache/loratool-tests/vllm-VERSION
(LORATOOL_VLLM_SRC overrides the place). peft_helper.py is imported from there with two small stubs
for the modules it imports (vllm.logger.init_logger, vllm.config.lora.LoRAConfig, whose only field it
reads is max_lora_rank); everything it decides is its own code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file

from loratool.formats import read
from loratool.runtimes import RUNTIMES

VERSION = RUNTIMES["vllm"].version
SRC = Path(os.environ.get("LORATOOL_VLLM_SRC", Path.home() / ".cache" / "loratool-tests" / f"vllm-{VERSION}"))
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SRC / "vllm" / "lora" / "peft_helper.py").is_file(),
                       reason=f"vllm {VERSION}'s peft_helper.py not extracted to {SRC} (.ci/run does it)"),
]


@dataclass
class _LoRAConfig:  # the one field PEFTHelper.validate_legal reads
    max_lora_rank: int = 512


@pytest.fixture(scope="module")
def helper():
    """vLLM's PEFTHelper class, imported from the extracted source with stubbed imports."""
    saved = {k: sys.modules.get(k) for k in ("vllm", "vllm.config", "vllm.config.lora", "vllm.logger")}
    import logging

    class _Logger(logging.LoggerAdapter):
        def info_once(self, msg, *args, **kwargs):
            self.info(msg, *args)

        def warning_once(self, msg, *args, **kwargs):
            self.warning(msg, *args)

    stubs = {
        "vllm": types.ModuleType("vllm"),
        "vllm.config": types.ModuleType("vllm.config"),
        "vllm.config.lora": types.ModuleType("vllm.config.lora"),
        "vllm.logger": types.ModuleType("vllm.logger"),
    }
    stubs["vllm.config.lora"].LoRAConfig = _LoRAConfig  # type: ignore[attr-defined]
    stubs["vllm.logger"].init_logger = lambda name: _Logger(logging.getLogger(name), {})  # type: ignore[attr-defined]
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("vllm.lora.peft_helper", SRC / "vllm" / "lora" / "peft_helper.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module.PEFTHelper
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _load(helper, path: Path, max_rank: int = 512):
    """What vLLM does first with an adapter directory: PEFTHelper.from_local_dir, then validate_legal."""
    h = helper.from_local_dir(str(path), max_position_embeddings=None)
    h.validate_legal(_LoRAConfig(max_rank))
    return h


def _check_scales(h, path: Path) -> None:
    """vLLM's rank and scaling per module (get_rank_and_scaling) equal the tensors' rank and loratool's scale."""
    adapter = read(path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    for name, m in adapter.modules.items():
        rank, scaling = h.get_rank_and_scaling(name)
        assert rank == tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == m.rank, name
        assert scaling == pytest.approx(m.scale, rel=1e-12), name


def test_the_record_matches_the_source_it_names():
    text = (SRC / "vllm" / "config" / "lora.py").read_text()
    ranks = re.search(r"MaxLoRARanks = Literal\[([\d, ]+)\]", text)
    assert ranks and tuple(int(x) for x in ranks.group(1).split(",")) == RUNTIMES["vllm"].rank_settings
    helper_src = (SRC / "vllm" / "lora" / "peft_helper.py").read_text()
    for rule in RUNTIMES["vllm"].refuses:  # every refusal's words are vLLM's own
        words = rule.words.split("{value!r}")[0] if "{value!r}" in rule.words else rule.words
        if rule.when != "missing":
            assert words[:40] in helper_src, rule.key


@pytest.mark.parametrize("fixture", ["peft_llama", "peft_gpt2"])
def test_vllm_loads_our_fixture_with_its_patterns(helper, fixture):
    path = FIXTURES / fixture
    if not path.is_dir():
        pytest.skip(f"no fixture {fixture}")
    h = _load(helper, path)
    _check_scales(h, path)
    assert run_cli(["validate", path, "--for", "vllm"])[0] == 0


def test_vllm_loads_convert_for_vllm_output(helper, make_adapter, tmp_path):
    modules = {"model.layers.0.self_attn.q_proj": (32, 24), "model.layers.0.self_attn.v_proj": (16, 24),
               "model.layers.1.mlp.down_proj": (24, 40)}
    src = make_adapter(modules=modules, rank={"model.layers.0.self_attn.q_proj": 8,
                                              "model.layers.0.self_attn.v_proj": 4,
                                              "model.layers.1.mlp.down_proj": 2},
                       alpha={"model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.v_proj": 3,
                              "model.layers.1.mlp.down_proj": 16}, rslora=True,
                       config={"bias": "lora_only", "lora_bias": True},
                       extra_tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.ones(32)})
    with pytest.raises(ValueError, match="Adapter bias is not supported") as e:
        _load(helper, src)
    assert "vLLM does not support LoRA bias (lora_bias)." in str(e.value)
    code, out, _ = run_cli(["validate", src, "--for", "vllm", "--json"])
    messages = " ".join(f["message"] for f in json.loads(out)["findings"])
    assert code == 1 and "Adapter bias is not supported." in messages and "(lora_bias)." in messages
    code, _, err = run_cli(["convert", src, "--for", "vllm", "--drop", "-o", tmp_path / "served"])
    assert code == 0, err
    _check_scales(_load(helper, tmp_path / "served"), tmp_path / "served")


SETTINGS = {
    "init_lora_weights": {"init_lora_weights": "olora"},
    "alora_invocation_tokens": {"alora_invocation_tokens": [7]},
    "layer_replication": {"layer_replication": [[0, 1]]},
    "use_qalora": {"use_qalora": True},
    "use_bdlora": {"use_bdlora": {"nblocks": 2}},
    "use_dora": {"use_dora": True},
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_what_vllm_refuses_validate_refuses_with_its_words(helper, make_adapter, setting):
    mod = "model.layers.0.self_attn.q_proj"
    extra = {f"base_model.model.{mod}.lora_magnitude_vector": torch.ones(16)} if setting == "use_dora" else {}
    src = make_adapter(modules={mod: (16, 16)}, rank=4, config=SETTINGS[setting], extra_tensors=extra)
    with pytest.raises(ValueError) as e:
        _load(helper, src)
    code, out, _ = run_cli(["validate", src, "--for", "vllm", "--json"])
    errors = [f["message"] for f in json.loads(out)["findings"] if f["severity"] == "error"]
    assert code == 1 and errors
    assert any(str(e.value) in m or str(e.value).split(".")[0] in m for m in errors), (str(e.value), errors)


def test_missing_target_modules(helper, make_adapter, tmp_path):
    src = make_adapter(modules={"model.layers.0.self_attn.q_proj": (16, 16)}, rank=4)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.pop("target_modules")
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Missing required configuration fields"):
        _load(helper, src)
    assert run_cli(["validate", src, "--for", "vllm"])[0] == 1
    assert run_cli(["convert", src, "--for", "vllm", "-o", tmp_path / "fixed"])[0] == 0
    _load(helper, tmp_path / "fixed")
