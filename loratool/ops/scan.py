"""scan: an admission check for uploads, never executing anything it reads.

Per file: its sha256; for safetensors the layout rules (io.header.read_header's checks, every problem
listed) and the hashes hubs use for the tensor data (the bytes after the header):
- `tensor_sha256`: sha256 of the data section, = kohya sd-scripts' `sshs_model_hash`
  (addnet_hash_safetensors) and Civitai's AutoV3 in full; `autov3` is its first 12 hex digits
  upper-cased (the form Civitai shows), `autov2` the first 10 of the file's sha256;
- `modelspec_hash_sha256`: "0x" + tensor_sha256, as the SAI ModelSpec key `modelspec.hash_sha256`
  is written (sd-scripts hashes the tensors' bytes in their stored order, which is the data section);
  a stored `sshs_model_hash` / `modelspec.hash_sha256` that disagrees is a finding.
For pickles (.bin/.pt/.pth/.ckpt, zip or legacy): an opcode report from pickletools.genops over
each pickle (never unpickled): the GLOBAL / STACK_GLOBAL imports it names, flagged when outside
what torch.load(weights_only=True) accepts.

Then, when the adapter reads (pickles only with allow_pickle, safetensors always): format, family
and a content fingerprint of its deltas (see `fingerprint`).
"""

from __future__ import annotations

import hashlib
import os
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError

SCHEMA = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# what torch.load(weights_only=True) unpickles for a state dict (module, name); anything else is flagged
SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"), ("torch", "device"), ("_codecs", "encode"), ("builtins", "set"),
    *{("torch", f"{t}Storage") for t in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char",
                                         "Byte", "Bool", "ComplexFloat", "ComplexDouble", "Untyped")},
    *{("torch", t) for t in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                             "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")},
}
# the fingerprint's grid: log2 of each singular value and each singular-vector entry, in steps of 2^-GRID_BITS
GRID_BITS = 20
DROP_BELOW = 1e-6  # singular values under this share of a module's largest are zero padding, not content


@dataclass
class FileScan:
    path: str
    size: int
    sha256: str
    kind: str  # safetensors, pickle, gguf, other
    tensor_sha256: str | None = None
    problems: list[str] = field(default_factory=list)
    imports: list[dict[str, Any]] = field(default_factory=list)
    opcodes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        ts = self.tensor_sha256
        return {
            "path": self.path, "size": self.size, "sha256": self.sha256, "kind": self.kind,
            "autov2": self.sha256[:10].upper(), "tensor_sha256": ts,
            "modelspec_hash_sha256": f"0x{ts}" if ts else None, "autov3": ts[:12].upper() if ts else None,
            "layout_problems": self.problems, "pickle_imports": self.imports, "pickle_opcodes": self.opcodes,
        }


@dataclass
class ScanReport:
    path: Path
    files: list[FileScan]
    findings: list[dict[str, str]]
    format: str | None = None
    family: str | None = None  # the model family inspect detects, when one fits best
    family_tied: list[str] = field(default_factory=list)  # the families that fit equally well otherwise
    num_modules: int | None = None
    fingerprint: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f["severity"] == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "path": str(self.path), "ok": self.ok, "format": self.format,
                "model_family": self.family, "family_tied": self.family_tied,
                "num_modules": self.num_modules, "fingerprint": self.fingerprint,
                "files": [f.to_dict() for f in self.files], "findings": self.findings, "warnings": self.warnings}


