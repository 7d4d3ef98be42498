"""Per-module weights: `--module-weights 'REGEX=W,...'` and `--blocks PRESET:W1,W2,...`.

The block presets follow the LoRA Block Weight convention (hako-mikan/sd-webui-lora-block-weight,
scripts/lora_block_weight.py: BLOCKID17 / BLOCKID26 / BLOCKID12 / BLOCKID20 / BLOCKIDFLUX, also read
by ComfyUI Inspire Pack's "Lora Loader (Block Weight)"): one weight per block id, in the table's
order. Wan has no LBW layout; its preset is one weight per transformer block `blocks.N`, the
blocks kijai's ComfyUI-WanVideoWrapper "WanVideo Lora Block Edit" selects. docs/commands/merge.md
lists every layout.

A module's block comes from its canonical name in any dialect: kohya (`lora_unet_input_blocks_4_1_…`,
`lora_unet_down_blocks_1_attentions_0_…`, `lora_te1_…`, `lora_unet_double_blocks_3_…`), diffusers /
PEFT (`unet.down_blocks.1.attentions.0.…`, `transformer.single_transformer_blocks.7.…`) and original
checkpoint keys (`model.diffusion_model.output_blocks.3.1.…`, `blocks.12.…`). diffusers U-Net names
map to the original block numbers as the checkpoint converters do (loratool/families/unet.py, which
the SD1.x and SDXL family tables use too): down_blocks.i.{resnets,attentions}.j -> input_blocks.(3i+j+1),
downsamplers -> input_blocks.(3i+3), up_blocks.i.{…}.j -> output_blocks.(3i+j), upsamplers ->
output_blocks.(3i+2).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from loratool.errors import IncompatibleError
from loratool.families import unet
from loratool.patterns import SafePattern, compile_pattern

LBW = "hako-mikan/sd-webui-lora-block-weight (scripts/lora_block_weight.py)"
WAN_SOURCE = "kijai/ComfyUI-WanVideoWrapper (WanVideoLoraBlockEdit: blocks.0 .. blocks.39)"


def _ids(prefix: str, numbers: range | list[int]) -> tuple[str, ...]:
    return tuple(f"{prefix}{n:02d}" for n in numbers)


@dataclass(frozen=True)
class BlockLayout:
    """One preset: which block each weight of `--blocks PRESET:W1,W2,...` applies to."""

    family: str  # how module names are read: unet (SD1.5 / SDXL), flux, wan
    blocks: tuple[str, ...]  # block ids, in the order the weights are given
    source: str  # where the convention comes from


# THE table. BASE = the text encoder(s); INnn / M00 / OUTnn = the U-Net's input_blocks.nn,
# middle_block, output_blocks.nn; Flux: CLIP, T5, IN (img_in, txt_in, time_in, vector_in,
# guidance_in), Dnn (double_blocks.nn), Snn (single_blocks.nn), OUT (final_layer); Wan: Bnn (blocks.nn).
PRESETS: dict[str, BlockLayout] = {
    # LBW BLOCKID17: the blocks a plain (attention-only) LoRA of SD1.x/2.x touches
    "sd15": BlockLayout("unet", ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                                 *_ids("OUT", range(3, 12))), f"{LBW}: BLOCKID17"),
    # LBW BLOCKID26: every block (LoCon / LyCORIS)
    "sd15-full": BlockLayout("unet", ("BASE", *_ids("IN", range(12)), "M00", *_ids("OUT", range(12))),
                             f"{LBW}: BLOCKID26"),
    # LBW BLOCKID12: SDXL's attention blocks
    "sdxl": BlockLayout("unet", ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", range(6))),
                        f"{LBW}: BLOCKID12"),
    # LBW BLOCKID20: every SDXL block
    "sdxl-full": BlockLayout("unet", ("BASE", *_ids("IN", range(9)), "M00", *_ids("OUT", range(9))),
                             f"{LBW}: BLOCKID20"),
    # LBW BLOCKIDFLUX (61 weights)
    "flux": BlockLayout("flux", ("CLIP", "T5", "IN", *_ids("D", range(19)), *_ids("S", range(38)), "OUT"),
                        f"{LBW}: BLOCKIDFLUX"),
    # Wan 2.x 14B (40 blocks) and 1.3B (30 blocks)
    "wan": BlockLayout("wan", _ids("B", range(40)), WAN_SOURCE),
    "wan-1.3b": BlockLayout("wan", _ids("B", range(30)), WAN_SOURCE),
}


# ---------------------------------------------------------------------------------------------
# module name -> block id

_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder|text_encoders_|cond_stage_model_|conditioner_embedders_"
                           r"|text_model_)")
_T5 = re.compile(r"^(lora_te[23]_|text_encoder_[23]_|text_encoders_t5xxl_)")
_DENOISER_PREFIXES = ("lora_unet_", "lora_transformer_", "model_diffusion_model_", "diffusion_model_", "unet_",
                      "transformer_", "base_model_model_")


def _strip(norm: str) -> str:
    for p in _DENOISER_PREFIXES:
        if norm.startswith(p):
            return norm[len(p):]
    return norm


def _unet_block(s: str) -> str | None:
    if m := re.match(r"input_blocks_(\d+)_", s):
        return f"IN{int(m[1]):02d}"
    if s.startswith("middle_block_") or s.startswith("mid_block_"):
        return "M00"
    if m := re.match(r"output_blocks_(\d+)_", s):
        return f"OUT{int(m[1]):02d}"
    if s.startswith("conv_in"):
        return "IN00"
    if m := re.match(r"down_blocks_(\d+)_(?:attentions|resnets)_(\d+)_", s):
        return f"IN{unet.input_block(int(m[1]), int(m[2])):02d}"
    if m := re.match(r"down_blocks_(\d+)_downsamplers_", s):
        return f"IN{unet.downsampler_block(int(m[1])):02d}"
    if m := re.match(r"up_blocks_(\d+)_(?:attentions|resnets)_(\d+)_", s):
        return f"OUT{unet.output_block(int(m[1]), int(m[2])):02d}"
    if m := re.match(r"up_blocks_(\d+)_upsamplers_", s):
        return f"OUT{unet.upsampler_block(int(m[1])):02d}"
    return None  # time embedding, conv_out, ...: in no block


def _flux_block(s: str) -> str | None:
    if m := re.match(r"(?:double_blocks|transformer_blocks)_(\d+)_", s):
        return f"D{int(m[1]):02d}"
    if m := re.match(r"(?:single_blocks|single_transformer_blocks)_(\d+)_", s):
        return f"S{int(m[1]):02d}"
    if re.match(r"(img_in|txt_in|time_in|vector_in|guidance_in|x_embedder|context_embedder|time_text_embed)", s):
        return "IN"
    if re.match(r"(final_layer|norm_out|proj_out)", s):
        return "OUT"
    return None


def _wan_block(s: str) -> str | None:
    if m := re.match(r"blocks_(\d+)_", s):
        return f"B{int(m[1]):02d}"
    return None


def block_of(name: str, family: str) -> str | None:
    """The block id of a module (its canonical name, any dialect) in a family's layout, or None."""
    norm = name.replace(".", "_")
    if _TEXT_ENCODER.match(norm):
        if family == "flux":
            return "T5" if _T5.match(norm) else "CLIP"
        return "BASE" if family == "unet" else None
    s = _strip(norm)
    if family == "unet":
        return _unet_block(s)
    if family == "flux":
        return _flux_block(s)
    return _wan_block(s)


