"""Detection across families: shared names are ambiguous (with the candidates), a distinctive module or
a block index past another family's count decides, with the evidence; convert acts accordingly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from family_tools import fixture_families
from safetensors.torch import load_file, save_file

from loratool.cli import cli
from loratool.errors import IncompatibleError
from loratool.families import detect
from loratool.ops.convert import convert

family_lora = fixture_families.family_lora
flux_shapes = fixture_families.flux_shapes

# the FLUX.1 modules whose kohya names are also HunyuanVideo's (musubi-tuner): attention and single blocks
SHARED_KOHYA = {k: v for k, v in flux_shapes(16, 1, 1).items()
                if k.endswith(("attn.qkv", "attn.proj", "linear1", "linear2"))}


def test_shared_diffusers_names_are_ambiguous() -> None:
    names = ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp"]
    det = detect(names)
    assert det.ambiguous and det.family is None and not det.confident
    assert det.tied == ["flux.1", "chroma", "hunyuan-video"] and det.matched == det.total == 2
    assert det.describe() == "ambiguous: flux.1 (diffusers) or chroma (diffusers) or hunyuan-video (diffusers)"
    doc = det.to_dict()
    assert doc["candidates"][:3] == [{"family": "flux.1", "dialect": "diffusers", "matched": 2},
                                     {"family": "chroma", "dialect": "diffusers", "matched": 2},
                                     {"family": "hunyuan-video", "dialect": "diffusers", "matched": 2}]


@pytest.mark.parametrize("extra,family,reason", [
    # a modulation: FLUX.1's and HunyuanVideo's, not Chroma's; and a patch embedder HunyuanVideo lacks
    # (its own is x_embedder.proj) (x_embedder alone leaves FLUX.1 and Chroma tied: test_flux_or_chroma)
    ("transformer.x_embedder", "flux.1", "not hunyuan-video: transformer.x_embedder is not one of its modules"),
    # a module only HunyuanVideo has
    ("transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q", "hunyuan-video",
     "not flux.1: transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q is not one of its modules"),
    # a block index past FLUX.1's 38 single blocks
    ("transformer.single_transformer_blocks.39.proj_out", "hunyuan-video",
     "not flux.1: transformer.single_transformer_blocks.39.proj_out is in single_transformer_blocks 39, past its 38"),
])
def test_a_distinctive_module_decides(extra: str, family: str, reason: str) -> None:
    modulation = ["transformer.transformer_blocks.0.norm1.linear"] if family == "flux.1" else []
    det = detect(["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp",
                  extra, *modulation])
    assert (det.family, det.dialect, det.matched, det.total) == (family, "diffusers", 3 + len(modulation),
                                                                  3 + len(modulation))
    assert det.confident and not det.ambiguous and reason in det.reasons


def test_flux_or_chroma() -> None:
    """Chroma is FLUX.1 less its modulations: a module both have leaves them tied, a modulation says FLUX.1."""
    names = ["transformer.transformer_blocks.0.attn.to_q", "transformer.x_embedder",
             "transformer.single_transformer_blocks.0.proj_mlp"]  # x_embedder: not HunyuanVideo; proj_mlp: not FLUX.2
    det = detect(names)
    assert det.ambiguous and det.tied == ["flux.1", "chroma"]
    det = detect([*names, "transformer.transformer_blocks.0.norm1.linear"])
    assert det.family == "flux.1" and \
        "not chroma: transformer.transformer_blocks.0.norm1.linear is not one of its modules" in det.reasons
    det = detect([*names, "transformer.distilled_guidance_layer.layers.0.linear_1"])
    assert det.family == "chroma"


def test_past_every_family_is_unknown() -> None:
    det = detect(["lora_unet_double_blocks_54_img_attn_qkv"])  # HunyuanVideo 1.5 has 54, 1.0 20, FLUX.1 19
    assert det.family is None and not det.ambiguous and det.describe() == "unknown"
    assert detect(["lora_unet_double_blocks_20_img_attn_qkv"]).family == "hunyuan-video-1.5"


def test_wan_names_are_wans_alone() -> None:
    det = detect(["diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.ffn.0"])
    assert det.family == "wan" and det.confident and det.reasons == []


def test_ambiguous_names_convert_when_every_table_agrees(tmp_path: Path) -> None:
    """FLUX.1's and HunyuanVideo's shared kohya names split to the same diffusers modules."""
    src = tmp_path / "k.safetensors"
    save_file(family_lora("flux.1", SHARED_KOHYA, "kohya"), str(src))
    assert detect([k.rsplit(".", 2)[0] for k in load_file(str(src)) if k.endswith("lora_down.weight")]).ambiguous
    report = convert(src, tmp_path / "d.safetensors", to="diffusers")
    assert any("fit flux.1 and chroma and hunyuan-video equally" in w for w in report.warnings)
    assert {m.from_algo for m in report.modules} == {"split", "lora"}
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in load_file(str(tmp_path / "d.safetensors"))
    # their ComfyUI names differ (img_attn.qkv vs img_attn_qkv): the family must be named
    with pytest.raises(IncompatibleError, match=r"fit flux\.1 and chroma and hunyuan-video equally") as e:
        convert(src, tmp_path / "c.safetensors", to="comfyui")
    assert e.value.hint == "pass --family flux.1 or --family chroma or --family hunyuan-video"
    convert(src, tmp_path / "c.safetensors", to="comfyui", family="hunyuan-video")
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_down.weight" in load_file(str(tmp_path / "c.safetensors"))


def test_inspect_says_ambiguous(tmp_path: Path) -> None:
    src = tmp_path / "d.safetensors"
    t = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 16),
         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 2)}
    save_file(t, str(src))
    r = CliRunner().invoke(cli, ["inspect", str(src)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the row may wrap at the terminal's width
    tied = ["flux.1", "flux.2", "chroma", "sd3", "hunyuan-video", "qwen-image", "qwen-image-2", "hunyuan-video-1.5"]
    assert ("family ambiguous: " + " or ".join(f"{f} (diffusers)" for f in tied) + " (convert needs --family)") in text
    doc = json.loads(CliRunner().invoke(cli, ["inspect", str(src), "--json"]).output)
    assert doc["family"]["ambiguous"] and doc["family"]["family"] is None
    assert doc["family"]["tied"] == tied


def _flux_attention_names(double: int, single: int) -> list[str]:
    return ([f"transformer.transformer_blocks.{i}.attn.{m}" for i in range(double) for m in ("to_q", "to_k", "to_v")]
            + [f"transformer.single_transformer_blocks.{i}.attn.to_q" for i in range(single)])


def test_every_block_of_one_family_decides_a_tie() -> None:
    """ai-toolkit / SimpleTuner FLUX.1 LoRAs use diffusers names HunyuanVideo shares; one on every
    block (double 0-18, single 0-37) fills FLUX.1's block lists, while HunyuanVideo has 20 and 40
    blocks: FLUX.1, with the reason. Before, every such file was ambiguous and needed --family."""
    det = detect(_flux_attention_names(19, 38))
    # Chroma has FLUX.1's blocks: the tie is theirs alone (their tables convert these names alike)
    assert det.ambiguous and det.tied == ["flux.1", "chroma"]
    # one full block list is enough (19 double blocks, single blocks 0-19 of both families' lists)
    assert detect(_flux_attention_names(19, 20)).tied == ["flux.1", "chroma"]
    # a modulation rules Chroma out: FLUX.1, with the reason against HunyuanVideo
    det = detect([*_flux_attention_names(19, 38), "transformer.transformer_blocks.0.norm1.linear"])
    assert det.family == "flux.1" and det.confident and not det.ambiguous
    assert any(r.startswith("not hunyuan-video: the modules fill all of flux.1's") for r in det.reasons)
    # some blocks only: the names alone cannot tell
    assert detect(_flux_attention_names(4, 4)).ambiguous


def test_a_full_diffusers_flux_lora_converts_to_kohya_without_family(tmp_path: Path) -> None:
    tensors = family_lora("flux.1", flux_shapes(16, 19, 38), "diffusers", rank=2, seed=4)
    src = tmp_path / "ai_toolkit.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya")
    names = {k.split(".", 1)[0] for k in load_file(str(out))}
    assert "lora_unet_double_blocks_18_img_attn_qkv" in names and "lora_unet_single_blocks_37_linear1" in names


def _partly_flux(tmp_path: Path) -> Path:
    """FLUX.1's kohya modules and three no family has (a model loratool has no table for)."""
    t = family_lora("flux.1", flux_shapes(16, 1, 1), "kohya")
    for n in ("lora_unet_future_modulation_lin", "lora_unet_future_in", "lora_unet_future_out", "lora_unet_future_x"):
        t[f"{n}.lora_down.weight"], t[f"{n}.lora_up.weight"] = torch.zeros(2, 16), torch.zeros(16, 2)
    src = tmp_path / "unknown.safetensors"
    save_file(t, str(src))
    return src


