"""A weight's dequantization and requantization by its storage descriptor: one dispatch per scheme
to the maths (maths/quant.py, maths/fp4.py, maths/ggml.py) and the scheme modules beside this one
(compressed.py, fp4.py, gguf.py). Dequantization is exact (float32); quantize() writes the same
scheme back, recomputing the scales the scheme computes from the data and keeping the fixed ones."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loratool.errors import IncompatibleError
from loratool.storage.compressed import dequantize_ct, quantize_ct
from loratool.storage.descriptor import Load, Storage
from loratool.storage.fp4 import dequantize_mxfp4, quantize_mxfp4
from loratool.storage.gguf import dequantize_gguf, quantize_gguf

if TYPE_CHECKING:
    import torch


def dequantize(s: Storage, stored: torch.Tensor, load: Load) -> torch.Tensor:
    """The weight in float32, logical shape, exactly as the scheme defines it. `load(key)` reads a sibling."""
    import torch

    from loratool.maths.quant import block_dequantize, codebook_dequantize, int8_row_dequantize, unpack_nibbles

    if s.scheme == "fp8":
        return stored.to(torch.float32)
    if s.scheme == "gguf":
        return dequantize_gguf(s, stored)
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
    if s.scheme == "ct_int":
        return dequantize_ct(s, stored, load)
    if s.scheme == "mxfp4":
        return dequantize_mxfp4(s, stored, load)
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
        return {s.key: quantize_gguf(s, w)}
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
    if s.scheme == "ct_int":
        return quantize_ct(s, w, load)
    if s.scheme == "mxfp4":
        return quantize_mxfp4(s, w, generator)
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


def requantize(s: Storage, w: torch.Tensor, load: Load, *, generator: torch.Generator | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the stored tensors quantize() writes for w, what they read back as in float32).

    The read-back uses the recomputed siblings (scales, absmax) and `load` for the fixed ones: it
    is the value a loader sees, so W' − W measured on it is the change the storage really holds.
    """
    outs = quantize(s, w, load, generator=generator)
    return outs, dequantize(s, outs[s.key], lambda k: outs[k] if k in outs else load(k))
