"""What a quantized base weight is: its storage descriptor (Storage) and a checkpoint's set of them
(BaseStorage), with the scheme names and the tensor-name rules detect() uses. Pure data: how the
schemes are found is in loratool/storage/__init__.py, their maths behind storage/codec.py."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import IncompatibleError

if TYPE_CHECKING:
    import torch

    from loratool.io.header import TensorInfo

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
SUPPORTED = ("fp8", "fp8_scaled", "fp8_block", "bnb_nf4", "bnb_fp4", "bnb_int8", "ct_int", "mxfp4", "nvfp4",
             "comfy_fp8", "comfy_nvfp4")


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
                 "ct_int": ("scale", "zero_point"), "mxfp4": ("scales",), "nvfp4": ("scale",), "comfy_fp8": ("scale",),
                 "comfy_nvfp4": ("scale", "scale_2")}.get(self.scheme, ())
        return [self.siblings[r] for r in roles if r in self.siblings]

    @property
    def stochastic(self) -> bool:
        """Whether quantize() honours a generator (--rounding stochastic): the fp8 and e2m1 schemes."""
        return (self.scheme.startswith("fp8") or self.dtype in FP8_DTYPES
                or self.scheme in ("mxfp4", "nvfp4", "comfy_nvfp4"))

    @property
    def name(self) -> str:
        """The weight's key as the model names it: compressed-tensors' `<m>.weight_packed` is `<m>.weight`,
        gpt-oss's MXFP4 `<p>_blocks` is transformers' parameter `<p>`."""
        if self.key.endswith(".weight_packed"):
            return self.key[: -len("_packed")]
        if self.params.get("layout") == "gpt-oss" and self.key.endswith("_blocks"):
            return self.key[: -len("_blocks")]
        return self.key

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

    @property
    def unsupported(self) -> list[Storage]:
        return [s for s in self.tensors.values() if not s.supported]

    @property
    def quantized(self) -> bool:
        return bool(self.tensors)

    def of(self, key: str) -> Storage | None:
        return self.tensors.get(key)

    def logical(self, tensors: dict[str, TensorInfo], *, renamed: bool = False) -> dict[str, TensorInfo]:
        """The checkpoint's tensors as a merge sees them: weights with logical shapes, siblings left out;
        with `renamed`, a weight stored under another key (`<m>.weight_packed`) under its `<m>.weight`
        (stored_keys maps it back)."""
        out = {}
        for k, info in tensors.items():
            if k in self.siblings or k in self.markers:
                continue
            s = self.tensors.get(k)
            out[s.name if renamed and s is not None else k] = (
                dataclasses.replace(info, shape=s.shape) if s is not None and s.shape else info)
        return out

    @property
    def stored_keys(self) -> dict[str, str]:
        """logical weight key -> stored key, for the weights stored under another key."""
        return {s.name: s.key for s in self.tensors.values() if s.name != s.key}

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

    def refuse_dequantized_output(self, where: Path | str) -> None:
        """An Error when a dequantized output (--dtype) cannot keep a weight's key: gpt-oss's MXFP4
        `<p>_blocks` dequantizes to transformers' `<p>` (renamed and transposed), compressed-tensors'
        `<m>.weight_packed` to `<m>.weight`."""
        s = next((s for s in self.tensors.values() if s.params.get("layout") in ("gpt-oss", "compressed-tensors")),
                 None)
        if s is None:
            return
        name = s.key[: -len("_blocks")] if s.params["layout"] == "gpt-oss" else s.key[: -len("_packed")]
        raise IncompatibleError(
            f"{where}: '{s.key}' is {s.scheme} ({s.params['layout']}); written dequantized it would be '{name}', "
            "renamed, which merge does not do",
            hint="merge with --dtype keep (the weights stay quantized), or dequantize the base with transformers "
                 "and save it in 16-bit first",
        )

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


def read_json_tensor(info: TensorInfo) -> dict[str, Any]:
    from loratool.io.tensors import read_bytes

    try:
        doc = json.loads(read_bytes(info).rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        from loratool.errors import FormatError

        raise FormatError(f"{info.path}: '{info.key}' is not the JSON its writer (bitsandbytes, ComfyUI) stores ({e})"
                          ) from None
    if not isinstance(doc, dict):
        from loratool.errors import FormatError

        raise FormatError(f"{info.path}: '{info.key}' is not a JSON object")
    return doc


Load = Callable[[str], "torch.Tensor"]
