"""GGUF tensors as storage descriptors: one per GGML type (F32/F16/BF16, the legacy quants and the
K-quants Q2_K..Q6_K), dequantized and requantized a run of whole rows at a time as ggml's reference
quantizer does (maths/ggml.py). merge_gguf builds these from a GGUF file's tensor table; the
i-quants and other types are known but unsupported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loratool.storage.descriptor import Storage

if TYPE_CHECKING:
    import torch


GGUF_FLOATS = ("F32", "F16", "BF16")
GGUF_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def gguf_storage(key: str, ggml_type: str, shape: tuple[int, ...]) -> Storage:
    """The descriptor of a GGUF tensor of GGML type `ggml_type` (its name: "Q4_K", "F16", ...) and
    logical shape (numpy order, the last axis contiguous). Other types (the i-quants, TQ*, MXFP4, ...)
    are known but unsupported."""
    supported = ggml_type in GGUF_FLOATS + GGUF_QUANTS
    return Storage(key, "gguf" if supported else f"gguf {ggml_type}", ggml_type, tuple(shape), supported=supported)


def dequantize_gguf(s: Storage, stored: torch.Tensor) -> torch.Tensor:
    """stored: whole rows as the file holds them (raw uint8 (rows, bytes per row) for the block types)."""
    import torch

    if s.dtype == "BF16" and stored.dtype in (torch.uint8, torch.int16, torch.uint16):
        stored = stored.contiguous().view(torch.bfloat16)
    if s.dtype in GGUF_FLOATS:
        return stored.to(torch.float32)
    from loratool.maths.ggml import dequantize as ggml_dequantize

    return torch.from_numpy(ggml_dequantize(s.dtype, stored.reshape(stored.shape[0], -1).numpy()))


def quantize_gguf(s: Storage, w: torch.Tensor) -> torch.Tensor:
    """w float32 (rows, columns) -> the rows as stored: float of the GGML type, or raw uint8 blocks."""
    import torch

    if s.dtype in GGUF_FLOATS:
        return w.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[s.dtype])
    from loratool.maths.ggml import quantize as ggml_quantize

    return torch.from_numpy(ggml_quantize(s.dtype, w.reshape(w.shape[0], -1).contiguous().numpy()))
