"""MLX (mlx-lm) adapters: the layout of mlx_lm/tuner/lora.py and utils.py, written out here.

mlx-lm's LoRALinear computes y + scale · (x @ lora_a) @ lora_b with lora_a (in, r) and lora_b (r, out),
so its ΔW (out, in) = scale · lora_bᵀ @ lora_aᵀ; load_adapters builds every layer with
adapter_config.json's one lora_parameters {rank, scale}. The references below apply exactly that to
the files with safetensors / numpy, and peft's own pattern rules to the PEFT side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from peft.utils.other import get_pattern_key
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file

from loratool.errors import IncompatibleError
from loratool.formats import detect, read
from loratool.ops.convert import convert

PREFIX = "base_model.model."
MODULES = {
    "model.layers.0.self_attn.q_proj": (32, 24),
    "model.layers.0.self_attn.v_proj": (16, 24),
    "model.layers.3.mlp.down_proj": (24, 40),
    "lm_head": (50, 24),
}
RANKS = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 4,
         "model.layers.3.mlp.down_proj": 2, "lm_head": 4}
ALPHAS = {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.v_proj": 16,
          "model.layers.3.mlp.down_proj": 3, "lm_head": 16}


def peft_deltas(path: Path) -> dict[str, np.ndarray]:
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for key, a in t.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = t[PREFIX + name + ".lora_B.weight"]
            r = rp.get(get_pattern_key(list(rp), name), cfg["r"])
            alpha = ap.get(get_pattern_key(list(ap), name), cfg["lora_alpha"])
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            out[name] = scale * (b.double().numpy() @ a.double().numpy())
    return out


def mlx_deltas(tensors: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """ΔW (out, in) per module as mlx-lm's LoRALinear computes it."""
    p = config["lora_parameters"]
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_a"):
            name = key.removesuffix(".lora_a")
            b = tensors[name + ".lora_b"]
            assert a.shape[1] == p["rank"] and b.shape[0] == p["rank"]  # (in, r), (r, out)
            out[name] = p["scale"] * (b.astype(np.float64).T @ a.astype(np.float64).T)
    return out


@pytest.fixture
def patterned(make_adapter):
    return make_adapter(modules=MODULES, rank=RANKS, alpha=ALPHAS, rslora=True)


def test_peft_to_mlx_follows_mlx_lm_layout(patterned, tmp_path):
    out = tmp_path / "mlx"
    convert(patterned, out, to="mlx")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == -1
    assert cfg["lora_parameters"]["rank"] == 8
    # mlx-lm wraps the listed keys inside every block (and root-level names from the model root)
    assert sorted(cfg["lora_parameters"]["keys"]) == ["lm_head", "mlp.down_proj", "self_attn.q_proj",
                                                      "self_attn.v_proj"]
    tensors = load_np(str(out / "adapters.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.lora_a"].shape == (24, 8)  # (in, r)
    assert tensors["model.layers.0.self_attn.q_proj.lora_b"].shape == (8, 32)  # (r, out)
    want = peft_deltas(patterned)
    got = mlx_deltas(tensors, cfg)
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7 * np.abs(want[n]).max())


def test_round_trip_peft_mlx_peft_identical_deltas(patterned, tmp_path):
    convert(patterned, tmp_path / "mlx", to="mlx")
    assert detect(tmp_path / "mlx") == "mlx"
    convert(tmp_path / "mlx", tmp_path / "back", to="peft")
    want, got = peft_deltas(patterned), peft_deltas(tmp_path / "back")
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7 * np.abs(want[n]).max())


def _mlx_files(tmp_path: Path, *, npz: bool, config: dict | None) -> tuple[Path, dict[str, np.ndarray]]:
    """An adapter written the way mlx-lm saves one (numpy / safetensors, no loratool)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {
        "model.layers.0.self_attn.q_proj.lora_a": rng.standard_normal((24, 4)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.lora_b": rng.standard_normal((4, 32)).astype(np.float32),
        "model.layers.1.self_attn.v_proj.lora_a": rng.standard_normal((24, 4)).astype(np.float32),
        "model.layers.1.self_attn.v_proj.lora_b": rng.standard_normal((4, 16)).astype(np.float32),
    }
    root = tmp_path / ("npz" if npz else "st")
    root.mkdir()
    if npz:
        np.savez(root / "adapters.npz", **tensors)
    else:
        save_file(tensors, str(root / "adapters.safetensors"))
    if config is not None:
        (root / "adapter_config.json").write_text(json.dumps(config))
    return root, tensors


CONFIG = {"fine_tune_type": "lora", "num_layers": 8,
          "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0,
                              "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}


@pytest.mark.parametrize("npz", [False, True])
def test_reads_mlx_lm_files(tmp_path, npz):
    root, tensors = _mlx_files(tmp_path, npz=npz, config=CONFIG)
    adapter = read(root)
    assert adapter.source_format == "mlx" and len(adapter.modules) == 2
    want = mlx_deltas(tensors, CONFIG)
    convert(root, tmp_path / "as_peft", to="peft")
    got = peft_deltas(tmp_path / "as_peft")
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-6)


def test_npz_without_config_warns_about_the_assumed_scale(tmp_path, capsys):
    root, _ = _mlx_files(tmp_path, npz=True, config=None)
    code, out, _ = run_cli(["validate", root / "adapters.npz", "--json"])
    doc = json.loads(out)
    assert code == 0 and any(f["code"] == "config-missing" and "20" in f["message"] for f in doc["findings"])


def test_npz_with_pickled_objects_is_refused(tmp_path, capsys):
    root = tmp_path / "evil"
    root.mkdir()
    np.savez(root / "adapters.npz", x=np.array([{"a": 1}], dtype=object))
    code, _, err = run_cli(["inspect", root / "adapters.npz"])
    assert code == 2 and "Error:" in err and "Traceback" not in err


def test_config_rank_mismatch(tmp_path):
    root, _ = _mlx_files(tmp_path, npz=False, config={**CONFIG, "lora_parameters": {**CONFIG["lora_parameters"],
                                                                                       "rank": 8}})
    with pytest.raises(IncompatibleError, match=r"lora_parameters\.rank says 8"):
        read(root)


def test_mlx_cannot_hold_modules_to_save(make_adapter, tmp_path):
    src = make_adapter(rank=4, extra_tensors={PREFIX + "lm_head.weight": torch.zeros(10, 32)},
                       config={"modules_to_save": ["lm_head"]})
    with pytest.raises(IncompatibleError, match="modules_to_save"):
        convert(src, tmp_path / "x", to="mlx")
    report = convert(src, tmp_path / "y", for_runtime="mlx", drop=True)
    assert report.prepared is not None and report.prepared["dropped"] == ["lm_head.weight"]


def test_dora_round_trip(tmp_path):
    dora = Path(__file__).resolve().parents[2] / "fixtures" / "peft_dora"
    convert(dora, tmp_path / "mlx", to="mlx")
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora"
    t = load_file(str(tmp_path / "mlx" / "adapters.safetensors"))
    src = load_file(str(dora / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(t[name + ".m"], src[PREFIX + name + ".lora_magnitude_vector"].reshape(-1))
    back = read(tmp_path / "mlx")
    assert all(m.magnitude is not None for m in back.modules.values())
