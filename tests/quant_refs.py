"""Independent references for quantized storage, written in numpy (not loratool's code): fp8 rounding,
transformers' fine-grained block fp8, bitsandbytes' blockwise codebooks (nf4/fp4, nested absmax) and
LLM.int8 rows; and the bases and adapters the quantized-merge tests build from them
(tests/ops/test_merge_quantized.py, tests/quant/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

KEY = "model.layers.0.self_attn.q_proj"
OTHER = "model.layers.0.self_attn.k_proj"
OUT, IN = 48, 64  # not multiples of the 32-wide fp8 blocks below: edge tiles are partial
BLOCK = (32, 32)
E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"
NF4_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]
FP4_LEVELS = [0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
              0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
              -0.3333333432674408, -0.5, -0.1666666716337204, -0.25]


# ---------------------------------------------------------------------------------------------
# independent reference quantization (numpy)


def fp8_values(dtype: str) -> np.ndarray:
    """The value of every non-negative finite fp8 bit pattern 0..max, decoded from the bits."""
    ebits, mbits, bias = (4, 3, 7) if dtype == E4M3 else (5, 2, 15)
    vals = []
    for b in range(128):
        e, m = b >> mbits, b & ((1 << mbits) - 1)
        if dtype == E4M3 and b == 0x7F:
            break  # NaN
        if dtype == E5M2 and e == (1 << ebits) - 1:
            break  # inf / NaN
        v = (m / (1 << mbits)) * 2.0 ** (1 - bias) if e == 0 else (1 + m / (1 << mbits)) * 2.0 ** (e - bias)
        vals.append(v)
    return np.array(vals)


def ref_fp8_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 x to fp8 bits: saturate, nearest, ties to the even pattern (sign-magnitude)."""
    vals = fp8_values(dtype)
    a = np.minimum(np.abs(x.astype(np.float64)), vals[-1])
    hi = np.clip(np.searchsorted(vals, a), 0, len(vals) - 1)
    lo = np.clip(hi - 1, 0, len(vals) - 1)
    dlo, dhi = a - vals[lo], vals[hi] - a
    pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (pick | np.where(x < 0, 0x80, 0)).astype(np.uint8)


def fp8_decode(bits: np.ndarray, dtype: str) -> np.ndarray:
    vals = fp8_values(dtype).astype(np.float32)
    mag = vals[bits & 0x7F]
    return np.where(bits & 0x80, -mag, mag).astype(np.float32)


