"""MLX switch layers (mlx-lm's SwitchLinear / LoRASwitchLinear: lora_a (E, r, in), lora_b (E, out, r), not
transposed): peft's own MoE adapters converted for mlx-lm and loaded by mlx-lm itself (logits against peft),
an adapter mlx-lm made read back, and exact round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file

from loratool.formats import read
from loratool.maths.delta import delta

TOKENS = [[3, 17, 42, 5, 8, 1, 60, 9]]


def _mlx_ready_base(moe_dir: Path, name: str, tmp_path: Path) -> Path:
    """The base with the two config keys mlx-lm 0.32.2's ModelArgs require and transformers 5 no longer
    writes at the top level (rope_theta, num_experts); the weights are the same files."""
    base = tmp_path / f"{name}_base"
    shutil.copytree(moe_dir / name / "base", base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.setdefault("rope_theta", cfg["rope_parameters"]["rope_theta"])
    cfg.setdefault("num_experts", cfg.get("num_local_experts"))
    (base / "config.json").write_text(json.dumps(cfg))
    return base


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_mlx_lm_loads_our_switch_adapter_and_matches_peft(moe_dir, tmp_path, name):
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    mlx_tuner = pytest.importorskip("mlx_lm.tuner.utils")
    from moe_models import peft_model

    base = _mlx_ready_base(moe_dir, name, tmp_path)
    lora = moe_dir / name / "lora"  # peft target_parameters on gate_up_proj and down_proj, plus q_proj
    out = tmp_path / "mlx"
    r = run_cli(["convert", lora, "--to", "mlx", "--base", base, "-o", out])
    assert r.code == 0, r.err
    keys = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    container = "block_sparse_moe" if name == "mixtral" else "mlp"
    assert keys == sorted([f"{container}.switch_mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
                          + ["self_attn.q_proj"])
    with torch.no_grad():
        want = peft_model(base, lora)(torch.tensor(TOKENS)).logits.numpy()
    model, _ = mlx_utils.load_model(base)
    plain = np.array(model(mx.array(TOKENS)).astype(mx.float32))
    assert np.abs(plain - want).max() > 1e-2  # the adapter matters
    model = mlx_tuner.load_adapters(model, str(out))  # mlx-lm's own loader (strict shapes)
    got = np.array(model(mx.array(TOKENS)).astype(mx.float32))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_switch_stacks_hold_peft_s_experts(moe_dir, tmp_path):
    """lora_a / lora_b as mlx-lm stores them (read with safetensors, not loratool): expert e's
    scale · lora_b[e] @ lora_a[e] is gate_up's rows (halves) or down's delta from peft's adapter."""
    src = read(moe_dir / "qwen3_moe" / "lora")
    out = tmp_path / "mlx"
    assert run_cli(["convert", moe_dir / "qwen3_moe" / "lora", "--to", "mlx", "--base", moe_dir / "qwen3_moe" / "base",
                    "-o", out]).code == 0
    tensors = load_file(str(out / "adapters.safetensors"))
    scale = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    for e in range(4):
        gate_up = delta(src.modules[f"model.layers.1.mlp.experts.gate_up_proj[{e}]"]).numpy()
        down = delta(src.modules[f"model.layers.1.mlp.experts.down_proj[{e}]"]).numpy()
        for proj, want in (("gate_proj", gate_up[:16]), ("up_proj", gate_up[16:]), ("down_proj", down)):
            a = tensors[f"model.layers.1.mlp.switch_mlp.{proj}.lora_a"].numpy()
            b = tensors[f"model.layers.1.mlp.switch_mlp.{proj}.lora_b"].numpy()
            assert a.shape[0] == b.shape[0] == 4 and a.shape[1] == b.shape[2] == 4
            np.testing.assert_allclose(scale * b[e] @ a[e], want, rtol=1e-5, atol=1e-6)


