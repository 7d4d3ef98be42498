"""The format registry: one record per on-disk adapter format.

A record says how to recognise a format (`detect` on a file's key names, `detect_dir` on a
directory), how to read it, how to write it, and what it can hold (`Capabilities`). Everything
that used to branch on a format's name asks the registry instead: `formats.read` / `detect` /
`write`, the CLI's `--format` / `--to` choices, and `check_writable`, the ONE check by which every
writer refuses content its format would silently drop.

Adding a format = writing its module (reader, writer, key layout) and adding its record to
`formats/__init__.py`'s FORMATS tuple (docs/architecture.md walks through it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from loratool.errors import IncompatibleError

if TYPE_CHECKING:
    from loratool.adapter import Adapter
    from loratool.formats._common import Findings
    from loratool.formats.tensorfile import TensorFile

# How a format names modules:
#   "path"      dotted module paths as in the model (PEFT: `model.layers.0.self_attn.q_proj`);
#   "component" dotted paths under a diffusers pipeline component (`unet.down_blocks.0...`);
#   "stem"      prefix + path with its dots turned into underscores (kohya: `lora_unet_down_blocks_0_...`);
#               the dots are lost, so turning such names back into paths needs a base or naming rules.
Naming = Literal["path", "component", "stem"]


@dataclass(frozen=True)
class Capabilities:
    """What a format can hold. A writer is never asked to write anything outside these. The
    defaults are a single-file format of plain linear and conv LoRA with per-module alphas.

    Attributes:
        bias: LoRA bias deltas (PEFT lora_bias: `lora_B.bias`).
        extras: full tensors that replace base weights (PEFT modules_to_save, e.g. `lm_head.weight`).
        fan_in_fan_out: modules over (in, out)-stored weights (GPT-2 Conv1D).
        embedding: embedding-layer LoRA (`lora_embedding_A/B`).
        conv: conv modules (kernel factors (r, in, kh, kw)).
        dora: DoRA magnitude vectors, one value per output row (the PEFT convention).
        dora_in: DoRA magnitudes with one value per input column (LyCORIS wd_on_out=False,
            OneTrainer): kohya-style `.dora_scale` of shape (1, in[, 1, 1]).
        per_module_alpha: each module its own alpha/scale (otherwise one alpha for the whole file).
        metadata: string metadata in the file (our provenance goes there).
        directory: the output is a directory (else one file).
        diffs: LyCORIS full / norm / bias diffs kept as they are (`.diff`, `.w_norm`, `.diff_b`:
            kohya files, which ComfyUI loads). LoHa / LoKr / Tucker modules no writer holds: they
            are converted to LoRA first (convert --to lora).
        experts: experts of fused 3-D parameters (PEFT target_parameters; docs/moe.md).
    """

    bias: bool = False
    extras: bool = False
    fan_in_fan_out: bool = False
    embedding: bool = False
    conv: bool = True
    dora: bool = False
    dora_in: bool = False
    per_module_alpha: bool = True
    metadata: bool = True
    directory: bool = False
    diffs: bool = False
    experts: bool = False


# readers: (the opened tensor file, findings) -> Adapter; directory readers: (path, allow_pickle, findings)
FileReader = Callable[["TensorFile", "Findings"], "Adapter"]
DirReader = Callable[[Path, bool, "Findings"], "Adapter"]
# writers: (adapter, the temporary output path (file or empty directory), metadata to store)
Writer = Callable[["Adapter", Path, dict[str, str]], None]
# conversion steps of a format: (adapter, the base model or None, the source path for messages) -> adapter
LayoutHook = Callable[["Adapter", "Path | None", Path], "Adapter"]


@dataclass(frozen=True)
class Format:
    """One adapter format.

    Attributes:
        name: the name users type (`--format`, `--to`) and Adapter.source_format.
        summary: one line for --help and docs.
        naming: how the format names modules (see Naming).
        capabilities: what the format can hold.
        detect: a score from a file's tensor key names: 0 = not this format; the highest score
            wins, ties go to the record listed first. None: never detected from a file.
        read_file: reads one tensor file of this format.
        detect_dir: whether a directory is an adapter of this format. None: not a directory format.
        read_dir: reads such a directory.
        write: writes an adapter (None: read-only format). Content outside `capabilities` never
            reaches it (check_writable refuses first).
        suffix: the usual file suffix of a single-file output (for messages and docs).
        write_as: for a read-only format, the format its adapters are written in when no
            --format / --to is given (XLabs -> diffusers, whose module names it reads into).
        layout_in: converting out of this format, its own module names and row order become the
            base model's (GGUF: blk.N.attn_q -> model.layers.N.self_attn.q_proj, q/k rows un-permuted);
            None where the names read are already the model's. May require the base.
        layout_out: converting into this format, the model's names and row order become its own.
        paths_metadata: header metadata recording each written name's dotted module path, for a
            format whose names lose the dots (kohya), so converting back needs no base.
    """

    name: str
    summary: str
    naming: Naming
    capabilities: Capabilities
    detect: Callable[[list[str]], int] | None = None
    read_file: FileReader | None = None
    detect_dir: Callable[[Path], bool] | None = None
    read_dir: DirReader | None = None
    write: Writer | None = None
    suffix: str = ".safetensors"
    write_as: str | None = None
    layout_in: LayoutHook | None = None
    layout_out: LayoutHook | None = None
    paths_metadata: Callable[[dict[str, str]], dict[str, str]] | None = None


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a format record (formats/__init__.py registers the built-in ones, in detection order)."""
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def all_formats() -> list[Format]:
    return list(_REGISTRY.values())


