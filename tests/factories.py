"""Factories that build adapters and bases for tests (imported by conftest.py and test modules).

The factories write files with `safetensors.torch.save_file` and `json` directly, never with
loratool's own writer, so a test that reads them checks loratool against an independent producer.

    def test_something(make_adapter, make_base):
        path = make_adapter(fmt="peft", rank=4, modules={"model.layers.0.mlp.up_proj": (64, 32)})
        base = make_base({"model.layers.0.mlp.up_proj.weight": (64, 32)})

Shapes are always given as the layer sees them: linear (out, in), conv (out, in, kh, kw),
embedding (num_embeddings, embedding_dim) (the embedding weight's own shape).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

Shape = tuple[int, ...]

# Llama-like PEFT targets and an SD-like kohya set (one 3x3 conv) used when `modules` is not given.
DEFAULT_PEFT_MODULES: dict[str, Shape] = {
    "model.layers.0.self_attn.q_proj": (32, 32),
    "model.layers.0.self_attn.v_proj": (16, 32),
    "model.layers.0.mlp.down_proj": (32, 48),
}
DEFAULT_KOHYA_MODULES: dict[str, Shape] = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_resnets_0_conv1": (16, 8, 3, 3),
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (24, 24),
}
PEFT_PREFIX = "base_model.model."


def _dtype(d: torch.dtype | str) -> torch.dtype:
    return getattr(torch, d) if isinstance(d, str) else d


def _factors(shape: Shape, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) in float32 for a linear (out, in) or conv (out, in, kh, kw) layer."""
    out_f, in_f, *kernel = shape
    down = torch.randn((rank, in_f, *kernel), generator=gen) / (in_f**0.5)
    up = torch.randn((out_f, rank, *([1] * len(kernel))), generator=gen) / (rank**0.5)
    return down, up


