"""PEFT: a directory with adapter_config.json + adapter_model.safetensors.

Keys: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (`.lora_B.bias` with lora_bias),
`.lora_magnitude_vector` (DoRA), `.lora_embedding_A` / `.lora_embedding_B`, and modules_to_save
copies as `base_model.model.<module>.weight`. Alpha and rank come from the config: `r`,
`lora_alpha`, `use_rslora`, and per-module `rank_pattern` / `alpha_pattern` matched as peft does.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule, scale_for
from loratool.errors import FormatError
from loratool.families.moe import PEFT_CONVERTED_TARGETS
from loratool.formats._common import (
    Findings,
    HeaderConfig,
    RawModule,
    build_module,
    header_config,
    is_unsupported,
    json_config,
    lora_b_bias,
    open_tensor_file,
)
from loratool.formats.names import PEFT_PREFIX
from loratool.formats.peft_experts import stack_experts, take_expert_params, wrapper_keys
from loratool.formats.registry import Capabilities, Format
from loratool.formats.tensorfile import TensorFile
from loratool.io.paths import folder_file
from loratool.io.tensors import TensorRef
from loratool.io.writers import write_text_output
from loratool.patterns import SafePattern, compile_pattern

PREFIX = PEFT_PREFIX
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
MLX_WEIGHTS = ("adapters.safetensors", "adapters.npz")

# key suffix -> (role in RawModule, is embedding)
_SUFFIXES: tuple[tuple[str, str, bool], ...] = (
    (".lora_A.weight", "down", False),
    (".lora_B.weight", "up", False),
    (".lora_B.bias", "bias", False),
    (".lora_embedding_A", "down", True),
    (".lora_embedding_B", "up", True),
    (".lora_magnitude_vector.weight", "magnitude", False),
    (".lora_magnitude_vector", "magnitude", False),
    # DiffSynth-Studio saves peft's state dict with the adapter's name ("default") left in, no prefix
    (".lora_A.default.weight", "down", False),
    (".lora_B.default.weight", "up", False),
)

# LoraConfig defaults that matter for reading (peft's own defaults)
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8


def split_key(key: str) -> tuple[str, str, bool] | None:
    """'<prefix><module><suffix>' -> (module, role, embedding), or None for a non-LoRA key."""
    for suffix, role, embedding in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, embedding
    return None


def strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def base_key(extra: str) -> str:
    """The base-model key a saved full tensor replaces (peft stores wrapped layers' copies under
    `.base_layer.`, e.g. `model.embed_tokens.base_layer.weight`)."""
    return extra.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


# a name with escapes (`\.`, `\-`: re.escape's output) and unescaped `.` wildcards, nothing else of regex
_NAME_LIKE = re.compile(r"(?:\\[^0-9A-Za-z_]|[^\\^$*+?{}\[\]|()])*", re.S)
_ESCAPE = re.compile(r"(\\.)", re.S)
_DOT = re.compile(r"\.")


def _plain_key(key: str) -> tuple[bool, str, frozenset[int]] | None:
    """A pattern key that is a name, possibly with unescaped `.` wildcards: (anchored by a leading
    `^`, the name, positions of the wildcard dots); None when it is a real regex."""
    anchored = key.startswith("^")
    text = key[1:] if anchored else key
    if not _NAME_LIKE.fullmatch(text):
        return None
    if "\\" not in text:
        return anchored, text, frozenset(m.start() for m in _DOT.finditer(text))
    if "." not in _ESCAPE.sub("", text):  # re.escape's output: every dot escaped, no wildcards
        return anchored, _ESCAPE.sub(lambda m: m.group(0)[1], text), frozenset()
    out: list[str] = []
    wild: list[int] = []
    size = 0
    for part in _ESCAPE.split(text):
        if part.startswith("\\") and len(part) == 2:
            out.append(part[1])
            size += 1
        else:
            wild.extend(size + m.start() for m in _DOT.finditer(part))
            out.append(part)
            size += len(part)
    return anchored, "".join(out), frozenset(wild)


class PatternLookup:
    r"""rank_pattern / alpha_pattern lookup with peft's rule, built once per pattern dict.

    peft's get_pattern_key returns the first key (in dict order) for which
    `re.match(rf"(.*\.)?({key})$", name)` matches, compiling a regex per key per module; with a
    pattern per module (what dynamic resize writes) that is quadratic and thrashes re's cache.
    Here keys that are names (escaped or not; unescaped dots match any character, as in the regex)
    are looked up in hash tables by every dotted suffix of the name, and only real regexes are
    compiled (once) and tried in order.
    """

    def __init__(self, patterns: dict[str, Any], refused: list[tuple[str, str]] | None = None) -> None:
        """refused, when given, receives (key, reason) for each key that is not a usable regex (never
        matched, as peft would fail to load the config)."""
        self._keys = list(patterns)
        # length -> [(anchored, wildcard positions, masked name -> first index)]
        self._tables: dict[int, dict[tuple[bool, frozenset[int]], dict[str, int]]] = {}
        self._regexes: list[tuple[int, SafePattern]] = []
        for i, key in enumerate(self._keys):
            plain = _plain_key(key)
            if plain is None:
                try:
                    self._regexes.append((i, compile_pattern(rf"(.*\.)?({key})$")))
                except re.error as e:  # never matches (peft would fail to load such a config)
                    if refused is not None:
                        refused.append((key, str(e)))
                continue
                continue
            anchored, text, wild = plain
            group = self._tables.setdefault(len(text), {}).setdefault((anchored, wild), {})
            group.setdefault(_mask(text, wild), i)

    def key(self, name: str) -> str | None:
        """The first pattern key that matches `name`, or None."""
        best: int | None = None
        if self._tables:
            starts = [0] + [j + 1 for j, c in enumerate(name) if c == "."]
            for start in starts:
                suffix = name[start:]
                for (anchored, wild), table in self._tables.get(len(suffix), {}).items():
                    if anchored and start:
                        continue
                    if wild and any(suffix[j] == "\n" for j in wild):
                        continue
                    i = table.get(_mask(suffix, wild))
                    if i is not None and (best is None or i < best):
                        best = i
        for i, rx in self._regexes:
            if best is not None and i > best:
                break
            if rx.match(name):
                best = i
                break
        return None if best is None else self._keys[best]


def _shown_key(key: str) -> str:
    return repr(key) if len(key) <= 80 else f"{key[:60]!r}... ({len(key)} characters)"


def _mask(text: str, wild: frozenset[int]) -> str:
    if not wild:
        return text
    return "".join("." if j in wild else c for j, c in enumerate(text))


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first pattern that matches `name` the way peft's get_pattern_key does (suffix or regex).
    For many lookups in one dict build a PatternLookup once."""
    return PatternLookup(patterns).key(name)


