"""Pieces every format reader shares: tensor sources, findings, and building checked LoraModules."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loratool.adapter import AlphaSource, DoraAxis, Kind, LoraModule
from loratool.errors import FormatError, IncompatibleError, LoratoolError
from loratool.formats.tensorfile import TensorFile
from loratool.io.header import read_header
from loratool.io.tensors import TensorRef

Severity = Literal["error", "warning"]


@dataclass
class Finding:
    """One problem found in an adapter. `code` is stable (documented in docs/cli.md)."""

    severity: Severity
    code: str
    module: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "module": self.module, "message": self.message}


@dataclass
class Findings:
    """Collects reader problems. Strict (the default for operations) raises at the first error;
    lenient (validate) records it and lets the reader skip the broken module."""

    strict: bool = True
    items: list[Finding] = field(default_factory=list)

    def error(self, code: str, module: str | None, message: str, *, hint: str | None = None,
              exc: type[LoratoolError] = IncompatibleError) -> None:
        if self.strict:
            raise exc(message, hint=hint)
        self.items.append(Finding("error", code, module, message))

    def warning(self, code: str, module: str | None, message: str) -> None:
        self.items.append(Finding("warning", code, module, message))


def alpha_missing(findings: Findings, where: Path, names: list[str], lacks: str) -> None:
    """One alpha-missing warning for all modules without an alpha, with their count (a file of 128
    such modules gets one line, not 128)."""
    if not names:
        return
    if len(names) == 1:
        findings.warning("alpha-missing", names[0],
                         f"{where}: module '{names[0]}' has no {lacks}; alpha is implied (= rank)")
        return
    findings.warning("alpha-missing", None,
                     f"{where}: {len(names)} modules have no {lacks}; alpha is implied (= rank) for each "
                     f"(e.g. '{names[0]}')")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def open_tensor_file(path: Path, *, allow_pickle: bool, findings: Findings | None = None) -> TensorFile:
    """Open a .safetensors file (header only), an .npz (MLX) or GGUF file, or, with allow_pickle, a
    torch pickle (weights only).

    The container is recognised from the file's first bytes, not its name: a safetensors file
    named .bin is read as safetensors, a torch.save zip named .safetensors is a pickle, and other
    containers (NumPy .npy, HDF5, other zip archives) are named in the error.

    With lenient `findings` (validate), layout problems the safetensors library refuses (overlapping
    or gapped data, trailing bytes, duplicate keys) are recorded as `bad-layout` errors instead.

    Raises:
        FormatError: pickle without allow_pickle, another container, or an unreadable file.
    """
    kind = sniff_container(path)
    if kind == NPZ or (kind == ZIP and path.suffix == ".npz"):
        return _open_npz(path)  # MLX's older adapters.npz (numpy, allow_pickle=False)
    if kind == GGUF:
        from loratool.formats.gguf_file import open_gguf

        return open_gguf(path)
    if kind == "pickle" or (kind is None and path.suffix in PICKLE_SUFFIXES):
        if not allow_pickle:
            calls = pickle_calls(path)
            shown = f"; this one would call {', '.join(calls[:3])} when loaded" if calls else ""
            raise FormatError(
                f"{path}: is a pickle file, not loaded: unpickling can execute arbitrary code (a pickle may call "
                f"any Python function){shown}",
                hint="convert it to .safetensors, or pass --allow-pickle if you trust its source (plain tensors "
                "only are then loaded, with torch.load(weights_only=True))",
            )
        return _load_pickle(path)
    if kind is not None and kind != "safetensors":
        raise FormatError(
            f"{path}: is {kind}, not a safetensors or torch file",
            hint=_CONTAINER_HINTS.get(kind, "loratool reads .safetensors adapters (torch pickles with --allow-pickle)"),
        )
    problems: list[str] | None = [] if findings is not None and not findings.strict else None
    st = read_header(path, problems=problems)
    for message in problems or []:
        assert findings is not None
        findings.error("bad-layout", None, message, exc=FormatError)
    return TensorFile(path, {k: TensorRef.from_info(i) for k, i in st.tensors.items()}, st.metadata)


NPZ = "a NumPy .npz archive"
NPY = "a NumPy .npy array"
GGUF = "a GGUF file (llama.cpp)"
HDF5 = "an HDF5 file (Keras .h5)"
ZIP = "a zip archive"
_CONTAINER_HINTS = {
    NPZ: "convert it to .safetensors (mlx-lm writes adapters.safetensors; numpy.load + safetensors.numpy.save_file)",
    NPY: "save the arrays as .safetensors (safetensors.numpy.save_file)",
    GGUF: "loratool reads .safetensors adapters; convert the GGUF adapter back with llama.cpp's tools",
}


def sniff_container(path: Path) -> str | None:
    """What the file's first bytes say it is: "safetensors", "pickle", one of the container names
    above, or None (too short, unreadable, or unknown: the safetensors reader then explains)."""
    import zipfile

    from loratool.io.header import open_input

    try:
        with open_input(path) as f:  # a FIFO or device is refused, not read (reading it would block)
            head = f.read(16)
    except (OSError, LoratoolError):
        return None  # read_header then names the problem
    if head.startswith(b"GGUF"):
        return GGUF
    if head.startswith(b"\x93NUMPY"):
        return NPY
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return HDF5
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return ZIP
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "pickle"  # torch.save's zip format
        if names and all(n.endswith(".npy") for n in names):
            return NPZ
        return ZIP
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # checked first: a header length may begin with the byte 0x80
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"  # a legacy (non-zip) torch.save or plain pickle
    return None


_PICKLE_SCAN_BYTES = 4_000_000  # how much of a pickle is scanned for the functions it names (for the message)


def pickle_calls(path: Path) -> list[str]:
    """The functions and classes a pickle names (GLOBAL / STACK_GLOBAL), found by reading its
    opcodes without executing anything; those torch needs to rebuild tensors are left out."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = b""
                if member:  # never decompressed beyond the scan bound (a zip bomb stays a small read)
                    with z.open(member) as m:
                        data = m.read(_PICKLE_SCAN_BYTES)
        else:
            from loratool.io.header import open_input

            with open_input(path) as f:
                data = f.read(_PICKLE_SCAN_BYTES)
        calls: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str):
                calls.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                calls.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a corrupt pickle: no names to show, the refusal stands
        return []
    seen: list[str] = []
    for c in calls:
        if not c.startswith(("torch.", "collections.OrderedDict", "_codecs.encode")) and c not in seen:
            seen.append(c)
    return seen


