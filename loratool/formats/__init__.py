"""On-disk dialects. Key-name translation lives only in this package.

Each format is one record in the registry (registry.py): its detection, reader, writer and what it
can hold. `detect(path)` decides from directory contents and key names (never the file name);
`read` gives the canonical Adapter; `write` refuses what the target format cannot hold
(registry.check_writable) and writes atomically with provenance metadata.

Operations use this package's public names only (those in __all__), never a format module's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loratool.adapter import Adapter
from loratool.errors import FormatError, IncompatibleError
from loratool.formats import diffusers, expert_layout, gguf, kohya, mlx, peft, xlabs
from loratool.formats._common import (
    PICKLE_SUFFIXES,
    Finding,
    Findings,
    is_unsupported,
    open_tensor_file,
    unsupported_family,
)
from loratool.formats.registry import (
    Capabilities,
    Format,
    all_formats,
    check_writable,
    get,
    names,
    register,
    written_as,
)
from loratool.formats.tensorfile import TensorFile

__all__ = [
    "LYCO_NAMES", "PICKLE_SUFFIXES", "Capabilities", "Finding", "Findings", "Format", "check_writable", "detect",
    "experts_for_checkpoint", "extra_base_key", "format_names", "get_format", "gguf_layout", "is_transposed_layer",
    "output_is_directory", "provenance",
    "read", "require_plain", "source_label", "unsupported_family", "writable_formats", "write",
]

# The built-in formats, in detection order (ties between equal detection scores go to the first).
# A new format: its module defines FORMAT (a registry.Format record); add it here.
for _record in (peft.FORMAT, kohya.FORMAT, diffusers.FORMAT, mlx.FORMAT, gguf.FORMAT, kohya.COMFYUI_FORMAT,
                xlabs.FORMAT):
    register(_record)

get_format = get


def format_names() -> tuple[str, ...]:
    """Every format loratool reads."""
    return names()


def writable_formats() -> tuple[str, ...]:
    """Every format loratool writes (the CLI's --format / --to choices)."""
    return names(writable=True)


def gguf_layout(adapter: Adapter, base: Path) -> Adapter:
    """The adapter with GGUF tensor names and layout for the architecture of `base` (a transformers
    config / model directory or a GGUF model file); see formats/gguf.py."""
    return gguf.to_gguf_layout(adapter, gguf.arch_info(base))


def experts_for_checkpoint(adapter: Adapter, base: Path) -> Adapter:
    """The adapter's experts in the layout the checkpoint `base` stores them: fused parameters (PEFT
    target_parameters) or one Linear per expert, converted exactly; see formats/expert_layout.py."""
    return expert_layout.experts_for_checkpoint(adapter, base)


def extra_base_key(extra: str) -> str:
    """The base-model key a full tensor of Adapter.extras replaces."""
    return peft.base_key(extra)


def is_transposed_layer(name: str) -> bool:
    """Whether a module path is a GPT-2 Conv1D layer, whose weight is stored (in, out)."""
    return bool(peft.GPT2_CONV1D.search(name))


_XLABS = re.compile(r"(?:^|\.)(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora\d?\.(?:down|up)\.weight$")


def _classify(tf: TensorFile) -> Format:
    keys = list(tf.tensors)
    scored = [(f.detect(keys), -i, f) for i, f in enumerate(all_formats()) if f.detect is not None]
    score, _, best = max(scored, key=lambda t: t[:2])
    if score > 0:
        return best
    unsupported = [k for k in keys if is_unsupported(k)]
    if unsupported:
        return get("kohya")  # LyCORIS files use kohya names; reported as unsupported modules
    shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} tensors)" if len(keys) > 5 else "")
    xlabs = next((k for k in keys if _XLABS.search(k)), None)
    if xlabs is not None:
        raise FormatError(
            f"{tf.path}: '{xlabs}' is an XLabs (x-flux) FLUX.1 LoRA, a layout loratool does not read "
            f"({len(keys)} tensors)",
            hint="its single-block proj_lora acts on linear2's output, not as a weight delta, so no exact "
            "LoRA of the base's weights exists for it; use it where XLabs' processors load it (ComfyUI)")
    raise FormatError(
        f"{tf.path}: holds no LoRA tensors (found: {shown or 'no tensors'})",
        hint="expected keys ending in .lora_A.weight/.lora_B.weight (PEFT, diffusers) "
        "or .lora_down.weight/.lora_up.weight (kohya)",
    )