# GPT-2-family Conv1D layers (weights stored (in, out)): peft sets fan_in_fan_out=True for them at
# load time whatever the config says, so their deltas are transposed even in such adapters.
GPT2_CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|attn\.q_attn|mlp\.c_fc|mlp\.c_proj)$")


def raw_names(tf: TensorFile) -> list[str]:
    return [strip_prefix(parts[0]) for k in tf.tensors if (parts := split_key(k))]


def locate(path: Path) -> tuple[Path, Path]:
    """(config path, weights path) for a PEFT directory or a weights file beside its config.

    Raises:
        FormatError: no weights file in the directory.
    """
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists() and (path / PICKLE_NAME).exists():
            weights = path / PICKLE_NAME
        if not weights.exists():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise FormatError(
                f"{path}: PEFT adapter directory without {WEIGHTS_NAME} "
                f"(found: {', '.join(found) or 'nothing'})"
            )
        return folder_file(path, CONFIG_NAME), folder_file(path, weights.name)
    return folder_file(path.parent, CONFIG_NAME), path


def read(path: Path, *, allow_pickle: bool = False, findings: Findings | None = None) -> Adapter:
    """Read a PEFT adapter directory (or its weights file with the config beside it).

    Raises:
        FormatError / IncompatibleError: when strict (the default) and the adapter is broken.
    """
    findings = findings or Findings()
    _, weights_path = locate(path)
    tf = open_tensor_file(weights_path, allow_pickle=allow_pickle, findings=findings)
    return _with_config(tf, findings, root=path)


def from_file(tf: TensorFile, findings: Findings) -> Adapter:
    """A PEFT weights file read on its own: its config is looked for beside it."""
    return _with_config(tf, findings, root=tf.path)