# A zip archive (an .npz, a torch.save .pt) is unpacked into memory: what its members declare they
# unpack to is bounded before anything is decompressed (zipfile and torch's reader stop each member
# at its declared size). Tensors compress poorly (random factors about 1.1:1); a bound of 100 times
# the archive's size, or 256 MiB for small archives, leaves room for all-zero factors and none for a
# zip bomb (1,000:1 and more).
ZIP_EXPANSION_LIMIT = 100
ZIP_EXPANSION_FLOOR = 256 * 2**20


def check_zip_expansion(path: Path) -> None:
    """Refuse a zip archive whose members would unpack to more than the bound above.

    Raises:
        FormatError: naming the archive, its size and what it would unpack to.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FormatError(f"{path}: not a readable zip archive ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    unpacked = sum(i.file_size for i in infos)
    limit = max(ZIP_EXPANSION_FLOOR, ZIP_EXPANSION_LIMIT * size)
    if unpacked > limit:
        big = max(infos, key=lambda i: i.file_size)
        raise FormatError(
            f"{path}: a {size:,}-byte archive whose members unpack to {unpacked:,} bytes (e.g. '{big.filename}': "
            f"{big.file_size:,}); more than {ZIP_EXPANSION_LIMIT} times its size is refused as a zip bomb",
            hint="re-save the tensors as .safetensors")


def _open_npz(path: Path) -> TensorFile:
    """An .npz archive (older MLX adapters) as tensors, loaded with numpy's allow_pickle=False."""
    import numpy as np
    import torch

    check_zip_expansion(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as e:  # numpy/zipfile raise many types on a corrupt archive; ValueError: pickled objects
        raise FormatError(f"{path}: not a readable .npz archive of plain arrays ({type(e).__name__}: {e})") from None
    tensors: dict[str, TensorRef] = {}
    for k, a in arrays.items():
        if not isinstance(a, np.ndarray):  # numpy gives a member that is not a .npy file as raw bytes
            raise FormatError(f"{path}: member '{k}' is not a NumPy .npy array", hint="an .npz holds .npy arrays")
        if a.dtype.kind not in "biuf":
            raise FormatError(f"{path}: array '{k}' holds {a.dtype} values ({_npz_kind(a.dtype.kind)}), "
                              "not numbers", hint="an adapter's arrays are floating-point factors")
        try:
            # torch takes native byte order only: a big-endian ('>f4') array is converted (same values)
            native = a.astype(a.dtype.newbyteorder("="), copy=False)
            tensors[k] = TensorRef.from_tensor(torch.from_numpy(np.ascontiguousarray(native)))
        except TypeError:  # a numpy dtype torch has no counterpart for (float128, ...)
            raise FormatError(f"{path}: array '{k}' has dtype {a.dtype}, which torch cannot hold") from None
    return TensorFile(path, tensors, {})


def _npz_kind(kind: str) -> str:
    return {"U": "text", "S": "bytes", "c": "complex numbers", "M": "dates", "m": "time spans",
            "V": "raw records", "O": "Python objects"}.get(kind, "not numbers")


def _load_pickle(path: Path) -> TensorFile:
    import pickle
    import zipfile

    import torch

    if zipfile.is_zipfile(path):  # torch.save's format: bounded like an .npz
        check_zip_expansion(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        calls = pickle_calls(path)
        what = (f"it would call {', '.join(calls[:3])} when loaded" if calls
                else f"it holds something other than plain tensors ({_unpickler_reason(e)})")
        raise FormatError(
            f"{path}: refused by the safe unpickler: {what}; a pickle that calls functions can execute "
            "arbitrary code, so loratool loads plain tensors only",
            hint="ask for a .safetensors version of this adapter",
        ) from None
    except Exception as e:  # torch.load on a corrupt file raises a zoo of types: all are the file's fault
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: not a readable torch pickle ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: pickle holds a {type(obj).__name__}, expected a dict of tensors")
    tensors = {str(k): TensorRef.from_tensor(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return TensorFile(path, tensors, {})


def _unpickler_reason(e: Exception) -> str:
    """The useful line of torch's weights_only error (its boilerplate advises weights_only=False)."""
    text = str(e)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [ln.strip() for ln in (rest if marker else text).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


# LyCORIS / other adapter types whose tensors we recognise by name but do not operate on.
_UNSUPPORTED_RE = re.compile(
    r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t[12]|oft_blocks|oft_diag|oft_r|"
    r"lora_mid\.weight|diff|diff_b|w_norm|b_norm|a1\.weight|a2\.weight|b1\.weight|b2\.weight|"
    r"bm\.weight|on_input|rescale|ia3_l|boft_R|boft_s|vera_lambda_[bd]|lora_ranknum|"
    r"hra_u|loha_.*)$"
)


def is_unsupported(key: str) -> bool:
    return bool(_UNSUPPORTED_RE.search(key)) or ".oft_" in key or ".boft_" in key


def unsupported_family(key: str) -> str:
    """A name for the adapter family of an unsupported key, for messages."""
    if key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight", ".base_layer.weight")):
        # a PEFT key set aside only in that layout (peft._set_aside_wrapped_copies)
        return "LoRA on a modules_to_save layer (PEFT)"
    for marker, family in ((".modules_to_save.", "LoRA on a modules_to_save layer (PEFT)"),
                           (".original_module.", "LoRA on a modules_to_save layer (PEFT)"),
                           ("hada_", "LoHa (LyCORIS)"), ("lokr_", "LoKr (LyCORIS)"), ("oft", "OFT"),
                           ("lora_mid", "LoCon Tucker (LyCORIS)"), ("ia3", "IA3"), ("vera_", "VeRA")):
        if marker in key:
            return family
    return "non-LoRA"


def split_by_suffix(key: str, suffixes: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
    """'<module><suffix>' -> (module, role) for the first (suffix, role) that `key` ends with, else None."""
    for suffix, role in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


@dataclass
class RawModule:
    """Tensors grouped under one module name before checks."""

    down: TensorRef | None = None
    up: TensorRef | None = None
    alpha: TensorRef | None = None
    magnitude: TensorRef | None = None
    bias: TensorRef | None = None
    embedding: bool = False
    keys: list[str] = field(default_factory=list)

    def put(self, role: str, ref: TensorRef, key: str, name: str, findings: Findings, where: Path) -> None:
        """Record one tensor; a second tensor for the same role is a duplicate-module error."""
        if getattr(self, role) is not None:
            findings.error(
                "duplicate-module", name,
                f"{where}: module '{name}' has two {role} tensors ('{self.keys[-1]}' and '{key}')",
                hint="the file mixes two naming styles for the same layer; keep one",
            )
            return
        self.keys.append(key)
        setattr(self, role, ref)


def group_tensors(
    tf: TensorFile, split: Callable[[str], tuple[str, str] | None], findings: Findings
) -> tuple[dict[str, RawModule], list[str]]:
    """Group a file's tensors by module with `split(key) -> (name, role) | None`.

    Returns the groups that hold a factor, and the leftover keys: those `split` rejects and groups
    with no factor at all (an .alpha of a LyCORIS module, a stray .dora_scale).
    """
    raw: dict[str, RawModule] = {}
    leftovers: list[str] = []
    for key, ref in tf.tensors.items():
        parts = split(key)
        if parts is None:
            leftovers.append(key)
            continue
        name, role = parts
        raw.setdefault(name, RawModule()).put(role, ref, key, name, findings, tf.path)
    for name in [n for n, rm in raw.items() if rm.down is None and rm.up is None]:
        leftovers.extend(raw.pop(name).keys)
    return raw, leftovers


def build_module(
    name: str,
    raw: RawModule,
    *,
    alpha: float | None,
    alpha_source: AlphaSource,
    rslora: bool,
    fan_in_fan_out: bool,
    findings: Findings,
    where: Path,
    display: Callable[[str], str] = lambda n: n,
) -> LoraModule | None:
    """Check one module's tensors and build it; None (with a finding) when it is broken.

    `alpha` None means "implied": alpha = rank, with an alpha-missing warning.
    """
    shown = display(name)
    if raw.down is None or raw.up is None:
        missing, present = ("up", "down") if raw.up is None else ("down", "up")
        findings.error(
            f"missing-{missing}", shown,
            f"{where}: module '{shown}' has a {present} tensor but no {missing} tensor "
            f"(keys: {', '.join(raw.keys)})",
            hint="the file may be truncated or hand-edited; re-export the adapter",
        )
        return None
    down, up = raw.down, raw.up
    for role, ref in (("down", down), ("up", up), ("magnitude", raw.magnitude), ("bias", raw.bias)):
        if ref is not None and not _floating(ref.dtype):
            # integers would be cast silently (and wrap: uint64 1.8e19); they are no LoRA factors
            findings.error("bad-dtype", shown, f"{where}: module '{shown}': {role} is {ref.dtype}; LoRA factors "
                           "must be floating point", exc=FormatError)
            return None
    kind: Kind = "embedding" if raw.embedding else ("conv" if len(down.shape) > 2 else "linear")
    shape_problem = _shape_problem(kind, down.shape, up.shape)
    if shape_problem:
        code = "rank-mismatch" if shape_problem.startswith("rank differs") else "bad-shape"
        findings.error(code, shown, f"{where}: module '{shown}': {shape_problem}")
        return None
    if raw.bias is not None and tuple(raw.bias.shape) != (up.shape[0],):  # one bias value per output row
        findings.error("bias-shape-mismatch", shown,
                       f"{raw.bias.source}: bias of module '{shown}' has shape {tuple(raw.bias.shape)}, but up has "
                       f"{up.shape[0]} rows (one bias value per output row)")
        return None
    rank = down.shape[0]
    source: AlphaSource = alpha_source
    if alpha is None:
        alpha, source = float(rank), "implied"
    elif not math.isfinite(alpha):
        findings.error("non-finite", shown, f"{where}: module '{shown}': alpha is {alpha} ({alpha_source}); "
                       "every delta of the module would be NaN or Inf")
        return None
    dora_axis = magnitude_axis(raw.magnitude.shape, up.shape[0], down.shape[1]) if raw.magnitude is not None else "out"
    if dora_axis is None:
        assert raw.magnitude is not None
        findings.error(
            "bad-shape", shown,
            f"{where}: module '{shown}': DoRA magnitude has shape {raw.magnitude.shape} but the "
            f"module has {up.shape[0]} output features and {down.shape[1]} input features",
        )
        return None
    return LoraModule(
        name=name,
        down=down,
        up=up,
        alpha=float(alpha),
        alpha_source=source,
        rslora=rslora,
        magnitude=raw.magnitude,
        bias=raw.bias,
        kind=kind,
        fan_in_fan_out=fan_in_fan_out and kind == "linear",
        dora_axis=dora_axis,
    )


def _floating(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def magnitude_axis(shape: tuple[int, ...], out: int, inp: int) -> DoraAxis | None:
    """The axis a DoRA magnitude runs along, from its stored shape, or None when it fits neither.

    One value per output row: `(out,)` (PEFT lora_magnitude_vector) or `(out, 1, ...)` (LyCORIS
    wd_on_out=True). One per input column: `(1, in, ...)` (LyCORIS wd_on_out=False, OneTrainer).
    The shape decides, so a square layer's per-column magnitude is never taken as per-row.
    """
    if len(shape) == 1:
        return "out" if shape[0] == out else None
    if len(shape) >= 2 and shape[0] == out and all(d == 1 for d in shape[1:]):
        return "out"
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == inp and all(d == 1 for d in shape[2:]):
        return "in"
    return None


def _shape_problem(kind: Kind, down: tuple[int, ...], up: tuple[int, ...]) -> str | None:
    if kind == "linear" or kind == "embedding":
        if len(down) != 2 or len(up) != 2:
            return f"expected 2-D factors, got down {down} and up {up}"
    else:
        if len(up) != len(down) or any(d != 1 for d in up[2:]):
            return f"conv up must be (out, r, 1, ...) matching down {down}, got up {up}"
    if down[0] != up[1]:
        return f"rank differs: down is {down} (rank {down[0]}) but up is {up} (rank {up[1]})"
    if down[0] == 0:
        return f"rank 0: down is {down}"
    if 0 in down or 0 in up:  # no input or no output features: a module of nothing
        return f"empty factors: down is {down}, up is {up}"
    return None


def json_config(path: Path, findings: Findings) -> dict[str, Any] | None:
    """Read a JSON config file; a bad one is a config-invalid finding (FormatError when strict)."""
    import json

    from loratool.io.header import read_side_file

    try:
        text = read_side_file(path)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        findings.error("config-unreadable", None, f"{path}: cannot be read ({reason.lower()})",
                       hint="check the file's permissions", exc=FormatError)
        return None
    except FormatError as e:  # a directory, a FIFO, a device, or absurdly large
        findings.error("config-unreadable", None, f"{path}: cannot be read ({e.message.removeprefix(f'{path}: ')})",
                       hint=e.hint, exc=FormatError)
        return None
    try:
        data = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON/UTF-8, over-long integers
        findings.error("config-invalid", None, f"{path}: not valid JSON ({e})",
                       hint="fix or re-create the config file", exc=FormatError)
        return None
    if not isinstance(data, dict):
        findings.error("config-invalid", None, f"{path}: expected a JSON object, got {type(data).__name__}",
                       exc=FormatError)
        return None
    return data


# ---------------------------------------------------------------------------------------------
# LoRA config stored in the safetensors header

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_adapter / save_lora_weights
_HEADER_ALPHA_KEYS = ("lora_alpha", "alpha")  # plain header keys trainers write (SimpleTuner, LightX2V)


@dataclass
class HeaderConfig:
    """A LoRA config found in a file's header metadata, and where (for messages and inspect)."""

    config: dict[str, Any]
    origin: str  # e.g. "lora_adapter_metadata" or "header key 'transformer.lora_alpha'"


def header_config(metadata: dict[str, str], component: str | None, where: Path,
                  findings: Findings) -> HeaderConfig | None:
    """The LoRA config a single file carries in its header, for one component (None: no prefix).

    Looked for, in order: `lora_adapter_metadata` (JSON; a LoraConfig dict as `save_lora_adapter`
    writes it, or per component flat `<component>.r` / nested `{"<component>": {...}}` as
    `save_lora_weights` writes it), then plain header keys `<component>.lora_alpha` / `.r`,
    `lora_alpha` / `alpha` / `r`. A file without a prefix whose metadata names exactly one component
    takes that component's config. Values of the wrong type are config-invalid errors naming the key.
    """
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw:
        data = _metadata_json(raw, where, findings)
        if data is not None:
            picked = _pick_component(data, component)
            if picked:
                return HeaderConfig(picked, ADAPTER_METADATA_KEY)
    # plain keys: the component's own, or un-namespaced
    found: dict[str, tuple[str, str]] = {}  # field -> (header key, value)
    spaces = {k.split(".", 1)[0] for k in metadata if "." in k and k.split(".", 1)[1] in ("lora_alpha", "r")}
    space = component if component is not None else (next(iter(spaces)) if len(spaces) == 1 else None)
    for fld, names in (("lora_alpha", _HEADER_ALPHA_KEYS), ("r", ("r",))):
        keys = [k for k in ([f"{space}.{n}" for n in names] if space else []) + list(names) if k in metadata]
        values = {metadata[k].strip() for k in keys}
        if len(values) > 1:
            shown = ", ".join(f"{k}={metadata[k]!r}" for k in keys)
            findings.error("config-invalid", None, f"{where}: header metadata disagrees about {fld}: {shown}",
                           hint="remove the wrong key, or pass the adapter's adapter_config.json beside it",
                           exc=FormatError)
            return None
        if keys:
            found[fld] = (keys[0], metadata[keys[0]])
    if "lora_alpha" not in found:
        return None
    cfg: dict[str, Any] = {}
    for fld, (key, text) in found.items():
        try:
            value = float(text)
        except ValueError:
            findings.error("config-invalid", None, f"{where}: header metadata '{key}' must be a number, got {text!r}",
                           exc=FormatError)
            return None
        cfg[fld] = int(value) if fld == "r" and value.is_integer() else value
    return HeaderConfig(cfg, f"header key '{found['lora_alpha'][0]}'")


def _metadata_json(raw: str, where: Path, findings: Findings) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not JSON, over-long integers, absurd nesting
        findings.error("config-invalid", None,
                       f"{where}: header metadata '{ADAPTER_METADATA_KEY}' is not valid JSON ({e})",
                       hint="alpha cannot be known; re-export the adapter", exc=FormatError)
        return None
    if not isinstance(data, dict):
        findings.error("config-invalid", None,
                       f"{where}: header metadata '{ADAPTER_METADATA_KEY}' is a JSON {type(data).__name__}, "
                       "expected an object", exc=FormatError)
        return None
    return data


_LORA_CONFIG_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules")


def _pick_component(data: dict[str, Any], component: str | None) -> dict[str, Any]:
    def of(space: str) -> dict[str, Any]:
        if isinstance(data.get(space), dict):
            return dict(data[space])
        prefix = space + "."
        return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}

    if component is not None:
        cfg = of(component)
        if cfg:
            return cfg
    if any(k in data for k in _LORA_CONFIG_FIELDS):
        return dict(data)  # one LoraConfig, as a model's save_lora_adapter writes it
    if component is None:
        spaces = {k.split(".", 1)[0] for k in data if "." in k} | {k for k, v in data.items() if isinstance(v, dict)}
        if len(spaces) == 1:
            return of(next(iter(spaces)))
    return {}


def lora_b_bias(m: LoraModule) -> Any:
    """The bias delta as PEFT's lora_B.bias stores it (it is scaled like the weight delta).

    An unscaled `.diff_b` is divided by the module's scale (in float32, cast back); exact when the
    scale is 1.

    Raises:
        IncompatibleError: a zero scale, which no lora_B.bias can reproduce.
    """
    assert m.bias is not None
    bias = m.bias.load()
    if m.bias_scaled or m.scale == 1.0:
        return bias
    if m.scale == 0.0:
        raise IncompatibleError(f"module '{m.name}': its bias delta cannot be stored as lora_B.bias with scale 0",
                                hint="write kohya instead (.diff_b)")
    return (bias.float() / m.scale).to(bias.dtype)
