"""Mixture-of-experts layouts as data: fused 3-D expert parameters and how checkpoints store them.

Facts from transformers 5 (`models/*/modeling_*.py`, `conversion_mapping.py`) and peft 0.21 / 0.22
(`tuners/lora/layer.py` ParamWrapper, `tuners/tuners_utils.py` `_inject_parameters`,
`utils/transformers_weight_conversion.py`); docs/moe.md has
the whole picture. In memory, transformers holds each MoE block's experts as fused parameters,
`<block>.experts.gate_up_proj` (E, 2·I, H) and `<block>.experts.down_proj` (E, H, I), each expert as a
Linear weight (out, in); gpt-oss and a few others store them transposed, (E, in, out), and gpt-oss
interleaves gate and up row by row (gate = rows 0::2 of each expert's out axis, up = 1::2).
On disk most families keep one Linear per expert (`experts.{e}.gate_proj.weight`, Mixtral
`block_sparse_moe.experts.{e}.w1.weight`), which transformers concatenates on load; gpt-oss keeps the
fused tensors. Nothing here reads files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# peft nests one ParamWrapper per targeted parameter of a module, in the order the module defines its
# parameters (named_parameters), the first innermost: these are the orders transformers' expert
# modules define them in. A name not listed comes after these, in the config's order.
PARAM_ORDER = ("gate_up_proj", "gate_up_proj_bias", "gate_proj", "up_proj", "down_proj", "down_proj_bias")
# the fused expert weights (3-D) a LoRA can adapt: extract decomposes them per expert
EXPERT_PARAMS = frozenset(p for p in PARAM_ORDER if not p.endswith("_bias"))

# model_type (config.json) whose fused expert parameters hold each expert as (in, out):
# `@use_experts_implementation(is_transposed=True)` in transformers 5
TRANSPOSED_MODEL_TYPES = frozenset({"gpt_oss", "aria", "ergo", "openai_privacy_filter"})

# target_modules names peft converts into target_parameters on a fused-expert model (peft
# utils/transformers_weight_conversion.py `_MOE_TARGET_MODULE_MAPPING`: Mixtral-style w1/w2/w3, Qwen2-MoE-style
# gate_proj/up_proj/down_proj, the router `gate`), adding a rank_pattern / alpha_pattern `.*\.gate_up_proj` of
# 2·r / 2·alpha when both halves of gate_up_proj are named; peft 0.21 for the types transformers maps onto
# those two, 0.22 also for qwen2_moe itself, and 0.22 keeps a name that matches only Linears (docs/moe.md)
PEFT_CONVERTED_TARGETS = frozenset({"gate", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"})

# model_type -> fused parameters whose parts alternate row by row (gpt-oss `_apply_gate`: gate_up[..., ::2])
INTERLEAVED: dict[str, frozenset[str]] = {"gpt_oss": frozenset({"gate_up_proj"})}


@dataclass(frozen=True)
class StoredExperts:
    """How a checkpoint stores the experts of a fused parameter one Linear per expert.

    Attributes:
        fused: the fused parameter's tail in memory, e.g. `mlp.experts.gate_up_proj`.
        stored: the per-expert module's tail on disk with `{e}` for the expert and `{part}`, e.g.
            `mlp.experts.{e}.{part}` (Mixtral: `block_sparse_moe.experts.{e}.{part}`).
        parts: the per-expert modules whose output rows the fused parameter concatenates, in order
            (each an equal share of the rows): (`gate_proj`, `up_proj`), or one part.
    """

    fused: str
    stored: str
    parts: tuple[str, ...]


# transformers' conversion_mapping: qwen2_moe (Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, GLM-4-MoE, ...) and mixtral
STORED: tuple[StoredExperts, ...] = (
    StoredExperts("mlp.experts.gate_up_proj", "mlp.experts.{e}.{part}", ("gate_proj", "up_proj")),
    StoredExperts("mlp.experts.down_proj", "mlp.experts.{e}.{part}", ("down_proj",)),
    StoredExperts("mlp.experts.gate_up_proj", "block_sparse_moe.experts.{e}.{part}", ("w1", "w3")),
    StoredExperts("mlp.experts.down_proj", "block_sparse_moe.experts.{e}.{part}", ("w2",)),
)


def param_order(names: list[str]) -> list[str]:
    """Parameter names of one module in the order peft nests their wrappers (innermost first)."""
    known = [n for n in PARAM_ORDER if n in names]
    return known + [n for n in names if n not in known]


def stored_parts(param: str, index: int) -> list[tuple[str, list[str]]]:
    """For expert `index` of the fused parameter path `param`: each way a checkpoint may store it
    one Linear per expert, as (layout description, module paths of its parts in row order)."""
    out = []
    for s in STORED:
        if param == s.fused or param.endswith("." + s.fused):
            head = param[: len(param) - len(s.fused)]
            out.append((s.stored, [head + s.stored.format(e=index, part=p) for p in s.parts]))
    return out


@dataclass(frozen=True)
class StoredPart:
    """A per-expert Linear of a checkpoint placed in the fused parameter it is part of (STORED read backwards).

    Attributes:
        param: the fused parameter's path, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
        index: the expert.
        part: its place among the parameter's parts (gate 0, up 1), of `parts`.
    """

    param: str
    index: int
    part: int
    parts: int


def _stored_pattern(s: StoredExperts) -> re.Pattern[str]:
    body = re.escape(s.stored).replace(re.escape("{e}"), r"(?P<e>\d+)").replace(
        re.escape("{part}"), "(?P<part>" + "|".join(map(re.escape, s.parts)) + ")")
    return re.compile(r"^(?P<head>(?:.*\.)?)" + body + "$")


_STORED_PATTERNS = tuple((s, _stored_pattern(s)) for s in STORED)


def fused_part(module: str) -> StoredPart | None:
    """Where the per-expert module path `module` (`model.layers.0.mlp.experts.3.up_proj`, Mixtral
    `...block_sparse_moe.experts.3.w3`) sits in transformers' fused parameter, or None for another module."""
    for s, rx in _STORED_PATTERNS:
        hit = rx.match(module)
        if hit is not None:
            return StoredPart(hit["head"] + s.fused, int(hit["e"]), s.parts.index(hit["part"]), len(s.parts))
    return None
