"""HunyuanVideo (T2V): Tencent's single-file layout and diffusers' HunyuanVideoTransformer3DModel.

Facts from diffusers 0.42.1 `loaders/lora_conversion_utils.py` (`_convert_hunyuan_video_lora_to_diffusers`)
and `loaders/single_file_utils.py` (`convert_hunyuan_video_transformer_to_diffusers`), and ComfyUI's
`comfy/lora.py` (HunyuanVideo key map: LoRAs in Tencent's names under `diffusion_model.` or
`transformer.`): 20 double blocks, 40 single blocks, 2 token-refiner blocks, hidden 3072, MLP 12288.

Tencent's names keep underscores where FLUX.1 has dots (`img_attn_qkv`, not `img_attn.qkv`) and
name the MLPs `fc1` / `fc2` and the modulations `.linear`; in the kohya dialect (musubi-tuner) the
attention and single-block names are the same strings as FLUX.1's (`lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_0_linear1`), so only block indices past FLUX.1's (19 double, 38 single) or a
module only one of them has tells the two apart. The fused modules are FLUX.1's: qkv (q, k, v; h
rows each), a single block's `linear1` (q, k, v and the MLP input), the token refiner's
`self_attn_qkv`, and `final_layer.adaLN_modulation.1` (shift, scale), which diffusers stores as
(scale, shift). The refiner's own `adaLN_modulation.1` (two gates) is a plain rename.
"""

from __future__ import annotations

from loratool.families.model import ADDED_QKV, Family, one, qkv, shift_scale

_REFINER = "txt_in.individual_token_refiner.blocks.{i}"
_REFINER_D = "context_embedder.token_refiner.refiner_blocks.{i}"


FAMILY = Family(
    name="hunyuan-video",
    title="HunyuanVideo",
    relations=(
        # double blocks: image stream
        qkv("double_blocks.{i}.img_attn_qkv", "transformer_blocks.{i}.attn"),
        one("double_blocks.{i}.img_attn_proj", "transformer_blocks.{i}.attn.to_out.0"),
        one("double_blocks.{i}.img_mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
        one("double_blocks.{i}.img_mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
        one("double_blocks.{i}.img_mod.linear", "transformer_blocks.{i}.norm1.linear"),
        one("double_blocks.{i}.img_attn_q_norm", "transformer_blocks.{i}.attn.norm_q"),
        one("double_blocks.{i}.img_attn_k_norm", "transformer_blocks.{i}.attn.norm_k"),
        # double blocks: text stream
        qkv("double_blocks.{i}.txt_attn_qkv", "transformer_blocks.{i}.attn",
             ADDED_QKV),
        one("double_blocks.{i}.txt_attn_proj", "transformer_blocks.{i}.attn.to_add_out"),
        one("double_blocks.{i}.txt_mlp.fc1", "transformer_blocks.{i}.ff_context.net.0.proj"),
        one("double_blocks.{i}.txt_mlp.fc2", "transformer_blocks.{i}.ff_context.net.2"),
        one("double_blocks.{i}.txt_mod.linear", "transformer_blocks.{i}.norm1_context.linear"),
        one("double_blocks.{i}.txt_attn_q_norm", "transformer_blocks.{i}.attn.norm_added_q"),
        one("double_blocks.{i}.txt_attn_k_norm", "transformer_blocks.{i}.attn.norm_added_k"),
        # single blocks
        qkv("single_blocks.{i}.linear1", "single_transformer_blocks.{i}.attn",  # mlp_width_ratio 4
            extra=(("mlp", "4h", "single_transformer_blocks.{i}.proj_mlp"),)),
        one("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.proj_out"),
        one("single_blocks.{i}.modulation.linear", "single_transformer_blocks.{i}.norm.linear"),
        one("single_blocks.{i}.q_norm", "single_transformer_blocks.{i}.attn.norm_q"),
        one("single_blocks.{i}.k_norm", "single_transformer_blocks.{i}.attn.norm_k"),
        # the text token refiner
        one("txt_in.input_embedder", "context_embedder.proj_in"),
        one("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
        one("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
        one("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
        one("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
        qkv(f"{_REFINER}.self_attn_qkv", f"{_REFINER_D}.attn"),
        one(f"{_REFINER}.self_attn_proj", f"{_REFINER_D}.attn.to_out.0"),
        one(f"{_REFINER}.mlp.fc1", f"{_REFINER_D}.ff.net.0.proj"),
        one(f"{_REFINER}.mlp.fc2", f"{_REFINER_D}.ff.net.2"),
        one(f"{_REFINER}.adaLN_modulation.1", f"{_REFINER_D}.norm_out.linear"),
        one(f"{_REFINER}.norm1", f"{_REFINER_D}.norm1"),
        one(f"{_REFINER}.norm2", f"{_REFINER_D}.norm2"),
        # embedders and the final layer
        one("img_in.proj", "x_embedder.proj"),
        one("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        one("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        one("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
        one("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
        one("final_layer.linear", "proj_out"),
        shift_scale("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
    blocks={"double_blocks": 20, "single_blocks": 40, "transformer_blocks": 20, "single_transformer_blocks": 40,
            "txt_in": 2, "context_embedder": 2},
    base_layouts={
        "tencent": "double_blocks.0.img_attn_qkv.weight "
                   "(hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt)",
        "diffusers": "transformer_blocks.0.attn.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
