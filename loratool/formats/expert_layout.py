"""Experts named as a transformers checkpoint stores them: fused 3-D parameters or one Linear per expert.

`convert --to peft --base BASE` (docs/moe.md): transformers 5 holds experts fused in memory
(`mlp.experts.gate_up_proj` (E, 2·I, H), peft's `target_parameters`), while most checkpoints on disk, and the
runtimes that read them as stored (vLLM, transformers 4), hold one Linear per expert (`mlp.experts.3.gate_proj`,
Mixtral `block_sparse_moe.experts.3.w1`; families.moe.STORED). Both ways are exact in low rank:

- fused -> per expert: gate_up's ΔW_e splits by rows, gate = (B_e[:I], A_e), up = (B_e[I:], A_e) (alternate
  rows where the model interleaves them), the same A_e, rank and scale: the factors are slices of the stored ones;
- per expert -> fused: an expert's gate and up are fused back with their A when both hold the same A and scale
  (what a split wrote: peft's own factors again, bit for bit); otherwise A = [A_gate; A_up] with a block-diagonal
  B (rank doubles, each part's scale folded into its block: exact). Every expert of the fused parameter must be
  there, with all its parts (peft stores all experts or none).
"""

from __future__ import annotations

from pathlib import Path

from loratool.adapter import Adapter, Expert, LoraModule
from loratool.errors import IncompatibleError
from loratool.families.moe import INTERLEAVED, fused_part, stored_parts
from loratool.formats.gguf_experts import fused_expert, part_rows


def experts_for_checkpoint(adapter: Adapter, base: Path) -> Adapter:
    """`adapter` with its experts in the layout the checkpoint `base` stores them (headers and config.json
    read): per-expert modules whose fused parameter the base holds become experts of it, experts of a fused
    parameter that the base stores one Linear per expert become those Linears. Other modules are unchanged.

    Raises:
        IncompatibleError: per-expert modules that cannot fill the base's fused parameter (an expert or a
            part missing, an expert index past the base's count), all named.
    """
    from loratool.io.checkpoint import open_checkpoint
    from loratool.storage import model_config

    ckpt = open_checkpoint(base)
    shapes = {k: tuple(v.shape) for k, v in ckpt.tensors.items()}
    interleaved = INTERLEAVED.get(str((model_config(ckpt.root) or {}).get("model_type")), frozenset())
    return _split_fused(_fuse_per_expert(adapter, shapes, interleaved, base), shapes, interleaved)


def _fuse_per_expert(adapter: Adapter, shapes: dict[str, tuple[int, ...]], interleaved: frozenset[str],
                     base: Path) -> Adapter:
    groups: dict[str, dict[int, dict[int, LoraModule]]] = {}  # fused parameter -> expert -> part -> module
    counts: dict[str, int] = {}  # fused parameter -> its number of parts
    for name, m in adapter.modules.items():
        if m.expert is not None or name + ".weight" in shapes:
            continue
        hit = fused_part(name)
        if hit is None or len(shapes.get(hit.param, ())) != 3:
            continue
        groups.setdefault(hit.param, {}).setdefault(hit.index, {})[hit.part] = m
        counts[hit.param] = hit.parts
    if not groups:
        return adapter
    hint = ("convert against a base that stores one Linear per expert (the checkpoint on disk), or merge the "
            "adapter into the base (loratool merge)")
    made: dict[str, LoraModule] = {}  # a fused expert, under the name of its first part as read
    taken: set[str] = set()
    for param, experts in groups.items():
        count = shapes[param][0]
        have = sorted(experts)
        if have != list(range(count)):
            raise IncompatibleError(
                f"{adapter.path}: {base} holds '{param}' fused ({count} experts) and the adapter has per-expert "
                f"modules for experts {', '.join(map(str, have[:8]))}{' ...' if len(have) > 8 else ''} of it; "
                "peft's target_parameters holds every expert of a parameter", hint=hint)
        leaf = param.rsplit(".", 1)[-1]
        for e, parts in experts.items():
            if len(parts) != counts[param]:
                got = ", ".join(m.name for m in parts.values())
                raise IncompatibleError(
                    f"{adapter.path}: {base} holds '{param}' fused from {counts[param]} parts per expert and the "
                    f"adapter has only '{got}' for expert {e}", hint=hint)
            ordered = [parts[i] for i in range(counts[param])]
            made[ordered[0].name] = fused_expert(ordered, Expert(param, e, count), leaf in interleaved)
            taken.update(m.name for m in ordered)
    modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():  # in the adapter's order
        if name in made:
            modules[made[name].name] = made[name]
        elif name not in taken:
            modules[name] = m
    return adapter.with_modules(modules)


def _split_fused(adapter: Adapter, shapes: dict[str, tuple[int, ...]], interleaved: frozenset[str]) -> Adapter:
    modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        ex = m.expert
        layouts = [] if ex is None or ex.param in shapes else \
            [paths for _, paths in stored_parts(ex.param, ex.index) if all(p + ".weight" in shapes for p in paths)]
        if ex is None or len(layouts) != 1 or m.out_features % len(layouts[0]):
            modules[name] = m  # the base holds it fused, or not at all (then matching names it)
            continue
        paths = layouts[0]
        inter = ex.param.rsplit(".", 1)[-1] in interleaved
        for i, path in enumerate(paths):
            up = part_rows(m.up, i, len(paths), inter) if len(paths) > 1 else m.up
            modules[path] = m.with_(name=path, up=up, expert=None)
    return adapter.with_modules(modules)
