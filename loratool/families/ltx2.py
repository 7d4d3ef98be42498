"""LTX-2 (audio and video): Lightricks' single-file layout and diffusers' LTX2VideoTransformer3DModel.

One transformer for two streams: every block has a video and an audio self attention (`attn1`,
`audio_attn1`), text cross attention (`attn2`, `audio_attn2`), feed forward (`ff`, `audio_ff`) and two
cross-modal attentions (`audio_to_video_attn`, `video_to_audio_attn`), with timestep embedders of its
own for each stream and for the cross-modal scale / shift and gates. Facts from diffusers 0.42.1
`loaders/lora_conversion_utils.py` (`_convert_non_diffusers_ltx2_lora_to_diffusers`: strips
`diffusion_model.`, renames `patchify_proj` / `audio_patchify_proj` = `proj_in` / `audio_proj_in`,
`adaln_single` / `audio_adaln_single` = `time_embed` / `audio_time_embed`, the four `av_ca_*_adaln_single`
embedders, the per-block cross-modal scale / shift tables and `q_norm` / `k_norm` = `norm_q` / `norm_k`),
`loaders/single_file_utils.py` (`convert_ltx2_transformer_to_diffusers`, the same renames for the
checkpoint) and `models/transformers/transformer_ltx2.py` (48 blocks). Every module is a rename.

Not in this table: the text connectors (`video_embeddings_connector`, `audio_embeddings_connector` and
`text_embedding_projection.aggregate_embed`), which diffusers keeps in another component
(`connectors`, LTX2TextConnectors) than the transformer; a file with them reports them unmatched.
LTX-Video 0.9 (ltx.py) has the video half's names: a file with only those fits both.
"""

from __future__ import annotations

from loratool.families.model import Family, one, renames

_ATTNS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
# original embedder -> diffusers embedder; each has emb.timestep_embedder.linear_1 / linear_2 and linear
_EMBEDDERS = {
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
}
_B = "transformer_blocks.{i}"

FAMILY = Family(
    name="ltx-2",
    title="LTX-2",
    relations=(
        *(one(f"{_B}.{a}.{p}", f"{_B}.{a}.{p}") for a in _ATTNS for p in ("to_q", "to_k", "to_v", "to_out.0")),
        *(one(f"{_B}.{a}.{o}_norm", f"{_B}.{a}.norm_{o}") for a in _ATTNS for o in ("q", "k")),
        *(one(f"{_B}.{f}.{p}", f"{_B}.{f}.{p}") for f in ("ff", "audio_ff") for p in ("net.0.proj", "net.2")),
        *(one(f"{_B}.{t}", f"{_B}.{t}") for t in ("scale_shift_table", "audio_scale_shift_table")),
        one(f"{_B}.scale_shift_table_a2v_ca_video", f"{_B}.video_a2v_cross_attn_scale_shift_table"),
        one(f"{_B}.scale_shift_table_a2v_ca_audio", f"{_B}.audio_a2v_cross_attn_scale_shift_table"),
        *renames("""
            patchify_proj        proj_in
            audio_patchify_proj  audio_proj_in
        """),
        *(one(f"{o}.{p}", f"{d}.{p}") for o, d in _EMBEDDERS.items()
          for p in ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear")),
        *(one(f"{c}.{p}", f"{c}.{p}") for c in ("caption_projection", "audio_caption_projection")
          for p in ("linear_1", "linear_2")),
        *(one(m, m) for m in ("proj_out", "audio_proj_out", "scale_shift_table", "audio_scale_shift_table")),
    ),
    blocks={"transformer_blocks": 48},
    base_layouts={
        "lightricks": "transformer_blocks.0.audio_attn1.to_q.weight (ltx-2-19b-*.safetensors; ComfyUI: under "
                      "model.diffusion_model.)",
        "diffusers": "transformer_blocks.0.audio_attn1.to_q.weight (transformer/diffusion_pytorch_model*.safetensors)",
    },
    original_layout="Lightricks / ComfyUI single-file",
)
