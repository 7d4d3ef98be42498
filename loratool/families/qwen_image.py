"""Qwen-Image (and Qwen-Image-Edit): QwenImageTransformer2DModel, 60 dual-stream blocks.

Qwen-Image was released in diffusers' layout, and ComfyUI (`comfy/ldm/qwen_image/model.py`) and
musubi-tuner keep the same module names, so the original and diffusers sides are the same paths:
every relation is a rename and only the dialects' prefixes differ. Facts from diffusers
`loaders/lora_conversion_utils.py` (`_convert_non_diffusers_qwen_lora_to_diffusers`: strips
`diffusion_model.` / `lora_unet_`, re-dots the kohya names of exactly these modules), ComfyUI
`comfy/lora.py` (`model_lora_keys_unet` for QwenImage: `diffusion_model.<path>`, `transformer.<path>`,
the bare path, `lora_unet_<path with _>`) and musubi-tuner `networks/lora_qwen_image.py` (prefix
`lora_unet`, the `QwenImageTransformerBlock` linears; `img_mod` / `txt_mod` off by default).
q, k and v are separate linears everywhere; `norm_out.linear` holds (scale, shift) in ComfyUI and
diffusers alike; the attention's `norm_q` / `norm_k` / `norm_added_*` and `txt_norm` are norms.
"""

from __future__ import annotations

from loratool.families.model import Family, one

_BLOCK = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
    "txt_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
_TOP = (
    "img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear", "proj_out",
)

FAMILY = Family(
    name="qwen-image",
    title="Qwen-Image",
    relations=(
        *(one(f"transformer_blocks.{{i}}.{m}", f"transformer_blocks.{{i}}.{m}") for m in _BLOCK),
        *(one(m, m) for m in _TOP),
    ),
    blocks={"transformer_blocks": 60},
    base_layouts={
        "comfyui": "transformer_blocks.0.attn.to_q.weight (qwen_image_*.safetensors; ComfyUI: under "
                   "model.diffusion_model.)",
        "diffusers": "transformer_blocks.0.attn.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
