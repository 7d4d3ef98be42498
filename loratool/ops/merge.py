"""merge: stream adapters into base weights, W' = W + Σ w_i·ΔW_i, in bounded memory.

Three pieces, each in its own home: the plan (which base tensor receives which delta, from
headers only) is keymap.plan_merge; the per-tensor maths (float32, in reused buffers) is
maths.merge.merged_tensor; the streaming read/compute/write over each base file is
pipeline.stream_file, with a fourth thread computing the base files' sha256 from the start
(while torch is imported), no further ahead of the merge than the page cache keeps. This module
ties them together: it decides per tensor what is written (merged, replaced by a modules_to_save
copy, cast, or copied byte for byte; a large tensor by pieces of rows), checks the result, and
reports.

The output mirrors the base: same file names, shard split, header key order, data order and
dtypes (unless --dtype), the index, and every other file. Peak memory is a few times the largest
tensor plus the adapters, whatever the model or shard size.
"""

from __future__ import annotations

import math
import os
import secrets
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError, IncompatibleError, LoratoolError
from loratool.io.checkpoint import Checkpoint
from loratool.io.copies import BackgroundSha256, cache_lead, sha256_file
from loratool.io.header import TensorInfo
from loratool.keymap import Contribution, MergePlan, plan_merge
from loratool.maths.merge import BlockedMerge, Workspace, merged_tensor, realized_delta
from loratool.maths.quant import nf4_roundtrip
from loratool.ops import Phase
from loratool.ops.merge_report import MergeReport, Progress, TensorStat
from loratool.pipeline import Buffers, Cast, Compute, Pending, copy_other_files, gc_paused, stream_file
from loratool.storage import (
    FP8_DTYPES,
    BaseStorage,
    Storage,
    block_rows,
    dequantize,
    detect,
    quantize,
    requantize,
    row_blocks,
)

if TYPE_CHECKING:
    import torch

OUT_DTYPES = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ROUNDINGS = ("nearest", "stochastic")
_FLOAT = ("float64", "float32", "float16", "bfloat16")


# ---------------------------------------------------------------------------------------------
# per tensor


def _finite_or_raise(new: torch.Tensor, out_dtype: str, key: str, contribs: list[Contribution]) -> None:
    """NaN/Inf in the float32 result, or values the output dtype cannot hold (one pass: aminmax)."""
    import torch

    if not new.is_floating_point() or new.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(new))
    _range_or_raise(lo, hi, out_dtype, key, contribs)


def _range_or_raise(lo: float, hi: float, out_dtype: str, key: str, contribs: list[Contribution]) -> None:
    import torch

    limit = torch.finfo(getattr(torch, out_dtype)).max if out_dtype in _FLOAT + FP8_DTYPES else math.inf
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= limit:
        return
    names = ", ".join(sorted({f"{c.adapter}: '{c.module.name}'" for c in contribs})) or "a saved tensor"
    problem = "NaN/Inf values" if not (math.isfinite(lo) and math.isfinite(hi)) else \
        f"values up to {max(-lo, hi):.3g}, beyond what {out_dtype} holds"
    raise IncompatibleError(
        f"merging into '{key}' gives {problem} (from {names})",
        hint="check the adapter with: loratool validate ADAPTER" + (", or keep a wider --dtype"
                                                                     if "beyond" in problem else ""),
    )


def _out_dtype(info: TensorInfo, dtype: str) -> str:
    target = OUT_DTYPES[dtype]
    return target if target is not None and info.dtype in _FLOAT else info.dtype


