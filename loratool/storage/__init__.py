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
    ct_int      compressed-tensors integers (config.json quant_method "compressed-tensors"): format
                "pack-quantized", `<m>.weight_packed` int32 (dense packing, maths.quant.pack_int32) and
                `<m>.weight_shape`, or "int-quantized" (W8A8), `<m>.weight` int8; `<m>.weight_scale` and,
                asymmetric, `<m>.weight_zero_point` (packed along rows where the weight is) per group, channel
                or tensor: W = (q − zp) · scale. A packed weight's key is `<m>.weight_packed`; a merge plans
                against `<m>.weight` (Storage.name, BaseStorage.stored_keys). GPTQ act-order
                (`weight_g_idx`) is refused.

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

Everything else that is recognisably quantized (GPTQ, AWQ, HQQ, EXL2, other compressed-tensors,
fp8 with a `weight_scale`, ...) is "known but unsupported": merge refuses it up front, never passing
the delta through wrong. Dequantization is exact (float32); quantize() writes the same scheme back,
block sizes kept, scales recomputed from the data where the scheme computes them (block fp8 tiles,
bnb absmax, int8 SCB) and kept where they are fixed (ComfyUI scale_weight, the nested bnb offset,
codebooks). The maths is in maths/quant.py, maths/fp4.py and maths/ggml.py; this package only decides
which of it applies, and reads only headers plus the few-byte bnb quant_state / comfy_quant JSON.

The package: descriptor.py (Storage, BaseStorage), this module (detect: the rules that name a
scheme), compressed.py (ct_int), fp4.py (mxfp4, nvfp4), comfy.py (comfy_quant), gguf.py (GGUF
types), codec.py (dequantize / quantize / requantize) and rows.py (row blocks). Every public name is
imported from here: `from loratool.storage import detect, Storage, ...`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.storage.codec import dequantize, quantize, requantize
from loratool.storage.comfy import comfy_quant
from loratool.storage.compressed import compressed_int
from loratool.storage.descriptor import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    SUPPORTED,
    BaseStorage,
    Load,
    Storage,
    read_json_tensor,
)
from loratool.storage.fp4 import mxfp4_blocks, nvfp4_storage
from loratool.storage.gguf import GGUF_FLOATS, GGUF_QUANTS, gguf_storage
from loratool.storage.rows import RowBlocks, block_rows, row_blocks

if TYPE_CHECKING:
    from loratool.io.checkpoint import Checkpoint
    from loratool.io.header import TensorInfo

__all__ = ["FLOAT_DTYPES", "FP8_DTYPES", "GGUF_FLOATS", "GGUF_QUANTS", "SUPPORTED", "BaseStorage", "Load", "RowBlocks",
           "Storage", "block_rows", "dequantize", "detect", "gguf_storage", "quantize", "requantize", "row_blocks"]

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


def model_config(root: Path) -> dict[str, Any] | None:
    """config.json beside a checkpoint, or None where there is none or it is not a readable JSON object
    (a link out of the folder, a FIFO, an absurd size or nesting: read_side_file's bounds)."""
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
    cfg = model_config(ckpt.root)
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
                params: dict[str, Any] = read_json_tensor(tensors[qs]) if read_small else {}
                shape = tuple(int(d) for d in params.get("shape", ())) or info.shape
                block = (int(params.get("blocksize", 64)),)
                ok = "absmax" in sib and "quant_map" in sib and (
                    ("nested_absmax" in sib) == ("nested_quant_map" in sib))
                add(Storage(key, f"bnb_{qt}" if ok else f"bnb_{qt} (incomplete quant_state)", info.dtype, shape,
                            sib, block, params, supported=ok))
        if key in base.tensors:
            continue
        # the comfy_quant marker first: ComfyUI's nvfp4 has ModelOpt's key names but swizzled block scales
        nv = comfy_quant(key, tensors, read_small) or nvfp4_storage(key, tensors)
        if nv is not None:
            add(nv)
            continue
        stem = key[: -len(".weight")] if key.endswith(".weight") else None
        if method == "compressed-tensors" and (key.endswith(".weight_packed") or (
                stem is not None and info.dtype == "int8" and stem + ".weight_scale" in tensors)):
            add(compressed_int(key, tensors, qcfg or {}, read_small=read_small))
            continue
        if stem is None:
            packed = next((v for k, v in _UNSUPPORTED_WEIGHTS.items() if key.endswith(k)), None)
            if packed is None and key.endswith("_blocks") and key[: -len("_blocks")] + "_scales" in tensors:
                add(mxfp4_blocks(key, info, tensors[key[: -len("_blocks")] + "_scales"]))
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
