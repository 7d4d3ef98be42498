"""FLUX.1 (dev / schnell): the BFL single-file layout and diffusers' FluxTransformer2DModel.

Facts from diffusers `loaders/lora_conversion_utils.py` (`_convert_kohya_flux_lora_to_diffusers`,
`_convert_bfl_flux_control_lora_to_diffusers`), kohya `networks/convert_flux_lora.py` and ComfyUI
`comfy/utils.py` (`flux_to_diffusers`): 19 double blocks, 38 single blocks, hidden 3072, MLP 12288.
The fused modules: a double block's `img_attn.qkv` / `txt_attn.qkv` hold q, k, v (h rows each); a
single block's `linear1` holds q, k, v and the MLP input (`proj_mlp`, the rest of the rows);
`final_layer.adaLN_modulation.1` holds (shift, scale), which diffusers' `norm_out.linear` stores as
(scale, shift).
"""

from __future__ import annotations

from loratool.families.model import ADDED_QKV, Family, one, qkv, shift_scale

FAMILY = Family(
    name="flux.1",
    title="FLUX.1 (dev, schnell)",
    relations=(
        # double blocks: image stream
        qkv("double_blocks.{i}.img_attn.qkv", "transformer_blocks.{i}.attn"),
        one("double_blocks.{i}.img_attn.proj", "transformer_blocks.{i}.attn.to_out.0"),
        one("double_blocks.{i}.img_mlp.0", "transformer_blocks.{i}.ff.net.0.proj"),
        one("double_blocks.{i}.img_mlp.2", "transformer_blocks.{i}.ff.net.2"),
        one("double_blocks.{i}.img_mod.lin", "transformer_blocks.{i}.norm1.linear"),
        # double blocks: text stream
        qkv("double_blocks.{i}.txt_attn.qkv", "transformer_blocks.{i}.attn", ADDED_QKV),
        one("double_blocks.{i}.txt_attn.proj", "transformer_blocks.{i}.attn.to_add_out"),
        one("double_blocks.{i}.txt_mlp.0", "transformer_blocks.{i}.ff_context.net.0.proj"),
        one("double_blocks.{i}.txt_mlp.2", "transformer_blocks.{i}.ff_context.net.2"),
        one("double_blocks.{i}.txt_mod.lin", "transformer_blocks.{i}.norm1_context.linear"),
        # single blocks
        qkv("single_blocks.{i}.linear1", "single_transformer_blocks.{i}.attn",  # FLUX.1's mlp_ratio is 4
            extra=(("mlp", "4h", "single_transformer_blocks.{i}.proj_mlp"),)),
        one("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.proj_out"),
        one("single_blocks.{i}.modulation.lin", "single_transformer_blocks.{i}.norm.linear"),
        # embedders and the final layer
        one("img_in", "x_embedder"),
        one("txt_in", "context_embedder"),
        one("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        one("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        one("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        one("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        one("final_layer.linear", "proj_out"),
        shift_scale("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
    blocks={"double_blocks": 19, "single_blocks": 38, "transformer_blocks": 19, "single_transformer_blocks": 38},
    base_layouts={
        "bfl": "double_blocks.0.img_attn.qkv.weight (flux1-dev.safetensors; ComfyUI: under model.diffusion_model.)",
        "diffusers": "transformer_blocks.0.attn.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
