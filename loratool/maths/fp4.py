"""4-bit float (e2m1) storage: exact dequantization to float32 and requantization, for the OCP
microscaling MXFP4 scheme (32 values share one e8m0 power-of-two scale) and NVIDIA's NVFP4 (16
values share one fp8 e4m3 scale, under one float32 scale per tensor). The descriptors that choose
among these live in loratool/storage/. No I/O.

e2m1 codes: bit 3 is the sign, bits 0..2 index E2M1_LEVELS; a value that rounds to zero is +0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

E2M1_LEVELS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the magnitudes, codes 0..7
E2M1_MAX = 6.0
MX_BLOCK = 32  # OCP MX: values per shared e8m0 scale
E8M0_BIAS = 127


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of 4-bit codes (any integer dtype, values 0..15)."""
    import torch

    lut = torch.tensor([*E2M1_LEVELS, *(-v for v in E2M1_LEVELS)], dtype=torch.float32, device=codes.device)
    return lut[codes.to(torch.int64)]


def e2m1_round(x: torch.Tensor, *, ties: str = "down", signed_zero: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 codes of x (float32, already divided by its scale), saturated to ±6.

    Nearest: a value halfway between two levels goes to the smaller magnitude with ties="down"
    (gguf's and llama.cpp's argmin over the level table) or to the even code with ties="even"
    (NVFP4's quantizers: ModelOpt, compressed-tensors). With a generator, stochastic: the level
    above |x| with probability (|x| − lo) / (hi − lo), so the expectation is x (up to the ±6
    saturation). signed_zero: a negative value that rounds to zero keeps its sign bit (code 8), as
    the NVFP4 quantizers write it; otherwise it is +0 (gguf).
    """
    import torch

    levels = torch.tensor(E2M1_LEVELS, dtype=torch.float32, device=x.device)
    mag = x.abs().clamp(max=E2M1_MAX)
    if generator is not None:
        lo = (torch.bucketize(mag, levels, right=True) - 1).clamp(0, len(E2M1_LEVELS) - 1)
        hi = (lo + 1).clamp(max=len(E2M1_LEVELS) - 1)
        gap = levels[hi] - levels[lo]
        p = torch.where(gap > 0, (mag - levels[lo]) / torch.where(gap > 0, gap, torch.ones_like(gap)),
                        torch.zeros_like(gap))
        u = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        idx = torch.where(u < p, hi, lo)
    else:
        mids = (levels[:-1] + levels[1:]) / 2
        idx = torch.bucketize(mag, mids, right=False)  # a tie (== mid) stays below
        if ties == "even":  # halfway between level idx (odd) and idx + 1: the even code
            tie = (idx < len(mids)) & (mag == mids[idx.clamp(max=len(mids) - 1)]) & (idx % 2 == 1)
            idx = torch.where(tie, idx + 1, idx)
    sign = ((x < 0) & ((idx > 0) | signed_zero)).to(torch.uint8) << 3
    return idx.to(torch.uint8) | sign


def e8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The biased e8m0 scale (int32) of each block's amax, as OCP MX defines it and gguf's MXFP4
    quantizer computes it: floor(log2(amax)) − 2 (e2m1's largest exponent) + 127; 0 for a zero block."""
    import torch

    _, e = torch.frexp(amax)  # amax = m · 2^e, m in [0.5, 1): floor(log2 amax) = e − 1
    biased = (e.to(torch.int32) - 1) - 2 + E8M0_BIAS
    return torch.where(amax > 0, biased.clamp(0, 254), torch.zeros_like(biased))


def mxfp4_quantize(w: torch.Tensor, *, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (..., n), scales uint8 (..., n / 32)) of float32 w (..., n) in MXFP4 blocks of 32
    along the last dimension: the e8m0 scale from each block's amax, then each value w / 2^(e − 127)
    rounded to e2m1 (nearest, ties to the smaller magnitude, as gguf.quants.MXFP4)."""
    import torch

    *lead, n = w.shape
    blocks = w.reshape(*lead, n // MX_BLOCK, MX_BLOCK)
    amax = torch.maximum(blocks.amax(dim=-1), -blocks.amin(dim=-1))
    e = e8m0_exponent(amax)
    scaled = torch.ldexp(blocks, (E8M0_BIAS - e).unsqueeze(-1).to(torch.float32))
    codes = e2m1_round(scaled, generator=generator)
    return codes.reshape(*lead, n), e.to(torch.uint8)


def mxfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (..., n) values of codes (..., n) with e8m0 scales (..., n / 32): v · 2^(e − 127)."""
    import torch

    *lead, n = codes.shape
    vals = e2m1_decode(codes).reshape(*lead, n // MX_BLOCK, MX_BLOCK)
    exp = (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1).to(torch.float32)
    return torch.ldexp(vals, exp).reshape(*lead, n)


def pack_low_first(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (..., n) -> uint8 (..., n / 2), code 2j in the low nibble of byte j (gpt-oss, NVFP4)."""
    import torch

    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_low_first(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., m) -> uint8 codes (..., 2m), the low nibble of each byte first."""
    import torch

    b = packed.view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)



NV_BLOCK = 16  # NVFP4: values per fp8 e4m3 scale
FP8_E4M3_MAX = 448.0


def nvfp4_effective_scale(block_scale: torch.Tensor, global_scale: torch.Tensor, layout: str) -> torch.Tensor:
    """float32 scale of each 16-value block: the fp8 block scale with the tensor's float32 scale, one
    rounding: compressed-tensors stores the global scale as a multiplier (s / g), ModelOpt its
    `weight_scale_2` as a factor (s · s2)."""
    import torch

    s = block_scale.to(torch.float32)
    g = global_scale.to(torch.float32).reshape(())
    return s / g if layout == "compressed-tensors" else s * g


def nvfp4_dequantize(codes: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     layout: str) -> torch.Tensor:
    """float32 (rows, cols) values of codes (rows, cols) with fp8 block scales (rows, cols / 16)."""
    rows, cols = codes.shape
    eff = nvfp4_effective_scale(block_scale, global_scale, layout).reshape(rows, cols // NV_BLOCK, 1)
    return (e2m1_decode(codes).reshape(rows, cols // NV_BLOCK, NV_BLOCK) * eff).reshape(rows, cols)


def nvfp4_quantize(w: torch.Tensor, global_scale: torch.Tensor, layout: str, *,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (rows, cols), block scales float8_e4m3fn (rows, cols / 16)) of float32 w with the
    tensor's global scale kept, the block scales recomputed from the data as each quantizer does:

    compressed-tensors (calculate_qparams with a global scale g): s = g · (amax / 6), saturated to
        ±448 and rounded to fp8; a zero scale becomes fp8's eps 0.125;
    ModelOpt (NVFP4QTensor.quantize with weights_scaling_factor_2 s2): s = amax / (6 · s2) rounded to
        fp8 (saturated at 448, where ModelOpt would overflow); a zero scale becomes 1;
    comfy (comfy-kitchen's quantize_nvfp4 with per-tensor scale g): s = (amax / 6) / g saturated at 448,
        rounded to fp8; a zero block keeps scale 0 and codes 0.

    Then each value x / eff (eff = nvfp4_effective_scale) is rounded to e2m1, ties to the even code,
    a negative value rounding to zero keeping its sign (both quantizers).
    """
    import torch

    rows, cols = w.shape
    blocks = w.reshape(rows, cols // NV_BLOCK, NV_BLOCK)
    amax = torch.maximum(blocks.amax(dim=-1), -blocks.amin(dim=-1))
    g = global_scale.to(torch.float32).reshape(())
    if layout == "compressed-tensors":
        s = (g * (amax / E2M1_MAX)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        s = torch.where(s.to(torch.float32) == 0, torch.tensor(0.125), s.to(torch.float32)).to(torch.float8_e4m3fn)
    elif layout == "comfy":  # comfy-kitchen's quantize_nvfp4: (amax / 6) / g, saturated; a zero block stays 0
        s = ((amax / E2M1_MAX) / g).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    else:
        s = amax / (E2M1_MAX * g)
        s = torch.where(s == 0, torch.ones_like(s), s).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    eff = nvfp4_effective_scale(s, global_scale, layout).unsqueeze(-1)
    scaled = torch.where(eff > 0, blocks / torch.where(eff > 0, eff, torch.ones_like(eff)), 0.0).reshape(rows, cols)
    return e2m1_round(scaled, ties="even", signed_zero=True, generator=generator), s


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """(rows, cols) block scales in cuBLAS's swizzled layout (ComfyUI's stored nvfp4 `weight_scale`):
    padded with zeros to (⌈rows/128⌉·128, ⌈cols/4⌉·4), tiles of 128 × 4 row-major, the byte of (r, c)
    inside a tile at (r % 32) · 16 + (r // 32) · 4 + c % 4; returned in the padded 2-D shape."""
    import torch

    rows, cols = scales.shape
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = torch.zeros((rp, cp), dtype=scales.dtype, device=scales.device)
    padded[:rows, :cols] = scales
    tiles = padded.reshape(rp // 128, 128, cp // 4, 4).permute(0, 2, 1, 3)  # (tr, tc, 128, 4)
    inner = tiles.reshape(rp // 128, cp // 4, 4, 32, 4).transpose(2, 3)  # row r = 32 · (r // 32) + r % 32
    return inner.reshape(rp, cp).contiguous()


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of to_blocked: the (rows, cols) scales of a swizzled tensor."""
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    inner = blocked.reshape(rp // 128, cp // 4, 32, 4, 4).transpose(2, 3)  # (tr, tc, 4, 32, 4)
    return inner.reshape(rp // 128, cp // 4, 128, 4).permute(0, 2, 1, 3).reshape(rp, cp)[:rows, :cols]


def pack_high_first(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (..., n) -> uint8 (..., n / 2), code 2j in the high nibble of byte j (comfy-kitchen)."""
    return pack_low_first(codes.reshape(*codes.shape[:-1], -1, 2).flip(-1).reshape(codes.shape))


def unpack_high_first(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., m) -> uint8 codes (..., 2m), the high nibble of each byte first."""
    codes = unpack_low_first(packed)
    return codes.reshape(*codes.shape[:-1], -1, 2).flip(-1).reshape(codes.shape)
