"""Pieces every format reader shares: tensor sources, findings, and building checked LoraModules."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loratool.adapter import AlphaSource, Kind, LoraModule
from loratool.errors import FormatError, IncompatibleError, LoratoolError
from loratool.st import TensorRef, read_header

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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class TensorFile:
    """The tensors of one adapter file as lazy refs, with its header metadata."""

    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]


def open_tensor_file(path: Path, *, allow_pickle: bool) -> TensorFile:
    """Open a .safetensors file (header only) or, with allow_pickle, a torch pickle (weights only).

    Raises:
        FormatError: pickle without allow_pickle, or an unreadable file.
    """
    if path.suffix == ".npz":
        return _open_npz(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FormatError(
                f"{path}: is a pickle file; loading pickles can run arbitrary code",
                hint="convert it to .safetensors, or pass --allow-pickle if you trust its source",
            )
        return _load_pickle(path)
    st = read_header(path)
    return TensorFile(path, {k: TensorRef.from_info(i) for k, i in st.tensors.items()}, st.metadata)


def _open_npz(path: Path) -> TensorFile:
    """An .npz archive (older MLX adapters) as tensors, loaded with numpy's allow_pickle=False."""
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError) as e:  # ValueError: pickled object arrays, bad members
        raise FormatError(f"{path}: not a readable .npz archive of plain arrays ({e})") from None
    tensors = {k: TensorRef.from_tensor(torch.from_numpy(np.ascontiguousarray(a))) for k, a in arrays.items()}
    return TensorFile(path, tensors, {})


def _load_pickle(path: Path) -> TensorFile:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FormatError(
            f"{path}: refused by the safe (weights_only) unpickler: {_unpickler_reason(e)}; "
            "it holds something other than plain tensors",
            hint="ask for a .safetensors version of this adapter; never load it with weights_only=False",
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
    for marker, family in (("hada_", "LoHa (LyCORIS)"), ("lokr_", "LoKr (LyCORIS)"), ("oft", "OFT"),
                           ("lora_mid", "LoCon Tucker (LyCORIS)"), ("ia3", "IA3"), ("vera_", "VeRA")):
        if marker in key:
            return family
    return "non-LoRA"


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
    kind: Kind = "embedding" if raw.embedding else ("conv" if len(down.shape) > 2 else "linear")
    shape_problem = _shape_problem(kind, down.shape, up.shape)
    if shape_problem:
        code = "rank-mismatch" if shape_problem.startswith("rank differs") else "bad-shape"
        findings.error(code, shown, f"{where}: module '{shown}': {shape_problem}")
        return None
    rank = down.shape[0]
    source: AlphaSource = alpha_source
    if alpha is None:
        alpha, source = float(rank), "implied"
    elif not math.isfinite(alpha):
        findings.error("non-finite", shown, f"{where}: module '{shown}': alpha is {alpha} ({alpha_source}); "
                       "every delta of the module would be NaN or Inf")
        return None
    if raw.magnitude is not None and raw.magnitude.numel != up.shape[0]:
        findings.error(
            "bad-shape", shown,
            f"{where}: module '{shown}': DoRA magnitude has shape {raw.magnitude.shape} but the "
            f"module has {up.shape[0]} output features",
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
    )


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
    return None


def json_config(path: Path, findings: Findings) -> dict[str, Any] | None:
    """Read a JSON config file; a bad one is a config-invalid finding (FormatError when strict)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON/UTF-8, over-long integers
        findings.error("config-invalid", None, f"{path}: not valid JSON ({e})",
                       hint="fix or re-create the config file", exc=FormatError)
        return None
    if not isinstance(data, dict):
        findings.error("config-invalid", None, f"{path}: expected a JSON object, got {type(data).__name__}",
                       exc=FormatError)
        return None
    return data


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
