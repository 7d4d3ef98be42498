"""MLX (mlx-lm): a directory with adapters.safetensors + adapter_config.json, or an older adapters.npz.

Facts read from ml-explore/mlx-lm (mlx_lm/tuner/lora.py, mlx_lm/tuner/dora.py, mlx_lm/tuner/utils.py):

- keys are the module paths of the MLX model (`model.layers.0.self_attn.q_proj`, the same paths as
  transformers for the common LLMs) + `.lora_a` / `.lora_b`; DoRA adds `.m` (one magnitude per output
  row, as peft);
- factors are stored transposed: `lora_a` is (in, r) and `lora_b` (r, out), the layer computing
  `y + scale · (x @ lora_a) @ lora_b`; so down = lora_aᵀ and up = lora_bᵀ. An embedding stores
  `lora_a` (num_embeddings, r) and `lora_b` (r, dims) with ΔW = scale · lora_a @ lora_b: the same
  transposition of peft's lora_embedding_A / _B;
- the config holds one `lora_parameters` {rank, scale, dropout, keys} for every module, where
  `scale` is the direct multiplier (no alpha / r), `keys` the module paths inside each transformer
  block (or from the model root) that get a LoRA layer, `num_layers` how many blocks from the end
  get them (-1: all), `fine_tune_type` "lora", "dora" or "full". load_adapters builds every listed
  layer with that one rank and scale, then loads the file.

One rank and one scale is all the format can say, so the writer is handed an adapter already made
uniform (ops.runtime.prepare_for pads ranks and bakes scales, both exact).

Mixture-of-experts models (mlx_lm/models/qwen3_moe.py, qwen2_moe.py, mixtral.py, gpt_oss.py; tuner/lora.py
LoRASwitchLinear): mlx-lm stacks a layer's experts into SwitchLinear layers (`mlp.switch_mlp.gate_proj`,
Mixtral `block_sparse_moe.switch_mlp.*`, gpt-oss `mlp.experts.*`) and their LoRA is 3-D and NOT transposed:
`lora_a` (E, r, in), `lora_b` (E, out, r), ΔW_e = scale · lora_b[e] @ lora_a[e]. Each expert is read as one
module `model.layers.0.mlp.switch_mlp.gate_proj[3]` (docs/moe.md) and written stacked back (bit-exact);
`layout_out` / `layout_in` rename transformers' experts to and from these stacks (SWITCH below).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, Expert, LoraModule, expert_name
from loratool.errors import FormatError, IncompatibleError
from loratool.formats._common import (
    Findings,
    RawModule,
    build_module,
    json_config,
    open_tensor_file,
    split_by_suffix,
)
from loratool.formats.gguf_experts import SPLIT, part_rows, split_stack, stacked_factors
from loratool.formats.registry import Capabilities, Format
from loratool.formats.tensorfile import TensorFile
from loratool.io.paths import folder_file
from loratool.io.tensors import TensorRef
from loratool.io.writers import write_text_output

WEIGHTS_NAME = "adapters.safetensors"
NPZ_NAME = "adapters.npz"
CONFIG_NAME = "adapter_config.json"
DEFAULT_SCALE = 20.0  # LoRALinear's default scale in mlx-lm, for an .npz with no config beside it

_SUFFIXES = ((".lora_a", "down"), (".lora_b", "up"), (".m", "magnitude"))
# module paths of embedding layers (their lora_a is (num_embeddings, r)); the names say it, the shapes cannot
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)$")
_LAYER = re.compile(r"^(?:.*\.)?layers\.\d+\.(.+)$")


class Transposed(TensorRef):
    """A lazy transpose of a 2-D TensorRef: the shape is known at once, the bytes read on load()."""

    __slots__ = ("_inner",)

    def __init__(self, inner: TensorRef) -> None:
        super().__init__(tuple(reversed(inner.shape)), inner.dtype, None, None)
        self._inner = inner

    @property
    def source(self) -> str:
        return self._inner.source

    def load(self) -> Any:
        return self._inner.load().T.contiguous()


def split_key(key: str) -> tuple[str, str] | None:
    return split_by_suffix(key, _SUFFIXES)


def looks_like(keys: list[str]) -> bool:
    return any(k.endswith(".lora_a") for k in keys) and any(k.endswith(".lora_b") for k in keys)


def is_mlx_dir(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() or (path / NPZ_NAME).is_file()


def read(path: Path, *, findings: Findings) -> Adapter:
    """Read an MLX adapter directory, or its adapters.safetensors / adapters.npz file."""
    root = path if path.is_dir() else path.parent
    weights = path
    if path.is_dir():
        weights = folder_file(root, WEIGHTS_NAME if (root / WEIGHTS_NAME).is_file() else NPZ_NAME)
    tf = open_tensor_file(weights, allow_pickle=False)
    config_path = folder_file(root, CONFIG_NAME)
    config: dict[str, Any] = {}
    if config_path.is_file():
        config = json_config(config_path, findings) or {}
    return from_tensors(tf, config, findings, root=path, config_path=config_path if config else None)


def from_file(tf: TensorFile, findings: Findings) -> Adapter:
    """An adapters.safetensors / .npz read on its own: its config is looked for beside it."""
    config_path = tf.path.parent / CONFIG_NAME
    config = (json_config(config_path, findings) or {}) if config_path.is_file() else {}
    return from_tensors(tf, config, findings, root=tf.path, config_path=config_path if config else None)


def from_tensors(tf: TensorFile, config: dict[str, Any], findings: Findings, *, root: Path,
                 config_path: Path | None) -> Adapter:
    fine_tune = str(config.get("fine_tune_type", "lora"))
    if fine_tune not in ("lora", "dora"):
        findings.error("unsupported-type", None,
                       f"{config_path}: fine_tune_type is {fine_tune!r}; only lora and dora adapters are supported",
                       exc=FormatError)
    found = config.get("lora_parameters")
    params: dict[str, Any] = found if isinstance(found, dict) else {}
    scale = params.get("scale")
    rank = params.get("rank")
    if config_path is None:
        findings.warning("config-missing", None,
                         f"{tf.path}: no {CONFIG_NAME} beside it; scale assumed {DEFAULT_SCALE:g} (mlx-lm's default)")
        scale = DEFAULT_SCALE
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        findings.error("config-invalid", None,
                       f"{config_path}: lora_parameters.scale must be a number, got {scale!r}", exc=FormatError)
        scale = DEFAULT_SCALE
    raw: dict[str, RawModule] = {}
    switch: dict[str, RawModule] = {}  # 3-D factors of SwitchLinear layers (experts stacked, not transposed)
    unsupported: list[str] = []
    for key, ref in tf.tensors.items():
        parts = split_key(key)
        if parts is not None and parts[1] != "magnitude" and len(ref.shape) == 3:
            switch.setdefault(parts[0], RawModule()).put(parts[1], ref, key, parts[0], findings, tf.path)
            continue
        if parts is None or (parts[1] != "magnitude" and len(ref.shape) != 2):
            unsupported.append(key)  # quantized LoRA (lora_a_scales ...), full weights
            continue
        name, role = parts
        if role != "magnitude":
            ref = Transposed(ref)
        rm = raw.setdefault(name, RawModule())
        rm.put(role, ref, key, name, findings, tf.path)
        rm.embedding = bool(_EMBEDDING.search(name))
    modules: dict[str, LoraModule] = {}
    for name, rm in switch.items():
        if rm.down is None or rm.up is None or len(rm.down.shape) != 3:
            unsupported.extend(rm.keys)
            continue
        experts = split_stack(name, rm, alpha=float(scale) * rm.down.shape[1], alpha_source="config",
                              findings=findings, where=tf.path)
        bad = [n for n, m in experts.items() if isinstance(rank, int) and m.rank != rank]
        if bad:
            findings.error("config-rank-mismatch", name,
                           f"{tf.path}: switch layer '{name}' has rank {experts[bad[0]].rank} but {CONFIG_NAME} "
                           f"lora_parameters.rank says {rank}",
                           hint="mlx-lm builds every layer with the config's rank and will refuse the file")
            continue
        modules.update(experts)
    for name, rm in raw.items():
        if rm.down is None and rm.up is None:
            unsupported.extend(rm.keys)
            continue
        r = rm.down.shape[0] if rm.down is not None else None
        module = build_module(name, rm, alpha=float(scale) * r if r else None, alpha_source="config", rslora=False,
                              fan_in_fan_out=False, findings=findings, where=tf.path)
        if module is None:
            continue
        if isinstance(rank, int) and not isinstance(rank, bool) and module.rank != rank:
            findings.error("config-rank-mismatch", name,
                           f"{tf.path}: module '{name}' has rank {module.rank} but {CONFIG_NAME} "
                           f"lora_parameters.rank says {rank}",
                           hint="mlx-lm builds every layer with the config's rank and will refuse the file")
            continue
        if (fine_tune == "dora") != (module.magnitude is not None):
            findings.error("config-inconsistent", name,
                           f"{tf.path}: module '{name}' {'has no' if fine_tune == 'dora' else 'has a'} DoRA magnitude "
                           f"(.m) but fine_tune_type is {fine_tune!r}")
            continue
        modules[name] = module
    base = config.get("model")
    return Adapter(modules=modules, source_format="mlx", config=config, metadata=tf.metadata,
                   base_model=str(base) if isinstance(base, str) else None, unsupported=unsupported, path=root,
                   files=[tf.path] + ([config_path] if config_path else []), source_modules=tuple(modules))


# ---------------------------------------------------------------------------------------------
# writing


def layer_key(name: str) -> str:
    """The `lora_parameters.keys` entry that makes mlx-lm wrap this module: its path inside a block."""
    m = _LAYER.match(name)
    return m.group(1) if m else name


def check_writable(adapter: Adapter) -> None:
    """Refuse what an MLX adapter cannot hold (one check, before anything is written).

    Raises:
        IncompatibleError: several ranks or scales (make it uniform first), conv or fan_in_fan_out
            layers, LoRA bias, full tensors, DoRA on some modules only or on embeddings.
    """
    mods = list(adapter.modules.values())
    ranks = {m.rank for m in mods}
    scales = {m.scale for m in mods}
    if len(ranks) > 1 or len(scales) > 1:
        raise IncompatibleError(f"{adapter.path}: MLX adapters hold one rank and one scale, this one has ranks "
                                f"{sorted(ranks)} and {len(scales)} scales",
                                hint="convert with --for mlx (pads ranks and bakes scales, exactly)")
    bad = [m.name for m in mods if m.kind == "conv" or m.fan_in_fan_out or m.bias is not None]
    if bad:
        raise IncompatibleError(f"{adapter.path}: module '{bad[0]}' is a conv or fan_in_fan_out layer or has a "
                                f"LoRA bias, which mlx-lm adapters cannot hold ({len(bad)} such)")
    saved = [k for k in adapter.extras if ".base_layer." not in k]
    if saved:
        raise IncompatibleError(f"{adapter.path}: full tensor '{saved[0]}' (modules_to_save) cannot be stored in an "
                                "MLX adapter", hint="convert with --for mlx --drop to leave it out")
    dora = {m.magnitude is not None for m in mods}
    if len(dora) > 1 or (True in dora and any(m.kind == "embedding" for m in mods)):
        raise IncompatibleError(f"{adapter.path}: DoRA on some modules only (or on an embedding); mlx-lm's "
                                "fine_tune_type is one for all layers",
                                hint="--dora-to-lora BASE writes plain LoRA for every module")


def write(adapter: Adapter, out_dir: Path, metadata: dict[str, str]) -> None:
    """Write `adapter` (uniform: see check_writable) as an MLX directory into the empty `out_dir`."""
    from loratool.io.writers import save_tensors

    check_writable(adapter)
    mods = list(adapter.modules.values())
    tensors: dict[str, Any] = {}
    stacks: dict[str, list[LoraModule]] = {}
    for m in mods:
        if m.expert is not None:
            stacks.setdefault(m.expert.param, []).append(m)
    for param, experts in stacks.items():  # one rank and scale (check_writable): nothing to bake
        down, up = stacked_factors(experts, experts[0].scale * experts[0].rank, adapter.path)
        tensors[param + ".lora_a"], tensors[param + ".lora_b"] = down, up  # (E, r, in), (E, out, r)
    for m in mods:
        if m.expert is not None:
            continue
        tensors[m.name + ".lora_a"] = m.down.load().T.contiguous()  # (r, in) -> (in, r)
        tensors[m.name + ".lora_b"] = m.up.load().T.contiguous()  # (out, r) -> (r, out)
        if m.magnitude is not None:
            tensors[m.name + ".m"] = m.magnitude.load().reshape(-1)
    save_tensors(out_dir / WEIGHTS_NAME, tensors, {"format": "mlx", **metadata})
    dora = any(m.magnitude is not None for m in mods)
    config: dict[str, Any] = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": -1,  # every block: mlx-lm slices layers[-max(num_layers, 0):]
        "lora_parameters": {
            "rank": mods[0].rank,
            "scale": mods[0].scale,
            "dropout": 0.0,
            "keys": sorted({layer_key(m.expert.param if m.expert else m.name) for m in mods}),
        },
    }
    if adapter.base_model:
        config["model"] = adapter.base_model
    write_text_output(out_dir / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _detect(keys: list[str]) -> int:
    return 3 if looks_like(keys) else 0


FORMAT = Format(
    name="mlx",
    summary="mlx-lm adapter directory (adapters.safetensors + adapter_config.json; factors transposed, one scale)",
    naming="path",
    capabilities=Capabilities(embedding=True, conv=False, dora=True, per_module_alpha=False, directory=True,
                              experts=True),
    detect=_detect,
    read_file=from_file,
    detect_dir=is_mlx_dir,
    read_dir=lambda path, allow_pickle, findings: read(path, findings=findings),
    write=write,
    suffix="",
    layout_in=lambda adapter, base, source: from_switch_layout(adapter, base),
    layout_out=lambda adapter, base, source: to_switch_layout(adapter, base),
)


# ---------------------------------------------------------------------------------------------
# transformers experts <-> mlx-lm SwitchLinear stacks


@dataclass(frozen=True)
class Switch:
    """How mlx-lm stacks one kind of transformers expert container (its models' `sanitize`).

    Attributes:
        experts: the per-expert container's tail in transformers (`mlp.experts`: `mlp.experts.3.gate_proj`).
        switch: mlx-lm's SwitchGLU path for it (`mlp.switch_mlp`).
        parts: transformers projection name -> mlx-lm's.
        model_types: config.json model_type values whose fused experts (`mlp.experts.gate_up_proj`) go here.
    """

    experts: str
    switch: str
    parts: tuple[tuple[str, str], ...]
    model_types: frozenset[str] = frozenset()


_PROJ = (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj"))
SWITCH: tuple[Switch, ...] = (
    Switch("mlp.experts", "mlp.switch_mlp", _PROJ),  # qwen3_moe.py:262-277, qwen2_moe.py, deepseek_v3.py sanitize
    # mixtral.py:208-223
    Switch("block_sparse_moe.experts", "block_sparse_moe.switch_mlp",
           (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")), frozenset({"mixtral"})),
    # gpt_oss.py:115-121, 226-250: SwitchGLU named `experts`, gate_up split by alternate rows
    Switch("mlp.experts", "mlp.experts", _PROJ, frozenset({"gpt_oss"})),
)
_PER_EXPERT = re.compile(r"^(?P<head>.*?)(?P<tail>[a-z_]+\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")


def _model_type(base: Path | None) -> str | None:
    if base is None:
        return None
    from loratool.io.header import read_side_file

    cfg_path = base if base.name == "config.json" else folder_file(base, "config.json")
    try:
        cfg = json.loads(read_side_file(cfg_path).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return cfg.get("model_type") if isinstance(cfg, dict) and isinstance(cfg.get("model_type"), str) else None


def to_switch_layout(adapter: Adapter, base: Path | None) -> Adapter:
    """Expert modules as mlx-lm's SwitchLinear stacks (`mlp.switch_mlp.gate_proj[3]`): per-expert modules by
    their container (every expert of a stack present), fused PEFT target_parameters experts by the base's
    model_type (a fused gate_up_proj split into gate and up, sharing the expert's down: exact).

    Raises:
        IncompatibleError: a stack with experts missing (mlx-lm's layer holds all of them), or fused experts
            without a base config to tell the model.
    """
    from loratool.families.moe import INTERLEAVED

    per: dict[str, dict[int, str]] = {}  # switch parameter -> expert index -> module name
    for name, m in adapter.modules.items():
        hit = _PER_EXPERT.match(name)
        if m.expert is None and hit is not None:
            sw = next((s for s in SWITCH if s.experts == hit["tail"] and s.switch != s.experts), None)
            proj = dict(sw.parts).get(hit["proj"]) if sw is not None else None
            if sw is not None and proj is not None:
                per.setdefault(f"{hit['head']}{sw.switch}.{proj}", {})[int(hit["index"])] = name
    placed: dict[str, Expert] = {}
    for param, experts in per.items():
        count = max(experts) + 1
        if sorted(experts) != list(range(count)):
            raise IncompatibleError(f"{adapter.path}: '{param}' would stack experts {sorted(experts)[:8]}; mlx-lm's "
                                    "switch layer holds every expert", hint="merge the adapter into the base instead")
        placed.update({name: Expert(param, e, count) for e, name in experts.items()})
    model_type = _model_type(base)
    modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():  # in the adapter's order
        if name in placed:
            ex = placed[name]
            modules[expert_name(ex.param, ex.index)] = m.with_(name=expert_name(ex.param, ex.index), expert=ex)
            continue
        if m.expert is None:
            modules[name] = m
            continue
        if model_type is None:
            raise IncompatibleError(f"{adapter.path}: fused expert module '{name}' goes into mlx-lm's switch layers "
                                    "by the model's type", hint="pass --base with the model's config.json")
        head, _, leaf = m.expert.param.rpartition(".")
        sw = next((s for s in SWITCH if model_type in s.model_types), SWITCH[0])
        container = head.removesuffix("mlp.experts") + sw.switch if head.endswith("mlp.experts") else head
        names = SPLIT.get(leaf, (leaf,))
        inter = leaf in INTERLEAVED.get(model_type, frozenset())
        for i, part in enumerate(names):
            one = m.with_(up=part_rows(m.up, i, len(names), inter)) if len(names) > 1 else m
            ex = Expert(f"{container}.{part}", m.expert.index, m.expert.count)
            modules[expert_name(ex.param, ex.index)] = one.with_(name=expert_name(ex.param, ex.index), expert=ex)
    return adapter.with_modules(modules)


def from_switch_layout(adapter: Adapter, base: Path | None = None) -> Adapter:
    """mlx-lm switch-layer experts back as transformers' per-expert modules (`mlp.experts.3.gate_proj`,
    Mixtral `block_sparse_moe.experts.3.w1`), the names transformers checkpoints store. gpt-oss's checkpoint
    keeps its experts fused: with `base`, its switch experts get the same per-expert names, which
    formats.expert_layout fuses back into the base's `gate_up_proj` / `down_proj` (exact).

    Raises:
        IncompatibleError: experts of a switch layer mlx-lm does not name, or gpt-oss's without a base.
    """
    modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        if m.expert is None:
            modules[name] = m
            continue
        head, _, proj = m.expert.param.rpartition(".")
        sw = next((s for s in SWITCH if head == s.switch or head.endswith("." + s.switch)), None)
        back = {v: k for k, v in sw.parts}.get(proj) if sw is not None else None
        if sw is None or back is None:
            raise IncompatibleError(f"{adapter.path}: MLX expert module '{name}' has no transformers name")
        if sw.switch == sw.experts and base is None:
            raise IncompatibleError(f"{adapter.path}: MLX expert module '{name}' is a switch layer of a model whose "
                                    "checkpoint keeps its experts fused (gpt-oss: gate and up interleaved in "
                                    "gate_up_proj)", hint="pass --base with the model's checkpoint: its experts are "
                                    "written as the fused parameters it holds (peft target_parameters)")
        new = f"{head.removesuffix(sw.switch)}{sw.experts}.{m.expert.index}.{back}"
        modules[new] = m.with_(name=new, expert=None)
    return adapter.with_modules(modules)