def names(*, writable: bool = False) -> tuple[str, ...]:
    """Format names in registration order; with writable, only those with a writer."""
    return tuple(f.name for f in _REGISTRY.values() if f.write is not None or not writable)


def written_as(source_format: str) -> str:
    """The format an adapter read from `source_format` is written in by default: its own, or the
    write_as of a read-only format."""
    fmt = _REGISTRY.get(source_format)
    return fmt.write_as if fmt is not None and fmt.write is None and fmt.write_as else source_format


def get(name: str, *, writing: bool = False) -> Format:
    """The record of a format.

    Raises:
        IncompatibleError: unknown format, or (writing) a format loratool only reads.
    """
    fmt = _REGISTRY.get(name)
    if fmt is None or (writing and fmt.write is None):
        choices = names(writable=writing)
        what = "write" if writing and fmt is not None else "know"
        raise IncompatibleError(f"format '{name}': loratool does not {what} it",
                                hint=f"choose one of: {', '.join(choices)} (--format / --to)")
    return fmt


# ---------------------------------------------------------------------------------------------
# the one check


def _module_needs(m: object) -> list[tuple[str, str]]:
    """(capability, what it is) pairs a module needs from a format."""
    from loratool.adapter import LoraModule

    assert isinstance(m, LoraModule)
    needs: list[tuple[str, str]] = []
    if m.bias is not None:
        needs.append(("bias", "has a LoRA bias delta (lora_bias)"))
    if m.kind == "embedding":
        needs.append(("embedding", "is an embedding layer"))
    if m.kind == "conv":
        needs.append(("conv", "is a conv layer"))
    if m.expert is not None:
        needs.append(("experts", "is an expert of a fused MoE parameter (PEFT target_parameters)"))
    if m.fan_in_fan_out:
        needs.append(("fan_in_fan_out", "is a fan_in_fan_out (GPT-2 Conv1D) layer"))
    if m.magnitude is not None and m.dora_axis == "in":
        needs.append(("dora_in", "is DoRA with one magnitude per input column (LyCORIS wd_on_out=False, "
                                 "OneTrainer)"))
    elif m.magnitude is not None:
        needs.append(("dora", "is DoRA (it has a magnitude vector)"))
    return needs


def _holders(capabilities: list[str], writing: Format) -> list[str]:
    """Writable formats, other than `writing`, that hold all of `capabilities`."""
    return [f.name for f in _REGISTRY.values()
            if f.write is not None and f is not writing and all(getattr(f.capabilities, c) for c in capabilities)]


