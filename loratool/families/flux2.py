"""FLUX.2 (dev, Klein 4B / 9B): the BFL single-file layout and diffusers' Flux2Transformer2DModel.

Facts from diffusers 0.42 `models/transformers/transformer_flux2.py`, `loaders/single_file_utils.py`
(`convert_flux2_transformer_checkpoint_to_diffusers`) and `loaders/lora_conversion_utils.py`
(`_convert_non_diffusers_flux2_lora_to_diffusers` for ai-toolkit's `diffusion_model.` files,
`_convert_kohya_flux2_lora_to_diffusers` for `lora_unet_` ones): FLUX.2 dev has 8 double and 48 single
blocks, hidden 6144; Klein 4B 5 and 20, hidden 3072; Klein 9B hidden 4096. No biases anywhere.

What sets it apart from FLUX.1, whose BFL names it reuses for the blocks:
- the MLPs are SwiGLU with ratio 3: `img_mlp.0` is (6h, h) (gate and value, diffusers `ff.linear_in`),
  `img_mlp.2` (h, 3h); a single block's `linear1` holds q, k, v and the MLP input, (9h, h), and
  diffusers keeps it fused (`attn.to_qkv_mlp_proj`, a rename, not a split); `linear2` is `attn.to_out`;
- no per-block modulation: three shared ones (`double_stream_modulation_img.lin`, `_txt.lin`,
  `single_stream_modulation.lin`) and no `vector_in`.
FLUX.1's `linear1` is (7h, h) and its `img_mlp.0` (4h, h): `rows` lets detection tell a Klein LoRA
(which has FLUX.1's block counts) from a FLUX.1 one by its header's shapes. `final_layer.adaLN_modulation.1`
holds (shift, scale), diffusers' `norm_out.linear` (scale, shift), as the checkpoint converter swaps
them (diffusers' LoRA converter renames it without the swap).
"""

from __future__ import annotations

from loratool.families.model import Family, one, qkv, renames, shift_scale

FAMILY = Family(
    name="flux.2",
    title="FLUX.2 (dev, Klein)",
    relations=(
        # double blocks
        qkv("double_blocks.{i}.img_attn.qkv", "transformer_blocks.{i}.attn"),
        one("double_blocks.{i}.img_attn.proj", "transformer_blocks.{i}.attn.to_out.0"),
        one("double_blocks.{i}.img_mlp.0", "transformer_blocks.{i}.ff.linear_in", "6h"),
        one("double_blocks.{i}.img_mlp.2", "transformer_blocks.{i}.ff.linear_out"),
        qkv("double_blocks.{i}.txt_attn.qkv", "transformer_blocks.{i}.attn",
            ("add_q_proj", "add_k_proj", "add_v_proj")),
        one("double_blocks.{i}.txt_attn.proj", "transformer_blocks.{i}.attn.to_add_out"),
        one("double_blocks.{i}.txt_mlp.0", "transformer_blocks.{i}.ff_context.linear_in", "6h"),
        one("double_blocks.{i}.txt_mlp.2", "transformer_blocks.{i}.ff_context.linear_out"),
        # single blocks: q, k, v and the MLP input stay fused in diffusers too
        one("single_blocks.{i}.linear1", "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj", "9h"),
        one("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.attn.to_out"),
        # the shared modulations
        *renames("""
            double_stream_modulation_img.lin  double_stream_modulation_img.linear
            double_stream_modulation_txt.lin  double_stream_modulation_txt.linear
            single_stream_modulation.lin      single_stream_modulation.linear
        """),
        # embedders and the final layer
        *renames("""
            img_in                 x_embedder
            txt_in                 context_embedder
            time_in.in_layer       time_guidance_embed.timestep_embedder.linear_1
            time_in.out_layer      time_guidance_embed.timestep_embedder.linear_2
            guidance_in.in_layer   time_guidance_embed.guidance_embedder.linear_1
            guidance_in.out_layer  time_guidance_embed.guidance_embedder.linear_2
            final_layer.linear     proj_out
        """),
        shift_scale("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
    blocks={"double_blocks": 8, "single_blocks": 48, "transformer_blocks": 8, "single_transformer_blocks": 48},
    base_layouts={
        "bfl": "double_blocks.0.img_attn.qkv.weight (flux2-dev.safetensors, flux-2-klein-4b.safetensors; "
               "ComfyUI: under model.diffusion_model.)",
        "diffusers": "transformer_blocks.0.attn.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
