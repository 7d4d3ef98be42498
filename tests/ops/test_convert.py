"""convert: key layouts, alpha and DoRA names per format, exact round trips, name recovery, errors.

Expected names and deltas come from the fixtures' documented layouts (fixtures/README.md) and from
each format's rules applied here with safetensors + json (+ peft's own pattern rule for PEFT
configs), never from loratool's readers.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch

from loratool.ops.convert import convert

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PEFT_LLAMA = FIXTURES / "peft_llama"
PEFT_DORA = FIXTURES / "peft_dora"
BASE_LLAMA = FIXTURES / "base_llama"
KOHYA_SD = FIXTURES / "kohya_sd.safetensors"
BASE_SD = FIXTURES / "base_sd.safetensors"
DIFFUSERS_SD = FIXTURES / "diffusers_sd.safetensors"
BASE_UNET = FIXTURES / "base_unet"
PREFIX = "base_model.model."


def load_file(path: str) -> dict[str, np.ndarray]:
    """Tensors as numpy arrays; bf16 (which numpy lacks) widened to float32, exactly."""
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in load_torch(path).items()}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return dict(f.metadata() or {})


# ---------------------------------------------------------------------------------------------
# each format's own rules, written out here: name -> (up (out, r), down (r, in·k), scale, magnitude)

Module = tuple[np.ndarray, np.ndarray, float, "np.ndarray | None"]


def _flat(up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = down.shape[0]
    return up.reshape(up.shape[0], r), down.reshape(r, -1)


def _resolve(cfg: dict, name: str) -> tuple[int, float, bool]:
    """r, alpha, rslora for a module, the way peft resolves rank_pattern / alpha_pattern."""
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rp.get(get_pattern_key(list(rp), name), cfg["r"])
    alpha = ap.get(get_pattern_key(list(ap), name), cfg["lora_alpha"])
    return r, alpha, bool(cfg.get("use_rslora"))


def peft_modules(path: Path) -> dict[str, Module]:
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, down in t.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            up = t[PREFIX + name + ".lora_B.weight"]
            r, alpha, rs = _resolve(cfg, name)
            assert down.shape[0] == r, (name, down.shape, r)
            mag = t.get(PREFIX + name + ".lora_magnitude_vector")
            assert (mag is not None) == bool(cfg.get("use_dora")), name
            out[name] = (up, down, alpha / (math.sqrt(r) if rs else r), mag)
    return out


def kohya_modules(path: Path) -> dict[str, Module]:
    t = load_file(str(path))
    out = {}
    for key, down in t.items():
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            alpha = float(t[stem + ".alpha"]) if stem + ".alpha" in t else down.shape[0]  # kohya: missing = rank
            mag = t.get(stem + ".dora_scale")
            out[stem] = (t[stem + ".lora_up.weight"], down, alpha / down.shape[0],
                         None if mag is None else mag.reshape(-1))
    return out


def diffusers_modules(path: Path) -> dict[str, Module]:
    t = load_file(str(path))
    flat = json.loads(metadata(path)["lora_adapter_metadata"])
    out = {}
    for key, down in t.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            component, _, local = name.partition(".")
            cfg = {k.partition(".")[2]: v for k, v in flat.items() if k.startswith(component + ".")}
            r, alpha, rs = _resolve(cfg, local)
            assert down.shape[0] == r, (name, down.shape, r)
            out[name] = (t[name + ".lora_B.weight"], down, alpha / (math.sqrt(r) if rs else r),
                         t.get(name + ".lora_magnitude_vector"))
    return out


def assert_same(a: dict[str, Module], b: dict[str, Module], names: dict[str, str], rel: float = 1e-12) -> None:
    """Modules a[n] and b[names[n]] hold bit-identical factors (up to layout) and the same scale."""
    assert set(names) == set(a) and set(names.values()) == set(b)
    for n, m in names.items():
        up_a, down_a = _flat(*a[n][:2])
        up_b, down_b = _flat(*b[m][:2])
        np.testing.assert_array_equal(up_a, up_b, err_msg=n)
        np.testing.assert_array_equal(down_a, down_b, err_msg=n)
        assert a[n][2] == pytest.approx(b[m][2], rel=rel), n
        assert (a[n][3] is None) == (b[m][3] is None), n
        if a[n][3] is not None:
            np.testing.assert_array_equal(a[n][3], b[m][3], err_msg=n)
        delta_a = (up_a.astype(np.float64) @ down_a) * a[n][2]
        delta_b = (up_b.astype(np.float64) @ down_b) * b[m][2]
        np.testing.assert_allclose(delta_a, delta_b, rtol=rel, atol=0, err_msg=n)


def as_kohya(name: str) -> str:
    """fixtures: PEFT Llama paths go under lora_unet_ with dots as underscores."""
    return "lora_unet_" + name.replace(".", "_")


# kohya_sd's prefixes and the single-file containers of base_sd they stand for (fixtures/README.md)
SD_CONTAINERS = {"lora_unet_": "model.diffusion_model.", "lora_te1_": "conditioner.embedders.0.transformer."}


def sd_base_paths() -> dict[str, str]:
    """kohya stem -> base_sd module path, by comparing underscore forms of base_sd's keys."""
    with safe_open(str(BASE_SD), "np") as f:
        keys = [k.removesuffix(".weight") for k in f.keys() if k.endswith(".weight")]  # noqa: SIM118
    out = {}
    for stem in kohya_modules(KOHYA_SD):
        prefix = next(p for p in SD_CONTAINERS if stem.startswith(p))
        want = (SD_CONTAINERS[prefix] + stem[len(prefix):]).replace(".", "_")
        hits = [k for k in keys if k.replace(".", "_") == want]
        assert len(hits) == 1, stem
        out[stem] = hits[0]
    return out


