"""SDXL U-Net LoRAs (family `sdxl`): detection, conversion between every dialect, merge into both
base layouts, and diffusers itself (the checks are in tests/unet_tools.py, shared with SD1.x).

kohya sd-scripts names SDXL's original (SGM) side under `lora_unet_`; OneTrainer writes the
diffusers side under the same prefix (the `onetrainer` dialect); ComfyUI writes `diffusion_model.`
+ SGM paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import unet_tools as u
from family_tools import write
from safetensors.torch import load_file, save_file

from fixtures.wild import LAYOUTS, write_layout
from loratool.families import detect, get
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge


@pytest.mark.parametrize("dialect", ["kohya", "onetrainer", "comfyui", "diffusers", "peft"])
def test_detect_family_and_dialect(tmp_path: Path, dialect: str) -> None:
    fam = u.check_detect(tmp_path, "sdxl", dialect, full=dialect != "peft")
    if dialect == "kohya":  # kohya's own names: the SGM side
        assert all(e.startswith(("lora_unet_input_blocks_", "lora_unet_time_embed", "lora_unet_label_emb"))
                   for e in fam["evidence"])
    if dialect in ("kohya", "diffusers"):
        # transformer blocks 1-9 and output blocks 0-2's attentions are no SD1.x modules
        assert any(r.startswith("not sd1: ") and "is not one of its modules" in r for r in fam["reasons"])


def test_wild_files_are_sdxl() -> None:
    """The wild kohya (SGM names) and OneTrainer (diffusers names) SDXL files: output block 0 has
    attention in SDXL only."""
    for name, dialect in (("kohya_sdxl", "kohya"), ("onetrainer_sdxl", "onetrainer")):
        stems = [s for s in u.stems(LAYOUTS[name].build()) if not s.startswith("lora_te")]
        det = detect(stems)
        assert (det.family, det.dialect, det.matched, det.total) == ("sdxl", dialect, len(stems), len(stems)), name


def test_kohya_writes_sgm_names_onetrainer_reads_as_diffusers(tmp_path: Path) -> None:
    src = write(tmp_path, "o.safetensors", u.lora("sdxl", "onetrainer", full=False))
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya")
    want = u.lora("sdxl", "kohya", full=False)
    got = load_file(str(out))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in got  # the upsampler after an attention
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in got  # the downsampler
    assert "lora_unet_label_emb_0_0.lora_down.weight" in got  # add_embedding.linear_1


def test_round_trips_are_bit_identical(tmp_path: Path) -> None:
    u.check_round_trip(tmp_path, "sdxl")


@pytest.mark.parametrize("dialect", ["kohya", "onetrainer"])
def test_merge_into_both_layouts(tmp_path: Path, dialect: str) -> None:
    u.check_merge_both_layouts(tmp_path, "sdxl", dialect, "conditioner.embedders.0.transformer.")


def test_kohya_sdxl_file_into_a_diffusers_unet(tmp_path: Path) -> None:
    """kohya's SDXL file (SGM names) into a diffusers `unet` folder: every U-Net module merged by the
    table, the text encoders' reported unmatched (the folder has none); inspect names the family."""
    src = write_layout(LAYOUTS["kohya_sdxl"], tmp_path)
    assert inspect_adapter(src).to_dict()["family"]["family"] == "sdxl"
    fam = get("sdxl")
    ref = u.raw_deltas(load_file(str(src)))
    keys = {s: fam.identify(s, "kohya")[0].split[0][0] + ".weight" for s in ref if not s.startswith("lora_te")}
    gen = torch.Generator().manual_seed(2)
    unet = tmp_path / "unet"
    unet.mkdir()
    base = {k: torch.randn(*ref[s].shape, generator=gen) for s, k in keys.items()}
    save_file(base, str(unet / "diffusion_pytorch_model.safetensors"))
    report = merge(unet, [src], tmp_path / "m", allow_unmatched=True)
    assert report.merged == len(keys) == 5 and sorted(report.unmatched) == sorted(s for s in ref if s not in keys)
    got = load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))
    for s, k in keys.items():
        torch.testing.assert_close(got[k].double(), base[k].double() + torch.from_numpy(ref[s]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# diffusers itself

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_table_agrees_with_diffusers_single_file_converter() -> None:
    u.check_table_against_ldm_converter("sdxl")


@pytest.mark.slow
def test_diffusers_kohya_loader_reads_our_kohya_file_as_we_convert_it(tmp_path: Path) -> None:
    """diffusers maps our SGM names itself (`_maybe_map_sgm_blocks_to_diffusers`, then its kohya
    converter): the same module names and deltas as our --to diffusers."""
    u.check_diffusers_kohya_loader(tmp_path, "sdxl")


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_to_our_merge(tmp_path: Path) -> None:
    u.check_load_lora_adapter_and_fuse(tmp_path, "sdxl")


def test_no_dit_family_shares_a_unet_name(tmp_path: Path) -> None:
    """The U-Nets' names are no transformer family's in any dialect (and the reverse): an SDXL file's
    candidates are the two U-Nets only, and a FLUX.1 LoRA is refused by an SDXL base, not merged."""
    from family_tools import fixture_families

    from loratool.errors import IncompatibleError

    for dialect in ("kohya", "onetrainer", "comfyui", "diffusers"):
        det = detect(u.stems(u.lora("sdxl", dialect, full=False)))
        assert {f for f, _, _ in det.candidates} <= {"sdxl", "sd1"}, dialect
    flux = fixture_families.flux_lora("kohya")
    assert not {f for f, _, _ in detect(u.stems(flux)).candidates} & {"sd1", "sdxl"}
    single, _, _ = u.bases(tmp_path, "sdxl")
    with pytest.raises(IncompatibleError, match="unmatched"):
        merge(single, [write(tmp_path, "flux.safetensors", flux)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_convert_with_a_base_of_the_other_layout_uses_the_table(tmp_path: Path) -> None:
    """--base names modules by the base's keys when every module matches one (a kohya file against
    its single file); a kohya (SGM) file against a diffusers unet folder goes by the table instead."""
    single, unet, _ = u.bases(tmp_path, "sdxl")
    src = write(tmp_path, "k.safetensors", u.lora("sdxl", "kohya", full=False, every=7))
    report = convert(src, tmp_path / "p", to="peft", base=single)
    assert {m.placed_by for m in report.modules} == {"base"}
    assert all(m.new_name.startswith("model.diffusion_model.") for m in report.modules)
    report = convert(src, tmp_path / "d.safetensors", to="diffusers", base=unet)
    assert {m.placed_by for m in report.modules} == {"sdxl kohya"}
    assert any(m.new_name.startswith("unet.down_blocks.") for m in report.modules)


@pytest.mark.parametrize("to", ["diffusers", "comfyui"])
def test_stray_modules_are_the_ones_named(tmp_path: Path, to: str) -> None:
    """A kohya SDXL file with 794 good modules and 2 stray diffusers-named ones: the error names the 2
    strays, not the 794 (issue 25 defect 5)."""
    from loratool.errors import IncompatibleError

    t = u.lora("sdxl", "kohya")
    strays = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_mid_block_attentions_0_proj_in"]
    for s in strays:
        t[s + ".lora_down.weight"], t[s + ".lora_up.weight"] = torch.ones(4, 16), torch.ones(16, 4)
    assert len({k.split(".")[0] for k in t}) == 796
    with pytest.raises(IncompatibleError) as e:
        convert(write(tmp_path, "s.safetensors", t), tmp_path / "o.safetensors", to=to)
    msg = str(e.value)
    # not SDXL as a whole (a partial fit is never the family), and the 2 strays are the modules it names
    assert "not a known family; closest sdxl (kohya, 794 of 796 modules)" in msg
    assert all(s in msg for s in strays) and "input_blocks" not in msg