def _with_config(tf: TensorFile, findings: Findings, *, root: Path) -> Adapter:
    config_path = tf.path.parent / CONFIG_NAME
    config: dict[str, Any] = {}
    header = None
    if config_path.exists():
        config = json_config(config_path, findings) or {}
    elif root == tf.path:
        # one file on its own (diffusers save_lora_adapter, ComfyUI, SimpleTuner): the LoRA config,
        # if any, is in its header
        header = header_config(tf.metadata, None, tf.path, findings)
        if header is None and not any(k.endswith(".alpha") for k in tf.tensors):
            findings.warning("config-missing", None,
                             f"{tf.path}: no {CONFIG_NAME} beside it and no LoRA config in its header metadata; "
                             "alpha is implied (= rank) for every module")
    else:
        findings.warning(
            "config-missing", None,
            f"{config_path}: not found; alpha is implied (= rank) for every module",
        )
    return from_tensors(tf, config, findings, root=root, config_path=config_path if config_path.exists() else None,
                        header=header)


def from_tensors(
    tf: TensorFile, config: dict[str, Any], findings: Findings, *, root: Path, config_path: Path | None,
    header: HeaderConfig | None = None,
) -> Adapter:
    """Build the Adapter from a file's tensors and its config (adapter_config.json).

    With `header` (a single file without a config beside it, whose header metadata holds the LoRA
    config), that config is used instead and alpha comes from "metadata"; the file's key prefix is
    recorded (Adapter.key_prefix) so writing keeps the single-file dialect.
    """
    where: Path | str | None = config_path
    if header is not None:
        config, where = header.config, f"{tf.path}: {header.origin}"
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        findings.error("unsupported-type", None,
                       f"{where}: peft_type is {peft_type}; only LORA adapters are supported",
                       exc=FormatError)
    has_config = bool(config)
    # a config file without r means peft's default; header metadata without r says nothing about rank
    r_value = config.get("r", _DEFAULT_R if header is None else None)
    r_default = None if r_value is None else _int(r_value, "r", where, findings)  # None: unknown or invalid
    alpha_default = _num(config.get("lora_alpha", _DEFAULT_ALPHA), "lora_alpha", where, findings)
    rank_pattern = _dict(config.get("rank_pattern"), "rank_pattern", where, findings)
    alpha_pattern = _dict(config.get("alpha_pattern"), "alpha_pattern", where, findings)
    rslora = _bool(config.get("use_rslora", False), "use_rslora", where, findings)
    use_dora = _bool(config.get("use_dora", False), "use_dora", where, findings)
    fan_in_fan_out = _bool(config.get("fan_in_fan_out", False), "fan_in_fan_out", where, findings)
    refused: list[tuple[str, str]] = []
    rank_lookup = PatternLookup(rank_pattern, refused)
    alpha_lookup = PatternLookup(alpha_pattern, refused)
    for key, reason in refused:
        findings.error("config-invalid", None,
                       f"{where}: pattern key {_shown_key(key)} (rank_pattern / alpha_pattern) is not a usable "
                       f"regular expression ({reason})",
                       hint="peft cannot load this adapter either; fix or remove the key", exc=FormatError)
    targets = config.get("target_modules")
    if isinstance(targets, str):  # peft reads a string as one regex (re.fullmatch)
        try:
            compile_pattern(targets)
        except re.error as e:
            findings.error("config-invalid", None,
                           f"{where}: 'target_modules' is not a valid regular expression ({e})",
                           hint="peft cannot load this adapter either; fix target_modules", exc=FormatError)
    elif targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        findings.error("config-invalid", None,
                       f"{where}: 'target_modules' must be a list of module names or one regex, got {targets!r:.200}",
                       hint="peft cannot load this adapter either; fix target_modules", exc=FormatError)
    if config.get("fan_in_fan_out") is False and any(GPT2_CONV1D.search(n) for n in raw_names(tf)):
        findings.warning(
            "fan-in-fan-out-forced", None,
            f"{config_path}: fan_in_fan_out is false but GPT-2 Conv1D layers are targeted; peft forces it "
            "to true for those layers, and so does loratool",
        )

    raw: dict[str, RawModule] = {}
    extras: dict[str, TensorRef] = {}
    unsupported: list[str] = []
    # A single file with PEFT keys and a 0-d `<module>.alpha` beside them (ComfyUI-style files, kohya
    # files renamed to lora_A/lora_B): the tensor is the module's alpha, as ComfyUI reads it.
    alpha_tensors: dict[str, TensorRef] = {}
    for key, ref in tf.tensors.items():
        parts = split_key(key)
        if parts is None and config_path is None and key.endswith(".alpha") and ref.numel <= 1:
            alpha_tensors[strip_prefix(key[: -len(".alpha")])] = ref
            continue
        if parts is None:
            if is_unsupported(key) or "trainable_tokens" in key:
                unsupported.append(key)
            else:
                extras[strip_prefix(key)] = ref
            continue
        name, role, embedding = parts
        name = strip_prefix(name)
        rm = raw.setdefault(name, RawModule())
        rm.put(role, ref, key, name, findings, tf.path)
        rm.embedding = rm.embedding or embedding
    expert_modules: dict[str, LoraModule] = {}
    if config.get("target_parameters"):
        def rank_of(path: str) -> int | None:
            key = rank_lookup.key(path)
            return (_int(rank_pattern[key], f"rank_pattern['{key}']", where, findings)
                    if key is not None else r_default)

        def alpha_of(path: str) -> tuple[float, str]:
            key = alpha_lookup.key(path)
            if key is not None:
                return _num(alpha_pattern[key], f"alpha_pattern['{key}']", where, findings), "pattern"
            return alpha_default, "config"

        expert_modules = take_expert_params(raw, config, rank_of=rank_of, alpha_of=alpha_of,
                                            module_target=lambda m: _targets_cover(targets, [m]), rslora=rslora,
                                            findings=findings, where=tf.path)
    wrapped = _wrapped_layers(raw)

    modules: dict[str, LoraModule] = {}
    for name, rm in raw.items():
        alpha_key = alpha_lookup.key(name)
        if name in alpha_tensors:
            alpha, source = alpha_tensors.pop(name).scalar(), "tensor"
            if has_config and alpha != _num(alpha_pattern[alpha_key] if alpha_key is not None else alpha_default,
                                            "lora_alpha", where, findings):
                findings.error("config-invalid", name,
                               f"{tf.path}: the '{name}' alpha tensor ({alpha:g}) and the header metadata "
                               "disagree about lora_alpha",
                               hint="one of them is stale; remove the wrong one", exc=FormatError)
        elif not has_config:
            alpha, source = None, "implied"
        elif alpha_key is not None:
            alpha, source = _num(alpha_pattern[alpha_key], f"alpha_pattern['{alpha_key}']", where,
                                 findings), "pattern" if header is None else "metadata"
        else:
            alpha, source = alpha_default, "config" if header is None else "metadata"
        module = build_module(
            name, rm, alpha=alpha, alpha_source=source, rslora=rslora,  # type: ignore[arg-type]
            fan_in_fan_out=fan_in_fan_out or bool(GPT2_CONV1D.search(name)), findings=findings, where=tf.path,
        )
        if module is None:
            continue
        if has_config:
            rank_key = rank_lookup.key(name)
            expected = (_int(rank_pattern[rank_key], f"rank_pattern['{rank_key}']", where, findings)
                        if rank_key is not None else r_default)
            if expected is not None and module.rank != expected:
                origin = f"rank_pattern['{rank_key}']" if rank_key is not None else "r"
                findings.error(
                    "config-rank-mismatch", name,
                    f"{tf.path}: module '{name}' has rank {module.rank} (down {module.down.shape}) "
                    f"but {_config_label(config_path, header)} {origin} says {expected}",
                    hint="peft will refuse to load it; fix r / rank_pattern in adapter_config.json"
                    if header is None else "the header metadata does not describe these tensors",
                )
                continue
            if use_dora and module.magnitude is None:
                findings.error("config-inconsistent", name,
                               f"{tf.path}: use_dora is true but module '{name}' has no lora_magnitude_vector")
                continue
        modules[name] = module
    modules.update(expert_modules)
    for name, ref in alpha_tensors.items():  # an alpha without its module is an extra full tensor
        extras[name + ".alpha"] = ref
    _fold_wrapped_copies(wrapped, raw, modules, extras, unsupported, findings, tf.path)
    if has_config and not use_dora and any(m.magnitude is not None for m in modules.values()):
        findings.error("config-inconsistent", None,
                       f"{tf.path}: has lora_magnitude_vector tensors but use_dora is false in {CONFIG_NAME}")
    base_model = config.get("base_model_name_or_path") or None
    key_prefix = None
    if config_path is None or not config_path.exists() or header is not None:
        key_prefix = PREFIX if any(k.startswith(PREFIX) for k in tf.tensors) else ""
    return Adapter(
        modules=modules, source_format="peft", extras=extras, config=config, metadata=tf.metadata,
        base_model=str(base_model) if base_model else None, unsupported=unsupported, path=root,
        files=[tf.path] + ([config_path] if config_path and config_path.exists() and header is None else []),
        source_modules=tuple(modules), key_prefix=key_prefix,
    )