# ---------------------------------------------------------------------------------------------
# PEFT <-> kohya


def test_peft_to_kohya_layout(tmp_path):
    out = tmp_path / "k.safetensors"
    report = convert(PEFT_LLAMA, out, to="kohya")
    src = peft_modules(PEFT_LLAMA)
    raw = load_file(str(out))
    assert set(raw) == {as_kohya(n) + s for n in src for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    cfg = json.loads((PEFT_LLAMA / "adapter_config.json").read_text())
    for n in src:
        alpha = raw[as_kohya(n) + ".alpha"]
        assert alpha.dtype == np.float32 and alpha.shape == ()
        assert float(alpha) == _resolve(cfg, n)[1]  # not rslora: the PEFT alpha itself
    assert_same(src, kohya_modules(out), {n: as_kohya(n) for n in src})
    meta = metadata(out)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "Dynamic"
    assert meta["loratool.op"] == "convert" and json.loads(meta["loratool.params"])["to"] == "kohya"
    assert {m.placed_by for m in report.modules} == {"name"}


@pytest.mark.parametrize("with_base", [True, False])
def test_peft_kohya_peft_round_trip(tmp_path, with_base):
    convert(PEFT_LLAMA, tmp_path / "k.safetensors", to="kohya")
    report = convert(tmp_path / "k.safetensors", tmp_path / "back", to="peft", base=BASE_LLAMA if with_base else None)
    src = peft_modules(PEFT_LLAMA)
    assert_same(src, peft_modules(tmp_path / "back"), {n: n for n in src})
    assert {m.placed_by for m in report.modules} == {"base" if with_base else "rules"}
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(src) and cfg["peft_type"] == "LORA" and cfg["use_dora"] is False


def test_kohya_peft_kohya_round_trip(tmp_path):
    report = convert(KOHYA_SD, tmp_path / "p", to="peft", base=BASE_SD)
    src = kohya_modules(KOHYA_SD)
    paths = sd_base_paths()
    assert {m.name: m.new_name for m in report.modules} == paths
    peft = peft_modules(tmp_path / "p")
    assert_same(src, peft, paths)
    # the 1x1 conv proj_in keeps 4-D factors: base_sd's proj_in weight is (32, 32, 1, 1)
    raw = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert raw[PREFIX + "model.diffusion_model.input_blocks.4.1.proj_in.lora_A.weight"].shape == (8, 32, 1, 1)

    convert(tmp_path / "p", tmp_path / "k.safetensors", to="kohya")
    back = kohya_modules(tmp_path / "k.safetensors")
    assert_same(src, back, {s: s for s in src})
    alphas = load_file(str(tmp_path / "k.safetensors"))
    # the module that had no .alpha (implied = rank 8) now states it, as float32
    assert float(alphas["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 8.0
    assert all(v.dtype == np.float32 for k, v in alphas.items() if k.endswith(".alpha"))


def test_kohya_to_peft_without_base_keeps_components(tmp_path):
    from loratool.families import get

    report = convert(KOHYA_SD, tmp_path / "p", to="peft")
    src = kohya_modules(KOHYA_SD)
    components = {"lora_unet_": "unet.", "lora_te1_": "text_encoder."}
    sdxl = get("sdxl")  # the U-Net's SGM names become diffusers' paths (issue #15: the SDXL table)
    want = {}
    for stem, path in sd_base_paths().items():
        prefix = next(p for p in components if stem.startswith(p))
        ident = sdxl.identify(stem, "kohya")
        want[stem] = components[prefix] + (path.removeprefix(SD_CONTAINERS[prefix]) if ident is None
                                           else ident[0].split[0][0])
    assert_same(src, peft_modules(tmp_path / "p"), want)
    assert any("spans 2 components" in w for w in report.warnings)


def test_dora_names_and_rslora_alpha(tmp_path):
    convert(PEFT_DORA, tmp_path / "k.safetensors", to="kohya")
    src = peft_modules(PEFT_DORA)
    raw = load_file(str(tmp_path / "k.safetensors"))
    cfg = json.loads((PEFT_DORA / "adapter_config.json").read_text())
    for n, (up, _, _, _mag) in src.items():
        stem = as_kohya(n)
        assert raw[stem + ".dora_scale"].shape == (up.shape[0], 1)
        r, alpha, rslora = _resolve(cfg, n)
        assert rslora
        assert float(raw[stem + ".alpha"]) == pytest.approx(alpha / math.sqrt(r) * r, rel=1e-7)  # kohya has no rsLoRA
    # alpha·sqrt(r) is irrational for r = 8: the float32 kohya alpha keeps the scale to float32 precision
    assert_same(src, kohya_modules(tmp_path / "k.safetensors"), {n: as_kohya(n) for n in src}, rel=1e-7)

    convert(tmp_path / "k.safetensors", tmp_path / "p", to="peft", base=BASE_LLAMA)
    back = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert back["use_dora"] is True
    assert_same(src, peft_modules(tmp_path / "p"), {n: n for n in src}, rel=1e-7)
    keys = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert {PREFIX + n + ".lora_magnitude_vector" for n in src} <= set(keys)


# ---------------------------------------------------------------------------------------------
# diffusers


def _unet_names() -> list[str]:
    with safe_open(str(DIFFUSERS_SD), "np") as f:
        return sorted({k.removesuffix(".lora_A.weight") for k in f.keys() if k.endswith(".lora_A.weight")})  # noqa: SIM118


@pytest.mark.parametrize("base", [None, BASE_UNET])
def test_diffusers_kohya_diffusers_round_trip(tmp_path, base):
    convert(DIFFUSERS_SD, tmp_path / "k.safetensors", to="kohya")
    src = diffusers_modules(DIFFUSERS_SD)
    names = {n: "lora_unet_" + n.removeprefix("unet.").replace(".", "_") for n in _unet_names()}
    assert_same(src, kohya_modules(tmp_path / "k.safetensors"), names)

    report = convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", to="diffusers", base=base)
    # without a base the SD1.x family table names them (issue #15)
    assert {m.placed_by for m in report.modules} == {"sd1 kohya" if base is None else "base"}
    raw = load_file(str(tmp_path / "d.safetensors"))
    assert set(raw) == {n + s for n in _unet_names() for s in (".lora_A.weight", ".lora_B.weight")}
    meta = metadata(tmp_path / "d.safetensors")
    assert meta["format"] == "pt"
    flat = json.loads(meta["lora_adapter_metadata"])
    assert {"unet.r", "unet.lora_alpha", "unet.rank_pattern", "unet.alpha_pattern", "unet.use_rslora",
            "unet.use_dora", "unet.target_modules", "unet.peft_type"} <= set(flat)
    assert all(k.startswith("unet.") for k in flat)
    assert flat["unet.use_dora"] is False and flat["unet.peft_type"] == "LORA"
    assert sorted(flat["unet.target_modules"]) == sorted(n.removeprefix("unet.") for n in _unet_names())
    assert_same(src, diffusers_modules(tmp_path / "d.safetensors"), {n: n for n in src})


def test_diffusers_peft_diffusers_round_trip(tmp_path):
    report = convert(DIFFUSERS_SD, tmp_path / "p", to="peft")
    src = diffusers_modules(DIFFUSERS_SD)
    # one component: PEFT names are paths inside the U-Net, as peft wraps a UNet2DConditionModel
    assert_same(src, peft_modules(tmp_path / "p"), {n: n.removeprefix("unet.") for n in src})
    assert report.warnings == []
    convert(tmp_path / "p", tmp_path / "d.safetensors", to="diffusers")  # down_blocks.* is a U-Net path
    assert_same(src, diffusers_modules(tmp_path / "d.safetensors"), {n: n for n in src})


def test_kohya_dora_to_diffusers(tmp_path):
    rng = np.random.default_rng(0)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({stem + ".lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
               stem + ".lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32),
               stem + ".alpha": np.array(2.0, np.float32),
               stem + ".dora_scale": rng.random((32, 1)).astype(np.float32) + 0.5}, str(tmp_path / "k.safetensors"))
    convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", to="diffusers")
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    raw = load_file(str(tmp_path / "d.safetensors"))
    assert raw[name + ".lora_magnitude_vector"].shape == (32,)
    assert json.loads(metadata(tmp_path / "d.safetensors")["lora_adapter_metadata"])["unet.use_dora"] is True
    assert_same(kohya_modules(tmp_path / "k.safetensors"), diffusers_modules(tmp_path / "d.safetensors"),
                {stem: name})


def test_base_layout_reshapes_1x1_conv_factors(tmp_path):
    """A kohya 1x1-conv module on a base whose weight is 2-D gets 2-D PEFT factors (and back)."""
    rng = np.random.default_rng(1)
    stem = "lora_unet_blocks_0_proj_in"
    save_file({stem + ".lora_down.weight": rng.standard_normal((4, 16, 1, 1)).astype(np.float32),
               stem + ".lora_up.weight": rng.standard_normal((24, 4, 1, 1)).astype(np.float32),
               stem + ".alpha": np.array(4.0, np.float32)}, str(tmp_path / "k.safetensors"))
    save_file({"blocks.0.proj_in.weight": np.zeros((24, 16), np.float32)}, str(tmp_path / "base.safetensors"))
    convert(tmp_path / "k.safetensors", tmp_path / "p", to="peft", base=tmp_path / "base.safetensors")
    raw = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert raw[PREFIX + "blocks.0.proj_in.lora_A.weight"].shape == (4, 16)
    assert raw[PREFIX + "blocks.0.proj_in.lora_B.weight"].shape == (24, 4)
    assert_same(kohya_modules(tmp_path / "k.safetensors"), peft_modules(tmp_path / "p"), {stem: "blocks.0.proj_in"})


# ---------------------------------------------------------------------------------------------
# errors: exit 2, one Error line (and a Hint)


def _error(capsys, args):
    code, _out, err = run_cli(args)
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    hints = [ln for ln in err.splitlines() if ln.startswith("Hint:")]
    assert code == 2 and len(lines) == 1 and len(hints) <= 1, (code, err)
    return lines[0], hints[0] if hints else ""


def test_unplaceable_kohya_names_are_listed(tmp_path, capsys):
    rng = np.random.default_rng(2)
    tensors = {}
    for stem, (down, up) in {"lora_unet_double_blocks_0_img_attn_qkv": ((4, 8), (8, 4)),
                             "lora_unet_down_blocks_0_attentions_0_proj_in": ((4, 32, 1, 1), (32, 4, 1, 1))}.items():
        tensors[stem + ".lora_down.weight"] = rng.standard_normal(down).astype(np.float32)
        tensors[stem + ".lora_up.weight"] = rng.standard_normal(up).astype(np.float32)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    line, hint = _error(capsys, ["convert", tmp_path / "k.safetensors", "--to", "peft", "-o", tmp_path / "out"])
    assert "lora_unet_double_blocks_0_img_attn_qkv" in line and "cannot place 1 module" in line
    assert "proj_in" not in line and "--base" in hint
    assert not (tmp_path / "out").exists()
    # a base that lacks the module: the name is listed too
    line, hint = _error(capsys, ["convert", tmp_path / "k.safetensors", "--to", "peft", "-o", tmp_path / "out",
                                 "--base", BASE_UNET])
    assert "lora_unet_double_blocks_0_img_attn_qkv" in line and "--base" in hint


def test_original_sd_layout_is_renamed_to_diffusers_by_the_unet_tables(tmp_path):
    """kohya SDXL-style names (SGM input_blocks) become diffusers' U-Net paths (issue #15: the SD1.x and
    SDXL tables; these modules are in both, which map them alike)."""
    report = convert(KOHYA_SD, tmp_path / "d.safetensors", to="diffusers")
    names = {m.name: m.new_name for m in report.modules}
    assert names["lora_unet_input_blocks_4_1_proj_in"] == "unet.down_blocks.1.attentions.0.proj_in"
    assert names["lora_unet_input_blocks_1_0_in_layers_2"] == "unet.down_blocks.0.resnets.0.conv1"
    # the names fit sd1 and sdxl alike; the file's ss_base_model_version says SDXL (issue 29), so no
    # "equally" warning: the sdxl table is used
    assert not any("equally" in w for w in report.warnings), report.warnings


def test_peft_without_component_needs_base_for_diffusers(tmp_path, capsys):
    line, hint = _error(capsys, ["convert", PEFT_LLAMA, "--to", "diffusers", "-o", tmp_path / "d.safetensors"])
    assert "model.layers.0.self_attn.q_proj" in line and "--base" in hint


def test_modules_to_save_cannot_go_to_kohya(tmp_path, capsys):
    line, hint = _error(capsys, ["convert", FIXTURES / "peft_cls", "--to", "kohya", "-o", tmp_path / "k.safetensors"])
    assert "modules_to_save" in line and "--to peft" in hint


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_fan_in_fan_out_layers_stay_peft(tmp_path, capsys, to):
    line, hint = _error(capsys, ["convert", FIXTURES / "peft_gpt2", "--to", to, "-o", tmp_path / "o.safetensors"])
    assert "transformer.h.0.attn.c_attn" in line and "fan_in_fan_out" in line and "--to peft" in hint


def test_adapter_not_for_base(tmp_path, capsys):
    line, _ = _error(capsys, ["convert", PEFT_LLAMA, "--to", "kohya", "-o", tmp_path / "k.safetensors",
                              "--base", BASE_UNET])
    assert "model.layers.0" in line and "match no single weight" in line


def test_output_exists(tmp_path, capsys):
    (tmp_path / "k.safetensors").write_bytes(b"x")
    line, hint = _error(capsys, ["convert", PEFT_LLAMA, "--to", "kohya", "-o", tmp_path / "k.safetensors"])
    assert "already exists" in line and "--force" in hint


def test_cli_json_and_summary(tmp_path, capsys):
    code, out, err = run_cli(["convert", PEFT_LLAMA, "--to", "kohya", "-o", tmp_path / "k.safetensors",
                                       "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["source_format"] == "peft" and doc["format"] == "kohya"
    assert doc["num_modules"] == 14 and doc["base"] is None
    row = next(m for m in doc["modules"] if m["name"] == "model.layers.0.self_attn.v_proj")
    assert row == {"name": "model.layers.0.self_attn.v_proj", "new_name": "lora_unet_model_layers_0_self_attn_v_proj",
                   "kind": "linear", "rank": 4, "alpha": 16.0, "scale": 4.0, "placed_by": "name",
                   "from_algo": "lora", "exact_rank": None, "rel_error": 0.0}
    code, out, _ = run_cli(["convert", PEFT_LLAMA, "--to", "kohya", "-o", tmp_path / "k.safetensors",
                                     "--force"])
    assert code == 0 and out.strip().splitlines()[-1].startswith(
        f"Wrote {tmp_path / 'k.safetensors'} (14 modules, peft -> kohya")


# ---------------------------------------------------------------------------------------------
# peft loads what convert writes


def _logits(adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(BASE_LLAMA, torch_dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("source", [PEFT_LLAMA, PEFT_DORA], ids=["lora", "dora-rslora"])
def test_converted_peft_loads_in_peft(tmp_path, source):
    convert(source, tmp_path / "k.safetensors", to="kohya")
    convert(tmp_path / "k.safetensors", tmp_path / "p", to="peft", base=BASE_LLAMA)
    ours, theirs = _logits(tmp_path / "p"), _logits(source)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), float((ours - theirs).abs().max())


def test_kohya_names_of_any_family_come_back_without_a_base(make_adapter, tmp_path):
    """Issue #11 item 10: BLOOM's `transformer.h.N.self_attention.query_key_value` lost its
    `transformer.` in the kohya name; the kohya file records the paths, so converting back needs no
    base and gives the same module paths and bytes."""
    from safetensors import safe_open

    from loratool.formats import read

    mods = {"transformer.h.0.self_attention.query_key_value": (48, 16), "transformer.h.0.mlp.dense_4h_to_h": (16, 64),
            "model.layers.0.self_attn.q_proj": (16, 16)}
    src = make_adapter(fmt="peft", modules=mods, rank=4, alpha=8)
    k = tmp_path / "k.safetensors"
    convert(src, k, to="kohya")
    with safe_open(k, "pt") as f:
        keys = f.keys()
    assert any(key.startswith("lora_unet_h_0_self_attention") for key in keys)
    back = tmp_path / "back"
    convert(k, back, to="peft")
    a, b = read(src), read(back)
    assert set(b.modules) == set(mods)
    for name in mods:
        assert torch.equal(a.modules[name].down.load(), b.modules[name].down.load())
        assert a.modules[name].scale == pytest.approx(b.modules[name].scale)
