"""How each base tensor is stored (DESIGN.md section 9, "Base storage"): one descriptor per tensor.

A base weight is plain float (float32/16, bfloat16), or quantized in one of the schemes below,
recognised from its dtype, its sibling tensors and config.json's `quantization_config`:

    fp8         float8_e4m3fn / float8_e5m2, no scale: W = q
    fp8_scaled  ComfyUI scaled fp8: `<m>.scale_weight` (a scalar or one per output row), W = q · s;
                `<m>.scale_input` and the `scaled_fp8` marker are copied as they are
    fp8_block   Hugging Face fine-grained fp8 (DeepSeek-V3, Qwen3-FP8): `<m>.weight_scale_inv`, one
                float32 per weight_block_size tile (config.json quant_method "fp8"), W = q · s_tile
    bnb_nf4 / bnb_fp4
                bitsandbytes 4-bit as transformers saves it: `<m>.weight` packed uint8 (n/2, 1),
                `<m>.weight.absmax`, `.quant_map` (the 16 levels), optionally nested (`absmax` uint8 +
                `.nested_absmax`, `.nested_quant_map`, an offset), and `.quant_state.bitsandbytes__nf4`
                (JSON: blocksize, shape, dtype, ...): W = quant_map[code] · absmax[block]
    bnb_int8    LLM.int8: `<m>.weight` int8 and `<m>.SCB` (row absmax): W = q · SCB / 127

    mxfp4       OCP MXFP4 in gpt-oss's layout: `<p>_blocks` uint8 (E, rows, groups, 16), e2m1 codes two a
                byte (low nibble first), and `<p>_scales` uint8 e8m0 exponents, one per 32 values:
                W = e2m1 · 2^(s − 127), logical shape transformers' (E, groups · 32, rows); requantized
                with the OCP / gguf scale rule 2^(floor(log2 amax) − 2) per block

    nvfp4       NVIDIA FP4: e2m1 codes two a byte (low nibble first), one fp8 e4m3 scale per 16 values,
                one float32 scale per tensor; compressed-tensors (`<m>.weight_packed`, `.weight_scale`,
                `.weight_global_scale` g: W = e2m1 · (s / g); merge plans it as `<m>.weight`) or ModelOpt
                (`<m>.weight` uint8, `.weight_scale`, `.weight_scale_2` s2, `.input_scale`: W = e2m1 · (s · s2)).
                The tensor scale is kept (the exporters share it across fused q/k/v and gate/up); the block
                scales are recomputed as each quantizer does

    comfy_fp8   ComfyUI mixed precision, a layer whose `<m>.comfy_quant` JSON says "float8_e4m3fn" or
                "float8_e5m2": `<m>.weight` fp8, `<m>.weight_scale` float32 scalar, W = q · s; requantized
                as ComfyUI requantizes a patched layer (scale recalculated: amax / max); the marker and
                `input_scale` copied
    comfy_nvfp4 ComfyUI mixed precision "nvfp4" (comfy-kitchen's layout): `<m>.weight` uint8 (rows, cols/2),
                codes high nibble first; `<m>.weight_scale` fp8 block scales in cuBLAS's swizzled 128 × 4
                tile layout; `<m>.weight_scale_2` float32: W = e2m1 · (s2 · s); requantized with s2
                recalculated (amax / (448 · 6)) as ComfyUI does. Other comfy_quant formats (int8, mxfp8,
                ...) are refused by their format name

    gguf        a tensor of a GGUF model file (llama.cpp, the city96 image-model files), by its GGML
                type: F32, F16, BF16, the legacy Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 and the K-quants
                Q2_K..Q6_K, stored as raw blocks (rows, bytes per row); requantized as ggml's own
                reference quantizer does (maths/ggml.py), on any run of whole rows

Everything else that is recognisably quantized (GPTQ, AWQ, HQQ, EXL2, compressed-tensors int,
fp8 with a `weight_scale`, ...) is "known but unsupported": merge refuses it up front, never passing
the delta through wrong. Dequantization is exact (float32); quantize() writes the same scheme back,
block sizes kept, scales recomputed from the data where the scheme computes them (block fp8 tiles,
bnb absmax, int8 SCB) and kept where they are fixed (ComfyUI scale_weight, the nested bnb offset,
codebooks). The maths is in maths/quant.py; this module only decides which of it applies, and reads
only headers plus the few-byte bnb quant_state JSON.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import IncompatibleError

if TYPE_CHECKING:
    import torch

    from loratool.io.checkpoint import Checkpoint
    from loratool.io.header import TensorInfo

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
SUPPORTED = ("fp8", "fp8_scaled", "fp8_block", "bnb_nf4", "bnb_fp4", "bnb_int8", "mxfp4", "nvfp4", "comfy_fp8",
             "comfy_nvfp4")

# the suffix of a packed weight tensor -> its scheme (all refused)
_UNSUPPORTED_WEIGHTS = {
    ".qweight": "GPTQ/AWQ (qweight)",
    ".q_weight": "EXL2 (q_weight)",
    ".W_q": "HQQ (W_q)",
    ".weight_packed": "compressed-tensors (weight_packed)",
}
# the suffix of a sibling of `<m>.weight` -> the scheme it gives away (all refused)
_UNSUPPORTED_SIBLINGS = {
    ".weight_scale_2": "nvfp4 (ModelOpt weight_scale_2)",
    ".comfy_quant": "ComfyUI mixed precision (comfy_quant)",
    ".weight_scale": "quantized weight with weight_scale (compressed-tensors / ModelOpt)",
}
# methods whose weights the per-tensor rules below describe (what they do not know stays refused by name)
_SUPPORTED_METHODS = ("fp8", "bitsandbytes", "mxfp4", "compressed-tensors", "modelopt")


@dataclass(frozen=True)
class Storage:
    """How one base weight is stored, and which tensors hold it."""

    key: str  # the weight's key
    scheme: str  # one of SUPPORTED, or an unsupported scheme's name
    dtype: str  # the stored dtype of `key` (uint8 for packed bnb 4-bit)
    shape: tuple[int, ...]  # the logical (dequantized) shape
    siblings: dict[str, str] = field(default_factory=dict)  # role -> key
    block: tuple[int, ...] = ()  # fp8_block: (rows, cols); bnb 4-bit: (blocksize,)
    params: dict[str, Any] = field(default_factory=dict)  # bnb quant_state JSON; fp8_block: pow2
    supported: bool = True

    @property
    def changing(self) -> list[str]:
        """The sibling keys whose values a requantization recomputes (written with the weight)."""
        roles = {"fp8_block": ("scale_inv",), "bnb_nf4": ("absmax", "nested_absmax"),
                 "bnb_fp4": ("absmax", "nested_absmax"), "bnb_int8": ("scb",),
                 "mxfp4": ("scales",), "nvfp4": ("scale",), "comfy_fp8": ("scale",),
                 "comfy_nvfp4": ("scale", "scale_2")}.get(self.scheme, ())
        return [self.siblings[r] for r in roles if r in self.siblings]

    @property
    def stochastic(self) -> bool:
        """Whether quantize() honours a generator (--rounding stochastic): the fp8 and e2m1 schemes."""
        return (self.scheme.startswith("fp8") or self.dtype in FP8_DTYPES
                or self.scheme in ("mxfp4", "nvfp4", "comfy_nvfp4"))

    @property
    def name(self) -> str:
        """The weight's key as the model names it: compressed-tensors' `<m>.weight_packed` is `<m>.weight`."""
        return self.key[: -len("_packed")] if self.key.endswith(".weight_packed") else self.key

    @property
    def dropped(self) -> list[str]:
        """Sibling keys that a dequantized output (--dtype) leaves out."""
        return [k for r, k in self.siblings.items()]

    def describe(self) -> str:
        if self.scheme == "fp8_block":
            return f"fp8_block {self.dtype} {self.block[0]}x{self.block[1]}"
        if self.scheme in ("bnb_nf4", "bnb_fp4"):
            nested = ", nested absmax" if "nested_absmax" in self.siblings else ""
            return f"{self.scheme} blocksize {self.block[0]}{nested}"
        if self.scheme in ("fp8", "fp8_scaled"):
            return f"{self.scheme} {self.dtype}"
        return self.scheme


@dataclass
class BaseStorage:
    """Every quantized weight of a checkpoint (plain float tensors are absent), and what was refused."""

    tensors: dict[str, Storage] = field(default_factory=dict)  # weight key -> storage
    siblings: dict[str, str] = field(default_factory=dict)  # sibling key -> weight key
    markers: list[str] = field(default_factory=list)  # tensors that only flag a scheme (scaled_fp8)
    quant_method: str | None = None  # config.json quantization_config.quant_method
    config: dict[str, Any] | None = None

    @property
    def unsupported(self) -> list[Storage]:
        return [s for s in self.tensors.values() if not s.supported]

    @property
    def quantized(self) -> bool:
        return bool(self.tensors)

    def of(self, key: str) -> Storage | None:
        return self.tensors.get(key)

    def logical(self, tensors: dict[str, TensorInfo], *, renamed: bool = False) -> dict[str, TensorInfo]:
        """The checkpoint's tensors as a merge sees them: weights with logical shapes, siblings left out;
        with `renamed`, a weight stored under another key (`<m>.weight_packed`) under its `<m>.weight`
        (stored_keys maps it back)."""
        import dataclasses

        out = {}
        for k, info in tensors.items():
            if k in self.siblings or k in self.markers:
                continue
            s = self.tensors.get(k)
            out[s.name if renamed and s is not None else k] = (
                dataclasses.replace(info, shape=s.shape) if s is not None and s.shape else info)
        return out

    @property
    def stored_keys(self) -> dict[str, str]:
        """logical weight key -> stored key, for the weights stored under another key."""
        return {s.name: s.key for s in self.tensors.values() if s.name != s.key}

    def summary(self) -> dict[str, Any]:
        counts = Counter(s.describe() for s in self.tensors.values())
        return {
            "quantized": self.quantized,
            "quant_method": self.quant_method,
            "schemes": dict(counts.most_common()),
            "unsupported": [{"scheme": s.scheme, "tensor": s.key} for s in self.unsupported[:10]],
        }

    def line(self) -> str:
        """One human line: what the base's weights are stored as."""
        if not self.tensors:
            return "plain float (no quantized weights)"
        parts = [f"{n} × {d}" for d, n in Counter(s.describe() for s in self.tensors.values()).most_common()]
        return ", ".join(parts)

    def refuse_dequantized_output(self, where: Path | str) -> None:
        """An Error when a dequantized output (--dtype) cannot keep a weight's key: gpt-oss's MXFP4
        `<p>_blocks` dequantizes to transformers' `<p>` (renamed and transposed), compressed-tensors'
        `<m>.weight_packed` to `<m>.weight`."""
        s = next((s for s in self.tensors.values() if s.params.get("layout") in ("gpt-oss", "compressed-tensors")),
                 None)
        if s is None:
            return
        name = s.key[: -len("_blocks")] if s.params["layout"] == "gpt-oss" else s.key[: -len("_packed")]
        raise IncompatibleError(
            f"{where}: '{s.key}' is {s.scheme} ({s.params['layout']}); written dequantized it would be '{name}', "
            "renamed, which merge does not do",
            hint="merge with --dtype keep (the weights stay quantized), or dequantize the base with transformers "
                 "and save it in 16-bit first",
        )

    def refuse_unsupported(self, where: Path | str, keys: set[str] | None = None) -> None:
        """One Error naming the first unsupported scheme (among `keys` when given) and its tensor."""
        bad = [s for s in self.unsupported if keys is None or s.key in keys]
        if not bad:
            return
        s = bad[0]
        more = f" ({len(bad)} tensors)" if len(bad) > 1 else ""
        raise IncompatibleError(
            f"{where}: '{s.key}' is stored as {s.scheme}{more}, which loratool cannot dequantize and requantize",
            hint="merge into the unquantized (16-bit) base, then quantize the merged model with your tool",
        )


