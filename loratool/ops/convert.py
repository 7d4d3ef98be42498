"""convert: move an adapter between PEFT, kohya and diffusers without changing what it does.

The factors are copied bit for bit; only module names, the way alpha is stored and the DoRA
magnitude's key change, and each module's effective scale is kept exactly (the writers check it).

Names. kohya names lost their dots, so kohya -> PEFT / diffusers needs the module paths back:
with `base`, every module is matched against the base's key list (keymap.match_modules) and its
path is the matched key without `.weight`; without a base, the kohya naming rules place a name only
when they allow exactly one reading (formats.kohya.restore_dots). Names that cannot be placed are
listed in one error. The target layouts:

- PEFT: with `base`, the base's own key paths (container prefixes such as `model.diffusion_model.`
  kept: PEFT names modules inside the model whose state dict is that checkpoint); without one, the
  path inside the component when the adapter spans one component, else `<component>.<path>`.
- diffusers: `<component>.<path inside the component>`, containers replaced by their component
  (formats.diffusers.place); layouts that diffusers names differently are refused.
- kohya: formats.kohya.kohya_name.

With `base`, every module must match a base weight of a compatible shape, and 1x1-conv factors are
reshaped to the base weight's layout (linear <-> 1x1 conv) so the consumer finds what it expects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter, LoraModule, LycoModule
from loratool.errors import IncompatibleError
from loratool.io.header import read_side_file
from loratool.io.paths import folder_file
from loratool.io.tensors import TensorRef
from loratool.ops import Phase, Row, output_size
from loratool.runtimes import RUNTIME_OF_FORMAT

SCHEMA = 1


@dataclass
class ModuleConvert(Row):
    name: str  # as read
    new_name: str  # as written (kohya: the key stem; diffusers: with its component)
    kind: str
    rank: int
    alpha: float  # as read
    scale: float  # the effective scale, unchanged by conversion
    placed_by: str  # "base", "metadata" (recorded by loratool in a kohya file), "rules" (kohya naming
    # rules) or "name" (translated from the name alone)
    from_algo: str = "lora"  # the LyCORIS algo a module was converted from (loha, lokr, tucker, full)
    exact_rank: int | None = None  # rank of the exact LoRA form of a LyCORIS module
    rel_error: float = 0.0  # ||ΔW − ΔW_lora||_F / ||ΔW||_F (0 unless truncated)


@dataclass
class ConvertReport:
    out: Path
    source: Path
    source_format: str
    format: str
    base: Path | None
    modules: list[ModuleConvert] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)  # modules_to_save tensors carried over (PEFT)
    size: int = 0
    warnings: list[str] = field(default_factory=list)
    runtime: str | None = None  # convert --for: the runtime the output is laid out for
    prepared: dict[str, Any] | None = None  # convert --for: one rank/alpha, baked and dropped modules
    dora_errors: dict[str, float] | None = None  # --dora-to-lora: relative error per folded module

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.runtime is not None:
            extra = {"runtime": self.runtime, **(self.prepared or {})}
        if self.dora_errors is not None:
            extra["dora_to_lora"] = self.dora_errors
        return {**extra,
            "schema": SCHEMA,
            "out": str(self.out),
            "source": str(self.source),
            "source_format": self.source_format,
            "format": self.format,
            "base": None if self.base is None else str(self.base),
            "num_modules": len(self.modules),
            "modules": [m.to_dict() for m in self.modules],
            "extras": self.extras,
            "size": self.size,
            "warnings": self.warnings,
        }


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _base_class(ckpt_root: Path) -> str | None:
    """The diffusers `_class_name` of a component directory's config.json, if there is one."""
    cfg = folder_file(ckpt_root, "config.json")
    try:
        data = json.loads(read_side_file(cfg).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # FIFOs, devices, absurd sizes: FormatError, not ignored
        return None
    name = data.get("_class_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def _match_base(adapter: Adapter, base: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], str | None]:
    """Module name -> base key and base key -> shape; every module must match exactly one weight.

    Raises:
        IncompatibleError: unmatched, ambiguous or shape-mismatched modules (all listed).
    """
    from loratool.io.checkpoint import open_checkpoint
    from loratool.keymap import match_modules

    ckpt = open_checkpoint(base)
    # experts of fused parameters keep their names (the parameter's path, docs/moe.md), matched below
    match = match_modules([m for m in adapter.modules.values() if m.expert is None], ckpt.tensors)
    match.refuse_shape_mismatch(adapter.path, base)
    problems = [*match.unmatched, *(f"{n} (ambiguous: {', '.join(k)})" for n, k in match.ambiguous.items())]
    experts = [m for m in adapter.modules.values() if m.expert is not None]
    if experts:  # each against its fused tensor (shape, expert count) or its per-expert Linears
        from loratool.keymap import match_experts, moe_transposed

        by_expert, _ = match_experts(experts, ckpt.tensors, transposed=moe_transposed(ckpt.root))
        by_expert.refuse_shape_mismatch(adapter.path, base)
        problems += by_expert.unmatched
    if problems:
        raise IncompatibleError(
            f"{adapter.path}: {len(problems)} module(s) match no single weight of {base}: {_listing(problems)}",
            hint="pass the base model the adapter was trained for (check with: loratool validate ADAPTER --base BASE)",
        )
    shapes = {key: tuple(ckpt.tensors[key].shape) for key in match.matched.values()}
    return match.matched, shapes, _base_class(ckpt.root)


def _matches_base(adapter: Adapter, base: Path) -> bool:
    """Whether every module matches one weight of `base` by the key rules (headers only)."""
    from loratool.formats import format_names, get_format
    from loratool.io.checkpoint import open_checkpoint
    from loratool.keymap import match_modules

    if adapter.source_format in format_names() and get_format(adapter.source_format).layout_in is not None:
        return True  # names of the format's own (GGUF) map back through the base (layout_in), not a family table
    return match_modules(list(adapter.modules.values()), open_checkpoint(base).tensors).ok


def _fit_layout(m: LoraModule, shape: tuple[int, ...]) -> LoraModule:
    """Reshape a module's factors to its base weight's layout: linear <-> 1x1 conv (same delta)."""
    if m.kind == "conv" and len(shape) == 2 and all(k == 1 for k in m.kernel):
        down = m.down.load().reshape(m.rank, -1)  # (r, in, 1, 1) -> (r, in)
        up = m.up.load().reshape(m.out_features, m.rank)  # (out, r, 1, 1) -> (out, r)
        return m.with_(down=TensorRef.from_tensor(down), up=TensorRef.from_tensor(up), kind="linear")
    if m.kind == "linear" and not m.fan_in_fan_out and len(shape) > 2 and all(k == 1 for k in shape[2:]):
        ones = (1,) * (len(shape) - 2)
        down = m.down.load().reshape(m.rank, m.in_features, *ones)
        up = m.up.load().reshape(m.out_features, m.rank, *ones)
        return m.with_(down=TensorRef.from_tensor(down), up=TensorRef.from_tensor(up), kind="conv")
    return m


def _origin(modules: dict[str, LoraModule], order: list[str]) -> dict[str, str]:
    """Each module's name as read, where a layout renamed modules one for one (a layout that splits or
    fuses modules, such as GGUF's expert stacks, changes their count: then none)."""
    return dict(zip(modules, order)) if len(modules) == len(order) else {}


def _expert_origin(after: Adapter, before: Adapter) -> dict[str, str]:
    """Each module's name before experts_for_checkpoint: a per-expert Linear split from a fused expert ->
    that expert, a fused expert -> its first per-expert part."""
    from loratool.adapter import expert_name
    from loratool.families.moe import fused_part, stored_parts

    out: dict[str, str] = {}
    for name, m in after.modules.items():
        if name in before.modules:
            candidates = [name]
        elif m.expert is None:
            hit = fused_part(name)
            candidates = [expert_name(hit.param, hit.index)] if hit is not None else []
        else:
            candidates = [paths[0] for _, paths in stored_parts(m.expert.param, m.expert.index)]
        out[name] = next((c for c in candidates if c in before.modules), name)
    return out


def convert(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: str | None = None,
    base: str | os.PathLike[str] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    rank: int | None = None,
    for_runtime: str | None = None,
    drop: bool = False,
    dora_to_lora: str | os.PathLike[str] | None = None,
    family: str | None = None,
    fuse_rank: int | None = None,
    phase: Phase | None = None,
    allow_variant: bool = False,
    initial_adapter: str | os.PathLike[str] | None = None,
) -> ConvertReport:
    """Convert an adapter to another format (or rewrite it in its own), keeping every delta exact.

    Args:
        to: "peft" (a directory), "kohya" or "diffusers" (one file); default: the runtime's format;
            "lora": the source's own format with every LyCORIS module turned into plain LoRA factors.
        for_runtime: a runtime name (loratool.runtimes): write the layout it serves exactly (one rank
            and one alpha where it reads one, see ops.runtime.prepare_for).
        drop: with for_runtime, remove what the runtime cannot hold (with a warning) instead of refusing.
        dora_to_lora: a base model: every DoRA module becomes the best plain LoRA of its rank for that
            base's weights, an approximation whose relative error per module is reported.
        base: the base model (file or directory); kohya names are placed by its keys, every module
            must match one of its weights, and factors take its layout (linear vs 1x1 conv).
        family: a model family (`flux.1`, `sd3`, ...): convert between its dialects (kohya, comfyui, diffusers,
            peft), splitting and fusing modules by its table; detected from original-layout (BFL)
            names when not given. comfyui output needs a family.
        fuse_rank: truncate block-diagonal fused modules to this rank (error reported).
        allow_variant: go on with an unconverted PiSSA / OLoRA / CorDA / LoftQ or an aLoRA adapter
            (loratool.variants; refused by default), with a warning saying what the output means.
        initial_adapter: the adapter PEFT saved right after a PiSSA / OLoRA / CorDA initialisation:
            the output is PEFT's conversion to plain LoRA (ΔW = s·(B·A − B0·A0), rank 2r).
        rank: LyCORIS modules become LoRA factors of at most this rank (the best truncation, its
            error reported per module); None keeps them exact. Full 2-D diffs become LoRA only
            with a rank; without one they stay full diffs (kohya output only).
        phase: called with what the conversion is doing (reading, converting, writing).

    Raises:
        IncompatibleError: names that cannot be placed (listed), modules that do not fit `base`,
            content the target cannot hold (embeddings/fan_in_fan_out for kohya and diffusers,
            modules_to_save tensors), or two modules with one target name.
        FormatError, OutputExistsError.
    """
    from loratool.formats import (
        check_writable,
        experts_for_checkpoint,
        format_names,
        get_format,
        read,
        require_plain,
        source_label,
        write,
    )
    from loratool.formats.registry import written_as
    from loratool.formats.rename import FOREIGN, stored_name, target_names
    from loratool.hub import resolve_path

    runtime = None
    if for_runtime is not None:
        from loratool.ops.runtime import get_runtime

        runtime = get_runtime(for_runtime)
        if to is not None and to != runtime.writes:
            raise IncompatibleError(f"--to {to} --for {for_runtime}: {for_runtime} loads {runtime.writes} adapters",
                                    hint=f"drop --to (--for {for_runtime} writes {runtime.writes})")
        to = runtime.writes
    if to is None:
        raise IncompatibleError("no output format", hint="give --to FORMAT or --for RUNTIME")
    if runtime is None and to in RUNTIME_OF_FORMAT:
        from loratool.ops.runtime import get_runtime

        runtime = get_runtime(RUNTIME_OF_FORMAT[to])
    if to != "lora":
        get_format(to, writing=True)  # an unknown target is refused before anything is read
    say = phase or (lambda text: None)
    path = resolve_path(path)
    base = resolve_path(base) if base is not None else None
    say(f"reading {Path(path).name}")
    adapter = read(path, allow_pickle=allow_pickle)
    require_plain(adapter, "convert", lycoris=True)
    from loratool.variants import convert_with_initial, guard

    if initial_adapter is not None:  # PEFT's path_initial_model_for_weight_conversion, from the files
        adapter = convert_with_initial(adapter, read(resolve_path(initial_adapter), allow_pickle=allow_pickle))
    variant_warnings = guard(adapter, "convert", allow_variant)
    say(f"converting {len(adapter.modules) + len(adapter.lycoris)} modules to {to}")
    if to == "lora":
        to = written_as(adapter.source_format)
    target = get_format(to, writing=True)
    if adapter.reshapes:  # a control LoRA: ComfyUI's spelling of it as it is; other targets refused by name
        check_writable(adapter, target.name)
        report = ConvertReport(Path(out), Path(path), adapter.source_format, to, None, warnings=variant_warnings,
                               extras=sorted(adapter.extras))
        report.modules = [ModuleConvert(m.name, m.name, m.kind, m.rank, m.alpha, m.scale, "name")
                          for m in adapter.modules.values()]
        say(f"writing and re-reading {Path(out).name}")
        written = write(adapter, out, fmt=target.name, force=force, op="convert", params={"to": to},
                        sources=adapter.files)
        report.size = output_size(written)
        return report
    if rank is not None and rank < 1:
        raise IncompatibleError(f"--rank {rank}: must be at least 1")
    lyco_rows: dict[str, tuple[str, int, float]] = {}
    lyco_warnings: list[str] = []
    if adapter.lycoris:
        base_path = Path(base) if base is not None else None
        adapter, lyco_rows, lyco_warnings = _lycoris_to_lora(adapter, to, rank, base_path)
    if not adapter.modules and not adapter.lycoris:
        raise IncompatibleError(f"{path}: holds no LoRA modules to convert")
    report = ConvertReport(Path(out), Path(path), adapter.source_format, to, Path(base) if base is not None else None,
                           warnings=variant_warnings + lyco_warnings)
    as_read = adapter.modules  # the report shows each module's rank, alpha and scale as read
    if dora_to_lora is not None:
        from loratool.ops.runtime import dora_to_lora as fold

        adapter, errors = fold(adapter, dora_to_lora)
        report.dora_errors = errors
        for name, err in errors.items():
            report.warnings.append(f"{name}: DoRA written as plain LoRA for {source_label(dora_to_lora)}, "
                                   f"relative error {err:.3g} (an approximation, valid for that base only)")
    if runtime is not None:
        from loratool.ops.runtime import prepare_for

        # the preparation works on modules, not names: a runtime that reads a family's names (ComfyUI:
        # kohya's; diffusers) gets them from the family's table after it
        prepared = prepare_for(adapter, runtime, drop=drop, allow_variant=allow_variant)
        adapter = prepared.adapter
        report.runtime, report.prepared = runtime.name, prepared.to_dict()
        report.warnings.extend(prepared.warnings)
    elif to in ("kohya", "comfyui"):  # written for ComfyUI: say what it would apply wrongly, as --for does
        from loratool.ops.runtime import get_runtime, unservable_dora

        misaxed, what = unservable_dora(adapter.modules, get_runtime("comfyui"))
        if misaxed:
            report.warnings.append(
                f"ComfyUI cannot serve {what}: {_listing(misaxed)}; it applies them wrongly (--for comfyui refuses "
                "them; --dora-to-lora BASE writes the closest plain LoRA for that base)")
    # a runtime that needs one rank for every module takes the names as they are: a family's split /
    # fuse would change the ranks it was prepared to
    other_mode = dora_to_lora is not None or (runtime is not None and runtime.one_rank)
    # with --base the modules are named by the base's keys where every module matches one (a kohya SD
    # file into its single-file checkpoint's names); otherwise (or with --family) by the family's table.
    # Never comfyui: ComfyUI maps its own spellings (`diffusion_model.…`, `lora_unet_…`, `lora_te1_…`),
    # not a checkpoint's keys (`model.diffusion_model.…`, `conditioner.embedders.0.…` load nowhere there)
    by_base = (base is not None and family is None and to in FAMILY_TARGETS and to != "comfyui"
               and _matches_base(adapter, Path(base)))
    fam = None if by_base else _family_for(adapter, to, family, other_mode, report.warnings)
    if fam is not None:
        return _convert_family(adapter, report, fam[0], fam[1], to, out, force=force, fuse_rank=fuse_rank, say=say)
    layout_base: str | None = None
    origin: dict[str, str] = {}  # a module renamed before target_names -> its name as read
    # a format with names (and row order) of its own leaves or takes them against the base (GGUF)
    source = get_format(adapter.source_format) if adapter.source_format in format_names() else None
    if source is not None and source.layout_in is not None and to != adapter.source_format:
        order = list(adapter.modules)
        adapter = source.layout_in(adapter, Path(base) if base is not None else None, Path(path))
        origin = _origin(adapter.modules, order)
    if base is not None and target.layout_out is None and target.capabilities.experts:
        # experts as the checkpoint stores them: fused (target_parameters) or one Linear per expert
        before = adapter
        adapter = experts_for_checkpoint(adapter, Path(base))
        if list(adapter.modules) != list(before.modules):
            origin = {new: origin.get(old, old) for new, old in _expert_origin(adapter, before).items()}
    if target.layout_out is not None and adapter.source_format != to:
        order = list(adapter.modules)
        adapter = target.layout_out(adapter, Path(base) if base is not None else None, Path(path))
        origin = _origin(adapter.modules, order)  # the target's name -> the module name as read
        layout_base = source_label(base) if base is not None else None  # provenance keeps it
        base = None  # used: the names are the target's now, not the checkpoint's
    # peft's save_embedding_layers copies of a LoRA layer's base weight (`.base_layer.`) go only
    # where full tensors can; other full tensors (modules_to_save) must be kept or the user told
    extras = adapter.extras if target.capabilities.extras else \
        {k: v for k, v in adapter.extras.items() if ".base_layer." not in k}
    check_writable(adapter.with_modules(adapter.modules, extras=extras), to)
    matched: dict[str, str] | None = None
    shapes: dict[str, tuple[int, ...]] = {}
    base_class = None
    if base is not None:
        matched, shapes, base_class = _match_base(adapter, Path(base))
    names, unplaced = target_names(adapter, to, matched, base_class, report.warnings)
    if unplaced:
        count = sum(len(v) for v in unplaced.values())
        reasons = "; ".join(f"{reason}: {_listing(names_)}" for reason, names_ in unplaced.items())
        foreign = all(FOREIGN in reason for reason in unplaced)
        raise IncompatibleError(
            f"{path}: cannot place {count} module name(s) in the {to} layout: {reasons}",
            hint="write kohya instead (--to kohya): diffusers' load_lora_weights converts that layout itself "
            "when it loads a kohya file" if foreign else
            "pass --base BASE (the model the adapter was made for) to match the names against its keys",
        )
    seen: dict[str, str] = {}
    for name, (new, _) in names.items():
        if new in seen:
            raise IncompatibleError(f"{path}: modules '{seen[new]}' and '{name}' would both be written as '{new}'")
        seen[new] = name

    modules: dict[str, LoraModule] = {}
    kept_lyco: dict[str, LycoModule] = {}
    for name, m in adapter.modules.items():
        new, by = names[name]
        fitted = _fit_layout(m, shapes[matched[name]]) if matched is not None and name in matched else m
        modules[new] = fitted.with_(name=new)
        read_as = origin.get(name, name)
        orig = as_read.get(read_as, m)  # a module a layout split or fused: as written
        algo, exact, err = lyco_rows.get(name, ("lora", None, 0.0))
        report.modules.append(ModuleConvert(read_as, new, fitted.kind, orig.rank, orig.alpha, orig.scale, by, algo,
                                            exact, err))
    for name, lm in adapter.lycoris.items():  # full / norm / bias diffs kept as they are (kohya only)
        new = stored_name(to, name)
        if new in seen:
            raise IncompatibleError(f"{path}: modules '{seen[new]}' and '{name}' would both be written as '{new}'")
        seen[new] = name
        kept_lyco[new] = replace(lm, name=new)
        report.modules.append(ModuleConvert(name, new, lm.kind, lm.rank, lm.alpha or 0.0, lm.scale, "name", lm.algo))
    # a PEFT source keeps its config (task_type, modules_to_save, ...) when its names stay; any other
    # source gets a fresh one from the writer. kohya metadata (ss_*) stays only in kohya files.
    keep_config = adapter.source_format == "peft" and to == "peft"
    converted = adapter.with_modules(
        modules,
        extras=extras,
        config=adapter.config if keep_config or target.layout_out is not None else {},  # layout_out: its arch
        metadata={**(adapter.metadata if adapter.source_format == to == "kohya" else {}),
                  **(target.paths_metadata({new: name for name, (new, _) in names.items() if "." in name})
                     if target.paths_metadata is not None else {})},
        source_format=to,
        source_modules=adapter.source_modules if keep_config else (),
        lycoris=kept_lyco,
    )
    report.extras = sorted(converted.extras)
    params: dict[str, Any] = {"to": to, "base": layout_base if base is None else source_label(base)}
    if runtime is not None:
        params.update({"for": for_runtime or runtime.name, "drop": drop})  # vllm@0.30: the release too
    if dora_to_lora is not None:
        params["dora_to_lora"] = source_label(dora_to_lora)
    if initial_adapter is not None:
        params["initial_adapter"] = source_label(initial_adapter)
    say(f"writing and re-reading {Path(out).name}")
    written = write(converted, out, fmt=to, force=force, op="convert", params=params, sources=adapter.files)
    report.size = output_size(written)
    return report


# conv-like module names: a LyCORIS conv stored flattened (LoHa, LoKr w2_b) cannot show its kernel
_CONV_HINTS = ("conv", "resnets", "downsamplers", "upsamplers", "skip_connection", "in_layers", "out_layers",
               "_op", ".op")


def _lycoris_to_lora(
    adapter: Adapter, to: str, rank: int | None, base: Path | None
) -> tuple[Adapter, dict[str, tuple[str, int, float]], list[str]]:
    """LoRA factors for every LyCORIS module that has them (maths.lycoris.lyco_to_lora), in the stored dtype.

    The base (when given) decides the layout of convs a LyCORIS file stores flattened; full/norm/bias
    diffs without a LoRA form stay LycoModules, which only kohya files hold.

    Returns:
        the adapter with the new LoraModules, name -> (algo, exact rank, relative error), warnings.
    """
    import torch

    from loratool.maths.guards import require_finite
    from loratool.maths.lycoris import lyco_to_lora

    shapes: dict[str, tuple[int, ...]] = {}
    if base is not None:
        from loratool.io.checkpoint import open_checkpoint
        from loratool.keymap import match_to_base

        ckpt = open_checkpoint(base)
        # as merge places them: by the key rules, or through the family's other layout (kohya SGM names
        # onto a diffusers U-Net folder), where a module is a plain rename of one base weight
        _, targets, _ = match_to_base(list(adapter.lycoris.values()), ckpt.tensors, where=adapter.path)
        shapes = {n: tuple(ckpt.tensors[k].shape) for n, _, k, rows in targets if rows is None}
    modules = dict(adapter.modules)
    kept: dict[str, LycoModule] = {}
    rows: dict[str, tuple[str, int, float]] = {}
    flattened: list[str] = []
    for name, lm in adapter.lycoris.items():
        convertible = lm.algo in ("loha", "lokr", "tucker") or (
            lm.algo == "full" and len(lm.delta_shape) >= 2 and rank is not None)
        if not convertible:
            kept[name] = lm
            continue
        first = next(iter(lm.tensors.values()))
        require_finite(name, first.file, **{role: ref.load() for role, ref in lm.tensors.items()})  # before any SVD
        form = lyco_to_lora(lm, rank)
        shape = shapes.get(name, lm.delta_shape)
        if name not in shapes and len(shape) == 2 and any(h in name for h in _CONV_HINTS):
            flattened.append(name)
        k = form.up.shape[1]
        dtype = getattr(torch, next(iter(lm.tensors.values())).dtype)
        down = form.down.reshape(k, *shape[1:]) if len(shape) > 2 else form.down
        up = form.up.reshape(shape[0], k, *([1] * (len(shape) - 2)))
        modules[name] = LoraModule(
            name=name, down=TensorRef.from_tensor(down.to(dtype).contiguous()),
            up=TensorRef.from_tensor(up.to(dtype).contiguous()), alpha=float(k), alpha_source="tensor",
            bias=lm.bias, bias_scaled=False, kind="conv" if len(shape) > 2 else "linear",
        )
        rows[name] = (lm.algo, form.exact_rank, form.rel_error)
    from loratool.formats import LYCO_NAMES, get_format

    if kept and not get_format(to).capabilities.diffs:
        name, lm = next(iter(kept.items()))
        raise IncompatibleError(
            f"{adapter.path}: module '{name}' is {LYCO_NAMES[lm.algo]}, which has no LoRA form and which {to} "
            f"files cannot hold ({len(kept)} such module(s))",
            hint="convert to kohya (--to kohya keeps .diff/.w_norm/.diff_b tensors, which ComfyUI loads)"
            + ("; a full 2-D diff becomes LoRA with --rank N" if lm.algo == "full" else ""),
        )
    fix = f"--base {base} has no weight for them" if base is not None else \
        "Pass --base to write them in the conv layout"
    warnings = [f"{len(flattened)} LyCORIS module(s) look like convolutions stored flattened "
                f"({', '.join(flattened[:3])}); their LoRA factors are 2-D (out, in·kh·kw). {fix}"] if flattened else []
    return adapter.with_modules(modules, lycoris=kept), rows, warnings


FAMILY_TARGETS = ("kohya", "comfyui", "diffusers", "peft")


TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                         "text_encoder_3.")


def text_encoder_modules(adapter: Adapter) -> set[str]:
    """The modules of an image/video LoRA that adapt a text encoder (kohya `lora_te1_...`, diffusers
    `text_encoder.`): no model family's table covers them; they are named by the format's rules."""
    return {n for n in adapter.modules if n.startswith(TEXT_ENCODER_PREFIXES)}


def _family_for(adapter: Adapter, to: str, family: str | None, other_mode: bool,
                warnings: list[str]) -> tuple[Any, str] | None:
    """(family, source dialect) when the conversion goes by a model family's table, else None.

    Raises:
        IncompatibleError: an unknown --family, modules that are not the family's, comfyui output
            without a family, or a family adapter in diffusers names asked for kohya / comfyui
            names without --family (the generic names would load nowhere).
    """
    from loratool import families

    if any(lm.algo not in ("full", "norm", "bias") for lm in adapter.lycoris.values()):
        if family is not None:
            raise IncompatibleError(f"{adapter.path}: holds LyCORIS modules; convert them first (--to lora)")
        return None
    # full / norm / bias diffs (kept as they are where the target holds them) move with the family's names
    names = [*adapter.modules, *adapter.lycoris]
    shapes = families.module_shapes({**adapter.modules, **adapter.lycoris})
    det = families.detect(names, adapter.metadata, shapes)
    te = text_encoder_modules(adapter)
    if te and det.matched and set(det.unmatched) <= set(te):
        # a transformer LoRA with text-encoder modules beside it (kohya FLUX.1 files often have
        # lora_te1_ CLIP-L ones): the family is judged on the rest; those go by the naming rules
        names = [n for n in names if n not in te]
        det = families.detect(names, adapter.metadata, shapes)
    if family is None and adapter.family is not None and to in FAMILY_TARGETS and not other_mode:
        family = adapter.family  # the format itself says which model it is for (XLabs: FLUX.1)
    if family is not None:
        fam = families.check_name(family)
        best = max(families.DIALECTS, key=lambda d: sum(fam.identify(n, d) is not None for n in names))
        if to not in FAMILY_TARGETS or other_mode:
            raise IncompatibleError(f"--family works with --to {', '.join(FAMILY_TARGETS)} only")
        return fam, best
    if det.confident and to in FAMILY_TARGETS and not other_mode:
        return families.get(str(det.family)), str(det.dialect)
    if det.ambiguous and det.matched == det.total and to in FAMILY_TARGETS and not other_mode:
        # names that fit several families equally: fine when every one converts them alike
        fits = [(families.get(f), d) for f, d, n in det.candidates if n == det.matched and f in det.tied]
        fits = [fd for k, fd in enumerate(fits) if fd[0].name not in {f.name for f, _ in fits[:k]}]
        if families.same_conversion(names, fits, to):
            warnings.append(f"the module names fit {' and '.join(det.tied)} equally; their tables convert them to "
                            f"the same {to} names, so {fits[0][0].name}'s is used")
            return fits[0]
        raise IncompatibleError(
            f"{adapter.path}: its module names fit {' and '.join(det.tied)} equally ({det.describe()}), and "
            f"their {to} names differ", hint="pass " + " or ".join(f"--family {f}" for f in det.tied))
    if det.partial and to in FAMILY_TARGETS and not other_mode:
        # one family's names cover part of the file: writing those by its table and the rest by the
        # generic rules would mix two models' names (a FLUX.2 file is FLUX.1's double / single blocks
        # and modules FLUX.1 lacks)
        raise IncompatibleError(
            f"{adapter.path}: {det.describe()}",
            hint=f"pass --family {det.family} to convert its {det.family} modules, if it is {det.family} with "
                 "modules the table lacks (known: " + ", ".join(f.name for f in families.families()) + ")")
    if to == "comfyui":
        raise IncompatibleError(
            f"{adapter.path}: comfyui names are written from a model family's table, and this adapter is "
            f"{det.describe()}", hint="pass --family (known: " + ", ".join(f.name for f in families.families()) + ")")
    if det.family is not None and det.matched == det.total and to in ("kohya",) and det.dialect not in ("kohya",):
        raise IncompatibleError(
            f"{adapter.path}: looks like {det.describe()}; its kohya names come from the family's table",
            hint=f"pass --family {det.family} (names alone do not tell {det.family} from other families)")
    best_dialects = {d for _, d, n in det.candidates if n == det.matched}
    if (to == "kohya" and not other_mode and det.matched and not best_dialects <= families.ORIGINAL_SIDE
            and (det.family is not None or det.ambiguous)):
        # some modules are a family's diffusers-side names and the rest are not the family's: the
        # generic rules would write names such as lora_unet_transformer_blocks_0_attn_to_q, which no
        # loader reads
        others = [n for n in det.unmatched if n not in te]
        raise IncompatibleError(
            f"{adapter.path}: {det.matched} of its modules are {det.describe()} names, which get their kohya names "
            f"from the family's table, but {len(others)} are not the family's (e.g. '{others[0] if others else ''}')",
            hint="pass --family to convert the family's modules (text-encoder modules need their component: "
                 "text_encoder. / text_encoder_2.), or convert the two parts separately")
    return None


def _convert_family(adapter: Adapter, report: ConvertReport, fam: Any, source: str, to: str,
                    out: str | os.PathLike[str], *, force: bool, fuse_rank: int | None,
                    say: Phase = lambda text: None) -> ConvertReport:

    from loratool.families.convert import convert_family
    from loratool.formats import write

    # the work is many small row copies and comparisons (memory-bound): OpenMP's fork/join per call
    # costs more than the copy, 3000x on a busy 2-core machine (80 ms vs 0.03 ms per torch.cat)
    from loratool.maths.guards import single_threaded

    te = text_encoder_modules(adapter)
    te_modules = {n: m for n, m in adapter.modules.items() if n in te and fam.identify(n, source) is None}
    # an SD U-Net LoRA with text-encoder modules to PEFT: both keep their diffusers component as a prefix
    # (`unet.`, `text_encoder.`), as such files were always written, with a warning; a transformer
    # family's is refused (one PEFT adapter adapts one model)
    components = bool(te_modules) and to == "peft" and fam.component == "unet"
    with single_threaded():
        conv = convert_family(adapter.with_modules({n: m for n, m in adapter.modules.items() if n not in te_modules}),
                              fam, source, "diffusers" if components else to, fuse_rank=fuse_rank)
    if te_modules and to == "peft" and not components:
        raise IncompatibleError(
            f"{adapter.path}: a PEFT adapter adapts one model, and this file adapts the {fam.name} {fam.component} "
            f"and a text encoder ({len(te_modules)} modules, e.g. '{next(iter(te_modules))}')",
            hint="write --to diffusers, which holds both under their components, or kohya / comfyui")
    if components:
        from loratool.formats.names import split_component
        from loratool.formats.rename import stored_name

        spans = {fam.component} | {parts[0] for n in te_modules
                                   if (parts := split_component(stored_name("diffusers", n)))}
        spans |= {"text_encoder_2" if n.startswith("lora_te2_") else "text_encoder" for n in te_modules
                  if n.startswith("lora_te")}
        report.warnings.append(
            f"the adapter spans {len(spans)} components ({', '.join(sorted(spans))}); the PEFT module names keep them "
            "as a prefix (unet., text_encoder., ...), so peft loads it only into a model holding those components as "
            "attributes (--to diffusers is what diffusers loads)")
    if te_modules:  # the text encoders' modules, named by the format's rules (ComfyUI reads kohya's)
        from loratool.formats.rename import target_names

        te_to = "kohya" if to == "comfyui" else "diffusers" if components else to
        placed, unplaced = target_names(adapter.with_modules(te_modules), te_to, None, None, report.warnings,
                                        sd1=fam.single_text_encoder)
        if unplaced:
            listing = "; ".join(f"{reason}: {', '.join(ns[:4])}" for reason, ns in unplaced.items())
            raise IncompatibleError(f"{adapter.path}: cannot name the text-encoder modules in the {to} layout: "
                                    f"{listing}")
        for name, (new, by) in placed.items():
            if new in conv.modules:
                raise IncompatibleError(f"{adapter.path}: module '{name}' would be written as '{new}', "
                                        "a name the family's modules already use")
            m = te_modules[name]
            conv.modules[new] = m.with_(name=new)
            report.modules.append(ModuleConvert(name, new, m.kind, m.rank, m.alpha, m.scale, by, "lora"))
    for row in conv.rows:
        by = f"{fam.name} {source}"
        if row.name in conv.lycoris:
            lm = conv.lycoris[row.name]
            report.modules.append(ModuleConvert(row.sources[0], row.name, lm.kind, lm.rank, lm.alpha or 0.0,
                                                lm.scale, by, lm.algo))
            continue
        m = conv.modules[row.name]
        report.modules.append(ModuleConvert(", ".join(row.sources), row.name, m.kind, m.rank, m.alpha, m.scale,
                                            by, "lora" if row.how == "rename" else row.how, None, row.rel_error))
    converted = adapter.with_modules(conv.modules, extras={}, config={},
                                     metadata=adapter.metadata if adapter.source_format == to == "kohya" else {},
                                     source_format=to, source_modules=(), lycoris=conv.lycoris)
    params = {"to": to, "family": fam.name, "from_dialect": source, "fuse_rank": fuse_rank}
    if report.runtime is not None:
        params["for"] = report.runtime
    say(f"writing and re-reading {Path(out).name}")
    written = write(converted, out, fmt=to, force=force, op="convert", params=params, sources=adapter.files)
    report.size = sum(f.stat().st_size for f in written.iterdir() if f.is_file()) if written.is_dir() else \
        written.stat().st_size
    return report