# ---------------------------------------------------------------------------------------------
# the options

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def parse_module_weights(spec: str) -> list[tuple[SafePattern, float]]:
    """'REGEX=W,REGEX=W' -> [(compiled regex, weight)] (a regex may itself hold commas)."""
    rules: list[tuple[SafePattern, float]] = []
    pos = 0
    pattern = re.compile(rf"(.+?)=\s*({_NUMBER})\s*(?:,|$)")
    while pos < len(spec):
        m = pattern.match(spec, pos)
        if not m:
            raise IncompatibleError(f"--module-weights {spec!r}: cannot read {spec[pos:]!r}",
                                    hint="write REGEX=WEIGHT pairs separated by commas, e.g. 'attn=0.5,mlp=0'")
        try:
            regex = compile_pattern(m[1].strip())
        except re.error as e:
            raise IncompatibleError(f"--module-weights: {m[1].strip()!r} is not a regular expression ({e})") from None
        w = float(m[2])
        if not math.isfinite(w):
            raise IncompatibleError(f"--module-weights: {m[2]!r} is not a finite number")
        rules.append((regex, w))
        pos = m.end()
    if not rules:
        raise IncompatibleError("--module-weights is empty", hint="e.g. --module-weights 'attn=0.5,mlp=0'")
    return rules


