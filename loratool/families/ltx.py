"""LTX-Video (0.9.x, 2B and 13B): Lightricks' single-file layout and diffusers' LTXVideoTransformer3DModel.

Nearly a rename of nothing: the blocks have the same paths on both sides (`transformer_blocks.N.attn1.to_q`,
`ff.net.0.proj`), as diffusers' LoRA converter (`_convert_non_diffusers_ltxv_lora_to_diffusers`, which
only swaps the `diffusion_model.` prefix for `transformer.`) assumes. Its checkpoint converter
(`convert_ltx_transformer_checkpoint_to_diffusers`) and ComfyUI's `comfy/ldm/lightricks` model show
the few that differ: `patchify_proj` = `proj_in`, `adaln_single` = `time_embed`, the attention norms
`q_norm` / `k_norm` = `norm_q` / `norm_k`. 28 blocks in the 2B models, 48 in the 13B. LTX-2 (audio
and video) is another model, not this table.
"""

from __future__ import annotations

from loratool.families.model import Family, one, renames

_SAME = ("to_q", "to_k", "to_v", "to_out.0")

FAMILY = Family(
    name="ltx-video",
    title="LTX-Video",
    relations=(
        *(one(f"transformer_blocks.{{i}}.{a}.{p}", f"transformer_blocks.{{i}}.{a}.{p}")
          for a in ("attn1", "attn2") for p in _SAME),
        *(one(f"transformer_blocks.{{i}}.{a}.{o}_norm", f"transformer_blocks.{{i}}.{a}.norm_{o}")
          for a in ("attn1", "attn2") for o in ("q", "k")),
        *renames("""
            transformer_blocks.{i}.ff.net.0.proj         transformer_blocks.{i}.ff.net.0.proj
            transformer_blocks.{i}.ff.net.2              transformer_blocks.{i}.ff.net.2
            transformer_blocks.{i}.scale_shift_table     transformer_blocks.{i}.scale_shift_table
            patchify_proj                                proj_in
            adaln_single.emb.timestep_embedder.linear_1  time_embed.emb.timestep_embedder.linear_1
            adaln_single.emb.timestep_embedder.linear_2  time_embed.emb.timestep_embedder.linear_2
            adaln_single.linear                          time_embed.linear
            caption_projection.linear_1                  caption_projection.linear_1
            caption_projection.linear_2                  caption_projection.linear_2
            proj_out                                     proj_out
            scale_shift_table                            scale_shift_table
        """),
    ),
    blocks={"transformer_blocks": 48},
    base_layouts={
        "lightricks": "transformer_blocks.0.attn1.to_q.weight (ltx-video-2b-v0.9.safetensors; ComfyUI: under "
                      "model.diffusion_model.)",
        "diffusers": "transformer_blocks.0.attn1.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
)
