"""merge's kernels: W' = W + Σ w_i·ΔW_i per base tensor, in float32 (float64 for a float64 base),
in buffers reused from one tensor to the next (Workspace); the row-blocked merge that writes W'
straight into the output's dtype on worker threads; and the realized delta, how much of the intended
change survived the stored dtype. DoRA terms go through delta.dora_normalise. No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from loratool.maths.delta import delta, dora_eps, dora_normalise, factors
from loratool.maths.lycoris import lyco_delta

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch

    from loratool.adapter import LoraModule, LycoModule


class Workspace:
    """Buffers reused from one tensor to the next, so the merge loop allocates nothing large.

    A fresh large allocation is a fresh mapping: every page faults and is zeroed again. For a 1B
    model that is over 8 GB of zeroed pages (the float32 copy of W, the delta, the cast result per
    tensor) and most of the system time; reusing buffers sized to the largest tensor removes it.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, Any, str], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: str) -> torch.Tensor:
        import torch

        numel = math.prod(shape)
        key = (name, dtype, str(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)
            del buf
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:numel].view(tuple(shape))


Term = tuple["LoraModule | LycoModule", float] | tuple["LoraModule | LycoModule", float, "tuple[int, int] | None"]


def merged_tensor(
    stored: torch.Tensor, terms: Sequence[Term], *, device: str, unmerge: bool,
    bias: bool = False,
    keep_delta: bool = False, work: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W, W', acc = Σ w_i ΔW_i or None), float32 on `device` (float64 for a float64 base, so the
    base's own digits survive), for one base tensor.

    W' = W + acc (W − acc with unmerge); with a DoRA term (a LoRA or LyCORIS module with a
    magnitude), W' = m ⊙ (W + acc) / ‖W + acc‖, the norm per output row or per input column
    (dora_normalise). `terms` are (module, weight) pairs, or (module,
    weight, rows): the delta then covers rows start:stop of W only (one part of a fused weight,
    families/layout.py; or expert e of a fused 3-D expert weight, rows e:e+1, docs/moe.md), and only
    those rows are computed; with `bias` the deltas are the modules'
    lora_B biases (scale · bias).

    Plain LoRA takes the fast path: each delta is formed and added in place into a float32 copy of W
    (bit-identical to peft's `W + (B @ A) * scale`; no sum tensor is kept), in `work`'s buffers when
    given (W and W' then live there until the next call). DoRA, LoRA biases and keep_delta
    (statistics) hold acc explicitly.
    """
    import torch

    sign = -1.0 if unmerge else 1.0
    from loratool.adapter import LoraModule, LycoModule

    spans = [t[2] if len(t) > 2 else None for t in terms]  # type: ignore[misc]
    pairs = [(t[0], t[1]) for t in terms]
    dora = [m for m, _ in pairs if m.magnitude is not None and not bias]
    if dora and (len(pairs) > 1 or spans[0] is not None):  # keymap.plan_merge refuses these first
        raise ValueError(f"{dora[0].name}: a DoRA module must be the only delta of its whole base tensor")
    acc_dtype = torch.float64 if stored.dtype == torch.float64 else torch.float32
    if not (dora or bias or keep_delta):
        work = work if work is not None else Workspace()
        w = work.get("w", stored.shape, acc_dtype, device).copy_(stored)  # widened exactly
        new = work.get("new", stored.shape, acc_dtype, device).copy_(w)  # W kept: the realized delta needs it
        rows = new.view(new.shape[0], -1)  # conv (out, in, kh, kw) -> (out, in·kh·kw), as down flattens
        for (module, weight), span in zip(pairs, spans):
            target = rows if span is None else rows[span[0]:span[1]]  # a part's rows of a fused weight
            if isinstance(module, LycoModule):
                ld = lyco_delta(module, device=device, dtype=acc_dtype).reshape(target.shape)  # dense ΔW, scaled
                target.add_(ld if weight == 1.0 and not unmerge else ld * (sign * weight))
                continue
            up, down = factors(module, device=device, dtype=acc_dtype)  # (out, r), (r, in·k)
            d = torch.mm(up, down, out=work.get("d", (up.shape[0], down.shape[1]), acc_dtype, device))
            d.mul_(module.scale)  # (out, in·k), rounded exactly as peft's (B @ A) * s
            if weight != 1.0 or unmerge:
                d.mul_(sign * weight)
            transposed = module.kind == "embedding" or module.fan_in_fan_out  # W is (in, out)
            d = d.T if transposed else d
            # one expert of a fused (E, out, in) weight: rows e:e+1 of its (E, out·in) view
            target.add_(d if d.shape == target.shape else d.reshape(target.shape))
            del d
        return w, new, None
    w = stored.to(device=device, dtype=acc_dtype)
    acc: torch.Tensor | None = None
    for (module, weight), span in zip(pairs, spans):
        if bias:
            assert module.bias is not None
            d = module.bias.load().to(device=device, dtype=acc_dtype) * module.bias_scale
        elif isinstance(module, LycoModule):
            d = lyco_delta(module, device=device, dtype=acc_dtype)
        else:
            d = delta(module, device=device, dtype=acc_dtype)  # (scale · up @ down) in the base layout, as peft does
        if span is not None:  # a part's rows of a fused weight: zero elsewhere
            part = torch.zeros_like(w)
            part[span[0]:span[1]] = d.reshape(span[1] - span[0], *w.shape[1:])
            d = part
        d = d.reshape(w.shape)  # a 2-D delta onto a (out, in, 1, 1) conv weight
        if weight != 1.0:
            d = d * weight
        acc = d if acc is None else acc + d
    assert acc is not None
    new = w - acc if unmerge else w + acc
    if dora:
        m = dora[0]
        assert m.magnitude is not None
        fan_in_fan_out = isinstance(m, LoraModule) and m.fan_in_fan_out
        rows = new.T if fan_in_fan_out else new  # (out, in, ...)
        rows = dora_normalise(rows, m.magnitude.load().to(device=device, dtype=acc_dtype), m.dora_axis,
                              eps=dora_eps(m))
        new = rows.T if fan_in_fan_out else rows
    return w, new, acc


@dataclass
class BlockedMerge:
    """What merge_blocked measured while writing W' into the output (see realized_delta)."""

    dd_root: float  # ||ΔW||
    de_sum: float  # <R, ΔW>
    err_norm: float  # ||R − ΔW||
    worst: float  # max |R − ΔW|
    w_norm: float  # ||W||
    lo: float  # min and max of W' (float32): NaN/Inf and the output dtype's range are checked on them
    hi: float


BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32 per block buffer: the few buffers of a step stay in cache
BLOCK_WORKERS = 8  # more Python threads contend for the GIL between the small operations of a block

_BLOCK_POOL: Any = None  # (threads, ThreadPoolExecutor) of merge_blocked, made on first use
_BLOCK_LOCAL: Any = None


def _block_pool(threads: int) -> Any:
    """Worker threads for merge_blocked, each running torch single-threaded.

    Small elementwise operations split across torch's own (OpenMP) threads meet at a barrier
    each; on a loaded machine a descheduled partner makes every barrier wait a time slice (a 1 MiB
    copy took 15 ms instead of 50 µs). Whole row ranges per Python thread, torch single-threaded
    in each (OpenMP's thread count is per thread), need no barrier: the GIL is released inside
    every operation.
    """
    global _BLOCK_POOL, _BLOCK_LOCAL
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if _BLOCK_POOL is None or _BLOCK_POOL[0] != threads:
        import torch

        if _BLOCK_POOL is not None:
            _BLOCK_POOL[1].shutdown(wait=True)
        _BLOCK_LOCAL = threading.local()
        _BLOCK_POOL = (threads, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="loratool-block",
                                                   initializer=torch.set_num_threads, initargs=(1,)))
    return _BLOCK_POOL[1]


# rows_in(start, stop) -> W's rows in float32; rows_out(start, stop, W') -> what the storage holds for W'
ReadRows = Callable[[int, int], "torch.Tensor"]
StoreRows = Callable[[int, int, "torch.Tensor"], "torch.Tensor"]


def _merge_rows(rows_in: torch.Tensor | ReadRows, up: torch.Tensor, down: torch.Tensor, scales: tuple[float, ...],
                rows_out: torch.Tensor | StoreRows, start: int, stop: int, step: int, work: Workspace | None,
                w_norm: bool) -> tuple[float, float, float, float, float, float, float]:
    """Rows start:stop of merge_blocked, block by block: (dd, de, ee, wn, worst, lo, hi). Each
    block's rows of B @ A are formed here, then multiplied by each of `scales` in turn (peft's
    `(B @ A) * scale`, then the weight).

    A 16-bit W is widened into a float32 block first (exact), and so are the values written: the
    sums and differences below are then the float32 ones merged_tensor forms from widened copies, and
    plain float32 operations are two to three times faster than the mixed-dtype ones doing the same.
    rows_in and rows_out may be functions instead (a quantized weight: dequantize the block's rows,
    requantize W' and give back what it reads as).
    """
    import torch

    if work is None:  # a block worker: its own buffers
        assert _BLOCK_LOCAL is not None
        work = getattr(_BLOCK_LOCAL, "work", None)
        if work is None:
            work = _BLOCK_LOCAL.work = Workspace()
    cols = down.shape[1]  # (r, in·k): the columns of W viewed as rows
    wb = work.get("block_w", (step, cols), torch.float32, "cpu")
    nb = work.get("block_new", (step, cols), torch.float32, "cpu")
    eb = work.get("block_err", (step, cols), torch.float32, "cpu")
    dd = de = ee = wn = 0.0
    worst, lo, hi = 0.0, math.inf, -math.inf
    for s in range(start, stop, step):
        e = min(stop, s + step)
        k = e - s
        dw, new, err = wb[:k], nb[:k], eb[:k]
        w = rows_in(s, e) if callable(rows_in) else rows_in[s:e]
        if w.dtype != torch.float32:
            w = dw.copy_(w)  # widened (exact); dw holds W until ΔW overwrites it below
        torch.mm(up[s:e], down, out=err)  # this block's rows of B @ A (err is free until below)
        for f in scales:  # ΔW = (B @ A) · scale
            err.mul_(f)
        torch.add(w, err, out=new)  # W' = W + ΔW in float32
        mn, mx = (float(v) for v in torch.aminmax(new))  # NaN when the block holds one
        if not (math.isfinite(mn) and math.isfinite(mx)):
            lo, hi = min(lo, mn) if math.isfinite(mn) else mn, max(hi, mx) if math.isfinite(mx) else mx
            break  # the caller refuses the tensor: nothing more to measure
        lo, hi = min(lo, mn), max(hi, mx)
        if callable(rows_out):  # requantized: R − ΔW is what it reads back as, minus W'
            torch.sub(rows_out(s, e, new), new, out=err)
        else:
            out = rows_out[s:e]
            out.copy_(new)  # the cast
            torch.sub(out if out.dtype == torch.float32 else err.copy_(out), new,
                      out=err)  # R − ΔW: the storage's rounding of the sum
        if w_norm:
            wn += float(torch.dot(w.reshape(-1), w.reshape(-1)))
        torch.sub(new, w, out=dw)  # ΔW = W' − W, as realized_delta forms it (over the widened W: elementwise)
        dv, ev = dw.view(-1), err.view(-1)
        dd += float(torch.dot(dv, dv))
        de += float(torch.dot(dv, ev))
        ee += float(torch.dot(ev, ev))
        emn, emx = torch.aminmax(ev)  # max |R − ΔW| (vector_norm(ord=inf) is 20× slower here)
        worst = max(worst, -float(emn), float(emx))
    return dd, de, ee, wn, worst, lo, hi


def merge_blocked(stored: torch.Tensor, module: LoraModule, factor: float, out: torch.Tensor, *,
                  work: Workspace, block: int = BLOCK_ELEMENTS, threads: int | None = None,
                  w_norm: bool = True, first: int = 0) -> BlockedMerge:
    """W' = W + factor · ΔW of one plain LoRA into `out` (the stored output dtype), on the CPU, by
    row blocks that stay in cache.

    Each row block forms its rows of B @ A (a rank-r product, cheap, and it never leaves the cache;
    formed whole it was a float32 out×in matrix written to memory and read back, the largest cost of
    a merge after the start-up), then `· scale`, `· factor`, widen W, add, cast into `out`, and
    measure the realized delta (widen what was stored, ‖ΔW‖, ⟨R, ΔW⟩, ‖R − ΔW‖, max |R − ΔW|) and
    the range of W'. Every element of a product is the same r-term dot product whichever rows are
    formed together; a BLAS may still order its terms differently for a very short block (it did,
    here, for blocks of 1 and 3 rows), so W' can differ from merged_tensor's in the last bit of a
    float32 sum, never more. One pass over memory instead of about ten whole-tensor passes; row ranges go
    to `threads` workers (default: torch's thread count, at most BLOCK_WORKERS), each single-threaded
    (see _block_pool). ‖W‖ (w_norm) costs one more pass per block: only the statistics report uses it.
    `stored` and `out` may be rows first:first + len(stored) of the weight (a tensor streamed by pieces):
    a piece that starts on a block's edge gives the same bits as the whole tensor there.
    """
    return merge_blocked_many([(stored, module, factor, out)], work=work, block=block, threads=threads,
                              w_norm=w_norm, first=first)[0]


def merge_blocked_through(rows_in: ReadRows, rows_out: StoreRows, shape: tuple[int, ...], module: LoraModule,
                          factor: float, *, rows: int, work: Workspace, block: int = BLOCK_ELEMENTS,
                          threads: int | None = None, w_norm: bool = True) -> BlockedMerge:
    """merge_blocked for a weight read and stored through functions, in blocks of a multiple of `rows`
    rows (a quantized weight: a block shares no scale with rows outside it, so it dequantizes and
    requantizes alone, bit for bit as the whole tensor would). Memory: a few blocks, never a float32
    copy of the tensor. rows_in(start, stop) gives W's rows in float32, shaped (k, cols);
    rows_out(start, stop, W') stores them and gives back what they read as (float32). threads=1 keeps
    the blocks in row order (a seeded stochastic rounding draws its stream in that order).
    """
    n, cols = shape[0], math.prod(shape[1:])
    step = rows * max(1, block // max(cols * rows, 1))
    return _blocked(rows_in, rows_out, n, step, module, factor, work=work, threads=threads, w_norm=w_norm)()


def merge_blocked_many(jobs: Iterable[tuple[torch.Tensor, LoraModule, float, torch.Tensor]], *, work: Workspace,
                       block: int = BLOCK_ELEMENTS, threads: int | None = None, w_norm: bool = True,
                       first: int = 0) -> list[BlockedMerge]:
    """merge_blocked of each (stored, module, factor, out), in order, the same bits and results: every
    job's row ranges are queued to the workers before any is waited for, so they never idle while
    the next job's factors are made (the 64 small experts of a fused tensor: waiting after each had
    the workers idle for a fifth of the merge)."""
    return queue_blocked_many(jobs, work=work, block=block, threads=threads, w_norm=w_norm, first=first)()


def queue_blocked_many(jobs: Iterable[tuple[torch.Tensor, LoraModule, float, torch.Tensor]], *, work: Workspace,
                       block: int = BLOCK_ELEMENTS, threads: int | None = None, w_norm: bool = True,
                       first: int = 0, on_done: Callable[[], None] | None = None) -> Callable[[], list[BlockedMerge]]:
    """merge_blocked_many's jobs queued to the workers, not waited for: the function returned waits for
    them and gives their results. The caller keeps every input and output alive, and unchanged, until then
    (a job too small for the workers runs here, now, on the calling thread). on_done() is called, on
    whichever thread finishes last, once no worker reads an input any more (the inputs may be reused)."""
    finish: list[Callable[[], BlockedMerge]] = []
    futures: list[Future[Any]] = []
    try:
        for stored, module, factor, out in jobs:
            rows_in = stored.reshape(stored.shape[0], -1)
            rows_out = out.view(out.shape[0], -1)
            n, cols = rows_in.shape
            finish.append(_blocked(rows_in, rows_out, n, max(1, block // max(cols, 1)), module, factor,
                                   work=work, threads=threads, w_norm=w_norm, first=first, futures=futures))
    except BaseException:
        _all_of(finish)  # no worker may still write into an output the caller gives up
        raise
    if on_done is not None:
        _when_all(futures, on_done)
    return partial(_all_of, finish, reraise=True)


def _when_all(futures: list[Future[Any]], fn: Callable[[], None]) -> None:
    """fn() once every future is done (now, if none is pending)."""
    import threading

    if not futures:
        fn()
        return
    left, lock = [len(futures)], threading.Lock()

    def one(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            fn()

    for f in futures:
        f.add_done_callback(one)


def _all_of(finish: list[Callable[[], BlockedMerge]], reraise: bool = False) -> list[BlockedMerge]:
    """Every job waited for (none left writing into an output), then the first failure raised (reraise)."""
    done: list[BlockedMerge] = []
    failed: BaseException | None = None
    for f in finish:
        try:
            done.append(f())
        except BaseException as e:  # raised below, after the rest have finished
            failed = failed or e
    if failed is not None and reraise:
        raise failed
    return done


def _blocked(rows_in: torch.Tensor | ReadRows, rows_out: torch.Tensor | StoreRows, n: int, step: int,
             module: LoraModule, factor: float, *, work: Workspace, threads: int | None, w_norm: bool,
             first: int = 0, futures: list[Future[Any]] | None = None) -> Callable[[], BlockedMerge]:
    """merge_blocked's and merge_blocked_through's loop: row ranges of `step`-row blocks over the workers,
    queued now; the function returned waits for them and sums their results. The rows are the weight's
    first:first + n (up's rows are taken from there). The workers' futures are added to `futures`."""
    import torch

    up, down = factors(module)
    up, down = up.contiguous()[first:first + n], down.contiguous()
    scales = (module.scale,) if factor == 1.0 else (module.scale, factor)
    threads = threads or min(torch.get_num_threads(), BLOCK_WORKERS)
    blocks = -(-n // step)
    if threads <= 1 or blocks < 2:
        done = _merge_rows(rows_in, up, down, scales, rows_out, 0, n, step, work, w_norm)
        return partial(_summed, [done])
    pool = _block_pool(threads)
    per = -(-blocks // (threads * 4))  # a few ranges per worker, for balance
    ranges = [(b * step, min(n, (b + per) * step)) for b in range(0, blocks, per)]
    queued = [pool.submit(_merge_rows, rows_in, up, down, scales, rows_out, a, z, step, None, w_norm)
              for a, z in ranges]
    if futures is not None:
        futures.extend(queued)
    return lambda: _summed([f.result() for f in queued])


def _summed(parts: list[tuple[float, float, float, float, float, float, float]]) -> BlockedMerge:
    """The row ranges' (dd, de, ee, wn, worst, lo, hi) -> the tensor's BlockedMerge."""
    dd = sum(p[0] for p in parts)
    de = sum(p[1] for p in parts)
    ee = sum(p[2] for p in parts)
    wn = sum(p[3] for p in parts)
    worst = max(p[4] for p in parts)
    los, his = [p[5] for p in parts], [p[6] for p in parts]
    lo = next((v for v in los if not math.isfinite(v) and v != math.inf), min(los))
    hi = next((v for v in his if not math.isfinite(v) and v != -math.inf), max(his))
    return BlockedMerge(math.sqrt(dd), dd + de, math.sqrt(ee), worst, math.sqrt(wn), lo, hi)


def joined(parts: Sequence[BlockedMerge]) -> BlockedMerge:
    """The BlockedMerge of a tensor merged in parts (pieces of rows, or experts): sums of squares and
    inner products add, the extremes combine, and a NaN bound from any part stays."""
    return _summed([(p.dd_root * p.dd_root, p.de_sum - p.dd_root * p.dd_root, p.err_norm * p.err_norm,
                     p.w_norm * p.w_norm, p.worst, p.lo, p.hi) for p in parts])


def realized_delta(w: torch.Tensor, new: torch.Tensor, written: torch.Tensor) -> tuple[float, float, float, float]:
    """How much of the intended change survived the storage: (||ΔW||, <R, ΔW>, ||R − ΔW||, max|R − ΔW|).

    ΔW = new − w (the float32 merge), R = written − w (what the stored result changes). retained =
    <R, ΔW> / ||ΔW||² and the relative error ||R − ΔW|| / ||ΔW|| follow. Overwrites w (with ΔW)
    and new (with R − ΔW = written − new): the callers pass their work buffers.
    """
    import torch

    torch.sub(new, w, out=w)  # ΔW
    torch.sub(written, new, out=new)  # R − ΔW, the storage's rounding of the sum
    dw, err = w.reshape(-1), new.reshape(-1)
    dd = float(torch.dot(dw, dw))
    de = float(torch.dot(dw, err))
    ee = float(torch.dot(err, err))
    worst = float(err.abs().max()) if err.numel() else 0.0
    return math.sqrt(dd), dd + de, math.sqrt(ee), worst
