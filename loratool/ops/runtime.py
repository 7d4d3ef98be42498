"""What a runtime (vLLM, SGLang, llama.cpp, MLX, diffusers, ComfyUI) does with an adapter, and the
adapter it serves exactly.

`runtime_findings` (validate --for) lists, per module, what the runtime rejects, ignores or
mis-scales, each with the fix. `prepare_for` (convert --for) returns an adapter the runtime serves
exactly: one rank and one alpha for every module where the runtime reads one global pair (ranks
zero-padded, each module's scale baked into its up factor, both exact), with what the runtime cannot
hold refused, or removed with `drop` and a warning that says what is lost. The facts themselves are
data in loratool.runtimes.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loratool.adapter import Adapter, LoraModule, scale_for
from loratool.errors import IncompatibleError
from loratool.formats import Findings
from loratool.io.tensors import TensorRef
from loratool.runtimes import NAMES, RUNTIMES, Refusal, Runtime


def get_runtime(name: str) -> Runtime:
    """The runtime record for `name`: `vllm` (its current release) or `vllm@0.8` (that release).

    Raises:
        IncompatibleError: an unknown name (the message lists the known ones), or a release older
            than loratool's record of that runtime covers.
    """
    from loratool.runtimes import UnknownVersion, parse_target, resolve

    runtime, version = parse_target(name)
    if runtime not in RUNTIMES:
        raise IncompatibleError(f"--for {name}: unknown runtime", hint=f"use one of: {', '.join(NAMES)} "
                                "(optionally with @VERSION, e.g. vllm@0.8)")
    try:
        return resolve(runtime, version)
    except UnknownVersion as e:
        raise IncompatibleError(f"--for {name}: {e}", hint=f"use --for {runtime} (its current release) or a "
                                "release the record covers (docs/runtimes.md)") from None


def _fix(adapter: Adapter, rt: Runtime, extra: str = "") -> str:
    src = adapter.path if adapter.path is not None else "ADAPTER"
    target = rt.name if rt.version == RUNTIMES[rt.name].version else f"{rt.name}@{rt.version}"
    return f"loratool convert {src} --for {target} -o OUT{extra}"


def _said(rule: Refusal, config: dict[str, Any]) -> str:
    """The runtime's own words for `rule` on `config` (a {value!r} in them is filled in)."""
    return rule.words.replace("{value!r}", repr(config.get(rule.key)))


def refusals(adapter: Adapter, rt: Runtime) -> list[Refusal]:
    """The config settings of `adapter` that `rt` refuses at load (PEFT adapters only)."""
    if adapter.source_format != "peft" or "peft" not in rt.loads:
        return []
    return [r for r in rt.refuses if r.applies(adapter.config)]


# what each "tensors" refusal is about, per module / tensor (the per-module findings name it)
_TENSOR_KEYS = {"use_dora": "magnitude", "lora_bias": "bias", "modules_to_save": "extras"}


