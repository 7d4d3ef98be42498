"""Stable Diffusion XL (base 1.0, and models fine-tuned from it): Stability's SGM U-Net
(`sd_xl_base_1.0.safetensors`) and diffusers' UNet2DConditionModel.

Three levels of (320, 640, 1280) channels: no attention in the first, 2 and 10 transformer blocks in
the others, 10 in the middle block, two resnets per down level, and the pooled-text / size
conditioning MLP `label_emb` (diffusers `add_embedding`); the block structure: unet.py. kohya
sd-scripts trains SDXL on its own copy of the SGM U-Net (`library/sdxl_original_unet.py`), so its
files name the original side under `lora_unet_` (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`);
OneTrainer writes diffusers names under the same prefix (`lora_unet_down_blocks_1_attentions_0_...`,
the `onetrainer` dialect here); ComfyUI reads both and writes `diffusion_model.` + original paths;
diffusers' loader maps the original names itself (`_maybe_map_sgm_blocks_to_diffusers`). The text
encoders (kohya `lora_te1_` / `lora_te2_`, diffusers `text_encoder.` / `text_encoder_2.`) are not in
the table. The refiner has another structure and is not this family.
"""

from __future__ import annotations

from loratool.families.model import DIFFUSERS, ORIGINAL, Family
from loratool.families.unet import UNet

UNET = UNet(channels=(320, 640, 1280), attention=(False, True, True), depth=(1, 2, 10), add_embedding=True)

FAMILY = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    relations=UNET.relations(),
    component="unet",
    original_layout="Stability SGM / ComfyUI single-file",
    onetrainer_prefix="lora_unet_",
    sides={"kohya": (ORIGINAL,), "onetrainer": (DIFFUSERS,), "diffusion-pipe": ()},
    base_layouts={
        "sgm": "model.diffusion_model.input_blocks.4.1.proj_in.weight (sd_xl_base_1.0.safetensors; ComfyUI: "
               "the same)",
        "diffusers": "down_blocks.1.attentions.0.proj_in.weight (unet/diffusion_pytorch_model.safetensors)",
    },
)
