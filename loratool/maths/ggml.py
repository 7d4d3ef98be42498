"""GGML block quantization (the GGUF tensor types of llama.cpp and the image-model GGUF files): exact
dequantization to float32 and requantization the way ggml's reference quantizers do it, bit for bit,
for the legacy types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Rows are flat: `raw` is uint8 (rows, bytes per row), values float32 (rows, columns), a row a whole
number of blocks (ggml requires it). The K-quant scale searches (ggml-quants.c make_qx_quants,
make_q3_quants, make_qkx2_quants) are iterative and summed in a fixed order; they run here over all
sub-blocks at once, element by element, so every sum is formed in the reference's sequential order
and every product in float32, as the C code does without fused multiply-adds. Half floats round to
nearest even (numpy's float16 cast, GGML_FP32_TO_FP16). No I/O; numpy only (imported by callers
inside functions, so it costs nothing at start-up).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# type name -> (values per block, bytes per block)
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
_F32 = np.float32
_EPS = _F32(1e-15)  # ggml's GROUP_MAX_EPS: a group with a smaller max |x| is all zero
Arr = Any  # numpy arrays (numpy's own stubs type the maths poorly at this level)


def _f16(raw: Arr) -> Arr:
    """Two bytes per entry (…, 2) -> float32 (…, 1)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(_F32)


def _to_f16(x: Arr) -> Arr:
    """float32 (…) -> its half float's two bytes (…, 2), rounded to nearest even."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def _nearest(x: Arr) -> Arr:
    """ggml's nearest_int (x + 1.5·2^23 in float32): round half to even, as int32."""
    return np.rint(x).astype(np.int32)


def _seq_sum(terms: Arr) -> Arr:
    """Σ over axis 0 in order, term by term (the reference's loop), float32."""
    acc = terms[0].copy()
    for t in terms[1:]:
        acc += t
    return acc


def _blocks(qtype: str, x: Arr) -> Arr:
    size = GGML_BLOCKS[qtype][0]
    if x.shape[-1] % size:
        raise ValueError(f"{qtype}: a row of {x.shape[-1]} values is not a whole number of {size}-value blocks")
    return np.ascontiguousarray(x, dtype=_F32).reshape(-1, size)


def dequantize(qtype: str, raw: Arr) -> Arr:
    """float32 (rows, columns) of the blocks in raw uint8 (rows, bytes per row) of GGML type qtype."""
    nbytes = GGML_BLOCKS[qtype][1]
    rows = raw.shape[0] if raw.ndim > 1 else 1
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)
    out = _DEQUANT[qtype](b)
    return out.reshape(rows, -1)


def quantize(qtype: str, x: Arr) -> Arr:
    """uint8 (rows, bytes per row): float32 x (rows, columns) in GGML type qtype, as ggml's reference
    quantizer (quantize_row_<type>_ref) writes it."""
    rows = x.shape[0] if x.ndim > 1 else 1
    return _QUANT[qtype](_blocks(qtype, x)).reshape(rows, -1)


# ---------------------------------------------------------------------------------------------
# legacy types: one scale (and a minimum for _1) per 32 values

def _nibbles(qs: Arr) -> Arr:
    """(n, 16) bytes -> (n, 32) codes: the low nibbles are values 0..15, the high ones 16..31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _pack_nibbles(q: Arr) -> Arr:
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(qh: Arr) -> Arr:
    """(n, 4) bytes, a little-endian uint32 whose bit j is value j's fifth bit -> (n, 32) 0/16."""
    word = np.ascontiguousarray(qh).view("<u4")  # (n, 1)
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _pack_high_bits(q: Arr) -> Arr:
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").reshape(-1, 1).view(np.uint8)