def _runtime_scales(adapter: Adapter, rt: Runtime) -> dict[str, float] | None:
    """The scale the runtime applies to each module when it loads this file as it is, or None when
    it does not load this format at all (or applies the file's own per-module scales)."""
    fmt = adapter.source_format
    if rt.scale_rule == "peft_global" and fmt == "peft" and rt.patterns:
        # rank_pattern / alpha_pattern applied as PEFT applies them: each module's own alpha and rank
        return {n: scale_for(m.alpha, m.rank, m.rslora and rt.honours_rslora) for n, m in adapter.modules.items()}
    if rt.scale_rule == "peft_global" and fmt == "peft":
        cfg = adapter.config
        r = cfg.get("r", 8)
        alpha = cfg.get("lora_alpha", 8)
        if not isinstance(r, int) or isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or r <= 0:
            return None
        s = scale_for(float(alpha), r, bool(cfg.get("use_rslora", False)) and rt.honours_rslora)
        return {n: s for n in adapter.modules}
    if rt.scale_rule == "gguf_global_alpha" and fmt == "peft":
        # what llama.cpp serves after its own converter: the config's lora_alpha over each tensor's rank
        alpha = adapter.config.get("lora_alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return None
        return {n: (float(alpha) / m.rank if alpha else 1.0) for n, m in adapter.modules.items()}
    if rt.scale_rule == "per_module" and fmt in rt.loads and rt.name == "comfyui":
        # alpha kept only in header metadata is not read: such modules load with alpha = rank
        return {n: (1.0 if m.alpha_source == "metadata" else m.alpha / m.rank) for n, m in adapter.modules.items()}
    return None


_AXIS = {"out": "output row", "in": "input column"}


def _src(rt: Runtime, field_name: str) -> str:
    where = rt.where(field_name).split("; ")[0]  # the newest release's line (docs/runtimes.md has them all)
    return f" ({where})" if where else ""


def _setting_fix(adapter: Adapter, rt: Runtime, rule: Refusal) -> str:
    fix = _fix(adapter, rt)
    if rule.fix == "drop":
        return f"{fix} (writes a config without it, with a warning)" if rule.when != "missing" else \
            f"{fix} (writes target_modules from the modules the adapter holds)"
    if rule.fix == "variant":
        return (f"{_fix(adapter, rt, ' --initial-adapter INIT')} (PEFT's own conversion to plain LoRA, rank 2r; INIT "
                "is the adapter saved right after initialisation), or add --allow-variant if the base you serve "
                "already holds the residual weights the adapter was trained on")
    if rule.fix == "tensors":
        return f"{fix} --drop (removes them, with a warning)"
    return f"serve it with a runtime that implements {rule.key} (peft does); removing it changes what the adapter " \
        "computes"


def runtime_findings(adapter: Adapter, rt: Runtime, findings: Findings) -> None:
    """Add what `rt` rejects, ignores or mis-scales in `adapter`, per setting and per module, with the fix
    and the runtime's own words."""
    fix = _fix(adapter, rt)
    where = adapter.path
    if adapter.source_format not in rt.loads:
        via = " (through llama.cpp's convert_lora_to_gguf.py: see the scales below)" \
            if rt.name == "llama.cpp" and adapter.source_format == "peft" else ""
        findings.error("runtime-format", None,
                       f"{where}: {rt.name} loads {' or '.join(rt.loads)} adapters, not {adapter.source_format}{via}; "
                       f"fix: {fix}")
    said = {r.key: r for r in refusals(adapter, rt)}
    rejects = "runtime-rejects"
    covered: set[str] = set()  # "tensors" refusals already named per module
    for name, m in adapter.modules.items():
        if m.magnitude is not None and rt.dora and m.dora_axis not in rt.dora_axes:
            findings.error("runtime-dora-axis", name,
                           f"{where}: {rt.name} applies DoRA module '{name}' wrongly: its magnitude is one value "
                           f"per {_AXIS[m.dora_axis]}, {rt.name} normalises per {_AXIS[rt.dora_axes[0]]}; fix: "
                           f"{_fix(adapter, rt, ' --dora-to-lora BASE')} (a plain LoRA fitted for that base, error "
                           "reported)")
        if m.magnitude is not None and not rt.dora:
            rule = said.get("use_dora")
            covered.add("use_dora")
            verb = "refuses" if rt.dora_refused else "ignores the magnitude of"
            words = f' (use_dora: "{_said(rule, adapter.config)}"{_src_of(rule, rt)})' if rule else ""
            findings.error(rejects if rt.dora_refused else "runtime-ignores", name,
                           f"{where}: {rt.label} {verb} DoRA module '{name}'{words}; fix: "
                           f"{_fix(adapter, rt, ' --dora-to-lora BASE')} (a plain LoRA fitted for that base, error "
                           "reported) or --drop (plain LoRA without the magnitude)")
        if m.bias is not None and not rt.bias:
            covered.add("lora_bias")
            rule = said.get("lora_bias")
            if rt.bias_refused or rule is not None:
                words = f'"{_said(rule, adapter.config)}"' if rule else "it is an unsupported LoRA weight"
                findings.error(rejects, name,
                               f"{where}: {rt.label} refuses the LoRA bias delta of module '{name}' ({words}"
                               f"{_src(rt, 'bias')}); fix: {fix} --drop (drops it, with a warning: the layer's bias "
                               "stays as in the base model)")
            else:
                findings.error("runtime-ignores", name,
                               f"{where}: {rt.label} has no LoRA bias; the bias delta of module '{name}' would be "
                               f"lost; fix: {fix} --drop (drops it, with a warning)")
        elif m.bias is not None and rt.bias_flag:
            findings.warning("runtime-setting", name,
                             f"{where}: {rt.label} applies the bias delta of module '{name}' only when started with "
                             f"{rt.bias_flag} (without it the delta is dropped){_src(rt, 'bias')}")
        if m.kind == "embedding" and not rt.embeddings:
            findings.error(rejects, name,
                           f"{where}: {rt.name} does not load LoRA on embedding module '{name}'; "
                           f"fix: {fix} --drop (drops the module)")
        if m.kind == "conv" and not rt.conv:
            findings.error(rejects, name,
                           f"{where}: {rt.name} does not load LoRA on conv module '{name}'; "
                           f"fix: {fix} --drop (drops the module)")
        if rt.max_rank is not None and m.rank > rt.max_rank:
            findings.error("runtime-rank", name,
                           f"{where}: module '{name}' has rank {m.rank}, above {rt.name}'s ceiling {rt.max_rank}; "
                           f"fix: loratool resize {adapter.path} --rank {rt.max_rank} -o OUT")
    saved = [k for k in adapter.extras if ".base_layer." not in k and not rt.modules_to_save
             and not _allowed_extra(k, rt)]
    for key in saved:
        covered.add("modules_to_save")
        rule = said.get("modules_to_save")
        words = f' ("{_said(rule, adapter.config)}")' if rule else ""
        verb = "refuses adapters with" if rt.name in ("vllm", "sglang") else "cannot load"
        findings.error(rejects, key,
                       f"{where}: {rt.label} {verb} full tensors (modules_to_save) such as '{key}'{words}; "
                       f"fix: {fix} --drop (the served model keeps the base's own tensor)")
    for key, rule in said.items():
        if rule.fix == "tensors" and (key in covered or _has_tensors(adapter, key)):
            continue  # named above, per module or tensor
        value = "(absent)" if rule.when == "missing" else f"{adapter.config.get(key)!r}"
        said_ = _said(rule, adapter.config)
        findings.error(rejects, None,
                       f'{where}: {rt.label} refuses {key} = {value}: "{said_}"{_src_of(rule, rt)}; '
                       f"fix: {_setting_fix(adapter, rt, rule)}")
    scales = _runtime_scales(adapter, rt)
    if scales is not None:
        for name, m in adapter.modules.items():
            got = scales[name]
            if not math.isclose(got, m.scale, rel_tol=1e-6, abs_tol=0.0):
                ratio = got / m.scale if m.scale else math.inf
                findings.error("runtime-misscales", name,
                               f"{where}: {rt.label} scales module '{name}' by {got:.6g}, the adapter by {m.scale:.6g} "
                               f"({ratio:.4g}x){_src(rt, 'patterns')}; fix: {fix}")
    moe_findings(adapter, rt, findings)
    if rt.rank_settings and adapter.modules:
        top = max(m.rank for m in adapter.modules.values())
        setting = next((s for s in rt.rank_settings if s >= top), None)
        if setting is not None and setting > rt.rank_settings[0] and top > 16:
            findings.warning("runtime-setting", None,
                             f"{where}: rank {top} needs {rt.name} started with --max-lora-rank {setting} or more "
                             "(default 16)")


# ---------------------------------------------------------------------------------------------
# mixture-of-experts LoRA (docs/moe.md): per-expert modules and fused 3-D expert parameters

_PER_EXPERT = re.compile(r"^(?P<parent>.+\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")


def per_expert_modules(modules: dict[str, LoraModule]) -> dict[str, dict[str, dict[int, LoraModule]]]:
    """Per-expert modules (`model.layers.0.mlp.experts.3.gate_proj`) by experts container, projection, index."""
    out: dict[str, dict[str, dict[int, LoraModule]]] = {}
    for name, m in modules.items():
        hit = _PER_EXPERT.match(name)
        if hit is not None:
            out.setdefault(hit["parent"], {}).setdefault(hit["proj"], {})[int(hit["index"])] = m
    return out


def _fused_modules(adapter: Adapter) -> dict[str, list[LoraModule]]:
    """The experts of each fused 3-D parameter (PEFT target_parameters), by parameter."""
    out: dict[str, list[LoraModule]] = {}
    for m in adapter.modules.values():
        if m.expert is not None:
            out.setdefault(m.expert.param, []).append(m)
    return out


def _ranks(modules: dict[int, LoraModule]) -> str:
    by_rank: dict[int, list[int]] = {}
    for i, m in sorted(modules.items()):
        by_rank.setdefault(m.rank, []).append(i)
    return ", ".join(f"rank {r} (experts {_listing([str(i) for i in idx], 3)})" for r, idx in sorted(by_rank.items()))


def moe_findings(adapter: Adapter, rt: Runtime, findings: Findings) -> None:
    """What `rt` does with the adapter's expert LoRA: per-expert modules and fused 3-D parameters."""
    per = per_expert_modules(adapter.modules)
    if per and rt.moe_experts is not None:
        _per_expert_findings(adapter, rt, per, findings)
    fused = _fused_modules(adapter)
    # the facts describe how each runtime reads PEFT's target_parameters layout; a GGUF file's expert stacks
    # are llama.cpp's own (src/llama-graph.cpp build_lora_mm_id)
    if fused and rt.moe_fused is not None and adapter.source_format == "peft":
        _fused_findings(adapter, rt, fused, findings)


def _per_expert_findings(adapter: Adapter, rt: Runtime, per: dict[str, dict[str, dict[int, LoraModule]]],
                         findings: Findings) -> None:
    where = adapter.path
    if not rt.moe_experts:
        findings.error("runtime-moe", None, f"{where}: {rt.label} does not load per-expert LoRA modules "
                       f"(e.g. '{next(iter(per))}'){_src(rt, 'moe_experts')}")
        return
    for parent, projs in per.items():
        if rt.moe_expert_ranks == "projection":
            for proj, experts in projs.items():
                if len({m.rank for m in experts.values()}) > 1:
                    findings.error("runtime-moe", f"{parent}.*.{proj}",
                                   f"{where}: {rt.label} stacks the experts of one projection into one tensor, so they "
                                   f"need one rank; '{parent}.N.{proj}' has {_ranks(experts)}"
                                   f"{_src(rt, 'moe_expert_ranks')}; fix: {_fix(adapter, rt)} (pads each projection's "
                                   "experts to its largest rank with zeros, exact)")
        if rt.moe_all_experts:
            indices = sorted({i for experts in projs.values() for i in experts})
            missing = [f"{i}.{proj}" for i in indices for proj in sorted(projs) if i not in projs[proj]]
            if missing:
                findings.error("runtime-moe", parent,
                               f"{where}: {rt.label} stacks a layer's expert LoRA only from every expert's "
                               f"{' / '.join(sorted(projs))}; '{parent}' lacks {_listing(missing)}"
                               f"{_src(rt, 'moe_all_experts')}; fix: merge the adapter into the base instead "
                               f"(loratool merge {where} BASE -o OUT)")
    if rt.moe_projections:
        named = _target_names(adapter)
        lacking = [proj for proj, names in rt.moe_projections if named is not None and not named & set(names)]
        if lacking:
            findings.error("runtime-ignores", None,
                           f"{where}: {rt.label} applies expert LoRA only when target_modules name "
                           + " and ".join(f"{proj} (or {' / '.join(n for n in names if n != proj) or proj})"
                                          for proj, names in rt.moe_projections)
                           + f"; this adapter's name none for {', '.join(lacking)}, so the LoRA of "
                           f"{len(per)} experts container(s) such as '{next(iter(per))}' is not applied"
                           f"{_src(rt, 'moe_projections')}; fix: train (or combine) LoRA on every expert "
                           "projection, or merge the adapter into the base (loratool merge)")


def _target_names(adapter: Adapter) -> set[str] | None:
    """The last name component of each PEFT target_modules entry (None: a string such as 'all-linear')."""
    targets = adapter.config.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list):
        return None
    return {str(t).split(".")[-1] for t in targets}


