"""ComfyUI's LoRA key map, as data and small functions, for checking that a file loratool writes is
one ComfyUI loads whole ("lora key not loaded" for none of its keys).

Read (never copied) from ComfyUI's source:
- Comfy-Org/ComfyUI `comfy/lora.py` at 17358c8f73b581a0d22facc3c385822f09b8bfb1: `model_lora_keys_unet`
  (the generic rules for every model, then the per-model blocks: SD3, Flux, HunyuanVideo, QwenImage,
  LTXV, Kandinsky5, Lumina2, HiDream) and `load_lora` (which tensors of a prefix it takes);
- Comfy-Org/ComfyUI `comfy/weight_adapter/lora.py` at 6f98b150e065f1ffc788558574a887835068bd40 (the
  LoRA factor spellings it accepts);
- Comfy-Org/ComfyUI `comfy/utils.py` at 09708eae709a992a5684bed3595ce4d07e705b4e: `unet_to_diffusers`,
  `mmdit_to_diffusers`, `flux_to_diffusers`, `z_image_to_diffusers` (diffusers names -> ComfyUI's);
- Comfy-Org/ComfyUI `comfy/lora_convert.py` at 2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5 (BFL control
  LoRAs are renamed before the map is applied);
- comfyanonymous/ComfyUI `comfy/ldm/hunyuan_video/model.py` at c828fdcf0c11dff5cb204f50791e182a53d63d31
  (ComfyUI's own HunyuanVideo module names: FLUX.1's blocks, `MLPEmbedder` in_layer / out_layer).

`comfy_accepted_keys(model, base_keys)` gives LoRA key prefix -> the ComfyUI model key it patches, for
a model whose state dict (under `diffusion_model.`) holds `base_keys`; `not_loaded(model, lora_keys,
base_keys)` lists the keys of a LoRA file ComfyUI would warn about. Models: "flux", "hunyuan-video",
"wan", "qwen-image", "ltxv", "sd3", "sd1", "sdxl", "lumina2", "kandinsky5", "hidream" and "generic"
(the rules every model gets).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

DM = "diffusion_model."

# what load_lora / the weight adapters take after a key-map prefix x (x + suffix)
LORA_PAIRS = (  # (up, down) spellings, in the order LoRAAdapter.load tries them
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
OPTIONAL = (".alpha", ".dora_scale", ".lora_mid.weight", ".reshape_weight")
LOHA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2")
LOKR = (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
GLORA = (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")
DIFF = (".w_norm", ".b_norm", ".diff", ".diff_b", ".set_weight")


# ---------------------------------------------------------------------------------------------
# diffusers names -> ComfyUI names (comfy/utils.py), only the `.weight` entries the key map uses

def flux_to_diffusers(double: int, single: int) -> dict[str, str]:
    """Diffusers FluxTransformer2DModel module -> ComfyUI (BFL) module; q/k/v and proj_mlp go to
    the fused module ComfyUI slices."""
    m: dict[str, str] = {}
    for i in range(double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        m.update({f"{d}.attn.to_{x}": f"{b}.img_attn.qkv" for x in "qkv"})
        m.update({f"{d}.attn.add_{x}_proj": f"{b}.txt_attn.qkv" for x in "qkv"})
        for dn, cn in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                       ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                       ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                       ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                       ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
                       ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2")):
            m[f"{d}.{dn}"] = f"{b}.{cn}"
    for i in range(single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        m.update({f"{d}.attn.to_{x}": f"{b}.linear1" for x in "qkv"})
        m.update({f"{d}.proj_mlp": f"{b}.linear1", f"{d}.norm.linear": f"{b}.modulation.lin",
                  f"{d}.proj_out": f"{b}.linear2", f"{d}.attn.to_qkv_mlp_proj": f"{b}.linear1",
                  f"{d}.attn.to_out": f"{b}.linear2"})
    m.update({"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "norm_out.linear": "final_layer.adaLN_modulation.1", "controlnet_x_embedder": "pos_embed_input"})
    return m


def mmdit_to_diffusers(depth: int) -> dict[str, str]:
    """Diffusers SD3Transformer2DModel module -> ComfyUI (SAI MMDiT) module."""
    m: dict[str, str] = {}
    for i in range(depth):
        d, b = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        m.update({f"{d}.attn.to_{x}": f"{b}.x_block.attn.qkv" for x in "qkv"})
        m.update({f"{d}.attn.add_{x}_proj": f"{b}.context_block.attn.qkv" for x in "qkv"})
        m.update({f"{d}.attn2.to_{x}": f"{b}.x_block.attn2.qkv" for x in "qkv"})
        for dn, cn in (("norm1_context.linear", "context_block.adaLN_modulation.1"),
                       ("attn.to_add_out", "context_block.attn.proj"),
                       ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                       ("ff_context.net.2", "context_block.mlp.fc2"), ("norm1.linear", "x_block.adaLN_modulation.1"),
                       ("attn.to_out.0", "x_block.attn.proj"), ("attn2.to_out.0", "x_block.attn2.proj"),
                       ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2")):
            m[f"{d}.{dn}"] = f"{b}.{cn}"
    m.update({"context_embedder": "context_embedder", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "pos_embed.proj": "x_embedder.proj",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
              "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"})
    return m


_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
           "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_ATTENTION = ("proj_in", "proj_out", "norm")
_TRANSFORMER = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_UNET_BASIC = (("label_emb.0.0", "class_embedding.linear_1"), ("label_emb.0.2", "class_embedding.linear_2"),
               ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
               ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
               ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"))


def unet_to_diffusers(config: dict[str, Any]) -> dict[str, str]:
    """Diffusers UNet2DConditionModel module -> ComfyUI (LDM / SGM) module, for ComfyUI's unet_config
    keys `num_res_blocks` (per level), `transformer_depth` (per input block), `transformer_depth_output`
    (per output block, highest resolution first) and `transformer_depth_middle`."""
    res = list(config["num_res_blocks"])
    depth, depth_out = list(config["transformer_depth"]), list(config["transformer_depth_output"])
    levels = len(res)
    m: dict[str, str] = {}
    for x in range(levels):
        n = 1 + (res[x] + 1) * x
        for i in range(res[x]):
            m.update({f"down_blocks.{x}.resnets.{i}.{d}": f"input_blocks.{n}.0.{c}" for c, d in _RESNET.items()})
            t = depth.pop(0)
            if t:
                m.update({f"down_blocks.{x}.attentions.{i}.{b}": f"input_blocks.{n}.1.{b}" for b in _ATTENTION})
                for j in range(t):
                    m.update({f"down_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{b}":
                              f"input_blocks.{n}.1.transformer_blocks.{j}.{b}" for b in _TRANSFORMER})
            n += 1
        m[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    m.update({f"mid_block.attentions.0.{b}": f"middle_block.1.{b}" for b in _ATTENTION})
    for j in range(config["transformer_depth_middle"]):
        m.update({f"mid_block.attentions.0.transformer_blocks.{j}.{b}": f"middle_block.1.transformer_blocks.{j}.{b}"
                  for b in _TRANSFORMER})
    for i, n in enumerate((0, 2)):
        m.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{n}.{c}" for c, d in _RESNET.items()})
    res = res[::-1]
    for x in range(levels):
        n, count = (res[x] + 1) * x, res[x] + 1
        for i in range(count):
            c = 1
            m.update({f"up_blocks.{x}.resnets.{i}.{d}": f"output_blocks.{n}.0.{cn}" for cn, d in _RESNET.items()})
            t = depth_out.pop()
            if t:
                c += 1
                m.update({f"up_blocks.{x}.attentions.{i}.{b}": f"output_blocks.{n}.1.{b}" for b in _ATTENTION})
                for j in range(t):
                    m.update({f"up_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{b}":
                              f"output_blocks.{n}.1.transformer_blocks.{j}.{b}" for b in _TRANSFORMER})
            if i == count - 1:
                m[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    m.update({d: c for c, d in _UNET_BASIC})
    return m


# ---------------------------------------------------------------------------------------------
# ComfyUI's own module names where they are not the checkpoint's

def hunyuan_video_modules(double: int, single: int, refiner: int) -> list[str]:
    """The linear modules of ComfyUI's HunyuanVideo (comfy/ldm/hunyuan_video/model.py: FLUX.1's
    double / single blocks, `MLPEmbedder`s with in_layer / out_layer, the token refiner's
    `self_attn.qkv` / `mlp.0`), which ComfyUI renames Tencent's checkpoint into when it loads it."""
    mods: list[str] = []
    for i in range(double):
        for s in ("img", "txt"):
            mods += [f"double_blocks.{i}.{s}_{p}" for p in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    for i in range(single):
        mods += [f"single_blocks.{i}.{p}" for p in ("linear1", "linear2", "modulation.lin")]
    for j in range(refiner):
        r = f"txt_in.individual_token_refiner.blocks.{j}"
        mods += [f"{r}.{p}" for p in ("self_attn.qkv", "self_attn.proj", "mlp.0", "mlp.2", "adaLN_modulation.1")]
    mods += ["txt_in.input_embedder", "txt_in.t_embedder.in_layer", "txt_in.t_embedder.out_layer",
             "txt_in.c_embedder.in_layer", "txt_in.c_embedder.out_layer", "img_in.proj",
             "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
             "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    return mods


# ---------------------------------------------------------------------------------------------
# the key map

def _weights(base_keys: Iterable[str]) -> list[str]:
    """ComfyUI model keys under `diffusion_model.` (added where the caller left it off)."""
    return [k if k.startswith(DM) else DM + k for k in base_keys]


def _blocks(keys: list[str], head: str) -> int:
    idx = {int(k[len(DM + head):].split(".")[0]) for k in keys if k.startswith(DM + head)}
    return max(idx) + 1 if idx else 0


def comfy_accepted_keys(model: str, base_keys: Iterable[str], *,
                        unet_config: dict[str, Any] | None = None) -> dict[str, str]:
    """LoRA key prefix -> ComfyUI model key, as `model_lora_keys_unet` builds it for a model of kind
    `model` whose diffusion-model state dict holds `base_keys` (`.weight` / `.bias` keys, with or
    without `diffusion_model.`). `unet_config` (sd1 / sdxl): ComfyUI's unet_config, for the
    diffusers-named rules."""
    keys = _weights(base_keys)
    have = set(keys)
    out: dict[str, str] = {}
    weights = [k for k in keys if k.endswith(".weight")]
    # every model: `lora_unet_` + the path with dots as underscores, and the bare ComfyUI key
    for k in keys:
        if k.endswith(".weight"):
            path = k[len(DM):-len(".weight")]
            out["lora_unet_" + path.replace(".", "_")] = k
            out[k[:-len(".weight")]] = k
        else:
            out[k] = k

    def from_diffusers(mapping: dict[str, str], forms: Iterable[str]) -> None:
        for d, c in mapping.items():
            target = DM + c + ".weight"
            if target not in have:
                continue
            for form in forms:
                out[form.format(d=d, u=d.replace(".", "_"))] = target

    if model in ("sd1", "sdxl") and unet_config is not None:
        for d, c in unet_to_diffusers(unet_config).items():
            target = DM + c + ".weight"
            if target not in have:
                continue
            out["lora_unet_" + d.replace(".", "_")] = target
            out["lycoris_" + d.replace(".", "_")] = target
            proc = d.replace(".to_", ".processor.to_")
            proc = proc[:-2] if proc.endswith(".to_out.0") else proc
            out[proc] = out["unet." + proc] = target
    if model == "sd3":
        from_diffusers(mmdit_to_diffusers(_blocks(keys, "joint_blocks.")),
                       ("transformer.{d}", "base_model.model.{d}", "lora_transformer_{u}", "lycoris_{u}"))
    if model == "flux":
        from_diffusers(flux_to_diffusers(_blocks(keys, "double_blocks."), _blocks(keys, "single_blocks.")),
                       ("transformer.{d}", "lycoris_{u}", "lora_transformer_{u}", "{d}"))
        for k in weights:
            if ".linear1." in k:
                out[k.replace(".linear1.weight", ".linear1_qkv")] = k
    if model == "hunyuan-video":
        for k in weights:
            path = k[len(DM):-len(".weight")] + "."
            for a, b in (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                         ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear.")):
                path = path.replace(a, b)
            out["transformer." + path[:-1]] = out[DM + path[:-1]] = k
    if model == "hidream":
        for k in weights:
            path = k[len(DM):-len(".weight")]
            out["lycoris_" + path.replace(".", "_")] = out["transformer." + path] = k
    if model == "qwen-image":
        for k in weights:
            path = k[len(DM):-len(".weight")]
            targets = [path]
            if path.endswith(".img_mlp.gate_up"):  # Qwen-Image 2.x: LoRAs address the two halves
                targets = [path.replace(".gate_up", ".gate_layer"), path.replace(".gate_up", ".proj")]
            for p in targets:
                out[p] = out["transformer." + p] = out["lycoris_" + p.replace(".", "_")] = k
    if model in ("kandinsky5", "ltxv"):
        for k in weights:
            path = k[len(DM):-len(".weight")]
            out[path] = k
            if model == "kandinsky5":
                out["transformer." + path] = k
    return out


def not_loaded(model: str, lora_keys: Iterable[str], base_keys: Iterable[str], *,
               unet_config: dict[str, Any] | None = None) -> list[str]:
    """The keys of a LoRA file ComfyUI's `load_lora` leaves unloaded ("lora key not loaded") on a
    model of kind `model` holding `base_keys`: keys no key-map prefix + known suffix accounts for."""
    accepted = comfy_accepted_keys(model, base_keys, unet_config=unet_config)
    lora = set(lora_keys)
    loaded: set[str] = set()
    for x in accepted:
        for up, down in LORA_PAIRS:
            if x + up in lora:
                loaded |= {x + up, x + down} & lora
                loaded |= {x + s for s in OPTIONAL} & lora
                break
        else:
            if x + ".hada_w1_a" in lora:
                loaded |= {x + s for s in LOHA} & lora
            if any(x + s in lora for s in (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a")):
                loaded |= {x + s for s in LOKR} & lora
            if x + ".a1.weight" in lora:
                loaded |= {x + s for s in GLORA} & lora
            if loaded & {x + s for s in LOHA + LOKR + GLORA}:
                loaded |= {x + s for s in (".alpha", ".dora_scale")} & lora
        loaded |= {x + s for s in DIFF} & lora
        if x + ".alpha" in lora and x + ".alpha" not in loaded:
            loaded.add(x + ".alpha")  # load_lora reads alpha for any mapped prefix
        if x + ".dora_scale" in lora:
            loaded.add(x + ".dora_scale")
    return sorted(lora - loaded)
