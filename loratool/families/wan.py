"""Wan 2.1 / 2.2 (T2V, I2V, TI2V): the Wan-AI single-file layout and diffusers' WanTransformer3DModel.

Facts from diffusers 0.42.1 `loaders/lora_conversion_utils.py` (`_convert_non_diffusers_wan_lora_to_diffusers`
for `diffusion_model.` files, `_convert_musubi_wan_lora_to_diffusers` for musubi-tuner's `lora_unet_`
files) and `loaders/single_file_utils.py` (`convert_wan_transformer_to_diffusers`): every module is a
rename, nothing is fused. 40 blocks in the 14B models (Wan 2.1 14B, Wan 2.2 A14B), 30 in the 1.3B and
Wan 2.2 5B. I2V models add `cross_attn.k_img` / `v_img` (and their norm) and the CLIP image
projection `img_emb.proj`.

The norms and modulation parameters are listed because Wan LoRAs carry LyCORIS full diffs for them
(`blocks.0.norm3.diff`, `.diff_b`): a rename moves them with the rest. The original `norm3` (the
affine cross-attention norm) is diffusers' `norm2`; `modulation` is diffusers' `scale_shift_table`.
"""

from __future__ import annotations

from loratool.families.model import Family, one, renames

_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))

FAMILY = Family(
    name="wan",
    title="Wan 2.1 / 2.2",
    relations=(
        *(one(f"blocks.{{i}}.self_attn.{o}", f"blocks.{{i}}.attn1.{d}") for o, d in _ATTN),
        *(one(f"blocks.{{i}}.cross_attn.{o}", f"blocks.{{i}}.attn2.{d}") for o, d in _ATTN),
        # I2V: the image context's key / value projections
        *renames("""
            blocks.{i}.cross_attn.k_img       blocks.{i}.attn2.add_k_proj
            blocks.{i}.cross_attn.v_img       blocks.{i}.attn2.add_v_proj
            blocks.{i}.cross_attn.norm_k_img  blocks.{i}.attn2.norm_added_k
            blocks.{i}.ffn.0                  blocks.{i}.ffn.net.0.proj
            blocks.{i}.ffn.2                  blocks.{i}.ffn.net.2
            blocks.{i}.norm3                  blocks.{i}.norm2
            blocks.{i}.modulation             blocks.{i}.scale_shift_table
        """),
        # embedders and the head
        *renames("""
            patch_embedding    patch_embedding
            text_embedding.0   condition_embedder.text_embedder.linear_1
            text_embedding.2   condition_embedder.text_embedder.linear_2
            time_embedding.0   condition_embedder.time_embedder.linear_1
            time_embedding.2   condition_embedder.time_embedder.linear_2
            time_projection.1  condition_embedder.time_proj
            img_emb.proj.0     condition_embedder.image_embedder.norm1
            img_emb.proj.1     condition_embedder.image_embedder.ff.net.0.proj
            img_emb.proj.3     condition_embedder.image_embedder.ff.net.2
            img_emb.proj.4     condition_embedder.image_embedder.norm2
            head.head          proj_out
            head.modulation    scale_shift_table
        """),
    ),
    blocks={"blocks": 40},
    base_layouts={
        "wan-ai": "blocks.0.self_attn.q.weight (Wan2.1-T2V-14B diffusion_pytorch_model*.safetensors; ComfyUI: "
                  "under model.diffusion_model.)",
        "diffusers": "blocks.0.attn1.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