def _fused_order(params: list[str]) -> dict[str, list[str]]:
    """The fused parameters of each experts container in the order peft nests their wrappers (the first
    innermost, saved as `experts.base_layer`; families.moe.param_order)."""
    from loratool.families.moe import param_order

    leaves: dict[str, list[str]] = {}
    for param in params:
        parent, _, leaf = param.rpartition(".")
        leaves.setdefault(parent, []).append(leaf)
    return {parent: param_order(names) for parent, names in leaves.items()}


def _fused_findings(adapter: Adapter, rt: Runtime, fused: dict[str, list[LoraModule]], findings: Findings) -> None:
    where = adapter.path
    first = next(iter(fused))
    count = len(fused[first])
    if rt.moe_fused == "no":
        fix = (f"{_fix(adapter, rt, ' --base BASE')} (writes its own {rt.writes} expert tensors)"
               if rt.writes != "peft" else "serve per-expert modules (experts.N.<projection>)")
        findings.error("runtime-moe", first,
                       f"{where}: {rt.label} has no reader for fused expert LoRA (PEFT target_parameters) such as "
                       f"'{first}' ({count} experts; {len(fused)} parameter(s) in all){_src(rt, 'moe_fused')}; fix: "
                       f"{fix}, or merge the adapter into the base (loratool merge {where} BASE -o OUT)")
        return
    if rt.moe_fused == "models":
        findings.warning("runtime-setting", first,
                         f"{where}: {rt.label} serves fused expert LoRA (PEFT target_parameters, e.g. '{first}') as "
                         f"it is only on {', '.join(rt.moe_fused_models)}; on other MoE models it refuses the adapter "
                         f"unless started with {rt.moe_fused_flag}{_src(rt, 'moe_fused')}")
    if rt.moe_fused_order:
        want = list(rt.moe_fused_order)
        for parent, leaves in _fused_order(list(fused)).items():
            if leaves != want:
                findings.error("runtime-moe", parent,
                               f"{where}: {rt.label} reads '{parent}.base_layer' as {want[0]} and '{parent}' as "
                               f"{want[-1]} and needs both; this adapter adapts {' then '.join(leaves)} there "
                               f"(peft's nesting order){_src(rt, 'moe_fused_order')}; fix: adapt "
                               f"{' and '.join(want)} both (target_parameters), or merge the adapter into the base "
                               f"(loratool merge {where} BASE -o OUT)")


