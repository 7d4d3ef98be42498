"""kohya sd-scripts: one .safetensors with `<name>.lora_down.weight` / `.lora_up.weight` / `.alpha`.

Names are module paths with dots replaced by underscores under a prefix (`lora_unet_`, `lora_te_`,
`lora_te1_`..`lora_te3_`); alpha is a 0-d tensor per module (missing: alpha = rank); DoRA magnitude
is `.dora_scale`; header metadata holds `ss_*` training facts and `modelspec.*`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.formats._common import Findings, RawModule, TensorFile, build_module, group_tensors

PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lycoris_", "lora_transformer_")

_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    (".dora_scale", "magnitude"),
)


def split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def looks_like(keys: list[str]) -> bool:
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)


def from_tensors(tf: TensorFile, findings: Findings) -> Adapter:
    raw, unsupported = group_tensors(tf, split_key, findings)
    modules: dict[str, LoraModule] = {}
    for name, rm in raw.items():
        alpha = _alpha(rm, name, tf, findings) if rm.alpha is not None else None
        if rm.alpha is None and rm.down is not None and rm.up is not None:
            findings.warning("alpha-missing", name,
                             f"{tf.path}: module '{name}' has no .alpha tensor; alpha is implied (= rank)")
        magnitude = rm.magnitude
        if magnitude is not None and rm.up is not None and magnitude.numel == rm.up.shape[0]:
            pass  # per-output-row magnitude (LyCORIS wd_on_out=True, PEFT convention)
        elif magnitude is not None and rm.down is not None and magnitude.numel == rm.down.shape[1]:
            findings.error(
                "unsupported-dora-axis", name,
                f"{tf.path}: module '{name}': .dora_scale {magnitude.shape} is per input column "
                "(LyCORIS wd_on_out=False); only per-output-row DoRA is supported",
            )
            continue
        module = build_module(
            name, rm, alpha=alpha, alpha_source="tensor", rslora=False, fan_in_fan_out=False,
            findings=findings, where=tf.path,
        )
        if module is not None:
            modules[name] = module
    meta = tf.metadata
    base_model = meta.get("ss_sd_model_name") or meta.get("modelspec.architecture") or None
    return Adapter(
        modules=modules, source_format="kohya", metadata=meta, base_model=base_model,
        unsupported=unsupported, path=tf.path, files=[tf.path],
    )


def _alpha(rm: RawModule, name: str, tf: TensorFile, findings: Findings) -> float | None:
    assert rm.alpha is not None
    if rm.alpha.numel != 1:
        findings.error("bad-shape", name, f"{tf.path}: '{name}.alpha' has shape {rm.alpha.shape}, expected a scalar")
        return None
    return rm.alpha.scalar()


# ---------------------------------------------------------------------------------------------
# writing


def kohya_name(m: LoraModule, source_format: str) -> str:
    """The kohya key stem for a module: stored names stay; dotted names get underscores."""
    if "." not in m.name:
        return m.name
    name = m.name
    for component, prefix in (("unet.", "lora_unet_"), ("transformer.", "lora_unet_"),
                              ("text_encoder_2.", "lora_te2_"), ("text_encoder_3.", "lora_te3_"),
                              ("text_encoder.", "lora_te1_")):
        if name.startswith(component):
            return prefix + name[len(component):].replace(".", "_")
    return "lora_unet_" + name.replace(".", "_")


def kohya_alpha(m: LoraModule) -> float:
    """The alpha to store: kohya scale is always alpha / r, so an rslora module's alpha is converted."""
    return m.scale * m.rank if m.rslora else m.alpha


def state_dict(adapter: Adapter) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for m in adapter.modules.values():
        stem = kohya_name(m, adapter.source_format)
        if stem + ".lora_down.weight" in out:
            raise ValueError(f"two modules map to the kohya name {stem}")
        out[stem + ".lora_down.weight"] = m.down.load()
        out[stem + ".lora_up.weight"] = m.up.load()
        # alpha stays float32 whatever the weights are: a bf16 alpha rounds the scale (kohya bug)
        out[stem + ".alpha"] = torch.tensor(kohya_alpha(m), dtype=torch.float32)
        if m.magnitude is not None:
            mag = m.magnitude.load()
            out[stem + ".dora_scale"] = mag.reshape(m.out_features, *([1] * (len(m.up.shape) - 1)))
    return out


def write(adapter: Adapter, out_file: Path, metadata: dict[str, str]) -> None:
    """Write `adapter` as one kohya .safetensors file at the (temporary) path `out_file`."""
    from loratool.st import save_tensors

    unsupported = [m.name for m in adapter.modules.values() if m.kind == "embedding" or m.fan_in_fan_out]
    if unsupported:
        from loratool.errors import IncompatibleError

        raise IncompatibleError(
            f"module '{unsupported[0]}' is an embedding or fan_in_fan_out layer, which kohya files cannot hold",
            hint="write PEFT instead (--format peft)",
        )
    meta = dict(adapter.metadata) if adapter.source_format == "kohya" else {}
    ranks = {m.rank for m in adapter.modules.values()}
    alphas = {kohya_alpha(m) for m in adapter.modules.values()}
    meta.setdefault("ss_network_module", "networks.lora")
    if ranks:
        # recomputed from the modules (kohya's resize records only the last module's alpha);
        # "Dynamic" set by the caller (dynamic resize) is kept
        if meta.get("ss_network_dim") != "Dynamic":
            meta["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
        if meta.get("ss_network_alpha") != "Dynamic":
            meta["ss_network_alpha"] = _fmt(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    meta.update(metadata)
    save_tensors(out_file, state_dict(adapter), meta)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else json.dumps(x)