def parse_blocks(spec: str) -> tuple[str, BlockLayout, list[float]]:
    """'PRESET:W1,W2,...' -> (preset name, layout, weights), checked against the layout's length."""
    name, sep, values = spec.partition(":")
    name = name.strip().lower()
    if not sep or name not in PRESETS:
        raise IncompatibleError(f"--blocks {spec!r}: expected PRESET:W1,W2,... with a preset of "
                                f"{', '.join(PRESETS)}", hint="the layouts are listed in docs/commands/merge.md")
    layout = PRESETS[name]
    try:
        weights = [float(x) for x in values.split(",")]
    except ValueError:
        raise IncompatibleError(f"--blocks {spec!r}: the weights must be numbers separated by commas") from None
    if not all(math.isfinite(w) for w in weights):
        raise IncompatibleError(f"--blocks {spec!r}: the weights must be finite numbers")
    if len(weights) != len(layout.blocks):
        raise IncompatibleError(
            f"--blocks {name}: {len(weights)} weight(s) given, the layout has {len(layout.blocks)}: "
            + ",".join(layout.blocks))
    return name, layout, weights


@dataclass
class ModuleWeights:
    """Per-module weight multipliers, from --module-weights and --blocks (their product)."""

    weights: dict[str, float]  # module name -> multiplier (1.0 where no rule applies)
    outside: list[str]  # --blocks: modules in no block of the layout (kept at weight 1)

    def warnings(self, preset: str | None) -> list[str]:
        if not self.outside:
            return []
        shown = ", ".join(self.outside[:3]) + (f", ... ({len(self.outside)} in all)" if len(self.outside) > 3 else "")
        return [f"--blocks {preset}: {len(self.outside)} module(s) are in no block of the layout and keep weight 1: "
                f"{shown}"]


def module_weights(names: list[str], module_weights: str | None = None, blocks: str | None = None) -> ModuleWeights:
    """Each module's weight multiplier; the first matching REGEX wins (re.search on the name).

    Raises:
        IncompatibleError: a malformed option, or a module whose block the preset has no weight
            for (e.g. a LoCon module in IN03 with the 17-weight sd15 layout: use sd15-full).
    """
    rules = parse_module_weights(module_weights) if module_weights is not None else []
    layout = parse_blocks(blocks) if blocks is not None else None
    out: dict[str, float] = {}
    outside: list[str] = []
    for name in names:
        w = 1.0
        for regex, value in rules:
            if regex.search(name):
                w = value
                break
        if layout is not None:
            preset, lay, weights = layout
            block = block_of(name, lay.family)
            if block is None:
                outside.append(name)
            elif block not in lay.blocks:
                fuller = f"{preset}-full" if block in PRESETS.get(f"{preset}-full", lay).blocks else None
                raise IncompatibleError(
                    f"--blocks {preset}: module '{name}' is in block {block}, which the {preset} layout "
                    f"({len(lay.blocks)} weights) does not have",
                    hint=f"use --blocks {fuller}:... ({len(PRESETS[fuller].blocks)} weights)" if fuller else
                    "use --module-weights for such modules")
            else:
                w = w * weights[lay.blocks.index(block)]
        out[name] = w
    return ModuleWeights(out, outside)