def _absmax_signed(x: Arr) -> Arr:
    """The value of the largest |x| per row, the first one on a tie."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)


def _trunc_u8(v: Arr) -> Arr:
    return np.trunc(v).astype(np.int32)  # (int8_t) / (uint8_t) of a non-negative float: truncation


def _q4_0(x: Arr) -> Arr:
    d = _absmax_signed(x) / _F32(-8)
    inv = np.where(d != 0, _F32(1) / np.where(d != 0, d, _F32(1)), _F32(0)).astype(_F32)
    q = np.minimum(15, _trunc_u8(x * inv + _F32(8.5)))
    return np.concatenate([_to_f16(d[:, 0]), _pack_nibbles(q)], axis=1)


def _q4_1(x: Arr) -> Arr:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / _F32(15)
    inv = np.where(d != 0, _F32(1) / np.where(d != 0, d, _F32(1)), _F32(0)).astype(_F32)
    q = np.minimum(15, _trunc_u8((x - lo) * inv + _F32(0.5)))
    return np.concatenate([_to_f16(d[:, 0]), _to_f16(lo[:, 0]), _pack_nibbles(q)], axis=1)


def _q5_0(x: Arr) -> Arr:
    d = _absmax_signed(x) / _F32(-16)
    inv = np.where(d != 0, _F32(1) / np.where(d != 0, d, _F32(1)), _F32(0)).astype(_F32)
    q = np.minimum(31, _trunc_u8(x * inv + _F32(16.5)))
    return np.concatenate([_to_f16(d[:, 0]), _pack_high_bits(q), _pack_nibbles(q & 0xF)], axis=1)


def _q5_1(x: Arr) -> Arr:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / _F32(31)
    inv = np.where(d != 0, _F32(1) / np.where(d != 0, d, _F32(1)), _F32(0)).astype(_F32)
    q = _trunc_u8((x - lo) * inv + _F32(0.5)) & 0xFF  # (uint8_t), no clamp in the reference
    return np.concatenate([_to_f16(d[:, 0]), _to_f16(lo[:, 0]), _pack_high_bits(q), _pack_nibbles(q & 0xF)],
                          axis=1)


def _q8_0(x: Arr) -> Arr:
    d = np.abs(x).max(axis=1, keepdims=True) / _F32(127)
    inv = np.where(d != 0, _F32(1) / np.where(d != 0, d, _F32(1)), _F32(0)).astype(_F32)
    v = x * inv
    t = np.trunc(v)
    q = (t + np.sign(v) * (np.abs(v - t) >= _F32(0.5))).astype(np.int8)  # roundf: half away from zero
    return np.concatenate([_to_f16(d[:, 0]), q.view(np.uint8)], axis=1)


def _dq4_0(b: Arr) -> Arr:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).astype(_F32) - _F32(8))


def _dq4_1(b: Arr) -> Arr:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).astype(_F32) + _f16(b[:, 2:4])


def _dq5_0(b: Arr) -> Arr:
    q = _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])
    return _f16(b[:, :2]) * (q.astype(_F32) - _F32(16))


def _dq5_1(b: Arr) -> Arr:
    q = _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])
    return _f16(b[:, :2]) * q.astype(_F32) + _f16(b[:, 2:4])


def _dq8_0(b: Arr) -> Arr:
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(_F32)


# ---------------------------------------------------------------------------------------------
# the K-quant scale searches, over sub-blocks: X is (n, groups), X[i] the i-th value of every group


def _make_qx_quants(X: Arr, nmax: int) -> tuple[Arr, Arr]:
    """(scale (groups,), L (n, groups) in 0..2·nmax-1): make_qx_quants with rmse_type 1, no weights."""
    g = X.shape[1]
    amax_i = np.abs(X).argmax(axis=0)
    mx = X[amax_i, np.arange(g)]
    zero = np.abs(mx) < _EPS
    safe = np.where(zero, _F32(1), mx)
    W = X * X

    def levels(iscale: Arr) -> Arr:
        return np.clip(_nearest(iscale * X), -nmax, nmax - 1)

    def sums(lv: Arr) -> tuple[Arr, Arr]:
        lf = lv.astype(_F32)
        return _seq_sum(W * X * lf), _seq_sum(W * lf * lf)

    iscale = _F32(-nmax) / safe
    L = levels(iscale)
    sumlx, suml2 = sums(L)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F32(nmax) + _F32(0.1) * _F32(step)) / safe
        lv = levels(iscale)
        slx, sl2 = sums(lv)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        if take.any():
            L = np.where(take, lv, L)
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.where(take, slx / sl2, scale).astype(_F32)
            best = np.where(take, scale * slx, best).astype(_F32)
    L = np.where(zero, 0, L + nmax)
    return np.where(zero, _F32(0), scale).astype(_F32), L


def _make_q3_quants(X: Arr, nmax: int) -> tuple[Arr, Arr]:
    """(scale, L in 0..2·nmax-1): make_q3_quants with do_rmse (five passes of one-value changes)."""
    n, g = X.shape
    mx = X[np.abs(X).argmax(axis=0), np.arange(g)]
    zero = np.abs(mx) < _EPS
    iscale = _F32(-nmax) / np.where(zero, _F32(1), mx)
    L = np.clip(_nearest(iscale * X), -nmax, nmax - 1)
    W = X * X
    WX = W * X
    sumlx = _seq_sum(WX * L.astype(_F32))
    suml2 = _seq_sum(W * L.astype(_F32) * L.astype(_F32))
    active = ~zero
    for _ in range(5):
        changed = np.zeros(g, dtype=bool)
        for i in range(n):
            li = L[i].astype(_F32)
            slx = sumlx - WX[i] * li
            ok = active & (slx > 0)
            sl2 = suml2 - W[i] * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(_nearest(np.where(ok, X[i] * sl2 / np.where(ok, slx, _F32(1)), _F32(0))),
                              -nmax, nmax - 1)
            ok &= new != L[i]
            nf = new.astype(_F32)
            slx2 = slx + WX[i] * nf
            sl22 = sl2 + W[i] * nf * nf
            ok &= (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(ok, new, L[i])
            sumlx = np.where(ok, slx2, sumlx).astype(_F32)
            suml2 = np.where(ok, sl22, suml2).astype(_F32)
            changed |= ok
        active &= changed
        if not active.any():
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0)).astype(_F32)
    return np.where(zero, _F32(0), scale).astype(_F32), np.where(zero, 0, L + nmax)


def _make_qkx2_quants(X: Arr, Wt: Arr, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool
                      ) -> tuple[Arr, Arr, Arr]:
    """(scale, -min, L in 0..nmax) per group: make_qkx2_quants (a scale and a minimum, weighted error)."""
    lo = X.min(axis=0)
    hi = X.max(axis=0)
    sum_w = _seq_sum(Wt)
    sum_x = _seq_sum(Wt * X)
    lo = np.minimum(lo, _F32(0))
    flat = hi == lo
    span = np.where(flat, _F32(1), hi - lo)

    def error(scale: Arr, mn: Arr, lv: Arr) -> Arr:
        diff = scale * lv.astype(_F32) + mn - X
        return _seq_sum(Wt * (np.abs(diff) if mad else diff * diff))

    iscale = _F32(nmax) / span
    scale = _F32(1) / iscale
    L = np.clip(_nearest(iscale * (X - lo)), 0, nmax)
    best = error(scale, lo, L)
    mn = lo
    for step in range(nstep + 1):  # the reference measures from the best minimum so far
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / np.where(flat, _F32(1), hi - mn)
        lv = np.clip(_nearest(iscale * (X - mn)), 0, nmax)
        lf = lv.astype(_F32)
        wl = Wt * lf
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lf), _seq_sum(wl * X)
        D = sum_w * sum_l2 - sum_l * sum_l
        pos = D > 0
        safe_d = np.where(pos, D, _F32(1))
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_d
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_d
            clamp = this_min > 0
            this_min = np.where(clamp, _F32(0), this_min).astype(_F32)
            this_scale = np.where(clamp, sum_xl / np.where(clamp, sum_l2, _F32(1)), this_scale).astype(_F32)
        cur = error(this_scale, this_min, lv)
        take: Arr = pos & (cur < best)
        if take.any():
            L = np.where(take, lv, L)
            best = np.asarray(np.where(take, cur, best), dtype=_F32)
            scale = np.where(take, this_scale, scale).astype(_F32)
            mn = np.where(take, this_min, mn).astype(_F32)
    scale = np.where(flat, _F32(0), scale).astype(_F32)
    return scale, -np.where(flat, lo, mn).astype(_F32), np.where(flat, 0, L)


def _groups(x: Arr, n: int) -> Arr:
    """(blocks, 256) -> (n, blocks·256/n): the i-th value of each n-value group, groups in block order."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _ungroup(L: Arr, nb: int) -> Arr:
    return L.T.reshape(nb, 256)


