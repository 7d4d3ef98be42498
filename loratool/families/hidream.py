"""HiDream-I1 (Full, Dev, Fast) and HiDream-E1: HiDreamImageTransformer2DModel, a dual-stream then
single-stream transformer whose feed-forwards are mixtures of experts.

HiDream was released in diffusers' layout and ComfyUI (`comfy/ldm/hidream/model.py`) keeps the same
module names, so the original and diffusers sides are the same paths, as for Qwen-Image: every
relation is a rename and only the dialects' prefixes differ. Facts from diffusers 0.42
`models/transformers/transformer_hidream_image.py` and `loaders/lora_conversion_utils.py`
(`_convert_non_diffusers_hidream_lora_to_diffusers`: `diffusion_model.` -> `transformer.`, nothing
renamed): 16 double-stream and 32 single-stream blocks, 4 routed experts and one shared expert per
image feed-forward (`ff_i`; SwiGLU `w1` / `w2` / `w3`), a plain SwiGLU `ff_t` for the text stream of
double blocks, the text attention's `*_t` projections, 48 Llama layers plus T5 in `caption_projection`.
The experts' router (`ff_i.gate`) is a bare parameter, not a linear, and is not listed.
"""

from __future__ import annotations

from loratool.families.model import Family, one

_EXPERTS = 4
_FF = tuple(f"{ff}.{w}" for ff in ("ff_i.shared_experts", *(f"ff_i.experts.{e}" for e in range(_EXPERTS)))
            for w in ("w1", "w2", "w3"))
_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out")
_DOUBLE = ("adaLN_modulation.1", *_ATTN, "attn1.to_q_t", "attn1.to_k_t", "attn1.to_v_t", "attn1.to_out_t", *_FF,
           "ff_t.w1", "ff_t.w2", "ff_t.w3")
_SINGLE = ("adaLN_modulation.1", *_ATTN, *_FF)
_TOP = ("t_embedder.timestep_embedder.linear_1", "t_embedder.timestep_embedder.linear_2",
        "p_embedder.pooled_embedder.linear_1", "p_embedder.pooled_embedder.linear_2", "x_embedder.proj",
        "final_layer.linear", "final_layer.adaLN_modulation.1", "caption_projection.{i}.linear")


def _same(path: str) -> tuple[str, str]:
    return path, path


FAMILY = Family(
    name="hidream",
    title="HiDream",
    relations=(
        *(one(*_same(f"double_stream_blocks.{{i}}.block.{m}")) for m in _DOUBLE),
        *(one(*_same(f"single_stream_blocks.{{i}}.block.{m}")) for m in _SINGLE),
        *(one(*_same(m)) for m in _TOP),
    ),
    blocks={"double_stream_blocks": 16, "single_stream_blocks": 32, "caption_projection": 49},
    base_layouts={
        "comfyui": "double_stream_blocks.0.block.attn1.to_q.weight (hidream_i1_full_fp16.safetensors; ComfyUI: "
                   "under model.diffusion_model.)",
        "diffusers": "double_stream_blocks.0.block.attn1.to_q.weight "
                     "(transformer/diffusion_pytorch_model*.safetensors)",
    },
)
