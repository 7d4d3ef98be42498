"""The vocabulary of the family tables: the key dialects, a Relation between the original and the
diffusers layout, and a Family (its relations, block counts and sides). Each family module builds one
Family from these; the package's __init__ holds the registry and detection. Nothing here reads files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

DIALECTS = ("kohya", "comfyui", "diffusers", "peft", "onetrainer", "diffusion-pipe")
# which side of a relation a dialect names by default: the original (fused) layout or diffusers'
# (split) one (Family.sides overrides it per family)
ORIGINAL_SIDE = frozenset({"kohya", "comfyui", "diffusion-pipe"})
ORIGINAL, DIFFUSERS = "original", "diffusers"


@dataclass(frozen=True)
class Relation:
    """One original-layout module and the diffusers module(s) holding the same output rows.

    Attributes:
        original: path template in the original layout (`{i}`: the block index).
        chunks: the original module's output rows in order, as (name, size); size "h" = the
            module's input width, "rest" = what the other chunks leave.
        split: diffusers path template -> the chunk names its rows hold, in its own order.
        rows: the module's output rows ("2h": twice its input width) when the relation holds only
            for that shape (SD3's last context block modulates with (shift, scale), the others with
            six chunks); None for any shape. A module of no listed shape is not the family's.
    """

    original: str
    chunks: tuple[tuple[str, str], ...]
    split: tuple[tuple[str, tuple[str, ...]], ...]
    rows: str | None = None

    def fits(self, shape: tuple[int, int] | None) -> bool:
        """Whether a module of (out, in) `shape` is this relation's (any shape when None is given)."""
        if self.rows is None or shape is None:
            return True
        n = self.rows[:-1]
        return shape[0] == (int(n) if n else 1) * shape[1]

    @property
    def is_plain(self) -> bool:
        """One module on each side holding the same rows in the same order (a rename)."""
        return len(self.split) == 1 and tuple(c for c, _ in self.chunks) == self.split[0][1]


def one(original: str, diffusers: str) -> Relation:
    """A relation that is a plain rename."""
    return Relation(original, (("all", "rest"),), ((diffusers, ("all",)),))


QKV = (("q", "h"), ("k", "h"), ("v", "h"))
# the context (text) stream's q, k, v in diffusers' joint attention
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def qkv(original: str, attn: str, names: tuple[str, str, str] = ("to_q", "to_k", "to_v"),
        *, extra: tuple[tuple[str, str, str], ...] = ()) -> Relation:
    """A fused attention input: q, k, v (h rows each) in `original`, diffusers' `attn.<name>` modules
    (to_q / to_k / to_v, or the context stream's add_q_proj / ...); `extra` chunks follow v as
    (chunk, size, diffusers path), e.g. a single block's MLP input."""
    split = tuple((f"{attn}.{n}", (c,)) for n, c in zip(names, "qkv"))
    return Relation(original, (*QKV, *((c, n) for c, n, _ in extra)), (*split, *((d, (c,)) for c, _, d in extra)))


def shift_scale(original: str, diffusers: str) -> Relation:
    """A final-layer modulation: (shift, scale) halves in the original, (scale, shift) in diffusers'
    AdaLayerNormContinuous."""
    return Relation(original, (("shift", "half"), ("scale", "half")), ((diffusers, ("scale", "shift")),))


