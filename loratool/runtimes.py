"""Runtimes that serve adapters, and what each loads, refuses and mis-scales: data, per version, with sources.

One record per runtime: facts read from the runtime's own source (the released package's files,
file:line as read on the date in `checked`), each with the release range it holds for. `resolve(name,
version)` turns a record into the `Runtime` view of one release (`--for vllm` = the current release,
`--for vllm@0.8` an older one). `validate --for` turns that view into per-module and per-setting
findings; `convert --for` writes the layout it asks for (one rank and one alpha, scales baked into the
factors, settings it refuses removed or refused by name). When a runtime changes, add a fact with its
`since` here (and close the old one with `until`): nothing else in loratool encodes these facts.

Scale rules (how the runtime turns a file into each module's ΔW multiplier):
- "peft_global": PEFT directory; one `lora_alpha / r` from the config's global r and lora_alpha for
  every module; `alpha / sqrt(r)` when use_rslora and `honours_rslora`; with `patterns`, rank_pattern /
  alpha_pattern are applied per module as PEFT applies them (then the scale is PEFT's own).
- "gguf_global_alpha": GGUF adapter; one `adapter.lora.alpha` for the file, divided by each tensor's
  own rank (alpha 0 means scale 1).
- "direct_scale": MLX; one `scale` for every module (`lora_parameters.scale`), one `rank`.
- "per_module": the file's own per-module alpha is honoured (kohya `.alpha` tensors, diffusers
  header metadata); what a file does not store is taken as alpha = rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

ScaleRule = Literal["peft_global", "gguf_global_alpha", "direct_scale", "per_module"]

CHECKED = "2026-12-07"


@dataclass(frozen=True)
class Refusal:
    """A PEFT config setting the runtime refuses at load, in its own words.

    Attributes:
        key: the adapter_config.json key.
        when: "set" (any true / non-empty value), "not_none" (a value other than "none"), "missing"
            (the key is absent), "init" (a string other than those in `accepted`).
        words: the runtime's own error message.
        fix: what `convert --for` does: "drop" (removes the setting, with a warning: it changes nothing
            the runtime computes), "tensors" (handled per tensor: DoRA magnitudes, bias deltas, full
            tensors; --drop removes them), "variant" (a LoRA variant: convert with its initial adapter, or
            --allow-variant), "refuse" (nothing loratool can write serves it).
        accepted: with "init", the values the runtime takes.
    """

    key: str
    when: Literal["set", "not_none", "missing", "init"]
    words: str
    fix: Literal["drop", "tensors", "variant", "refuse"]
    accepted: tuple[str, ...] = ()

    def applies(self, config: dict[str, Any]) -> bool:
        """Does the runtime refuse `config` for this setting?"""
        if self.when == "missing":
            return self.key not in config
        value = config.get(self.key)
        if self.when == "set":
            return bool(value)
        if self.when == "not_none":
            return value is not None and value != "none"
        return isinstance(value, str) and value.lower() not in self.accepted


@dataclass(frozen=True)
class Fact:
    """One thing a runtime does, the releases it holds for, and where it was read.

    Attributes:
        field: the `Runtime` attribute it sets ("refuses" facts add one Refusal each).
        value: the attribute's value.
        source: the file and line(s) it was read from, and the release read ("path:line (0.34.0)").
        since: the first release it holds for (None: every release the record covers).
        until: the first release it no longer holds for (None: it holds in the current release).
    """

    field: str
    value: Any
    source: str
    since: str | None = None
    until: str | None = None


@dataclass(frozen=True)
class Runtime:
    """What one release of a runtime does with an adapter file (built by `resolve`).

    Attributes:
        name: the name `--for` takes.
        version: the release this view describes.
        checked: when the facts were read from the runtime's source (YYYY-MM-DD).
        source: the files they were read from.
        loads: the loratool formats the runtime loads (others are refused by it outright).
        writes: the format `convert --for` writes for it.
        scale_rule: see the module docstring.
        honours_rslora: use_rslora changes the runtime's scale (alpha / sqrt(r)).
        patterns: rank_pattern / alpha_pattern are applied per module (peft_global).
        one_rank: every module must have the same rank (the config's `r` / `rank`).
        max_rank: the largest rank the runtime accepts, or None when it has no fixed ceiling.
        rank_settings: the values the runtime's max-rank server option takes (vLLM), for the hint.
        dora: DoRA magnitudes are applied (False: refused or ignored, see dora_refused).
        dora_refused: a DoRA adapter is refused at load (True) or its magnitudes silently dropped (False).
        dora_axes: with dora, the magnitude axes the runtime applies as DoRA means them ("out": one
            value per output row, "in": per input column); a magnitude on another axis loads but is
            applied wrongly.
        modules_to_save: full replacement tensors (PEFT modules_to_save) are loaded.
        modules_to_save_allowed: the modules_to_save names loaded even when modules_to_save is False
            (vLLM: one classification head).
        embeddings: LoRA on embedding layers is loaded.
        bias: LoRA bias deltas (PEFT lora_bias) are loaded.
        bias_refused: a bias delta makes the runtime refuse the adapter (True) or is dropped (False).
        bias_flag: the server option without which bias deltas are dropped ("" when none).
        conv: conv-layer LoRA is loaded.
        refuses: config settings the runtime refuses at load, in its own words.
        moe_experts: per-expert LoRA modules (`...experts.N.<projection>`) are loaded (stacked per projection);
            None where loratool has not read the release's MoE code (then nothing is claimed).
        moe_expert_ranks: "projection" when the experts of one projection must share one rank (they are
            stacked into one tensor), "any" otherwise.
        moe_all_experts: every expert of a layer needs LoRA on each of its projections (the stack is built
            only from a full set).
        moe_projections: the projections target_modules must name for the expert LoRA to be applied at all,
            each with the target_modules names the runtime counts as it; () when any subset is applied.
        moe_fused: what happens to fused 3-D expert LoRA (PEFT target_parameters): "loads"; "models" (served
            only for the model classes in moe_fused_models, elsewhere refused unless moe_fused_flag);
            "no" (no reader for it); None: not read.
        moe_fused_models: with "models", the transformers architectures it is served for.
        moe_fused_flag: with "models", the server option that serves it for other models ("" when none).
        moe_fused_order: the fused parameters the runtime expects, in PEFT's nesting order (the first listed is
            the innermost, saved as `experts.base_layer`); () when it reads the parameter names.
        notes: anything else the docs should say.
        facts: the facts this view was built from (for docs and sources).
    """

    name: str
    version: str
    checked: str
    source: str
    loads: tuple[str, ...]
    writes: str
    scale_rule: ScaleRule
    honours_rslora: bool = False
    patterns: bool = False
    one_rank: bool = False
    max_rank: int | None = None
    rank_settings: tuple[int, ...] = ()
    dora: bool = False
    dora_refused: bool = True
    dora_axes: tuple[str, ...] = ("out",)
    modules_to_save: bool = False
    modules_to_save_allowed: tuple[str, ...] = ()
    embeddings: bool = True
    bias: bool = False
    bias_refused: bool = False
    bias_flag: str = ""
    conv: bool = False
    refuses: tuple[Refusal, ...] = ()
    moe_experts: bool | None = None
    moe_expert_ranks: Literal["projection", "any"] = "any"
    moe_all_experts: bool = False
    moe_projections: tuple[tuple[str, tuple[str, ...]], ...] = ()
    moe_fused: Literal["loads", "models", "no"] | None = None
    moe_fused_models: tuple[str, ...] = ()
    moe_fused_flag: str = ""
    moe_fused_order: tuple[str, ...] = ()
    notes: str = ""
    facts: tuple[Fact, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def where(self, field_name: str) -> str:
        """The source line(s) the value of `field_name` was read from, or ''."""
        return next((f.source for f in self.facts if f.field == field_name), "")


@dataclass(frozen=True)
class Record:
    """A runtime's facts over the releases loratool has read.

    Attributes:
        current: the newest release read (what `--for NAME` means).
        oldest: the oldest release the facts cover (`--for NAME@OLDER` is refused); None where only the
            current release was read (the facts are then taken for any release asked for).
        base: the facts every release shares (no since / until needed).
    """

    name: str
    current: str
    oldest: str | None
    source: str
    base: dict[str, Any]
    facts: tuple[Fact, ...]
    notes: str = ""
    checked: str = CHECKED


def version_key(version: str) -> tuple[int, ...]:
    """A release string as a comparable tuple: "0.8" -> (0, 8, 0), "b6123" -> (6123, 0, 0)."""
    nums = [int(n) for n in re.findall(r"\d+", version.split("+")[0].split(".post")[0])]
    return tuple([*nums, 0, 0, 0][:3]) if len(nums) <= 3 else tuple(nums)


def _holds(fact: Fact, version: str) -> bool:
    v = version_key(version)
    if fact.since is not None and v < version_key(fact.since):
        return False
    return not (fact.until is not None and v >= version_key(fact.until))


class UnknownVersion(ValueError):
    """A release older than the record covers."""


def resolve(name: str, version: str | None = None) -> Runtime:
    """The `Runtime` view of one release of `name` (None: the current one).

    Raises:
        KeyError: an unknown runtime name.
        UnknownVersion: a release older than the record covers (newer ones are taken as the current).
    """
    rec = RECORDS[name]
    ver = rec.current if version is None else version
    if rec.oldest is not None and version_key(ver) < version_key(rec.oldest):
        raise UnknownVersion(f"loratool's {name} record covers releases {rec.oldest} to {rec.current}")
    values: dict[str, Any] = dict(rec.base)
    refuses: list[Refusal] = []
    facts: list[Fact] = []
    for fact in rec.facts:
        if not _holds(fact, ver):
            continue
        facts.append(fact)
        if fact.field == "refuses":
            refuses.append(fact.value)
        else:
            values[fact.field] = fact.value
    notes = " ".join(x for x in (rec.notes, values.pop("notes", "")) if x)
    return Runtime(name=name, version=ver, checked=rec.checked, source=rec.source, refuses=tuple(refuses), notes=notes,
                   facts=tuple(facts), **values)


def parse_target(target: str) -> tuple[str, str | None]:
    """`vllm@0.8` -> ("vllm", "0.8"); `vllm` -> ("vllm", None)."""
    name, _, version = target.partition("@")
    return name, (version or None)


# ---------------------------------------------------------------------------------------------
# the records

_VP = "vllm/lora/peft_helper.py"
_V_NEW = "0.32.0"  # rank_pattern / alpha_pattern applied and the PEFT-variant refusals (absent in 0.31.0)
_V_HEAD = "0.31.0"  # modules_to_save may name one classification head (absent in 0.30.0)
_V_BIAS = "0.11.1"  # LoRA bias removed (0.11.0 still has --enable-lora-bias, 0.11.2 refuses)

_VLLM = Record(
    name="vllm",
    current="0.34.0",
    oldest="0.8.0",
    source="vllm (PyPI wheels 0.8.5, 0.10.0, 0.11.0, 0.11.2, 0.12.0, 0.16.0, 0.20.0, 0.24.0, 0.28.0, 0.30.0, 0.31.0, "
    "0.32.0, 0.33.0, 0.34.0): vllm/lora/peft_helper.py (PEFTHelper), lora_weights.py, lora_model.py "
    "(models.py before 0.30), utils.py, vllm/config/lora.py",
    base=dict(loads=("peft",), writes="peft", scale_rule="peft_global", max_rank=512, embeddings=True,
              dora=False, dora_refused=True, conv=False),
    notes="--max-lora-rank (default 16) must be at least the adapter's largest rank.",
    facts=(
        Fact("honours_rslora", True, f"{_VP}:124-127 (0.34.0); {_VP}:56-59 (0.8.5)"),
        Fact("patterns", False, "vllm/lora/lora_weights.py:57-70 (0.30.0): one peft_helper.vllm_lora_scaling_factor "
             "and peft_helper.r for every module", until=_V_NEW),
        Fact("patterns", True, f"{_VP}:138-160 get_rank_and_scaling, vllm/lora/lora_weights.py:67 (0.34.0)",
             since=_V_NEW),
        Fact("rank_settings", (8, 16, 32, 64, 128, 256, 320, 512), "vllm/config.py:2677 (0.8.5), "
             "vllm/config/lora.py:104 (0.11.0)", until=_V_BIAS),
        Fact("rank_settings", (1, 8, 16, 32, 64, 128, 256, 320, 512), "vllm/config/lora.py:26 (0.34.0, 0.11.2)",
             since=_V_BIAS),
        Fact("modules_to_save_allowed", ("classifier", "score"),
             f"{_VP}:57-66, vllm/lora/lora_model.py:188-192 (0.34.0): one classification head", since=_V_HEAD),
        Fact("refuses", Refusal("modules_to_save", "set", "vLLM only supports modules_to_save being None.", "tensors"),
             f"{_VP}:47-48 (0.30.0); {_VP}:48-49 (0.8.5)", until=_V_HEAD),
        Fact("refuses", Refusal("use_dora", "set", "vLLM does not yet support DoRA.", "tensors"),
             f"{_VP}:67-68 (0.34.0); {_VP}:50-51 (0.8.5)"),
        Fact("refuses", Refusal("target_modules", "missing", "Missing required configuration fields: "
                                "{'target_modules'}", "drop"), f"{_VP}:166-176 (0.34.0); {_VP}:71-82 (0.8.5)"),
        # PEFT's `bias` ("all" / "lora_only": the base layers' own biases were trained and saved)
        Fact("refuses", Refusal("bias", "not_none", "Adapter bias cannot be used without bias_enabled.", "drop"),
             f"{_VP}:111-113 (0.8.5), 123-125 (0.11.0): accepted with --enable-lora-bias", until=_V_BIAS),
        Fact("refuses", Refusal("bias", "not_none", "Adapter bias is not supported.", "drop"),
             f"{_VP}:206-207 (0.34.0); {_VP}:126 (0.11.2)", since=_V_BIAS),
        # LoRA bias deltas (`lora_B.bias`, PEFT lora_bias)
        Fact("bias", True, "vllm/lora/utils.py:141, vllm/lora/models.py:403-412 (0.8.5): loaded with "
             "--enable-lora-bias, dropped with a log warning without it; utils.py:146 (0.11.0)", until=_V_BIAS),
        Fact("bias_flag", "--enable-lora-bias", "vllm/lora/models.py:403-412 (0.8.5)", until=_V_BIAS),
        Fact("bias", False, "vllm/lora/utils.py:236 (0.34.0): '... lora_B.bias is unsupported LoRA weight'",
             since=_V_BIAS),
        Fact("bias_refused", True, "vllm/lora/utils.py:236 (0.34.0)", since=_V_BIAS),
        Fact("refuses", Refusal("lora_bias", "set", "vLLM does not support LoRA bias (lora_bias).", "tensors"),
             f"{_VP}:69-70 (0.34.0)", since=_V_NEW),
        Fact("refuses", Refusal("init_lora_weights", "init",
                                "vLLM does not support init_lora_weights={value!r}. Inits such as PiSSA, OLoRA, CorDA "
                                "and LoftQ modify the base model weights when PEFT loads the adapter.", "variant",
                                accepted=("gaussian", "eva", "orthogonal", "mica", "lora_ga")),
             f"{_VP}:71-79, 90-101 (0.34.0)", since=_V_NEW),
        Fact("refuses", Refusal("alora_invocation_tokens", "set", "vLLM does not support Activated LoRA (aLoRA).",
                                "refuse"), f"{_VP}:80-81 (0.34.0)", since=_V_NEW),
        Fact("refuses", Refusal("layer_replication", "set", "vLLM does not support layer_replication.", "refuse"),
             f"{_VP}:82-83 (0.34.0)", since=_V_NEW),
        Fact("refuses", Refusal("use_bdlora", "set", "vLLM does not support block-diagonal LoRA (BD-LoRA).",
                                "refuse"), f"{_VP}:84-85 (0.34.0)", since=_V_NEW),
        Fact("refuses", Refusal("use_qalora", "set", "vLLM does not support QALoRA.", "refuse"),
             f"{_VP}:86-87 (0.34.0)", since=_V_NEW),
        # mixture-of-experts LoRA (read in the 0.34.0 wheel only; older releases are not claimed)
        Fact("moe_experts", True, "vllm/lora/utils.py:400-437 process_packed_modules_mapping, "
             "vllm/lora/lora_weights.py:163-210 pack_moe (0.34.0): experts.N.<w1|w2|w3 / gate|down|up_proj>",
             since="0.34.0"),
        Fact("moe_expert_ranks", "projection", "vllm/lora/lora_weights.py:178-184 (0.34.0): 'The experts of "
             "{module_name} have different LoRA ranks for the same projection, which is not supported.'",
             since="0.34.0"),
        Fact("moe_fused", "models", "vllm/lora/model_manager.py:151-155, 975-1037 _stack_moe_lora_weights, "
             "1326-1345 _validate_moe_lora_format (0.34.0)", since="0.34.0"),
        # the classes that set is_3d_moe_weight (vllm/model_executor/models/, read from vllm-project/vllm on GitHub
        # on the date in CHECKED: gpt_oss.py, qwen3_vl_moe.py, qwen3_5.py, glm4_moe_lite.py, interns1_pro.py)
        Fact("moe_fused_models", ("GptOssForCausalLM", "Qwen3VLMoeForConditionalGeneration",
                                  "Qwen3_5MoeForConditionalGeneration", "Glm4MoeLiteForCausalLM",
                                  "InternS1ProForConditionalGeneration"),
             "vllm/model_executor/models/gpt_oss.py, qwen3_vl_moe.py, qwen3_5.py, glm4_moe_lite.py, interns1_pro.py "
             "(is_3d_moe_weight = True)", since="0.34.0"),
        Fact("moe_fused_flag", "--enable-mixed-moe-lora-format (with is_3d_lora_weight=True on the LoRA request)",
             "vllm/config/lora.py:74-79, vllm/lora/model_manager.py:1326-1345 (0.34.0)", since="0.34.0"),
        Fact("moe_fused_order", ("gate_up_proj", "down_proj"), "vllm/lora/model_manager.py:983-992 (0.34.0): "
             "'experts.base_layer is the gate_up_proj and experts is the down_proj', both asserted present; "
             f"{_VP}:147-153", since="0.34.0"),
    ),
)

_SG = "python/sglang/srt/lora"
_SGLANG = Record(
    name="sglang",
    current="0.5.23",
    oldest="0.5.23",
    source=f"sglang (PyPI wheel 0.5.23): {_SG}/lora.py, lora_manager.py, lora_config.py, mem_pool.py",
    base=dict(loads=("peft",), writes="peft", scale_rule="peft_global", max_rank=None, embeddings=True,
              dora=False, dora_refused=True, bias=False, conv=False),
    notes="the scale is lora_alpha / r whatever use_rslora, rank_pattern and alpha_pattern say, and every module "
    "is copied at the config's r; --max-lora-rank must be at least r.",
    facts=(
        Fact("honours_rslora", False, f"{_SG}/lora.py:71 (0.5.23): scaling = lora_alpha / r"),
        Fact("patterns", False, f"{_SG}/lora.py:71, {_SG}/mem_pool.py:918 (0.5.23): one rank and one scaling"),
        Fact("refuses", Refusal("use_dora", "set", "LoRA serving currently doesn't support DoRA adapters",
                                "tensors"), f"{_SG}/lora_manager.py:349-352 (0.5.23)"),
        Fact("refuses", Refusal("target_modules", "missing", "KeyError: 'target_modules'", "drop"),
             f"{_SG}/lora_config.py:42 (0.5.23)"),
        Fact("moe_experts", True, f"{_SG}/lora.py:35-38 (_ROUTED_EXPERT_PATTERN), 372-386 (w1/w3/w2 renamed "
             "gate/up/down_proj), 462-500 normalize_gate_up_proj (0.5.23)"),
        Fact("moe_projections", (("gate_up_proj", ("gate_proj", "up_proj", "gate_up_proj")),
                                 ("down_proj", ("down_proj",))), f"{_SG}/lora_manager.py:1159-1183 (0.5.23): the "
             "FusedMoE layers get a LoRA wrapper only when the target modules, normalised by "
             f"{_SG}/utils.py:277-327 (gate_proj / up_proj -> gate_up_proj), include gate_up_proj and down_proj"),
        Fact("moe_fused", "no", f"{_SG}/lora.py:35-38, {_SG}/lora_manager.py:765-797 (0.5.23): expert LoRA is read "
             "as per-expert experts.N.<proj> weights or 3-D experts.<proj> stacks (expert axis first); PEFT "
             "target_parameters' flat experts[.base_layer].lora_A (r·E, in) layout is neither"),
    ),
)

_LLAMA = Record(
    name="llama.cpp",
    current="(llama-cpp-python 0.3.36's vendor/llama.cpp)",
    oldest=None,
    source="llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist (PyPI): convert_lora_to_gguf.py, "
    "src/llama-adapter.cpp, src/llama-adapter.h, src/llama-graph.cpp",
    base=dict(loads=("gguf",), writes="gguf", scale_rule="gguf_global_alpha", honours_rslora=False, max_rank=None,
              embeddings=True, dora=False, dora_refused=True, conv=False),
    notes="one adapter.lora.alpha per file, divided by each tensor's rank; convert_lora_to_gguf.py writes the "
    "config's lora_alpha and ignores use_rslora, rank_pattern's alphas and alpha_pattern.",
    facts=(
        Fact("scale_rule", "gguf_global_alpha", "src/llama-adapter.cpp:221 (adapter.lora.alpha, one per file), "
             "src/llama-adapter.h:53-57 (scale = alpha / rank, rank = lora_b->ne[0]; alpha 0: scale 1), "
             "src/llama-graph.cpp:1541, 1580-1582"),
        Fact("honours_rslora", False, "convert_lora_to_gguf.py:528 (lparams['lora_alpha']), 428 (written as "
             "adapter.lora.alpha); use_rslora, rank_pattern and alpha_pattern are not read"),
        Fact("dora_refused", True, "convert_lora_to_gguf.py:470-482: any tensor but lora_A / lora_B (a DoRA "
             "magnitude, a modules_to_save copy; layer norms excepted) ends the conversion"),
        Fact("moe_experts", True, "conversion/qwen.py:119-141 (Qwen2MoeModel.modify_tensors; deepseek.py, llama.py "
             "alike): experts.N.<proj> torch.stack-ed into blk.N.ffn_<proj>_exps, which LoraTorchTensor "
             "(convert_lora_to_gguf.py:234-241) turns into lora_a (E, r, in), lora_b (E, out, r); "
             "src/llama-graph.cpp:1574-1591 build_lora_mm_id"),
        Fact("moe_expert_ranks", "projection", "convert_lora_to_gguf.py:234-241: torch.stack of the experts' "
             "lora_A / lora_B needs one shape"),
        Fact("moe_all_experts", True, "conversion/qwen.py:128-156: a layer's experts are stacked only once all "
             "n_experts·3 tensors arrived; 'Unprocessed experts' otherwise"),
        Fact("moe_fused", "no", "convert_lora_to_gguf.py:269-276 get_base_tensor_name: PEFT target_parameters "
             "keys become experts.base_layer.weight / experts.weight, which no GGUF tensor name maps"),
    ),
)

_MLX = Record(
    name="mlx",
    current="0.32.2",
    oldest=None,
    source="mlx-lm (PyPI 0.32.2, with mlx 0.32.4): mlx_lm/tuner/utils.py (load_adapters, linear_to_lora_layers), "
    "mlx_lm/tuner/lora.py (LoRALinear), mlx_lm/tuner/dora.py",
    base=dict(loads=("mlx",), writes="mlx", scale_rule="direct_scale", honours_rslora=False, one_rank=True,
              max_rank=None, dora=True, embeddings=True, bias=False, conv=False),
    notes="one rank and one scale for every module (lora_parameters); factors stored transposed.",
    facts=(
        Fact("scale_rule", "direct_scale", "mlx_lm/tuner/lora.py:84, 95-98 (0.32.2): y + scale·(x·lora_a)·lora_b; "
             "mlx_lm/tuner/utils.py:123-147 load_adapters: one lora_parameters for every layer"),
        Fact("dora", True, "mlx_lm/tuner/utils.py:139-146 (0.32.2): fine_tune_type 'dora' -> DoRALinear"),
    ),
)

_DIFFUSERS = Record(
    name="diffusers",
    current="0.42.1",
    oldest=None,
    source="diffusers (PyPI 0.42.1): loaders/lora_base.py, loaders/lora_conversion_utils.py, utils/peft_utils.py",
    base=dict(loads=("diffusers", "kohya"), writes="diffusers", scale_rule="per_module", honours_rslora=True,
              max_rank=None, dora=True, embeddings=False, bias=False, conv=True),
    notes="alpha from lora_adapter_metadata (diffusers files) or .alpha tensors (kohya files); a file without "
    "either is loaded with alpha = rank.",
    facts=(
        Fact("scale_rule", "per_module", "diffusers/utils/peft_utils.py:153-190 get_peft_kwargs (0.42.1): per-module "
             "ranks and alphas into rank_pattern / alpha_pattern; loaders/lora_base.py:65 lora_adapter_metadata"),
    ),
)

_COMFY = Record(
    name="comfyui",
    current="(master at commit 0323d87)",
    oldest=None,
    source="comfyanonymous/ComfyUI at commit 0323d87: comfy/lora.py, comfy/weight_adapter/lora.py, "
    "comfy/weight_adapter/base.py",
    base=dict(loads=("kohya", "diffusers"), writes="kohya", scale_rule="per_module", honours_rslora=False,
              max_rank=None, dora=True, dora_axes=("in",), embeddings=False, bias=False, conv=True),
    notes="alpha only from .alpha tensors (scale alpha / rank); alpha kept in header metadata is ignored (ComfyUI "
    "PR #15830); DoRA dora_scale is normalised per input column (comfy/weight_adapter/base.py weight_decompose): a "
    "per-output-row (out, 1) magnitude is divided by the norm of W, not of W + ΔW, in versions that tell the axis "
    "from the shape (ComfyUI PR #15458, open), and by the column norms in older ones.",
    facts=(
        Fact("scale_rule", "per_module", "comfy/lora.py load_lora: alpha only from the '<key>.alpha' tensor; "
             "comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight: alpha / rank, 1.0 without one (0323d87)"),
        Fact("dora_axes", ("in",), "comfy/weight_adapter/base.py (weight_decompose)"),
    ),
)

RECORDS: dict[str, Record] = {r.name: r for r in (_VLLM, _SGLANG, _LLAMA, _MLX, _DIFFUSERS, _COMFY)}

NAMES: tuple[str, ...] = tuple(RECORDS)

# the current release of every runtime (what `--for NAME` means)
RUNTIMES: dict[str, Runtime] = {name: resolve(name) for name in NAMES}

# formats that only one runtime's rules can describe (one scale per file, ...): writing one of these
# goes through that runtime's preparation even without --for
RUNTIME_OF_FORMAT: dict[str, str] = {"mlx": "mlx", "gguf": "llama.cpp"}

