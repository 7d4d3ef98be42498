"""kohya sd-scripts: one .safetensors with `<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`.

Names are module paths with dots replaced by underscores under a prefix (`lora_unet_`, `lora_te_`,
`lora_te1_`..`lora_te3_`); alpha is a 0-d tensor per module (missing: alpha = rank); DoRA magnitude
is `.dora_scale`; header metadata holds `ss_*` training facts and `modelspec.*`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import IncompatibleError
from loratool.formats import lycoris
from loratool.formats._common import (
    Findings,
    RawModule,
    alpha_missing,
    build_module,
    group_tensors,
    split_by_suffix,
)
from loratool.formats.names import KOHYA_PREFIX_OF, component_of_kohya_prefix, split_kohya_prefix
from loratool.formats.registry import Capabilities, Format
from loratool.formats.tensorfile import TensorFile

_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    (".dora_scale", "magnitude"),
    (".diff_b", "bias"),  # ComfyUI / LyCORIS: the module's bias delta, added unscaled
)


def split_key(key: str) -> tuple[str, str] | None:
    return split_by_suffix(key, _SUFFIXES)


def looks_like(keys: list[str]) -> bool:
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys) or lycoris.looks_like(keys)


def from_tensors(tf: TensorFile, findings: Findings) -> Adapter:
    lyco_names = lycoris.partition(list(tf.tensors))
    lyco, lyco_left = lycoris.read_modules(tf.tensors, lyco_names, findings, tf.path)
    plain = TensorFile(tf.path, {k: v for k, v in tf.tensors.items()
                                 if (p := lycoris.split_key(k)) is None or p[0] not in lyco_names}, tf.metadata)
    raw, unsupported = group_tensors(plain, split_key, findings)
    unsupported = [*unsupported, *lyco_left]
    modules: dict[str, LoraModule] = {}
    implied: list[str] = []
    for name, rm in raw.items():
        alpha = _alpha(rm, name, tf, findings) if rm.alpha is not None else None
        if rm.alpha is None and rm.down is not None and rm.up is not None:
            implied.append(name)
        module = build_module(
            name, rm, alpha=alpha, alpha_source="tensor", rslora=False, fan_in_fan_out=False,
            findings=findings, where=tf.path,
        )
        if module is not None and module.bias is not None:
            if tuple(module.bias.shape) != (module.out_features,):
                findings.error("bad-shape", name, f"{tf.path}: '{name}.diff_b' has shape {module.bias.shape} but "
                               f"the module has {module.out_features} outputs")
                continue
            module = module.with_(bias_scaled=False)
        if module is not None:
            modules[name] = module
    alpha_missing(findings, tf.path, implied, ".alpha tensor")
    meta = tf.metadata
    base_model = meta.get("ss_sd_model_name") or None  # modelspec.architecture names a kind of model, not one
    return Adapter(
        modules=modules, source_format="kohya", metadata=meta, base_model=base_model,
        unsupported=unsupported, path=tf.path, files=[tf.path], lycoris=lyco,
    )


def _alpha(rm: RawModule, name: str, tf: TensorFile, findings: Findings) -> float | None:
    assert rm.alpha is not None
    if rm.alpha.numel != 1:
        findings.error("bad-shape", name, f"{tf.path}: '{name}.alpha' has shape {rm.alpha.shape}, expected a scalar")
        return None
    return rm.alpha.scalar()


# ---------------------------------------------------------------------------------------------
# name recovery: kohya names lost their dots


# Module-path segments the naming rules know (diffusers U-Net / DiT, original SD (SGM) U-Net, CLIP
# text encoders, Llama-style LLMs). A stem is placed only when it splits into these words and
# numbers in exactly one way; words that would make common names ambiguous are left out on
# purpose (`out`: proj_out = proj.out?; `linear`: linear_1 = linear.1?; `proj_mlp` = proj.mlp?; T5's single letters
# `q`, `k`, `v`, `o`: q_proj = q.proj?).
SEGMENTS: frozenset[str] = frozenset({
    # diffusers U-Net
    "down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "transformer_blocks", "attn1", "attn2",
    "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "ff", "net", "proj", "norm", "norm1", "norm2",
    "norm3", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers", "upsamplers", "conv", "conv_in",
    "conv_out", "time_embedding", "linear_1", "linear_2", "add_embedding",
    # diffusers DiT (SD3, Flux)
    "single_transformer_blocks", "attn", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context",
    "norm1_context", "x_embedder", "context_embedder",
    # original SD / SDXL U-Net (single-file checkpoints)
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
    # CLIP text encoders
    "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", "fc1",
    "fc2", "embeddings", "token_embedding", "position_embedding", "text_projection",
    # Llama-style LLMs
    "model", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head",
})


def restore_dots(stem: str) -> str | None:
    """The dotted module path a kohya stem stands for, when the naming rules allow exactly one.

    Every underscore-separated part must belong to a SEGMENTS word or be a number; the stem is
    placed only when there is exactly one way to split it (`down_blocks_0_attentions_0_proj_in` ->
    `down_blocks.0.attentions.0.proj_in`). Otherwise None.
    """
    tokens = stem.split("_")
    n = len(tokens)
    # ways[i] = (number of splittings of tokens[i:], capped at 2; one such splitting)
    none: list[str] = []
    ways: list[tuple[int, list[str]]] = [(0, none)] * n + [(1, none)]
    for i in range(n - 1, -1, -1):
        count, first = 0, none
        for j in range(i + 1, n + 1):
            word = "_".join(tokens[i:j])
            if ways[j][0] and (word in SEGMENTS or (j == i + 1 and word.isdigit())):
                if count == 0:
                    first = [word, *ways[j][1]]
                count += ways[j][0]
        ways[i] = (min(count, 2), first)
    return ".".join(ways[0][1]) if ways[0][0] == 1 else None


@dataclass(frozen=True)
class Placement:
    """Where a kohya-named module lives once its dots are back.

    Attributes:
        component: the diffusers component its kohya prefix names (None for an unknown prefix).
        path: with a base: the matched base key without `.weight` (container prefix included, e.g.
            `model.diffusion_model.input_blocks.4.1.proj_in`); else the path the naming rules give,
            inside the component (`down_blocks.0.attentions.0.proj_in`).
        by: "base" or "rules".
    """

    component: str | None
    path: str
    by: str


def place(name: str, base_key: str | None = None, paths: dict[str, str] | None = None) -> Placement | None:
    """Recover a kohya name's module path: from the base key it matched, else from the paths the
    file recorded (module_paths), else by the naming rules.

    Returns None when the rules cannot place it unambiguously (the caller lists such names).
    """
    parts = split_kohya_prefix(name)
    component = component_of_kohya_prefix(parts[0]) if parts else None
    if base_key is not None:
        return Placement(component, base_key.removesuffix(".weight"), "base")
    if paths and name in paths:
        return Placement(component, paths[name], "metadata")
    if parts is None:
        return None
    path = restore_dots(parts[1])
    return Placement(component, path, "rules") if path else None


# ---------------------------------------------------------------------------------------------
# writing


# U-Net blocks only SD1.x / SD2.x have attention in (SDXL's down_blocks.0 and up_blocks.3 are plain
# resnets); a diffusers SD1/2 pipeline has one text encoder, which sd-scripts names `lora_te_`, not
# SDXL's `lora_te1_`
_SD1_ONLY = re.compile(r"(^|\.)unet\.(down_blocks\.0|up_blocks\.3)\.attentions\.")


def is_sd1_unet(names: Iterable[str]) -> bool:
    """Whether module names show an SD1.x/2.x U-Net (and no second text encoder)."""
    names = list(names)
    return (any(_SD1_ONLY.search(n) for n in names)
            and not any(n.startswith(("text_encoder_2.", "text_encoder_3.")) for n in names))


def kohya_name(name: str, *, sd1: bool = False) -> str:
    """The kohya key stem for a module name: stored names stay; dotted names get underscores.

    A known container or component prefix (`model.diffusion_model.`, `conditioner.embedders.0.
    transformer.`, `unet.`, `text_encoder.`, ...) becomes its kohya prefix (names.KOHYA_PREFIX_OF);
    anything else goes under `lora_unet_` whole. With `sd1` (is_sd1_unet), `text_encoder.` is
    SD1/2's only text encoder: `lora_te_`.
    """
    if "." not in name:
        return name
    if sd1 and name.startswith("text_encoder."):
        return "lora_te_" + name[len("text_encoder."):].replace(".", "_")
    for container, prefix in KOHYA_PREFIX_OF:
        if name.startswith(container):
            return prefix + name[len(container):].replace(".", "_")
    return "lora_unet_" + name.replace(".", "_")


_FLOAT32_MAX = 3.4028234663852886e38


# header metadata: JSON {kohya stem: dotted module path} for every module written from a dotted name.
# The stem lost the dots (and `transformer.` of BLOOM's `transformer.h.0.self_attention.query_key_value`
# became `lora_unet_`), so no rule can give the path back for every model family; the file keeps it.
MODULE_PATHS_KEY = "loratool.module_paths"


def module_paths(metadata: dict[str, str]) -> dict[str, str]:
    """The stem -> module path map a kohya file written by loratool records ({} when absent or bad)."""
    try:
        data = json.loads(metadata.get(MODULE_PATHS_KEY) or "{}")
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def paths_metadata(paths: dict[str, str]) -> dict[str, str]:
    """The header entry recording {stem: dotted path} for the stems whose path the naming rules
    would not give back ({} when there is nothing to record)."""
    kept = {stem: path for stem, path in paths.items() if not recoverable(stem, path)}
    return {MODULE_PATHS_KEY: json.dumps(kept, sort_keys=True)} if kept else {}


def recoverable(stem: str, path: str) -> bool:
    """Whether the naming rules turn `stem` back into `path`: the prefix stood for no container
    (lora_unet_ only) or for the component it names (`unet.`, `text_encoder.`, ...), and the rest
    splits in exactly one way."""
    parts = split_kohya_prefix(stem)
    if parts is None:
        return False
    component = component_of_kohya_prefix(parts[0])
    rest = restore_dots(parts[1])
    return rest is not None and (path == f"{component}.{rest}" or (path == rest and parts[0] == "lora_unet_"))


def kohya_alpha(m: LoraModule) -> float:
    """The alpha to store: kohya scale is always alpha / r, so an rslora module's alpha is converted."""
    return m.scale * m.rank if m.rslora else m.alpha