def _src_of(rule: Refusal, rt: Runtime) -> str:
    where = next((f.source for f in rt.facts if f.field == "refuses" and f.value == rule), "").split("; ")[0]
    return f" ({where})" if where else ""


def _has_tensors(adapter: Adapter, key: str) -> bool:
    what = _TENSOR_KEYS[key]
    if what == "extras":
        return any(".base_layer." not in k for k in adapter.extras)
    return any(getattr(m, what) is not None for m in adapter.modules.values())


def _allowed_extra(key: str, rt: Runtime) -> bool:
    """A full tensor the runtime loads although it has no modules_to_save (vLLM: a classification head)."""
    module = key.rsplit(".", 1)[0]
    return module in rt.modules_to_save_allowed


# ---------------------------------------------------------------------------------------------
# convert --for


@dataclass
class Prepared:
    """The adapter as the runtime will serve it, and what was changed on the way."""

    adapter: Adapter
    rank: int | None = None  # the one rank every module now has (None: ranks kept)
    alpha: float | None = None  # the one alpha every module now has
    baked: list[str] = field(default_factory=list)  # modules whose scale went into their up factor
    widened: list[str] = field(default_factory=list)  # 16-bit up factors written as float32 (see maths.bake.bake_scale)
    padded: list[str] = field(default_factory=list)  # experts zero-padded to their projection's one rank (exact)
    dropped: list[str] = field(default_factory=list)  # modules or tensors removed with --drop
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "baked": self.baked, "widened": self.widened,
                "padded": self.padded, "dropped": self.dropped}


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def unservable_dora(modules: Mapping[str, LoraModule], rt: Runtime) -> tuple[list[str], str]:
    """The DoRA modules `rt` cannot apply (any, when it has no DoRA; else those whose magnitude is on
    an axis it does not normalise along) and what they are, in words."""
    names = [n for n, m in modules.items()
             if m.magnitude is not None and (not rt.dora or m.dora_axis not in rt.dora_axes)]
    if not names:
        return [], ""
    what = "DoRA magnitudes" if not rt.dora else (
        f"DoRA magnitudes per {_AXIS[modules[names[0]].dora_axis]} (it normalises per {_AXIS[rt.dora_axes[0]]})")
    return names, what