_WRAPPED = (".modules_to_save", ".original_module")


def _wrapped_layers(raw: dict[str, RawModule]) -> list[str]:
    """Layers whose LoRA sits in peft's modules_to_save wrapper (`classifier.modules_to_save.lora_A`)."""
    return sorted({n.rsplit(".", 1)[0] for n in raw if n.endswith(_WRAPPED)})


def _fold_wrapped_copies(layers: list[str], raw: dict[str, RawModule], modules: dict[str, LoraModule],
                         extras: dict[str, TensorRef], unsupported: list[str], findings: Findings,
                         where: Path) -> None:
    """A LoRA on a layer that is also in modules_to_save, modelled as peft runs it.

    Older peft wrapped such a layer twice: the modules_to_save wrapper holds a frozen
    `original_module` and a trained copy, and the LoRA went into both. Its file holds the trained
    copy's weights (`classifier.base_layer.weight`, `.bias`), the trained copy's LoRA twice
    (`classifier.lora_A` and `classifier.modules_to_save.lora_A`: one tensor saved by two paths) and
    the frozen copy's LoRA (`classifier.original_module.lora_A`, never used once the adapter is
    active). What peft computes for the layer is the trained copy plus its LoRA, so that is what the
    layer becomes here: one modules_to_save tensor `classifier.weight = base_layer.weight + ΔW` (and
    `.bias`), made when it is loaded; current peft (which lets modules_to_save win over a LoRA on the
    same layer) loads it and computes the same. Read as separate modules, the delta would be applied
    three times. What cannot be modelled (no trained weights in the file, DoRA on the copy) is set
    aside as unsupported, so operations refuse it by name.
    """
    for layer in layers:
        trained, saved, frozen = (modules.pop(layer + ".modules_to_save", None), modules.pop(layer, None),
                                  modules.pop(layer + ".original_module", None))
        lora = trained or saved
        weight = extras.get(layer + ".base_layer.weight")
        reason = None
        if lora is None:
            reason = "only the frozen original_module copy has a LoRA"
        elif weight is None:
            reason = "the trained copy's weights (base_layer.weight) are not in the file"
        elif lora.magnitude is not None:
            reason = "DoRA on a modules_to_save copy"
        elif trained is not None and saved is not None and (
                trained.up.shape != saved.up.shape or trained.down.shape != saved.down.shape):
            reason = "its two saved copies of the trained LoRA differ in shape"
        elif lora.base_shape != weight.shape:
            reason = f"the LoRA's shape {lora.base_shape} does not fit base_layer.weight {weight.shape}"
        if reason is not None or lora is None or weight is None:
            _set_aside(layer, raw, unsupported)
            for key in [k for k in extras if k.startswith(layer + ".")]:
                extras.pop(key)
                unsupported.append(PREFIX + key)
            findings.warning("unsupported-layout", layer,
                             f"{where}: LoRA on the modules_to_save layer '{layer}' cannot be modelled ({reason}); "
                             "its tensors are left aside")
            continue
        twin = saved if trained is not None else None
        extras.pop(layer + ".base_layer.weight")
        extras[layer + ".weight"] = TensorRef.computed(
            weight.shape, weight.dtype, partial(_folded_weight, weight, lora, twin),
            f"{where}: '{layer}' (modules_to_save weights with their LoRA folded in)")
        bias = extras.pop(layer + ".base_layer.bias", None)
        if lora.bias is not None and bias is None:
            _set_aside(layer, raw, unsupported)
            extras.pop(layer + ".weight")
            unsupported.append(PREFIX + layer + ".base_layer.weight")
            findings.warning("unsupported-layout", layer,
                             f"{where}: the modules_to_save layer '{layer}' has a LoRA bias but no base_layer.bias; "
                             "its tensors are left aside")
            continue
        if bias is not None:
            extras[layer + ".bias"] = bias if lora.bias is None else TensorRef.computed(
                bias.shape, bias.dtype, partial(_folded_bias, bias, lora),
                f"{where}: '{layer}' (modules_to_save bias with its LoRA bias folded in)")
        for key in [k for k in extras if k.startswith(layer + ".base_layer.")]:
            extras[key.replace(".base_layer.", ".", 1)] = extras.pop(key)
        if frozen is not None:
            findings.warning("inactive-copy", layer,
                             f"{where}: '{layer}.original_module' holds a LoRA on peft's frozen copy of a "
                             "modules_to_save layer, which peft never runs; it is left out")


