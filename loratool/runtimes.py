"""Runtimes that serve adapters, and what each loads, ignores and mis-scales: data, with dates.

One record per runtime, read from the runtime's own source on the date in `checked`. `validate
--for` turns these records into per-module findings; `convert --for` writes the layout the record
asks for (one rank and one alpha, scales baked into the factors, ...). When a runtime changes,
change its record here (and the date): nothing else in loratool encodes these facts.

Scale rules (how the runtime turns a file into each module's ΔW multiplier):
- "peft_global": PEFT directory; one `lora_alpha / r` from the config's global r and lora_alpha for
  every module (rank_pattern / alpha_pattern are not read); `alpha / sqrt(r)` when use_rslora and
  `honours_rslora`.
- "gguf_global_alpha": GGUF adapter; one `adapter.lora.alpha` for the file, divided by each tensor's
  own rank (alpha 0 means scale 1).
- "direct_scale": MLX; one `scale` for every module (`lora_parameters.scale`), one `rank`.
- "per_module": the file's own per-module alpha is honoured (kohya `.alpha` tensors, diffusers
  header metadata); what a file does not store is taken as alpha = rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ScaleRule = Literal["peft_global", "gguf_global_alpha", "direct_scale", "per_module"]


@dataclass(frozen=True)
class Runtime:
    """What one runtime does with an adapter file.

    Attributes:
        name: the name `--for` takes.
        checked: when the facts below were read from the runtime's source (YYYY-MM-DD).
        source: the files they were read from.
        loads: the loratool formats the runtime loads (others are refused by it outright).
        writes: the format `convert --for` writes for it.
        scale_rule: see the module docstring.
        honours_rslora: use_rslora changes the runtime's scale (alpha / sqrt(r)).
        one_rank: every module must have the same rank (the config's `r` / `rank`).
        max_rank: the largest rank the runtime accepts, or None when it has no fixed ceiling.
        rank_settings: the values the runtime's max-rank server option takes (vLLM), for the hint.
        dora: DoRA magnitudes are applied (False: refused or ignored, see dora_refused).
        dora_refused: a DoRA adapter is refused at load (True) or its magnitudes silently dropped (False).
        dora_axes: with dora, the magnitude axes the runtime applies as DoRA means them ("out": one
            value per output row, "in": per input column); a magnitude on another axis loads but is
            applied wrongly.
        modules_to_save: full replacement tensors (PEFT modules_to_save) are loaded.
        embeddings: LoRA on embedding layers is loaded.
        bias: LoRA bias deltas (PEFT lora_bias) are loaded.
        conv: conv-layer LoRA is loaded.
        notes: anything else the docs should say.
    """

    name: str
    checked: str
    source: str
    loads: tuple[str, ...]
    writes: str
    scale_rule: ScaleRule
    honours_rslora: bool
    one_rank: bool
    max_rank: int | None
    rank_settings: tuple[int, ...] = ()
    dora: bool = False
    dora_refused: bool = True
    dora_axes: tuple[str, ...] = ("out",)
    modules_to_save: bool = False
    embeddings: bool = True
    bias: bool = False
    conv: bool = False
    notes: str = ""


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime(
            name="vllm",
            checked="2026-11-29",
            source="vllm-project/vllm: vllm/lora/peft_helper.py (PEFTHelper), vllm/config/lora.py (MaxLoRARanks)",
            loads=("peft",),
            writes="peft",
            scale_rule="peft_global",
            honours_rslora=True,
            one_rank=False,
            max_rank=512,
            rank_settings=(1, 8, 16, 32, 64, 128, 256, 320, 512),
            dora=False,
            dora_refused=True,
            modules_to_save=False,
            embeddings=True,
            bias=False,
            notes="PEFTHelper keeps only its own fields (rank_pattern and alpha_pattern are dropped) and raises "
            "for use_dora and modules_to_save; --max-lora-rank (default 16) must be at least the adapter's r",
        ),
        Runtime(
            name="sglang",
            checked="2026-11-29",
            source="sgl-project/sglang: python/sglang/srt/lora/lora.py (LoRAAdapter.scaling = lora_alpha / r)",
            loads=("peft",),
            writes="peft",
            scale_rule="peft_global",
            honours_rslora=False,
            one_rank=False,
            max_rank=None,
            dora=False,
            dora_refused=False,
            modules_to_save=False,
            embeddings=True,
            bias=False,
            notes="the scale is lora_alpha / r whatever use_rslora says; --max-lora-rank must be at least r",
        ),
        Runtime(
            name="llama.cpp",
            checked="2026-11-29",
            source="ggml-org/llama.cpp: convert_lora_to_gguf.py, src/llama-adapter.cpp, src/llama-graph.cpp",
            loads=("gguf",),
            writes="gguf",
            scale_rule="gguf_global_alpha",
            honours_rslora=False,
            one_rank=False,
            max_rank=None,
            dora=False,
            dora_refused=True,
            modules_to_save=False,
            embeddings=True,
            bias=False,
            notes="one adapter.lora.alpha per file, divided by each tensor's rank; convert_lora_to_gguf.py "
            "writes the config's lora_alpha and ignores use_rslora, rank_pattern's alphas and alpha_pattern",
        ),
        Runtime(
            name="mlx",
            checked="2026-11-29",
            source="ml-explore/mlx-lm: mlx_lm/tuner/utils.py (load_adapters, linear_to_lora_layers), "
            "mlx_lm/tuner/lora.py (LoRALinear), mlx_lm/tuner/dora.py",
            loads=("mlx",),
            writes="mlx",
            scale_rule="direct_scale",
            honours_rslora=False,
            one_rank=True,
            max_rank=None,
            dora=True,
            modules_to_save=False,
            embeddings=True,
            bias=False,
            notes="one rank and one scale for every module (lora_parameters); factors stored transposed",
        ),
        Runtime(
            name="diffusers",
            checked="2026-11-29",
            source="huggingface/diffusers: loaders/lora_base.py, loaders/lora_conversion_utils.py, utils/peft_utils.py",
            loads=("diffusers", "kohya"),
            writes="diffusers",
            scale_rule="per_module",
            honours_rslora=True,
            one_rank=False,
            max_rank=None,
            dora=True,
            modules_to_save=False,
            embeddings=False,
            bias=False,
            conv=True,
            notes="alpha from lora_adapter_metadata (diffusers files) or .alpha tensors (kohya files); "
            "a file without either is loaded with alpha = rank",
        ),
        Runtime(
            name="comfyui",
            checked="2026-11-29",
            source="comfyanonymous/ComfyUI: comfy/lora.py, comfy/weight_adapter/lora.py",
            loads=("kohya", "diffusers"),
            writes="kohya",
            scale_rule="per_module",
            honours_rslora=False,
            one_rank=False,
            max_rank=None,
            dora=True,
            dora_axes=("in",),
            modules_to_save=False,
            embeddings=False,
            bias=False,
            conv=True,
            notes="alpha only from .alpha tensors (scale alpha / rank); alpha kept in header metadata is "
            "ignored (ComfyUI PR #15830); DoRA dora_scale is normalised per input column (comfy/weight_adapter/"
            "base.py weight_decompose): a per-output-row (out, 1) magnitude is divided by the norm of W, not "
            "of W + ΔW, in versions that tell the axis from the shape (ComfyUI PR #15458, open), and by the "
            "column norms in older ones",
        ),
    )
}

NAMES: tuple[str, ...] = tuple(RUNTIMES)

# formats that only one runtime's rules can describe (one scale per file, ...): writing one of these
# goes through that runtime's preparation even without --for
RUNTIME_OF_FORMAT: dict[str, str] = {"mlx": "mlx", "gguf": "llama.cpp"}
