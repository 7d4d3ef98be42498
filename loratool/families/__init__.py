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

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loratool.families.model import DIALECTS, DIFFUSERS, ORIGINAL, ORIGINAL_SIDE, Family, Relation, one

__all__ = ["DIALECTS", "DIFFUSERS", "ORIGINAL", "ORIGINAL_SIDE", "Detection", "Family", "Relation", "detect",
           "families", "get", "module_shapes", "not_known", "one", "same_conversion"]


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

    @property
    def partial(self) -> bool:
        """The best family names some of the modules but not all: not a known family, only the closest."""
        return self.family is not None and 0 < self.matched < self.total and not self.ambiguous

    def to_dict(self) -> dict[str, object]:
        return {
            # a family only when its names cover the file: a partial fit is the closest family, never the family
            "family": None if self.partial else self.family, "closest": self.family if self.partial else None,
            "dialect": self.dialect, "matched": self.matched, "total": self.total,
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
        if self.partial:
            return not_known(self.family, self.dialect, self.matched, self.total, self.unmatched)
        return f"{self.family}, {self.dialect} dialect"


def not_known(family: str, dialect: str | None, matched: int, total: int, unmatched: list[str]) -> str:
    """'not a known family; closest flux.1 (kohya, 46 of 56 modules); these are not FLUX.1 modules: a, b, c
    (and 7 more)': what inspect and convert say of a file that one family's names only partly cover."""
    title = get(family).title.split(" (")[0]
    rest = total - matched - 3
    shown = ", ".join(unmatched[:3]) + (f" (and {rest} more)" if rest > 0 else "")
    return (f"not a known family; closest {family} ({dialect}, {matched} of {total} modules); "
            f"these are not {title} modules: {shown}")


def families() -> tuple[Family, ...]:
    from loratool.families import (
        chroma,
        flux,
        flux2,
        hidream,
        hunyuan_video,
        hunyuan_video15,
        kandinsky5,
        ltx,
        ltx2,
        qwen_image,
        qwen_image2,
        sd1,
        sd3,
        sdxl,
        wan,
        z_image,
    )

    return (flux.FAMILY, flux2.FAMILY, chroma.FAMILY, sd3.FAMILY, wan.FAMILY, hunyuan_video.FAMILY, qwen_image.FAMILY,
            ltx.FAMILY, z_image.FAMILY, hidream.FAMILY, sd1.FAMILY, sdxl.FAMILY, kandinsky5.FAMILY, qwen_image2.FAMILY,
            ltx2.FAMILY, hunyuan_video15.FAMILY)


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
    (re.compile(r"flux[._-]?2", re.I), "flux.2"),
    (re.compile(r"chroma", re.I), "chroma"),
    (re.compile(r"z[._-]?image|lumina", re.I), "z-image"),
    (re.compile(r"hidream", re.I), "hidream"),
    (re.compile(r"flux", re.I), "flux.1"),
    (re.compile(r"hunyuan.?video.?1[._]?5|hunyuanvideo15|hy_?video_?1_?5", re.I), "hunyuan-video-1.5"),
    (re.compile(r"hunyuan", re.I), "hunyuan-video"),
    (re.compile(r"qwen.?image.?2(?:\.\d+|1)?(?!\d)", re.I), "qwen-image-2"),  # not Qwen-Image-2512
    (re.compile(r"qwen", re.I), "qwen-image"),
    (re.compile(r"ltx.?2(?:\.\d+)?(?![\db])|ltxav", re.I), "ltx-2"),
    (re.compile(r"ltx", re.I), "ltx-video"),
    (re.compile(r"kandinsky.?5", re.I), "kandinsky-5"),
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
    try:  # a file loratool wrote by a family's table says which
        said = json.loads((metadata or {}).get("loratool.params", "")).get("family")
    except (ValueError, AttributeError):
        return None
    if isinstance(said, str) and said in {f.name for f in families()}:
        return said, f"loratool.params says family {said}"
    return None


def module_shapes(modules: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of an adapter's modules (LoRA or LyCORIS), for `detect`'s `shapes`."""
    return {n: (m.out_features, m.in_features) for n, m in modules.items()}


def detect(names: list[str], metadata: dict[str, str] | None = None,
           shapes: Mapping[str, tuple[int, int]] | None = None) -> Detection:
    """The family and dialect whose module names cover the most of `names` (header only, no torch).

    Families that cover the same number of names are tied: the detection is ambiguous and names
    none, unless the header's training metadata (`ss_base_model_version`, `modelspec.architecture`,
    `ss_architecture`) names one of them. Otherwise the best family wins, with a reason against
    every other family that fits part. `shapes` (name -> (out, in), from the header) rules out a
    family whose module of that name has other rows (FLUX.2's (9h, h) `linear1` is not FLUX.1's).
    """
    shapes = shapes or {}
    scores: list[tuple[int, Family, str, list[str]]] = []
    for fam in families():
        for dialect in fam.dialects:
            hits = [n for n in names if fam.identify(n, dialect, shapes.get(n)) is not None]
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
        filling = list(dict.fromkeys(f.name for f, _, _, _ in full))
        if 1 < len(filling) < len(tied):
            # several families' blocks are all there (FLUX.1 and Chroma have the same blocks): the
            # tie is theirs, not the families with more blocks
            tied = filling
        said = metadata_family(metadata)
        if said is not None and said[0] in tied:  # the names fit both; the header says which model it was for
            fam, dialect, hits = next((f, d, h) for n, f, d, h in scores if n == best and f.name == said[0])
            why = [f"{said[1]}; the names fit {' and '.join(tied)} alike"]
            return Detection(fam.name, dialect, best, len(names), hits[:3], candidates,
                             [n for n in names if n not in set(hits)], why, [fam.name])
        # one family's own spelling, the others' only as a loader's respelling (FLUX.1's kohya names are
        # HunyuanVideo's only as ComfyUI names HunyuanVideo's modules): that family's
        own = [(f, d, h) for n, f, d, h in scores if n == best and f.name in tied
               and all(f.identify(x, d, canonical=True) is not None for x in h)]
        if len({f.name for f, _, _ in own}) == 1:
            fam, dialect, hits = own[0]
            why = [f"not {t}: the names are {fam.name}'s own ({dialect}); {t}'s are spelled so only for ComfyUI"
                   for t in tied if t != fam.name]
            return Detection(fam.name, dialect, best, len(names), hits[:3], candidates, unmatched, why, [fam.name])
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
            if any(other.identify(name, d, shapes.get(name)) is not None for d in DIALECTS):
                continue
            if any(other.identify(name, d) is not None for d in DIALECTS):  # its name, not its shape
                out, width = shapes[name]
                reason = f"not {other.name}: {name} is ({out}, {width}), not one of its shapes"
                break
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
