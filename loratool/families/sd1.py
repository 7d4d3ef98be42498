"""Stable Diffusion 1.x / 2.x: the CompVis LDM U-Net (`v1-5-pruned.safetensors`, SD2's `v2-1_768`) and
diffusers' UNet2DConditionModel; SD2.x has SD1.x's module tree (its `proj_in` / `proj_out` are linear
instead of 1x1 convolutions, the same names), so one table serves both.

Four levels of (320, 640, 1280, 1280) channels, attention with one transformer block in the first
three, two resnets per down level (layers_per_block 2), one transformer block in the middle (the
block structure: unet.py). kohya sd-scripts trains SD1.x/2.x on diffusers' U-Net (its
`library/original_unet.py` keeps diffusers' module names), so its files and OneTrainer's name the
diffusers side under `lora_unet_` (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`);
ComfyUI (`comfy/lora.py`, `model_lora_keys_unet`) reads those and the original names under
`lora_unet_` too, and writes `diffusion_model.` + original paths. The text encoder (CLIP ViT-L, or
OpenCLIP ViT-H in SD2) is kohya's `lora_te_`, diffusers' `text_encoder.`: not in the table.
"""

from __future__ import annotations

from loratool.families.model import DIFFUSERS, ORIGINAL, Family
from loratool.families.unet import UNet

UNET = UNet(channels=(320, 640, 1280, 1280), attention=(True, True, True, False), depth=(1, 1, 1, 1))

FAMILY = Family(
    name="sd1",
    title="Stable Diffusion 1.x / 2.x",
    relations=UNET.relations(),
    component="unet",
    original_layout="CompVis LDM / ComfyUI single-file",
    sides={"kohya": (DIFFUSERS, ORIGINAL), "onetrainer": (), "diffusion-pipe": ()},
    single_text_encoder=True,
    base_layouts={
        "ldm": "model.diffusion_model.input_blocks.1.1.proj_in.weight (v1-5-pruned-emaonly.safetensors; "
               "ComfyUI: the same)",
        "diffusers": "down_blocks.0.attentions.0.proj_in.weight (unet/diffusion_pytorch_model.safetensors)",
    },
)