def _pack_2bit(L: Arr) -> Arr:
    """(nb, 256) codes 0..3 -> (nb, 64): per 128 values, byte l holds values l, l+32, l+64, l+96."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: Arr) -> Arr:
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, 256)


def _pack_scales_k4(ls: Arr, lm: Arr) -> Arr:
    """8 six-bit scales and 8 six-bit mins -> the 12 bytes of Q4_K / Q5_K."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _unpack_scales_k4(s: Arr) -> tuple[Arr, Arr]:
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _qk_min_blocks(x: Arr, nmax: int, rmin: float, nstep: int) -> tuple[Arr, Arr, Arr, Arr]:
    """Q4_K / Q5_K: (d, dmin half-float bytes, the 12 scale bytes, L (nb, 256))."""
    nb = x.shape[0]
    X = _groups(x, 32)
    av = np.sqrt(_seq_sum(X * X) / _F32(32))
    scales, mins, L = _make_qkx2_quants(X, av + np.abs(X), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
        inv_m = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
    ls = np.minimum(63, _nearest(inv_s[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest(inv_m[:, None] * mins) & 0xFF).astype(np.uint8)
    d16, dmin16 = _to_f16(max_scale / _F32(63)), _to_f16(max_min / _F32(63))
    d = _f16(d16)[:, :1] * ls.astype(_F32)  # (nb, 8)
    dm = _f16(dmin16)[:, :1] * lm.astype(_F32)
    Lb = _ungroup(L, nb).reshape(nb, 8, 32)
    xb = x.reshape(nb, 8, 32)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest((xb + dm[..., None]) / np.where(nz, d, _F32(1))[..., None]), 0, nmax)
    Lb = np.where(nz[..., None], requant, Lb).reshape(nb, 256)
    return d16, dmin16, _pack_scales_k4(ls, lm), Lb


def _q4_k(x: Arr) -> Arr:
    d16, dmin16, sc, L = _qk_min_blocks(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d16, dmin16, sc, qs], axis=1)


def _q5_k(x: Arr) -> Arr:
    d16, dmin16, sc, L = _qk_min_blocks(x, 31, -0.5, 15)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hi = (q >> 4) & 1  # (nb, 4 chunks, 2 halves, 32): bit 2·chunk + half of qh[l]
    shift = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    qh = np.bitwise_or.reduce((hi << shift).reshape(-1, 8, 32), axis=1).astype(np.uint8)
    return np.concatenate([d16, dmin16, sc, qh, qs], axis=1)


def _q6_k(x: Arr) -> Arr:
    nb = x.shape[0]
    scales, L = _make_qx_quants(_groups(x, 16), 32)
    scales = scales.reshape(nb, 16)
    ai = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), ai]
    empty = np.abs(max_scale) < _EPS
    iscale = _F32(-128) / np.where(empty, _F32(1), max_scale)
    d16 = _to_f16(np.where(empty, _F32(0), _F32(1) / iscale).astype(_F32))
    sc = np.minimum(127, _nearest(iscale[:, None] * scales)).astype(np.int8)
    sc = np.where(empty[:, None], np.int8(0), sc)
    d = _f16(d16)[:, :1] * sc.astype(_F32)
    Lb = _ungroup(L, nb).reshape(nb, 16, 16)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest(x.reshape(nb, 16, 16) / np.where(nz, d, _F32(1))[..., None]), -32, 31) + 32
    Lb = np.where(nz[..., None], requant, Lb).reshape(nb, 2, 4, 32).astype(np.uint8)
    Lb = np.where(empty[:, None, None, None], np.uint8(0), Lb)
    ql = np.concatenate([(Lb[:, :, 0] & 0xF) | ((Lb[:, :, 2] & 0xF) << 4),
                         (Lb[:, :, 1] & 0xF) | ((Lb[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((Lb[:, :, 0] >> 4) | ((Lb[:, :, 1] >> 4) << 2) | ((Lb[:, :, 2] >> 4) << 4)
          | ((Lb[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d16], axis=1)


def _q3_k(x: Arr) -> Arr:
    nb = x.shape[0]
    scales, L = _make_q3_quants(_groups(x, 16), 4)
    scales = scales.reshape(nb, 16)
    max_scale = scales[np.arange(nb), np.abs(scales).argmax(axis=1)]
    some = max_scale != 0
    iscale = _F32(-32) / np.where(some, max_scale, _F32(1))
    lv = (np.clip(_nearest(iscale[:, None] * scales), -32, 31) + 32).astype(np.uint8)
    lv = np.where(some[:, None], lv, np.uint8(0))
    sb = np.zeros((nb, 12), dtype=np.uint8)
    sb[:, :8] = (lv[:, :8] & 0xF) | ((lv[:, 8:] & 0xF) << 4)
    hi2 = (lv >> 4).reshape(nb, 4, 4)  # [j // 4, j % 4]
    sb[:, 8:] = hi2[:, 0] | (hi2[:, 1] << 2) | (hi2[:, 2] << 4) | (hi2[:, 3] << 6)
    sb = np.where(some[:, None], sb, np.uint8(0))
    d16 = _to_f16(np.where(some, _F32(1) / iscale, _F32(0)).astype(_F32))
    sc = _unpack_scales_q3(sb)
    d = _f16(d16)[:, :1] * sc.astype(_F32)
    Lb = _ungroup(L, nb).reshape(nb, 16, 16)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest(x.reshape(nb, 16, 16) / np.where(nz, d, _F32(1))[..., None]), -4, 3) + 4
    Lb = np.where(nz[..., None], requant, Lb).reshape(nb, 256)
    high = (Lb > 3).astype(np.uint8).reshape(nb, 8, 32)  # value j's bit: hmask[j % 32] bit j // 32
    hmask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1).astype(np.uint8)
    qs = _pack_2bit(np.where(Lb > 3, Lb - 4, Lb))
    return np.concatenate([hmask, qs, sb, d16], axis=1)


def _unpack_scales_q3(sb: Arr) -> Arr:
    low = np.concatenate([sb[:, :8] & 0xF, sb[:, :8] >> 4], axis=1)  # (nb, 16)
    j: Arr = np.arange(16)
    high = (sb[:, 8 + j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _q2_k(x: Arr) -> Arr:
    nb = x.shape[0]
    X = _groups(x, 16)
    scales, mins, L = _make_qkx2_quants(X, np.abs(X), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    ps, pm = max_scale > 0, max_min > 0
    with np.errstate(divide="ignore"):
        inv_s = np.where(ps, _F32(15) / max_scale, _F32(0)).astype(_F32)
        inv_m = np.where(pm, _F32(15) / max_min, _F32(0)).astype(_F32)
    ls = np.where(ps[:, None], _nearest(inv_s[:, None] * scales) & 0xFF, 0)
    lm = np.where(pm[:, None], _nearest(inv_m[:, None] * mins) & 0xFF, 0)
    sb = (ls | (lm << 4)).astype(np.uint8)
    d16 = _to_f16(np.where(ps, max_scale / _F32(15), _F32(0)).astype(_F32))
    dmin16 = _to_f16(np.where(pm, max_min / _F32(15), _F32(0)).astype(_F32))
    d = _f16(d16)[:, :1] * (sb & 0xF).astype(_F32)
    dm = _f16(dmin16)[:, :1] * (sb >> 4).astype(_F32)
    Lb = _ungroup(L, nb).reshape(nb, 16, 16)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest((x.reshape(nb, 16, 16) + dm[..., None]) / np.where(nz, d, _F32(1))[..., None]),
                          0, 3)
    Lb = np.where(nz[..., None], requant, Lb).reshape(nb, 256)
    return np.concatenate([sb, _pack_2bit(Lb), d16, dmin16], axis=1)


def _dq2_k(b: Arr) -> Arr:
    sb, q = b[:, :16], _unpack_2bit(b[:, 16:80]).astype(_F32).reshape(-1, 16, 16)
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sb & 0xF).astype(_F32))[..., None]
    ml = (dmin * (sb >> 4).astype(_F32))[..., None]
    return (dl * q - ml).reshape(-1, 256)


def _dq3_k(b: Arr) -> Arr:
    hmask, qs, sb, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    high = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # (nb, 8, 32)
    q = _unpack_2bit(qs).astype(np.int8) - np.where(high.reshape(-1, 256) != 0, np.int8(0), np.int8(4))
    dl = (d * _unpack_scales_q3(sb).astype(_F32))[..., None]
    return (dl * q.astype(_F32).reshape(-1, 16, 16)).reshape(-1, 256)


def _dq_k4(b: Arr, q: Arr) -> Arr:
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    dl = (d * sc.astype(_F32))[..., None]
    ml = (dmin * mn.astype(_F32))[..., None]
    return (dl * q.astype(_F32).reshape(-1, 8, 32) - ml).reshape(-1, 256)


def _dq4_k(b: Arr) -> Arr:
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # (nb, 4, 2, 32)
    return _dq_k4(b, q)


def _dq5_k(b: Arr) -> Arr:
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(-1, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2)
    shift = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    q = q | (((qh[:, None, None, :] >> shift) & 1) << 4)
    return _dq_k4(b, q)


def _dq6_k(b: Arr) -> Arr:
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    sc, d = b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
    q = np.stack([(ql[:, :, :32] & 0xF) | ((qh & 3) << 4), (ql[:, :, 32:] & 0xF) | (((qh >> 2) & 3) << 4),
                  (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4)],
                 axis=2)  # (nb, 2 halves, 4 quarters, 32)
    qv = q.astype(np.int8).reshape(-1, 16, 16) - np.int8(32)
    dl = (d * sc.astype(_F32))[..., None]
    return (dl * qv.astype(_F32)).reshape(-1, 256)


_QUANT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
          "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_DEQUANT = {"Q4_0": _dq4_0, "Q4_1": _dq4_1, "Q5_0": _dq5_0, "Q5_1": _dq5_1, "Q8_0": _dq8_0,
            "Q2_K": _dq2_k, "Q3_K": _dq3_k, "Q4_K": _dq4_k, "Q5_K": _dq5_k, "Q6_K": _dq6_k}