def test_per_expert_round_trip_through_mlx_is_bit_exact(make_adapter, tmp_path):
    shapes = {"w1": (16, 32), "w3": (16, 32), "w2": (32, 16)}
    modules = {f"model.layers.{i}.block_sparse_moe.experts.{e}.{p}": s
               for i in range(2) for e in range(4) for p, s in shapes.items()}
    modules["model.layers.0.self_attn.q_proj"] = (32, 32)
    src = make_adapter(modules=modules, rank=4, alpha=8)
    mlx_dir, back, again = tmp_path / "mlx", tmp_path / "back", tmp_path / "again"
    assert run_cli(["convert", src, "--to", "mlx", "-o", mlx_dir]).code == 0
    stacked = load_file(str(mlx_dir / "adapters.safetensors"))
    assert stacked["model.layers.1.block_sparse_moe.switch_mlp.up_proj.lora_a"].shape == (4, 4, 32)  # w3
    assert stacked["model.layers.1.block_sparse_moe.switch_mlp.up_proj.lora_b"].shape == (4, 16, 4)
    r = run_cli(["convert", mlx_dir, "--to", "peft", "-o", back])
    assert r.code == 0, r.err
    a, b = read(src), read(back)
    assert sorted(a.modules) == sorted(b.modules)
    for n, m in a.modules.items():
        assert torch.equal(m.down.load(), b.modules[n].down.load()) and torch.equal(m.up.load(), b.modules[n].up.load())
        assert m.scale == b.modules[n].scale
    assert run_cli(["convert", mlx_dir, "--to", "mlx", "-o", again]).code == 0
    twice = load_file(str(again / "adapters.safetensors"))
    assert sorted(twice) == sorted(stacked) and all(torch.equal(twice[k], stacked[k]) for k in stacked)


def test_a_switch_stack_needs_every_expert(make_adapter, tmp_path):
    modules = {f"model.layers.0.mlp.experts.{e}.gate_proj": (16, 32) for e in (0, 1, 3)}
    r = run_cli(["convert", make_adapter(modules=modules), "--to", "mlx", "-o", tmp_path / "out"])
    assert r.code == 2 and "'model.layers.0.mlp.switch_mlp.gate_proj' would stack experts [0, 1, 3]" in r.err
    assert not (tmp_path / "out").exists()


def test_loratool_reads_a_switch_adapter_mlx_lm_wrote(moe_dir, tmp_path):
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    mlx_tuner = pytest.importorskip("mlx_lm.tuner.utils")
    from mlx.utils import tree_flatten

    base = _mlx_ready_base(moe_dir, "qwen3_moe", tmp_path)
    model, _ = mlx_utils.load_model(base)
    model.freeze()
    params = {"rank": 2, "scale": 3.0, "dropout": 0.0, "keys": ["mlp.switch_mlp.up_proj"]}
    mlx_tuner.linear_to_lora_layers(model, 2, params)
    rng = np.random.default_rng(0)
    weights = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32))
               for k, v in tree_flatten(model.trainable_parameters())}
    out = tmp_path / "theirs"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    mlx_utils.save_config({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params},
                          out / "adapter_config.json")
    got = read(out)
    assert len(got.modules) == 8 and not got.unsupported
    a = np.array(weights["model.layers.0.mlp.switch_mlp.up_proj.lora_a"])  # (E, r, in)
    b = np.array(weights["model.layers.0.mlp.switch_mlp.up_proj.lora_b"])  # (E, out, r)
    for e in range(4):
        m = got.modules[f"model.layers.0.mlp.switch_mlp.up_proj[{e}]"]
        np.testing.assert_allclose(delta(m).numpy(), 3.0 * b[e] @ a[e], rtol=1e-5, atol=1e-6)
    r = run_cli(["convert", out, "--to", "peft", "-o", tmp_path / "peft"])  # per-expert transformers names
    assert r.code == 0, r.err
    assert sorted(read(tmp_path / "peft").modules)[:2] == ["model.layers.0.mlp.experts.0.up_proj",
                                                         "model.layers.0.mlp.experts.1.up_proj"]
