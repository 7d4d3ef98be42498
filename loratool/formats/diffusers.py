"""diffusers: one .safetensors with PEFT-style keys under a component prefix.

`unet.<path>.lora_A.weight`, `transformer.<path>.lora_B.weight`, `text_encoder.<path>...`; legacy
`<path>.lora.down.weight` / `.lora.up.weight`, attention-processor `<attn>.processor.to_q_lora.down.weight`
and text-encoder `<path>.lora_linear_layer.up.weight`. Alpha: a `<path>.alpha` tensor, else the
header metadata `lora_adapter_metadata` (JSON with `<component>.lora_alpha`, `.r`, patterns), else
implied (= rank), as ai-toolkit files have it.

Writing: `<component>.<path>.lora_A.weight` / `.lora_B.weight` (`.lora_B.bias`, `.lora_magnitude_vector`),
and per component the LoRA config flat in `lora_adapter_metadata` (`"unet.r"`, `"unet.lora_alpha"`,
`"unet.rank_pattern"`, ...), as `pipeline.save_lora_weights` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, AlphaSource, LoraModule
from loratool.errors import FormatError, IncompatibleError
from loratool.formats._common import (
    Findings,
    HeaderConfig,
    alpha_missing,
    build_module,
    group_tensors,
    header_config,
    is_unsupported,
)
from loratool.formats.names import COMPONENTS, CONTAINERS, split_component
from loratool.formats.peft import PatternLookup
from loratool.formats.registry import Capabilities, Format
from loratool.formats.tensorfile import TensorFile

METADATA_KEY = "lora_adapter_metadata"

_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_magnitude_vector", "magnitude"),
    (".alpha", "alpha"),
)
# 2023 attention processors (`unet.save_attn_procs`): `<attn>.processor.to_q_lora.down.weight` holds
# the LoRA of `<attn>.to_q`; to_out's is that of `to_out.0` (diffusers' UNET_TO_DIFFUSERS)
_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0",
              "add_k_proj_lora": "add_k_proj", "add_v_proj_lora": "add_v_proj"}
# the text encoder's attention LoRA of the same vintage used those names for CLIP's projections
# (diffusers' DIFFUSERS_OLD_TO_PEFT: to_q_lora -> q_proj, to_out_lora -> out_proj)
_TEXT_PROCESSOR = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_LEGACY_ROLES = ((".down.weight", "down"), (".up.weight", "up"))


def split_key(key: str) -> tuple[str, str] | None:
    """'<component>.<path><suffix>' -> (module name with its component, role), or None.

    Legacy keys without a component are placed as diffusers' loaders place them: under
    `text_encoder.` when they start with `text_model.`, else under `unet.`.
    """
    name = role = None
    for suffix, r in _SUFFIXES:
        if key.endswith(suffix):
            name, role = key[: -len(suffix)], r
            break
    else:
        for suffix, r in _LEGACY_ROLES:
            if key.endswith(suffix):
                head, _, last = key[: -len(suffix)].rpartition(".")
                if last in _PROCESSOR and head:
                    text = ".processor" not in head and ".self_attn" in ("." + head)
                    head = head.removesuffix(".processor")
                    name, role = head + "." + (_TEXT_PROCESSOR if text else _PROCESSOR)[last], r
                break
    if name is None or role is None:
        return None
    name = name.replace(".processor.", ".")
    if name.split(".", 1)[0] not in COMPONENTS:
        if role == "alpha" or not _is_legacy(key):
            return name, role  # a modern key without a component: the caller decides (no guess here)
        name = ("text_encoder." if name.startswith("text_model.") else "unet.") + name
    return name, role


def _is_legacy(key: str) -> bool:
    return ".lora." in key or "_lora." in key or ".lora_linear_layer." in key


def looks_like(keys: list[str]) -> bool:
    lora = [k for k in keys if split_key(k) and not k.endswith(".alpha")]
    return bool(lora) and all(k.split(".", 1)[0] in COMPONENTS or _is_legacy(k) for k in lora)


def from_tensors(tf: TensorFile, findings: Findings) -> Adapter:
    raw, unsupported = group_tensors(tf, lambda k: None if is_unsupported(k) else split_key(k), findings)
    modules: dict[str, LoraModule] = {}
    configs: dict[str, tuple[HeaderConfig | None, PatternLookup]] = {}
    implied: list[str] = []
    for name, rm in raw.items():
        component, _, local = name.partition(".")
        if component not in configs:
            header = header_config(tf.metadata, component, tf.path, findings) if component in COMPONENTS else None
            cfg = header.config if header else {}
            pattern = cfg.get("alpha_pattern") or {}
            for fld, ok in (("lora_alpha", _is_num), ("alpha_pattern", lambda v: isinstance(v, dict)),
                            ("use_rslora", lambda v: isinstance(v, bool))):
                if fld in cfg and not ok(cfg[fld]):
                    findings.error("config-invalid", None,
                                   f"{tf.path}: header metadata ({header.origin if header else ''}) "
                                   f"'{component}.{fld}' has the wrong type: {cfg[fld]!r}", exc=FormatError)
                    cfg = {}
                    pattern = {}
            configs[component] = (HeaderConfig(cfg, header.origin) if header else None,
                                  PatternLookup(pattern if isinstance(pattern, dict) else {}))
        header, lookup = configs[component]
        cfg = header.config if header else {}
        alpha: float | None
        source: AlphaSource
        if rm.alpha is not None:
            alpha, source = rm.alpha.scalar(), "tensor"
        elif (pkey := lookup.key(local)) is not None and _is_num(cfg["alpha_pattern"][pkey]):
            alpha, source = float(cfg["alpha_pattern"][pkey]), "metadata"
        elif _is_num(cfg.get("lora_alpha")):
            alpha, source = float(cfg["lora_alpha"]), "metadata"
        else:
            alpha, source = None, "implied"
            if rm.down is not None and rm.up is not None:
                implied.append(name)
        module = build_module(
            name, rm, alpha=alpha, alpha_source=source, rslora=bool(cfg.get("use_rslora", False)),
            fan_in_fan_out=False, findings=findings, where=tf.path,
        )
        if module is not None:
            modules[name] = module
    alpha_missing(findings, tf.path, implied, "alpha tensor or header metadata")
    return Adapter(
        modules=modules, source_format="diffusers", metadata=tf.metadata, unsupported=unsupported,
        path=tf.path, files=[tf.path],
    )


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# placing module paths under a component


# top-level modules of a diffusers UNet2DConditionModel and of the diffusers DiT transformers
UNET_TOP = frozenset({
    "conv_in", "conv_out", "conv_norm_out", "time_proj", "time_embedding", "add_embedding", "add_time_proj",
    "encoder_hid_proj", "class_embedding", "down_blocks", "up_blocks", "mid_block",
})
DIT_TOP = frozenset({
    "transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder", "time_text_embed",
    "pos_embed", "proj_out", "norm_out", "caption_projection", "adaln_single", "patch_embed",
})
# top-level modules of layouts diffusers names differently (original SD/SDXL U-Net, SD3 MMDiT, Flux)
FOREIGN = "a block layout that diffusers names differently (not a rename)"
FOREIGN_TOP = frozenset({
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "joint_blocks", "double_blocks",
    "single_blocks",
})


def component_of_class(class_name: str | None) -> str | None:
    """The component a diffusers model class is loaded as (config.json `_class_name`), if known."""
    if not class_name:
        return None
    if "UNet" in class_name:
        return "unet"
    if "Transformer" in class_name:
        return "transformer"
    return None


def place(path: str, hint: str | None = None) -> tuple[str, str] | str:
    """The (component, path inside it) a module is stored under in a diffusers file, or why not.

    `path` is a module path, possibly under a component (`unet.`), or a single-file container
    (`model.diffusion_model.`, `conditioner.embedders.0.transformer.`, ...), which is replaced by
    its component. Otherwise the component is `hint` (from a kohya prefix or the base's class),
    and for U-Net / transformer paths the top-level module decides between the two. Paths in a
    layout diffusers names differently (original SD `input_blocks`, Flux `double_blocks`, ...)
    are refused: renaming them is not enough.

    Returns:
        (component, local path), or a one-line reason (str) why the path has no diffusers place.
    """
    head, _, rest = path.partition(".")
    explicit = head in COMPONENTS and bool(rest)
    component = hint
    if explicit:
        component, path = head, rest
    else:
        for container, comp in CONTAINERS:
            if path.startswith(container):
                component, path = comp, path[len(container):]
                break
    first = path.split(".", 1)[0]
    if first in FOREIGN_TOP:
        return f"'{first}.' is {FOREIGN}"
    if component in (None, "unet", "transformer"):
        if first in UNET_TOP or first in DIT_TOP:
            if not explicit:
                component = "unet" if first in UNET_TOP else "transformer"
            return str(component), path
        if component is None and first == "text_model":
            return "text_encoder", path
        if component is None:
            return "no diffusers component (unet., transformer., text_encoder., ...) follows from the name"
        return f"'{first}' is not a top-level module of a diffusers {component}"
    return component, path


# ---------------------------------------------------------------------------------------------
# writing

# the LoraConfig fields written per component (diffusers rebuilds a LoraConfig from them)
_CONFIG_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "use_dora",
                  "lora_bias", "fan_in_fan_out", "bias", "lora_dropout", "peft_type")


def state_and_metadata(adapter: Adapter) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors in diffusers key layout and the flat `lora_adapter_metadata` object.

    Raises:
        IncompatibleError: a module without a component prefix (what the format cannot hold at
            all was refused before, by registry.check_writable).
    """
    from loratool.formats.peft import build_config, module_tensors

    groups: dict[str, dict[str, LoraModule]] = {}
    for m in adapter.modules.values():
        parts = split_component(m.name)
        if parts is None:
            raise IncompatibleError(
                f"module '{m.name}' is under no diffusers component ({', '.join(c + '.' for c in COMPONENTS)})",
                hint="convert it with: loratool convert PATH --to diffusers --base BASE",
            )
        component, local = parts
        groups.setdefault(component, {})[local] = m.with_(name=local)
    tensors: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    for component, mods in groups.items():
        config, _ = build_config(Adapter(modules=mods, source_format="diffusers"))
        for local, m in mods.items():
            tensors.update(module_tensors(f"{component}.{local}", m))
        fields = {k: config[k] for k in _CONFIG_FIELDS}
        fields["init_lora_weights"] = True
        flat.update({f"{component}.{k}": v for k, v in fields.items()})
    return tensors, flat


def write(adapter: Adapter, out_file: Path, metadata: dict[str, str]) -> None:
    """Write `adapter` (module names under a component) as one diffusers .safetensors file."""
    from loratool.io.writers import save_tensors

    tensors, flat = state_and_metadata(adapter)
    meta = {"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True), **metadata}
    save_tensors(out_file, tensors, meta)


FORMAT = Format(
    name="diffusers",
    summary="diffusers LoRA .safetensors (lora_A / lora_B under unet., transformer., text_encoder., ...)",
    naming="component",
    capabilities=Capabilities(bias=True, dora=True),
    detect=lambda keys: 2 if looks_like(keys) else 0,
    read_file=from_tensors,
    write=write,
)