def prepare_for(adapter: Adapter, rt: Runtime, *, drop: bool = False, allow_variant: bool = False) -> Prepared:
    """The adapter `rt` serves exactly (see the module docstring).

    Config settings the runtime refuses (loratool.runtimes.Refusal) are removed when that changes
    nothing the runtime computes (with a warning), handled per tensor (DoRA, bias deltas,
    modules_to_save: refused, or removed with `drop`), or refused by name. An unconverted PiSSA /
    OLoRA / CorDA / LoftQ init is refused unless `allow_variant` (then written as a plain init, with a
    warning: right only on a base that already holds the residual weights).

    Raises:
        IncompatibleError: content the runtime cannot hold without --drop (named), a setting it
            refuses that nothing here can fix (named, with the runtime's words), or a rank above the
            runtime's ceiling.
    """
    path = adapter.path
    config = dict(adapter.config)
    warnings: list[str] = []
    dropped: list[str] = []
    modules = dict(adapter.modules)
    extras = dict(adapter.extras)

    def refuse_or_drop(what: str, names: list[str], lost: str, hint: str | None = None) -> None:
        if not names:
            return
        if not drop:
            raise IncompatibleError(
                f"{path}: {rt.name} cannot serve {what}: {_listing(names)}",
                hint=hint or f"add --drop to remove them ({lost}), or serve the adapter with another runtime",
            )
        dropped.extend(names)
        warnings.append(f"dropped {what} for {rt.name}: {_listing(names)}; {lost}")

    for rule in refusals(adapter, rt):
        words = f'{rt.label}: "{_said(rule, config)}"{_src_of(rule, rt)}'
        if rule.fix == "refuse":
            raise IncompatibleError(f"{path}: {rt.label} cannot serve {rule.key} = {config.get(rule.key)!r} ({words})",
                                    hint=_setting_fix(adapter, rt, rule))
        if rule.fix == "variant":
            if not allow_variant:
                raise IncompatibleError(
                    f"{path}: {rt.label} cannot serve init_lora_weights = {config.get(rule.key)!r} ({words})",
                    hint="add --initial-adapter INIT (the adapter saved right after initialisation) for PEFT's own "
                    "conversion to plain LoRA, or --allow-variant if the base you serve already holds the residual "
                    "weights the adapter was trained on")
            warnings.append(f"init_lora_weights = {config.get(rule.key)!r} written as true for {rt.label}: the output "
                            "is right only on a base that already holds the weights the adapter was trained on")
            config[rule.key] = True
        elif rule.key == "bias":
            trained = [k for k in extras if k.endswith(".bias")]
            refuse_or_drop("trained base-layer biases (bias = " + repr(config.get("bias")) + ")", trained,
                           "the layers' biases stay as in the base model")
            for k in trained:
                extras.pop(k)
            warnings.append(f"bias = {config.get('bias')!r} written as 'none' for {rt.label} ({words})")
            config["bias"] = "none"
        elif rule.fix == "drop" and rule.when != "missing":
            warnings.append(f"removed {rule.key} for {rt.label} ({words})")
            config.pop(rule.key, None)
    saved = [k for k in extras if ".base_layer." not in k and not _allowed_extra(k, rt)]
    if not rt.modules_to_save:
        refuse_or_drop("full tensors (modules_to_save)", saved,
                       "the served model keeps the base's own tensors there, not the trained copies")
        for k in saved:
            extras.pop(k)
    for kind, allowed in (("embedding", rt.embeddings), ("conv", rt.conv)):
        if allowed:
            continue
        names = [n for n, m in modules.items() if m.kind == kind]
        refuse_or_drop(f"LoRA on {kind} modules", names, "those layers stay as in the base model")
        for n in names:
            modules.pop(n)
    names, what = unservable_dora(modules, rt)
    if names:
        refuse_or_drop(what, names,
                       "those modules now apply their plain LoRA delta without DoRA's renormalisation, so outputs "
                       "differ from the DoRA adapter",
                       hint="add --dora-to-lora BASE to write the closest plain LoRA for that base (error reported per "
                       "module), or --drop to remove the magnitudes (outputs then differ from the DoRA adapter)")
        for n in names:
            modules[n] = modules[n].with_(magnitude=None)
    if not rt.bias:
        names = [n for n, m in modules.items() if m.bias is not None]
        refuse_or_drop("LoRA bias deltas", names, "the layers' biases stay as in the base model")
        for n in names:
            modules[n] = modules[n].with_(bias=None)
    if not modules:
        raise IncompatibleError(f"{path}: no module left for {rt.name}")
    top = max(m.rank for m in modules.values())
    if rt.max_rank is not None and top > rt.max_rank:
        worst = next(n for n, m in modules.items() if m.rank == top)
        raise IncompatibleError(
            f"{path}: module '{worst}' has rank {top}, above {rt.name}'s ceiling {rt.max_rank}",
            hint=f"loratool resize {path} --rank {rt.max_rank} -o SMALLER, then convert SMALLER --for {rt.name}",
        )
    prepared = Prepared(adapter, dropped=dropped, warnings=warnings)
    heads = sorted({k.rsplit(".", 1)[0] for k in extras if ".base_layer." not in k and _allowed_extra(k, rt)})
    config["modules_to_save"] = heads or None
    if not any(m.bias is not None for m in modules.values()):
        config.pop("lora_bias", None)
    if rt.moe_expert_ranks == "projection":
        modules = pad_expert_ranks(modules, prepared)
    if rt.scale_rule == "direct_scale" or (rt.scale_rule == "peft_global" and not rt.patterns):
        modules = uniform(modules, prepared)
    prepared.adapter = adapter.with_modules(modules, extras=extras, config=config)
    return prepared