def _read_json_tensor(info: TensorInfo) -> dict[str, Any]:
    from loratool.io.tensors import read_bytes

    try:
        doc = json.loads(read_bytes(info).rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        from loratool.errors import FormatError

        raise FormatError(f"{info.path}: '{info.key}' is not the JSON its writer (bitsandbytes, ComfyUI) stores ({e})"
                          ) from None
    if not isinstance(doc, dict):
        from loratool.errors import FormatError

        raise FormatError(f"{info.path}: '{info.key}' is not a JSON object")
    return doc


def _config(root: Path) -> dict[str, Any] | None:
    from loratool.io.header import read_side_file
    from loratool.io.paths import folder_file

    p = folder_file(root, "config.json")
    if not p.is_file():
        return None
    try:
        doc = json.loads(read_side_file(p).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # FIFOs, devices, absurd sizes: FormatError, not ignored
        return None
    return doc if isinstance(doc, dict) else None


def detect(ckpt: Checkpoint, *, read_small: bool = True) -> BaseStorage:
    """Describe every quantized weight of `ckpt` from dtypes, siblings and config.json.

    Args:
        read_small: read the bnb quant_state JSON tensors (a few hundred bytes each) for their
            logical shape and block size; without it (header-only inspection) bnb shapes stay packed.

    Raises:
        FormatError: a bnb quant_state that is not JSON.
    """
    tensors = ckpt.tensors
    cfg = _config(ckpt.root)
    qcfg = cfg.get("quantization_config") if cfg else None
    qcfg = qcfg if isinstance(qcfg, dict) else None
    method = str(qcfg.get("quant_method")) if qcfg and qcfg.get("quant_method") is not None else None
    base = BaseStorage(quant_method=method, config=qcfg)

    def add(s: Storage) -> None:
        base.tensors[s.key] = s
        for k in s.siblings.values():
            base.siblings[k] = s.key

    for key, info in tensors.items():
        if key.endswith("scaled_fp8") and info.dtype in FP8_DTYPES and math.prod(info.shape) <= 2:
            base.markers.append(key)  # ComfyUI's flag tensor
        # bitsandbytes 4-bit: <w>.quant_state.bitsandbytes__nf4 next to <w>
        for qt in ("nf4", "fp4"):
            qs = f"{key}.quant_state.bitsandbytes__{qt}"
            if qs in tensors:
                sib = {"quant_state": qs}
                for role in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
                    if f"{key}.{role}" in tensors:
                        sib[role] = f"{key}.{role}"
                params: dict[str, Any] = _read_json_tensor(tensors[qs]) if read_small else {}
                shape = tuple(int(d) for d in params.get("shape", ())) or info.shape
                block = (int(params.get("blocksize", 64)),)
                ok = "absmax" in sib and "quant_map" in sib and (
                    ("nested_absmax" in sib) == ("nested_quant_map" in sib))
                add(Storage(key, f"bnb_{qt}" if ok else f"bnb_{qt} (incomplete quant_state)", info.dtype, shape,
                            sib, block, params, supported=ok))
        if key in base.tensors:
            continue
        # the comfy_quant marker first: ComfyUI's nvfp4 has ModelOpt's key names but swizzled block scales
        nv = _comfy_quant(key, tensors, read_small) or _nvfp4(key, tensors)
        if nv is not None:
            add(nv)
            continue
        stem = key[: -len(".weight")] if key.endswith(".weight") else None
        if stem is None:
            packed = next((v for k, v in _UNSUPPORTED_WEIGHTS.items() if key.endswith(k)), None)
            if packed is None and key.endswith("_blocks") and key[: -len("_blocks")] + "_scales" in tensors:
                add(_mxfp4_blocks(key, info, tensors[key[: -len("_blocks")] + "_scales"]))
                continue
            if packed is not None:
                add(Storage(key, packed, info.dtype, info.shape, supported=False))
            continue
        for suffix, scheme in _UNSUPPORTED_SIBLINGS.items():
            if stem + suffix in tensors and not (suffix == ".weight_scale" and info.dtype in FLOAT_DTYPES):
                add(Storage(key, scheme, info.dtype, info.shape, {"marker": stem + suffix}, supported=False))
                break
        if key in base.tensors:
            continue
        if stem + ".scale_weight" in tensors and info.dtype in FP8_DTYPES:
            scale = tensors[stem + ".scale_weight"]
            n = math.prod(scale.shape)
            ok = n == 1 or (n == info.shape[0] and len(info.shape) >= 1)
            add(Storage(key, "fp8_scaled" if ok else f"fp8_scaled (scale_weight {scale.shape})", info.dtype,
                        info.shape, {"scale": stem + ".scale_weight"}
                        | ({"scale_input": stem + ".scale_input"} if stem + ".scale_input" in tensors else {}),
                        supported=ok))
        elif stem + ".weight_scale_inv" in tensors and info.dtype in FP8_DTYPES:
            add(_block_fp8(key, info, tensors[stem + ".weight_scale_inv"], qcfg))
        elif stem + ".SCB" in tensors and info.dtype == "int8":
            sib = {"scb": stem + ".SCB"}
            if stem + ".weight_format" in tensors:
                sib["weight_format"] = stem + ".weight_format"
            ok = len(info.shape) == 2 and math.prod(tensors[stem + ".SCB"].shape) == info.shape[0]
            add(Storage(key, "bnb_int8" if ok else "bnb_int8 (SCB shape)", info.dtype, info.shape, sib,
                        supported=ok))
        elif info.dtype in FP8_DTYPES:
            add(Storage(key, "fp8", info.dtype, info.shape))
    if method is not None and method not in _SUPPORTED_METHODS:
        # a scheme this module does not know tensor by tensor: every integer-stored weight is its
        for key, info in tensors.items():
            if key.endswith(".weight") and key not in base.tensors and key not in base.siblings and (
                    info.dtype not in FLOAT_DTYPES):
                add(Storage(key, method, info.dtype, info.shape, supported=False))
        if not base.tensors:
            first = next((k for k in tensors if k.endswith((".qweight", ".weight"))), next(iter(tensors), ""))
            add(Storage(first, method, tensors[first].dtype if first else "", (), supported=False))
    return base


def _block_fp8(key: str, info: TensorInfo, scale: TensorInfo, qcfg: dict[str, Any] | None) -> Storage:
    sib = {"scale_inv": scale.key}
    if len(info.shape) != 2:
        return Storage(key, f"fp8_block ({len(info.shape)}-D weight)", info.dtype, info.shape, sib, supported=False)
    rows, cols = info.shape
    block = qcfg.get("weight_block_size") if qcfg else None
    pow2 = bool(qcfg and qcfg.get("scale_fmt") == "ue8m0")
    if math.prod(scale.shape) == 1:  # one scale for the whole tensor
        return Storage(key, "fp8_block", info.dtype, info.shape, sib, (rows, cols), {"pow2": pow2})
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        return Storage(key, "fp8_block (no weight_block_size in config.json)", info.dtype, info.shape, sib,
                       supported=False)
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != want or scale.dtype not in ("float32", "bfloat16", "float16"):
        return Storage(key, f"fp8_block (weight_scale_inv {scale.dtype} {scale.shape}, expected {want})",
                       info.dtype, info.shape, sib, supported=False)
    return Storage(key, "fp8_block", info.dtype, info.shape, sib, (block[0], block[1]), {"pow2": pow2})


def _mxfp4_blocks(key: str, info: TensorInfo, scales: TensorInfo) -> Storage:
    """gpt-oss's MXFP4 expert parameters: `<p>_blocks` uint8 (E, rows, groups, 16), two e2m1 codes a
    byte (low nibble first), and `<p>_scales` uint8 (E, rows, groups), one e8m0 exponent per 32 values.
    The logical tensor is transformers' parameter `<p>`: (E, groups · 32, rows), the blocks transposed."""
    sib = {"scales": scales.key}
    shape = info.shape
    if (info.dtype != "uint8" or scales.dtype != "uint8" or len(shape) != 4 or shape[-1] != 16
            or tuple(scales.shape) != tuple(shape[:-1])):
        return Storage(key, f"mxfp4 (_blocks {info.dtype} {shape}, _scales {scales.dtype} {scales.shape})",
                       info.dtype, shape, sib, supported=False)
    return Storage(key, "mxfp4", info.dtype, (shape[0], shape[2] * 32, shape[1]), sib, (32,),
                   {"layout": "gpt-oss"})


_NVFP4_LAYOUTS = (  # (packed weight suffix, global scale suffix, layout)
    (".weight_packed", ".weight_global_scale", "compressed-tensors"),
    (".weight", ".weight_scale_2", "modelopt"),
)


def _nvfp4(key: str, tensors: dict[str, TensorInfo]) -> Storage | None:
    """NVFP4 (e2m1 codes two a byte, low nibble first; one fp8 e4m3 scale per 16 values; one float32
    scale per tensor) in compressed-tensors' layout (`<m>.weight_packed`, `<m>.weight_scale`,
    `<m>.weight_global_scale`) or ModelOpt's (`<m>.weight` uint8, `<m>.weight_scale`,
    `<m>.weight_scale_2`, `<m>.input_scale` kept as it is); None when `key` is neither."""
    for suffix, global_suffix, layout in _NVFP4_LAYOUTS:
        if not key.endswith(suffix):
            continue
        stem = key[: -len(suffix)]
        info, scale, glob = tensors[key], tensors.get(stem + ".weight_scale"), tensors.get(stem + global_suffix)
        if scale is None or glob is None or info.dtype != "uint8":
            continue
        sib = {"scale": scale.key, "global_scale": glob.key}
        if stem + ".input_scale" in tensors:
            sib["input_scale"] = stem + ".input_scale"
        rows, half = info.shape if len(info.shape) == 2 else (0, 0)
        ok = (len(info.shape) == 2 and scale.dtype == "float8_e4m3fn" and (2 * half) % 16 == 0
              and tuple(scale.shape) == (rows, 2 * half // 16) and math.prod(glob.shape) == 1
              and glob.dtype == "float32")
        scheme = "nvfp4" if ok else f"nvfp4 ({layout}: weight_scale {scale.dtype} {scale.shape} for {info.shape})"
        return Storage(key, scheme, info.dtype, (rows, 2 * half) if ok else info.shape, sib, (16,),
                       {"layout": layout}, supported=ok)
    return None


_COMFY_FP8 = {"float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}  # comfy_quant format -> dtype


def _comfy_quant(key: str, tensors: dict[str, TensorInfo], read_small: bool) -> Storage | None:
    """ComfyUI mixed precision: `<m>.comfy_quant` (uint8 JSON bytes, {"format": ...}) names the layer's
    scheme. fp8 formats (`<m>.weight` fp8, `<m>.weight_scale` float32 scalar, optionally
    `<m>.input_scale`) are supported: W = q · weight_scale; other formats (nvfp4's swizzled block scales,
    int8, mxfp8, ...) stay refused by name. None when `key` has no marker."""
    if not key.endswith(".weight") or key[: -len("weight")] + "comfy_quant" not in tensors:
        return None
    stem = key[: -len(".weight")]
    info, marker = tensors[key], tensors[stem + ".comfy_quant"]
    fmt = str(_read_json_tensor(marker).get("format")) if read_small else info.dtype
    sib = {"marker": marker.key}
    for role, suffix in (("scale", ".weight_scale"), ("scale_2", ".weight_scale_2"), ("input_scale", ".input_scale")):
        if stem + suffix in tensors:
            sib[role] = stem + suffix
    scale = tensors.get(stem + ".weight_scale")
    bad = Storage(key, f"ComfyUI mixed precision (comfy_quant format {fmt})", info.dtype, info.shape, sib,
                  params={"format": fmt}, supported=False)
    if fmt == "nvfp4":
        glob = tensors.get(stem + ".weight_scale_2")
        rows, half = info.shape if len(info.shape) == 2 else (0, 0)
        swizzled = (-(-rows // 128) * 128, -(-(2 * half // 16) // 4) * 4)
        if (info.dtype != "uint8" or not rows or (2 * half) % 16 or scale is None or glob is None
                or scale.dtype != "float8_e4m3fn" or tuple(scale.shape) != swizzled or math.prod(glob.shape) != 1
                or glob.dtype != "float32"):
            return bad
        return Storage(key, "comfy_nvfp4", info.dtype, (rows, 2 * half), sib, (16,), {"format": fmt, "layout": "comfy"})
    ok = (fmt in _COMFY_FP8 and info.dtype == _COMFY_FP8[fmt] and scale is not None and math.prod(scale.shape) == 1
          and scale.dtype in FLOAT_DTYPES)
    return Storage(key, "comfy_fp8", info.dtype, info.shape, sib, params={"format": fmt}) if ok else bad


# ---------------------------------------------------------------------------------------------
# dequantize / quantize one weight (with its siblings)

Load = Callable[[str], "torch.Tensor"]


def dequantize(s: Storage, stored: torch.Tensor, load: Load) -> torch.Tensor:
    """The weight in float32, logical shape, exactly as the scheme defines it. `load(key)` reads a sibling."""
    import torch

    from loratool.maths.quant import block_dequantize, codebook_dequantize, int8_row_dequantize, unpack_nibbles

    if s.scheme == "fp8":
        return stored.to(torch.float32)
    if s.scheme == "gguf":
        return _gguf_dequantize(s, stored)
    if s.scheme == "fp8_scaled":
        scale = load(s.siblings["scale"]).to(torch.float32)
        if scale.numel() == 1:
            return stored.to(torch.float32) * scale.reshape(())
        return stored.to(torch.float32) * scale.reshape(-1, *([1] * (stored.dim() - 1)))
    if s.scheme == "fp8_block":
        scale = load(s.siblings["scale_inv"])
        if scale.numel() == 1:
            return stored.to(torch.float32) * scale.to(torch.float32).reshape(())
        return block_dequantize(stored, scale, (s.block[0], s.block[1]))
    if s.scheme in ("bnb_nf4", "bnb_fp4"):
        n = math.prod(s.shape)
        absmax = _bnb_absmax(s, load)
        codes = unpack_nibbles(stored)
        return codebook_dequantize(codes, absmax, load(s.siblings["quant_map"]), s.block[0], n).reshape(s.shape)
    if s.scheme == "bnb_int8":
        return int8_row_dequantize(stored, load(s.siblings["scb"]))
    if s.scheme == "mxfp4":
        return _mxfp4_dequantize(s, stored, load)
    if s.scheme == "comfy_fp8":
        return stored.to(torch.float32) * load(s.siblings["scale"]).to(torch.float32).reshape(())
    if s.scheme == "comfy_nvfp4":
        from loratool.maths.fp4 import from_blocked, nvfp4_dequantize, unpack_high_first

        rows, cols = s.shape
        block = from_blocked(load(s.siblings["scale"]), rows, cols // 16)
        return nvfp4_dequantize(unpack_high_first(stored), block, load(s.siblings["scale_2"]), "comfy")
    if s.scheme == "nvfp4":
        from loratool.maths.fp4 import nvfp4_dequantize, unpack_low_first

        return nvfp4_dequantize(unpack_low_first(stored), load(s.siblings["scale"]), load(s.siblings["global_scale"]),
                                s.params["layout"])
    raise IncompatibleError(f"'{s.key}': {s.scheme} cannot be dequantized")


def _bnb_absmax(s: Storage, load: Load) -> torch.Tensor:
    import torch

    from loratool.maths.quant import codebook_dequantize

    absmax = load(s.siblings["absmax"])
    if "nested_absmax" not in s.siblings:
        return absmax.to(torch.float32)
    nb = int(s.params.get("nested_blocksize", 256))
    offset = float(s.params.get("nested_offset", 0.0))
    nested = codebook_dequantize(absmax.reshape(-1).to(torch.int64), load(s.siblings["nested_absmax"]),
                                 load(s.siblings["nested_quant_map"]), nb, absmax.numel())
    return nested + offset


def quantize(s: Storage, w: torch.Tensor, load: Load, *, generator: torch.Generator | None = None
             ) -> dict[str, torch.Tensor]:
    """w (float32, logical shape) stored with s's scheme: the weight and every recomputed sibling.

    Kept fixed: ComfyUI's scale_weight, codebooks, the nested bnb offset and quant_state JSON. The
    generator (stochastic rounding) applies to the fp8 and fp4 (e2m1) schemes; the others round to nearest.
    """
    import torch

    from loratool.maths.quant import block_quantize_fp8, codebook_quantize, int8_row_quantize, pack_nibbles, round_fp8

    if s.scheme == "fp8":
        return {s.key: round_fp8(w, s.dtype, generator=generator)}
    if s.scheme == "gguf":
        return {s.key: _gguf_quantize(s, w)}
    if s.scheme == "fp8_scaled":
        scale = load(s.siblings["scale"]).to(torch.float32)
        scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *([1] * (w.dim() - 1)))
        return {s.key: round_fp8(w / scale, s.dtype, generator=generator)}
    if s.scheme == "fp8_block":
        scale_key = s.siblings["scale_inv"]
        old = load(scale_key)
        q, inv = block_quantize_fp8(w, (s.block[0], s.block[1]), s.dtype, pow2=bool(s.params.get("pow2")),
                                    generator=generator)
        return {s.key: q, scale_key: inv.reshape(old.shape).to(old.dtype)}
    if s.scheme in ("bnb_nf4", "bnb_fp4"):
        codes, absmax = codebook_quantize(w, load(s.siblings["quant_map"]), s.block[0])
        out = {s.key: pack_nibbles(codes).view(getattr(torch, s.dtype))}
        old_absmax = load(s.siblings["absmax"])
        if "nested_absmax" in s.siblings:
            nb = int(s.params.get("nested_blocksize", 256))
            offset = float(s.params.get("nested_offset", 0.0))
            ncodes, nabs = codebook_quantize(absmax - offset, load(s.siblings["nested_quant_map"]), nb)
            out[s.siblings["absmax"]] = ncodes.to(torch.uint8).reshape(old_absmax.shape)
            old_nested = load(s.siblings["nested_absmax"])
            out[s.siblings["nested_absmax"]] = nabs.reshape(old_nested.shape).to(old_nested.dtype)
        else:
            out[s.siblings["absmax"]] = absmax.reshape(old_absmax.shape).to(old_absmax.dtype)
        return out
    if s.scheme == "bnb_int8":
        q, scb = int8_row_quantize(w)
        old = load(s.siblings["scb"])
        return {s.key: q, s.siblings["scb"]: scb.reshape(old.shape).to(old.dtype)}
    if s.scheme == "mxfp4":
        return _mxfp4_quantize(s, w, generator)
    if s.scheme == "comfy_fp8":
        from loratool.maths.quant import tensor_fp8_quantize

        q, scale = tensor_fp8_quantize(w, s.dtype, generator=generator)
        old_scale = load(s.siblings["scale"])
        return {s.key: q, s.siblings["scale"]: scale.reshape(old_scale.shape).to(old_scale.dtype)}
    if s.scheme == "comfy_nvfp4":
        from loratool.maths.fp4 import E2M1_MAX, FP8_E4M3_MAX, nvfp4_quantize, pack_high_first, to_blocked

        amax = torch.maximum(w.amax(), -w.amin()).to(torch.float32)
        tensor_scale = amax / (FP8_E4M3_MAX * E2M1_MAX) if float(amax) > 0 else torch.tensor(1.0)  # recalculated
        codes, block = nvfp4_quantize(w, tensor_scale, "comfy", generator=generator)
        old_global = load(s.siblings["scale_2"])
        return {s.key: pack_high_first(codes), s.siblings["scale"]: to_blocked(block),
                s.siblings["scale_2"]: tensor_scale.reshape(old_global.shape)}
    if s.scheme == "nvfp4":
        from loratool.maths.fp4 import nvfp4_quantize, pack_low_first

        codes, scale = nvfp4_quantize(w, load(s.siblings["global_scale"]), s.params["layout"], generator=generator)
        return {s.key: pack_low_first(codes), s.siblings["scale"]: scale}
    raise IncompatibleError(f"'{s.key}': {s.scheme} cannot be quantized")


# ---------------------------------------------------------------------------------------------
# 4-bit float schemes (maths/fp4.py)


def _mxfp4_dequantize(s: Storage, stored: torch.Tensor, load: Load) -> torch.Tensor:
    from loratool.maths.fp4 import mxfp4_dequantize, unpack_low_first

    codes = unpack_low_first(stored)  # (E, rows, groups, 32)
    w = mxfp4_dequantize(codes.reshape(*codes.shape[:-2], -1), load(s.siblings["scales"]))  # (E, rows, k)
    return w.transpose(-1, -2).contiguous()  # transformers' (E, k, rows)


def _mxfp4_quantize(s: Storage, w: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    from loratool.maths.fp4 import mxfp4_quantize, pack_low_first

    codes, exps = mxfp4_quantize(w.transpose(-1, -2).contiguous(), generator=generator)  # (E, rows, k)
    e, rows, k = codes.shape
    return {s.key: pack_low_first(codes).reshape(e, rows, k // 32, 16), s.siblings["scales"]: exps}


def requantize(s: Storage, w: torch.Tensor, load: Load, *, generator: torch.Generator | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the stored tensors quantize() writes for w, what they read back as in float32).

    The read-back uses the recomputed siblings (scales, absmax) and `load` for the fixed ones: it
    is the value a loader sees, so W' − W measured on it is the change the storage really holds.
    """
    outs = quantize(s, w, load, generator=generator)
    return outs, dequantize(s, outs[s.key], lambda k: outs[k] if k in outs else load(k))


# ---------------------------------------------------------------------------------------------
# GGUF tensors: a descriptor per GGML type; the block maths is maths/ggml.py

GGUF_FLOATS = ("F32", "F16", "BF16")
GGUF_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def gguf_storage(key: str, ggml_type: str, shape: tuple[int, ...]) -> Storage:
    """The descriptor of a GGUF tensor of GGML type `ggml_type` (its name: "Q4_K", "F16", ...) and
    logical shape (numpy order, the last axis contiguous). Other types (the i-quants, TQ*, MXFP4, ...)
    are known but unsupported."""
    supported = ggml_type in GGUF_FLOATS + GGUF_QUANTS
    return Storage(key, "gguf" if supported else f"gguf {ggml_type}", ggml_type, tuple(shape), supported=supported)


def _gguf_dequantize(s: Storage, stored: torch.Tensor) -> torch.Tensor:
    """stored: whole rows as the file holds them (raw uint8 (rows, bytes per row) for the block types)."""
    import torch

    if s.dtype == "BF16" and stored.dtype in (torch.uint8, torch.int16, torch.uint16):
        stored = stored.contiguous().view(torch.bfloat16)
    if s.dtype in GGUF_FLOATS:
        return stored.to(torch.float32)
    from loratool.maths.ggml import dequantize as ggml_dequantize

    return torch.from_numpy(ggml_dequantize(s.dtype, stored.reshape(stored.shape[0], -1).numpy()))


def _gguf_quantize(s: Storage, w: torch.Tensor) -> torch.Tensor:
    """w float32 (rows, columns) -> the rows as stored: float of the GGML type, or raw uint8 blocks."""
    import torch

    if s.dtype in GGUF_FLOATS:
        return w.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[s.dtype])
    from loratool.maths.ggml import quantize as ggml_quantize

    return torch.from_numpy(ggml_quantize(s.dtype, w.reshape(w.shape[0], -1).contiguous().numpy()))
