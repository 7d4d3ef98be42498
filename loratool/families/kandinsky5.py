"""Kandinsky 5 (Lite and Pro; T2V, I2V, T2I): Kandinsky5Transformer3DModel, text and visual blocks.

Kandinsky 5 was released in the layout diffusers keeps, and ComfyUI's model (`comfy/ldm/kandinsky5/model.py`)
has the same module names, so every relation is a rename and only the dialects' prefixes differ. Facts
from diffusers 0.42.1 `models/transformers/transformer_kandinsky.py` (Kandinsky5Transformer3DModel;
`KandinskyLoraLoaderMixin` loads LoRAs under `transformer.` with no converter for other dialects) and
ComfyUI's model above. The text blocks modulate with 6 chunks, the visual ones with 9 (self attention,
cross attention, feed forward); the feed-forward linears have no bias. Block counts: 32 visual blocks in
the Lite models, 60 in Pro; 2 text blocks in Lite, 4 in Pro.
"""

from __future__ import annotations

from loratool.families.model import Family, one

_QKVO = ("to_query", "to_key", "to_value", "out_layer")
_ATTN = tuple(f"self_attention.{p}" for p in _QKVO)
_TEXT = ("text_modulation.out_layer", *_ATTN, "feed_forward.in_layer", "feed_forward.out_layer")
_VISUAL = ("visual_modulation.out_layer", *_ATTN,
           *(f"cross_attention.{p}" for p in _QKVO),
           "feed_forward.in_layer", "feed_forward.out_layer")
_TOP = ("time_embeddings.in_layer", "time_embeddings.out_layer", "text_embeddings.in_layer",
        "pooled_text_embeddings.in_layer", "visual_embeddings.in_layer", "out_layer.modulation.out_layer",
        "out_layer.out_layer")

FAMILY = Family(
    name="kandinsky-5",
    title="Kandinsky 5",
    relations=(
        *(one(f"text_transformer_blocks.{{i}}.{m}", f"text_transformer_blocks.{{i}}.{m}") for m in _TEXT),
        *(one(f"visual_transformer_blocks.{{i}}.{m}", f"visual_transformer_blocks.{{i}}.{m}") for m in _VISUAL),
        *(one(m, m) for m in _TOP),
    ),
    blocks={"text_transformer_blocks": 4, "visual_transformer_blocks": 60},
    base_layouts={
        "comfyui": "visual_transformer_blocks.0.self_attention.to_query.weight (kandinsky5lite_*.safetensors; "
                   "ComfyUI: under model.diffusion_model.)",
        "diffusers": "visual_transformer_blocks.0.self_attention.to_query.weight "
                     "(transformer/diffusion_pytorch_model*.safetensors)",
    },
    original_layout="Kandinsky / ComfyUI single-file",
)