def _set_aside(layer: str, raw: dict[str, RawModule], unsupported: list[str]) -> None:
    """The LoRA tensors of a wrapped layer's copies, as unsupported (the wrapped copies' first, so
    messages name the layout by its marker)."""
    for n in (layer + ".modules_to_save", layer + ".original_module", layer):
        if n in raw:
            unsupported.extend(raw[n].keys)


def _folded_weight(weight: TensorRef, lora: LoraModule, twin: LoraModule | None) -> Any:
    from loratool.maths.delta import delta

    if twin is not None:
        for a, b in ((lora.up, twin.up), (lora.down, twin.down)):
            if not bool((a.load() == b.load()).all()):
                raise FormatError(f"{a.source} and {b.source}: the two saved copies of the trained LoRA differ",
                                  hint="the file is inconsistent; re-save the adapter with peft")
    w = weight.load()
    return (w.float() + delta(lora)).to(w.dtype)


def _folded_bias(bias: TensorRef, lora: LoraModule) -> Any:
    assert lora.bias is not None
    b = bias.load()
    return (b.float() + lora.bias.load().float() * lora.bias_scale).to(b.dtype)


def _config_label(config_path: Path | None, header: HeaderConfig | None) -> str:
    if header is not None:
        return f"the header metadata ({header.origin})"
    return config_path.name if config_path else "the config"


