"""Merge into either base layout of a family, whatever side the adapter's dialect names.

A family's base checkpoints come in two layouts: the original one (BFL / ComfyUI single file, keys
bare or under `model.diffusion_model.`) and diffusers' (a component folder, bare diffusers paths).
An adapter names the modules of one side (kohya / comfyui: original; diffusers / peft / onetrainer:
diffusers). When the sides differ, each adapter module is mapped through the family's relations:

    plain relation            the same rows under another name: a rename
    fused adapter module      B split by rows into the split modules' parts, A shared (exact,
      -> split base weights   as `convert` splits); bias rows likewise
    split adapter module      its delta goes to its row range of the fused base weight: the
      -> fused base weight    contribution carries (start, stop) and merge adds s·B@A into those
                              rows only (a module holding several chunks in another order, as
                              diffusers' norm_out (scale, shift), is cut into one piece per chunk)

Row ranges come from the relation's chunk sizes (maths.fuse.row_sizes) and the fused weight's rows
(the base's, or the fused adapter module's). DoRA, LyCORIS and non-linear modules move only by
plain renames; a split or fuse of them is refused. Nothing here reads tensor bytes: row slices of
B are lazy (TensorRef.computed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loratool.adapter import LoraModule, LycoModule
from loratool.errors import IncompatibleError
from loratool.families import detect, get, module_shapes
from loratool.families.model import Family, Relation

if TYPE_CHECKING:
    from loratool.io.header import TensorInfo

Module = LoraModule | LycoModule
ORIGINAL_BASE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


@dataclass(frozen=True)
class BaseLayout:
    """Which side of a family a base checkpoint's keys name, and under which prefix."""

    family: Family
    side: str  # "original" or "diffusers"
    prefix: str  # what precedes a module path in the base's keys
    hits: int  # base weights that are the family's modules on this side

    def key(self, path: str) -> str:
        return self.prefix + path + ".weight"

    def describe(self) -> str:
        what = f"original ({self.family.original_layout})" if self.side == "original" else "diffusers"
        return f"{self.family.name} {what} layout" + (f" under '{self.prefix}'" if self.prefix else "")


def base_layout(family: Family, keys: Sequence[str]) -> BaseLayout | None:
    """The side and prefix of `family` that most of the base's weight keys name (None: neither)."""
    counts: Counter[tuple[str, str]] = Counter()
    component = family.component + "."
    for k in keys:
        if not k.endswith(".weight"):
            continue
        stem = k[: -len(".weight")]
        for p in ORIGINAL_BASE_PREFIXES:
            if stem.startswith(p) and family.identify(family.comfy_prefix + stem[len(p):], "comfyui") is not None:
                counts[("original", p)] += 1
                break
        for p in (component, ""):
            if stem.startswith(p) and family.identify(stem[len(p):], "peft") is not None:
                counts[("diffusers", p)] += 1
                break
    if not counts:
        return None
    ranked = counts.most_common()
    (side, prefix), n = ranked[0]
    if len(ranked) > 1 and ranked[1][1] == n and ranked[1][0][0] != side:
        if ranked[1][0][1] == prefix and all(r.is_plain and r.split[0][0] == r.original for r in family.relations):
            # one name per module on both sides (Qwen-Image): either side is the same map
            return BaseLayout(family, "original", prefix, n)
        return None  # names both sides share (a family whose every module is a rename): no side to map to
    return BaseLayout(family, side, prefix, n)


@dataclass
class Target:
    """One adapter module (or a row piece of it) aimed at one base weight."""

    source: str  # the adapter's module name (for --module-weights, messages)
    module: Module  # what is merged: the module itself, or B's rows for one split part
    key: str  # the base weight key
    rows: tuple[int, int] | None = None  # the delta's rows in a fused base weight; None: all of it


@dataclass
class LayoutPlan:
    """Every module of one adapter mapped onto a base of the other layout."""

    layout: BaseLayout
    dialect: str
    targets: list[Target] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    crossed: int = 0  # modules split or fused (not plain renames)
    renamed: int = 0  # modules of the adapter's side renamed to the base's other side (a U-Net's blocks)
    refused: IncompatibleError | None = None  # a module that would have to split or fuse but cannot

    def describe(self) -> str:
        what = f"{self.crossed} fused/split modules" if self.crossed else f"{self.renamed} modules renamed"
        return (f"{self.layout.family.title} {self.dialect}-dialect adapter mapped onto the "
                f"{self.layout.describe()} ({what})")


def map_to_base(modules: Sequence[Module], base: dict[str, TensorInfo], *, where: object) -> LayoutPlan | None:
    """Map `modules` onto `base` through the family tables, when the base is one family's layout.

    Returns None when the adapter is no family's or the base no layout of its family. Among families
    that fit (diffusers names are shared: FLUX.1 and HunyuanVideo), the one whose base layout has
    the most of the family's modules, then the fewest unmatched modules, wins.

    A module that would have to split or fuse but cannot (DoRA, LyCORIS, conv) is unmatched, and
    the plan's `refused` says why.
    """
    names = [m.name for m in modules]
    found = detect(names, shapes=module_shapes({m.name: m for m in modules}))
    if found.family is None and not found.ambiguous:  # ambiguous: the tied families are tried below
        return None
    keys = list(base)
    best: LayoutPlan | None = None
    seen: set[tuple[str, str]] = set()
    for fam_name, dialect, n in found.candidates:
        if n < found.matched or (fam_name, dialect) in seen:
            continue
        seen.add((fam_name, dialect))
        family = get(fam_name)
        layout = base_layout(family, keys)
        if layout is None:
            continue
        plan = _map(modules, family, dialect, layout, base, where)
        rank = (layout.hits, -len(plan.unmatched) - len(plan.shape_mismatch))
        if best is None or rank > (best.layout.hits, -len(best.unmatched) - len(best.shape_mismatch)):
            best = plan
    return best


