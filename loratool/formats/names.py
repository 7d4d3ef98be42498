"""Module-name prefixes of every dialect, in one table: kohya prefixes, single-file checkpoint
containers, diffusers pipeline components and PEFT's wrapper prefix.

Everything else (kohya name recovery, diffusers placement, keymap's base-key matching) derives its
lookups from KOHYA_PREFIXES and COMPONENTS below; add a prefix or a container here, once.
"""

from __future__ import annotations

# PEFT wraps the model: every key starts with this
PEFT_PREFIX = "base_model.model."

# diffusers pipeline components that hold LoRA layers (`unet.down_blocks...`, `text_encoder.text_model...`)
COMPONENTS: tuple[str, ...] = (
    "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet",
)

# kohya prefix -> (the diffusers component it names, the base-key prefixes it stands for, most
# specific first: single-file checkpoint containers, then diffusers components, then nothing).
# Order matters where two kohya prefixes list the same base prefix: the first one is what a module
# under that base prefix is written as (`text_encoder.` -> lora_te1_, `transformer.` -> lora_unet_).
KOHYA_PREFIXES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora_unet_": ("unet", ("model.diffusion_model.", "diffusion_model.", "unet.", "transformer.", "")),
    "lora_transformer_": ("transformer", ("transformer.", "model.diffusion_model.", "")),
    "lycoris_": ("unet", ("model.diffusion_model.", "transformer.", "")),
    "lora_te1_": ("text_encoder", ("conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer.",
                                   "text_encoder.", "")),
    "lora_te_": ("text_encoder", ("cond_stage_model.transformer.", "text_encoder.", "")),
    "lora_te2_": ("text_encoder_2", ("conditioner.embedders.1.model.", "text_encoders.clip_g.transformer.",
                                     "text_encoder_2.", "")),
    "lora_te3_": ("text_encoder_3", ("text_encoders.t5xxl.transformer.", "text_encoder_3.", "")),
}


def _derive() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(container -> component) and (container or component prefix -> kohya prefix), longest first."""
    component_prefixes = {c + "." for c in COMPONENTS}
    kohya_of: dict[str, str] = {}
    for kprefix, (_, bases) in KOHYA_PREFIXES.items():
        for base in bases:
            if base:
                kohya_of.setdefault(base, kprefix)
    longest = sorted(kohya_of, key=len, reverse=True)
    containers = tuple((b, KOHYA_PREFIXES[kohya_of[b]][0]) for b in longest if b not in component_prefixes)
    return containers, tuple((b, kohya_of[b]) for b in longest)


# single-file checkpoint containers (`model.diffusion_model.`, `conditioner.embedders.0.transformer.`,
# ...) -> the component their modules belong to; and every container or component prefix -> the
# kohya prefix that stands for it (the inverse of KOHYA_PREFIXES, so a written name matches again)
CONTAINERS, KOHYA_PREFIX_OF = _derive()


def component_of_kohya_prefix(prefix: str) -> str:
    return KOHYA_PREFIXES[prefix][0]


def kohya_base_prefixes(prefix: str) -> tuple[str, ...]:
    return KOHYA_PREFIXES[prefix][1]


def split_kohya_prefix(name: str) -> tuple[str, str] | None:
    """'lora_unet_down_blocks_0_...' -> ('lora_unet_', 'down_blocks_0_...'), or None."""
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            return prefix, name[len(prefix):]
    return None


def split_component(name: str) -> tuple[str, str] | None:
    """'unet.down_blocks.0...' -> ('unet', 'down_blocks.0...'), or None without a component."""
    head, _, rest = name.partition(".")
    return (head, rest) if head in COMPONENTS and rest else None


def strip_known_prefix(name: str) -> str:
    """The name without a kohya prefix, PEFT's wrapper prefix or a component prefix (the first found)."""
    for p in (*KOHYA_PREFIXES, PEFT_PREFIX, *(c + "." for c in COMPONENTS)):
        if name.startswith(p):
            return name[len(p):]
    return name
