"""Model families as data: which modules a family has in each LoRA key dialect, and how fused
modules split.

A family (one module per family, e.g. flux.py) lists Relations. A relation ties one module of the
original (single-file, BFL / ComfyUI) layout to the module(s) of the diffusers layout that hold the
same rows: `double_blocks.{i}.img_attn.qkv` (rows q, k, v) <-> `transformer_blocks.{i}.attn.to_q`
(q), `.to_k` (k), `.to_v` (v). Row chunk sizes are multiples of the module's input width ("h") or
what is left ("rest"), so one table fits every size of the model.

Dialects (how a LoRA file names a module):

    kohya      lora_unet_ + original path, dots -> underscores   lora_unet_double_blocks_0_img_attn_qkv
    comfyui    diffusion_model. + original path                  diffusion_model.double_blocks.0.img_attn.qkv
    diffusers  transformer. + diffusers path                     transformer.transformer_blocks.0.attn.to_q
    peft       diffusers path                                    transformer_blocks.0.attn.to_q
    onetrainer lora_transformer_ + diffusers path, underscores   lora_transformer_transformer_blocks_0_attn_to_q
    diffusion-pipe  transformer. + original path (read only)     transformer.double_blocks.0.img_attn_qkv

These are the default sides; a family may name others (`Family.sides`): kohya sd-scripts trains
SD1.x on diffusers' U-Net (`lora_unet_down_blocks_0_attentions_0_...`, the diffusers side) but SDXL
on the original one (`lora_unet_input_blocks_4_1_...`), and ComfyUI reads both under `lora_unet_`.

The maths of moving a LoRA between the sides (exact split, exact fuse) is in convert.py here;
nothing in this package reads or writes files.
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


@dataclass
class Detection:
    """What `detect` found: the family and dialect whose names cover the adapter, with evidence.

    Names on the diffusers side are shared between families (FLUX.1 and HunyuanVideo both have
    `transformer_blocks.N.attn.to_q`), and some original-side names too (musubi-tuner's HunyuanVideo
    `lora_unet_double_blocks_0_img_attn_qkv` is FLUX.1's kohya name): a file that fits several families
    equally is ambiguous (`family` None, the tied families in `tied`); one that fits one family best
    names it, with `reasons` saying what rules out each other family that fits part of it (a module
    only this family has, or a block index past the other's block count).
    """

    family: str | None
    dialect: str | None
    matched: int
    total: int
    evidence: list[str]  # up to 3 names that matched
    candidates: list[tuple[str, str, int]]  # (family, dialect, modules matched), best first
    unmatched: list[str]
    reasons: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # the families that fit equally (ambiguous when > 1)

    @property
    def confident(self) -> bool:
        """One family fits better than any other and names every module: conversions may use its table."""
        return self.family is not None and self.matched == self.total > 0 and not self.ambiguous

    @property
    def ambiguous(self) -> bool:
        return len(self.tied) > 1

    def to_dict(self) -> dict[str, object]:
        return {
            "family": self.family, "dialect": self.dialect, "matched": self.matched, "total": self.total,
            "ambiguous": self.ambiguous, "tied": self.tied, "confident": self.confident, "evidence": self.evidence,
            "reasons": self.reasons,
            "candidates": [{"family": f, "dialect": d, "matched": n} for f, d, n in self.candidates],
            "unmatched": self.unmatched[:10],
        }

    def describe(self) -> str:
        if self.ambiguous:
            # each tied family once, in its best dialect (the first listed)
            best = {f: d for f, d, n in reversed(self.candidates) if n == self.matched and f in self.tied}
            return "ambiguous: " + " or ".join(f"{f} ({best[f]})" for f in self.tied)
        if self.family is None:
            return "unknown"
        part = "" if self.matched == self.total else f", {self.matched} of {self.total} modules"
        return f"{self.family}, {self.dialect} dialect{part}"


def families() -> tuple[Family, ...]:
    from loratool.families import flux, hunyuan_video, ltx, qwen_image, sd1, sd3, sdxl, wan

    return (flux.FAMILY, sd3.FAMILY, wan.FAMILY, hunyuan_video.FAMILY, qwen_image.FAMILY, ltx.FAMILY, sd1.FAMILY,
            sdxl.FAMILY)


def get(name: str) -> Family:
    for f in families():
        if f.name == name:
            return f
    raise KeyError(name)


def check_name(name: str) -> Family:
    """The family a --family value names.

    Raises:
        IncompatibleError: an unknown name, with the family it most likely means (`flux`: flux.1,
            `sd15`: sd1, `hunyuan`: hunyuan-video) and the known ones.
    """
    from loratool.errors import IncompatibleError

    try:
        return get(name)
    except KeyError:
        pass
    known = [f.name for f in families()]

    def bare(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    given = bare(name)
    near = [k for k in known if given and (bare(k).startswith(given) or given.startswith(bare(k)))]
    if not near:
        import difflib

        near = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    guess = f"; did you mean {near[0]}?" if near else ""
    raise IncompatibleError(f"--family {name}: unknown family{guess}", hint=f"known: {', '.join(known)}")


# what the training tools write in the header about the model (kohya ss_base_model_version and
# modelspec.architecture, musubi-tuner ss_architecture) -> the family it means
_METADATA_KEYS = ("ss_base_model_version", "modelspec.architecture", "ss_architecture")
_METADATA_FAMILIES = (
    (re.compile(r"sdxl|stable-diffusion-xl", re.I), "sdxl"),
    (re.compile(r"sd_?v?1|stable-diffusion-v1|sd-?1\.5|sd15", re.I), "sd1"),
    (re.compile(r"sd_?v?3|stable-diffusion-v3|stable-diffusion-3", re.I), "sd3"),
    (re.compile(r"flux", re.I), "flux.1"),
    (re.compile(r"hunyuan", re.I), "hunyuan-video"),
    (re.compile(r"qwen", re.I), "qwen-image"),
    (re.compile(r"ltx", re.I), "ltx-video"),
    (re.compile(r"^wan", re.I), "wan"),
)


def metadata_family(metadata: dict[str, str] | None) -> tuple[str, str] | None:
    """(family, 'KEY says VALUE') from the header's training metadata, or None."""
    for key in _METADATA_KEYS:
        value = (metadata or {}).get(key)
        if not value:
            continue
        for pattern, family in _METADATA_FAMILIES:
            if pattern.search(value):
                return family, f"{key} says {value}"
    return None


def detect(names: list[str], metadata: dict[str, str] | None = None) -> Detection:
    """The family and dialect whose module names cover the most of `names` (header only, no torch).

    Families that cover the same number of names are tied: the detection is ambiguous and names
    none, unless the header's training metadata (`ss_base_model_version`, `modelspec.architecture`,
    `ss_architecture`) names one of them. Otherwise the best family wins, with a reason against
    every other family that fits part.
    """
    scores: list[tuple[int, Family, str, list[str]]] = []
    for fam in families():
        for dialect in fam.dialects:
            hits = [n for n in names if fam.identify(n, dialect) is not None]
            if hits:
                scores.append((len(hits), fam, dialect, hits))
    scores.sort(key=lambda s: -s[0])  # stable: families() order among equals
    if not scores:
        return Detection(None, None, 0, len(names), [], [], list(names))
    best, fam, dialect, hits = scores[0]
    candidates = [(f.name, d, n) for n, f, d, _ in scores]
    tied = list(dict.fromkeys(f.name for n, f, _, _ in scores if n == best))
    hit_set = set(hits)
    unmatched = [n for n in names if n not in hit_set]
    if len(tied) > 1:
        # the same names, but one family's blocks are all there and the others have more blocks than
        # the file uses (FLUX.1 and HunyuanVideo share their diffusers names; a FLUX.1 LoRA on every
        # block has double blocks 0-18, while HunyuanVideo has 20): that family, with the reason
        full = [(f, d, h, filled) for n, f, d, h in scores if n == best and f.name in tied
                for filled in [_filled_blocks(f, d, h)] if filled]
        if len({f.name for f, _, _, _ in full}) == 1:
            fam, dialect, hits, filled = full[0]
            why = [f"not {t}: the modules fill all of {fam.name}'s {filled}, of which {t} has more"
                   for t in tied if t != fam.name]
            return Detection(fam.name, dialect, best, len(names), hits[:3], candidates, unmatched, why, [fam.name])
        said = metadata_family(metadata)
        if said is not None and said[0] in tied:  # the names fit both; the header says which model it was for
            fam, dialect, hits = next((f, d, h) for n, f, d, h in scores if n == best and f.name == said[0])
            why = [f"{said[1]}; the names fit {' and '.join(tied)} alike"]
            return Detection(fam.name, dialect, best, len(names), hits[:3], candidates,
                             [n for n in names if n not in set(hits)], why, [fam.name])
        return Detection(None, None, best, len(names), hits[:3], candidates, unmatched, tied=tied)
    # per other family that fits part: a name of ours it has in no dialect, or one past its block count
    reasons: list[str] = []
    seen = {fam.name}
    for n_other, other, other_dialect, _ in scores[1:]:
        if other.name in seen:
            continue
        seen.add(other.name)
        reason = f"not {other.name}: it names {n_other} of the modules ({other_dialect}), {fam.name} {best}"
        past = False
        for name in hits:
            if any(other.identify(name, d) is not None for d in DIALECTS):
                continue
            over = other.over_limit(name)
            if over is not None:
                if not past:
                    segment, index, limit = over
                    reason, past = f"not {other.name}: {name} is in {segment} {index}, past its {limit}", True
            else:
                reason = f"not {other.name}: {name} is not one of its modules"
                break  # a module it lacks says more than a block index
        reasons.append(reason)
    return Detection(fam.name, dialect, best, len(names), hits[:3], candidates, unmatched, reasons, [fam.name])


def _filled_blocks(fam: Family, dialect: str, hits: list[str]) -> str | None:
    """'19 transformer_blocks' when `hits` hold every block index of one of the family's block lists
    (and none past it), else None."""
    seen: dict[str, set[int]] = {}
    for name in hits:
        ident = fam.identify(name, dialect)
        if ident is None or ident[1] is None:
            continue
        rel, i, split = ident
        assert i is not None
        seen.setdefault((split or rel.original).split(".", 1)[0], set()).add(i)
    for segment, indices in seen.items():
        limit = fam.blocks.get(segment)
        if limit is not None and limit > 1 and indices == set(range(limit)):
            return f"{limit} {segment}"
    return None


def same_conversion(names: list[str], fits: list[tuple[Family, str]], target: str) -> bool:
    """Whether every (family, dialect) in `fits` converts `names` to `target` the same way: the same
    target names, the same row chunks, the same split or fuse (FLUX.1's and HunyuanVideo's kohya
    attention names become the same diffusers modules, but not the same ComfyUI ones)."""
    def signature(fam: Family, dialect: str, name: str) -> tuple[object, ...] | None:
        ident = fam.identify(name, dialect)
        if ident is None:
            return None
        rel, i, split = ident

        def fill(t: str) -> str:
            return t.replace("{i}", str(i)) if i is not None else t

        # within one dialect a module keeps its side (convert_family)
        to_original = split is None if dialect == target else fam.writes_original(target)
        written = fam.name_in(target, fill(rel.original), original=True) if to_original else \
            tuple((fam.name_in(target, fill(t), original=False), c) for t, c in rel.split)
        side = None if split is None else tuple(c for t, c in rel.split if t == split)
        return written, rel.chunks, side, rel.is_plain

    first, *rest = fits
    return all(signature(*first, n) == signature(f, d, n) is not None for n in names for f, d in rest)