def _bool(v: Any, field: str, where: Path | str | None, findings: Findings) -> bool:
    """A true/false config value; a string such as "false" is an error, never taken as true."""
    if not isinstance(v, bool):
        findings.error("config-invalid", None, f"{where}: '{field}' must be true or false, got {v!r}",
                       hint="write JSON true/false without quotes", exc=FormatError)
        return False
    return v


def _int(v: Any, field: str, where: Path | str | None, findings: Findings) -> int | None:
    """A positive integer config value; None (after a config-invalid finding) when it is not one."""
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        findings.error("config-invalid", None, f"{where}: '{field}' must be a positive integer, got {v!r}",
                       exc=FormatError)
        return None
    return v


def _num(v: Any, field: str, where: Path | str | None, findings: Findings) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        findings.error("config-invalid", None, f"{where}: '{field}' must be a number, got {v!r}",
                       exc=FormatError)
        return float(_DEFAULT_ALPHA)
    try:
        return float(v)
    except OverflowError:  # an integer literal such as 10**400
        findings.error("config-invalid", None, f"{where}: '{field}' is {len(str(v))} digits long, beyond any "
                       "floating-point number", exc=FormatError)
        return float(_DEFAULT_ALPHA)


def _dict(v: Any, field: str, where: Path | str | None, findings: Findings) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        findings.error("config-invalid", None, f"{where}: '{field}' must be an object, got {v!r}",
                       exc=FormatError)
        return {}
    return v


