"""ComfyUI mixed precision layers: the `<m>.comfy_quant` marker (uint8 JSON bytes) names each layer's
format; fp8 layers (comfy_fp8) and comfy-kitchen's swizzled nvfp4 (comfy_nvfp4) are supported, any
other format is refused by its name. Read before the NVFP4 rules: ComfyUI's nvfp4 uses ModelOpt's key
names with block scales in another layout."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loratool.storage.descriptor import FLOAT_DTYPES, Storage, read_json_tensor

if TYPE_CHECKING:
    from loratool.io.header import TensorInfo


_COMFY_FP8 = {"float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}  # comfy_quant format -> dtype


def comfy_quant(key: str, tensors: dict[str, TensorInfo], read_small: bool) -> Storage | None:
    """ComfyUI mixed precision: `<m>.comfy_quant` (uint8 JSON bytes, {"format": ...}) names the layer's
    scheme. fp8 formats (`<m>.weight` fp8, `<m>.weight_scale` float32 scalar, optionally
    `<m>.input_scale`) are supported: W = q · weight_scale; other formats (nvfp4's swizzled block scales,
    int8, mxfp8, ...) stay refused by name. None when `key` has no marker."""
    if not key.endswith(".weight") or key[: -len("weight")] + "comfy_quant" not in tensors:
        return None
    stem = key[: -len(".weight")]
    info, marker = tensors[key], tensors[stem + ".comfy_quant"]
    fmt = str(read_json_tensor(marker).get("format")) if read_small else info.dtype
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
