"""diffusers: one .safetensors with PEFT-style keys under a component prefix.

`unet.<path>.lora_A.weight`, `transformer.<path>.lora_B.weight`, `text_encoder.<path>...`; legacy
`<path>.lora.down.weight` / `.lora.up.weight`, attention-processor `<attn>.processor.to_q_lora.down.weight`
and text-encoder `<path>.lora_linear_layer.up.weight`. Alpha: a `<path>.alpha` tensor, else the
header metadata `lora_adapter_metadata` (JSON with `<component>.lora_alpha`, `.r`, patterns), else
implied (= rank), as ai-toolkit files have it.
"""

from __future__ import annotations

import json
from typing import Any

from loratool.adapter import Adapter, AlphaSource, LoraModule
from loratool.formats._common import Findings, TensorFile, build_module, group_tensors, is_unsupported
from loratool.formats.peft import pattern_key

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet")
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