def test_a_partial_fit_is_not_a_known_family(tmp_path: Path) -> None:
    """Issue 25: a file one family's names only partly cover was labelled 'flux.1, 13 of 17 modules'."""
    src = _partly_flux(tmp_path)
    r = CliRunner().invoke(cli, ["inspect", str(src)])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("family"))
    assert "not a known family; closest flux.1 (kohya, 13 of 17 modules); these are not FLUX.1 modules: " \
           "lora_unet_future_in, lora_unet_future_modulation_lin, lora_unet_future_out (and 1 more)" in \
           " ".join(r.output.split()), r.output
    assert "flux.1, kohya dialect" not in line
    doc = json.loads(CliRunner().invoke(cli, ["inspect", str(src), "--json"]).output)["family"]
    assert doc["family"] is None and doc["closest"] == "flux.1" and not doc["confident"]
    assert (doc["matched"], doc["total"]) == (13, 17)


@pytest.mark.parametrize("to", ["diffusers", "comfyui", "kohya", "peft"])
def test_convert_refuses_a_partial_fit_by_name(tmp_path: Path, to: str) -> None:
    src = _partly_flux(tmp_path)
    r = CliRunner().invoke(cli, ["convert", str(src), "--to", to, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    err = r.stderr if hasattr(r, "stderr") else r.output
    first = err.splitlines()[0]
    assert first.startswith(f"Error: {src}: not a known family; closest flux.1") and "lora_unet_future_in" in first
    assert not (tmp_path / "o").exists()
