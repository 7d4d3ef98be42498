"""PEFT `target_parameters`: LoRA on fused 3-D expert parameters (peft >= 0.17), read and written.

peft wraps each targeted parameter (`model.layers.0.mlp.experts.gate_up_proj`, shape (E, d1, d2)) in a
ParamWrapper on the parameter's module; several parameters of one module nest, the first in the
module's definition order innermost, so the keys name the module and the nesting, never the parameter:

    base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight   gate_up_proj (inner)
    base_model.model.model.layers.0.mlp.experts.lora_A.weight              down_proj (outer)

lora_A.weight is (E·r, in), expert e's A in rows e·r:(e+1)·r; lora_B.weight is (out, r·E), expert e's
B in columns e::E (the column index is k·E + e). ΔW_e = s · B_e @ A_e with s = alpha / r (alpha /
sqrt(r) with use_rslora) where r and alpha are the config's for the parameter path (rank_pattern /
alpha_pattern are matched against `model.layers.0.mlp.experts.gate_up_proj`). Each expert is read as
one LoraModule with `expert` set (adapter.Expert); docs/moe.md.

peft (0.21 for Qwen3-MoE / Mixtral, 0.22 for Qwen2-MoE too) turns target_modules names such as
`gate_proj` into bare target parameters (`gate_up_proj`) with rank_pattern / alpha_pattern
`.*\\.gate_up_proj` of 2·r / 2·alpha: the same layout, read through the same patterns; a bare name
claims no module that target_modules names.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from loratool.adapter import Expert, LoraModule, expert_name
from loratool.errors import FormatError
from loratool.families.moe import param_order
from loratool.formats._common import Findings, RawModule, build_module
from loratool.io.tensors import TensorRef

WRAPPED = ".base_layer"
# parameters of ordinary layers (a Linear's own weight): peft wraps them 2-D, not as experts
PLAIN_PARAMS = ("weight", "bias")


class _Loaded:
    """A stacked factor loaded once for the experts sliced from it, and let go once each has taken its
    slice (`uses` slices): held for the whole run, every fused factor of the adapter stayed in memory
    to the end of a merge. A later slice loads it again."""

    __slots__ = ("_served", "_t", "ref", "uses")

    def __init__(self, ref: TensorRef, uses: int) -> None:
        self.ref = ref
        self.uses = uses
        self._t: Any = None
        self._served = 0

    def take(self, part: Callable[[Any], Any]) -> Any:
        """part(the stacked tensor), a copy that does not keep the stack alive."""
        if self._t is None:
            self._t = self.ref.load()
        out = part(self._t)
        self._served += 1
        if self._served >= self.uses:
            self._t, self._served = None, 0
        return out


def _rows(stack: _Loaded, start: int, count: int) -> Any:
    return stack.take(lambda t: t[start:start + count].clone())


def _cols(stack: _Loaded, index: int, step: int) -> Any:
    return stack.take(lambda t: t[:, index::step].contiguous())


def _unwrap(name: str) -> tuple[str, int]:
    depth = 0
    while name.endswith(WRAPPED):
        name, depth = name[: -len(WRAPPED)], depth + 1
    return name, depth


def _params_of(module: str, targets: list[str]) -> list[str]:
    """The parameter names `targets` (peft's target_parameters) picks on `module`."""
    names: list[str] = []
    for t in targets:
        head, _, param = t.rpartition(".")
        if param and (not head or module == head or module.endswith("." + head)) and param not in names:
            names.append(param)
    return names


def take_expert_params(
    raw: dict[str, RawModule], config: dict[str, Any], *, rank_of: Callable[[str], int | None],
    alpha_of: Callable[[str], tuple[float, str]], module_target: Callable[[str], bool], rslora: bool,
    findings: Findings, where: Path,
) -> dict[str, LoraModule]:
    """Take the target_parameters wrappers out of `raw` and return one LoraModule per expert.

    rank_of(param path) is the config's rank for it (rank_pattern, else r); alpha_of the alpha and
    where it came from; module_target(module path) whether target_modules names that module (then its
    LoRA is an ordinary module's: peft refuses a module targeted both ways, and a bare parameter name
    such as peft's `gate_up_proj` would otherwise claim every module).
    """
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        findings.error("config-invalid", None, f"{where}: 'target_parameters' must be a list of parameter names, "
                       f"got {targets!r:.200}", exc=FormatError)
        return {}
    if not targets:
        return {}
    groups: dict[str, dict[int, str]] = {}
    for name in raw:
        module, depth = _unwrap(name)
        if _params_of(module, targets) and not module_target(module):
            groups.setdefault(module, {})[depth] = name
    out: dict[str, LoraModule] = {}
    for module, by_depth in groups.items():
        params = param_order(_params_of(module, targets))
        depths = sorted(by_depth, reverse=True)  # innermost (deepest) first
        if len(depths) != len(params) or depths != list(range(len(depths) - 1, -1, -1)):
            findings.error("config-inconsistent", module,
                           f"{where}: module '{module}' has {len(depths)} LoRA wrapper(s) but target_parameters "
                           f"names {len(params)} parameter(s) on it ({', '.join(params)})",
                           hint="the config does not describe these tensors")
            for name in by_depth.values():
                raw.pop(name)
            continue
        for depth, param in zip(depths, params):
            name = by_depth[depth]
            rm = raw.pop(name)
            path = f"{module}.{param}"
            if param in PLAIN_PARAMS:
                findings.error("unsupported-type", path,
                               f"{where}: target_parameters wraps the 2-D parameter '{path}' (peft 0.22 does this "
                               "for a router `gate` in target_modules); loratool reads only fused 3-D expert "
                               "parameters", hint="train the adapter without the router in target_modules",
                               exc=FormatError)
                continue
            alpha, source = alpha_of(path)
            stacked = build_module(name, rm, alpha=alpha, alpha_source=source,  # type: ignore[arg-type]
                                   rslora=rslora, fan_in_fan_out=False, findings=findings, where=where)
            if stacked is None:
                continue
            r = rank_of(path)
            if r is None:
                continue
            if stacked.rank % r:
                findings.error("config-rank-mismatch", path,
                               f"{where}: parameter '{path}' has {stacked.rank} rows of lora_A (down "
                               f"{stacked.down.shape}), not a multiple of the config's rank {r}",
                               hint="peft will refuse to load it; fix r / rank_pattern in adapter_config.json")
                continue
            out.update(split_experts(stacked, path, r))
    return out


def split_experts(stacked: LoraModule, param: str, rank: int) -> dict[str, LoraModule]:
    """peft's stacked factors of one parameter -> one module per expert (lazy slices)."""
    count = stacked.rank // rank
    a, b = _Loaded(stacked.down, count), _Loaded(stacked.up, count)
    out: dict[str, LoraModule] = {}
    for e in range(count):
        name = expert_name(param, e)
        down = TensorRef.computed((rank, stacked.in_features), stacked.down.dtype, partial(_rows, a, e * rank, rank),
                                  f"{stacked.down.source} rows {e * rank}:{(e + 1) * rank} (expert {e})")
        up = TensorRef.computed((stacked.out_features, rank), stacked.up.dtype, partial(_cols, b, e, count),
                                f"{stacked.up.source} columns {e}::{count} (expert {e})")
        out[name] = stacked.with_(name=name, down=down, up=up, expert=Expert(param, e, count))
    return out


def _stack_rows(parts: list[Any]) -> Any:
    import torch

    return torch.cat(parts, dim=0)


def _stack_cols(parts: list[Any]) -> Any:
    import torch

    return torch.stack(parts, dim=2).reshape(parts[0].shape[0], -1)  # column k·E + e


def _padded(m: LoraModule, rank: int, factor: float) -> tuple[Any, Any]:
    """(down, up) of `m` padded with zero rows / columns to `rank`, `factor` folded into up (exact
    when factor is 1: the stored tensors themselves)."""
    import torch

    down, up = m.down.load(), m.up.load()
    if factor != 1.0:
        up = (up.to(torch.float32) * factor).to(up.dtype)
    if m.rank < rank:
        down = torch.cat([down, down.new_zeros(rank - m.rank, down.shape[1])], dim=0)
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - m.rank)], dim=1)
    return down, up


