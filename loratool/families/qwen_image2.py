"""Qwen-Image 2.x (2.1): QwenImage21Transformer2DModel, single-stream blocks with a SwiGLU MLP.

Another architecture than Qwen-Image (qwen_image.py): text and image tokens share one sequence, so
a block has one attention (`to_q`, `to_k`, `to_v`, `to_out.0`; no `add_*_proj`) and one MLP, and
one modulation (`modulation.1`) serves every block. Facts from diffusers 0.42.1
`models/transformers/transformer_qwenimage21.py` (32 blocks) and `loaders/single_file_utils.py`
(`convert_qwen_image21_transformer_checkpoint_to_diffusers`): ComfyUI's checkpoint has diffusers'
names under `model.diffusion_model.` except the MLP, where ComfyUI fuses the SwiGLU gate and up
projections into one `img_mlp.gate_up` (gate rows first, then up) that diffusers keeps as
`img_mlp.gate_layer` and `img_mlp.proj`. The ComfyUI and kohya dialects name ComfyUI's side; a
diffusers LoRA's gate / up pair fuses exactly (stacked A, block-diagonal B) and a fused one splits
exactly (shared A). diffusers' `QwenImageLoraLoaderMixin` (which QwenImage21Pipeline uses) has no
converter for the fused name.
"""

from __future__ import annotations

from loratool.families.model import Family, Relation, one

_TOP = ("img_in", "txt_in.in_layer", "txt_in.out_layer", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.timestep_embedder.linear_2", "modulation.1", "norm_out.linear", "proj_out")

FAMILY = Family(
    name="qwen-image-2",
    title="Qwen-Image 2.x",
    relations=(
        *(one(f"transformer_blocks.{{i}}.attn.{m}", f"transformer_blocks.{{i}}.attn.{m}")
          for m in ("to_q", "to_k", "to_v", "to_out.0")),
        Relation("transformer_blocks.{i}.img_mlp.gate_up", (("gate", "half"), ("up", "half")),
                 (("transformer_blocks.{i}.img_mlp.gate_layer", ("gate",)),
                  ("transformer_blocks.{i}.img_mlp.proj", ("up",)))),
        one("transformer_blocks.{i}.img_mlp.out", "transformer_blocks.{i}.img_mlp.out"),
        *(one(m, m) for m in _TOP),
    ),
    blocks={"transformer_blocks": 32},
    base_layouts={
        "comfyui": "transformer_blocks.0.img_mlp.gate_up.weight (qwen_image_2*.safetensors; ComfyUI: under "
                   "model.diffusion_model.)",
        "diffusers": "transformer_blocks.0.img_mlp.gate_layer.weight "
                     "(transformer/diffusion_pytorch_model*.safetensors)",
    },
    original_layout="ComfyUI single-file",
)