def _fill(template: str, i: int | None) -> str:
    return template.replace("{i}", str(i)) if i is not None else template


def _offsets(rel: Relation, total: int, width: int, where: str) -> dict[str, tuple[int, int]]:
    """chunk name -> (start, stop) rows in the fused module."""
    from loratool.maths.fuse import row_sizes

    try:
        sizes = row_sizes([s for _, s in rel.chunks], total, width)
    except ValueError as e:
        raise IncompatibleError(f"module '{where}': {e}") from None
    out, start = {}, 0
    for (c, _), n in zip(rel.chunks, sizes):
        out[c] = (start, start + n)
        start += n
    return out


def rows_of(m: LoraModule, spans: list[tuple[int, int]], name: str) -> LoraModule:
    """m with B (and its bias) cut to `spans` of its rows, concatenated; A shared. Lazy, exact."""
    from loratool.io.tensors import TensorRef

    rows = sum(b - a for a, b in spans)

    def cut(ref: TensorRef) -> TensorRef:
        def load() -> object:
            import torch

            t = ref.load()
            return t[spans[0][0]:spans[0][1]] if len(spans) == 1 else torch.cat([t[a:b] for a, b in spans])

        return TensorRef.computed((rows, *ref.shape[1:]), ref.dtype, load, f"{ref.source} rows {spans}")  # type: ignore[arg-type]

    return m.with_(name=name, up=cut(m.up), bias=cut(m.bias) if m.bias is not None else None)


def _map(modules: Sequence[Module], family: Family, dialect: str, layout: BaseLayout, base: dict[str, TensorInfo],
         where: object) -> LayoutPlan:
    from loratool.adapter import compatible

    plan = LayoutPlan(layout, dialect)
    to_original = layout.side == "original"

    def aim(source: str, m: Module, key: str, rows: tuple[int, int] | None = None) -> None:
        info = base.get(key)
        if info is None and isinstance(m, LycoModule) and m.parameter and key.endswith(".weight"):
            key = key[: -len(".weight")]  # a whole diff of a parameter not called weight (Wan's modulation)
            info = base.get(key)
        if info is None:
            plan.unmatched.append(source)
            return
        shape = tuple(info.shape)
        if rows is None:
            if not compatible(m, shape):
                want = m.base_shape if isinstance(m, LoraModule) else m.delta_shape
                plan.shape_mismatch.append((source, key, want, shape))
                return
        else:
            assert isinstance(m, LoraModule)
            want = (rows[1] - rows[0], m.in_features)
            if m.base_shape != want or shape[1:] != (m.in_features,) or rows[1] > shape[0]:
                plan.shape_mismatch.append((source, key, m.base_shape, shape))
                return
        plan.targets.append(Target(source, m, key, rows))

    for m in modules:
        # the shape picks between relations of one name (SD3's context modulation: 6 or 2 chunks)
        ident = family.identify(m.name, dialect, (m.out_features, m.in_features))
        if ident is None:
            plan.unmatched.append(m.name)
            continue
        rel, i, split = ident
        module_original = split is None
        if module_original == to_original or rel.is_plain:
            # the same side, or a rename: one module, one base weight
            plan.renamed += module_original != to_original
            if to_original:
                template = rel.original
            else:
                template = split if split is not None else rel.split[0][0]
            aim(m.name, m, layout.key(_fill(template, i)))
            continue
        if not isinstance(m, LoraModule) or m.magnitude is not None or m.kind != "linear":
            what = "a DoRA module" if isinstance(m, LoraModule) and m.magnitude is not None else (
                f"a {m.kind} module" if isinstance(m, LoraModule) else f"a LyCORIS {m.algo} module")
            plan.refused = plan.refused or IncompatibleError(
                f"{where}: module '{m.name}' is {what}; the {layout.describe()} "
                f"{'fuses' if to_original else 'splits'} it, and only LoRA factors of linear modules split and fuse",
                hint="merge into a base of the adapter's own layout")
            plan.unmatched.append(m.name)
            continue
        plan.crossed += 1
        if to_original:  # a split part into its rows of the fused base weight
            fused_key = layout.key(_fill(rel.original, i))
            info = base.get(fused_key)
            if info is None or len(info.shape) != 2:
                plan.unmatched.append(m.name) if info is None else plan.shape_mismatch.append(
                    (m.name, fused_key, m.base_shape, tuple(info.shape)))
                continue
            spans = _offsets(rel, info.shape[0], info.shape[1], fused_key)
            assert split is not None
            chunks = dict(rel.split)[split]
            if sum(spans[c][1] - spans[c][0] for c in chunks) != m.out_features:
                plan.shape_mismatch.append((m.name, fused_key, m.base_shape, tuple(info.shape)))
                continue
            if len(chunks) == 1:
                aim(m.name, m, fused_key, spans[chunks[0]])
                continue
            start = 0  # several chunks in this module: one piece of B per chunk, each to its rows
            for c in chunks:
                n = spans[c][1] - spans[c][0]
                aim(m.name, rows_of(m, [(start, start + n)], m.name), fused_key, spans[c])
                start += n
        else:  # a fused module into the split base weights: B split by rows, A shared
            spans = _offsets(rel, m.out_features, m.in_features, m.name)
            for template, chunks in rel.split:
                aim(m.name, rows_of(m, [spans[c] for c in chunks], m.name), layout.key(_fill(template, i)))
    return plan