def check_writable(adapter: Adapter, name: str, *, extras: bool = True) -> None:
    """Refuse, before any work is written, what the format `name` cannot hold.

    Every write goes through here (formats.write calls it); operations call it early too, so a
    refusal comes before the maths. One error names, for each kind of content the format cannot
    hold, the first module or tensor and how many there are, and the formats that hold it all.

    Args:
        extras: check the adapter's full tensors too (False: the caller drops or handles them).

    Raises:
        IncompatibleError: unknown or read-only format, or content the format cannot hold.
    """
    fmt = get(name, writing=True)
    caps = fmt.capabilities
    where = f"{adapter.path}: " if adapter.path is not None else ""
    # capability -> (the first module or tensor refused, why, how many), in the order first met
    problems: dict[str, tuple[str, str, int]] = {}
    for m in adapter.modules.values():
        for capability, why in _module_needs(m):
            if not getattr(caps, capability):
                subject, _, count = problems.get(capability, (f"module '{m.name}'", why, 0))
                problems[capability] = (subject, why, count + 1)
    for lm in adapter.lycoris.values():
        if lm.magnitude is not None:
            raise IncompatibleError(
                f"{where}module '{lm.name}' is a LyCORIS {lm.algo} module with DoRA weight decomposition "
                "(.dora_scale), which no writer stores",
                hint="merge it into its base model instead (loratool merge)",
            )
        if lm.algo not in ("full", "norm", "bias"):
            raise IncompatibleError(
                f"{where}module '{lm.name}' is a LyCORIS {lm.algo} module, which no writer stores as it is",
                hint="convert it to plain LoRA: loratool convert PATH --to lora -o OUT",
            )
        if not caps.diffs:
            subject, _, count = problems.get("diffs", (f"module '{lm.name}'", f"is a LyCORIS {lm.algo} diff", 0))
            problems["diffs"] = (subject, f"is a LyCORIS {lm.algo} diff", count + 1)
    if adapter.reshapes and fmt.name == "comfyui":
        # ComfyUI's own spelling of a control LoRA (kohya.write_comfyui) keeps the widening, the bias
        # deltas and the saved norms; its lora_A / lora_B carry no alpha, so every scale must be 1
        odd = next((m.name for m in adapter.modules.values() if m.scale != 1.0), None)
        if odd is not None:
            raise IncompatibleError(
                f"{where}module '{odd}' of a BFL FLUX.1 control LoRA has scale {adapter.modules[odd].scale} "
                "(alpha / rank), but ComfyUI's spelling of it holds no alpha (scale 1)",
                hint="merge it into FLUX.1-dev instead (loratool merge BASE ADAPTER -o OUT)")
        return
    if adapter.reshapes:
        # no other writer keeps a control LoRA's widening: diffusers' spelling (x_embedder, norm_q /
        # norm_k weights) is not written, and peft cannot load an img_in LoRA wider than its base layer
        module, shape = next(iter(adapter.reshapes.items()))
        raise IncompatibleError(
            f"{where}module '{module}' widens its base weight to {shape} (a BFL FLUX.1 control LoRA), "
            f"which loratool does not write as {fmt.name} yet",
            hint="write it with --to comfyui, or merge it into FLUX.1-dev (loratool merge BASE ADAPTER -o OUT); "
            "ComfyUI and diffusers load the original file as it is")
    if extras and adapter.extras and not caps.extras:
        problems["extras"] = (f"full tensor '{next(iter(adapter.extras))}'", "is a modules_to_save tensor",
                              len(adapter.extras))
    if problems:
        parts = [f"{subject} {why}" + (f" ({count} such)" if count > 1 else "")
                 for subject, why, count in problems.values()]
        others = _holders(list(problems), fmt)
        raise IncompatibleError(
            f"{where}{parts[0]}, which {fmt.name} files cannot hold" if len(parts) == 1 else
            f"{where}{fmt.name} files cannot hold what this adapter has: {'; '.join(parts)}",
            hint=f"write {' or '.join(others)} instead (--format {others[0]}, or convert --to {others[0]})"
            if others else None,
        )
    if not caps.per_module_alpha and len({m.scale for m in adapter.modules.values()}) > 1:
        raise IncompatibleError(
            f"{where}modules have different scales (alpha / rank), but a {fmt.name} file holds one alpha",
            hint="make the scales equal first: loratool rescale PATH --normalize -o OUT",
        )
