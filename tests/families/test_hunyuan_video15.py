"""HunyuanVideo 1.5 LoRAs in every dialect: detection (apart from HunyuanVideo 1.0 and FLUX.1), conversion
and diffusers itself.

Files are generated at test time from the family table (fixtures/families.py). Independent check: our
diffusers output loads into a tiny HunyuanVideo15Transformer3DModel built here with `load_lora_adapter`
(every linear wrapped but the Conv3d patch embedder) and fuses to loratool's merge of the same file
(diffusers 0.42.1 has no LoRA converter or loader mixin for HunyuanVideo 1.5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import (
    adapter_names,
    fixture_families,
    fuse_equals_merge,
    linears,
    merge_equals_numpy,
    round_trip_is_identity,
    write,
)

from loratool.families import detect
from loratool.ops.inspect import inspect_adapter

hv15_lora, hv15_shapes = fixture_families.hunyuan_video15_lora, fixture_families.hunyuan_video15_shapes
hunyuan_video_lora, flux_lora = fixture_families.hunyuan_video_lora, fixture_families.flux_lora


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer"])
def test_inspect_names_the_family(tmp_path: Path, dialect: str) -> None:
    fam = inspect_adapter(write(tmp_path, "l.safetensors", hv15_lora(dialect))).to_dict()["family"]
    assert fam["family"] == "hunyuan-video-1.5" and fam["dialect"] == dialect and fam["confident"]


def test_other_families_keep_their_detection() -> None:
    """1.0's single blocks, vector_in and guidance_in are no 1.5 modules; 1.5's ByT5 / SigLIP embedders and
    double blocks past 1.0's 20 are no 1.0 modules."""
    for dialect in ("kohya", "comfyui", "diffusers"):
        assert detect(adapter_names(hunyuan_video_lora(dialect))).family == "hunyuan-video"
    assert detect(adapter_names(flux_lora("kohya"))).family == "flux.1"
    det = detect(["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_40_img_attn_qkv"])
    assert det.family == "hunyuan-video-1.5" and det.confident
    assert "not hunyuan-video: lora_unet_double_blocks_40_img_attn_qkv is in double_blocks 40, past its 20" \
        in det.reasons
    det = detect(["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_fc1"])
    assert det.ambiguous and det.tied == ["hunyuan-video", "hunyuan-video-1.5"]
    said = detect(["lora_unet_double_blocks_0_img_attn_qkv"], {"ss_base_model_version": "hunyuan_video_1.5"})
    assert said.family == "hunyuan-video-1.5"


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    round_trip_is_identity(tmp_path, hv15_lora("kohya", seed=5, biases=True), target, "hunyuan-video-1.5")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merge_into_the_original_layout_equals_numpy(tmp_path: Path, prefix: str) -> None:
    shapes = hv15_shapes()
    assert merge_equals_numpy(tmp_path, "hunyuan-video-1.5", shapes, prefix) == len(shapes)


# ---------------------------------------------------------------------------------------------
# diffusers itself

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                             num_layers=1, num_refiner_layers=1, text_embed_dim=12, text_embed_2_dim=10,
                                             image_embed_dim=6, rope_axes_dim=(2, 2, 4))
    have = linears(model)
    # the ByT5 mapper's hidden width is fixed at 2048 in diffusers' model
    tensors = hv15_lora("kohya", rank=4, alpha=2.0, seed=9, byt5_hidden=2048)
    wrapped, changed, ours = fuse_equals_merge(model, tensors, tmp_path)
    assert wrapped == set(have) and changed == len(wrapped) == len(ours.modules)
