"""HunyuanVideo 1.5: Tencent's single-file layout and diffusers' HunyuanVideo15Transformer3DModel.

HunyuanVideo 1.0's double blocks, token refiner, embedders and final layer (hunyuan_video.py, whose
relations this table takes, but `time_in`, which diffusers calls `time_embed` here),
54 double blocks and no single blocks; no pooled-text (`vector_in`) or
guidance embedder; two embedders of its own: the glyph ByT5 mapper (`byt5_in.fc1`..`fc3` =
diffusers' `context_embedder_2.linear_1`..`linear_3`) and the SigLIP projection (`vision_in.proj.1`,
`.3` = `image_embedder.linear_1`, `linear_2`). Facts from diffusers' `scripts/convert_hunyuan_video1_5_to_diffusers.py`
(`convert_hyvideo15_transformer_to_diffusers`) and 0.42.1 `models/transformers/transformer_hunyuan_video15.py`.

Tencent's 1.5 checkpoint stores q, k and v apart (`img_attn_q`, ...), but ComfyUI loads 1.5 into its
HunyuanVideo 1.0 model class (`HunyuanVideo15` subclasses `HunyuanVideo` in `comfy/model_base.py`),
whose attention is one fused `img_attn.qkv`, and its key map takes 1.0's names: so this table's
original side is 1.0's (fused `img_attn_qkv`), spelled for ComfyUI and kohya as 1.0 is
(`respell`). LoRAs naming the split
checkpoint modules (musubi-tuner's `lora_unet_double_blocks_0_img_attn_q`) are not read yet.
"""

from __future__ import annotations

from loratool.families import hunyuan_video
from loratool.families.model import Family, renames

_SHARED = ("double_blocks.", "txt_in.", "img_in.", "final_layer.")

FAMILY = Family(
    name="hunyuan-video-1.5",
    title="HunyuanVideo 1.5",
    relations=(
        *(r for r in hunyuan_video.FAMILY.relations if r.original.startswith(_SHARED)),
        # 1.0's timestep embedder is diffusers' time_text_embed.*, 1.5's time_embed.*
        *renames("""
            time_in.mlp.0     time_embed.timestep_embedder.linear_1
            time_in.mlp.2     time_embed.timestep_embedder.linear_2
            byt5_in.fc1       context_embedder_2.linear_1
            byt5_in.fc2       context_embedder_2.linear_2
            byt5_in.fc3       context_embedder_2.linear_3
            vision_in.proj.1  image_embedder.linear_1
            vision_in.proj.3  image_embedder.linear_2
        """),
    ),
    respell=hunyuan_video.FAMILY.respell,  # ComfyUI's names for 1.0's modules, as there
    blocks={"double_blocks": 54, "transformer_blocks": 54, "txt_in": 2, "context_embedder": 2},
    base_layouts={
        "tencent": "double_blocks.0.img_attn_q.weight (HunyuanVideo-1.5/transformer/<variant>/*.safetensors; "
                   "q, k, v apart: not a layout merge reads yet)",
        "diffusers": "transformer_blocks.0.attn.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
    original_layout=hunyuan_video.FAMILY.original_layout,
)
