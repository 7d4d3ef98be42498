"""rescale: each mode's exact relation between input and output deltas (numpy reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import loratool
from loratool.cli import main
from loratool.ops.rescale import rescale


def make_peft(path, *, r=4, alpha=8.0, rslora=False, dtype=torch.float32, seed=0, alpha_pattern=None):
    rng = np.random.default_rng(seed)
    path.mkdir()
    sd, mods = {}, {}
    for name, (out, inp) in {
        "m.layers.0.q_proj": (12, 10),
        "m.layers.0.v_proj": (6, 10),
        "m.layers.1.q_proj": (12, 10),
    }.items():
        up = rng.standard_normal((out, r)).astype(np.float32)
        down = rng.standard_normal((r, inp)).astype(np.float32)
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.from_numpy(up).to(dtype)
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.from_numpy(down).to(dtype)
        mods[name] = (up, down)
    save_file(sd, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "use_rslora": rslora,
                "target_modules": ["q_proj", "v_proj"],
                "alpha_pattern": alpha_pattern or {},
            }
        )
    )
    return path


def deltas(path) -> dict[str, np.ndarray]:
    """ΔW per module from the stored tensors and the config, by the PEFT formula written out here."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    sd = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            name = key[len("base_model.model.") : -len(".lora_A.weight")]
            a = sd[key].double().numpy()
            b = sd[key.replace("lora_A", "lora_B")].double().numpy()
            r = a.shape[0]
            import re

            alpha = next(
                (v for k, v in cfg.get("alpha_pattern", {}).items() if re.match(rf"(.*\.)?({k})$", name)),
                cfg["lora_alpha"],
            )
            rr = next(
                (v for k, v in cfg.get("rank_pattern", {}).items() if re.match(rf"(.*\.)?({k})$", name)), cfg["r"]
            )
            assert rr == r
            scale = alpha / np.sqrt(r) if cfg.get("use_rslora") else alpha / r
            out[name] = scale * b @ a
    return out


@pytest.mark.parametrize("factor", [0.5, 2.0, -1.0, -0.25])
def test_factor_multiplies_delta_and_keeps_factors(tmp_path, factor):
    src = make_peft(tmp_path / "in", alpha_pattern={"v_proj": 3})
    rescale(src, tmp_path / "out", mode="factor", value=factor)
    before, after = deltas(src), deltas(tmp_path / "out")
    for name in before:
        np.testing.assert_allclose(after[name], factor * before[name], rtol=1e-12, atol=1e-12)
    a_in, a_out = (
        load_file(str(src / "adapter_model.safetensors")),
        load_file(str(tmp_path / "out/adapter_model.safetensors")),
    )
    for key in a_in:
        if factor >= 0 or "lora_A" in key:
            assert torch.equal(a_in[key], a_out[key])  # only alpha moved
        else:
            assert torch.equal(-a_in[key], a_out[key])


@pytest.mark.parametrize("rslora", [False, True])
def test_set_alpha_keeps_delta_and_clears_alpha_pattern(tmp_path, rslora):
    src = make_peft(tmp_path / "in", rslora=rslora, alpha_pattern={"v_proj": 3})
    rescale(src, tmp_path / "out", mode="alpha", value=32)
    cfg = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 32 and cfg["alpha_pattern"] == {}
    before, after = deltas(src), deltas(tmp_path / "out")
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-6)


def test_normalize_sets_alpha_to_rank(tmp_path):
    src = make_peft(tmp_path / "in", r=4, alpha=16, alpha_pattern={"v_proj": 2})
    rescale(src, tmp_path / "out", mode="normalize")
    out = loratool.read(tmp_path / "out")
    assert all(m.alpha == m.rank for m in out.modules.values())
    before, after = deltas(src), deltas(tmp_path / "out")
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-6)


