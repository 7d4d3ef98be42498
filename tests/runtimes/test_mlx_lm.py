"""MLX for real: mlx-lm's own loader (mlx_lm.utils.load_model + mlx_lm.tuner.utils.load_adapters, what
mlx_lm.load(adapter_path=...) runs) on loratool's MLX output, and an adapter mlx-lm itself made
(linear_to_lora_layers, saved as its trainer saves: mx.save_safetensors of the trainable parameters
and save_config) read back by loratool; logits compared with transformers + peft on the same tiny
Llama, built from a config (no download). Runs on the CPU (`mlx[cpu]` on Linux, in the test extras).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli

mx = pytest.importorskip("mlx.core", reason="mlx[cpu] is in the test extras (pip install -e '.[test]')")
mlx_utils = pytest.importorskip("mlx_lm.utils")
mlx_tuner = pytest.importorskip("mlx_lm.tuner.utils")

pytestmark = pytest.mark.slow

TOKENS = [[3, 17, 42, 5, 88, 1, 64, 9]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, rms_norm_eps=1e-6)
    out = tmp_path_factory.mktemp("mlx") / "base"
    LlamaForCausalLM(cfg).float().save_pretrained(out)
    return out


def _hf_logits(base: Path, adapter: Path | None) -> np.ndarray:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _mlx_model(base: Path):
    model, _ = mlx_utils.load_model(base)
    return model


def _mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()


def test_the_base_alone_agrees(base):
    """The comparison itself: mlx-lm and transformers give one model (so a difference below is the adapter's)."""
    _close(_mlx_logits(_mlx_model(base)), _hf_logits(base, None))


def test_mlx_lm_loads_our_adapter_and_matches_peft(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    # a peft adapter with what mlx-lm cannot hold as it is: per-module ranks and alphas, rsLoRA
    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 3}, init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(tmp_path / "peft")
    want = _hf_logits(base, tmp_path / "peft")
    assert np.abs(want - _hf_logits(base, None)).max() > 1e-2  # the adapter changes the logits

    code, _, err = run_cli(["convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx"])
    assert code == 0, err
    mlx_model = mlx_tuner.load_adapters(_mlx_model(base), str(tmp_path / "mlx"))  # mlx-lm's own loader
    _close(_mlx_logits(mlx_model), want)


def test_loratool_reads_an_adapter_mlx_lm_wrote(base, tmp_path):
    from mlx.utils import tree_flatten

    model = _mlx_model(base)
    model.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.up_proj"]}
    mlx_tuner.linear_to_lora_layers(model, 2, params)
    rng = np.random.default_rng(0)
    updates = [(k, mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.05))
               for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(updates, strict=False)  # "trained": lora_b is zero after init
    want = _mlx_logits(model)
    out = tmp_path / "mlx_adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    mlx_utils.save_config({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params},
                          out / "adapter_config.json")

    code, out_json, err = run_cli(["inspect", out, "--json"])
    assert code == 0, err
    doc = json.loads(out_json)
    assert doc["format"] == "mlx" and doc["num_modules"] == 4 and set(doc["scales"]) == {"3.0"}
    code, _, err = run_cli(["convert", out, "--to", "peft", "--base", base, "-o", tmp_path / "peft"])
    assert code == 0, err
    _close(_hf_logits(base, tmp_path / "peft"), want)