def _seed_for(seed: int, key: str) -> int:
    """One stochastic-rounding stream per tensor: results do not depend on order or sharding."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 63)


@dataclass
class _Setup:
    """What every tensor of one merge shares."""

    plan: MergePlan
    storage: BaseStorage
    ckpt: Checkpoint
    dtype: str
    device: str
    unmerge: bool
    stats: bool
    rounding: str
    seed: int
    qlora_base: str | None
    dequantize: bool  # --dtype on a quantized base: write plain floats, leave the scales out
    dropped: set[str] = field(default_factory=set)  # keys the output leaves out
    # tensors merged by pieces whose last piece may still be settling: (its event, what counts it)
    settling: list[tuple[Any, Callable[[], None]]] = field(default_factory=list)
    produced: dict[str, str] = field(default_factory=dict)  # recomputed sibling key -> its weight key

    def out_entry(self, info: TensorInfo) -> tuple[str, tuple[int, ...]] | None:
        if info.key in self.dropped:
            return None
        s = self.storage.of(info.key)
        if s is not None and self.dequantize:
            target = OUT_DTYPES[self.dtype]
            assert target is not None
            return target, s.shape
        return _out_dtype(info, self.dtype), self.plan.reshaped.get(info.key, info.shape)

    def needs_bytes(self, info: TensorInfo) -> bool:
        key = info.key
        if key in self.dropped or key in self.produced:
            return False
        if key in self.plan.deltas or key in self.plan.biases:
            return True
        if key in self.plan.replacements:
            return False
        if self.storage.of(key) is not None:
            return self.dequantize
        return _out_dtype(info, self.dtype) != info.dtype

    def load(self, key: str) -> torch.Tensor:
        from loratool.io.tensors import load_tensor

        return load_tensor(self.ckpt.tensors[key])


def _tensor_step(setup: _Setup, report: MergeReport, *, name: str, work: Workspace) -> Compute:
    """What each tensor of one base file becomes: merged, replaced, or as stored (counted in report)."""
    plan = setup.plan

    parts: dict[str, list[tuple[int, BlockedMerge]]] = {}  # a tensor merged by pieces: (rows, what they measured)

    def compute(info: TensorInfo, stored: torch.Tensor | None, cast: Cast, rows: tuple[int, int] | None = None
                ) -> torch.Tensor | dict[str, torch.Tensor] | Pending | None:
        import threading

        import torch

        if rows is None or rows[0] == 0:  # a new tensor: those merged by pieces before it are counted first
            _count_settled(setup)

        key = info.key
        s = setup.storage.of(key)
        requantizing = s is not None and not setup.dequantize
        entry = setup.out_entry(info)
        assert entry is not None
        out_dtype = entry[0]
        generator = None
        if setup.rounding == "stochastic":
            generator = torch.Generator(device="cpu").manual_seed(_seed_for(setup.seed, key))
        if key in plan.deltas or key in plan.biases:
            assert stored is not None
            contribs = plan.deltas.get(key) or plan.biases[key]
            slotted = hasattr(cast, "buffer")  # an output slot to fill block by block (the pipeline's)
            blocked = _blocked_term(setup, info, s, contribs, blocks=slotted)
            if blocked is not None and s is not None:
                return _merge_quantized_blocked(setup, report, name=name, s=s, stored=stored, term=blocked,
                                                out_dtype=out_dtype, cast=cast, work=work, generator=generator)
            experts = None if blocked is not None else _expert_terms(setup, info, s, contribs, blocks=slotted)
            if blocked is not None or experts is not None:
                free = None if rows is None else threading.Event()
                out, settle, count = _merge_piece(
                    setup, report, name=name, info=info, stored=stored, rows=rows or (0, info.shape[0]),
                    terms=experts or [blocked], experts=experts is not None,  # type: ignore[list-item]
                    out_dtype=out_dtype, cast=cast, work=work, parts=parts.setdefault(key, []),
                    inputs_free=None if free is None else free.set)
                if rows is None:
                    settle()
                    count()
                    return out
                assert free is not None
                if rows[1] < info.shape[0]:
                    return out, settle, free
                return out, _last_piece(setup, settle, count), free
            assert rows is None, "a tensor streamed by pieces is merged by blocks"
            base = stored
            if s is not None:
                base = dequantize(s, stored, setup.load)
            if setup.qlora_base and key in plan.deltas:
                base = nf4_roundtrip(base.to(torch.float32))
            if key in plan.reshaped:  # a control LoRA's wider img_in: the new input channels start at zero
                if s is not None:
                    raise IncompatibleError(f"{setup.ckpt.root}: '{key}' is stored {s.describe()}; widening it to "
                                            f"{plan.reshaped[key]} (a control LoRA) needs a plain float base")
                wide = torch.zeros(plan.reshaped[key], dtype=base.dtype)
                wide[tuple(slice(0, d) for d in base.shape)] = base
                base = wide
            w32, new, _ = merged_tensor(base, [c.term for c in contribs], device=setup.device,
                                        unmerge=setup.unmerge, bias=key in plan.biases, work=work)
            limit = out_dtype if not requantizing else (s.dtype if s is not None and s.scheme == "fp8" else "float32")
            _finite_or_raise(new, limit, key, contribs)
            outs: dict[str, torch.Tensor] = {}
            if s is not None and requantizing:
                outs, written = requantize(s, new.to("cpu"), setup.load, generator=generator)
                out = outs[key]
                written = written.to(new.device)
            else:
                out = cast(new, out_dtype)
                written = out.to(new.device) if out.device != new.device else out
            w_norm = float(w32.norm()) if setup.stats else 0.0
            dd_root, de_sum, err_norm, worst = realized_delta(w32, new, written)
            retained = de_sum / (dd_root * dd_root) if dd_root > 0 else None
            rel_error = err_norm / dd_root if dd_root > 0 else None
            report.realized.append((key, retained, rel_error, worst))
            changed = dd_root * dd_root + 2 * (de_sum - dd_root * dd_root) + err_norm * err_norm
            if dd_root > 0 and changed > 1e-12 * dd_root * dd_root:
                report.changed += 1
            if setup.stats:
                report.tensors.append(TensorStat(
                    key, name, sorted({c.module.name for c in contribs}), dd_root, dd_root / max(w_norm, 1e-30),
                    worst, retained, rel_error, s.describe() if s is not None else "float"))
            report.merged += 1
            del w32, new, written
            return {**outs, key: out} if outs else out
        if key in plan.replacements:
            saved = plan.replacements[key].load().to(torch.float32)
            _finite_or_raise(saved, out_dtype if not requantizing else "float32", key, [])
            if setup.stats:
                report.tensors.append(TensorStat(key, name, [], 0.0, 0.0, 0.0, replaced=True,
                                                 storage=s.describe() if s is not None else "float"))
            report.replaced += 1
            report.changed += 1
            if s is not None and requantizing:
                outs = quantize(s, saved, setup.load, generator=generator)
                return outs if len(outs) > 1 else outs[key]
            return saved.to(getattr(torch, out_dtype))
        report.copied += 1  # as stored: byte for byte, cast to --dtype, or dequantized
        if s is not None and setup.dequantize:
            assert stored is not None
            blocks = row_blocks(s, stored, setup.load) if hasattr(cast, "buffer") else None
            if blocks is None:
                return cast(dequantize(s, stored, setup.load), out_dtype)
            from loratool.maths.merge import BLOCK_ELEMENTS  # read now: tests make blocks small

            out = cast.buffer(s.shape, out_dtype)  # type: ignore[attr-defined]
            flat = out.view(out.shape[0], -1)
            step = blocks.rows * max(1, BLOCK_ELEMENTS // (blocks.rows * flat.shape[1]))
            for a in range(0, flat.shape[0], step):  # a float32 block at a time, never the whole tensor
                flat[a:a + step].copy_(blocks.dequantize(a, min(a + step, flat.shape[0])))
            return out
        return None

    return compute


def _blocked_term(setup: _Setup, info: TensorInfo, s: Storage | None, contribs: list[Contribution], *,
                  blocks: bool) -> Contribution | None:
    """The one contribution of a tensor that maths.merge.merge_blocked can merge, or None.

    The common case, on the CPU: one plain LoRA (no DoRA, no LyCORIS, not transposed) into a float
    tensor stored as it is (no QLoRA round trip), written to a float dtype, or into a quantized tensor
    whose scheme splits into row blocks (storage.block_rows). A float64 tensor is not: merge_blocked
    works in float32, merged_tensor keeps float64. `blocks`: its bytes are at hand and an output slot
    can be filled block by block.
    """
    key = info.key
    if not _blockable(setup, info, s, blocks=blocks) or len(contribs) != 1 or len(
            s.shape if s is not None else info.shape) < 2:
        return None
    c = contribs[0]
    m = c.module
    if key in setup.plan.reshaped:  # a widened weight (a control LoRA's img_in) is padded, then merged_tensor
        return None
    if not isinstance(m, LoraModule) or m.magnitude is not None or m.kind == "embedding" or m.fan_in_fan_out \
            or c.rows is not None:  # a part of a fused weight (families/layout.py): merged_tensor adds its rows
        return None
    return c


def _blockable(setup: _Setup, info: TensorInfo, s: Storage | None, *, blocks: bool) -> bool:
    """Whether the tensor can be merged by blocks at all: merged on the CPU into an output slot, no QLoRA
    round trip, and either a float tensor (not float64) stored as it is (maths.merge.merge_blocked) or a
    quantized one whose scheme splits into row blocks (storage.block_rows, merge_blocked_through)."""
    import torch

    if setup.qlora_base or setup.device != "cpu" or info.key not in setup.plan.deltas or not blocks:
        return False
    if s is not None:
        return block_rows(s) is not None
    dtype = getattr(torch, info.dtype, None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float64


def _expert_terms(setup: _Setup, info: TensorInfo, s: Storage | None, contribs: list[Contribution], *,
                  blocks: bool) -> list[Contribution] | None:
    """The contributions of a fused (E, d1, d2) expert tensor that merge_blocked can merge expert by
    expert (one plain LoRA per expert, every expert once; docs/moe.md), in expert order, or None."""
    if s is not None or not _blockable(setup, info, s, blocks=blocks) or len(info.shape) != 3:
        return None  # a float tensor only: a quantized one goes whole
    by_expert: dict[int, Contribution] = {}
    for c in contribs:
        m = c.module
        if (not isinstance(m, LoraModule) or m.expert is None or m.magnitude is not None or c.rows is None
                or c.rows[1] != c.rows[0] + 1 or c.rows[0] in by_expert):
            return None
        by_expert[c.rows[0]] = c
    if sorted(by_expert) != list(range(info.shape[0])):
        return None
    return [by_expert[e] for e in range(info.shape[0])]


PIECE_BYTES = 16 << 20  # stored bytes per piece of a tensor streamed by pieces (pipeline.Pieces)


def _pieces(setup: _Setup, info: TensorInfo) -> list[tuple[int, int]] | None:
    """Row ranges to stream a tensor by (read, merged and written piece by piece, so memory holds a few
    pieces, not the tensor), or None to take it whole: a tensor larger than a piece that _merge_piece
    merges, cut between experts of a fused expert tensor, else on merge_blocked's block edges (the
    same blocks, so the same bits, as the whole tensor)."""
    from loratool.maths.merge import BLOCK_ELEMENTS  # read now: tests make blocks small

    contribs = setup.plan.deltas.get(info.key)
    s = setup.storage.of(info.key)
    if not contribs or s is not None or info.nbytes <= PIECE_BYTES or not info.shape[0]:
        return None
    if _blocked_term(setup, info, s, contribs, blocks=True) is not None:
        unit = max(1, BLOCK_ELEMENTS // max(math.prod(info.shape[1:]), 1))
    elif _expert_terms(setup, info, s, contribs, blocks=True) is not None:
        unit = 1
    else:
        return None
    n = info.shape[0]
    # two blocks at least: a lone block runs on the calling thread, with torch's threads, where the BLAS may
    # order a product's terms otherwise than the workers do for the same block of the whole tensor
    per = max(2 * unit, PIECE_BYTES // (info.nbytes // n) // unit * unit)
    if per >= n:
        return None
    cuts = list(range(0, n, per))
    if n - cuts[-1] <= unit:  # a tail of one block: with the piece before it
        cuts.pop()
    return [(a, z) for a, z in zip(cuts, [*cuts[1:], n])]


def _merge_piece(setup: _Setup, report: MergeReport, *, name: str, info: TensorInfo, stored: torch.Tensor,
                 rows: tuple[int, int], terms: list[Contribution], experts: bool, out_dtype: str, cast: Cast,
                 work: Workspace, parts: list[tuple[int, BlockedMerge]], inputs_free: Callable[[], None] | None = None
                 ) -> tuple[torch.Tensor, Callable[[], None], Callable[[], None]]:
    """Rows start:stop of a tensor (all of it, or one piece: `stored` holds them) through
    maths.merge.merge_blocked into an output slot: W' written straight into the output dtype, never a
    float32 copy of the tensor. Either one plain LoRA (terms: its one contribution), or a fused (E, d1,
    d2) expert tensor, one expert slice at a time (terms: one per expert; an expert stored (in, out)
    merges (up @ down)ᵀ = downᵀ @ upᵀ).

    The rows are queued to the block workers, not waited for: (the output slot, settle, count).
    settle() waits for them and checks the range (raises IncompatibleError); the slot must stay as it is
    until then, and `stored` until inputs_free() is called (from whichever thread finishes last). What
    each piece measured collects in `parts`; count() puts the tensor in the report once every piece has
    settled (on the calling thread: the report is not thread-safe).
    """
    import torch

    from loratool.io.tensors import TensorRef
    from loratool.maths.merge import BLOCK_ELEMENTS, joined, queue_blocked_many  # read now: tests make blocks small

    key = info.key
    out = cast.buffer(stored.shape, out_dtype)  # type: ignore[attr-defined]
    assert out.dtype == getattr(torch, out_dtype)
    sign = -1.0 if setup.unmerge else 1.0
    start, stop = rows

    def jobs() -> Iterator[tuple[torch.Tensor, LoraModule, float, torch.Tensor]]:
        for e, term in enumerate(terms[start:stop]):
            m = term.module
            assert isinstance(m, LoraModule)
            if m.fan_in_fan_out:
                m = m.with_(up=TensorRef.from_tensor(m.down.load().T), down=TensorRef.from_tensor(m.up.load().T),
                            fan_in_fan_out=False)
            yield stored[e], m, sign * term.weight, out[e]

    if experts:  # every expert queued before any is waited for: the workers merge e while e + 1's factors are made
        finish = queue_blocked_many(jobs(), work=work, block=BLOCK_ELEMENTS, w_norm=setup.stats,
                                    on_done=inputs_free)
    else:
        m = terms[0].module
        assert isinstance(m, LoraModule)
        finish = queue_blocked_many([(stored, m, sign * terms[0].weight, out)], work=work, block=BLOCK_ELEMENTS,
                                    w_norm=setup.stats, first=start, on_done=inputs_free)

    def settle() -> None:
        piece = joined(finish())
        _range_or_raise(piece.lo, piece.hi, out_dtype, key, terms)
        parts.append((stop - start, piece))

    def count() -> None:
        if sum(n for n, _ in parts) == info.shape[0]:  # every piece settled (else the merge is failing)
            _count_blocked(report, joined([p for _, p in parts]), key=key, name=name,
                           names=sorted({t.module.name for t in terms}), storage="float", stats=setup.stats)
        parts.clear()

    return out, settle, count


def _last_piece(setup: _Setup, settle: Callable[[], None], count: Callable[[], None]) -> Callable[[], None]:
    """settle for a tensor's last piece: once it has run (on the pipeline's writer thread, after the earlier
    pieces), the tensor is ready to be counted, which _count_settled does on the calling thread."""
    import threading

    done = threading.Event()

    def last() -> None:
        try:
            settle()
        finally:
            done.set()

    setup.settling.append((done, count))
    return last


def _count_settled(setup: _Setup) -> None:
    """The tensors merged by pieces so far into the report, in file order: waits for their last pieces."""
    while setup.settling:
        done, count = setup.settling.pop(0)
        done.wait()
        count()


def _count_blocked(report: MergeReport, r: BlockedMerge, *, key: str, name: str, names: list[str], storage: str,
                   stats: bool) -> None:
    """A blocked merge's realized delta into the report (what the whole-tensor path counts in compute)."""
    retained = r.de_sum / (r.dd_root * r.dd_root) if r.dd_root > 0 else None
    rel_error = r.err_norm / r.dd_root if r.dd_root > 0 else None
    report.realized.append((key, retained, rel_error, r.worst))
    changed = r.dd_root * r.dd_root + 2 * (r.de_sum - r.dd_root * r.dd_root) + r.err_norm * r.err_norm
    if r.dd_root > 0 and changed > 1e-12 * r.dd_root * r.dd_root:
        report.changed += 1
    if stats:
        report.tensors.append(TensorStat(key, name, names, r.dd_root, r.dd_root / max(r.w_norm, 1e-30), r.worst,
                                         retained, rel_error, storage))
    report.merged += 1