@dataclass(frozen=True)
class Family:
    """A model family: its relations and its base checkpoint layouts.

    Attributes:
        name: `flux.1`, ...; title: for messages.
        relations: every LoRA-targetable module.
        original_prefix / diffusers_component: the kohya prefix and component its modules use.
        base_layouts: the base checkpoint key layouts, for docs and merge: name -> key prefix.
        sides: dialect -> the sides ("original", "diffusers") its names may be on, the first the one
            written; () when the family has no names in that dialect. A dialect not listed names
            the default side (ORIGINAL_SIDE).
        single_text_encoder: the pipeline has one text encoder, which kohya names `lora_te_` (SD1.x)
            rather than `lora_te1_`.
    """

    name: str
    title: str
    relations: tuple[Relation, ...]
    kohya_prefix: str = "lora_unet_"
    comfy_prefix: str = "diffusion_model."
    component: str = "transformer"
    onetrainer_prefix: str = "lora_transformer_"
    base_layouts: dict[str, str] = field(default_factory=dict)
    # block counts of the largest model of the family, by the template's first segment (original and
    # diffusers side): a higher index is another family's module (HunyuanVideo has 20 double blocks)
    blocks: dict[str, int] = field(default_factory=dict)
    sides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    single_text_encoder: bool = False
    original_layout: str = "BFL / ComfyUI single-file"  # what the original layout is called in messages

    def sides_of(self, dialect: str) -> tuple[str, ...]:
        """The sides whose names `dialect` may use for this family, the written one first."""
        if dialect in self.sides:
            return self.sides[dialect]
        return (ORIGINAL,) if dialect in ORIGINAL_SIDE else (DIFFUSERS,)

    def writes_original(self, dialect: str) -> bool:
        """Whether `dialect` names this family's modules by their original-side paths when written."""
        sides = self.sides_of(dialect)
        return bool(sides) and sides[0] == ORIGINAL

    @property
    def dialects(self) -> tuple[str, ...]:
        """The dialects that have names for this family."""
        return tuple(d for d in DIALECTS if self.sides_of(d))

    def name_in(self, dialect: str, path: str, *, original: bool) -> str:
        """A module path (original or diffusers side, block index filled in) as `dialect` names it."""
        if dialect == "kohya":
            return self.kohya_prefix + path.replace(".", "_")
        if dialect == "comfyui":
            return self.comfy_prefix + path
        if dialect in ("diffusers", "diffusion-pipe"):  # diffusion-pipe: original names, diffusers' prefix
            return f"{self.component}.{path}"
        if dialect == "onetrainer":
            return self.onetrainer_prefix + path.replace(".", "_")
        return path

    @cached_property
    def _lookup(self) -> dict[str, tuple[dict[str, list[tuple[int, Relation, str | None]]],
                                         list[tuple[int, re.Pattern[str], Relation, str | None]],
                                         re.Pattern[str] | None]]:
        """dialect -> (fixed name -> [(order, relation, diffusers template or None for the original
        side)], the names with a block index `{i}` as regexes in order, one regex matching any of
        those or None). A U-Net's relations are a thousand fixed names: looked up, not tried one by one;
        most names tried are not this family's."""
        out = {}
        for dialect in DIALECTS:
            exact: dict[str, list[tuple[int, Relation, str | None]]] = {}
            templated: list[tuple[int, re.Pattern[str], Relation, str | None]] = []
            order = 0
            for rel in self.relations:
                sides: list[tuple[str, str | None]] = []
                for side in self.sides_of(dialect):
                    sides += [(rel.original, None)] if side == ORIGINAL else [(t, t) for t, _ in rel.split]
                for template, split in sides:
                    named = self.name_in(dialect, template, original=split is None)
                    if "{i}" in named:
                        rx = re.escape(named).replace(re.escape("{i}"), r"(\d+)")
                        templated.append((order, re.compile(rx + "$"), rel, split))
                    else:
                        exact.setdefault(named, []).append((order, rel, split))
                    order += 1
            anyone = re.compile("|".join(f"(?:{rx.pattern})" for _, rx, _, _ in templated)) if templated else None
            out[dialect] = (exact, templated, anyone)
        return out

    def identify(self, name: str, dialect: str, shape: tuple[int, int] | None = None
                 ) -> tuple[Relation, int | None, str | None] | None:
        """(relation, block index, diffusers template or None for the original side) of a module name.

        `shape` (out, in) picks between relations that share a name but differ by shape (`rows`);
        without it the first relation of the name is returned (enough to detect a family).
        """
        exact, templated, anyone = self._lookup[dialect]
        found: list[tuple[int, Relation, int | None, str | None]] = [
            (order, rel, None, split) for order, rel, split in exact.get(name, ()) if rel.fits(shape)]
        if anyone is not None and anyone.match(name):
            for order, rx, rel, split in templated:
                m = rx.match(name)
                if m and rel.fits(shape):
                    found.append((order, rel, int(m.group(1)), split))
                    break
        if not found:
            return None
        _, rel, i, split = min(found, key=lambda f: f[0])
        limit = self.blocks.get((split or rel.original).split(".", 1)[0])
        if i is not None and limit is not None and i >= limit:
            return None
        return rel, i, split

    def over_limit(self, name: str) -> tuple[str, int, int] | None:
        """(block list, index, its block count) when `name` is one of this family's modules in some
        dialect but for a block index past the family's count; else None."""
        for dialect in DIALECTS:
            for _, rx, rel, split in self._lookup[dialect][1]:
                m = rx.match(name)
                if m and m.groups():
                    segment = (split or rel.original).split(".", 1)[0]
                    limit = self.blocks.get(segment)
                    if limit is not None and int(m.group(1)) >= limit:
                        return segment, int(m.group(1)), limit
        return None
