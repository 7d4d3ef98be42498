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

from loratool.families.model import ADDED_QKV, Family, one, qkv, renames, shift_scale

_REFINER = "txt_in.individual_token_refiner.blocks.{i}"
_REFINER_D = "context_embedder.token_refiner.refiner_blocks.{i}"
_EMBEDDERS = (("time_in.mlp.0", "time_in.in_layer"), ("time_in.mlp.2", "time_in.out_layer"),
              ("guidance_in.mlp.0", "guidance_in.in_layer"), ("guidance_in.mlp.2", "guidance_in.out_layer"),
              ("t_embedder.mlp.0", "t_embedder.in_layer"), ("t_embedder.mlp.2", "t_embedder.out_layer"),
              ("c_embedder.linear_1", "c_embedder.in_layer"), ("c_embedder.linear_2", "c_embedder.out_layer"))
_BLOCKS = (("_mod.linear", "_mod.lin"), ("modulation.linear", "modulation.lin"), ("mlp.fc1", "mlp.0"),
           ("mlp.fc2", "mlp.2"))


FAMILY = Family(
    name="hunyuan-video",
    title="HunyuanVideo",
    relations=(
        # double blocks: image stream
        qkv("double_blocks.{i}.img_attn_qkv", "transformer_blocks.{i}.attn"),
        *renames("""
            double_blocks.{i}.img_attn_proj    transformer_blocks.{i}.attn.to_out.0
            double_blocks.{i}.img_mlp.fc1      transformer_blocks.{i}.ff.net.0.proj
            double_blocks.{i}.img_mlp.fc2      transformer_blocks.{i}.ff.net.2
            double_blocks.{i}.img_mod.linear   transformer_blocks.{i}.norm1.linear
            double_blocks.{i}.img_attn_q_norm  transformer_blocks.{i}.attn.norm_q
            double_blocks.{i}.img_attn_k_norm  transformer_blocks.{i}.attn.norm_k
        """),
        # double blocks: text stream
        qkv("double_blocks.{i}.txt_attn_qkv", "transformer_blocks.{i}.attn",
             ADDED_QKV),
        *renames("""
            double_blocks.{i}.txt_attn_proj    transformer_blocks.{i}.attn.to_add_out
            double_blocks.{i}.txt_mlp.fc1      transformer_blocks.{i}.ff_context.net.0.proj
            double_blocks.{i}.txt_mlp.fc2      transformer_blocks.{i}.ff_context.net.2
            double_blocks.{i}.txt_mod.linear   transformer_blocks.{i}.norm1_context.linear
            double_blocks.{i}.txt_attn_q_norm  transformer_blocks.{i}.attn.norm_added_q
            double_blocks.{i}.txt_attn_k_norm  transformer_blocks.{i}.attn.norm_added_k
        """),
        # single blocks
        qkv("single_blocks.{i}.linear1", "single_transformer_blocks.{i}.attn",  # mlp_width_ratio 4
            extra=(("mlp", "4h", "single_transformer_blocks.{i}.proj_mlp"),), rows="7h"),  # FLUX.2's is (9h, h)
        *renames("""
            single_blocks.{i}.linear2            single_transformer_blocks.{i}.proj_out
            single_blocks.{i}.modulation.linear  single_transformer_blocks.{i}.norm.linear
            single_blocks.{i}.q_norm             single_transformer_blocks.{i}.attn.norm_q
            single_blocks.{i}.k_norm             single_transformer_blocks.{i}.attn.norm_k
        """),
        # the text token refiner
        *renames("""
            txt_in.input_embedder       context_embedder.proj_in
            txt_in.t_embedder.mlp.0     context_embedder.time_text_embed.timestep_embedder.linear_1
            txt_in.t_embedder.mlp.2     context_embedder.time_text_embed.timestep_embedder.linear_2
            txt_in.c_embedder.linear_1  context_embedder.time_text_embed.text_embedder.linear_1
            txt_in.c_embedder.linear_2  context_embedder.time_text_embed.text_embedder.linear_2
        """),
        qkv(f"{_REFINER}.self_attn_qkv", f"{_REFINER_D}.attn"),
        one(f"{_REFINER}.self_attn_proj", f"{_REFINER_D}.attn.to_out.0"),
        one(f"{_REFINER}.mlp.fc1", f"{_REFINER_D}.ff.net.0.proj"),
        one(f"{_REFINER}.mlp.fc2", f"{_REFINER_D}.ff.net.2"),
        one(f"{_REFINER}.adaLN_modulation.1", f"{_REFINER_D}.norm_out.linear"),
        one(f"{_REFINER}.norm1", f"{_REFINER_D}.norm1"),
        one(f"{_REFINER}.norm2", f"{_REFINER_D}.norm2"),
        # embedders and the final layer
        *renames("""
            img_in.proj          x_embedder.proj
            time_in.mlp.0        time_text_embed.timestep_embedder.linear_1
            time_in.mlp.2        time_text_embed.timestep_embedder.linear_2
            vector_in.in_layer   time_text_embed.text_embedder.linear_1
            vector_in.out_layer  time_text_embed.text_embedder.linear_2
            guidance_in.mlp.0    time_text_embed.guidance_embedder.linear_1
            guidance_in.mlp.2    time_text_embed.guidance_embedder.linear_2
            final_layer.linear   proj_out
        """),
        shift_scale("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ),
    # ComfyUI loads the checkpoint into its own module names (comfy/ldm/hunyuan_video/model.py: FLUX.1's
    # blocks, `MLPEmbedder` in_layer / out_layer) and its key map (comfy/lora.py) takes Tencent's block
    # names under `diffusion_model.` but only its own for the embedders, and only its own under
    # `lora_unet_`: files are written in those (musubi-tuner's Tencent spellings are read too)
    respell={"comfyui": _EMBEDDERS, "kohya": (*_EMBEDDERS, *_BLOCKS)},
    blocks={"double_blocks": 20, "single_blocks": 40, "transformer_blocks": 20, "single_transformer_blocks": 40,
            "txt_in": 2, "context_embedder": 2},
    base_layouts={
        "tencent": "double_blocks.0.img_attn_qkv.weight "
                   "(hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt)",
        "diffusers": "transformer_blocks.0.attn.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
