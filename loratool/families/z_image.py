"""Z-Image (Turbo, Base; Lumina2's NextDiT architecture): the single-file layout (ComfyUI's lumina2 model)
and diffusers' ZImageTransformer2DModel.

Facts from diffusers 0.42 `models/transformers/transformer_z_image.py`, `loaders/single_file_utils.py`
(`convert_z_image_transformer_checkpoint_to_diffusers`) and `loaders/lora_conversion_utils.py`
(`_convert_non_diffusers_z_image_lora_to_diffusers`): 30 main `layers`, 2 `noise_refiner` and 2
`context_refiner` blocks (the context refiner has no modulation), hidden 3840, n_kv_heads = n_heads.
The fused module is the attention's `qkv` (q, k, v, h rows each; diffusers `to_q` / `to_k` / `to_v`);
`attention.out` is `to_out.0`, the patch embedder and final layer sit under `all_x_embedder.2-1` /
`all_final_layer.2-1` (patch 2, frame patch 1); the SwiGLU `feed_forward.w1` / `w2` / `w3`, the
modulations and the embedders keep their names. The final `adaLN_modulation.1` is one scale (no
shift), renamed without a swap.
"""

from __future__ import annotations

from loratool.families.model import Family, one, qkv, renames

_LISTS = ("layers", "noise_refiner", "context_refiner")

FAMILY = Family(
    name="z-image",
    title="Z-Image",
    relations=(
        *(r for b in _LISTS for r in (
            qkv(f"{b}.{{i}}.attention.qkv", f"{b}.{{i}}.attention"),
            one(f"{b}.{{i}}.attention.out", f"{b}.{{i}}.attention.to_out.0"),
            *(one(f"{b}.{{i}}.feed_forward.{w}", f"{b}.{{i}}.feed_forward.{w}") for w in ("w1", "w2", "w3")),
            one(f"{b}.{{i}}.adaLN_modulation.0", f"{b}.{{i}}.adaLN_modulation.0"),
        )),
        *renames("""
            x_embedder                      all_x_embedder.2-1
            final_layer.linear              all_final_layer.2-1.linear
            final_layer.adaLN_modulation.1  all_final_layer.2-1.adaLN_modulation.1
            t_embedder.mlp.0                t_embedder.mlp.0
            t_embedder.mlp.2                t_embedder.mlp.2
            cap_embedder.1                  cap_embedder.1
        """),
    ),
    blocks={"layers": 30, "noise_refiner": 2, "context_refiner": 2},
    base_layouts={
        "comfyui": "layers.0.attention.qkv.weight (z_image_turbo_bf16.safetensors; ComfyUI: under "
                   "model.diffusion_model.)",
        "diffusers": "layers.0.attention.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
