"""LTX-Video LoRAs in every dialect: detection, renames, and the real clients.

Files are generated at test time from the family table (fixtures/families.py). Independent checks:
diffusers' own converter (`_convert_non_diffusers_ltxv_lora_to_diffusers`) on our ComfyUI file, and
`load_lora_adapter` + `fuse_lora` on a tiny LTXVideoTransformer3DModel built here, compared with
loratool's merge into the same base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import converter_agrees, fixture_families, fuse_equals_merge, lora_state, write
from safetensors.torch import load_file

from loratool.families import detect
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

ltx_lora = fixture_families.ltx_lora
ltx_shapes = fixture_families.ltx_shapes
family_lora = fixture_families.family_lora



@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer"])
def test_detect_family_and_dialect(tmp_path: Path, dialect: str) -> None:
    """Every LTX-Video module is also one of LTX-2's video half (ltx2.py): the names fit both, and the
    header's training metadata decides."""
    fam = inspect_adapter(write(tmp_path, "l.safetensors", ltx_lora(dialect))).to_dict()["family"]
    assert fam["ambiguous"] and fam["tied"] == ["ltx-video", "ltx-2"] and fam["matched"] == fam["total"] == 17
    said = {"ss_base_model_version": "ltxv-13b-0.9.8"}
    fam = inspect_adapter(write(tmp_path, "m.safetensors", ltx_lora(dialect), said)).to_dict()["family"]
    assert fam["family"] == "ltx-video" and fam["dialect"] == dialect and fam["matched"] == fam["total"] == 17
    assert fam["confident"] and not fam["ambiguous"]


def test_feed_forward_alone_is_ambiguous() -> None:
    """LTX-Video's ff names on the diffusers side are FLUX.1's, SD3's and HunyuanVideo's too."""
    det = detect(["transformer.transformer_blocks.0.ff.net.0.proj", "transformer.transformer_blocks.0.ff.net.2"])
    assert det.ambiguous
    assert det.tied == ["flux.1", "chroma", "sd3", "hunyuan-video", "ltx-video", "ltx-2", "hunyuan-video-1.5"]
    # a block past FLUX.1's 19, HunyuanVideo's 20 and SD3.5 large's 38 is LTX-Video's (48 in the 13B model),
    # LTX-2's (48) or HunyuanVideo 1.5's (54)
    det = detect(["transformer.transformer_blocks.0.ff.net.0.proj", "transformer.transformer_blocks.40.ff.net.2"])
    assert det.ambiguous and det.tied == ["ltx-video", "ltx-2", "hunyuan-video-1.5"]
    det = detect(["transformer.transformer_blocks.0.ff.net.0.proj", "transformer.transformer_blocks.40.ff.net.2"],
                 {"modelspec.architecture": "ltx-video"})
    assert det.family == "ltx-video" and det.confident


def test_kohya_diffusers_comfyui_kohya_is_the_identity(tmp_path: Path) -> None:
    src = write(tmp_path, "k.safetensors", ltx_lora("kohya", biases=True))
    dif, comfy, back = tmp_path / "d.safetensors", tmp_path / "c.safetensors", tmp_path / "k2.safetensors"
    convert(src, dif, to="diffusers")
    keys = load_file(str(dif))
    assert "transformer.proj_in.lora_A.weight" in keys and "transformer.time_embed.linear.lora_B.bias" in keys
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    convert(dif, comfy, to="comfyui")
    assert "diffusion_model.adaln_single.linear.lora_down.weight" in load_file(str(comfy))
    convert(comfy, back, to="kohya")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# the real clients

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_diffusers_ltx_converter_agrees_with_ours(tmp_path: Path) -> None:
    """diffusers' converter (a prefix swap) gives our names and deltas where the paths are the same on
    both sides; it keeps `patchify_proj` / `adaln_single`, names its model does not have."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltxv_lora_to_diffusers

    same = ("transformer_blocks.", "caption_projection.", "proj_out")
    shapes = {k: v for k, v in ltx_shapes(layers=2).items() if k.startswith(same)}
    t = family_lora("ltx-video", shapes, "comfyui", rank=4, alpha=4.0, seed=7)
    src = write(tmp_path, "c.safetensors", t)
    theirs = _convert_non_diffusers_ltxv_lora_to_diffusers(lora_state(t))
    out = tmp_path / "d.safetensors"
    convert(src, out, to="diffusers")
    converter_agrees(theirs, out)


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import LTXVideoTransformer3DModel


    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, num_layers=1, caption_channels=16)
    wrapped, changed, ours = fuse_equals_merge(model, ltx_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
    assert len(wrapped) == len(ours.modules) == 17
    assert changed == len(wrapped)