def stack_experts(modules: list[LoraModule], where: object) -> dict[str, tuple[LoraModule, LoraModule]]:
    """Expert modules -> per fused parameter (by its path): (the stacked module as peft stores it,
    named by the parameter's path; one expert as the config describes them all, for r and alpha):
    experts of unequal rank are padded with zeros to the largest, experts of unequal
    scale get their scale folded into up (alpha = rank then), so every ΔW_e is kept.

    Raises:
        FormatError: a parameter whose experts are not all present (peft stores all or none).
    """
    from loratool.adapter import scale_for

    by_param: dict[str, list[LoraModule]] = {}
    for m in modules:
        assert m.expert is not None
        by_param.setdefault(m.expert.param, []).append(m)
    out: dict[str, tuple[LoraModule, LoraModule]] = {}
    for param, mods in by_param.items():
        mods.sort(key=lambda m: m.expert.index if m.expert else 0)
        count = mods[0].expert.count if mods[0].expert else 0
        if [m.expert.index for m in mods if m.expert] != list(range(count)):
            raise FormatError(f"{where}: parameter '{param}' has {len(mods)} of its {count} experts; peft's "
                              "target_parameters stores every expert of a parameter",
                              hint="write the experts as separate modules, or keep all of them")
        rank = max(m.rank for m in mods)
        same = all(m.rank == rank and m.alpha == mods[0].alpha and m.rslora == mods[0].rslora for m in mods)
        rslora = mods[0].rslora if same else False
        alpha = mods[0].alpha if same else float(rank)
        target = scale_for(alpha, rank, rslora)
        pairs = [_padded(m, rank, 1.0 if same else m.scale / target) for m in mods]
        down = TensorRef.from_tensor(_stack_rows([d for d, _ in pairs]))
        up = TensorRef.from_tensor(_stack_cols([u for _, u in pairs]))
        stacked = mods[0].with_(name=param, down=down, up=up, alpha=alpha, rslora=rslora, expert=None)
        one = mods[0].with_(name=param, down=TensorRef.from_tensor(pairs[0][0]), up=TensorRef.from_tensor(pairs[0][1]),
                            alpha=alpha, rslora=rslora, expert=None)
        out[param] = (stacked, one)
    return out


def wrapper_keys(params: list[str]) -> dict[str, str]:
    """Fused parameter path -> the module key peft saves its LoRA under (`.base_layer` per nesting)."""
    by_module: dict[str, list[str]] = {}
    for p in params:
        module, _, name = p.rpartition(".")
        by_module.setdefault(module, []).append(name)
    out: dict[str, str] = {}
    for module, names in by_module.items():
        ordered = param_order(names)
        for i, name in enumerate(ordered):
            out[f"{module}.{name}"] = module + WRAPPED * (len(ordered) - 1 - i)
    return out
