"""Matching adapter module names to base weight keys (DESIGN.md section 4).

Order: exact `name + ".weight"`; then known prefix rules (PEFT `base_model.model.`, diffusers
components, kohya `lora_unet_` <-> `model.diffusion_model.` ...); then an underscore-normalised
suffix match that must be unique. Unmatched and ambiguous modules are reported, never skipped
silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loratool.adapter import LoraModule, LycoModule
from loratool.st import TensorInfo

# kohya prefix -> base-key prefixes it stands for, most specific first
KOHYA_PREFIXES: dict[str, tuple[str, ...]] = {
    "lora_unet_": ("model.diffusion_model.", "diffusion_model.", "unet.", "transformer.", ""),
    "lora_transformer_": ("transformer.", "model.diffusion_model.", ""),
    "lora_te_": ("cond_stage_model.transformer.", "text_encoder.", ""),
    "lora_te1_": ("conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer.", "text_encoder.", ""),
    "lora_te2_": ("conditioner.embedders.1.model.", "text_encoders.clip_g.transformer.", "text_encoder_2.", ""),
    "lora_te3_": ("text_encoders.t5xxl.transformer.", "text_encoder_3.", ""),
    "lycoris_": ("model.diffusion_model.", "transformer.", ""),
}
DIFFUSERS_COMPONENTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")
PEFT_PREFIXES = ("base_model.model.",)


def _norm(s: str) -> str:
    return s.replace(".", "_")


@dataclass
class Match:
    """The result of matching modules against a base's key list."""

    matched: dict[str, str] = field(default_factory=dict)  # module name -> base key
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    shape_mismatch: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.ambiguous or self.shape_mismatch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "unmatched": self.unmatched,
            "ambiguous": self.ambiguous,
            "shape_mismatch": [
                {"module": n, "base_key": k, "expected": list(e), "found": list(f)}
                for n, k, e, f in self.shape_mismatch
            ],
        }


class KeyIndex:
    """Base weight keys indexed for the three matching rules."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)
        self.stems: dict[str, list[str]] = {}  # normalised name (no .weight) -> keys
        for k in keys:
            if k.endswith(".weight"):
                self.stems.setdefault(_norm(k[: -len(".weight")]), []).append(k)

    def candidates(self, name: str) -> list[str]:
        # 1. exact
        if name + ".weight" in self.keys:
            return [name + ".weight"]
        # 2. known prefix rules
        for alt in _prefix_variants(name):
            if alt + ".weight" in self.keys:
                return [alt + ".weight"]
        for kprefix, bases in KOHYA_PREFIXES.items():
            if name.startswith(kprefix):
                stem = name[len(kprefix):]
                for base in bases:
                    hits = self.stems.get(_norm(base) + stem)
                    if hits:
                        return hits
                break
        # 3. unique underscore-normalised suffix
        stem = _norm(_strip_known(name))
        return [k for s, ks in self.stems.items() if s == stem or s.endswith("_" + stem) for k in ks]


def _prefix_variants(name: str) -> list[str]:
    out = []
    for p in PEFT_PREFIXES + DIFFUSERS_COMPONENTS:
        if name.startswith(p):
            out.append(name[len(p):])
    return out


def _strip_known(name: str) -> str:
    for p in (*KOHYA_PREFIXES, *PEFT_PREFIXES, *DIFFUSERS_COMPONENTS):
        if name.startswith(p):
            return name[len(p):]
    return name


def compatible(module: LoraModule | LycoModule, shape: tuple[int, ...]) -> bool:
    """Whether the module's delta fits a base weight of `shape` (1x1 conv == linear)."""
    if isinstance(module, LycoModule):
        return module.algo == "bias" or module.fits(tuple(shape))
    want = module.base_shape
    if tuple(shape) == want:
        return True
    squeeze = tuple(d for i, d in enumerate(shape) if i < 2 or d != 1)
    want_sq = tuple(d for i, d in enumerate(want) if i < 2 or d != 1)
    return squeeze == want_sq


def match_modules(modules: Sequence[LoraModule | LycoModule], base: dict[str, TensorInfo]) -> Match:
    """Map every module to exactly one base weight of a compatible shape."""
    index = KeyIndex(list(base))
    result = Match()
    for m in modules:
        cands = index.candidates(m.name)
        if not cands:
            result.unmatched.append(m.name)
        elif len(cands) > 1:
            result.ambiguous[m.name] = sorted(cands)
        else:
            key = cands[0]
            if not compatible(m, base[key].shape):
                want = m.base_shape if isinstance(m, LoraModule) else m.delta_shape
                result.shape_mismatch.append((m.name, key, want, base[key].shape))
            else:
                result.matched[m.name] = key
    return result