def ref_block_quant(w: np.ndarray, dtype: str = E4M3) -> tuple[np.ndarray, np.ndarray]:
    """transformers' fine-grained fp8: scale = max · (1/amax) per tile, stored scale_inv = 1/scale."""
    rows, cols = w.shape
    nr, nc = -(-rows // BLOCK[0]), -(-cols // BLOCK[1])
    top = np.float32(fp8_values(dtype)[-1])
    inv = np.zeros((nr, nc), np.float32)
    bits = np.zeros(w.shape, np.uint8)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]]
            amax = np.float32(np.abs(tile).max())
            scale = top * (np.float32(1) / amax) if amax > 0 else np.float32(1)  # transformers: max · (1/amax)
            inv[i, j] = np.float32(1) / scale
            bits[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = ref_fp8_bits(
                (tile * scale).astype(np.float32), dtype)
    return bits, inv


def ref_block_dequant(bits: np.ndarray, inv: np.ndarray, dtype: str = E4M3) -> np.ndarray:
    full = np.repeat(np.repeat(inv, BLOCK[0], 0), BLOCK[1], 1)[: bits.shape[0], : bits.shape[1]]
    return (fp8_decode(bits, dtype) * full).astype(np.float32)


def ref_codebook_quant(x: np.ndarray, levels: list[float], blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes blockwise: absmax per block, nearest level of x·(1/absmax), ties to the lower level."""
    flat = x.reshape(-1).astype(np.float32)
    code = np.array(levels, np.float32)
    order = np.argsort(code, kind="stable")
    srt = code[order]
    mids = (srt[:-1] + srt[1:]) / np.float32(2)
    codes = np.zeros(flat.size, np.int64)
    nblocks = -(-flat.size // blocksize)
    absmax = np.zeros(nblocks, np.float32)
    for b in range(nblocks):
        chunk = flat[b * blocksize:(b + 1) * blocksize]
        am = np.float32(np.abs(chunk).max())
        absmax[b] = am
        scaled = np.clip(chunk * (np.float32(1) / max(am, np.float32(1e-38))), -1, 1)
        codes[b * blocksize:(b + 1) * blocksize] = order[np.searchsorted(mids, scaled, side="left")]
    return codes, absmax


def ref_codebook_dequant(codes: np.ndarray, absmax: np.ndarray, levels, blocksize: int) -> np.ndarray:
    code = np.asarray(levels, np.float32)
    return (code[codes] * np.repeat(absmax, blocksize)[: codes.size]).astype(np.float32)


def pack(codes: np.ndarray) -> np.ndarray:
    c = codes.astype(np.uint8)
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def unpack(packed: np.ndarray) -> np.ndarray:
    b = packed.reshape(-1).astype(np.int64)
    return np.stack([b >> 4, b & 0xF], 1).reshape(-1)


def ref_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scb = np.abs(w).max(axis=1).astype(np.float32)
    return np.round(w * (np.float32(127) / scb)[:, None]).astype(np.int8), scb


def ref_int8_dequant(q: np.ndarray, scb: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scb[:, None] * np.float32(7.874015718698502e-3)).astype(np.float32)


NESTED_MAP = np.linspace(-1, 1, 256).astype(np.float32)  # any sorted 256-level map: the file carries it
NESTED_BLOCK = 4  # small, so the 48 absmax values of a 48x64 nf4 weight span several nested blocks


def ref_nested(absmax: np.ndarray, offset: np.float32) -> tuple[np.ndarray, np.ndarray]:
    return ref_codebook_quant(absmax - offset, list(NESTED_MAP), NESTED_BLOCK)


def ref_nested_dequant(codes: np.ndarray, nabs: np.ndarray, offset: np.float32) -> np.ndarray:
    return (ref_codebook_dequant(codes, nabs, NESTED_MAP, NESTED_BLOCK) + offset).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# bases and adapters


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def fp8_tensor(bits: np.ndarray, dtype: str) -> torch.Tensor:
    return t(bits).view(getattr(torch, dtype))


def quant_state(kind: str, shape, nested: bool, offset: float = 0.0) -> torch.Tensor:
    doc = {"quant_type": kind, "blocksize": 64, "dtype": "bfloat16", "shape": list(shape)}
    if nested:
        doc |= {"nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": offset}
    return torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)


def store(kind: str, key: str, w: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """w stored as `kind` (the tensors) and its exact dequantization (float32)."""
    stem = key[: -len(".weight")]
    if kind in ("fp8", "fp8_e5m2"):
        dt = E4M3 if kind == "fp8" else E5M2
        bits = ref_fp8_bits(w, dt)
        return {key: fp8_tensor(bits, dt)}, fp8_decode(bits, dt)
    if kind in ("scaled", "scaled_rows"):
        amax = np.abs(w).max(axis=1, keepdims=True) if kind == "scaled_rows" else np.abs(w).max()
        s = np.asarray(amax / np.float32(448), dtype=np.float32)
        bits = ref_fp8_bits((w / s).astype(np.float32), E4M3)
        tens = {key: fp8_tensor(bits, E4M3), stem + ".scale_weight": t(s.reshape(-1) if s.ndim else s),
                stem + ".scale_input": torch.tensor(1.0)}
        return tens, (fp8_decode(bits, E4M3) * s).astype(np.float32)
    if kind == "block":
        bits, inv = ref_block_quant(w)
        return {key: fp8_tensor(bits, E4M3), stem + ".weight_scale_inv": t(inv)}, ref_block_dequant(bits, inv)
    if kind in ("nf4", "fp4", "nf4_nested"):
        levels = FP4_LEVELS if kind == "fp4" else NF4_LEVELS
        qt = "fp4" if kind == "fp4" else "nf4"
        codes, absmax = ref_codebook_quant(w, levels, 64)
        tens = {key: t(pack(codes)), key + ".quant_map": t(np.array(levels, np.float32))}
        if kind == "nf4_nested":
            offset = np.float32(absmax.mean())
            ncodes, nabs = ref_nested(absmax, offset)
            tens |= {key + ".absmax": t(ncodes.astype(np.uint8)), key + ".nested_absmax": t(nabs),
                     key + ".nested_quant_map": t(NESTED_MAP),
                     key + f".quant_state.bitsandbytes__{qt}": quant_state(qt, w.shape, True, float(offset))}
            absmax = ref_nested_dequant(ncodes, nabs, offset)
        else:
            tens |= {key + ".absmax": t(absmax),
                     key + f".quant_state.bitsandbytes__{qt}": quant_state(qt, w.shape, False)}
        return tens, ref_codebook_dequant(codes, absmax, levels, 64).reshape(w.shape)
    if kind == "int8":
        q, scb = ref_int8(w)
        return {key: t(q), stem + ".SCB": t(scb), stem + ".weight_format": torch.tensor(0, dtype=torch.uint8)}, \
            ref_int8_dequant(q, scb)
    raise AssertionError(kind)


def requant(kind: str, key: str, new: np.ndarray, old: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Reference Q(new) with the base's scheme: fixed scales kept, data-derived ones recomputed."""
    stem = key[: -len(".weight")]
    if kind in ("fp8", "fp8_e5m2"):
        return {key: ref_fp8_bits(new, E4M3 if kind == "fp8" else E5M2)}
    if kind in ("scaled", "scaled_rows"):
        s = old[stem + ".scale_weight"].numpy()
        s = s.reshape(-1, 1) if s.ndim else s
        return {key: ref_fp8_bits((new / s).astype(np.float32), E4M3)}
    if kind == "block":
        bits, inv = ref_block_quant(new)
        return {key: bits, stem + ".weight_scale_inv": inv}
    if kind in ("nf4", "fp4", "nf4_nested"):
        codes, absmax = ref_codebook_quant(new, FP4_LEVELS if kind == "fp4" else NF4_LEVELS, 64)
        out = {key: pack(codes)}
        if kind == "nf4_nested":
            offset = np.float32(json.loads(bytes(old[key + ".quant_state.bitsandbytes__nf4"].numpy()))["nested_offset"])
            ncodes, nabs = ref_nested(absmax, offset)
            out |= {key + ".absmax": ncodes.astype(np.uint8), key + ".nested_absmax": nabs}
        else:
            out[key + ".absmax"] = absmax
        return out
    if kind == "int8":
        q, scb = ref_int8(new)
        return {key: q, stem + ".SCB": scb}
    raise AssertionError(kind)


def exact_factors(rank: int, seed: int, scale: float = 1.0, out: int = OUT, inp: int = IN
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(A (r, in), B (out, r)) with entries k/8, |k| ≤ 2, times a power of two: B @ A is exact in float32."""
    rng = np.random.default_rng(seed)
    a = (rng.integers(-2, 3, (rank, inp)) / 8).astype(np.float32)
    b = (rng.integers(-2, 3, (out, rank)) / 8 * scale).astype(np.float32)
    return a, b


def write_adapter(path: Path, a: np.ndarray, b: np.ndarray, name: str = KEY) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{name}.lora_A.weight": t(a), f"base_model.model.{name}.lora_B.weight": t(b)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": a.shape[0], "lora_alpha": a.shape[0], "target_modules": ["q_proj"]}))
    return path


def make_base(tmp_path: Path, kind: str, *, seed: int = 0, w_scale: float = 1.0, shape: tuple[int, int] = (OUT, IN),
              other_deq: dict[str, np.ndarray] | None = None):
    """A directory base: the targeted weight stored as `kind`, plus a bf16 neighbour and a norm.

    With other_deq (a dict), the neighbour is stored as `kind` too and its dequantization put there."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * w_scale).astype(np.float32)
    tensors, deq = store(kind, KEY + ".weight", w)
    other = rng.standard_normal(shape).astype(np.float32)
    if other_deq is None:
        tensors[OTHER + ".weight"] = torch.from_numpy(other).bfloat16()
    else:
        more, other_deq[OTHER + ".weight"] = store(kind, OTHER + ".weight", other)
        tensors |= {k: v.clone() for k, v in more.items()}  # one codebook each, as files hold them
    tensors["model.norm.weight"] = torch.ones(shape[1])
    base = tmp_path / f"base_{kind}"
    base.mkdir()
    save_file(tensors, str(base / "model.safetensors"))
    config: dict = {"model_type": "llama"}
    if kind == "block":
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                         "weight_block_size": list(BLOCK), "fmt": "e4m3"}
    if kind in ("nf4", "fp4", "nf4_nested", "int8"):
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": kind != "int8",
                                         "load_in_8bit": kind == "int8"}
    (base / "config.json").write_text(json.dumps(config))
    return base, tensors, deq


def as_np(x: torch.Tensor) -> np.ndarray:
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return x.view(torch.uint8).numpy()
    return x.numpy()


KINDS = ["fp8", "fp8_e5m2", "scaled", "scaled_rows", "block", "nf4", "fp4", "nf4_nested", "int8"]
