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

from loratool.adapter import Adapter, AlphaSource, LoraModule, scale_for
from loratool.errors import IncompatibleError
from loratool.formats._common import (
    Findings,
    TensorFile,
    build_module,
    group_tensors,
    is_unsupported,
    lora_b_bias,
)
from loratool.formats.names import COMPONENTS, CONTAINERS, split_component
from loratool.formats.peft import pattern_key
from loratool.formats.registry import Capabilities, Format

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
_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            head, _, last = name.rpartition(".")
            if head.endswith(".processor") and last in _PROCESSOR:
                name = head[: -len(".processor")] + "." + _PROCESSOR[last]
            return name, role
    return None


def looks_like(keys: list[str]) -> bool:
    lora = [k for k in keys if split_key(k) and not k.endswith(".alpha")]
    return bool(lora) and all(k.split(".", 1)[0] in COMPONENTS or ".lora." in k or "_lora." in k for k in lora)


def component_config(metadata: dict[str, str], component: str) -> dict[str, Any]:
    """The LoRA config diffusers stored for one component (flat `comp.key` or nested)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, over-long integers, absurd nesting
        return {}
    if not isinstance(data, dict):
        return {}
    if isinstance(data.get(component), dict):
        return dict(data[component])
    prefix = component + "."
    return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


def from_tensors(tf: TensorFile, findings: Findings) -> Adapter:
    raw, unsupported = group_tensors(tf, lambda k: None if is_unsupported(k) else split_key(k), findings)
    modules: dict[str, LoraModule] = {}
    for name, rm in raw.items():
        component, _, local = name.partition(".")
        cfg = component_config(tf.metadata, component) if component in COMPONENTS else {}
        alpha: float | None
        source: AlphaSource
        if rm.alpha is not None:
            alpha, source = rm.alpha.scalar(), "tensor"
        elif (pkey := pattern_key(cfg.get("alpha_pattern") or {}, local)) is not None:
            alpha, source = float(cfg["alpha_pattern"][pkey]), "metadata"
        elif isinstance(cfg.get("lora_alpha"), (int, float)):
            alpha, source = float(cfg["lora_alpha"]), "metadata"
        else:
            alpha, source = None, "implied"
            if rm.down is not None and rm.up is not None:
                findings.warning(
                    "alpha-missing", name,
                    f"{tf.path}: module '{name}' has no alpha tensor or metadata; alpha is implied (= rank)",
                )
        module = build_module(
            name, rm, alpha=alpha, alpha_source=source, rslora=bool(cfg.get("use_rslora", False)),
            fan_in_fan_out=False, findings=findings, where=tf.path,
        )
        if module is not None:
            modules[name] = module
    return Adapter(
        modules=modules, source_format="diffusers", metadata=tf.metadata, unsupported=unsupported,
        path=tf.path, files=[tf.path],
    )


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
    from loratool.formats.peft import build_config

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
        config, alphas = build_config(Adapter(modules=mods, source_format="diffusers"))
        for local, m in mods.items():
            # the written alpha must reproduce the module's scale exactly
            assert abs(scale_for(alphas[local], m.rank, config["use_rslora"]) - m.scale) <= 1e-9 * max(1, abs(m.scale))
            key = f"{component}.{local}"
            tensors[key + ".lora_A.weight"] = m.down.load()
            tensors[key + ".lora_B.weight"] = m.up.load()
            if m.bias is not None:
                tensors[key + ".lora_B.bias"] = lora_b_bias(m)
            if m.magnitude is not None:
                tensors[key + ".lora_magnitude_vector"] = m.magnitude.load().reshape(-1)
        fields = {k: config[k] for k in _CONFIG_FIELDS}
        fields["init_lora_weights"] = True
        flat.update({f"{component}.{k}": v for k, v in fields.items()})
    return tensors, flat


def write(adapter: Adapter, out_file: Path, metadata: dict[str, str]) -> None:
    """Write `adapter` (module names under a component) as one diffusers .safetensors file."""
    from loratool.st import save_tensors

    tensors, flat = state_and_metadata(adapter)
    meta = {"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True), **metadata}
    save_tensors(out_file, tensors, meta)


FORMAT = Format(
    name="diffusers",
    summary="diffusers LoRA .safetensors (lora_A / lora_B under unet., transformer., text_encoder., ...)",
    naming="component",
    capabilities=Capabilities(bias=True, extras=False, fan_in_fan_out=False, embedding=False, conv=True, dora=True,
                              dora_axis="out", per_module_alpha=True, metadata=True, directory=False),
    detect=lambda keys: 2 if looks_like(keys) else 0,
    read_file=from_tensors,
    write=write,
)
