"""Matching adapter module names to base weight keys (DESIGN.md section 4).

Order: exact `name + ".weight"`; then known prefix rules (PEFT `base_model.model.`, diffusers
components, kohya `lora_unet_` <-> `model.diffusion_model.` ...); then an underscore-normalised
suffix match that must be unique. Unmatched and ambiguous modules are reported, never skipped
silently.

Merge planning lives here too (plan_merge): from headers only, which base tensor receives which
adapter module's delta, which bias gets a lora_B bias, and which tensor a modules_to_save copy replaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, LoraModule, LycoModule, compatible
from loratool.errors import IncompatibleError
from loratool.formats.names import COMPONENTS, PEFT_PREFIX, kohya_base_prefixes, split_kohya_prefix, strip_known_prefix
from loratool.io.checkpoint import Checkpoint
from loratool.io.header import TensorInfo
from loratool.io.tensors import TensorRef

if TYPE_CHECKING:
    from loratool.families.layout import LayoutPlan

# the prefix tables are the formats package's (formats/names.py), not copies
_PREFIXES = (PEFT_PREFIX, *(c + "." for c in COMPONENTS))


def _norm(s: str) -> str:
    return s.replace(".", "_")


@dataclass
class Match:
    """The result of matching modules against a base's key list."""

    matched: dict[str, str] = field(default_factory=dict)  # module name -> base key
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    shape_mismatch: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.ambiguous or self.shape_mismatch)

    def refuse_shape_mismatch(self, where: object, base: object | None = None) -> None:
        """Raise for the first module whose delta does not fit its base weight (and say how many).

        Raises:
            IncompatibleError: naming the adapter (`where`), the module, both shapes and the base key.
        """
        if not self.shape_mismatch:
            return
        name, key, want, got = self.shape_mismatch[0]
        raise IncompatibleError(
            f"{where}: module '{name}' needs a base weight of shape {want} but {key}"
            + (f" in {base}" if base is not None else "") + f" is {got}"
            + (f" ({len(self.shape_mismatch)} modules mismatch)" if len(self.shape_mismatch) > 1 else ""),
            hint="is this adapter for this base model? check with: loratool validate ADAPTER --base BASE",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "unmatched": self.unmatched,
            "ambiguous": self.ambiguous,
            "shape_mismatch": [
                {"module": n, "base_key": k, "expected": list(e), "found": list(f)}
                for n, k, e, f in self.shape_mismatch
            ],
        }