def pad_expert_ranks(modules: dict[str, LoraModule], prepared: Prepared) -> dict[str, LoraModule]:
    """The experts of each projection (`experts.N.up_proj` for every N) at one rank, their largest: a
    lower-rank expert gets zero rows in down and zero columns in up, and alpha = scale · rank (plain, not
    rsLoRA), so its delta is unchanged (exact)."""
    from loratool.maths.bake import pad_rank

    out = dict(modules)
    for projs in per_expert_modules(modules).values():
        for experts in projs.values():
            top = max(m.rank for m in experts.values())
            for m in experts.values():
                if m.rank == top:
                    continue
                up, down = pad_rank(m.up.load(), m.down.load(), top)
                out[m.name] = m.with_(up=TensorRef.from_tensor(up), down=TensorRef.from_tensor(down),
                                      alpha=m.scale * top, rslora=False, alpha_source="config")
                prepared.padded.append(m.name)
    return out


def uniform(modules: dict[str, LoraModule], prepared: Prepared) -> dict[str, LoraModule]:
    """One rank R (the largest) and one alpha for every module, every delta kept.

    The global scale is the most common module scale s_g, written as alpha = s_g·R (plain, not
    rsLoRA); a module with scale s_m ≠ s_g gets s_m / s_g baked into its up factor, and a module of
    rank r < R gets R − r zero rows in down and zero columns in up. Both are exact (the bake up to
    float32 rounding when a 16-bit factor must be widened, see maths.bake.bake_scale).
    """
    from loratool.maths.bake import bake_scale, pad_rank

    rank = max(m.rank for m in modules.values())
    counts = Counter(m.scale for m in modules.values() if m.scale != 0)
    s_g = counts.most_common(1)[0][0] if counts else 1.0
    alpha = s_g * rank
    out: dict[str, LoraModule] = {}
    for name, m in modules.items():
        c = m.scale / s_g
        up, down = m.up, m.down
        if c != 1.0 or m.rank != rank:
            up_t, widened = bake_scale(m.up.load(), c)
            down_t = m.down.load()
            if widened:  # keep the pair in one dtype (widening is exact)
                down_t = down_t.to(up_t.dtype)
            up_t, down_t = pad_rank(up_t, down_t, rank)
            up, down = TensorRef.from_tensor(up_t), TensorRef.from_tensor(down_t)
            if c != 1.0:
                prepared.baked.append(name)
            if widened:
                prepared.widened.append(name)
        out[name] = m.with_(up=up, down=down, alpha=alpha, rslora=False, alpha_source="config")
    prepared.rank, prepared.alpha = rank, alpha
    return out


