"""GGUF LoRA adapters (llama.cpp, Ollama), through the `gguf` package (optional: `pip install 'loratool[gguf]'`).

Facts read from ggml-org/llama.cpp on 2026-11-29 (convert_lora_to_gguf.py, src/llama-adapter.h/.cpp,
gguf-py):

- key-values `general.type = adapter`, `adapter.type = lora`, one `adapter.lora.alpha` (float32) for
  the file, and `general.architecture`;
- tensors `<gguf tensor name>.lora_a` / `.lora_b` (`blk.0.attn_q.weight.lora_a`), names from the gguf
  package's per-architecture tensor-name map (the one llama.cpp's converters use). In numpy order
  lora_a is peft's lora_A `(r, in)` and lora_b peft's lora_B `(out, r)`; `token_embd` stores lora_a
  transposed, `(n_vocab, r)`;
- the runtime scale of a tensor pair is `alpha / r` with r = that pair's own rank (alpha 0: scale 1),
  times the user's `--lora-scaled` factor;
- for llama-family models (arch `llama`) the converter permutes the rows of q and k weights (and so
  of lora_b) the way convert_hf_to_gguf.py's LlamaModel.permute does, with the attention head count
  (q) and the key-value head count (k).

loratool keeps GGUF adapters in their own naming: a module read from a GGUF adapter is named by its
GGUF tensor (`blk.0.attn_q`) and its factors are in GGUF's (permuted) layout, which is what a GGUF
base holds. `to_gguf_layout` turns a transformers-named adapter into that layout for an architecture
described by a base model (a transformers config.json or a GGUF model file).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError, IncompatibleError, LoratoolError, scrub
from loratool.formats._common import Findings, RawModule, TensorFile, build_module
from loratool.formats.registry import Capabilities, Format
from loratool.io.paths import folder_file
from loratool.io.tensors import TensorRef

if TYPE_CHECKING:
    import numpy as np
    import torch

SUFFIX = ".gguf"
ALPHA_KEY = "adapter.lora.alpha"
ARCH_KEY = "general.architecture"

# transformers `architectures[0]` -> gguf architecture name, as llama.cpp's convert_hf_to_gguf.py
# registers its model classes (read 2026-11-29). Only architectures checked here are listed: others
# are refused rather than named by a guess.
ARCH_OF_HF: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
}
# architectures whose converter permutes the q / k rows (LlamaModel.permute)
PERMUTED_QK = frozenset({"llama"})


def _gguf() -> Any:
    """The gguf package, imported lazily; a clear error when it is not installed."""
    try:
        import gguf
    except ImportError:
        raise LoratoolError("GGUF needs the 'gguf' package, which is not installed",
                            hint="pip install 'loratool[gguf]'  (or: pip install gguf)") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# reading

# GGUF value types (gguf.GGUFValueType) -> bytes of one value; 8: string (u64 length + bytes), 9: array
_VALUE_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 8
_HEADER_SCAN_LIMIT = 1 << 30  # the key-values and tensor infos of a real model are a few MB


class _Scan:
    """A bounds-checked walk over a GGUF file's key-values and tensor infos: every count and length
    is checked against the bytes that remain before anything is read or allocated, so an absurd count
    (2^60 array elements) is refused at once instead of looped over."""

    def __init__(self, path: Path, data: bytes, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: not a readable GGUF file ({what} at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            if self.pos + n > self.size:
                raise self.fail(f"{what} of {n:,} bytes runs past the end of the {self.size:,}-byte file")
            raise self.fail(f"{what} of {n:,} bytes: key-values beyond {_HEADER_SCAN_LIMIT:,} bytes")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "little")

    def string(self, what: str) -> str:
        raw = self.take(self.uint(8, f"{what} length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> None:
        if vtype == _STRING:
            self.string(f"string value of '{key}'")
        elif vtype == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise self.fail(f"'{key}': arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            etype = self.uint(4, f"array type of '{key}'")
            count = self.uint(8, f"array length of '{key}'")
            least = _VALUE_SIZE.get(etype, 8)  # a string or an array takes 8 bytes at least
            if count * least > len(self.data) - self.pos:
                raise self.fail(f"'{key}' claims {count:,} array elements, more than the file can hold")
            if etype in _VALUE_SIZE:
                self.take(count * _VALUE_SIZE[etype], f"array '{key}'")
            elif etype in (_STRING, _ARRAY):
                for _ in range(count):
                    self.value(etype, key, depth + 1)
            else:
                raise self.fail(f"'{key}' has an unknown array element type {etype}")
        elif vtype in _VALUE_SIZE:
            self.take(_VALUE_SIZE[vtype], f"value of '{key}'")
        else:
            raise self.fail(f"'{key}' has an unknown value type {vtype}")


def check_gguf(path: Path) -> None:
    """Walk a GGUF file's key-values and tensor infos with every count bounded by the file (see
    _Scan), before the gguf package reads it (it trusts the counts and text).

    Raises:
        FormatError: naming the file, the key and the byte.
    """
    from loratool.io.header import open_input

    try:
        with open_input(path) as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(min(size, _HEADER_SCAN_LIMIT))
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    s = _Scan(path, data, size)
    if s.take(4, "magic") != b"GGUF":
        raise s.fail("no GGUF magic")
    version = s.uint(4, "version")
    if version not in (2, 3):
        raise s.fail(f"version {version}; loratool reads GGUF versions 2 and 3")
    n_tensors = s.uint(8, "tensor count")
    n_kv = s.uint(8, "key-value count")
    if n_kv * 13 > size or n_tensors * 24 > size:  # the smallest key-value / tensor info
        raise s.fail(f"{n_kv:,} key-values and {n_tensors:,} tensors claimed by a {size:,}-byte file")
    for _ in range(n_kv):
        key = s.string("key")
        s.value(s.uint(4, f"type of '{key}'"), key)
    for _ in range(n_tensors):
        name = s.string("tensor name")
        n_dims = s.uint(4, f"dimension count of '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise s.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {_MAX_DIMS})")
        dims = [s.uint(8, f"shape of '{name}'") for _ in range(n_dims)]
        if any(d <= 0 or d >= 1 << 62 for d in dims):
            raise s.fail(f"tensor '{name}' has shape {dims}")
        s.take(12, f"type and offset of '{name}'")


def gguf_reader(path: Path) -> Any:
    """gguf.GGUFReader over a file check_gguf accepted; its errors are FormatErrors naming the file."""
    gguf = _gguf()
    check_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf's reader raises many types (struct, numpy, enum) on a corrupt file
        raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def open_gguf(path: Path) -> TensorFile:
    """A GGUF file's tensors (numpy order, dequantized to float32 when quantized) and its string-able
    key-values as metadata.

    Raises:
        FormatError: not a readable GGUF file.
    """

    gguf = _gguf()
    reader = gguf_reader(path)
    metadata: dict[str, str] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.contents()
        metadata[name] = str(value)
    tensors: dict[str, TensorRef] = {}
    for t in reader.tensors:
        if _plain_dtype(t.tensor_type, gguf) is None and not _can_dequantize(t.tensor_type, gguf):
            kind = getattr(t.tensor_type, "name", str(t.tensor_type))
            raise FormatError(f"{path}: tensor '{t.name}' is {kind}, neither floating-point nor a quantized type "
                              "loratool can dequantize", hint="LoRA factors are stored as F32, F16 or quantized")
        tensors[t.name] = GGUFTensorRef(path, t, gguf)
    return TensorFile(path, tensors, metadata)


def _plain_dtype(qtype: Any, gguf: Any) -> str | None:
    """The torch dtype name of an unquantized float GGML type (read as is), else None."""
    for name, dtype in (("F32", "float32"), ("F16", "float16"), ("F64", "float64")):
        if qtype == getattr(gguf.GGMLQuantizationType, name, None):
            return dtype
    return None


def _can_dequantize(qtype: Any, gguf: Any) -> bool:
    traits = getattr(gguf.quants, "_type_traits", None)  # the types gguf.quants.dequantize implements
    return traits is None or qtype in traits


class GGUFTensorRef(TensorRef):
    """A GGUF tensor: shape (numpy order) known at once; bytes read, and dequantized to float32 when
    quantized, on load()."""

    __slots__ = ("_gguf", "_path", "_tensor")

    def __init__(self, path: Path, tensor: Any, gguf: Any) -> None:
        dtype = _plain_dtype(tensor.tensor_type, gguf)
        super().__init__(tuple(int(d) for d in reversed(tensor.shape.tolist())), dtype or "float32", None, None)
        self._path, self._tensor, self._gguf = path, tensor, gguf

    @property
    def source(self) -> str:
        return f"{self._path}: '{self._tensor.name}'"

    def load(self) -> Any:
        import numpy as np
        import torch

        t = self._tensor
        if _plain_dtype(t.tensor_type, self._gguf) is not None:
            data = np.array(t.data)  # a copy: the reader's memmap is read-only
        else:
            data = self._gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(data).reshape(self.shape))


def split_key(key: str) -> tuple[str, str] | None:
    """'blk.0.attn_q.weight.lora_a' -> ('blk.0.attn_q', 'down')."""
    for suffix, role in ((".weight.lora_a", "down"), (".weight.lora_b", "up")):
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _detect(keys: list[str]) -> int:
    return 5 if any(split_key(k) for k in keys) else 0


def from_file(tf: TensorFile, findings: Findings) -> Adapter:
    kind = tf.metadata.get("general.type")
    if kind is not None and kind != "adapter":
        raise FormatError(f"{tf.path}: is a GGUF {kind}, not a LoRA adapter (general.type = {kind})")
    if tf.metadata.get("adapter.type", "lora") != "lora":
        raise FormatError(f"{tf.path}: adapter.type is {tf.metadata['adapter.type']}; only lora is supported")
    raw_alpha = tf.metadata.get(ALPHA_KEY)
    try:
        alpha = float(raw_alpha) if raw_alpha is not None else 0.0
    except ValueError:
        raise FormatError(f"{tf.path}: {ALPHA_KEY} is {raw_alpha!r}, not a number") from None
    if raw_alpha is None:
        findings.warning("alpha-missing", None, f"{tf.path}: no {ALPHA_KEY}; llama.cpp applies scale 1")
    raw: dict[str, RawModule] = {}
    unsupported: list[str] = []
    for key, ref in tf.tensors.items():
        parts = split_key(key)
        if parts is None:
            unsupported.append(key)
            continue
        name, role = parts
        if name == "token_embd" and role == "down":
            ref = TensorRef.from_tensor(ref.load().T.contiguous())  # (n_vocab, r) -> (r, n_vocab)
        rm = raw.setdefault(name, RawModule())
        rm.put(role, ref, key, name, findings, tf.path)
        rm.embedding = name == "token_embd"
    modules: dict[str, LoraModule] = {}
    for name, rm in raw.items():
        r = rm.down.shape[0] if rm.down is not None else None
        # alpha 0 means scale 1 in llama.cpp: alpha = rank
        module = build_module(name, rm, alpha=(alpha if alpha else (float(r) if r else None)),
                              alpha_source="metadata", rslora=False, fan_in_fan_out=False, findings=findings,
                              where=tf.path)
        if module is not None:
            modules[name] = module
    config = {k: tf.metadata[k] for k in (ARCH_KEY, ALPHA_KEY) if k in tf.metadata}
    return Adapter(modules=modules, source_format="gguf", config=config, metadata={}, unsupported=unsupported,
                   path=tf.path, files=[tf.path], source_modules=tuple(modules))


# ---------------------------------------------------------------------------------------------
# transformers names -> GGUF names and layout


@dataclass(frozen=True)
class ArchInfo:
    """What naming and laying out tensors for one architecture needs."""

    arch: str  # gguf architecture name
    blocks: int
    heads: int | None
    kv_heads: int | None
    tensors: frozenset[str] | None = None  # the base's tensor names, when the base is a GGUF model


def arch_info(base: Path) -> ArchInfo:
    """The architecture of a base model: a transformers directory (its config.json is enough) or
    config.json itself, or a GGUF model file.

    Raises:
        IncompatibleError / FormatError: no config, or an architecture not in ARCH_OF_HF.
    """
    import json

    if base.suffix == SUFFIX:
        reader = gguf_reader(base)
        fields = reader.fields

        def value(key: str) -> Any:
            f = fields.get(key)
            return f.contents() if f is not None else None

        arch = value(ARCH_KEY)
        if not isinstance(arch, str):
            raise FormatError(f"{base}: GGUF file without {ARCH_KEY}")
        return ArchInfo(arch, int(value(f"{arch}.block_count") or 0), value(f"{arch}.attention.head_count"),
                        value(f"{arch}.attention.head_count_kv") or value(f"{arch}.attention.head_count"),
                        frozenset(t.name for t in reader.tensors))
    from loratool.io.header import read_side_file

    cfg_path = base if base.name == "config.json" else folder_file(base, "config.json")
    try:
        top = json.loads(read_side_file(cfg_path).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise IncompatibleError(f"{cfg_path}: cannot read the base model's config ({_reason(e)})",
                                hint="pass --base with the transformers model directory (config.json is enough) "
                                "or the GGUF model file") from None
    if not isinstance(top, dict):
        raise IncompatibleError(f"{cfg_path}: the base model's config is a JSON {type(top).__name__}, "
                                "expected an object")
    cfg = top["text_config"] if isinstance(top.get("text_config"), dict) else top
    archs = cfg.get("architectures") or top.get("architectures") or []
    if not isinstance(archs, list):
        raise IncompatibleError(f"{cfg_path}: 'architectures' is {archs!r}, expected a list of class names")
    hf = archs[0] if archs else None
    if not isinstance(hf, str) or hf not in ARCH_OF_HF:
        raise IncompatibleError(f"{cfg_path}: architecture {hf!r} has no GGUF tensor naming loratool knows",
                                hint=f"supported: {', '.join(sorted(ARCH_OF_HF))}")
    heads = _config_int(cfg, "num_attention_heads", cfg_path)
    kv_heads = _config_int(cfg, "num_key_value_heads", cfg_path)
    return ArchInfo(ARCH_OF_HF[hf], _config_int(cfg, "num_hidden_layers", cfg_path) or 0, heads, kv_heads or heads)


def _reason(e: BaseException) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def _config_int(cfg: dict[str, Any], key: str, where: Path) -> int | None:
    """A positive count from a config (None when absent); any other value names the key."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise IncompatibleError(f"{where}: '{key}' is {value!r}, expected a positive integer")
    return value


def permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, rows (pairs, halves) swapped as LlamaModel.permute."""
    out = t.shape[0]
    return t.reshape(heads, 2, out // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def unpermute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    out = t.shape[0]
    return t.reshape(heads, out // heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


_Q = re.compile(r"\.(q_proj|k_proj)$")


def to_gguf_layout(adapter: Adapter, info: ArchInfo) -> Adapter:
    """The adapter named and laid out as llama.cpp expects for `info`'s architecture.

    Raises:
        IncompatibleError: modules the architecture's name map does not know, or that the GGUF base
            does not hold (e.g. lm_head on a model with tied embeddings), all listed.
    """
    gguf = _gguf()
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(info.arch)
    if arch_enum is None:
        raise IncompatibleError(f"the gguf package does not know architecture {info.arch!r}")
    tmap = gguf.get_tensor_name_map(arch_enum, max(info.blocks, 1))
    modules: dict[str, LoraModule] = {}
    unknown: list[str] = []
    for name, m in adapter.modules.items():
        key = name.removeprefix("base_model.model.")
        for prefix, repl in (("model.language_model.", "model."), ("language_model.", "")):
            if key.startswith(prefix):
                key = key.replace(prefix, repl, 1)
                break
        target = tmap.get_name(key + ".weight", try_suffixes=(".weight",))
        if target is None or (info.tensors is not None and target not in info.tensors):
            unknown.append(name)
            continue
        up = m.up
        hit = _Q.search(key)
        if info.arch in PERMUTED_QK and hit:
            heads = info.heads if hit.group(1) == "q_proj" else info.kv_heads
            if not heads:
                raise IncompatibleError(f"the base config has no attention head count, needed to permute '{name}'")
            up = TensorRef.from_tensor(permute_rows(m.up.load(), int(heads)))
        modules[target.removesuffix(".weight")] = m.with_(name=target.removesuffix(".weight"), up=up)
    if unknown:
        shown = ", ".join(unknown[:6]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 6 else "")
        raise IncompatibleError(
            f"{adapter.path}: {len(unknown)} module(s) have no GGUF tensor for architecture {info.arch}"
            + (" in the base model" if info.tensors is not None else "") + f": {shown}",
            hint="llama.cpp would ignore them; lm_head has no tensor of its own when the embeddings are tied",
        )
    return adapter.with_modules(modules, config={ARCH_KEY: info.arch}, source_format="gguf")


# ---------------------------------------------------------------------------------------------
# writing


def _array(t: torch.Tensor) -> np.ndarray:
    import torch

    if t.dtype not in (torch.float32, torch.float16):
        t = t.to(torch.float32)  # bf16 -> f32 is exact
    return t.contiguous().numpy()


def write(adapter: Adapter, out_file: Path, metadata: dict[str, str]) -> None:
    """Write `adapter` (GGUF names and layout, see to_gguf_layout) as a GGUF LoRA adapter.

    One alpha serves every tensor pair (llama.cpp scales each by alpha / its rank): alpha is the most
    common scale·rank, and any module whose scale·rank differs has the ratio baked into lora_b (exact;
    a 16-bit lora_b whose ratio is not a power of two is written as F32, see linalg.bake_scale).
    """
    from collections import Counter

    from loratool.linalg import bake_scale

    gguf = _gguf()
    arch = adapter.config.get(ARCH_KEY)
    if not isinstance(arch, str):
        raise IncompatibleError(f"{adapter.path}: the GGUF architecture is not known",
                                hint="convert with --to gguf --base BASE (a transformers config or a GGUF model)")
    products = Counter(m.scale * m.rank for m in adapter.modules.values() if m.scale != 0)
    alpha = products.most_common(1)[0][0] if products else 1.0
    writer = gguf.GGUFWriter(out_file, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for k, v in metadata.items():
        writer.add_string(scrub(k), scrub(v))  # no Hub token in an output (errors.scrub)
    for name, m in adapter.modules.items():
        if m.kind not in ("linear", "embedding") or m.fan_in_fan_out:
            raise IncompatibleError(
                f"{adapter.path}: module '{name}' is a {m.kind} layer, which GGUF adapters cannot hold")
        up, _ = bake_scale(m.up.load(), m.scale * m.rank / alpha)
        down = m.down.load()
        if name == "token_embd":
            down = down.T  # llama.cpp gathers rows of lora_a by token: (n_vocab, r)
        writer.add_tensor(f"{name}.weight.lora_a", _array(down))
        writer.add_tensor(f"{name}.weight.lora_b", _array(up))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FORMAT = Format(
    name="gguf",
    summary="llama.cpp GGUF LoRA adapter (one file; one adapter.lora.alpha, GGUF tensor names)",
    naming="path",
    # per-module scales are held by baking them into lora_b against the file's one alpha
    capabilities=Capabilities(bias=False, extras=False, fan_in_fan_out=False, embedding=True, conv=False, dora=False,
                              per_module_alpha=True, metadata=True, directory=False),
    detect=_detect,
    read_file=from_file,
    write=write,
    suffix=SUFFIX,
)


def from_gguf_layout(adapter: Adapter, base: Path) -> Adapter:
    """A GGUF adapter back in transformers naming and row order, for the checkpoint `base`.

    The gguf package's name map sends many transformers names to one GGUF name, so each module's
    name is the single candidate the base checkpoint holds (its safetensors headers are read);
    llama's q / k rows are un-permuted.

    Raises:
        IncompatibleError: no checkpoint weights to choose names by, or a module with no or several
            candidates in it (all listed).
    """
    from loratool.io.checkpoint import open_checkpoint

    gguf = _gguf()
    info = arch_info(base)
    try:
        keys = set(open_checkpoint(base).tensors)
    except LoratoolError:
        raise IncompatibleError(
            f"{base}: GGUF names map back to transformers names only against the checkpoint's own keys",
            hint="pass --base with the model directory that holds its .safetensors (only their headers are read)",
        ) from None
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[info.arch]
    reverse: dict[str, list[str]] = {}
    for hf, (_, name) in gguf.get_tensor_name_map(arch_enum, max(info.blocks, 1)).mapping.items():
        reverse.setdefault(name, []).append(hf)
    modules: dict[str, LoraModule] = {}
    problems: list[str] = []
    for name, m in adapter.modules.items():
        hits = [hf for hf in reverse.get(name, []) if hf + ".weight" in keys]
        if len(hits) != 1:
            problems.append(f"{name} ({'no' if not hits else len(hits)} match(es))")
            continue
        up = m.up
        hit = _Q.search(hits[0])
        if info.arch in PERMUTED_QK and hit:
            heads = info.heads if hit.group(1) == "q_proj" else info.kv_heads
            up = TensorRef.from_tensor(unpermute_rows(m.up.load(), int(heads or 0)))
        modules[hits[0]] = m.with_(name=hits[0], up=up)
    if problems:
        shown = ", ".join(problems[:6]) + (f", ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise IncompatibleError(f"{adapter.path}: GGUF modules without one transformers name in {base}: {shown}")
    return adapter.with_modules(modules, config={})