def state_dict(adapter: Adapter, stem_of: Any = None) -> dict[str, Any]:
    """The tensors of a kohya file; `stem_of(name)` gives a module's key stem (default kohya_name)."""
    import torch

    stem_of = stem_of or kohya_name
    out: dict[str, Any] = {}
    stems: dict[str, str] = {}
    for m in adapter.modules.values():
        stem = stem_of(m.name)
        if stem in stems:
            raise IncompatibleError(f"modules '{stems[stem]}' and '{m.name}' have the same kohya name '{stem}'",
                                    hint="write PEFT instead (--format peft), or leave one of them out")
        stems[stem] = m.name
        alpha = kohya_alpha(m)
        if not abs(alpha) <= _FLOAT32_MAX:
            raise IncompatibleError(
                f"module '{m.name}': alpha {alpha:.6g} does not fit kohya's float32 .alpha tensor "
                f"(largest {_FLOAT32_MAX:.6g}); the file would hold an infinite scale",
                hint="use a smaller --factor / --alpha, or write PEFT (--format peft), whose config holds any alpha",
            )
        out[stem + ".lora_down.weight"] = m.down.load()
        out[stem + ".lora_up.weight"] = m.up.load()
        # alpha stays float32 whatever the weights are: a bf16 alpha rounds the scale (kohya bug)
        out[stem + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if m.magnitude is not None:
            mag = m.magnitude.load()
            ones = [1] * (len(m.up.shape) - 2)  # (out, 1[, 1, 1]) per output row; (1, in[, 1, 1]) per input column
            out[stem + ".dora_scale"] = (mag.reshape(m.out_features, 1, *ones) if m.dora_axis == "out"
                                         else mag.reshape(1, m.in_features, *ones))
        if m.bias is not None:  # ComfyUI's .diff_b: the bias delta as it is added (unscaled)
            bias = m.bias.load()
            out[stem + ".diff_b"] = bias if m.bias_scale == 1.0 else (bias.float() * m.bias_scale).to(bias.dtype)
    for lm in adapter.lycoris.values():
        if stem_of is kohya_name and lm.parameter:
            # ComfyUI maps lora_unet_ names to `.weight` parameters only: the diff would be dropped
            raise IncompatibleError(
                f"{adapter.path}: '{lm.keys[0] if lm.keys else lm.name}' is the full diff of a parameter not called "
                "weight (lightx2v's .diff_m), which kohya (lora_unet_) names cannot address in ComfyUI's key map",
                hint="convert with --to comfyui, which writes it as '<block>.modulation.diff' (ComfyUI loads it)")
        stem = stem_of(lm.name)
        if lm.algo not in _RAW_ROLES or stem + _RAW_ROLES[lm.algo][0][1] in out:
            raise ValueError(f"LyCORIS module {lm.name} ({lm.algo}) cannot be written as kohya diffs")
        for role, suffix in _RAW_ROLES[lm.algo]:
            ref = lm.bias if role == "bias" else lm.tensors.get(role)
            if ref is not None:
                out[stem + suffix] = ref.load()
    return out


# LyCORIS modules the kohya writer keeps as they are (ComfyUI reads them): role -> key suffix
_RAW_ROLES: dict[str, tuple[tuple[str, str], ...]] = {
    "full": (("diff", ".diff"), ("bias", ".diff_b")),
    "norm": (("w_norm", ".w_norm"), ("bias", ".b_norm")),
    "bias": (("bias", ".diff_b"),),
}


def write_comfyui(adapter: Adapter, out_file: Path, metadata: dict[str, str]) -> None:
    """Write `adapter` with its module names as they are (ComfyUI / BFL: `diffusion_model.double_blocks.0.
    img_attn.qkv.lora_down.weight`), kohya suffixes and float32 alphas; a BFL FLUX.1 control LoRA in
    ComfyUI's own spelling of it (control_state_dict)."""
    if adapter.reshapes:
        from loratool.io.writers import save_tensors

        save_tensors(out_file, control_state_dict(adapter), dict(metadata))
        return
    write(adapter, out_file, metadata, stem_of=lambda name: name)


# ComfyUI's spelling of a BFL FLUX.1 control LoRA, as comfy/lora_convert.py convert_lora_bfl_control
# (comfyanonymous/ComfyUI at ee9834b8ca0d339c2bc0be3cf6ea8db02bc698df) writes it: every BFL key under
# `diffusion_model.`, `.lora_B.bias` -> `.diff_b`, `_norm.scale` -> `_norm.scale.set_weight`, and
# `<module>.reshape_weight` an integer tensor of the module's new base shape. Read back in
# formats.from_comfy_control.
COMFY_CONTROL_PREFIX = "diffusion_model."
COMFY_CONTROL_SUFFIXES = ((".lora_B.bias", ".diff_b"), ("_norm.scale", "_norm.scale.set_weight"))


def control_state_dict(adapter: Adapter) -> dict[str, Any]:
    """The tensors of a control LoRA (scales 1: check_writable) in ComfyUI's spelling of it."""
    import torch

    out: dict[str, Any] = {}
    for m in adapter.modules.values():
        key = COMFY_CONTROL_PREFIX + m.name
        out[key + ".lora_A.weight"] = m.down.load()
        out[key + ".lora_B.weight"] = m.up.load()
        if m.bias is not None:
            out[key + ".diff_b"] = m.bias.load()
    for name, ref in adapter.extras.items():
        stored = name + ".set_weight" if name.endswith("_norm.scale") else name
        out[COMFY_CONTROL_PREFIX + stored] = ref.load()
    for name, shape in adapter.reshapes.items():
        out[f"{COMFY_CONTROL_PREFIX}{name}.reshape_weight"] = torch.tensor(list(shape), dtype=torch.int64)
    return out


def write(adapter: Adapter, out_file: Path, metadata: dict[str, str], stem_of: Any = None) -> None:
    """Write `adapter` as one kohya .safetensors file at the (temporary) path `out_file`."""
    from loratool.io.writers import save_tensors

    meta = dict(adapter.metadata) if adapter.source_format == "kohya" else {}
    meta.setdefault("ss_network_module", "networks.lora")
    # kohya's network_dim / network_alpha describe linear and 1x1 conv modules; 3x3 convs have
    # their own conv_dim / conv_alpha in ss_network_args. All are recomputed from the modules
    # (kohya's resize records only the last module's alpha); "Dynamic" when they differ.
    conv3: list[LoraModule] = []
    lin: list[LoraModule] = []
    for m in adapter.modules.values():
        (conv3 if m.kind == "conv" and tuple(m.down.shape[2:]) != (1, 1) else lin).append(m)

    def one(values: set[float]) -> str:
        return _fmt(values.pop()) if len(values) == 1 else "Dynamic"

    if lin:
        # "Dynamic" set by the caller (dynamic resize) is kept
        if meta.get("ss_network_dim") != "Dynamic":
            meta["ss_network_dim"] = one({m.rank for m in lin})
        if meta.get("ss_network_alpha") != "Dynamic":
            meta["ss_network_alpha"] = one({kohya_alpha(m) for m in lin})
    args = _network_args(meta.get("ss_network_args"))
    if args is not None and (args or conv3):
        if conv3:
            args["conv_dim"] = one({m.rank for m in conv3})
            args["conv_alpha"] = one({kohya_alpha(m) for m in conv3})
        else:
            args.pop("conv_dim", None)
            args.pop("conv_alpha", None)
        meta["ss_network_args"] = json.dumps(args)
    stems = {kohya_name(m.name): m.name for m in adapter.modules.values()}
    paths = {stem: path for stem, path in module_paths(meta).items() if stem in stems}
    paths.update({stem: name for stem, name in stems.items() if "." in name})
    meta.pop(MODULE_PATHS_KEY, None)
    meta.update(paths_metadata(paths))
    meta.update(metadata)
    save_tensors(out_file, state_dict(adapter, stem_of), meta)


def _network_args(text: str | None) -> dict[str, Any] | None:
    """kohya's ss_network_args (a JSON object), {} when absent, None when it is not an object."""
    if text is None:
        return {}
    try:
        args = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested absurdly deep
        return None  # not ours to repair: kept as it is
    return args if isinstance(args, dict) else None


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else json.dumps(x)


FORMAT = Format(
    name="kohya",
    summary="kohya sd-scripts .safetensors (lora_down / lora_up / alpha per module)",
    naming="stem",
    capabilities=Capabilities(bias=True, dora=True, dora_in=True, diffs=True),  # `.diff_b`; `.dora_scale` either axis
    detect=lambda keys: 2 if looks_like(keys) else 0,
    read_file=from_tensors,
    write=write,
    paths_metadata=paths_metadata,
)

# ComfyUI's own LoRA key style for single-file (BFL) models: the model's module paths under
# `diffusion_model.` with kohya's suffixes. Read by the kohya reader (same suffixes); written only
# for a known model family (convert --to comfyui), whose table gives the paths.
COMFYUI_FORMAT = Format(
    name="comfyui",
    summary="ComfyUI / BFL single-file names (diffusion_model.<path>.lora_down / lora_up / alpha)",
    naming="path",
    capabilities=Capabilities(bias=True, extras=False, fan_in_fan_out=False, embedding=False, conv=True, dora=True,
                              dora_in=True, per_module_alpha=True, metadata=True, directory=False, diffs=True),
    detect=None,
    read_file=from_tensors,
    write=write_comfyui,
)
