"""Quantized storage: exact dequantization to float32 and requantization with the same scheme, for
fp8 rounding (to nearest or stochastic) and block-scaled fp8, bitsandbytes' blockwise 4-bit codebooks
(NF4) with packed nibbles, and LLM.int8 rows. The descriptors that choose among
these live in loratool/storage/. No I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



NF4_CODE: tuple[float, ...] = (  # the 16 NormalFloat4 levels of QLoRA (bitsandbytes' quant_map for nf4)
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_INV127 = 7.874015718698502e-3  # bitsandbytes' float32 1/127 for LLM.int8 dequantization


def fp8_max(dtype: str) -> float:
    import torch

    return float(torch.finfo(getattr(torch, dtype)).max)


def round_fp8(x: torch.Tensor, dtype: str, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (float32) saturated to ±max and rounded to float8 `dtype`.

    Nearest (ties to even, torch's conversion) without a generator; with one, stochastic: each value
    goes to the fp8 neighbour above with probability (x − lo) / (hi − lo), so E[result] = x exactly.
    """
    import torch

    fdtype = getattr(torch, dtype)
    top = fp8_max(dtype)
    x = x.clamp(-top, top)
    if generator is None:
        return x.to(fdtype)
    mag = x.abs()
    near = mag.to(fdtype)  # a neighbour of |x|, bits 0..max (sign 0)
    bits = near.view(torch.uint8).to(torch.int16)
    near_val = near.to(torch.float32)
    above = near_val < mag
    below = near_val > mag
    other = torch.where(above, bits + 1, torch.where(below, bits - 1, bits)).to(torch.uint8)
    other_val = other.view(fdtype).to(torch.float32)
    lo = torch.where(above, near_val, other_val)
    hi = torch.where(above, other_val, near_val)
    gap = hi - lo
    p = torch.where(gap > 0, (mag - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    pick_hi = u < p
    chosen = torch.where(pick_hi, torch.where(above, other, bits.to(torch.uint8)),
                         torch.where(above, bits.to(torch.uint8), other))
    sign = (x < 0).to(torch.uint8) << 7
    return (chosen | sign).view(fdtype)


def _tiled(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x (rows, cols) as (rows/b0, b0, cols/b1, b1) tiles: a view when the blocks divide it, else zero-padded."""
    import torch

    rows, cols = x.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    if nr * br != rows or nc * bc != cols:
        x = torch.nn.functional.pad(x, (0, nc * bc - cols, 0, nr * br - rows))
    return x.reshape(nr, br, nc, bc)


def block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 W = q · scale per (block[0] × block[1]) tile; edge tiles may be partial. q is (out, in)."""
    import torch

    rows, cols = q.shape
    tiles = _tiled(q.to(torch.float32), block)
    tiles.mul_(scale.to(torch.float32)[:, None, :, None])
    return tiles.reshape(tiles.shape[0] * tiles.shape[1], -1)[:rows, :cols]


def block_quantize_fp8(w: torch.Tensor, block: tuple[int, int], dtype: str, *, pow2: bool = False,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale_inv) per tile as transformers' fine-grained fp8 quantizer computes them: scale =
    max · (1 / amax) (two float32 roundings, as torch evaluates `max / amax`), scale_inv = 1 / scale,
    q = clamp(w · scale) rounded to fp8; an all-zero tile keeps scale 1.
    pow2 rounds scale_inv up to a power of two first (scale_fmt "ue8m0")."""
    import torch

    rows, cols = w.shape
    tiles = _tiled(w, block)  # padding zeros change no tile's amax
    amax = torch.maximum(tiles.amax(dim=(1, 3)), -tiles.amin(dim=(1, 3)))  # (nr, nc), without an |w| copy
    top = fp8_max(dtype)
    scale = torch.where(amax > 0, top * torch.reciprocal(torch.where(amax > 0, amax, torch.ones_like(amax))),
                        torch.ones_like(amax))
    inv = 1.0 / scale
    if pow2:
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scale = 1.0 / inv
    scaled = (tiles * scale[:, None, :, None]).reshape(tiles.shape[0] * tiles.shape[1], -1)[:rows, :cols]
    return round_fp8(scaled, dtype, generator=generator), inv.to(torch.float32)


def codebook_dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                        numel: int) -> torch.Tensor:
    """Flat float32 values code[codes[i]] · absmax[i // blocksize] for i < numel (bitsandbytes blockwise)."""
    import torch

    vals = code.to(torch.float32)[codes[:numel].to(torch.int64)]
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:numel]
    return vals * scale


def codebook_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 (numel,), absmax float32 (blocks,)) for flat x: per block absmax, then the nearest
    level of the sorted-or-not codebook to x / absmax (clamped to [-1, 1]); ties go to the lower level,
    as bitsandbytes' bucketize over the midpoints does."""
    import torch

    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = -(-n // blocksize)
    pad = torch.nn.functional.pad(flat, (0, blocks * blocksize - n))
    absmax = pad.abs().reshape(blocks, blocksize).amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (pad.reshape(blocks, blocksize) * inv[:, None]).clamp(-1, 1).reshape(-1)[:n]
    levels = code.to(torch.float32)
    order = torch.argsort(levels, stable=True)
    ordered = levels[order]
    bounds = (ordered[:-1] + ordered[1:]) / 2
    idx = torch.bucketize(scaled, bounds)
    return order[idx], absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (first of each pair in the high nibble, bitsandbytes' order) -> (ceil(n/2), 1) uint8."""
    import torch

    c = codes.to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> int64 codes, two per byte, high nibble first."""
    import torch

    b = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    return torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)


def int8_row_dequantize(q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 weights: W = q · SCB_row / 127 (bitsandbytes' vectorwise dequantization)."""
    import torch

    return q.to(torch.float32) * scb.to(torch.float32).reshape(-1, 1) * _INV127


def int8_row_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, SCB float32): SCB = row absmax, q = round(w · 127 / SCB) (half to even)."""
    import torch

    scb = w.abs().amax(dim=1).to(torch.float32)
    q = torch.round(w * (127.0 / scb.reshape(-1, 1))).nan_to_num(0.0).clamp(-127, 127).to(torch.int8)
    return q, scb


def nf4_roundtrip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """dequant(quant_nf4(w)) in float32, as a QLoRA adapter saw its frozen base (absmax per block, float32)."""
    import torch

    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    codes, absmax = codebook_quantize(w, code, blocksize)
    return codebook_dequantize(codes, absmax, code, blocksize, w.numel()).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# compressed-tensors integer weights (pack-quantized): W = (q − zp) · scale per channel, group or tensor


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed `bits`-bit integers (rows, cols) -> int32 (rows, ceil(cols·bits/32)), compressed-tensors'
    dense packing: q + 2^(bits−1) (unsigned), 32 values per `bits` words, value i at bit i·bits of its
    row's stream, low bits first, a value split across two words where it crosses one."""
    import torch

    rows, cols = q.shape
    v = q.to(torch.int64) + (1 << (bits - 1))
    pad = -cols % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    start = torch.arange(v.shape[1], dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    words = torch.zeros(rows, v.shape[1] * bits // 32 + 1, dtype=torch.int64)
    words.index_add_(1, word, (v << off) & 0xFFFFFFFF)
    spill = off + bits > 32
    if bool(spill.any()):
        words.index_add_(1, word[spill] + 1, v[:, spill] >> (32 - off[spill]))
    words = words[:, : -(-cols * bits // 32)]
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)  # two's complement, as int32 holds it


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """pack_int32's inverse: int32 (rows, words) -> signed int64 values (rows, cols)."""
    import torch

    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    v = (w[:, word] >> off) | (w[:, word + 1] << (32 - off))
    return (v & ((1 << bits) - 1)) - (1 << (bits - 1))


def _per_column(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A (rows, groups) scale or zero point, (1,) for a tensor, (rows, 1) for channels, spread over columns."""
    t = t.reshape(1, 1) if t.numel() == 1 else t.reshape(rows, -1)
    return t.repeat_interleave(cols // t.shape[1], dim=1) if t.shape[1] > 1 else t


def int_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """compressed-tensors' W = (q − zp) · scale, rounded to the scale's dtype as its dequantize rounds
    it, in float32. q (rows, cols); scale and zero (rows, groups), (rows, 1) or one value."""
    import torch

    rows, cols = q.shape
    x = q.to(torch.float32)
    if zero is not None:
        x = x - _per_column(zero.to(torch.float32), rows, cols)
    return (x * _per_column(scale.to(torch.float32), rows, cols)).to(scale.dtype).to(torch.float32)


def int_quantize(w: torch.Tensor, bits: int, groups: int, scale_dtype: torch.dtype, *, symmetric: bool,
                 per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int8 (rows, cols), scale (rows, groups) in scale_dtype, zero int8 or None) for w (float32), as
    compressed-tensors' min-max observer and calculate_qparams make them: min and max per group (0
    always inside), symmetric scale = max|·| / ((2^bits − 1) / 2), asymmetric scale = (max − min) /
    (2^bits − 1) and zp = round(clamp(−2^(bits−1) − min / scale)); a zero scale becomes float32's eps;
    the scale is stored in scale_dtype, and q = round(clamp(w / stored scale + zp)) (half to even)."""
    import torch

    rows, cols = w.shape
    g = w.reshape(1, 1, -1) if per_tensor else w.reshape(rows, groups, cols // groups)
    lo = torch.clamp(g.amin(dim=-1), max=0.0)
    hi = torch.clamp(g.amax(dim=-1), min=0.0)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    span = float((1 << bits) - 1)
    zero: torch.Tensor | None = None
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / (span / 2)
    else:
        scale = (hi - lo) / span
        zero = torch.round(torch.clamp(qmin - lo / scale, qmin, qmax).clamp(-128, 127)).to(torch.int8)
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale).to(scale_dtype)
    x = w / _per_column(scale, rows, cols).to(torch.float32)
    if zero is not None:
        x = x + _per_column(zero.to(torch.float32), rows, cols)
    q = torch.round(torch.clamp(x, qmin, qmax)).to(torch.int8)
    return q, (scale.reshape(1) if per_tensor else scale), (zero.reshape(1) if per_tensor and zero is not None
                                                               else zero)


# ---------------------------------------------------------------------------------------------
# per-tensor fp8 with a recomputed scale (ComfyUI comfy_quant "float8_e4m3fn" / "float8_e5m2")


def tensor_fp8_quantize(w: torch.Tensor, dtype: str, *, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale float32 0-d) as ComfyUI requantizes a patched layer (scale="recalculate"):
    scale = amax / max, q = w · (1 / scale) saturated and rounded to fp8; an all-zero tensor keeps scale 1."""
    import torch

    amax = torch.maximum(w.amax(), -w.amin()).to(torch.float32) if w.numel() else torch.tensor(0.0)
    scale = amax / fp8_max(dtype) if float(amax) > 0 else torch.tensor(1.0)
    return round_fp8(w * (1.0 / scale), dtype, generator=generator), scale.reshape(())
