"""Every key of a file `convert --to comfyui` or `--to kohya` writes is one ComfyUI loads, checked
against ComfyUI's key map written from its source as data (tests/comfy_keymap.py).

The base keys are ComfyUI's own model keys: for FLUX.1, Wan, Qwen-Image, LTX-Video and SD3 the
checkpoint names its model classes use (the fixtures' original-layout names); for HunyuanVideo the
names ComfyUI renames Tencent's checkpoint into (`comfy_keymap.hunyuan_video_modules`); for the
U-Nets every module ComfyUI's own `unet_to_diffusers` knows for the tiny model's unet_config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import unet_tools as u
from comfy_keymap import comfy_accepted_keys, hunyuan_video_modules, not_loaded, unet_to_diffusers
from family_tools import ROOT, deltas, fixture_families, write
from safetensors import safe_open
from safetensors.torch import load_file

from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

ff = fixture_families

# ComfyUI's unet_config of the tiny U-Nets in tests/unet_tools.py (transformer depth per input block,
# per output block highest resolution first, and in the middle block)
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {"num_res_blocks": [2] * 4, "transformer_depth": [1] * 6 + [0] * 2,
            "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1},
    "sdxl": {"num_res_blocks": [2] * 3, "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10},
}


def _case(name: str) -> tuple[str, str, dict[str, Any], list[str], dict[str, Any] | None]:
    """(comfy model kind, loratool family, kohya tensors, ComfyUI base module names, unet_config)."""
    if name == "flux.1":
        shapes = ff.flux_shapes(16, 2, 2)
        return "flux", name, ff.family_lora(name, shapes, "kohya"), list(shapes), None
    if name == "wan":
        shapes = ff.wan_shapes(layers=2, i2v=True)
        return "wan", name, ff.family_lora(name, shapes, "kohya"), list(shapes), None
    if name == "qwen-image":
        shapes = ff.qwen_image_shapes(16, 2)
        return "qwen-image", name, ff.family_lora(name, shapes, "kohya"), list(shapes), None
    if name == "ltx-video":
        shapes = ff.ltx_shapes(layers=2)
        return "ltxv", name, ff.family_lora(name, shapes, "kohya"), list(shapes), None
    if name == "sd3":
        shapes = ff.sd3_shapes(16, 2, dual=(0,))
        return "sd3", name, ff.family_lora(name, shapes, "kohya"), list(shapes), None
    if name in ("kandinsky-5", "qwen-image-2", "ltx-2"):  # ComfyUI's checkpoint names are the fixtures' originals
        shapes = {"kandinsky-5": ff.kandinsky5_shapes, "qwen-image-2": ff.qwen_image2_shapes,
                  "ltx-2": ff.ltx2_shapes}[name]()
        # ComfyUI's LTXAV is no LTXV subclass (comfy/model_base.py): only the rules every model gets
        model = {"kandinsky-5": "kandinsky5", "qwen-image-2": "qwen-image", "ltx-2": "generic"}[name]
        return model, name, ff.family_lora(name, shapes, "kohya"), list(shapes), None
    if name == "hunyuan-video-1.5":  # ComfyUI loads 1.5 into its 1.0 class (comfy/model_base.py)
        mods = [m for m in hunyuan_video_modules(2, 0, 1) if not m.startswith(("vector_in.", "guidance_in."))]
        mods += ["byt5_in.fc1", "byt5_in.fc2", "byt5_in.fc3", "vision_in.proj.1", "vision_in.proj.3"]
        return "hunyuan-video", name, ff.hunyuan_video15_lora("kohya", double=2), mods, None
    if name in ("flux.2", "chroma"):
        # ComfyUI loads both with FLUX.1's model code (comfy/ldm/flux, comfy/ldm/chroma) under their BFL
        # names, which its generic rules map; the source is the diffusers dialect, so the qkv fuse is written
        shapes = ff.flux2_shapes(double=2, single=2) if name == "flux.2" else ff.chroma_shapes(double=2, single=2)
        return "generic", name, ff.family_lora(name, shapes, "diffusers"), list(shapes), None
    if name == "z-image":  # ComfyUI's lumina2 model (NextDiT): the single-file names, generic rules
        shapes = ff.z_image_shapes()
        return "lumina2", name, ff.family_lora(name, shapes, "diffusers"), list(shapes), None
    if name == "hidream":  # ComfyUI's hidream model keeps diffusers' names
        shapes = ff.hidream_shapes()
        return "hidream", name, ff.family_lora(name, shapes, "diffusers"), list(shapes), None
    if name == "hunyuan-video":
        return ("hunyuan-video", name, ff.hunyuan_video_lora("kohya"), hunyuan_video_modules(1, 1, 1), None)
    config = UNET_CONFIGS[name]
    return name, name, u.lora(name, "kohya"), sorted(set(unet_to_diffusers(config).values())), config


FAMILIES = ["flux.1", "flux.2", "chroma", "z-image", "hidream", "wan", "qwen-image", "ltx-video", "sd3",
            "hunyuan-video", "sd1", "sdxl", "kandinsky-5", "qwen-image-2", "ltx-2", "hunyuan-video-1.5"]


@pytest.mark.parametrize("target", ["comfyui", "kohya"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_written_key_is_one_comfyui_loads(tmp_path: Path, family: str, target: str) -> None:
    model, fam, tensors, modules, config = _case(family)
    src = write(tmp_path, "src.safetensors", tensors)
    out = tmp_path / f"{target}.safetensors"
    convert(src, out, to=target, family=fam)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys
    base = [m + ".weight" for m in modules]
    assert not_loaded(model, keys, base, unet_config=config) == []
    # and every module of the file patches a distinct ComfyUI weight
    accepted = comfy_accepted_keys(model, base, unet_config=config)
    stems = {k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}
    assert len({accepted[s] for s in stems}) == len(stems)


def test_the_map_refuses_what_comfyui_refuses() -> None:
    """The helper is no yes-man: Tencent's `time_in.mlp.0` is no HunyuanVideo key in ComfyUI (it
    loads the model as `time_in.in_layer`), a diffusers name is no Wan key, a bare FLUX.1 path is."""
    hv = [m + ".weight" for m in hunyuan_video_modules(1, 1, 1)]
    bad = ["diffusion_model.time_in.mlp.0.lora_up.weight", "diffusion_model.time_in.mlp.0.lora_down.weight"]
    good = ["diffusion_model.time_in.in_layer.lora_up.weight", "diffusion_model.time_in.in_layer.lora_down.weight",
            "transformer.double_blocks.0.img_mod.linear.lora_B.weight",
            "transformer.double_blocks.0.img_mod.linear.lora_A.weight"]
    assert not_loaded("hunyuan-video", bad + good, hv) == sorted(bad)
    wan = [m + ".weight" for m in ff.wan_shapes()]
    assert not_loaded("wan", ["transformer.blocks.0.attn1.to_q.lora_A.weight"], wan) != []
    flux = [m + ".weight" for m in ff.flux_shapes(16, 1, 1)]
    assert not_loaded("flux", ["transformer_blocks.0.attn.to_q.lora_A.weight",
                               "transformer_blocks.0.attn.to_q.lora_B.weight"], flux) == []
    assert comfy_accepted_keys("flux", flux)["lora_transformer_single_transformer_blocks_0_proj_mlp"] == \
        "diffusion_model.single_blocks.0.linear1.weight"


# ---------------------------------------------------------------------------------------------
# issue 25 defect 1: --for comfyui on a family file in diffusers names goes by the family's table


@pytest.mark.parametrize("family", ["sd1", "flux.1"])
def test_for_comfyui_on_a_diffusers_family_file(tmp_path: Path, family: str) -> None:
    """`convert --for comfyui` asked for --family and then refused it; it now names the modules from
    the family's table (ComfyUI reads kohya's names), every key one ComfyUI loads, deltas kept."""
    if family == "sd1":
        src = ROOT / "fixtures" / "diffusers_sd.safetensors"
        model, config = "sd1", UNET_CONFIGS["sd1"]
        base = [m + ".weight" for m in sorted(set(unet_to_diffusers(config).values()))]
    else:
        src = write(tmp_path, "d.safetensors", ff.flux_lora("diffusers", double=2, single=2))
        model, config, base = "flux", None, [m + ".weight" for m in ff.flux_shapes(16, 2, 2)]
    out = tmp_path / "c.safetensors"
    # the tiny FLUX.1 file's names fit HunyuanVideo too: --family, which --for refused, says which
    report = convert(src, out, for_runtime="comfyui", family=None if family == "sd1" else family)
    assert report.to_dict()["runtime"] == "comfyui"
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert not_loaded(model, keys, base, unet_config=config) == []
    back = tmp_path / "d2.safetensors"
    convert(out, back, to="diffusers", family=family)
    want, got = deltas(src), deltas(back)
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# issue 25 defect 2: HunyuanVideo in the names ComfyUI's key map takes


@pytest.mark.parametrize("target", ["comfyui", "kohya"])
def test_musubi_hunyuan_file_is_written_in_names_comfyui_loads(tmp_path: Path, target: str) -> None:
    """A musubi-tuner kohya file (Tencent's names, dots as underscores: `img_mod_linear`, `img_mlp_fc1`,
    `time_in_mlp_0`) is read, and written in names ComfyUI loads: all 31 modules (before: the 8
    embedders under comfyui and 17 of 31 under kohya were left unloaded); the deltas are the same
    and our output says it is HunyuanVideo (its block names are FLUX.1's under kohya)."""
    shapes = ff.hunyuan_video_shapes()
    gen = torch.Generator().manual_seed(3)
    musubi: dict[str, torch.Tensor] = {}
    for path, (o, i) in shapes.items():
        stem = "lora_unet_" + path.replace(".", "_")
        musubi[stem + ".lora_down.weight"] = torch.randn(2, i, generator=gen)
        musubi[stem + ".lora_up.weight"] = torch.randn(o, 2, generator=gen)
        musubi[stem + ".alpha"] = torch.tensor(1.0)
    src = write(tmp_path, "musubi.safetensors", musubi)
    out = tmp_path / "out.safetensors"
    convert(src, out, to=target, family="hunyuan-video")
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert len({k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}) == len(shapes) == 31
    assert not_loaded("hunyuan-video", keys, [m + ".weight" for m in hunyuan_video_modules(1, 1, 1)]) == []
    assert not_loaded("hunyuan-video", list(musubi), [m + ".weight" for m in hunyuan_video_modules(1, 1, 1)])
    want = {k.removeprefix("lora_unet_"): v for k, v in deltas(src).items()}
    back = tmp_path / "back.safetensors"
    convert(out, back, to="kohya")  # detected from our own metadata, not --family
    got = deltas(back)
    assert len(got) == 31 and inspect_adapter(out).to_dict()["family"]["family"] == "hunyuan-video"
    assert "lora_unet_double_blocks_0_img_mod_lin" in got and "lora_unet_time_in_in_layer" in got
    assert torch.equal(got["lora_unet_time_in_in_layer"], want["time_in_mlp_0"])
    assert torch.equal(got["lora_unet_double_blocks_0_img_mlp_0"], want["double_blocks_0_img_mlp_fc1"])
    for name, d in got.items():  # every module's delta, whatever its name
        assert any(torch.equal(d, w) for w in want.values()), name


# ---------------------------------------------------------------------------------------------
# issue 25 defect 6: DiffSynth-Studio's `<module>.lora_A.default.weight` (no prefix)


def test_diffsynth_file_is_read_and_converts(tmp_path: Path) -> None:
    """DiffSynth-Studio saves peft's state dict with the adapter name left in and no prefix; ComfyUI
    loads it (`.lora_B.default.weight`); loratool read it as holding no LoRA tensors. Now: Qwen-Image's
    modules (the peft-style names), alpha = rank as ComfyUI applies it, and --to comfyui keeps the
    factors bit for bit in names ComfyUI loads."""
    shapes = ff.qwen_image_shapes(16, 2)
    t = {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A.default.weight")
         .replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in ff.qwen_image_lora("peft").items()}
    base = [m + ".weight" for m in shapes]
    assert not_loaded("qwen-image", list(t), base) == []  # what ComfyUI takes
    src = write(tmp_path, "diffsynth.safetensors", t)
    fam = inspect_adapter(src).to_dict()["family"]
    assert (fam["family"], fam["matched"], fam["total"]) == ("qwen-image", 34, 34)
    out = tmp_path / "c.safetensors"
    report = convert(src, out, to="comfyui")
    assert all(r.scale == 1.0 for r in report.modules)
    got = load_file(str(out))
    assert not_loaded("qwen-image", list(got), base) == []
    for k, v in t.items():
        stem, role = k.split(".lora_")
        mine = f"diffusion_model.{stem}." + ("lora_down.weight" if role.startswith("A") else "lora_up.weight")
        assert torch.equal(got[mine], v), k


def test_comfyui_names_ignore_a_single_file_checkpoint_s_keys(tmp_path: Path) -> None:
    """--base a single-file SDXL checkpoint (`model.diffusion_model.…`, `conditioner.embedders.0.…`): the
    comfyui file keeps ComfyUI's own spelling (the checkpoint's keys load nowhere in ComfyUI), the same
    tensors as without --base, and every U-Net key is one ComfyUI loads."""
    src, base = ROOT / "fixtures" / "kohya_sd.safetensors", ROOT / "fixtures" / "base_sd.safetensors"
    convert(src, tmp_path / "plain.safetensors", to="comfyui")
    convert(src, tmp_path / "based.safetensors", to="comfyui", base=base)
    plain, based = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "based.safetensors"))
    assert list(plain) == list(based) and all(torch.equal(plain[k], based[k]) for k in plain)
    assert all(k.startswith(("diffusion_model.", "lora_te1_", "lora_te2_")) for k in based), list(based)
    with safe_open(str(base), "pt") as f:
        names = list(f.keys())
    model_keys = [k.removeprefix("model.") for k in names if k.startswith("model.diffusion_model.")]
    unet = [k for k in based if k.startswith("diffusion_model.")]
    assert unet and not_loaded("generic", unet, model_keys) == []
