"""Row blocks: a quantized weight dequantized and requantized a few rows at a time, so a merge never
holds a float32 copy of a whole tensor (ops/merge.py, maths.merge.merge_blocked_through). block_rows
says how many leading rows share no scale with the rest; RowBlocks cuts the weight and its scale
tensors to such blocks and writes each block's requantized bytes and scales into whole outputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loratool.storage.codec import dequantize, requantize
from loratool.storage.descriptor import Load, Storage

if TYPE_CHECKING:
    import torch


def block_rows(s: Storage) -> int | None:
    """The fewest leading rows of s that form a weight of their own: rows that share no scale with
    rows outside them, so dequantized and requantized alone they give the whole tensor's bits.

    fp8, scaled fp8, LLM.int8 and NVFP4 (its 16-value block scales lie along a row, its tensor scale
    is kept) split by single rows, block fp8 by its tiles' rows, compressed-tensors ints by rows (32
    where a zero point is packed along them), bitsandbytes 4-bit by whole absmax blocks (whole nested
    blocks of them). None: s does not split (a 1-D weight, one scale over the whole tensor: ComfyUI's
    comfy_fp8 and comfy_nvfp4 recompute theirs from the whole tensor's amax; MXFP4's experts, stored
    transposed; a scheme loratool refuses).
    """
    if not s.supported or len(s.shape) < 2 or s.shape[0] < 2:
        return None
    cols = math.prod(s.shape[1:])
    if s.scheme in ("fp8", "fp8_scaled", "bnb_int8", "nvfp4"):
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
        elif s.scheme == "nvfp4":  # two codes a byte, one fp8 scale per 16 values, the tensor scale whole
            spans[s.key] = (self.stored.shape[1], start, stop)
            spans[sib["scale"]] = (self.siblings[sib["scale"]].shape[1], start, stop)
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
        if self.s.scheme not in ("bnb_nf4", "bnb_fp4", "nvfp4") and not self.s.params.get("packed"):
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
