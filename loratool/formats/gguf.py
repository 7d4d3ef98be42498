"""GGUF LoRA adapters (llama.cpp, Ollama), through the `gguf` package (optional: `pip install 'loratool[gguf]'`).

Facts read from ggml-org/llama.cpp on 2026-11-29 (convert_lora_to_gguf.py, src/llama-adapter.h/.cpp,
gguf-py):

- key-values `general.type = adapter`, `adapter.type = lora`, one `adapter.lora.alpha` (float32) for
  the file, and `general.architecture`;
- tensors `<gguf tensor name>.lora_a` / `.lora_b` (`blk.0.attn_q.weight.lora_a`), names from the gguf
  package's per-architecture tensor-name map (the one llama.cpp's converters use). In numpy order
  lora_a is peft's lora_A `(r, in)` and lora_b peft's lora_B `(out, r)`; `token_embd` stores lora_a
  transposed, `(n_vocab, r)`;
- the runtime scale of a tensor pair is `alpha / r` with r = that pair's own rank (alpha 0: scale 1),
  times the user's `--lora-scaled` factor;
- for llama-family models (arch `llama`) the converter permutes the rows of q and k weights (and so
  of lora_b) the way convert_hf_to_gguf.py's LlamaModel.permute does, with the attention head count
  (q) and the key-value head count (k).

loratool keeps GGUF adapters in their own naming: a module read from a GGUF adapter is named by its
GGUF tensor (`blk.0.attn_q`) and its factors are in GGUF's (permuted) layout, which is what a GGUF
base holds. `to_gguf_layout` turns a transformers-named adapter into that layout for an architecture
described by a base model (a transformers config.json or a GGUF model file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError, IncompatibleError, LoratoolError, scrub
from loratool.families.moe import INTERLEAVED
from loratool.formats._common import Findings, build_module, group_tensors
from loratool.formats.gguf_experts import (
    as_stack_member,
    expert_targets,
    is_stack,
    split_stack,
    stacked_factors,
    to_checkpoint_names,
)
from loratool.formats.gguf_file import _gguf, gguf_reader
from loratool.formats.registry import Capabilities, Format
from loratool.formats.tensorfile import TensorFile
from loratool.io.paths import folder_file
from loratool.io.tensors import TensorRef

if TYPE_CHECKING:
    import numpy as np
    import torch

SUFFIX = ".gguf"
ALPHA_KEY = "adapter.lora.alpha"
ARCH_KEY = "general.architecture"

# transformers `architectures[0]` -> gguf architecture name, as llama.cpp's convert_hf_to_gguf.py
# registers its model classes (read 2026-11-29). Only architectures checked here are listed: others
# are refused rather than named by a guess.
ARCH_OF_HF: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
    # mixture of experts (expert stacks: formats/gguf_experts.py)
    "MixtralForCausalLM": "llama",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "GptOssForCausalLM": "gpt-oss",
    "DeepseekV2ForCausalLM": "deepseek2",
    "DeepseekV3ForCausalLM": "deepseek2",
}
# config.json keys that give a MoE model's expert count, as convert_hf_to_gguf.py reads them
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# architectures whose converter permutes the q / k rows (LlamaModel.permute)
PERMUTED_QK = frozenset({"llama"})


def split_key(key: str) -> tuple[str, str] | None:
    """'blk.0.attn_q.weight.lora_a' -> ('blk.0.attn_q', 'down')."""
    for suffix, role in ((".weight.lora_a", "down"), (".weight.lora_b", "up")):
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _detect(keys: list[str]) -> int:
    return 5 if any(split_key(k) for k in keys) else 0


def from_file(tf: TensorFile, findings: Findings) -> Adapter:
    kind = tf.metadata.get("general.type")
    if kind is not None and kind != "adapter":
        raise FormatError(f"{tf.path}: is a GGUF {kind}, not a LoRA adapter (general.type = {kind})")
    if tf.metadata.get("adapter.type", "lora") != "lora":
        raise FormatError(f"{tf.path}: adapter.type is {tf.metadata['adapter.type']}; only lora is supported")
    raw_alpha = tf.metadata.get(ALPHA_KEY)
    try:
        alpha = float(raw_alpha) if raw_alpha is not None else 0.0
    except ValueError:
        raise FormatError(f"{tf.path}: {ALPHA_KEY} is {raw_alpha!r}, not a number") from None
    if raw_alpha is None:
        findings.warning("alpha-missing", None, f"{tf.path}: no {ALPHA_KEY}; llama.cpp applies scale 1")
    raw, unsupported = group_tensors(tf, split_key, findings)
    modules: dict[str, LoraModule] = {}
    for name in [n for n, rm in raw.items() if is_stack(n) and rm.down is not None and rm.up is not None]:
        modules.update(split_stack(name, raw.pop(name), alpha=alpha, findings=findings, where=tf.path))
    embedding = raw.get("token_embd")
    if embedding is not None:
        embedding.embedding = True
        if embedding.down is not None:  # stored (n_vocab, r): peft's lora_embedding_A is (r, n_vocab)
            embedding.down = TensorRef.from_tensor(embedding.down.load().T.contiguous())
    for name, rm in raw.items():
        r = rm.down.shape[0] if rm.down is not None else None
        # alpha 0 means scale 1 in llama.cpp: alpha = rank
        module = build_module(name, rm, alpha=(alpha if alpha else (float(r) if r else None)),
                              alpha_source="metadata", rslora=False, fan_in_fan_out=False, findings=findings,
                              where=tf.path)
        if module is not None:
            modules[name] = module
    config = {k: tf.metadata[k] for k in (ARCH_KEY, ALPHA_KEY) if k in tf.metadata}
    return Adapter(modules=modules, source_format="gguf", config=config, metadata={}, unsupported=unsupported,
                   path=tf.path, files=[tf.path], source_modules=tuple(modules))


# ---------------------------------------------------------------------------------------------
# transformers names -> GGUF names and layout


@dataclass(frozen=True)
class ArchInfo:
    """What naming and laying out tensors for one architecture needs."""

    arch: str  # gguf architecture name
    blocks: int
    heads: int | None
    kv_heads: int | None
    tensors: frozenset[str] | None = None  # the base's tensor names, when the base is a GGUF model
    experts: int | None = None  # experts per MoE layer (None: not a MoE model, or not stated)
    interleaved: frozenset[str] = frozenset()  # fused expert parameters whose parts alternate row by row


def arch_info(base: Path) -> ArchInfo:
    """The architecture of a base model: a transformers directory (its config.json is enough) or
    config.json itself, or a GGUF model file.

    Raises:
        IncompatibleError / FormatError: no config, or an architecture not in ARCH_OF_HF.
    """
    import json

    if base.suffix == SUFFIX:
        reader = gguf_reader(base)
        fields = reader.fields

        def value(key: str) -> Any:
            f = fields.get(key)
            return f.contents() if f is not None else None

        arch = value(ARCH_KEY)
        if not isinstance(arch, str):
            raise FormatError(f"{base}: GGUF file without {ARCH_KEY}")
        return ArchInfo(arch, int(value(f"{arch}.block_count") or 0), value(f"{arch}.attention.head_count"),
                        value(f"{arch}.attention.head_count_kv") or value(f"{arch}.attention.head_count"),
                        frozenset(t.name for t in reader.tensors), value(f"{arch}.expert_count") or None,
                        INTERLEAVED.get(arch.replace("-", "_"), frozenset()))
    from loratool.io.header import read_side_file

    cfg_path = base if base.name == "config.json" else folder_file(base, "config.json")
    try:
        top = json.loads(read_side_file(cfg_path).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise IncompatibleError(f"{cfg_path}: cannot read the base model's config ({_reason(e)})",
                                hint="pass --base with the transformers model directory (config.json is enough) "
                                "or the GGUF model file") from None
    if not isinstance(top, dict):
        raise IncompatibleError(f"{cfg_path}: the base model's config is a JSON {type(top).__name__}, "
                                "expected an object")
    cfg = top["text_config"] if isinstance(top.get("text_config"), dict) else top
    archs = cfg.get("architectures") or top.get("architectures") or []
    if not isinstance(archs, list):
        raise IncompatibleError(f"{cfg_path}: 'architectures' is {archs!r}, expected a list of class names")
    hf = archs[0] if archs else None
    if not isinstance(hf, str) or hf not in ARCH_OF_HF:
        raise IncompatibleError(f"{cfg_path}: architecture {hf!r} has no GGUF tensor naming loratool knows",
                                hint=f"supported: {', '.join(sorted(ARCH_OF_HF))}")
    heads = _config_int(cfg, "num_attention_heads", cfg_path)
    kv_heads = _config_int(cfg, "num_key_value_heads", cfg_path)
    experts = next((n for n in (_config_int(cfg, k, cfg_path) for k in EXPERT_COUNT_KEYS) if n), None)
    return ArchInfo(ARCH_OF_HF[hf], _config_int(cfg, "num_hidden_layers", cfg_path) or 0, heads, kv_heads or heads,
                    experts=experts, interleaved=INTERLEAVED.get(str(cfg.get("model_type")), frozenset()))


def _reason(e: BaseException) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def _config_int(cfg: dict[str, Any], key: str, where: Path) -> int | None:
    """A positive count from a config (None when absent); any other value names the key."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise IncompatibleError(f"{where}: '{key}' is {value!r}, expected a positive integer")
    return value


def permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, rows (pairs, halves) swapped as LlamaModel.permute."""
    out = t.shape[0]
    return t.reshape(heads, 2, out // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def unpermute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    out = t.shape[0]
    return t.reshape(heads, out // heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


_Q = re.compile(r"\.(q_proj|k_proj)$")


def to_gguf_layout(adapter: Adapter, info: ArchInfo) -> Adapter:
    """The adapter named and laid out as llama.cpp expects for `info`'s architecture.

    Raises:
        IncompatibleError: modules the architecture's name map does not know, or that the GGUF base
            does not hold (e.g. lm_head on a model with tied embeddings), all listed.
    """
    gguf = _gguf()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(info.arch)
    if arch_enum is None:
        raise IncompatibleError(f"the gguf package does not know architecture {info.arch!r}")
    tmap = gguf.get_tensor_name_map(arch_enum, max(info.blocks, 1))
    modules: dict[str, LoraModule] = {}
    unknown: list[str] = []
    for name, m in adapter.modules.items():
        key = name.removeprefix("base_model.model.")
        for prefix, repl in (("model.language_model.", "model."), ("language_model.", "")):
            if key.startswith(prefix):
                key = key.replace(prefix, repl, 1)
                break
        experts = expert_targets(key, m, info.interleaved)
        if experts is not None:
            for stacked, index, part in experts:
                target = tmap.get_name(stacked + ".weight", try_suffixes=(".weight",))
                if target is None or (info.tensors is not None and target not in info.tensors):
                    unknown.append(name)
                    break
                one = as_stack_member(target.removesuffix(".weight"), index, info.experts, part)
                modules[one.name] = one
            continue
        target = tmap.get_name(key + ".weight", try_suffixes=(".weight",))
        if target is None or (info.tensors is not None and target not in info.tensors):
            unknown.append(name)
            continue
        up = m.up
        hit = _Q.search(key)
        if info.arch in PERMUTED_QK and hit:
            heads = info.heads if hit.group(1) == "q_proj" else info.kv_heads
            if not heads:
                raise IncompatibleError(f"the base config has no attention head count, needed to permute '{name}'")
            up = TensorRef.from_tensor(permute_rows(m.up.load(), int(heads)))
        modules[target.removesuffix(".weight")] = m.with_(name=target.removesuffix(".weight"), up=up)
    if unknown:
        shown = ", ".join(unknown[:6]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 6 else "")
        raise IncompatibleError(
            f"{adapter.path}: {len(unknown)} module(s) have no GGUF tensor for architecture {info.arch}"
            + (" in the base model" if info.tensors is not None else "") + f": {shown}",
            hint="llama.cpp would ignore them; lm_head has no tensor of its own when the embeddings are tied",
        )
    return adapter.with_modules(modules, config={ARCH_KEY: info.arch}, source_format="gguf")


# ---------------------------------------------------------------------------------------------
# writing


def _array(t: torch.Tensor) -> np.ndarray:
    import torch

    if t.dtype not in (torch.float32, torch.float16):
        t = t.to(torch.float32)  # bf16 -> f32 is exact
    return t.contiguous().numpy()


def write(adapter: Adapter, out_file: Path, metadata: dict[str, str]) -> None:
    """Write `adapter` (GGUF names and layout, see to_gguf_layout) as a GGUF LoRA adapter.

    One alpha serves every tensor pair (llama.cpp scales each by alpha / its rank): alpha is the most
    common scale·rank, and any module whose scale·rank differs has the ratio baked into lora_b (exact;
    a 16-bit lora_b whose ratio is not a power of two is written as F32, see maths.bake.bake_scale).
    """
    from collections import Counter

    from loratool.maths.bake import bake_scale

    gguf = _gguf()
    arch = adapter.config.get(ARCH_KEY)
    if not isinstance(arch, str):
        raise IncompatibleError(f"{adapter.path}: the GGUF architecture is not known",
                                hint="convert with --to gguf --base BASE (a transformers config or a GGUF model)")
    products = Counter(m.scale * m.rank for m in adapter.modules.values() if m.scale != 0)
    alpha = products.most_common(1)[0][0] if products else 1.0
    writer = gguf.GGUFWriter(out_file, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for k, v in metadata.items():
        writer.add_string(scrub(k), scrub(v))  # no Hub token in an output (errors.scrub)
    stacks: dict[str, list[LoraModule]] = {}
    for m in adapter.modules.values():
        if m.expert is not None:
            stacks.setdefault(m.expert.param, []).append(m)
    for param, mods in stacks.items():
        down_stack, up_stack = stacked_factors(mods, float(alpha), adapter.path)
        writer.add_tensor(f"{param}.weight.lora_a", _array(down_stack))  # (E, r, in)
        writer.add_tensor(f"{param}.weight.lora_b", _array(up_stack))  # (E, out, r)
    for name, m in adapter.modules.items():
        if m.expert is not None:
            continue
        if m.kind not in ("linear", "embedding") or m.fan_in_fan_out:
            raise IncompatibleError(
                f"{adapter.path}: module '{name}' is a {m.kind} layer, which GGUF adapters cannot hold")
        up, _ = bake_scale(m.up.load(), m.scale * m.rank / alpha)
        down = m.down.load()
        if name == "token_embd":
            down = down.T  # llama.cpp gathers rows of lora_a by token: (n_vocab, r)
        writer.add_tensor(f"{name}.weight.lora_a", _array(down))
        writer.add_tensor(f"{name}.weight.lora_b", _array(up))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _layout_in(adapter: Adapter, base: Path | None, source: Path) -> Adapter:
    if base is None:
        raise IncompatibleError(f"{source}: GGUF module names (blk.N.…) map back to transformers names only "
                                "against the base checkpoint", hint="pass --base with the transformers model "
                                "directory (its safetensors headers are read)")
    return from_gguf_layout(adapter, base)


def _layout_out(adapter: Adapter, base: Path | None, source: Path) -> Adapter:
    if base is None:
        raise IncompatibleError(
            f"{source}: GGUF tensor names and the q/k row order depend on the model architecture",
            hint="pass --base: the base model's transformers directory (config.json is enough) or its GGUF file",
        )
    return to_gguf_layout(adapter, arch_info(base))


FORMAT = Format(
    name="gguf",
    summary="llama.cpp GGUF LoRA adapter (one file; one adapter.lora.alpha, GGUF tensor names)",
    naming="path",
    # per-module scales are held by baking them into lora_b against the file's one alpha
    capabilities=Capabilities(bias=False, extras=False, fan_in_fan_out=False, embedding=True, conv=False, dora=False,
                              per_module_alpha=True, metadata=True, directory=False, experts=True),
    detect=_detect,
    read_file=from_file,
    write=write,
    suffix=SUFFIX,
    layout_in=_layout_in,
    layout_out=_layout_out,
)


def from_gguf_layout(adapter: Adapter, base: Path) -> Adapter:
    """A GGUF adapter back in transformers naming and row order, for the checkpoint `base`.

    The gguf package's name map sends many transformers names to one GGUF name, so each module's
    name is the single candidate the base checkpoint holds (its safetensors headers are read);
    llama's q / k rows are un-permuted.

    Raises:
        IncompatibleError: no checkpoint weights to choose names by, or a module with no or several
            candidates in it (all listed).
    """
    from loratool.io.checkpoint import open_checkpoint

    gguf = _gguf()
    info = arch_info(base)
    try:
        keys = set(open_checkpoint(base).tensors)
    except LoratoolError:
        raise IncompatibleError(
            f"{base}: GGUF names map back to transformers names only against the checkpoint's own keys",
            hint="pass --base with the model directory that holds its .safetensors (only their headers are read)",
        ) from None
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[info.arch]
    reverse: dict[str, list[str]] = {}
    for hf, (_, name) in gguf.get_tensor_name_map(arch_enum, max(info.blocks, 1)).mapping.items():
        reverse.setdefault(name, []).append(hf)
    problems: list[str] = []
    stacks: dict[str, list[LoraModule]] = {}
    for m in adapter.modules.values():
        if m.expert is not None:
            stacks.setdefault(m.expert.param, []).append(m)
    experts = to_checkpoint_names(stacks, reverse, keys, info.interleaved, problems)
    modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        if m.expert is not None:
            if name in experts:
                modules[experts[name].name] = experts[name]
            continue
        hits = [hf for hf in reverse.get(name, []) if hf + ".weight" in keys]
        if len(hits) != 1:
            problems.append(f"{name} ({'no' if not hits else len(hits)} match(es))")
            continue
        up = m.up
        hit = _Q.search(hits[0])
        if info.arch in PERMUTED_QK and hit:
            heads = info.heads if hit.group(1) == "q_proj" else info.kv_heads
            up = TensorRef.from_tensor(unpermute_rows(m.up.load(), int(heads or 0)))
        modules[hits[0]] = m.with_(name=hits[0], up=up)
    if problems:
        shown = ", ".join(problems[:6]) + (f", ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise IncompatibleError(f"{adapter.path}: GGUF modules without one transformers name in {base}: {shown}")
    return adapter.with_modules(modules, config={})