def _merge_quantized_blocked(setup: _Setup, report: MergeReport, *, name: str, s: Storage, stored: torch.Tensor,
                             term: Contribution, out_dtype: str, cast: Cast, work: Workspace,
                             generator: torch.Generator | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """One quantized tensor by row blocks (storage.row_blocks): each block dequantized, merged in
    float32 and requantized (or cast, with --dtype), so memory holds a few blocks, not a float32 copy
    of the tensor. The same bits as the whole-tensor path: no block shares a scale with another, and
    a seeded stochastic rounding draws its stream block after block, in row order."""
    from loratool.maths.merge import BLOCK_ELEMENTS, merge_blocked_through  # read now: tests make blocks small

    blocks = row_blocks(s, stored, setup.load)
    assert blocks is not None
    out = cast.buffer(s.shape if setup.dequantize else stored.shape,  # type: ignore[attr-defined]
                      out_dtype)
    if setup.dequantize:
        rows = out.view(out.shape[0], -1)

        def store(a: int, z: int, new: torch.Tensor) -> torch.Tensor:
            rows[a:z].copy_(new)
            return rows[a:z]
        limit = out_dtype
    else:
        blocks.output(out)

        def store(a: int, z: int, new: torch.Tensor) -> torch.Tensor:
            return blocks.requantize(a, z, new, generator=generator)
        limit = s.dtype if s.scheme == "fp8" else "float32"
    factor = (-1.0 if setup.unmerge else 1.0) * term.weight
    r = merge_blocked_through(blocks.dequantize, store, s.shape, term.module, factor,  # type: ignore[arg-type]
                              rows=blocks.rows, block=BLOCK_ELEMENTS, work=work, w_norm=setup.stats,
                              threads=1 if generator is not None else None)
    _range_or_raise(r.lo, r.hi, limit, s.key, [term])
    _count_blocked(report, r, key=s.key, name=name, names=[term.module.name], storage=s.describe(), stats=setup.stats)
    return out if setup.dequantize else dict(blocks.outs)


# ---------------------------------------------------------------------------------------------
# files


def _provenance(params: dict[str, Any], adapter_hashes: dict[str, str], base_file: Path
                ) -> tuple[dict[str, str], str]:
    """Metadata for one output file; the base file's sha256 is a placeholder patched after streaming.
    The adapters' files are hashed once per merge (adapter_hashes), not once per output file."""
    from loratool.formats import provenance

    placeholder = secrets.token_hex(32)
    meta = provenance("merge", params, [], hashes={str(base_file): placeholder, **adapter_hashes})
    return meta, placeholder


def adapter_module_weights(adapters: list[Adapter], module_weights: str | None, blocks: str | None
                           ) -> tuple[list[dict[str, float]] | None, list[str]]:
    """Per adapter, each module's --module-weights / --blocks multiplier (None when neither is given)."""
    from loratool.formats.blocks import module_weights as resolve

    if module_weights is None and blocks is None:
        return None, []
    out, warnings = [], []
    for a in adapters:
        mw = resolve([*a.modules, *a.lycoris], module_weights, blocks)
        out.append(mw.weights)
        warnings += [f"{a.path}: {w}" for w in mw.warnings(blocks.partition(":")[0] if blocks else None)]
    return out, warnings


def read_and_plan(op: str, adapters: Sequence[str | os.PathLike[str]], weights: list[float], ckpt: Any,
                  storage: Any, *, allow_pickle: bool, allow_unmatched: bool, unmerge: bool,
                  module_weights: str | None, blocks: str | None,
                  allow_variant: bool = False) -> tuple[list[Adapter], Any, list[str]]:
    """The adapters read and checked, and the plan of which base tensor each changes (shared by
    merge and verify, so verify checks exactly what merge would have done): (adapters, plan, warnings)."""
    from loratool.formats import detect, read, require_plain
    from loratool.variants import guard

    loaded = []
    variant_warnings = []
    for p in adapters:
        try:
            a = read(Path(p), allow_pickle=allow_pickle)
        except FormatError as e:
            base = _adapter_as_base(ckpt, detect)
            if base is None:
                raise
            # the base is an adapter and this is not: BASE and ADAPTER given the other way round
            order = f"loratool merge {p} {base} -o OUT" if op == "merge" else "the base model goes to --base"
            raise FormatError(e.message, hint=f"did you swap them? {base} is an adapter; {order}") from None
        require_plain(a, op, lycoris=True, dora=True)  # DoRA on either axis and on LyCORIS modules: applied
        variant_warnings += guard(a, op, allow_variant)  # unconverted PiSSA / OLoRA / CorDA / LoftQ, aLoRA
        loaded.append(a)
    per_module, mw_warnings = adapter_module_weights(loaded, module_weights, blocks)
    plan, warnings = plan_merge(loaded, weights, ckpt, allow_unmatched=allow_unmatched, unmerge=unmerge,
                                tensors=storage.logical(ckpt.tensors, renamed=True), module_weights=per_module)
    for logical, stored in storage.stored_keys.items():  # planned on `<m>.weight`, stored as `<m>.weight_packed`
        if logical in plan.deltas:
            plan.deltas[stored] = plan.deltas.pop(logical)
        if logical in plan.replacements:
            plan.replacements[stored] = plan.replacements.pop(logical)
    for key, contribs in [*plan.deltas.items(), *plan.biases.items()]:
        info = ckpt.tensors[key]
        if storage.of(key) is None and info.dtype not in _FLOAT:  # bool, integer: not a weight to add to
            raise IncompatibleError(
                f"{info.path}: base tensor '{key}' is {info.dtype}, not a floating-point weight; a delta cannot be "
                f"added to it (module '{contribs[0].module.name}')",
                hint="check that BASE is the model the adapter was trained on")
    return loaded, plan, variant_warnings + mw_warnings + warnings


def _adapter_as_base(ckpt: Any, detect: Callable[[Path], str]) -> Path | None:
    """The base path when it holds an adapter (a PEFT folder, a kohya file), else None."""
    for path in [ckpt.root, *ckpt.files[:1]] if len(ckpt.files) == 1 else [ckpt.root]:
        try:
            detect(path)
        except LoratoolError:
            continue
        return Path(path)
    return None


def checked_options(op: str, adapters: Sequence[object], weights: Sequence[float] | None, dtype: str) -> list[float]:
    """The adapters' weights (default 1 each) after the option checks merge and verify share.

    Raises:
        IncompatibleError: no adapter, a weight count that differs from the adapters', a weight that
            is not finite, an unknown --dtype.
    """
    if not adapters:
        raise IncompatibleError(f"{op} needs at least one adapter")
    out = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(out) != len(adapters):
        raise IncompatibleError(f"--weights has {len(out)} value(s) for {len(adapters)} adapter(s)")
    if not all(math.isfinite(w) for w in out):
        raise IncompatibleError(f"--weights must be finite numbers, got {out}")
    if dtype not in OUT_DTYPES:
        raise IncompatibleError(f"--dtype {dtype}: unknown", hint="use keep, fp32, fp16 or bf16")
    return out


def merge(
    base: str | os.PathLike[str],
    adapters: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    dtype: str = "keep",
    device: str = "cpu",
    unmerge: bool = False,
    allow_unmatched: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    stats: bool = False,
    rounding: str = "nearest",
    seed: int | None = None,
    min_retained: float = 0.5,
    strict: bool = False,
    qlora_base: str | None = None,
    module_weights: str | None = None,
    blocks: str | None = None,
    progress: Progress | None = None,
    phase: Phase | None = None,
    allow_variant: bool = False,
) -> MergeReport:
    """Merge adapters into a base checkpoint and write a complete copy of it.

    A quantized base (fp8, ComfyUI scaled fp8 and comfy_quant, block fp8, bitsandbytes nf4/fp4/int8, NVFP4,
    MXFP4, compressed-tensors int; see loratool/storage/) is dequantized exactly, merged in float32 and
    quantized back with the same scheme, tensor by tensor (by row blocks where the scheme splits); with a
    --dtype other than keep it is written dequantized instead. Every merged tensor's realized delta is
    measured (report.realized): retained = <R, ΔW> / ||ΔW||² with R the change the stored result makes.

    Args:
        base: a .safetensors file, a directory with model.safetensors, a sharded directory, or a GGUF
            model file (ops/merge_gguf.py: each adapted tensor dequantized, merged, and written in its
            own type where the gguf package can quantize to it, else refused unless `dtype` is given).
        adapters: one or more adapter paths (any supported format).
        weights: one per adapter (default 1.0 each); negative allowed.
        dtype: keep | fp32 | fp16 | bf16 for floating tensors of the output (on a quantized base:
            write it dequantized, without its scales and config.json's quantization_config).
        device: auto | cpu | cuda | cuda:N (auto: cuda when available).
        unmerge: subtract the deltas instead (refused for DoRA and modules_to_save).
        allow_unmatched: skip modules that match no base weight (with a warning) instead of failing.
        stats: keep per merged tensor the delta norm, relative change, cast error, retention
            (report.tensors, for --report).
        rounding: nearest (ties to even) | stochastic, for fp8 and fp4 (e2m1: MXFP4, NVFP4) storage.
        seed: the stochastic rounding seed (default 0); each tensor draws from its own stream.
        min_retained: below this retention a merged tensor is a warning (an error with strict).
        strict: refuse (write nothing) when a tensor keeps less than min_retained of its delta.
        qlora_base: "nf4": merge into dequant(quant_nf4(W)), the base a QLoRA adapter trained on.
        module_weights: 'REGEX=W,...' per-module multipliers of every adapter's weight (first
            match wins, on the module names); blocks: 'PRESET:W1,W2,...' per-block multipliers
            (formats/blocks.py). A module at weight 0 is not merged.
        progress: called with (bytes done, bytes total).
        phase: called with what the merge is doing before the bytes flow (reading headers, loading
            torch, reading and matching the adapters, ...).

    Raises:
        IncompatibleError, FormatError, OutputExistsError, LoratoolError (disk full).
    """
    from loratool.hub import resolve_path
    from loratool.io.checkpoint import open_checkpoint

    weights = checked_options("merge", adapters, weights, dtype)
    if rounding not in ROUNDINGS:
        raise IncompatibleError(f"--rounding {rounding}: unknown", hint="use nearest or stochastic")
    if seed is not None and rounding != "stochastic":
        raise IncompatibleError("--seed applies to --rounding stochastic only")
    if qlora_base not in (None, "nf4"):
        raise IncompatibleError(f"--qlora-base {qlora_base}: unknown", hint="use --qlora-base nf4")
    if not (math.isfinite(min_retained) and 0.0 <= min_retained <= 1.0):
        raise IncompatibleError(f"--min-retained must be between 0 and 1, got {min_retained}")
    say = phase or (lambda text: None)
    base_path = resolve_path(base)
    adapters = [resolve_path(a) for a in adapters]
    from loratool.ops.merge_gguf import is_gguf, merge_into_gguf

    if base_path.is_file() and is_gguf(base_path):  # a llama.cpp model: dequantize, add, requantize
        if unmerge:
            raise IncompatibleError(f"{base_path}: --unmerge is not supported for GGUF bases")
        return merge_into_gguf(base_path, [Path(a) for a in adapters], out, weights=weights, dtype=dtype, force=force,
                               allow_pickle=allow_pickle, allow_unmatched=allow_unmatched, stats=stats,
                               progress=progress, allow_variant=allow_variant)
    say(f"reading the headers of {base_path.name}")
    ckpt = open_checkpoint(base_path)
    if not base_path.is_file() and Path(out).suffix == ".safetensors":  # the output mirrors the base's folder
        what = f"{len(ckpt.files)} shards" if ckpt.index is not None else ckpt.files[0].name
        raise IncompatibleError(f"{out}: merging into {base_path} (a folder: {what}) writes a folder; refusing to "
                                "name it *.safetensors",
                                hint=f"give -o a folder name (e.g. -o {Path(out).with_suffix('')})")
    # the base's sha256 starts now, while torch is imported and the adapters are read (a core is
    # idle then), and later stays no further ahead of the merge than the page cache keeps (a quarter
    # of the available memory, 1 GiB at least), so the disk is read once
    sha256 = BackgroundSha256(list(ckpt.files), lead=cache_lead())
    try:
        return _merge(ckpt, sha256, base_path, adapters, out, weights, dtype=dtype, device=device, unmerge=unmerge,
                      allow_unmatched=allow_unmatched, force=force, allow_pickle=allow_pickle, stats=stats,
                      rounding=rounding, seed=seed or 0, min_retained=min_retained, strict=strict,
                      qlora_base=qlora_base, module_weights=module_weights, blocks=blocks, progress=progress,
                      say=say, allow_variant=allow_variant)
    finally:
        sha256.stop()


def _merge(
    ckpt: Checkpoint, sha256: BackgroundSha256, base_path: Path, adapters: list[str | os.PathLike[str]],
    out: str | os.PathLike[str], weights: list[float], *, dtype: str, device: str, unmerge: bool,
    allow_unmatched: bool, force: bool, allow_pickle: bool, stats: bool, rounding: str, seed: int,
    min_retained: float, strict: bool, qlora_base: str | None, progress: Progress | None,
    module_weights: str | None = None, blocks: str | None = None, say: Phase = lambda text: None,
    allow_variant: bool = False,
) -> MergeReport:
    from loratool.device import resolve_device
    from loratool.io.header import read_header
    from loratool.io.outputs import atomic_output

    say("loading torch")
    with gc_paused():  # importing torch makes no garbage worth collecting: ~15% of the import's CPU time
        device = resolve_device(device)
    storage = detect(ckpt)
    storage.refuse_unsupported(base_path)  # up front: never a delta added to bytes we cannot read
    if qlora_base and storage.quantized:
        raise IncompatibleError(
            f"--qlora-base {qlora_base}: {base_path} is already stored quantized ({storage.line()})",
            hint="--qlora-base simulates a 4-bit base on a 16-bit one; on a quantized base, merge without it",
        )
    say(f"reading {len(adapters)} adapter{'s' if len(adapters) > 1 else ''} and matching them to the base")
    loaded, plan, warnings = read_and_plan("merge", adapters, weights, ckpt, storage, allow_pickle=allow_pickle,
                                           allow_unmatched=allow_unmatched, unmerge=unmerge,
                                           module_weights=module_weights, blocks=blocks, allow_variant=allow_variant)
    report = MergeReport(Path(out), base_path, [Path(p) for p in adapters], weights, unmerge, dtype, device,
                         storage=storage.line(), rounding=rounding, min_retained=min_retained,
                         unmatched=plan.unmatched, warnings=warnings, layouts=plan.layouts)
    if not plan.deltas and not plan.replacements:
        raise IncompatibleError(f"nothing to merge: no adapter module matches {base_path}",
                                hint="check with: loratool validate ADAPTER --base BASE")
    dequantizing = dtype != "keep" and storage.quantized
    if dequantizing:
        storage.refuse_dequantized_output(base_path)
    setup = _Setup(plan, storage, ckpt, dtype, device, unmerge, stats, rounding, seed, qlora_base, dequantizing)
    if dequantizing:
        setup.dropped = set(storage.siblings) | set(storage.markers)
    else:
        for key in [*plan.deltas, *plan.replacements]:
            s = storage.of(key)
            for sib in s.changing if s is not None else []:
                setup.produced[sib] = key
    single_file = base_path.is_file()
    params: dict[str, Any] = {"weights": weights, "dtype": dtype, "unmerge": unmerge,
                              "allow_unmatched": allow_unmatched}
    params.update({k: v for k, v in (("module_weights", module_weights), ("blocks", blocks)) if v is not None})
    params.update({"rounding": rounding, "seed": seed} if rounding == "stochastic" else {})
    params.update({"qlora_base": qlora_base} if qlora_base else {})
    total = sum(i.nbytes for i in ckpt.tensors.values())
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        sha256.advance(n)
        if progress:
            progress(done, total)

    say(f"merging into {Path(out).name}")
    with atomic_output(out, force=force, directory=not single_file, inputs=[base_path, *ckpt.files, *adapters],
                       kind="model") as tmp:
        headers = [read_header(f) for f in ckpt.files]
        adapter_hashes = {str(f): sha256_file(f) for a in loaded for f in a.files if f.is_file()}
        buffers = Buffers()
        _stash_early_siblings(setup, headers, buffers)
        finishing: list[Future[None]] = []
        with gc_paused():  # the block loop's small objects would trigger full collections
            try:
                for src, digest in zip(headers, sha256.digests):
                    sha256.advance(src.size - sum(i.nbytes for i in src.tensors.values()))  # header: not ticked
                    dst = tmp if single_file else tmp / src.path.relative_to(ckpt.root)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    meta, placeholder = _provenance(params, adapter_hashes, src.path)
                    meta = {**src.metadata, **meta}
                    name = Path(out).name if single_file else str(src.path.relative_to(ckpt.root))
                    step = _tensor_step(setup, report, name=name, work=buffers.work)
                    finishing.append(stream_file(
                        src, dst, meta, placeholder, out_entry=setup.out_entry, needs_bytes=setup.needs_bytes,
                        compute=step, produced_by=setup.produced.get, pieces=partial(_pieces, setup), tick=tick,
                        digest=digest, buffers=buffers))
                t = time.perf_counter()
                for fut in finishing:
                    fut.result()
                buffers.timings.finish_wait += time.perf_counter() - t
                _count_settled(setup)
            except BaseException:
                wait(finishing)  # an earlier file may still be finishing: let it end before tmp is removed
                raise
        _check_realized(report, strict=strict)
        if not single_file:
            copy_other_files(ckpt, tmp, dtype_changed=dtype != "keep", dropped=setup.dropped,
                             drop_quantization=dequantizing)
        # re-open what was written before it is moved into place
        for src in headers:
            dst = tmp if single_file else tmp / src.path.relative_to(ckpt.root)
            written = read_header(dst)
            expected = {k: setup.out_entry(i) for k, i in src.tensors.items()}
            if list(written.tensors) != [k for k, e in expected.items() if e is not None] or any(
                written.tensors[k].shape != e[1] for k, e in expected.items() if e is not None
            ):
                raise IncompatibleError(f"{dst}: written file does not mirror {src.path}")
        report.timings = buffers.timings.to_dict()
        report.files = len(headers)
        report.size = sum(f.stat().st_size for f in (tmp.rglob("*") if not single_file else [tmp]) if f.is_file())
    return report


def _stash_early_siblings(setup: _Setup, headers: list[Any], buffers: Buffers) -> None:
    """Recomputed scales stored in an earlier file than their weight: compute them before streaming.

    Rare (a shard boundary between a weight and its scales); the weight is computed again at its
    turn, with the same seeded rounding, so both agree.
    """
    file_of = {k: n for n, h in enumerate(headers) for k in h.tensors}
    early = {w for sib, w in setup.produced.items() if file_of[sib] < file_of[w]}
    for key in sorted(early):
        info = setup.ckpt.tensors[key]
        scratch = MergeReport(Path(), Path(), [], [], False, setup.dtype, setup.device)
        step = _tensor_step(replace(setup, stats=False), scratch, name="", work=buffers.work)
        stored = setup.load(key) if setup.needs_bytes(info) else None
        result = step(info, stored, lambda t, d: t.to(getattr(__import__("torch"), d)), None)
        if isinstance(result, dict):
            for k, t in result.items():
                if k != key and file_of.get(k, -1) < file_of[key]:
                    buffers.stash[k] = t.clone()


def _check_realized(report: MergeReport, *, strict: bool) -> None:
    """Warn (or with strict refuse) when tensors kept too little of their delta; refuse a no-op merge."""
    if report.merged and not report.changed:
        worst = report.worst_retained
        raise IncompatibleError(
            f"the merge changed no stored value: all {report.merged} merged tensors are as in the base"
            + (f" (storage: {report.storage})" if report.storage else ""),
            hint="the deltas are zero or below the storage's resolution; merge into a 16-bit base, or write "
            "a dequantized model with --dtype bf16" if worst is None or worst[1] < 1 else None,
        )
    low = report.low_retained
    if not low:
        return
    worst = report.worst_retained
    assert worst is not None
    rel = dict((k, e) for k, _, e, _ in report.realized)
    message = (f"{len(low)} of {report.merged} merged tensors kept less than {report.min_retained:.0%} of their "
               f"delta (worst: '{worst[0]}' retained {worst[1]:.3f}, rel. error {rel[worst[0]] or 0:.3f}; "
               f"storage: {report.storage})")
    if strict:
        raise IncompatibleError(message, hint="the storage cannot hold such small changes: merge into a 16-bit "
                                "base, write a dequantized model with --dtype bf16, or try --rounding stochastic")
    report.warnings.append(message)
