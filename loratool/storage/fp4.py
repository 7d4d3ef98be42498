"""The 4-bit float schemes' descriptors: gpt-oss's MXFP4 expert parameters (`<p>_blocks` /
`<p>_scales`, read as transformers' transposed `<p>`) and NVFP4 in compressed-tensors' and ModelOpt's
layouts, with MXFP4's (de)quantization through that transpose. The e2m1 and scale maths is
maths/fp4.py's; ComfyUI's nvfp4 layout is storage/comfy.py's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loratool.storage.descriptor import Load, Storage

if TYPE_CHECKING:
    import torch

    from loratool.io.header import TensorInfo


def mxfp4_blocks(key: str, info: TensorInfo, scales: TensorInfo) -> Storage:
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


def nvfp4_storage(key: str, tensors: dict[str, TensorInfo]) -> Storage | None:
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


def dequantize_mxfp4(s: Storage, stored: torch.Tensor, load: Load) -> torch.Tensor:
    from loratool.maths.fp4 import mxfp4_dequantize, unpack_low_first

    codes = unpack_low_first(stored)  # (E, rows, groups, 32)
    w = mxfp4_dequantize(codes.reshape(*codes.shape[:-2], -1), load(s.siblings["scales"]))  # (E, rows, k)
    return w.transpose(-1, -2).contiguous()  # transformers' (E, k, rows)


def quantize_mxfp4(s: Storage, w: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    from loratool.maths.fp4 import mxfp4_quantize, pack_low_first

    codes, exps = mxfp4_quantize(w.transpose(-1, -2).contiguous(), generator=generator)  # (E, rows, k)
    e, rows, k = codes.shape
    return {s.key: pack_low_first(codes).reshape(e, rows, k // 32, 16), s.siblings["scales"]: exps}