class KeyIndex:
    """Base weight keys indexed for the three matching rules."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)
        self.stems: dict[str, list[str]] = {}  # normalised name (no .weight) -> keys
        for k in keys:
            if k.endswith(".weight"):
                self.stems.setdefault(_norm(k[: -len(".weight")]), []).append(k)

    def candidates(self, name: str) -> list[str]:
        # 1. exact
        if name + ".weight" in self.keys:
            return [name + ".weight"]
        # 2. known prefix rules
        for alt in _prefix_variants(name):
            if alt + ".weight" in self.keys:
                return [alt + ".weight"]
        kohya = split_kohya_prefix(name)
        if kohya is not None:
            kprefix, stem = kohya
            for base in kohya_base_prefixes(kprefix):
                hits = self.stems.get(_norm(base) + stem)
                if hits:
                    return hits
        # 3. unique underscore-normalised suffix
        stem = _norm(strip_known_prefix(name))
        return [k for s, ks in self.stems.items() if s == stem or s.endswith("_" + stem) for k in ks]

    def parameter(self, name: str) -> list[str]:
        """The base key that is `name` itself (a parameter not called `.weight`, as Wan's
        `blocks.N.modulation`): exact, through the known prefix rules, else every key that one name
        ends with, dot-separated (`diffusion_model.blocks.0.modulation` <-> `blocks.0.modulation`)."""
        exact = [k for k in (name, *_prefix_variants(name)) if k in self.keys][:1]
        return exact or sorted(k for k in self.keys if not k.endswith(".weight") and (
            name.endswith("." + k) or k.endswith("." + name)))


def _prefix_variants(name: str) -> list[str]:
    return [name[len(p):] for p in _PREFIXES if name.startswith(p)]


def match_modules(modules: Sequence[LoraModule | LycoModule], base: dict[str, TensorInfo]) -> Match:
    """Map every module to exactly one base weight of a compatible shape."""
    index = KeyIndex(list(base))
    result = Match()
    for m in modules:
        cands = index.candidates(m.name)
        if not cands and isinstance(m, LycoModule) and m.parameter:
            cands = index.parameter(m.name)
        if not cands:
            result.unmatched.append(m.name)
        elif len(cands) > 1:
            result.ambiguous[m.name] = sorted(cands)
        else:
            key = cands[0]
            if not compatible(m, base[key].shape):
                want = m.base_shape if isinstance(m, LoraModule) else m.delta_shape
                result.shape_mismatch.append((m.name, key, want, base[key].shape))
            else:
                result.matched[m.name] = key
    return result


Target = tuple[str, "LoraModule | LycoModule", str, "tuple[int, int] | None"]  # (module name, module, key, rows)


def match_experts(modules: Sequence[LoraModule], base: dict[str, TensorInfo], *, transposed: bool | None = None
                  ) -> tuple[Match, list[Target]]:
    """Match experts of fused parameters (LoraModule.expert; docs/moe.md) to a base.

    A base holding the fused parameter (gpt-oss; a transformers state dict) takes expert e's ΔW at
    index e, transposed where it stores experts (in, out); `transposed` decides for a square expert
    (config.json's model_type: moe_transposed). A base storing one Linear per expert (Qwen-MoE,
    Mixtral on disk: families.moe.STORED) takes ΔW_e split by rows into its parts (gate, up), A shared.

    Returns:
        (the match, one target per (expert or row part, base key); a fused target's rows are (e, e + 1)).
    """
    from loratool.families.layout import rows_of
    from loratool.families.moe import stored_parts

    index = KeyIndex(list(base))
    result = Match()
    targets: list[Target] = []
    for m in modules:
        e = m.expert
        assert e is not None
        fused = [k for k in (e.param, *_prefix_variants(e.param)) if k in base]
        if fused:
            key = fused[0]
            shape = tuple(base[key].shape)
            if e.count == 1 and shape == (m.out_features, m.in_features):  # a 2-D parameter (peft: one "expert")
                result.matched[m.name] = key
                targets.append((m.name, m.with_(expert=None), key, None))
                continue
            plain = shape == (e.count, m.out_features, m.in_features)
            flipped = shape == (e.count, m.in_features, m.out_features)
            if not (plain or flipped):
                result.shape_mismatch.append((m.name, key, (e.count, m.out_features, m.in_features), shape))
                continue
            flip = bool(transposed) if plain and flipped else flipped
            result.matched[m.name] = key
            targets.append((m.name, m.with_(fan_in_fan_out=flip), key, (e.index, e.index + 1)))
            continue
        found = False
        for layout, paths in stored_parts(e.param, e.index):
            keys = [index.candidates(p) for p in paths]
            if not all(len(k) == 1 for k in keys):
                continue
            found = True
            rows = m.out_features // len(paths)
            want = (rows, m.in_features)
            bad = [(k[0], tuple(base[k[0]].shape)) for k in keys if tuple(base[k[0]].shape) != want]
            if rows * len(paths) != m.out_features or bad:
                key, got = bad[0] if bad else (keys[0][0], tuple(base[keys[0][0]].shape))
                result.shape_mismatch.append((m.name, key, want, got))
                break
            count = _stored_count(index, layout, e.param, e.count) if e.index == e.count - 1 else e.count
            if count != e.count:  # the base has experts past the adapter's last: not the model it was made for
                last = next(ps[0] for lay, ps in stored_parts(e.param, count - 1) if lay == layout)
                key = index.candidates(last)[0]
                result.shape_mismatch.append((m.name, key, (e.count, m.out_features, m.in_features),
                                              (count, m.out_features, m.in_features)))
                break
            result.matched[m.name] = keys[0][0]
            for i, k in enumerate(keys):
                part = m if len(paths) == 1 else rows_of(m, [(i * rows, (i + 1) * rows)], m.name)
                targets.append((m.name, part.with_(expert=None), k[0], None))
            break
        if not found:
            result.unmatched.append(m.name)
    return result, targets


def _stored_count(index: KeyIndex, layout: str, param: str, at_least: int) -> int:
    """How many experts a per-expert checkpoint holds in `layout` for the fused `param` (>= at_least)."""
    from loratool.families.moe import stored_parts

    count = at_least
    while any(lay == layout and index.candidates(ps[0]) for lay, ps in stored_parts(param, count)):
        count += 1
    return count


def moe_transposed(root: Path) -> bool | None:
    """Whether the model at `root` stores fused experts (in, out) (config.json's model_type; None: no config)."""
    from loratool.families.moe import TRANSPOSED_MODEL_TYPES
    from loratool.storage import model_config

    config = model_config(root)
    if config is None:
        return None
    return config.get("model_type") in TRANSPOSED_MODEL_TYPES


def match_to_base(modules: Sequence[LoraModule | LycoModule], base: dict[str, TensorInfo], *, where: object,
                  transposed: bool | None = None) -> tuple[Match, list[Target], LayoutPlan | None]:
    """Experts of fused parameters through match_experts, the rest through _match_to_base."""
    experts = [m for m in modules if isinstance(m, LoraModule) and m.expert is not None]
    if not experts:
        return _match_to_base(modules, base, where=where)
    rest = [m for m in modules if not (isinstance(m, LoraModule) and m.expert is not None)]
    match, targets, crossed = _match_to_base(rest, base, where=where)
    em, et = match_experts(experts, base, transposed=transposed)
    match.matched.update(em.matched)
    match.unmatched += em.unmatched
    match.shape_mismatch += em.shape_mismatch
    return match, targets + et, crossed


def _match_to_base(modules: Sequence[LoraModule | LycoModule], base: dict[str, TensorInfo], *, where: object
                   ) -> tuple[Match, list[Target], LayoutPlan | None]:
    """match_modules, then, when some modules do not match, the other layout of their model family.

    An image-model adapter in one side's dialect and a base in the other layout (split q/k/v
    against a fused qkv; families/layout.py) is mapped through the family's relations; that mapping
    is used when it leaves fewer modules unmatched (or names a module that cannot split or fuse:
    its `refused`, for the caller to raise or report).

    Returns:
        (the match: matched maps each module name to one of its base keys; the targets: one per
        (module or row piece, base weight) with its rows of a fused weight; the family mapping used,
        or None).
    """
    match = match_modules(modules, base)
    by_name = {m.name: m for m in modules}
    targets: list[Target] = [(name, by_name[name], key, None) for name, key in match.matched.items()]
    if match.ok:
        return match, targets, None
    from loratool.families.layout import map_to_base

    crossed = map_to_base(modules, base, where=where)
    if crossed is not None:
        # modules that are no part of the family's table (the text encoders of an SD checkpoint, which
        # a single file holds beside the U-Net) keep the key rules' match
        from loratool.families.layout import Target as LayoutTarget

        fam, dialect = crossed.layout.family, crossed.dialect
        keep = [n for n in crossed.unmatched if n in match.matched and fam.identify(n, dialect) is None]
        if keep:
            crossed.unmatched = [n for n in crossed.unmatched if n not in set(keep)]
            crossed.targets += [LayoutTarget(n, by_name[n], match.matched[n]) for n in keep]
    if crossed is None or (crossed.refused is None and len(crossed.unmatched) + len(crossed.shape_mismatch) >= len(
            match.unmatched) + len(match.ambiguous) + len(match.shape_mismatch)):
        return match, targets, None
    matched = {t.source: t.key for t in crossed.targets}
    return (Match(matched=matched, unmatched=crossed.unmatched, shape_mismatch=crossed.shape_mismatch),
            [(t.source, t.module, t.key, t.rows) for t in crossed.targets], crossed)


# ---------------------------------------------------------------------------------------------
# merge planning (headers only): which base tensor gets which delta


@dataclass
class Contribution:
    """One adapter module's weighted delta aimed at one base tensor."""

    module: LoraModule | LycoModule
    weight: float
    adapter: Path
    rows: tuple[int, int] | None = None  # the delta's rows of the base tensor (a part of a fused weight)

    @property
    def term(self) -> tuple[LoraModule | LycoModule, float, tuple[int, int] | None]:
        """(module, weight, rows): what maths.merge.merged_tensor takes."""
        return self.module, self.weight, self.rows


@dataclass
class MergePlan:
    """Which base tensors change, and how. Built from headers only."""

    deltas: dict[str, list[Contribution]] = field(default_factory=dict)  # base weight key -> deltas
    biases: dict[str, list[Contribution]] = field(default_factory=dict)  # base bias key -> lora_B.bias deltas
    replacements: dict[str, TensorRef] = field(default_factory=dict)  # base key -> modules_to_save tensor
    unmatched: list[str] = field(default_factory=list)
    num_modules: int = 0
    layouts: list[str] = field(default_factory=list)  # adapters mapped onto the base's other layout (families)
    reshaped: dict[str, tuple[int, ...]] = field(default_factory=dict)  # base key -> its zero-padded new shape


def reshaped(adapter: Adapter, name: str, have: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape the adapter's `reshapes` give module `name`'s base weight (now `have`), when that
    explains the module's wider delta; None otherwise."""
    new = adapter.reshapes.get(name)
    m = adapter.modules.get(name)
    if new is None or m is None or len(new) != len(have) or tuple(m.base_shape) != tuple(new):
        return None
    return tuple(new)


def _widened(adapter: Adapter, match: Match, plan: MergePlan, base: dict[str, TensorInfo]) -> list[Target]:
    """The shape mismatches the adapter's `reshapes` account for (a BFL control LoRA's wider img_in),
    taken out of `match` and returned as targets; each base key's new shape goes into plan.reshaped.

    Raises:
        IncompatibleError: two adapters widen one base weight to different shapes, or the new shape
            is smaller than the base weight in some dimension (ComfyUI's pad_tensor_to_shape refuses it too).
    """
    targets: list[Target] = []
    for item in list(match.shape_mismatch):
        name, key, _, have = item
        new = reshaped(adapter, name, have)
        m = adapter.modules.get(name)
        if new is None or m is None:
            continue
        if any(n < h for n, h in zip(new, have)):
            raise IncompatibleError(f"{adapter.path}: module '{name}' would shrink {key} from {tuple(have)} to "
                                    f"{tuple(new)}; a reshape only widens a base weight (zero-padded)")
        if plan.reshaped.get(key, tuple(new)) != tuple(new):
            raise IncompatibleError(f"{adapter.path}: module '{name}' widens {key} to {tuple(new)} but another "
                                    f"adapter widens it to {plan.reshaped[key]}")
        match.shape_mismatch.remove(item)
        match.matched[name] = key
        plan.reshaped[key] = tuple(new)
        targets.append((name, m, key, None))
    return targets


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def plan_merge(
    adapters: list[Adapter], weights: list[float], ckpt: Checkpoint, *, allow_unmatched: bool, unmerge: bool,
    tensors: dict[str, TensorInfo] | None = None,
    module_weights: list[dict[str, float]] | None = None,
) -> tuple[MergePlan, list[str]]:
    """Match every adapter module and saved tensor to one base tensor.

    `tensors` (default ckpt.tensors) is the base as a merge sees it: a quantized base's weights
    with their logical shapes, their scales left out (storage.BaseStorage.logical).
    module_weights: per adapter, a multiplier per module name (formats.blocks.module_weights); a
    module whose weight comes to 0 is left out of the plan.

    Raises:
        IncompatibleError: unmatched/ambiguous modules (unless allow_unmatched), shape mismatches,
            DoRA with unmerge or shared with another adapter, conflicting modules_to_save.
    """
    from loratool.formats import extra_base_key as saved_tensor_key

    plan = MergePlan()
    warnings: list[str] = []
    base = ckpt.tensors if tensors is None else tensors
    index = KeyIndex(list(base))
    for n_adapter, (adapter, w) in enumerate(zip(adapters, weights)):
        where = adapter.path
        per_module = module_weights[n_adapter] if module_weights is not None else {}
        mods: list[LoraModule | LycoModule] = [*adapter.modules.values(), *adapter.lycoris.values()]
        plan.num_modules += len(mods)
        match, targets, crossed = match_to_base(mods, base, where=where, transposed=moe_transposed(ckpt.root))
        if crossed is not None:
            if crossed.refused is not None:
                raise crossed.refused
            if crossed.crossed or crossed.renamed:
                plan.layouts.append(crossed.describe())
        targets += _widened(adapter, match, plan, base)
        match.refuse_shape_mismatch(where)
        problems = [*match.unmatched, *match.ambiguous]
        if problems:
            file = adapter.files[0] if adapter.files else where  # the weights file, not its folder
            listing = ", ".join(problems[:5]) + (f", ... ({len(problems)} in all)" if len(problems) > 5 else "")
            what = f"{len(match.unmatched)} unmatched"
            if match.ambiguous:
                what += f", {len(match.ambiguous)} ambiguous"
            if not allow_unmatched:
                base_name = ckpt.files[0] if len(ckpt.files) == 1 else ckpt.root  # the file, when there is one
                raise IncompatibleError(
                    f"{file}: {what} module(s) of {len(mods)} in {base_name}: {listing}",
                    hint="merging would silently skip them; check the base with: loratool validate ADAPTER --base "
                    "BASE, or pass --allow-unmatched to merge the rest",
                )
            warnings.append(f"{file}: skipped {what} module(s): {listing}")
            plan.unmatched.extend(problems)
        reweighted_dora: list[str] = []  # DoRA at a weight other than 1: the tools disagree on its meaning
        for name, m, key, rows in targets:
            mw = per_module.get(name, 1.0)
            if mw == 0.0:
                continue  # --module-weights / --blocks weight 0: the module is left out
            if isinstance(m, LycoModule) and m.algo != "bias":  # a bias-only module: its layer's bias key only
                plan.deltas.setdefault(key, []).append(Contribution(m, w * mw, Path(str(where)), rows))
            if m.magnitude is not None:
                if unmerge:
                    raise IncompatibleError(
                        f"{where}: module '{name}' is DoRA; unmerging DoRA needs the pre-merge weight norm",
                        hint="merge into the original base instead of unmerging",
                    )
                if m.kind == "embedding":
                    raise IncompatibleError(f"{where}: module '{name}': DoRA on an embedding is not supported")
                if rows is not None:  # families/layout.py moves DoRA modules by name only; never a part
                    raise IncompatibleError(f"{where}: DoRA module '{name}' would cover only rows {rows[0]}:{rows[1]} "
                                            f"of '{key}'; its norm is of the whole weight")
                if w * mw != 1.0:
                    reweighted_dora.append(name)
            if isinstance(m, LoraModule):
                plan.deltas.setdefault(key, []).append(Contribution(m, w * mw, Path(str(where)), rows))
            if m.bias is not None:
                bias_key = key[: -len(".weight")] + ".bias" if key.endswith(".weight") else key + ".bias"
                if bias_key not in base:
                    raise IncompatibleError(f"{where}: module '{name}' has a bias delta but {ckpt.root} has no "
                                            f"'{bias_key}'", hint="the base layer has no bias; the bias delta "
                                            "would be dropped")
                plan.biases.setdefault(bias_key, []).append(Contribution(m, w * mw, Path(str(where)), rows))
        if reweighted_dora:
            warnings.append(
                f"{where}: {len(reweighted_dora)} DoRA module(s) merged at a weight other than 1 (e.g. "
                f"'{reweighted_dora[0]}'): the weight scales ΔW inside the norm, m ⊙ (W + w·ΔW) / ‖W + w·ΔW‖ "
                "(peft); LyCORIS and ComfyUI instead interpolate between W and the weight-1 result")
        for stored, ref in adapter.extras.items():
            if ".base_layer." in stored:
                continue  # peft's copy of a LoRA layer's own base weight (save_embedding_layers): not a change
            key = saved_tensor_key(stored)
            hits = [key] if key in base else (
                index.candidates(key[: -len(".weight")]) if key.endswith(".weight") else [])
            if len(hits) != 1:
                raise IncompatibleError(
                    f"{where}: saved tensor '{stored}' matches {len(hits) or 'no'} tensor(s) in {ckpt.root}",
                    hint="the adapter's modules_to_save do not fit this base",
                )
            if tuple(base[hits[0]].shape) != tuple(ref.shape):
                raise IncompatibleError(f"{where}: saved tensor '{stored}' is {ref.shape} but {hits[0]} in the base "
                                        f"is {base[hits[0]].shape}")
            if not _is_float(ref.dtype) and ref.dtype != base[hits[0]].dtype:  # never cast integers into weights
                raise IncompatibleError(
                    f"{ref.source}: saved tensor holds {ref.dtype} values but {hits[0]} in the base is "
                    f"{base[hits[0]].dtype}; loratool does not cast {ref.dtype} into a weight",
                    hint="the adapter's modules_to_save tensor is not a weight; re-save it in the base's dtype "
                    "if it is meant to be one")
            if unmerge:
                raise IncompatibleError(
                    f"{where}: saved tensor '{stored}' replaces a base tensor; --unmerge cannot restore it",
                    hint="merge into the original base instead of unmerging",
                )
            if hits[0] in plan.replacements:
                raise IncompatibleError(f"{where}: '{hits[0]}' is replaced by saved tensors of two adapters")
            plan.replacements[hits[0]] = ref
    for key, contribs in plan.deltas.items():
        if len(contribs) > 1 and any(c.module.magnitude is not None for c in contribs):
            raise IncompatibleError(
                f"base tensor '{key}' is targeted by {len(contribs)} adapters and at least one is DoRA; "
                "the normalised sum is not well defined",
                hint="merge the adapters one after another, DoRA last",
            )
        if key in plan.replacements:
            raise IncompatibleError(f"base tensor '{key}' is both replaced (modules_to_save) and given a LoRA delta")
    return plan, warnings