def _dir_format(p: Path) -> Format:
    for f in all_formats():
        if f.detect_dir is not None and f.detect_dir(p):
            return f
    found = sorted(x.name for x in p.iterdir())[:10]
    raise FormatError(
        f"{p}: not an adapter directory: no {peft.CONFIG_NAME} or {peft.WEIGHTS_NAME} "
        f"(found: {', '.join(found) or 'nothing'})",
        hint="pass the adapter directory or its .safetensors file",
    )


def _resolve(path: str | os.PathLike[str]) -> Path:
    """A local path: hf:// inputs are fetched through the Hugging Face cache (hub.resolve_path)."""
    from loratool.hub import resolve_path

    local = resolve_path(path)
    if not local.exists():
        raise FormatError(f"{local}: no such file or directory")
    return local


def detect(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> str:
    """The name of the format of an adapter file or directory, from its contents and key names.

    Raises:
        FormatError: missing path, unreadable file, or no LoRA tensors (the message lists what was found).
    """
    p = _resolve(path)
    if p.is_dir():
        return _dir_format(p).name
    return _classify(open_tensor_file(p, allow_pickle=allow_pickle)).name


def read(path: str | os.PathLike[str], *, allow_pickle: bool = False, findings: Findings | None = None) -> Adapter:
    """Read an adapter in any supported format into the canonical model.

    Args:
        path: a PEFT directory, or a .safetensors file (PEFT with its config beside it, kohya,
            diffusers); .bin/.pt only with allow_pickle; or hf://OWNER/REPO[@REVISION][/PATH].
        allow_pickle: load pickle files with torch.load(weights_only=True).
        findings: a lenient collector (validate); None raises at the first problem.

    Raises:
        FormatError: unreadable or unknown layout. IncompatibleError: inconsistent tensors.
    """
    findings = findings if findings is not None else Findings()
    p = _resolve(path)
    if p.is_dir():
        fmt = _dir_format(p)
        assert fmt.read_dir is not None
        adapter = fmt.read_dir(p, allow_pickle, findings)
    else:
        tf = from_comfy_control(open_tensor_file(p, allow_pickle=allow_pickle, findings=findings))
        fmt = _classify(tf)
        assert fmt.read_file is not None
        adapter = fmt.read_file(tf, findings)
        adapter.reshapes.update(_bfl_control_reshapes(adapter))
    _check_duplicates(adapter, findings)
    # A file of only LyCORIS/other tensors is readable: inspect and validate report it by name and
    # operations refuse it through require_plain, which names the key.
    if not adapter.modules and not adapter.lycoris and not adapter.unsupported and not findings.items:
        findings.error("no-lora-tensors", None, f"{p}: holds no LoRA modules",
                       hint="expected lora_A/lora_B (PEFT, diffusers) or lora_down/lora_up (kohya) tensors",
                       exc=FormatError)
    return adapter


def _bfl_control_reshapes(adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """A BFL FLUX.1 control LoRA (flux1-depth-dev-lora, flux1-canny-dev-lora: BFL names without a
    prefix, the RMSNorm `*_norm.scale` tensors saved whole) widens `img_in`: its lora_A takes the
    image and the control latents (128 channels) where FLUX.1-dev's img_in takes 64. ComfyUI
    (comfy/lora_convert.py convert_lora_bfl_control) recognises the file the same way and pads img_in
    with zeros to (lora_B rows, lora_A columns)."""
    m = adapter.modules.get("img_in")
    if m is None or m.kind != "linear" or not any(k.endswith("_norm.scale") for k in adapter.extras):
        return {}
    return {m.name: (m.out_features, m.in_features)}


def from_comfy_control(tf: TensorFile) -> TensorFile:
    """A BFL FLUX.1 control LoRA in ComfyUI's spelling of it (kohya.control_state_dict: `diffusion_model.`,
    `.diff_b`, `.set_weight`, `.reshape_weight`) under BFL's own keys, which the readers know; any
    other file as it is.

    Raises:
        FormatError: a `.reshape_weight` that is not the (lora_B rows, lora_A columns) of its module.
    """
    pre = kohya.COMFY_CONTROL_PREFIX
    shapes = [k for k in tf.tensors if k.startswith(pre) and k.endswith(".reshape_weight")]
    if not shapes or not all(k.startswith(pre) for k in tf.tensors):
        return tf
    tensors = {}
    for key, ref in tf.tensors.items():
        if key in shapes:
            continue
        name = key.removeprefix(pre)
        for bfl, comfy in kohya.COMFY_CONTROL_SUFFIXES:
            if name.endswith(comfy):
                name = name.removesuffix(comfy) + bfl
                break
        tensors[name] = ref
    for key in shapes:
        module = key.removeprefix(pre).removesuffix(".reshape_weight")
        a, b = tensors.get(module + ".lora_A.weight"), tensors.get(module + ".lora_B.weight")
        value = tf.tensors[key]
        got = tuple(int(x) for x in value.load().flatten().tolist()) if len(value.shape) == 1 else None
        if a is None or b is None or got != (b.shape[0], a.shape[-1]):
            want = "a LoRA for its module" if a is None or b is None else f"({b.shape[0]}, {a.shape[-1]})"
            raise FormatError(f"{tf.path}: tensor '{key}' holds {got if got is not None else value.shape}, "
                              f"but ComfyUI's control-LoRA spelling needs {want}",
                              hint="it must be the module's (lora_B rows, lora_A columns), as ComfyUI's "
                              "convert_lora_bfl_control writes it")
    return TensorFile(tf.path, tensors, tf.metadata)


def _check_duplicates(adapter: Adapter, findings: Findings) -> None:
    seen: dict[str, str] = {}
    for name in adapter.modules:
        norm = name.replace(".", "_")
        if norm in seen:
            findings.error(
                "duplicate-module", name,
                f"{adapter.path}: modules '{seen[norm]}' and '{name}' are the same layer after name "
                "normalisation; merging would apply it twice",
            )
        seen[norm] = name


def require_plain(adapter: Adapter, op: str, *, lycoris: bool = False, diffs: bool = False,
                  dora: bool = False) -> None:
    """Operations refuse adapters that hold tensors they would silently drop.

    lycoris: the operation handles LyCORIS modules (merge, convert); else they are refused too.
    diffs: the operation passes full / norm / bias diffs through unchanged (resize).
    dora: the operation applies DoRA on either axis and on LyCORIS modules (merge, verify); else
        per-input-column DoRA is left to the writer's check (check_writable: only kohya-style files
        hold it) and a LyCORIS module with a magnitude is refused.
    """
    weight_decomposed = [n for n, m in adapter.lycoris.items() if m.magnitude is not None]
    if weight_decomposed and not dora:
        m = adapter.lycoris[weight_decomposed[0]]
        raise IncompatibleError(
            f"{adapter.path}: module '{m.name}' is {LYCO_NAMES[m.algo]} with DoRA weight decomposition "
            f"(.dora_scale; {len(weight_decomposed)} such module(s)), which {op} does not support: no format "
            "loratool writes holds it, and without its magnitude it is another adapter",
            hint=f"merge it into a safetensors base model: loratool merge BASE {adapter.path} -o OUT",
        )
    refused = {n: m for n, m in adapter.lycoris.items() if not (diffs and m.algo in ("full", "norm", "bias"))}
    if refused and not lycoris:
        name, m = next(iter(refused.items()))
        raise IncompatibleError(
            f"{adapter.path}: module '{name}' is {LYCO_NAMES[m.algo]}, which {op} does not support "
            f"({len(refused)} LyCORIS module(s))",
            hint=f"convert it to plain LoRA first: loratool convert {adapter.path} --to lora --out OUT",
        )
    if adapter.unsupported:
        key = adapter.unsupported[0]
        raise IncompatibleError(
            f"{adapter.path}: tensor '{key}' is {unsupported_family(key)}, which {op} does not support "
            f"({len(adapter.unsupported)} such tensor(s))",
            hint="loratool operates on plain LoRA factors only",
        )


# ---------------------------------------------------------------------------------------------
# writing


def source_label(path: str | os.PathLike[str]) -> str:
    """How a source file is named in provenance: `hf://OWNER/REPO@SHA/PATH` for a file that came
    from the Hub (through the Hugging Face cache), else `folder/file`, never the absolute path
    (which would leak local directory names into files users publish)."""
    from loratool.hub import cached_url

    if isinstance(path, str) and path.startswith("hf://"):
        return path
    url = cached_url(path)
    if url is not None:
        return url
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def provenance(
    op: str, params: Mapping[str, Any], sources: list[Path], hashes: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The `__metadata__` entries every file we write carries.

    `hashes` are sha256 sums the caller already computed (e.g. while streaming a checkpoint),
    by path; `sources` are hashed here.
    """
    from loratool._version import __version__
    from loratool.io.copies import sha256_file

    by_path = {**(hashes or {}), **{str(s): sha256_file(s) for s in sources if s.is_file()}}
    labelled: dict[str, str] = {}
    for path, digest in by_path.items():
        label = source_label(path)
        while label in labelled:  # two sources with the same folder and file name
            label += "'"
        labelled[label] = digest
    return {
        "loratool.version": __version__,
        "loratool.op": op,
        "loratool.params": json.dumps(dict(params), sort_keys=True, default=str),
        "loratool.sources": json.dumps(labelled, sort_keys=True),
    }


def output_is_directory(fmt: str) -> bool:
    return get(fmt).capabilities.directory


def single_file_output(adapter: Adapter, out: Path, fmt: str, explicit: bool) -> bool:
    """Whether a PEFT output is one file rather than a PEFT directory.

    A path ending in .safetensors is a file, unless the format was asked for explicitly (a PEFT
    folder, which write() refuses to name *.safetensors). A single-file input (PEFT-style keys with no config
    beside them, Adapter.key_prefix set) stays a single file in its own dialect unless the format
    was asked for explicitly.
    """
    if fmt != "peft":
        return False  # the other formats have one layout each (kohya, diffusers: a file; MLX: a directory)
    if out.suffix == ".safetensors":
        return not explicit  # --format peft asked for a PEFT folder: write() refuses the name
    return not explicit and adapter.source_format == "peft" and adapter.key_prefix is not None


def write(
    adapter: Adapter,
    out: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    force: bool = False,
    op: str = "write",
    params: Mapping[str, Any] | None = None,
    sources: list[Path] | None = None,
    hashes: Mapping[str, str] | None = None,
    inputs: list[Path] | None = None,
) -> Path:
    """Write an adapter atomically and re-read it before it is moved into place.

    Args:
        fmt: a writable format name (writable_formats()); default: the adapter's own format.
        op, params, sources: provenance recorded in the file's metadata; hashes: sha256 sums already
            computed, by path (merged with those of sources).
        inputs: what the command read (default: sources, the adapter's files and path); the output
            may not be, contain or lie inside any of them.

    Returns:
        The output path.

    Raises:
        OutputExistsError; IncompatibleError: content the format cannot hold (check_writable);
        FormatError.
    """
    from loratool.io.outputs import atomic_output

    explicit = fmt is not None
    if fmt is None and adapter.source_format == "kohya" and comfyui_names(adapter):
        fmt = "comfyui"  # a ComfyUI-dialect file (dotted `diffusion_model.` paths) stays in its dialect
    record = get(fmt or written_as(adapter.source_format), writing=True)
    check_writable(adapter, record.name)
    assert record.write is not None
    _require_usable_values(adapter, Path(out))
    meta = provenance(op, params or {}, sources if sources is not None else adapter.files, hashes)
    out = Path(out)
    single = single_file_output(adapter, out, record.name, explicit)
    if inputs is None:
        inputs = [*(sources or []), *adapter.files, *([adapter.path] if adapter.path else [])]
    directory = record.capabilities.directory and not single
    if directory and out.suffix == ".safetensors":
        raise IncompatibleError(
            f"{out}: a {record.name} adapter is a folder; refusing to write a folder named *.safetensors",
            hint=f"give -o a folder name (e.g. -o {out.with_suffix('')}); for one .safetensors file write kohya "
            "or diffusers (--format, or --to in convert)")
    with atomic_output(out, force=force, directory=directory, inputs=inputs,
                       kind="adapter" if directory else None) as tmp:
        try:
            if record.name == "peft" and single:
                keep = adapter.source_format == "peft" and adapter.key_prefix is not None
                peft.write_file(adapter, tmp, meta, adapter.key_prefix if keep and adapter.key_prefix is not None
                                else peft.PREFIX)
            else:
                record.write(adapter, tmp, meta)
        except IncompatibleError as e:  # what the format cannot hold: name the output, not the temporary
            raise IncompatibleError(f"{out}: {e.message}", hint=e.hint) from None
        check = read(tmp)
        if len(check.modules) != len(adapter.modules) or len(check.lycoris) != len(adapter.lycoris):
            raise IncompatibleError(
                f"{out}: re-reading the written adapter gave {len(check.modules)} + {len(check.lycoris)} modules, "
                f"expected {len(adapter.modules)} + {len(adapter.lycoris)}"
            )
        _require_finite(check, tmp, out)
    return out


def _require_finite(written: Adapter, tmp: Path, out: Path) -> None:
    """The one finite check of every tensor an adapter writer wrote: factors, biases, DoRA magnitudes,
    LyCORIS tensors (.diff, .diff_b, .dora_scale, ...), saved full tensors, and whatever a writer
    computed (baked scales), read back from the written temporary before it is moved into place.

    Raises:
        IncompatibleError: naming the output file and the tensor's key as written.
    """
    import torch

    from loratool.formats._common import open_tensor_file
    from loratool.maths.guards import single_threaded

    with single_threaded():  # many small tensors
        for f in written.files:
            if f.suffix == ".json":
                continue
            shown = out if f == tmp else out / f.relative_to(tmp)
            for key, ref in open_tensor_file(f, allow_pickle=False).tensors.items():
                t = ref.load()
                if not t.is_floating_point():
                    continue
                if t.element_size() == 1:  # float8: torch has no isfinite for it
                    t = t.float()
                if not bool(torch.isfinite(t).all()):
                    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                    raise IncompatibleError(
                        f"{shown}: tensor '{key}' would be written with {nan} NaN and {inf} Inf values; "
                        "nothing was written", hint="check the input with: loratool validate ADAPTER")


def comfyui_names(adapter: Adapter) -> bool:
    """Whether the modules of a kohya-suffix file are stored under dotted `diffusion_model.` paths,
    text-encoder modules aside (ComfyUI reads those in kohya's `lora_te*_` names)."""
    names = [*adapter.modules, *adapter.lycoris]
    model = [n for n in names if not n.startswith("lora_te")]
    return bool(model) and all(n.startswith("diffusion_model.") for n in model)


def _require_usable_values(adapter: Adapter, out: Path) -> None:
    """Refuse to write NaN/Inf, or a delta no float32 runtime can apply (an alpha or factor overflowed).

    Raises:
        IncompatibleError: naming the module.
    """
    from loratool.maths.guards import single_threaded

    with single_threaded():  # many small tensors
        _check_values(adapter, out)


def _check_values(adapter: Adapter, out: Path) -> None:
    import torch

    from loratool.maths.compare import product_fro_norm
    from loratool.maths.delta import factors
    from loratool.maths.guards import F32_MAX

    for m in adapter.modules.values():
        if not math.isfinite(m.alpha) or not math.isfinite(m.scale):
            raise IncompatibleError(f"{out}: module '{m.name}': alpha {m.alpha:g} (scale {m.scale:g}) is not a "
                                    "finite number", hint="use a smaller --factor / --alpha / --weights")
        # one float64 pass per factor: its norm is NaN / Inf exactly when the factor holds NaN / Inf
        # (squares of float32 values cannot overflow float64), and ||up||·||down|| bounds the delta's norm
        norms = {}
        for role, ref in (("up", m.up), ("down", m.down)):
            t = ref.load()
            if t.element_size() == 1 or not t.is_floating_point():  # float8 does not promote to float64
                t = t.float()
            norms[role] = float(torch.linalg.vector_norm(t.reshape(-1), dtype=torch.float64)) if t.numel() else 0.0
            if not math.isfinite(norms[role]):
                raise IncompatibleError(f"{out}: module '{m.name}': {role} holds NaN or Inf values",
                                        hint="check the adapter with: loratool validate ADAPTER")
        size = norms["up"] * norms["down"] * abs(m.scale)
        if size > F32_MAX:  # the bound is too loose to tell: the exact norm of the product
            size = product_fro_norm(*factors(m, dtype=torch.float32)) * abs(m.scale)
        if not size <= F32_MAX or abs(m.alpha) > F32_MAX:
            raise IncompatibleError(
                f"{out}: module '{m.name}': its delta (Frobenius norm {size:.3g}, alpha {m.alpha:.3g}) is beyond "
                "float32; no runtime could apply it", hint="use a smaller --factor / --alpha / --weights")


LYCO_NAMES = {
    "loha": "LoHa (LyCORIS)", "lokr": "LoKr (LyCORIS)", "tucker": "LoCon with Tucker (LyCORIS)",
    "full": "a full weight diff (.diff)", "norm": "a norm-layer diff (.w_norm)", "bias": "a bias diff (.diff_b)",
}
