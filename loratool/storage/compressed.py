"""compressed-tensors integer weights (the ct_int scheme): which config group of config.json's
`quantization_config` takes a weight, whether loratool can repeat its quantizer (integer weights,
format "pack-quantized" or "int-quantized", per group, channel or tensor, min-max scales, no GPTQ
act-order), and the weight dequantized and requantized as compressed-tensors does it (the integer
maths and the dense int32 packing are maths/quant.py's). NVFP4 in compressed-tensors' layout is
storage/fp4.py's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from loratool.storage.descriptor import FLOAT_DTYPES, Load, Storage

if TYPE_CHECKING:
    import torch

    from loratool.io.header import TensorInfo


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


def compressed_int(key: str, tensors: dict[str, TensorInfo], qcfg: dict[str, Any], *, read_small: bool
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
    params: dict[str, Any] = {"bits": bits, "symmetric": bool(args.get("symmetric", True)), "strategy": strategy,
              "group_size": group, "groups": groups, "scale_dtype": scale.dtype, "packed": packed}
    if packed:  # stored as `<m>.weight_packed`, named `<m>.weight` (Storage.name); --dtype would rename it
        params["layout"] = "compressed-tensors"
    return Storage(key, "ct_int", info.dtype, (rows, cols), dict(sib), (), params)


def dequantize_ct(s: Storage, stored: torch.Tensor, load: Load) -> torch.Tensor:
    """A ct_int weight in float32: unpacked (pack-quantized) and (q − zp) · scale."""
    from loratool.maths.quant import int_dequantize, unpack_int32

    q = unpack_int32(stored, s.params["bits"], s.shape[1]) if s.params["packed"] else stored
    return int_dequantize(q, load(s.siblings["scale"]), _ct_zero(s, load))


def _ct_zero(s: Storage, load: Load) -> torch.Tensor | None:
    """A compressed-tensors zero point as values (rows, groups) or one; packed along rows unless per tensor."""
    from loratool.maths.quant import unpack_int32

    if s.params["symmetric"]:
        return None
    zero = load(s.siblings["zero_point"])
    if s.params["strategy"] == "tensor" or not s.params["packed"]:
        return zero
    return unpack_int32(zero.T, s.params["bits"], s.shape[0]).T


def quantize_ct(s: Storage, w: torch.Tensor, load: Load) -> dict[str, torch.Tensor]:
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