def build_adapter(
    root: Path,
    *,
    fmt: str = "peft",
    modules: Mapping[str, Shape] | Iterable[tuple[str, Shape]] | None = None,
    embeddings: Mapping[str, tuple[int, int]] | None = None,
    rank: int | Mapping[str, int] = 4,
    dtype: torch.dtype | str = torch.float32,
    alpha: float | Mapping[str, float] | None = 8,
    rslora: bool = False,
    fan_in_fan_out: bool = False,
    seed: int = 0,
    nan: bool = False,
    inf: bool = False,
    zero_up: bool = False,
    config: Mapping[str, Any] | bool | None = None,
    metadata: Mapping[str, str] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    drop: Iterable[str] = (),
    name: str | None = None,
) -> Path:
    """Write a small adapter under `root` and return its path (PEFT: a directory; kohya: a file).

    Args:
        fmt: "peft" (adapter_config.json + adapter_model.safetensors) or "kohya" (one file with
            `.lora_down.weight` / `.lora_up.weight` / `.alpha`).
        modules: module name -> layer shape (see module docstring); PEFT names are base-model paths
            without `base_model.model.`, kohya names are the stored `lora_unet_...` names.
        embeddings: PEFT only: module name -> (num_embeddings, embedding_dim), stored as
            lora_embedding_A (r, num) / lora_embedding_B (dim, r).
        rank: one rank, or per module name (PEFT: the config gets the most common rank as `r` and
            the others in `rank_pattern` under their exact names).
        alpha: one alpha, or per module name (PEFT: `alpha_pattern` for the others); None writes
            no alpha at all (kohya: no `.alpha` tensor; PEFT: no `lora_alpha` key in the config).
            kohya alphas are 0-d float32 tensors.
        rslora, fan_in_fan_out: PEFT config flags (the factors' layout does not change).
        seed: torch seed for the factor values.
        nan / inf: put one NaN / +Inf into the first module's down factor.
        zero_up: all up factors are zero (a freshly initialised, untrained adapter).
        config: PEFT: keys merged over the generated adapter_config.json; False writes no config.
        metadata: safetensors `__metadata__` (PEFT defaults to {"format": "pt"}).
        extra_tensors: raw key -> tensor added as-is (modules_to_save copies, LyCORIS keys, ...).
        drop: raw keys left out of the file (e.g. one `.lora_B.weight` to make a broken pair);
            applied before extra_tensors, so drop + extra_tensors replaces a tensor.
        name: file/directory name (default "adapter" / "adapter.safetensors").
    """
    if fmt not in ("peft", "kohya"):
        raise ValueError(f"fmt must be 'peft' or 'kohya', not {fmt!r}")
    mods = dict(modules if modules is not None else (DEFAULT_PEFT_MODULES if fmt == "peft" else DEFAULT_KOHYA_MODULES))
    embeddings = dict(embeddings or {})
    if embeddings and fmt != "peft":
        raise ValueError("embeddings are PEFT-only")
    all_names = [*mods, *embeddings]
    ranks = {n: rank[n] if isinstance(rank, Mapping) else rank for n in all_names}
    alphas = {n: (alpha.get(n) if isinstance(alpha, Mapping) else alpha) for n in all_names}
    dt = _dtype(dtype)
    gen = torch.Generator().manual_seed(seed)

    tensors: dict[str, torch.Tensor] = {}
    for n, shape in mods.items():
        down, up = _factors(tuple(shape), ranks[n], gen)
        if zero_up:
            up.zero_()
        if fmt == "peft":
            tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = down.to(dt)
            tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = up.to(dt)
        else:
            tensors[f"{n}.lora_down.weight"] = down.to(dt)
            tensors[f"{n}.lora_up.weight"] = up.to(dt)
            if alphas[n] is not None:
                tensors[f"{n}.alpha"] = torch.tensor(float(alphas[n]), dtype=torch.float32)
    for n, (num, dim) in embeddings.items():
        a = torch.randn((ranks[n], num), generator=gen)
        b = torch.zeros((dim, ranks[n])) if zero_up else torch.randn((dim, ranks[n]), generator=gen)
        tensors[f"{PEFT_PREFIX}{n}.lora_embedding_A"] = a.to(dt)
        tensors[f"{PEFT_PREFIX}{n}.lora_embedding_B"] = b.to(dt)
    if (nan or inf) and tensors:
        first = next(iter(tensors))
        t = tensors[first].clone()
        t.view(-1)[0] = float("nan") if nan else float("inf")
        tensors[first] = t
    for k in drop:
        tensors.pop(k)
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v

    if fmt == "kohya":
        path = root / (name or "adapter.safetensors")
        save_file(tensors, str(path), metadata=dict(metadata) if metadata is not None else None)
        return path

    path = root / (name or "adapter")
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"),
              metadata=dict(metadata) if metadata is not None else {"format": "pt"})
    if config is False:
        return path
    r_global = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "test/tiny-base",
        "r": r_global,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r_global},
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in all_names}),
        "use_rslora": rslora,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    present = [a for a in alphas.values() if a is not None]
    if present:
        a_global = Counter(present).most_common(1)[0][0]
        cfg["lora_alpha"] = a_global
        cfg["alpha_pattern"] = {n: a for n, a in alphas.items() if a is not None and a != a_global}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def build_base(
    root: Path,
    shapes: Mapping[str, Shape],
    *,
    layout: str = "file",
    dtype: torch.dtype | str = torch.float32,
    shards: int = 2,
    name: str = "base",
) -> Path:
    """Write a base checkpoint holding zero tensors of the given shapes; return the path to pass.

    Args:
        shapes: base key (e.g. `model.layers.0.self_attn.q_proj.weight`) -> stored shape.
        layout: "file" (`<name>.safetensors`), "dir" (`<name>/model.safetensors`) or "sharded"
            (`<name>/model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`).
        shards: number of shards for the sharded layout (keys are dealt round-robin).
    """
    dt = _dtype(dtype)
    tensors = {k: torch.zeros(tuple(s), dtype=dt) for k, s in shapes.items()}
    if layout == "file":
        path = root / f"{name}.safetensors"
        save_file(tensors, str(path))
        return path
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    if layout == "dir":
        save_file(tensors, str(path / "model.safetensors"))
        return path
    if layout != "sharded":
        raise ValueError(f"layout must be file, dir or sharded, not {layout!r}")
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: files[i % shards] for i, k in enumerate(tensors)}
    for f in files:
        save_file({k: t for k, t in tensors.items() if weight_map[k] == f}, str(path / f))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path




def save_quantized_base(root: Path, name: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, object],
                        quantization_config: Mapping[str, object]) -> Path:
    """A model folder `root/name` as transformers saves a quantized model: model.safetensors (with
    the `format: pt` metadata transformers reads) and config.json with its `quantization_config`."""
    base = root / name
    base.mkdir(parents=True)
    save_file(dict(tensors), str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": dict(quantization_config)}))
    return base