# ---------------------------------------------------------------------------------------------
# writing


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def build_config(adapter: Adapter) -> tuple[dict[str, Any], dict[str, float]]:
    """The adapter_config.json for `adapter`, and the alpha to store per module.

    Global r is the config's r when a module has that rank (extract asks for the largest), else the
    most common rank; lora_alpha is the most common alpha; other modules go to rank_pattern /
    alpha_pattern under their exact (escaped) names. use_rslora is per adapter in PEFT, so when
    modules disagree, rslora modules get their alpha converted to keep the scale exactly.
    """
    every = list(adapter.modules.values())
    plain = [m for m in every if m.expert is None]
    stacks = stack_experts([m for m in every if m.expert is not None], adapter.path)
    mods = plain + [one for _, one in stacks.values()]  # a fused parameter's r and alpha: one of its experts
    use_rslora = bool(mods) and all(m.rslora for m in mods)
    alphas = {m.name: (m.alpha if m.rslora == use_rslora else _converted_alpha(m, use_rslora)) for m in mods}
    r = Counter(m.rank for m in mods).most_common(1)[0][0] if mods else _DEFAULT_R
    wanted = adapter.config.get("r") if adapter.source_format == "peft" else None
    if isinstance(wanted, int) and any(m.rank == wanted for m in mods):
        r = wanted  # the config's own r while some module still has it (a read -> write keeps it)
    alpha = Counter(alphas.values()).most_common(1)[0][0] if mods else float(_DEFAULT_ALPHA)
    key = _exact_pattern_keys([m.name for m in mods])
    rank_pattern = {key[m.name]: m.rank for m in mods if m.rank != r}
    alpha_pattern = {key[m.name]: _number(alphas[m.name]) for m in mods if alphas[m.name] != alpha}

    config: dict[str, Any] = dict(adapter.config) if adapter.source_format == "peft" else {}
    names = [m.name for m in plain]
    targets = config.get("target_modules")
    if (set(adapter.modules) != set(adapter.source_modules) or not _targets_cover(targets, names)
            or (stacks and _peft_converts(targets))):
        # the source's target_modules may name layers this adapter no longer holds (peft would
        # create them, randomly initialised with init_lora_weights=false): list exact paths instead.
        # Beside experts, a name like `gate_proj` makes peft (0.21 for Qwen3-MoE / Mixtral, 0.22 for
        # Qwen2-MoE too) add target_parameters and a rank_pattern `.*\.gate_up_proj` of 2·r, which need
        # not describe our factors (a 0.21 file, a resize); exact Linear paths leave it nothing to do
        targets = sorted(names)
    # `<layer>.base_layer.weight` extras are peft's save_embedding_layers copies of a LoRA layer's
    # base weight: they load straight into the base layer, and naming them in modules_to_save would
    # make peft wrap (and train, and save) a second copy
    extras_modules = sorted({k.rsplit(".", 1)[0] for k in adapter.extras if ".base_layer." not in k})
    modules_to_save = config.get("modules_to_save") or (extras_modules or None)
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=_number(alpha),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=use_rslora,
        use_dora=any(m.magnitude is not None for m in mods),
        fan_in_fan_out=any(m.fan_in_fan_out for m in mods),
        target_modules=targets,
        modules_to_save=modules_to_save,
        base_model_name_or_path=adapter.base_model or config.get("base_model_name_or_path"),
        lora_bias=any(m.bias is not None for m in mods),
    )
    if stacks:
        params = config.get("target_parameters")
        if set(adapter.modules) != set(adapter.source_modules) or not _targets_cover(params, list(stacks)):
            config["target_parameters"] = sorted(stacks)
    else:
        config.pop("target_parameters", None)
    config.setdefault("task_type", None)
    config.setdefault("bias", "none")
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("inference_mode", True)
    for m in mods:  # the written alpha must reproduce the module's scale exactly
        assert abs(scale_for(alphas[m.name], m.rank, use_rslora) - m.scale) <= 1e-9 * max(1, abs(m.scale))
    return config, alphas


def _exact_pattern_keys(names: list[str]) -> dict[str, str]:
    """A rank_pattern / alpha_pattern key per module name that peft matches to that module only.

    peft matches a key against any dotted suffix of a module path (`(.*\\.)?(key)$`), so the escaped
    name of `layers.0.q_proj` would also claim `model.layers.0.q_proj`; such names get a `^` anchor
    (it only matches when nothing precedes the key). Other names stay plain for readability.
    """
    suffixes = {n.split(".", i)[i] for n in names for i in range(1, n.count(".") + 1)}
    return {n: ("^" if n in suffixes else "") + re.escape(n) for n in names}


def _targets_cover(targets: Any, names: list[str]) -> bool:
    if isinstance(targets, str):
        try:
            rx = compile_pattern(targets)
            return all(rx.fullmatch(n) for n in names)
        except re.error:
            return False
    if isinstance(targets, list) and targets:
        return all(any(n == t or n.endswith("." + t) for t in targets) for n in names)
    return False


def _peft_converts(targets: Any) -> bool:
    """Whether peft may turn some of `target_modules` into target_parameters (families.moe)."""
    if not isinstance(targets, list):
        return bool(targets)  # a regex: peft resolves it to leaf names first
    return any(t.rpartition(".")[2] in PEFT_CONVERTED_TARGETS for t in targets if isinstance(t, str))


def _converted_alpha(m: LoraModule, to_rslora: bool) -> float:
    s = m.scale
    return s * (m.rank**0.5) if to_rslora else s * m.rank


