"""Stable Diffusion 3 / 3.5 (medium, large): the SAI single-file MMDiT layout and diffusers'
SD3Transformer2DModel.

Facts from diffusers `loaders/single_file_utils.py` (`convert_sd3_transformer_checkpoint_to_diffusers`),
ComfyUI `comfy/utils.py` (`mmdit_to_diffusers`, `MMDIT_MAP_BLOCK`, `MMDIT_MAP_BASIC`) and kohya
sd-scripts `networks/lora_sd3.py` / `library/sd3_models.py` (prefix `lora_unet`, modules of the
`SingleDiTBlock`s plus the embedders and final layer): 24 joint blocks in SD3 medium and SD3.5
medium, 38 in SD3.5 large; hidden 64 per block of depth (1536, 2432).

A joint block has an image stream (`x_block`) and a text stream (`context_block`); each attention
`qkv` holds q, k, v (h rows each), which diffusers splits into `to_q`/`to_k`/`to_v` (image) and
`add_q_proj`/... (text). SD3.5 medium's first blocks add a second image attention `x_block.attn2`
(diffusers `attn2`) and modulate with 9 chunks instead of 6: a rename either way. The last block's
context stream is "pre-only": no `attn.proj` and no MLP, and its `adaLN_modulation.1` holds 2
chunks (shift, scale), stored by diffusers' `norm1_context.linear` as (scale, shift) like the final
layer's; the other blocks' 6 chunks keep their order, so which relation holds is told by the rows.
`attn.ln_q` / `ln_k` (SD3.5) are norms, not LoRA targets. `x_embedder.proj` is the patch
embedding convolution (diffusers `pos_embed.proj`).
"""

from __future__ import annotations

from loratool.families.model import ADDED_QKV, Family, Relation, one, qkv, shift_scale

# (shift, scale) on the original side, (scale, shift) in diffusers' AdaLayerNormContinuous
SHIFT_SCALE = (("shift", "half"), ("scale", "half"))

FAMILY = Family(
    name="sd3",
    title="Stable Diffusion 3 / 3.5 (medium, large)",
    relations=(
        # image stream
        qkv("joint_blocks.{i}.x_block.attn.qkv", "transformer_blocks.{i}.attn"),
        one("joint_blocks.{i}.x_block.attn.proj", "transformer_blocks.{i}.attn.to_out.0"),
        qkv("joint_blocks.{i}.x_block.attn2.qkv", "transformer_blocks.{i}.attn2"),
        one("joint_blocks.{i}.x_block.attn2.proj", "transformer_blocks.{i}.attn2.to_out.0"),
        one("joint_blocks.{i}.x_block.mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
        one("joint_blocks.{i}.x_block.mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
        one("joint_blocks.{i}.x_block.adaLN_modulation.1", "transformer_blocks.{i}.norm1.linear"),
        # text stream
        qkv("joint_blocks.{i}.context_block.attn.qkv", "transformer_blocks.{i}.attn", ADDED_QKV),
        one("joint_blocks.{i}.context_block.attn.proj", "transformer_blocks.{i}.attn.to_add_out"),
        one("joint_blocks.{i}.context_block.mlp.fc1", "transformer_blocks.{i}.ff_context.net.0.proj"),
        one("joint_blocks.{i}.context_block.mlp.fc2", "transformer_blocks.{i}.ff_context.net.2"),
        Relation("joint_blocks.{i}.context_block.adaLN_modulation.1", (("all", "rest"),),
                 (("transformer_blocks.{i}.norm1_context.linear", ("all",)),), rows="6h"),
        # the last (pre-only) block
        Relation("joint_blocks.{i}.context_block.adaLN_modulation.1", SHIFT_SCALE,
                 (("transformer_blocks.{i}.norm1_context.linear", ("scale", "shift")),), rows="2h"),
        # embedders and the final layer
        one("x_embedder.proj", "pos_embed.proj"),
        one("context_embedder", "context_embedder"),
        one("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        one("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        one("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        one("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        one("final_layer.linear", "proj_out"),
        shift_scale("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
    blocks={"joint_blocks": 38, "transformer_blocks": 38},
    base_layouts={
        "sai": "joint_blocks.0.x_block.attn.qkv.weight (sd3.5_large.safetensors; under model.diffusion_model. "
               "in the all-in-one checkpoints and ComfyUI)",
        "diffusers": "transformer_blocks.0.attn.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