def scan(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> ScanReport:
    """Scan an adapter file or folder without executing any of it.

    Returns:
        The report; `ok` is False when a finding is an error (a layout rule broken, a pickle import
        outside the allowlist, a file that does not read, a stored hash that disagrees).

    Raises:
        FormatError: the path does not exist.
    """
    from loratool.errors import FormatError
    from loratool.hub import resolve_path

    p = Path(resolve_path(path))
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    files = sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink()) if p.is_dir() else [p]
    report = ScanReport(p, [], [])
    for f in files:
        if f.suffix.lower() in (".json", ".md", ".txt", ".yaml", ".yml", ".png", ".jpg", ".gitattributes"):
            continue
        report.files.append(_scan_file(f, report.findings))
    has_pickle = any(fs.kind == "pickle" for fs in report.files)
    if has_pickle and not allow_pickle:
        report.warnings.append("pickle files are reported, not loaded: format and fingerprint need --allow-pickle")
        return report
    try:
        from loratool.formats import read
        from loratool.ops.inspect import InspectReport

        adapter = read(p, allow_pickle=allow_pickle)
        doc = InspectReport(adapter, p, 0).to_dict()
        report.format = adapter.source_format
        fam = doc.get("family")
        if isinstance(fam, dict):
            report.family = fam.get("family")
            tied = list(fam.get("tied") or [])
            report.family_tied = tied if len(tied) > 1 else []  # one family named is no tie
        report.num_modules = len(adapter.modules) + len(adapter.lycoris)
        report.fingerprint = fingerprint(adapter)
    except LoratoolError as e:
        report.findings.append({"severity": "error", "code": "scan-unreadable", "message": e.message})
    return report


def _finding(findings: list[dict[str, str]], severity: str, code: str, message: str) -> None:
    findings.append({"severity": severity, "code": code, "message": message})


def _scan_file(f: Path, findings: list[dict[str, str]]) -> FileScan:
    from loratool.io.copies import sha256_file

    fs = FileScan(str(f), f.stat().st_size, sha256_file(f), "other")
    with open(f, "rb") as fh:
        head = fh.read(8)
    if f.suffix.lower() == ".safetensors":
        fs.kind = "safetensors"
        _safetensors(f, fs, findings)
    elif f.suffix.lower() in PICKLE_SUFFIXES or head[:2] == b"\x80\x02" or head[:4] == b"PK\x03\x04":
        fs.kind = "pickle"
        _pickle(f, fs, findings)
    elif head[:4] == b"GGUF":
        fs.kind = "gguf"
    return fs


def _safetensors(f: Path, fs: FileScan, findings: list[dict[str, str]]) -> None:
    from loratool.io.header import read_header

    problems: list[str] = []
    try:
        header = read_header(f, problems=problems)
    except LoratoolError as e:
        fs.problems.append(e.message)
        _finding(findings, "error", "scan-safetensors-layout", e.message)
        return
    fs.problems += problems
    for msg in problems:
        _finding(findings, "error", "scan-safetensors-layout", msg)
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        fh.seek(8 + header.header_len)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    fs.tensor_sha256 = h.hexdigest()
    for key, want in (("sshs_model_hash", fs.tensor_sha256), ("modelspec.hash_sha256", "0x" + fs.tensor_sha256)):
        stored = header.metadata.get(key)
        if stored and stored.lower() != want:
            _finding(findings, "warning", "scan-stored-hash",
                     f"{f}: __metadata__ {key} is {stored} but the tensor data hashes to {want} "
                     "(edited after hashing, or hashed another way)")


def _pickle(f: Path, fs: FileScan, findings: list[dict[str, str]]) -> None:
    """genops over the file (legacy pickle) or each .pkl member of a torch zip: count opcodes, list imports."""
    imports: dict[tuple[str, str], int] = {}
    count = 0
    try:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                for name in z.namelist():
                    if name.endswith(".pkl"):
                        with z.open(name) as member:
                            count += _genops(member, imports)
        else:
            with open(f, "rb") as fh:
                count += _genops(fh, imports)
    except (ValueError, EOFError, zipfile.BadZipFile, OSError, RecursionError) as e:
        _finding(findings, "error", "scan-pickle-malformed", f"{f}: the pickle does not parse ({e})")
    fs.opcodes = count
    for (module, name), n in sorted(imports.items()):
        allowed = (module, name) in SAFE_GLOBALS
        fs.imports.append({"module": module, "name": name, "count": n, "allowed": allowed})
        if not allowed:
            _finding(findings, "error", "scan-pickle-import",
                     f"{f}: the pickle imports {module}.{name}, which loading would call (not a state dict's own)")