# ---------------------------------------------------------------------------------------------
# DoRA -> plain LoRA for a given base (an approximation, reported per module)


def dora_to_lora(adapter: Adapter, base: str | os.PathLike[str]) -> tuple[Adapter, dict[str, float]]:
    """Replace every DoRA module by the best plain LoRA of its rank for the weights of `base`.

    Each module's DoRA result on that base, W' − W, is full rank in general; its best rank-r
    factors are written (scale 1) and the relative Frobenius error of each is returned, by module.
    Exact only where the magnitude equals the merged row norm. Valid for that base only.

    Raises:
        IncompatibleError: a DoRA module that matches no single base weight, or one whose layout
            (embedding, fan_in_fan_out) has no DoRA here.
    """
    import torch

    from loratool.io.checkpoint import open_checkpoint
    from loratool.io.tensors import load_tensor
    from loratool.keymap import match_modules
    from loratool.maths.bake import dora_as_lora
    from loratool.maths.delta import factors

    dora = [m for m in adapter.modules.values() if m.magnitude is not None]
    if not dora:
        return adapter, {}
    ckpt = open_checkpoint(base)
    match = match_modules(dora, ckpt.tensors)
    missing = [m.name for m in dora if m.name not in match.matched]
    if missing:
        raise IncompatibleError(
            f"{adapter.path}: DoRA module(s) match no single weight of {base}: {_listing(missing)}",
            hint="pass the base model the adapter was trained for (check with: loratool validate ADAPTER --base BASE)",
        )
    modules = dict(adapter.modules)
    errors: dict[str, float] = {}
    for m in dora:
        if m.kind == "embedding" or m.fan_in_fan_out:
            raise IncompatibleError(f"{adapter.path}: DoRA module '{m.name}' is an embedding or fan_in_fan_out layer; "
                                    "only DoRA on linear and conv layers is folded")
        assert m.magnitude is not None
        w = load_tensor(ckpt.tensors[match.matched[m.name]]).to(torch.float32)  # (out, in[, kh, kw])
        up, down = factors(m)
        new_up, new_down, err = dora_as_lora(w, up, down, m.scale, m.magnitude.load(), m.rank, m.dora_axis)
        dtype = m.up.load().dtype
        new_up = new_up.to(dtype).reshape(m.out_features, -1, *([1] * (len(m.up.shape) - 2)))
        new_down = new_down.to(dtype).reshape(-1, *m.down.shape[1:])
        modules[m.name] = m.with_(up=TensorRef.from_tensor(new_up), down=TensorRef.from_tensor(new_down),
                                  alpha=float(new_down.shape[0]), rslora=False, magnitude=None, alpha_source="config")
        errors[m.name] = err
    return adapter.with_modules(modules), errors
