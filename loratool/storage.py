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
                against `<m>.weight` (BaseStorage.aliases). GPTQ act-order (`weight_g_idx`) is refused.

Everything else that is recognisably quantized (GPTQ, AWQ, HQQ, EXL2, nvfp4, mxfp4, other compressed-tensors,
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
SUPPORTED = ("fp8", "fp8_scaled", "fp8_block", "bnb_nf4", "bnb_fp4", "bnb_int8", "ct_int")

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
_SUPPORTED_METHODS = ("fp8", "bitsandbytes")


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
                 "ct_int": ("scale", "zero_point")}.get(self.scheme, ())
        return [self.siblings[r] for r in roles if r in self.siblings]

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
        if self.scheme == "ct_int":
            p = self.params
            group = f" group {p['group_size']}" if p["strategy"] == "group" else f" per {p['strategy']}"
            return f"compressed-tensors int{p['bits']}{group}{'' if p['symmetric'] else ' asymmetric'}"
        return self.scheme


@dataclass
class BaseStorage:
    """Every quantized weight of a checkpoint (plain float tensors are absent), and what was refused."""

    tensors: dict[str, Storage] = field(default_factory=dict)  # weight key -> storage
    siblings: dict[str, str] = field(default_factory=dict)  # sibling key -> weight key
    markers: list[str] = field(default_factory=list)  # tensors that only flag a scheme (scaled_fp8)
    quant_method: str | None = None  # config.json quantization_config.quant_method
    config: dict[str, Any] | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # the weight key a merge plans against -> stored key

    @property
    def unsupported(self) -> list[Storage]:
        return [s for s in self.tensors.values() if not s.supported]

    @property
    def quantized(self) -> bool:
        return bool(self.tensors)

    def of(self, key: str) -> Storage | None:
        return self.tensors.get(key)

    def logical(self, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The checkpoint's tensors as a merge sees them: weights with logical shapes, siblings left out."""
        import dataclasses

        out = {}
        for k, info in tensors.items():
            if k in self.siblings or k in self.markers:
                continue
            s = self.tensors.get(k)
            info = dataclasses.replace(info, shape=s.shape) if s is not None and s.shape else info
            logical = self.logical_key(k)
            if logical != k and s is not None:  # ct_int: `<m>.weight`, floating point as its scale is
                info = dataclasses.replace(info, key=logical, dtype=self.tensors_dtype(s))
            out[logical] = info
        return out

    def logical_key(self, key: str) -> str:
        """The key a merge plans against for a stored key (`<m>.weight` for `<m>.weight_packed`)."""
        return next((k for k, v in self.aliases.items() if v == key), key) if self.aliases else key

    def tensors_dtype(self, s: Storage) -> str:
        return str(s.params.get("scale_dtype", "float32"))

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

        raise FormatError(f"{info.path}: '{info.key}' is not the JSON bitsandbytes writes ({e})") from None
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
        stem = key[: -len(".weight")] if key.endswith(".weight") else None
        if method == "compressed-tensors" and (key.endswith(".weight_packed") or (
                stem is not None and info.dtype == "int8" and stem + ".weight_scale" in tensors)):
            add(_compressed_int(key, tensors, qcfg or {}, read_small=read_small))
            if base.tensors[key].supported and key.endswith("_packed"):
                base.aliases[key[: -len("_packed")]] = key
            continue
        if stem is None:
            packed = next((v for k, v in _UNSUPPORTED_WEIGHTS.items() if key.endswith(k)), None)
            if packed is None and key.endswith("_blocks") and key[: -len("_blocks")] + "_scales" in tensors:
                packed = "mxfp4 (_blocks/_scales)"
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


def _ct_weights_args(qcfg: dict[str, Any], module: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the `weights` quantization args, the format) of the config group whose targets take `module`:
    a "re:" target matched against the module name first, else a class name (any Linear)."""
    from loratool.patterns import PatternError, compile_pattern

    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict):
        return None, None
    by_class = None
    for group in groups.values():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            continue
        fmt = group.get("format") or qcfg.get("format")
        for target in group.get("targets") or []:
            if isinstance(target, str) and target.startswith("re:"):
                try:
                    if compile_pattern(target[3:]).match(module):
                        return group["weights"], fmt
                except PatternError:
                    continue
            elif by_class is None:
                by_class = (group["weights"], fmt)
    return by_class if by_class is not None else (None, None)


def _compressed_int(key: str, tensors: dict[str, TensorInfo], qcfg: dict[str, Any], *, read_small: bool
                    ) -> Storage:
    """A compressed-tensors `<m>.weight_packed` (or int8 `<m>.weight`): supported when its config group
    is integer weights in format pack-quantized (int-quantized), by group, channel or tensor, with
    scales from the data (no act-order)."""
    packed = key.endswith(".weight_packed")
    stem = key[: -len(".weight_packed" if packed else ".weight")]
    info = tensors[key]
    sib = {role: f"{stem}.weight_{role}" for role in ("scale", "shape", "zero_point", "g_idx")
           if f"{stem}.weight_{role}" in tensors}
    args, fmt = _ct_weights_args(qcfg, stem)

    def refused(why: str) -> Storage:
        return Storage(key, f"compressed-tensors {why}", info.dtype, info.shape, sib, supported=False)

    if args is None:
        return refused("(no config group in config.json's quantization_config takes this weight)")
    bits, strategy = args.get("num_bits"), args.get("strategy")
    if "g_idx" in sib or args.get("actorder"):
        return refused("GPTQ act-order (weight_g_idx: calibrated group order)")
    if args.get("observer") not in (None, "minmax", "memoryless_minmax", "memoryless", "static_minmax"):
        return refused(f"weights with {args.get('observer')} observer scales (a search loratool does not repeat)")
    if fmt != ("pack-quantized" if packed else "int-quantized") or args.get("type", "int") != "int" or not (
            isinstance(bits, int) and 1 <= bits <= 8) or strategy not in ("group", "channel", "tensor"):
        return refused(f"{fmt} {args.get('type')}{bits} {strategy}")
    if "scale" not in sib or ("shape" not in sib and packed) or info.dtype != ("int32" if packed else "int8") or (
            len(info.shape) != 2 or (not args.get("symmetric", True) and "zero_point" not in sib)):
        return refused("(the weight without its weight_scale / weight_shape / weight_zero_point)")
    scale = tensors[sib["scale"]]
    rows = info.shape[0]
    cols = info.shape[1] * 32 // bits if packed else info.shape[1]
    if read_small and packed:
        from loratool.io.tensors import load_tensor

        shape = tuple(int(d) for d in load_tensor(tensors[sib["shape"]]).reshape(-1).tolist())
        if len(shape) != 2 or shape[0] != rows or -(-shape[1] * bits // 32) != info.shape[1]:
            return refused(f"(weight_shape {shape} does not fit weight_packed {info.shape})")
        cols = shape[1]
    group = int(args.get("group_size") or 0)
    groups = {"group": -(-cols // group) if group > 0 else 0, "channel": 1, "tensor": 1}[strategy]
    want = (1,) if strategy == "tensor" else (rows, groups)
    if groups == 0 or (strategy == "group" and cols % group) or math.prod(scale.shape) != math.prod(want) or (
            scale.dtype not in FLOAT_DTYPES):
        return refused(f"(weight_scale {scale.dtype} {scale.shape} for {strategy} {group or ''} of {(rows, cols)})")
    params = {"bits": bits, "symmetric": bool(args.get("symmetric", True)), "strategy": strategy,
              "group_size": group, "groups": groups, "scale_dtype": scale.dtype, "packed": packed}
    return Storage(key, "ct_int", info.dtype, (rows, cols), {k: v for k, v in sib.items()}, (), params)


# ---------------------------------------------------------------------------------------------
# dequantize / quantize one weight (with its siblings)

Load = Callable[[str], "torch.Tensor"]


def dequantize(s: Storage, stored: torch.Tensor, load: Load) -> torch.Tensor:
    """The weight in float32, logical shape, exactly as the scheme defines it. `load(key)` reads a sibling."""
    import torch

    from loratool.maths.quant import block_dequantize, codebook_dequantize, int8_row_dequantize, unpack_nibbles

    if s.scheme == "fp8":
        return stored.to(torch.float32)
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
        from loratool.maths.quant import int_dequantize, unpack_int32

        q = unpack_int32(stored, s.params["bits"], s.shape[1]) if s.params["packed"] else stored
        return int_dequantize(q, load(s.siblings["scale"]), _ct_zero(s, load))
    raise IncompatibleError(f"'{s.key}': {s.scheme} cannot be dequantized")


def _ct_zero(s: Storage, load: Load) -> torch.Tensor | None:
    """A compressed-tensors zero point as values (rows, groups) or one; packed along rows unless per tensor."""
    from loratool.maths.quant import unpack_int32

    if s.params["symmetric"]:
        return None
    zero = load(s.siblings["zero_point"])
    if s.params["strategy"] == "tensor" or not s.params["packed"]:
        return zero
    return unpack_int32(zero.T, s.params["bits"], s.shape[0]).T


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
    generator (stochastic rounding) applies to the fp8 schemes; the others round to nearest.
    """
    import torch

    from loratool.maths.quant import block_quantize_fp8, codebook_quantize, int8_row_quantize, pack_nibbles, round_fp8

    if s.scheme == "fp8":
        return {s.key: round_fp8(w, s.dtype, generator=generator)}
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
        return _ct_quantize(s, w, load)
    raise IncompatibleError(f"'{s.key}': {s.scheme} cannot be quantized")


def _ct_quantize(s: Storage, w: torch.Tensor, load: Load) -> dict[str, torch.Tensor]:
    from loratool.maths.quant import int_quantize, pack_int32

    p = s.params
    old_scale = load(s.siblings["scale"])
    q, scale, zero = int_quantize(w.reshape(s.shape), p["bits"], p["groups"], old_scale.dtype,
                                  symmetric=p["symmetric"], per_tensor=p["strategy"] == "tensor")
    out = {s.key: pack_int32(q, p["bits"]) if p["packed"] else q, s.siblings["scale"]: scale.reshape(old_scale.shape)}
    if zero is not None:
        old_zero = load(s.siblings["zero_point"])
        packed = zero if p["strategy"] == "tensor" or not p["packed"] else pack_int32(zero.T.contiguous(), p["bits"]).T
        out[s.siblings["zero_point"]] = packed.reshape(old_zero.shape).to(old_zero.dtype).contiguous()
    return out


def requantize(s: Storage, w: torch.Tensor, load: Load, *, generator: torch.Generator | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the stored tensors quantize() writes for w, what they read back as in float32).

    The read-back uses the recomputed siblings (scales, absmax) and `load` for the fixed ones: it
    is the value a loader sees, so W' − W measured on it is the change the storage really holds.
    """
    outs = quantize(s, w, load, generator=generator)
    return outs, dequantize(s, outs[s.key], lambda k: outs[k] if k in outs else load(k))


# ---------------------------------------------------------------------------------------------
# row blocks: a quantized weight dequantized and requantized a few rows at a time (bounded memory)


def block_rows(s: Storage) -> int | None:
    """The fewest leading rows of s that form a weight of their own: rows that share no scale with
    rows outside them, so dequantized and requantized alone they give the whole tensor's bits.

    fp8, scaled fp8 and LLM.int8 split by single rows, block fp8 by its tiles' rows, bitsandbytes
    4-bit by whole absmax blocks (whole nested blocks of them). None: s does not split (a 1-D
    weight, one scale over the whole tensor, a scheme loratool refuses).
    """
    if not s.supported or len(s.shape) < 2 or s.shape[0] < 2:
        return None
    cols = math.prod(s.shape[1:])
    if s.scheme in ("fp8", "fp8_scaled", "bnb_int8"):
        return 1
    if s.scheme == "fp8_block":
        return s.block[0] if s.block[0] < s.shape[0] else None
    if s.scheme == "ct_int" and s.params["strategy"] != "tensor":
        rows = 1 if s.params["symmetric"] or not s.params["packed"] else 32  # packed zp: 32 rows in `bits` words
        return rows if rows < s.shape[0] else None
    if s.scheme in ("bnb_nf4", "bnb_fp4"):
        group = s.block[0] * (int(s.params.get("nested_blocksize", 256)) if "nested_absmax" in s.siblings else 1)
        rows = group // math.gcd(group, cols)
        rows *= 2 if rows * cols % 2 else 1  # whole bytes of packed nibbles
        return rows if rows < s.shape[0] else None
    return None


@dataclass
class RowBlocks:
    """One quantized weight cut into row blocks (block_rows), each dequantized or requantized alone.

    The siblings are loaded once (scales: a small fraction of the weight); requantize() writes each
    block's stored bytes and recomputed scales into `outs`, full-size tensors the caller provides for
    the weight and made here for the recomputed siblings (s.changing).
    """

    s: Storage
    stored: torch.Tensor  # as stored (packed for bnb 4-bit)
    siblings: dict[str, torch.Tensor]  # every sibling key -> its tensor
    rows: int  # block_rows(s)
    outs: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> the requantized whole tensor

    def _spans(self, start: int, stop: int) -> dict[str, tuple[int, int, int]]:
        """key -> (inner, a, z): the tensor viewed as (-1, inner), rows a:z hold rows start:stop of W."""
        s, sib = self.s, self.s.siblings
        cols = math.prod(s.shape[1:])
        if s.scheme in ("bnb_nf4", "bnb_fp4"):  # flat blocks of the flattened weight
            a, z = start * cols, stop * cols
            bs = s.block[0]
            spans = {s.key: (1, a // 2, -(-z // 2)), sib["absmax"]: (1, a // bs, -(-z // bs))}
            if "nested_absmax" in sib:
                nb = bs * int(s.params.get("nested_blocksize", 256))
                spans[sib["nested_absmax"]] = (1, a // nb, -(-z // nb))
            return spans
        spans = {s.key: (cols, start, stop)}
        if s.scheme == "fp8_block":
            b0 = s.block[0]
            scale = self.siblings[sib["scale_inv"]]
            spans[sib["scale_inv"]] = (scale.shape[-1], start // b0, -(-stop // b0))
        elif s.scheme == "fp8_scaled" and self.siblings[sib["scale"]].numel() > 1:
            spans[sib["scale"]] = (1, start, stop)
        elif s.scheme == "bnb_int8":
            spans[sib["scb"]] = (1, start, stop)
        elif s.scheme == "ct_int":
            bits, groups = s.params["bits"], s.params["groups"]
            spans[s.key] = (self.stored.shape[1], start, stop)
            spans[sib["scale"]] = (groups, start, stop)
            if not s.params["symmetric"] and s.params["packed"]:
                spans[sib["zero_point"]] = (groups, start * bits // 32, -(-stop * bits // 32))
            elif not s.params["symmetric"]:
                spans[sib["zero_point"]] = (groups, start, stop)
        return spans

    def _part(self, start: int, stop: int) -> tuple[Storage, torch.Tensor, Load, Callable[[str, torch.Tensor],
                                                                                               torch.Tensor]]:
        import dataclasses

        spans = self._spans(start, stop)

        def cut(key: str, t: torch.Tensor) -> torch.Tensor:
            if key not in spans:
                return t
            inner, a, z = spans[key]
            return t.reshape(-1, inner)[a:z]

        part = dataclasses.replace(self.s, shape=(stop - start, *self.s.shape[1:]))
        stored = cut(self.s.key, self.stored)
        if self.s.scheme not in ("bnb_nf4", "bnb_fp4") and not self.s.params.get("packed"):
            stored = stored.reshape(part.shape)
        return part, stored, lambda k: cut(k, self.siblings[k]), cut

    def output(self, weight: torch.Tensor) -> None:
        """Requantize into `weight` (the stored dtype and shape) and new tensors for the recomputed siblings."""
        import torch

        self.outs = {self.s.key: weight} | {k: torch.empty_like(self.siblings[k]) for k in self.s.changing}

    def dequantize(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of W in float32, shaped (stop − start, cols)."""
        part, stored, load, _ = self._part(start, stop)
        return dequantize(part, stored, load).reshape(stop - start, -1)

    def requantize(self, start: int, stop: int, w: torch.Tensor, *, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """Rows start:stop of W' (float32) stored into self.outs (see output()); what they read back as,
        (k, cols) float32. Blocks may be stored concurrently: they write disjoint parts of every tensor."""
        part, _, load, cut = self._part(start, stop)
        outs, written = requantize(part, w.reshape(part.shape), load, generator=generator)
        for key, t in outs.items():
            target = cut(key, self.outs[key])
            target.copy_(t.reshape(target.shape))
        return written.reshape(stop - start, -1)


def row_blocks(s: Storage, stored: torch.Tensor, load: Load) -> RowBlocks | None:
    """s's weight cut into row blocks, or None where it does not split (see block_rows)."""
    rows = block_rows(s)
    if rows is None:
        return None
    return RowBlocks(s, stored, {k: load(k) for k in s.siblings.values() if k != s.siblings.get("quant_state")},
                     rows)