def _genops(stream: Any, imports: dict[tuple[str, str], int]) -> int:
    """Walk the opcodes; STACK_GLOBAL's module and name are the last two strings pushed (or fetched from the memo)."""
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    count = 0
    for op, arg, _pos in pickletools.genops(stream):
        count += 1
        if op.name == "GLOBAL" or op.name == "INST":
            module, _, name = str(arg).partition(" ")
            imports[(module, name)] = imports.get((module, name), 0) + 1
        elif op.name == "STACK_GLOBAL":
            module, name = (strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?")
            key = (str(module), str(name))
            imports[key] = imports.get(key, 0) + 1
        elif isinstance(arg, str) and op.name not in ("GLOBAL", "INST"):
            strings.append(arg)
        elif op.name in ("MEMOIZE",):
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg or 0)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(int(arg or 0)))
        if op.name == "STOP":
            break
    return count


def fingerprint(adapter: Any) -> str:
    """A hash of what the adapter does, the same whatever dialect stores it and however ΔW is factored.

    Per module (whatever its name: a kohya file may name a layer by its LDM path and its diffusers
    conversion by the diffusers one, so modules are a multiset ordered by content): the exact SVD of
    ΔW = scale·up@down in the base weight's layout (fan_in_fan_out and embeddings transposed back),
    from the factors rounded to bfloat16 first
    (so fp32 and bf16 copies of the same factors agree bit for bit) and computed in float64 by the
    low-rank route. Singular values under DROP_BELOW of the largest are dropped (zero-padded ranks);
    each singular pair is signed so its u's largest entry is positive. log2(σ) and the vector entries
    are rounded to steps of 2^-GRID_BITS (about 1e-6), which absorbs float64 round-off between
    machines and factorisations of the same bf16 content. DoRA magnitudes and bias deltas join by
    their bf16 bytes, modules_to_save tensors too; LyCORIS modules by their stored bytes.

    Not the same for: a resize or other re-factorisation of fp32 factors whose bf16 rounding differs
    (the deltas then differ by up to one bf16 step), fp16 copies (fp16 and bf16 keep different bits),
    scales baked into the factors by an amount that is not a power of two.
    """
    import torch

    from loratool.maths.svd import lowrank_svd

    def canon(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).to(torch.bfloat16).to(torch.float64)

    digests: list[bytes] = []
    step = float(1 << GRID_BITS)
    for m in adapter.modules.values():
        h = hashlib.sha256()
        up = canon(m.up.load()).reshape(m.up.shape[0], -1)
        down = canon(m.down.load()).reshape(m.down.shape[0], -1)
        u, s, vh = lowrank_svd(up, down)
        s = s * abs(m.scale)
        if m.scale < 0:
            u = -u
        if m.kind == "embedding" or m.fan_in_fan_out:
            u, vh = vh.T, u.T
        keep = s > DROP_BELOW * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
        u, s, vh = u[:, keep], s[keep], vh[keep]
        if s.numel():
            sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
            sign[sign == 0] = 1
            u, vh = u * sign, vh * sign.T
        h.update(f"{tuple(m.base_shape)}\0{s.numel()}\0".encode())
        for t in (torch.log2(s), u, vh):
            h.update(torch.round(t * step).to(torch.int64).numpy().tobytes())
        for extra in (m.magnitude, m.bias):
            if extra is not None:
                h.update(canon(extra.load()).to(torch.float32).numpy().tobytes())
        digests.append(h.digest())
    for key in adapter.extras:
        digests.append(hashlib.sha256(canon(adapter.extras[key].load()).to(torch.float32).numpy().tobytes()).digest())
    for lyco in adapter.lycoris.values():
        h = hashlib.sha256(f"{lyco.alpha}".encode())
        for role in sorted(lyco.tensors):
            h.update(role.encode() + canon(lyco.tensors[role].load()).to(torch.float32).numpy().tobytes())
        digests.append(h.digest())
    h = hashlib.sha256(b"loratool-fingerprint-1\0")
    for d in sorted(digests):  # names differ between dialects (and LDM vs diffusers layouts): order by content
        h.update(d)
    return "lf1:" + h.hexdigest()