def module_tensors(key: str, m: LoraModule) -> dict[str, Any]:
    """One module's tensors in PEFT's key layout under `key` (diffusers files use the same suffixes)."""
    if m.kind == "embedding":
        out = {key + ".lora_embedding_A": m.down.load(), key + ".lora_embedding_B": m.up.load()}
    else:
        out = {key + ".lora_A.weight": m.down.load(), key + ".lora_B.weight": m.up.load()}
    if m.bias is not None:
        out[key + ".lora_B.bias"] = lora_b_bias(m)
    if m.magnitude is not None:
        out[key + ".lora_magnitude_vector"] = m.magnitude.load().reshape(-1)
    return out


def state_dict(adapter: Adapter, prefix: str = PREFIX) -> dict[str, Any]:
    """Tensors in PEFT key layout. The factors are stored as they are (alpha carries the scale)."""
    out: dict[str, Any] = {}
    experts = []
    for m in adapter.modules.values():
        if m.expert is not None:
            experts.append(m)
            continue
        out.update(module_tensors(prefix + m.name, m))
    if experts:
        stacks = stack_experts(experts, adapter.path)
        keys = wrapper_keys(list(stacks))
        for param, (stacked, _) in stacks.items():
            out.update(module_tensors(prefix + keys[param], stacked))
    for key, ref in adapter.extras.items():
        out[prefix + key] = ref.load()
    return out


def write(adapter: Adapter, out_dir: Path, metadata: dict[str, str]) -> None:
    """Write `adapter` as a PEFT directory into the (empty, temporary) directory `out_dir`."""
    from loratool.io.writers import save_tensors

    config, _ = build_config(adapter)
    save_tensors(out_dir / WEIGHTS_NAME, state_dict(adapter), {"format": "pt", **metadata})
    write_text_output(out_dir / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


# header keys a single file's LoRA config may be stored under (formats._common.header_config);
# a write replaces them all by one lora_adapter_metadata so no stale alpha survives a rescale
_STALE_HEADER_KEYS = ("lora_alpha", "alpha", "r")


def write_file(adapter: Adapter, out_file: Path, metadata: dict[str, str], prefix: str) -> None:
    """Write `adapter` as one .safetensors file with PEFT-style keys under `prefix` ('' as diffusers'
    save_lora_adapter writes them, or 'base_model.model.'), its LoraConfig in the header metadata
    `lora_adapter_metadata` (where diffusers puts it and where read() finds it again)."""
    from loratool.formats._common import ADAPTER_METADATA_KEY
    from loratool.io.writers import save_tensors

    config, alphas = build_config(adapter)
    for m in adapter.modules.values():
        if m.name not in alphas:
            continue
        assert abs(scale_for(alphas[m.name], m.rank, config["use_rslora"]) - m.scale) <= 1e-9 * max(1, abs(m.scale))
    meta = {}
    if adapter.source_format == "peft" and adapter.key_prefix is not None:
        meta = {k: v for k, v in adapter.metadata.items()
                if not k.startswith("loratool.") and k.rsplit(".", 1)[-1] not in _STALE_HEADER_KEYS}
    meta.update({"format": "pt", ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True), **metadata})
    save_tensors(out_file, state_dict(adapter, prefix), meta)

def _detect(keys: list[str]) -> int:
    """3: PEFT-prefixed LoRA keys; 1: LoRA keys in PEFT style without the prefix (after kohya and
    diffusers, whose layouts also use lora_A/lora_B names, had their say)."""
    if not any(split_key(k) for k in keys):
        return 0
    return 3 if any(k.startswith(PREFIX) for k in keys) else 1


def _is_adapter_dir(path: Path) -> bool:
    if (path / WEIGHTS_NAME).exists():
        return True
    # mlx-lm directories also hold an adapter_config.json (beside adapters.safetensors / .npz)
    return (path / CONFIG_NAME).exists() and not any((path / n).exists() for n in MLX_WEIGHTS)


FORMAT = Format(
    name="peft",
    summary="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
    naming="path",
    capabilities=Capabilities(bias=True, extras=True, fan_in_fan_out=True, embedding=True, dora=True, directory=True,
                              experts=True),
    detect=_detect,
    read_file=from_file,
    detect_dir=_is_adapter_dir,
    read_dir=lambda path, allow_pickle, findings: read(path, allow_pickle=allow_pickle, findings=findings),
    write=write,
    suffix="",
)