def test_rslora_conversions_keep_delta_and_factors(tmp_path):
    src = make_peft(tmp_path / "in", r=4, alpha=8)
    rescale(src, tmp_path / "rs", mode="to_rslora")
    assert json.loads((tmp_path / "rs/adapter_config.json").read_text())["use_rslora"] is True
    rescale(tmp_path / "rs", tmp_path / "plain", mode="from_rslora")
    assert json.loads((tmp_path / "plain/adapter_config.json").read_text())["use_rslora"] is False
    before = deltas(src)
    for path in (tmp_path / "rs", tmp_path / "plain"):
        after = deltas(path)
        for name in before:
            np.testing.assert_allclose(after[name], before[name], rtol=1e-12)
    a_in = load_file(str(src / "adapter_model.safetensors"))
    a_out = load_file(str(tmp_path / "rs/adapter_model.safetensors"))
    assert all(torch.equal(a_in[k], a_out[k]) for k in a_in)


def test_modules_regex_limits_the_change(tmp_path):
    src = make_peft(tmp_path / "in")
    rescale(src, tmp_path / "out", mode="factor", value=3.0, modules=r"layers\.1\.")
    before, after = deltas(src), deltas(tmp_path / "out")
    np.testing.assert_allclose(after["m.layers.1.q_proj"], 3 * before["m.layers.1.q_proj"], rtol=1e-12)
    np.testing.assert_allclose(after["m.layers.0.q_proj"], before["m.layers.0.q_proj"], rtol=1e-12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.floats(min_value=0.01, max_value=100.0), negative=st.booleans())
def test_rescale_then_inverse_is_identity(tmp_path_factory, s, negative):
    base = tmp_path_factory.mktemp("h")
    src = make_peft(base / "in")
    f = -s if negative else s
    rescale(src, base / "a", mode="factor", value=f)
    rescale(base / "a", base / "b", mode="factor", value=1.0 / f)
    before, after = deltas(src), deltas(base / "b")
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-12, atol=1e-14)


def test_kohya_factor_writes_float32_alpha(tmp_path):
    rng = np.random.default_rng(1)
    sd = {
        "lora_unet_a_to_q.lora_up.weight": torch.from_numpy(rng.standard_normal((8, 4)).astype(np.float32)).bfloat16(),
        "lora_unet_a_to_q.lora_down.weight": torch.from_numpy(
            rng.standard_normal((4, 8)).astype(np.float32)
        ).bfloat16(),
        "lora_unet_a_to_q.alpha": torch.tensor(2.0),
    }
    save_file(sd, str(tmp_path / "in.safetensors"))
    rescale(tmp_path / "in.safetensors", tmp_path / "o.safetensors", mode="factor", value=0.3)
    out = load_file(str(tmp_path / "o.safetensors"))
    assert out["lora_unet_a_to_q.alpha"].dtype == torch.float32
    assert float(out["lora_unet_a_to_q.alpha"]) == pytest.approx(0.6, rel=1e-7)
    assert torch.equal(out["lora_unet_a_to_q.lora_up.weight"], sd["lora_unet_a_to_q.lora_up.weight"])


@pytest.mark.parametrize("args", [[], ["--factor", "2", "--normalize"], ["--alpha", "0"], ["--factor", "nan"],
                                  ["--factor", "0"], ["--factor", "-0.0"]])
def test_cli_needs_exactly_one_valid_mode(tmp_path, capsys, args):
    src = make_peft(tmp_path / "in")
    with pytest.raises(SystemExit) as exc:
        main(["rescale", str(src), "-o", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len([line for line in err.splitlines() if line.startswith("Error:")]) == 1
    assert not (tmp_path / "o").exists()


def test_cli_summary_line(tmp_path, capsys):
    src = make_peft(tmp_path / "in")
    with pytest.raises(SystemExit) as exc:
        main(["rescale", str(src), "-o", str(tmp_path / "o"), "--factor", "0.5"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert out.strip().splitlines()[-1].startswith(f"Wrote {tmp_path / 'o'} (3 of 3 modules, factor 0.5,")
