"""SD1.x / SD2.x U-Net LoRAs (family `sd1`): detection, conversion between every dialect, merge into
both base layouts, and diffusers itself (the checks are in tests/unet_tools.py, shared with SDXL).

kohya sd-scripts names SD1.x's diffusers side under `lora_unet_` (its U-Net is diffusers'); ComfyUI
also reads the original (LDM) names there and writes `diffusion_model.` + LDM paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import unet_tools as u
from family_tools import write
from safetensors.torch import load_file, save_file

from fixtures.wild import LAYOUTS, write_layout
from loratool.errors import IncompatibleError
from loratool.families import detect, get
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.merge import merge


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "peft"])
def test_detect_family_and_dialect(tmp_path: Path, dialect: str) -> None:
    fam = u.check_detect(tmp_path, "sd1", dialect)
    if dialect == "kohya":  # kohya's own names: the diffusers side
        assert all(get("sd1").identify(e, "kohya")[2] is not None for e in fam["evidence"])
        assert any(r.startswith("not sdxl: ") and "is not one of its modules" in r for r in fam["reasons"])


def test_kohya_names_of_either_side_are_sd1_and_kohya_writes_the_diffusers_side(tmp_path: Path) -> None:
    """ComfyUI reads `lora_unet_input_blocks_1_1_...` for SD1.x too: read as sd1 kohya. Converting
    another dialect to kohya writes what sd-scripts writes (the diffusers side); a kohya file
    converted within its dialect (e.g. a LoHa made plain with --to lora) keeps its names."""
    t = u.lora("sd1", "comfyui")
    comfy = write(tmp_path, "c.safetensors", t)
    orig = {}
    for k, v in t.items():
        suffix = next(s for s in (".lora_down.weight", ".lora_up.weight", ".alpha") if k.endswith(s))
        orig["lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(suffix).replace(".", "_") + suffix] = v
    src = write(tmp_path, "o.safetensors", orig)
    det = detect(u.stems(orig))
    assert (det.family, det.dialect, det.matched) == ("sd1", "kohya", det.total)
    out = tmp_path / "k.safetensors"
    convert(comfy, out, to="kohya")
    want = u.lora("sd1", "kohya")
    got = load_file(str(out))
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)  # the same seed: the same factors, renamed
    convert(src, tmp_path / "k2.safetensors", to="kohya")
    same = load_file(str(tmp_path / "k2.safetensors"))
    assert set(same) == set(orig) and all(torch.equal(same[k], orig[k]) for k in orig)


def test_round_trips_are_bit_identical(tmp_path: Path) -> None:
    u.check_round_trip(tmp_path, "sd1")


def test_kohya_names_and_text_encoder_in_every_dialect(tmp_path: Path) -> None:
    """SD1.x's one text encoder: kohya `lora_te_`, diffusers `text_encoder.`; ComfyUI files keep kohya's."""
    src = write_layout(LAYOUTS["kohya_sd15"], tmp_path)
    names = {}
    for to in ("diffusers", "comfyui", "kohya"):
        out = tmp_path / f"{to}.safetensors"
        convert(src if to == "diffusers" else tmp_path / "diffusers.safetensors", out, to=to)
        names[to] = set(read(out).modules)
    assert "unet.down_blocks.0.resnets.0.conv1" in names["diffusers"]  # the LoCon 3x3 conv
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1" in names["diffusers"]
    assert "diffusion_model.input_blocks.1.0.in_layers.2" in names["comfyui"]
    assert "diffusion_model.input_blocks.1.1.proj_in" in names["comfyui"]
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in names["comfyui"]
    assert names["kohya"] == set(read(src).modules)


@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_merge_into_both_layouts(tmp_path: Path, dialect: str) -> None:
    u.check_merge_both_layouts(tmp_path, "sd1", dialect, "cond_stage_model.transformer.")


def test_kohya_sd15_file_into_a_single_file_checkpoint(tmp_path: Path) -> None:
    """kohya's SD1.5 file (diffusers names, LoCon conv, `lora_te_`) into an LDM single file with its
    text encoder: every module merged, the U-Net's by the table and the text encoder's by its prefix."""
    src = write_layout(LAYOUTS["kohya_sd15"], tmp_path)
    fam = get("sd1")
    ref = u.raw_deltas(load_file(str(src)))
    keys = {}
    for stem in ref:
        ident = fam.identify(stem, "kohya")
        keys[stem] = ("model.diffusion_model." + ident[0].original if ident else "cond_stage_model.transformer."
                      + stem.removeprefix("lora_te_").replace("text_model_encoder_layers_0_", "text_model.encoder."
                      "layers.0.").replace("self_attn_", "self_attn.").replace("mlp_fc", "mlp.fc")) + ".weight"
    gen = torch.Generator().manual_seed(2)
    base = {keys[s]: torch.randn(*d.shape, generator=gen) for s, d in ref.items()}
    save_file(base, str(tmp_path / "v1-5.safetensors"))
    report = merge(tmp_path / "v1-5.safetensors", [src], tmp_path / "m.safetensors")
    assert report.merged == len(ref) == 13 and not report.unmatched
    got = load_file(str(tmp_path / "m.safetensors"))
    for s, d in ref.items():
        torch.testing.assert_close(got[keys[s]].double(), base[keys[s]].double() + torch.from_numpy(d),
                                   rtol=1e-5, atol=1e-5)


def test_a_wrong_family_is_refused_not_merged(tmp_path: Path) -> None:
    """An SD1.x LoRA into an SDXL base (and the reverse): refused, naming the modules; nothing written."""
    sd1_single, _, _ = u.bases(tmp_path, "sd1")
    sub = tmp_path / "x"
    sub.mkdir()
    sdxl_single, sdxl_unet, _ = u.bases(sub, "sdxl")
    sd1 = write(tmp_path, "sd1.safetensors", u.lora("sd1", "kohya"))
    sdxl = write(tmp_path, "sdxl.safetensors", u.lora("sdxl", "kohya", full=False))
    for lora, base in ((sd1, sdxl_single), (sd1, sdxl_unet), (sdxl, sd1_single)):
        out = tmp_path / ("m" if base.is_dir() else "m.safetensors")  # a folder base merges into a folder
        with pytest.raises(IncompatibleError, match=r"unmatched|shape"):
            merge(base, [lora], out)
        assert not out.exists()


def test_only_modules_both_have_is_ambiguous() -> None:
    names = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"]
    det = detect(names)
    assert det.ambiguous and det.family is None and det.tied == ["sd1", "sdxl"]
    assert det.describe() == "ambiguous: sd1 (kohya) or sdxl (kohya)"


# ---------------------------------------------------------------------------------------------
# diffusers itself

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd1", "sd2"])  # SD2.x: linear proj_in / proj_out, the same names
def test_table_agrees_with_diffusers_single_file_converter(model: str) -> None:
    u.check_table_against_ldm_converter(model)


@pytest.mark.slow
def test_diffusers_kohya_loader_reads_our_kohya_file_as_we_convert_it(tmp_path: Path) -> None:
    u.check_diffusers_kohya_loader(tmp_path, "sd1")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_our_diffusers_output_loads_and_fuses_to_our_merge(tmp_path: Path, model: str) -> None:
    u.check_load_lora_adapter_and_fuse(tmp_path, model)
