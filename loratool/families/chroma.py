"""Chroma (Chroma1-HD, Chroma1-Base): FLUX.1 schnell pruned of its modulation layers, and diffusers'
ChromaTransformer2DModel.

Facts from diffusers 0.42 `models/transformers/transformer_chroma.py` and `loaders/single_file_utils.py`
(`convert_chroma_transformer_checkpoint_to_diffusers`): FLUX.1's 19 double and 38 single blocks, hidden
3072, the same fused qkv / `linear1` and the same diffusers names for them, but no per-block
modulation (`img_mod`, `txt_mod`, `modulation`), no `time_in` / `vector_in` / `guidance_in` and no
final modulation: one `distilled_guidance_layer` (an MLP of residual layers, `in_layer` / `out_layer`,
diffusers `linear_1` / `linear_2`) computes every modulation. The table is FLUX.1's less what Chroma
pruned, plus that layer: a LoRA of block linears alone fits both families alike (their tables convert
it alike); a modulation module says FLUX.1, a `distilled_guidance_layer` one Chroma.
"""

from __future__ import annotations

from loratool.families import flux
from loratool.families.model import Family, renames

# FLUX.1 modules Chroma does not have (original-layout prefixes)
_PRUNED = ("double_blocks.{i}.img_mod.", "double_blocks.{i}.txt_mod.", "single_blocks.{i}.modulation.",
           "time_in.", "vector_in.", "guidance_in.", "final_layer.adaLN_modulation.")

FAMILY = Family(
    name="chroma",
    title="Chroma",
    relations=(
        *(r for r in flux.FAMILY.relations if not r.original.startswith(_PRUNED)),
        *renames("""
            distilled_guidance_layer.in_proj               distilled_guidance_layer.in_proj
            distilled_guidance_layer.layers.{i}.in_layer   distilled_guidance_layer.layers.{i}.linear_1
            distilled_guidance_layer.layers.{i}.out_layer  distilled_guidance_layer.layers.{i}.linear_2
            distilled_guidance_layer.out_proj              distilled_guidance_layer.out_proj
        """),
    ),
    blocks={**flux.FAMILY.blocks, "distilled_guidance_layer": 5},
    base_layouts={
        "bfl": "double_blocks.0.img_attn.qkv.weight (Chroma1-HD.safetensors; ComfyUI: under model.diffusion_model.)",
        "diffusers": "transformer_blocks.0.attn.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
