"""verify: was MERGED really made as BASE + Σ w_i·ΔW_i? Streams both checkpoints tensor by tensor.

Per base tensor, R = MERGED − BASE (the realized change) is measured against what the adapters
should have put there (merge's own plan: the same key matching, weights and modules_to_save):

- tensors no adapter touches must be unchanged: compared byte for byte a chunk at a time (or
  value by value, within one rounding of the stored dtype, when the dtype differs);
- tensors with low-rank deltas E_t = w_t·s_t·B_t·A_t: the least-squares coefficients k of R on the
  E_t come from <R, B A> = Σ B ⊙ (R Aᵀ) and <B₁A₁, B₂A₂> = tr((B₁ᵀB₂)(A₂A₁ᵀ)) (maths.compare.realized_projection,
  maths.compare.factor_inner) — R is read in row blocks, no dense out×in product is formed;
- DoRA, LyCORIS and lora_B bias deltas are not low-rank sums: formed densely (merge's maths).

Verdict from k̄ = <R, ΣE>/||ΣE||² and the residual ||R − Σ k_t E_t||, against a tolerance of one
rounding of the stored dtype (u·||MERGED||_F, u = 2⁻⁸ bf16, 2⁻¹¹ fp16, 2⁻²⁴ fp32):

    residual above tolerance   other change   (R is not explained by the adapters' deltas)
    k̄ ≈ 1                      merged
    k̄ ≈ 0                      not merged
    k̄ ≈ 2                      merged twice
    otherwise                  wrong weight (≈ k̄×)

"≈" is max(1e-3, 6σ_k), σ_k the spread rounding noise gives k̄ (u·||MERGED|| / (√(3N)·||ΣE||)); a
delta so small that σ_k > 0.04 cannot be told from rounding: `too small to tell` (a warning).
A tensor whose dtype differs from the expected one (the base's, or --dtype) is a finding too.

Quantized storage (fp8, scaled / block fp8, bitsandbytes nf4 / fp4 / int8; storage.py) cannot hold
W + ΔW exactly: merge writes Q(dequant(W) + ΔW). Both checkpoints' weights are read dequantized
(storage.dequantize), X = W + ΔW is formed with merge's own arithmetic (one dense delta, as merge
does), and the references Q(X) read back (storage.requantize: nearest, and for fp8 schemes one
stochastic rounding too) give the error a correct merge makes, ε = ||Q(X) − X||. Then:

    MERGED == W                      not merged (said so also when Q(X) == W: the delta is below
                                     what the storage can hold, and no merge can store it)
    MERGED == Q(X), or ||MERGED − X|| ≤ 2·max ε
                                     merged; `too small to tell` when ||ΔW|| ≤ that bound (and not
                                     bit-identical to Q(X))
    otherwise                        k̂ = <R, ΔW>/||ΔW||²: other change when ||R − k̂ΔW|| exceeds the
                                     bound, else not merged / merged twice / wrong weight (≈ k̂×)
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import IncompatibleError
from loratool.io.checkpoint import Checkpoint
from loratool.io.header import TensorInfo

if TYPE_CHECKING:
    import torch

    from loratool.keymap import Contribution, MergePlan
    from loratool.maths.compare import RequantNumbers
    from loratool.storage import BaseStorage

SCHEMA = 1
Progress = Callable[[int, int], None]

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
MIN_DELTA = 1e-3  # the smallest weight error reported (|k − 1| beyond it is "wrong weight")
SIGMAS = 6.0  # k̄ within 6 standard deviations of rounding noise counts as equal
UNTELLABLE = 0.04  # σ_k beyond this: the delta drowns in rounding noise
_CHUNK = 1 << 24  # bytes per read when comparing untouched tensors

OK_VERDICTS = {"merged", "unchanged", "replaced", "too small to tell"}


@dataclass
class TensorCheck:
    key: str
    file: str  # the base file (relative to the base directory)
    expected: str  # merged | replaced | unchanged
    verdict: str  # merged, not merged, merged twice, wrong weight, other change, unchanged, replaced, ...
    modules: list[str] = field(default_factory=list)
    factor: float | None = None  # k̄: the realized change as a multiple of the expected delta
    factors: list[float] | None = None  # k per contribution, when several adapters touch the tensor
    residual: float | None = None  # ||R − Σ k_t E_t||_F / ||MERGED||_F
    tolerance: float | None = None  # the same, allowed by one rounding of the stored dtype
    dtype: str = ""
    expected_dtype: str = ""
    storage: str | None = None  # how the base stores it when quantized (storage.Storage.describe())
    requant_error: float | None = None  # quantized: ||Q(X) − X||_F / ||MERGED||_F, a correct merge's own error
    exact: bool | None = None  # quantized: MERGED holds the very values of Q(X) (loratool's nearest rounding)
    note: str | None = None

    @property
    def dtype_changed(self) -> bool:
        return bool(self.dtype) and self.dtype != self.expected_dtype

    @property
    def ok(self) -> bool:
        return (self.verdict == self.expected or (self.verdict == "too small to tell" and self.expected == "merged")) \
            and not self.dtype_changed

    @property
    def label(self) -> str:
        """The verdict as shown: `wrong weight (≈ 0.5×)`, with a dtype change appended."""
        text = self.verdict
        if self.verdict == "wrong weight":
            ks = self.factors if self.factors and len(self.factors) > 1 else [self.factor or 0.0]
            text += " (≈ " + ", ".join(f"{k:.2g}×" for k in ks) + ")"
        if self.note:
            text += f" ({self.note})"
        if self.dtype_changed:
            text += f"; dtype {self.dtype}, expected {self.expected_dtype}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "file": self.file,
            "expected": self.expected,
            "verdict": self.verdict,
            "label": self.label,
            "ok": self.ok,
            "modules": self.modules,
            "factor": self.factor,
            "factors": self.factors,
            "residual": self.residual,
            "tolerance": self.tolerance,
            "dtype": self.dtype,
            "expected_dtype": self.expected_dtype,
            "storage": self.storage,
            "requant_error": self.requant_error,
            "exact": self.exact,
        }


@dataclass
class VerifyReport:
    merged: Path
    base: Path
    adapters: list[Path]
    weights: list[float]
    dtype: str
    device: str = "cpu"
    storage: str = "plain float (no quantized weights)"  # storage.BaseStorage.line() of the base
    quantized: bool = False  # the base stores weights quantized
    tensors: list[TensorCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # base keys absent from MERGED
    extra: list[str] = field(default_factory=list)  # MERGED keys absent from the base
    unmatched: list[str] = field(default_factory=list)
    layouts: list[str] = field(default_factory=list)  # adapters mapped onto the base's other family layout
    warnings: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[TensorCheck]:
        return [t for t in self.tensors if not t.ok]

    @property
    def ok(self) -> bool:
        return not (self.findings or self.missing or self.extra)

    def to_dict(self, *, tensors: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "merged": str(self.merged),
            "base": str(self.base),
            "adapters": [str(a) for a in self.adapters],
            "weights": self.weights,
            "dtype": self.dtype,
            "device": self.device,
            "storage": self.storage,
            "quantized": self.quantized,
            "ok": self.ok,
            "num_tensors": len(self.tensors),
            "verdicts": dict(Counter(t.verdict for t in self.tensors)),
            "num_findings": len(self.findings) + len(self.missing) + len(self.extra),
            "dtype_changed": sum(1 for t in self.tensors if t.dtype_changed),
            "missing": self.missing,
            "extra": self.extra,
            "unmatched": self.unmatched,
            "layouts": self.layouts,
            "warnings": self.warnings,
        }
        if tensors:
            doc["tensors"] = [t.to_dict() for t in self.tensors]
        return doc


# ---------------------------------------------------------------------------------------------
# the verdict


def classify(
    m_sq: float, r_sq: float, inner: list[float], gram: list[list[float]], *, numel: int, unit: float,
) -> tuple[str, float | None, list[float] | None, float, float]:
    """(verdict, k̄, k per term, residual, tolerance) from the projection numbers.

    Args:
        m_sq: ||MERGED||²; r_sq: ||R||²; inner: <R, E_t>; gram: <E_t, E_s>; numel: elements;
        unit: unit roundoff of the stored dtype (the coarser of the expected and the found one).
    """
    from loratool.maths.compare import project

    e_sq = sum(sum(row) for row in gram)
    norm_m = math.sqrt(max(m_sq, 0.0))
    tol = unit * norm_m * (1 + 1e-3) + 1e-5 * math.sqrt(max(e_sq, 0.0)) + 1e-30
    if e_sq <= 0.0:  # nothing to add: merged means unchanged
        res = math.sqrt(max(r_sq, 0.0))
        return ("merged" if res <= tol else "other change"), None, None, res, tol
    ks, res = project(r_sq, inner, gram)
    if res > tol:
        return "other change", None, ks if len(ks) > 1 else None, res, tol
    k = sum(inner) / e_sq
    sigma = unit * norm_m / (math.sqrt(3.0 * max(numel, 1)) * math.sqrt(e_sq))
    if sigma > UNTELLABLE:
        return "too small to tell", k, ks if len(ks) > 1 else None, res, tol
    close = max(MIN_DELTA, SIGMAS * sigma)
    per_term = ks if len(ks) > 1 else None
    if len(ks) > 1 and abs(k - 1) <= close:
        # the sum is right; each adapter's own share must be too (when they can be told apart)
        res1 = math.sqrt(max(0.0, r_sq - 2 * sum(inner) + e_sq))
        if res1 <= tol:
            return "merged", k, per_term, res, tol
        return "wrong weight", k, per_term, res, tol
    if abs(k - 1) <= close:
        return "merged", k, per_term, res, tol
    if abs(k) <= close:
        return "not merged", k, per_term, res, tol
    if abs(k - 2) <= close:
        return "merged twice", k, per_term, res, tol
    return "wrong weight", k, per_term, res, tol


def classify_quantized(n: RequantNumbers, expected: str, *, unbiased: bool
                       ) -> tuple[str, float | None, float, float, str | None]:
    """(verdict, k̂, residual, tolerance, note) of a tensor stored quantized (module docstring).

    Args:
        n: the numbers of requant_numbers, the first reference the nearest rounding of X.
        expected: "merged" (X = W + ΔW, or a saved copy) or "unchanged" (X = W).
        unbiased: another reference is a stochastic rounding, whose k is 1 on average: a merge
            rounding that way is right with any k around 1, not only around the nearest rounding's.
    """
    norm_m = math.sqrt(max(n.m_sq, 0.0))
    tol = 2.0 * math.sqrt(max(n.ref_sq, default=0.0)) + 1e-6 * norm_m + 1e-30
    res = math.sqrt(max(n.res_sq, 0.0))
    if expected == "unchanged" or n.e_sq <= 0.0:
        ok = n.exact or n.r_zero or res <= tol
        return ("merged" if expected == "merged" else "unchanged") if ok else "other change", None, res, tol, None
    k = n.re / n.e_sq
    keeps = [re / n.e_sq for re in n.ref_re]  # k of each reference: what a right merge keeps of ΔW
    if n.r_zero:
        # Q(X) == W too: no merge can store this delta in this storage, and the file does not hold it
        return "not merged", k, res, tol, "the delta is below what the storage can hold" if n.ref_zero else None
    if n.exact:
        return "merged", k, res, tol, None
    # the spread rounding noise gives k (as if each element's error were independent), 6 of them allowed
    sigma = math.sqrt(max(n.ref_noise, default=0.0)) / n.e_sq
    lo = min([*keeps, *([1.0] if unbiased else [])]) - SIGMAS * sigma - MIN_DELTA
    hi = max([*keeps, *([1.0] if unbiased else [])]) + SIGMAS * sigma + MIN_DELTA
    note = f"a right merge keeps ≈ {keeps[0]:.2g}× in this storage" if keeps and abs(keeps[0] - 1) > 0.05 else None
    if res <= tol and lo <= k <= hi:
        # told apart from half or no delta only when the window is narrow and clear of 0
        return ("merged" if lo > 0 and hi - lo < 0.5 else "too small to tell"), k, res, tol, None
    res_k = math.sqrt(max(0.0, n.r_sq - n.re * n.re / n.e_sq))
    if res_k > tol:
        return "other change", k, res_k, tol, None
    close = max(MIN_DELTA, SIGMAS * sigma)
    # (values changed, so not "not merged" even with k ≈ 0)
    if abs(k - 2 * (keeps[0] if keeps else 1.0)) <= close:
        return "merged twice", k, res_k, tol, note
    return "wrong weight", k, res_k, tol, note


def _unit(*dtypes: str) -> float:
    return max(UNIT_ROUNDOFF.get(d, 0.0) for d in dtypes)


# ---------------------------------------------------------------------------------------------
# per tensor


def _rows(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A base-layout weight as (out, in·k), the layout of up @ down."""
    return t.T if transposed else t.reshape(t.shape[0], -1)


def _check_lowrank(w: torch.Tensor, m: torch.Tensor, contribs: list[Contribution], unit: float, device: str
                   ) -> tuple[str, float | None, list[float] | None, float, float, float]:
    from loratool.adapter import LoraModule
    from loratool.maths.compare import factor_inner, realized_projection
    from loratool.maths.delta import factors

    mods = [c.module for c in contribs]
    assert all(isinstance(m, LoraModule) for m in mods)  # the others take the dense route
    loras = [m for m in mods if isinstance(m, LoraModule)]
    transposed = {m.kind == "embedding" or m.fan_in_fan_out for m in loras}
    if len(transposed) != 1:
        raise IncompatibleError(f"modules {', '.join(c.module.name for c in contribs)} disagree on the layout "
                                "of one base weight")
    flip = transposed.pop()
    import torch

    experts = w.dim() == 3 and all(mod.expert is not None for mod in loras)
    terms = []
    for c, mod in zip(contribs, loras):
        up, down = factors(mod)  # (out, r), (r, in·k), float32
        up = up.double() * (c.weight * mod.scale)
        if experts and c.rows is not None:
            # expert e of a fused (E, d1, d2) weight: rows e·d1:(e+1)·d1 of its (E·d1, d2) view, where
            # it is up @ down, or (up @ down)ᵀ = downᵀ @ upᵀ when the weight holds experts (in, out)
            if flip:
                up, down = down.T.double(), up.T
            full = torch.zeros((w.shape[0] * w.shape[1], up.shape[1]), dtype=up.dtype)
            full[c.rows[0] * w.shape[1]:c.rows[1] * w.shape[1]] = up
            up = full
        elif c.rows is not None:  # a part of a fused weight: B padded with zero rows, still low rank
            full = torch.zeros((w.shape[0], up.shape[1]), dtype=up.dtype)
            full[c.rows[0]:c.rows[1]] = up
            up = full
        terms.append((up, down.double()))
    if experts:
        w, m, flip = w.reshape(-1, w.shape[-1]), m.reshape(-1, m.shape[-1]), False

    # 16-bit tensors: float32 is exact for R and precise enough (maths.compare.realized_projection)
    work = torch.float32 if unit >= UNIT_ROUNDOFF["float16"] and {w.dtype, m.dtype} <= {
        torch.float16, torch.bfloat16} else torch.float64
    m_sq, r_sq, inner = realized_projection(_rows(m, flip), _rows(w, flip), terms, dtype=work,
                                            device=_exact_device(device))
    gram = [[factor_inner(u1, d1, u2, d2) for u2, d2 in terms] for u1, d1 in terms]
    _measurable([gram[t][t] for t in range(len(terms))], contribs)
    return (*classify(m_sq, r_sq, inner, gram, numel=w.numel(), unit=unit), math.sqrt(m_sq))


def _measurable(delta_sq: list[float], contribs: list[Contribution]) -> None:
    """Refuse expected deltas no merge can have written (beyond float32: merge refuses them too),
    whose squared norms would overflow the projection's float64 arithmetic.

    Raises:
        IncompatibleError: naming the adapters' modules.
    """
    from loratool.maths.guards import F32_MAX

    if all(math.isfinite(v) and v <= F32_MAX * F32_MAX for v in delta_sq):
        return
    names = ", ".join(sorted({f"{c.adapter}: '{c.module.name}'" for c in contribs}))
    raise IncompatibleError(f"the delta of {names} is NaN/Inf or beyond float32, so no merge can hold it",
                            hint="check the adapter with: loratool validate ADAPTER")


def _check_dense(w: torch.Tensor, m: torch.Tensor, expected: torch.Tensor, unit: float, contribs: list[Contribution]
                 ) -> tuple[str, float | None, list[float] | None, float, float, float]:
    """Dense route (DoRA, bias deltas): R and the expected change D = expected − W, in float64."""
    import torch

    w64, m64 = w.to(torch.float64), m.to(torch.float64)
    r = m64 - w64
    d = expected.to(torch.float64) - w64
    m_sq = float((m64 * m64).sum())
    d_sq = float((d * d).sum())
    _measurable([d_sq], contribs)
    return (*classify(m_sq, float((r * r).sum()), [float((r * d).sum())], [[d_sq]],
                      numel=w.numel(), unit=unit), math.sqrt(m_sq))


def _exact_device(device: str) -> str:
    """Where float64 sums can run: the device, unless it has no float64 (mps)."""
    return "cpu" if device.startswith("mps") else device


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Two tensors' bytes equal, compared a chunk at a time."""
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        fa.seek(a.start)
        fb.seek(b.start)
        left = a.nbytes
        while left > 0:
            n = min(_CHUNK, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def _norms_chunked(a: TensorInfo, b: TensorInfo) -> tuple[float, float]:
    """(||b − a||_F, ||a||_F) for two same-shaped tensors of any dtypes, a chunk of elements at a time."""
    import torch

    from loratool.io.header import ITEMSIZE

    n = math.prod(a.shape)
    step = max(1, _CHUNK // 8)
    diff_sq = a_sq = 0.0
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        for i in range(0, n, step):
            k = min(step, n - i)
            fa.seek(a.start + i * ITEMSIZE[a.dtype])
            fb.seek(b.start + i * ITEMSIZE[b.dtype])
            xa = torch.frombuffer(bytearray(fa.read(k * ITEMSIZE[a.dtype])), dtype=getattr(torch, a.dtype))
            xb = torch.frombuffer(bytearray(fb.read(k * ITEMSIZE[b.dtype])), dtype=getattr(torch, b.dtype))
            xa64, xb64 = xa.to(torch.float64), xb.to(torch.float64)
            diff_sq += float(((xb64 - xa64) ** 2).sum())
            a_sq += float((xa64 * xa64).sum())
    return math.sqrt(diff_sq), math.sqrt(a_sq)


def _check_unchanged(w: TensorInfo, m: TensorInfo, unit: float) -> tuple[str, float | None, float | None]:
    if w.dtype == m.dtype and _same_bytes(w, m):
        return "unchanged", 0.0, 0.0
    if w.dtype not in UNIT_ROUNDOFF or m.dtype not in UNIT_ROUNDOFF:
        return "other change", None, None
    change, norm = _norms_chunked(w, m)
    tol = unit * norm * (1 + 1e-3) + 1e-30 if w.dtype != m.dtype else 0.0
    rel = change / norm if norm > 0 else change
    return ("unchanged" if change <= tol else "other change"), rel, (tol / norm if norm > 0 else tol)


def _check_replaced(w: torch.Tensor, m: torch.Tensor, saved: torch.Tensor, unit: float
                    ) -> tuple[str, float | None, float | None]:
    import torch

    m64, s64, w64 = m.to(torch.float64), saved.to(torch.float64), w.to(torch.float64)
    norm = float(torch.linalg.vector_norm(s64)) or 1.0
    tol = unit * norm * (1 + 1e-3) + 1e-30
    off = float(torch.linalg.vector_norm(m64 - s64))
    if off <= tol:
        return "replaced", off / norm, tol / norm
    if torch.equal(m64, w64):
        return "not merged", off / norm, tol / norm
    return "other change", off / norm, tol / norm


# ---------------------------------------------------------------------------------------------
# the operation


@dataclass
class _Context:
    """What every tensor check of one verify shares."""

    plan: MergePlan
    dtype: str
    device: str
    base: Checkpoint
    merged: Checkpoint
    base_storage: BaseStorage
    merged_storage: BaseStorage
    dequantizing: bool  # --dtype on a quantized base: MERGED holds plain floats, no scales

    def load_base(self, key: str) -> torch.Tensor:
        from loratool.io.tensors import load_tensor

        return load_tensor(self.base.tensors[key])

    def load_merged(self, key: str) -> torch.Tensor:
        from loratool.io.tensors import load_tensor

        return load_tensor(self.merged.tensors[key])


def verify(
    merged: str | os.PathLike[str],
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    *,
    weights: list[float] | None = None,
    dtype: str = "keep",
    device: str = "cpu",
    allow_unmatched: bool = False,
    allow_pickle: bool = False,
    module_weights: str | None = None,
    blocks: str | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check, tensor by tensor, that MERGED = BASE + Σ w_i·ΔW_i (what `loratool merge` writes).

    A quantized base (storage.py schemes) is read dequantized, and each merged tensor is checked
    against the requantization of BASE + Σ w_i·ΔW_i with the base's scheme, within twice the error
    that requantization makes (module docstring).

    Args:
        merged: the merged checkpoint (file, model directory or sharded directory).
        base: the base it was made from.
        adapters: the adapters it should hold, in any supported format.
        weights: one per adapter (default 1 each), as given to merge.
        dtype: the dtype merge was asked for (keep | fp32 | fp16 | bf16); a tensor stored in another
            dtype is a finding. On a quantized base, not keep means MERGED was written dequantized.
        device: auto | cpu | cuda | cuda:N where the sums and deltas are computed.
        allow_unmatched: adapter modules that match no base weight are skipped (as merge would).
        module_weights, blocks: per-module multipliers, as given to merge.
        progress: called with (bytes of the base checked, total).

    Returns:
        VerifyReport: one TensorCheck per base tensor (ok is False when anything is off).

    Raises:
        IncompatibleError, FormatError: unreadable inputs, adapters that do not fit the base, a
            base or MERGED stored in a scheme loratool cannot dequantize.
    """
    from loratool.device import resolve_device
    from loratool.io.checkpoint import open_checkpoint
    from loratool.ops.merge import checked_options, read_and_plan
    from loratool.storage import detect

    weights = checked_options("verify", adapters, weights, dtype)
    device = resolve_device(device)
    base_ckpt = open_checkpoint(Path(base))
    merged_ckpt = open_checkpoint(Path(merged))
    base_storage, merged_storage = detect(base_ckpt), detect(merged_ckpt)
    base_storage.refuse_unsupported(Path(base))  # never a verdict on bytes we cannot read
    merged_storage.refuse_unsupported(Path(merged))
    _, plan, warnings = read_and_plan("verify", adapters, weights, base_ckpt, base_storage,
                                      allow_pickle=allow_pickle, allow_unmatched=allow_unmatched,
                                      unmerge=False, module_weights=module_weights, blocks=blocks)
    dequantizing = dtype != "keep" and base_storage.quantized
    report = VerifyReport(Path(merged), Path(base), [Path(p) for p in adapters], weights, dtype, device,
                          storage=base_storage.line(), quantized=base_storage.quantized,
                          unmatched=plan.unmatched, warnings=warnings, layouts=plan.layouts)
    ctx = _Context(plan, dtype, device, base_ckpt, merged_ckpt, base_storage, merged_storage, dequantizing)
    # tensors checked with their weight, not alone: scales a requantization recomputes; with --dtype on
    # a quantized base, every scale and marker (the dequantized MERGED leaves them out)
    with_weight: set[str] = set()
    if dequantizing:
        with_weight = set(base_storage.siblings) | set(base_storage.markers)
    else:
        for key in [*plan.deltas, *plan.biases, *plan.replacements]:
            st = base_storage.of(key)
            with_weight.update(st.changing if st is not None else [])
    report.extra = [k for k in merged_ckpt.tensors if k not in base_ckpt.tensors]
    total = sum(i.nbytes for i in base_ckpt.tensors.values())
    done = 0
    for f in base_ckpt.files:
        name = str(f.relative_to(base_ckpt.root)) if f.is_relative_to(base_ckpt.root) else f.name
        infos = sorted((i for i in base_ckpt.tensors.values() if i.path == f), key=lambda i: i.start)
        for info in infos:
            if info.key not in with_weight:
                check = _check_tensor(info, ctx, name)
                if check is None:
                    report.missing.append(info.key)
                else:
                    report.tensors.append(check)
            done += info.nbytes
            if progress:
                progress(done, total)
    tiny = sum(1 for t in report.tensors if t.verdict == "too small to tell")
    if tiny:
        what = "the rounding of their dtype" if not report.quantized else "the error of their storage"
        report.warnings.append(f"{tiny} tensor(s) get a delta smaller than {what}: whether "
                               "it was merged cannot be told from the values")
    return report


def _check_tensor(info: TensorInfo, ctx: _Context, name: str) -> TensorCheck | None:
    from loratool.adapter import LoraModule
    from loratool.io.tensors import load_tensor
    from loratool.maths.merge import merged_tensor
    from loratool.ops.merge import OUT_DTYPES, _out_dtype

    key, plan = info.key, ctx.plan
    found = ctx.merged.tensors.get(key)
    if found is None:
        return None
    st, st_found = ctx.base_storage.of(key), ctx.merged_storage.of(key)
    want = OUT_DTYPES[ctx.dtype] if st is not None and ctx.dequantizing else _out_dtype(info, ctx.dtype)
    assert want is not None
    check = TensorCheck(key, name, "unchanged", "", dtype=found.dtype, expected_dtype=want,
                        storage=st.describe() if st is not None else None)
    shape = st.shape if st is not None else info.shape
    if tuple(st_found.shape if st_found is not None else found.shape) != tuple(shape):
        check.verdict = "shape changed"
        return check
    unit = _unit(want, found.dtype)
    contribs = plan.deltas.get(key) or plan.biases.get(key)
    if contribs:
        check.expected = "merged"
        check.modules = sorted({c.module.name for c in contribs})
    if st is not None or st_found is not None:
        if key in plan.replacements:
            check.expected, check.modules = "replaced", ["modules_to_save"]
        if contribs or key in plan.replacements or ctx.dequantizing or (st_found is not None and (
                st is None or st_found.describe() != st.describe())):
            return _check_quantized(info, found, ctx, check, contribs or [])
        check.verdict, check.residual, check.tolerance = _check_unchanged(info, found, unit)
        return check
    if contribs:
        w, m = load_tensor(info), load_tensor(found)
        if not (w.is_floating_point() and m.is_floating_point()):
            check.verdict = "other change"
            return check
        # DoRA, LyCORIS and bias deltas are not low-rank sums: merge's own arithmetic, densely
        dense = key in plan.biases or any(not isinstance(c.module, LoraModule) or c.module.magnitude is not None
                                          for c in contribs)
        if dense:
            _, expected, _ = merged_tensor(w, [c.term for c in contribs], device=ctx.device,
                                           unmerge=False, bias=key in plan.biases, keep_delta=True)
            verdict, k, ks, res, tol, norm = _check_dense(w, m, expected.cpu(), unit, contribs)
        else:
            verdict, k, ks, res, tol, norm = _check_lowrank(w, m, contribs, unit, ctx.device)
        norm = norm or 1.0
        check.verdict, check.factor, check.factors = verdict, k, ks
        check.residual, check.tolerance = res / norm, tol / norm
    elif key in plan.replacements:
        check.expected = "replaced"
        check.modules = ["modules_to_save"]
        check.verdict, check.residual, check.tolerance = _check_replaced(
            load_tensor(info), load_tensor(found), plan.replacements[key].load(), unit)
    else:
        check.verdict, check.residual, check.tolerance = _check_unchanged(info, found, unit)
    return check


def _check_quantized(info: TensorInfo, found: TensorInfo, ctx: _Context, check: TensorCheck,
                     contribs: list[Contribution]) -> TensorCheck:
    """A tensor the base or MERGED stores quantized: dequantized values against requantized references."""
    import torch

    from loratool.maths.compare import requant_numbers
    from loratool.maths.merge import merged_tensor
    from loratool.storage import FP8_DTYPES, dequantize, requantize

    key = info.key
    st, st_found = ctx.base_storage.of(key), ctx.merged_storage.of(key)
    w = dequantize(st, ctx.load_base(key), ctx.load_base) if st is not None else ctx.load_base(key).float()
    m = dequantize(st_found, ctx.load_merged(key), ctx.load_merged) if st_found is not None else \
        ctx.load_merged(key).float()
    if not (w.is_floating_point() and m.is_floating_point()):
        check.verdict = "other change"
        return check
    if contribs:
        _, x, _ = merged_tensor(w, [c.term for c in contribs], device=ctx.device, unmerge=False,
                                bias=key in ctx.plan.biases, keep_delta=True)
        x = x.cpu()
    elif key in ctx.plan.replacements:
        x = ctx.plan.replacements[key].load().to(torch.float32).reshape(w.shape)
    else:
        x = w
    if st is not None and not ctx.dequantizing:
        refs = [requantize(st, x, ctx.load_base)[1]]
        if st.scheme.startswith("fp8") or st.dtype in FP8_DTYPES:  # merge --rounding stochastic: same grid
            gen = torch.Generator(device="cpu").manual_seed(0)
            refs.append(requantize(st, x, ctx.load_base, generator=gen)[1])
    else:  # written as plain floats: one rounding to the output dtype
        refs = [x.to(getattr(torch, check.expected_dtype)).to(torch.float32)]
    numbers = requant_numbers(w, m, x, refs)
    verdict, k, res, tol, note = classify_quantized(numbers, "unchanged" if check.expected == "unchanged" else "merged",
                                                    unbiased=len(refs) > 1)
    if check.expected == "replaced" and verdict == "merged":
        verdict = "replaced"
    norm = math.sqrt(numbers.m_sq) or 1.0
    check.verdict, check.factor, check.note = verdict, k, note
    check.residual, check.tolerance = res / norm, tol / norm
    check.requant_error = math.sqrt(max(numbers.ref_sq[0], 0.0)) / norm
    check.exact = numbers.exact
    if st_found is not None and st is not None and st_found.describe() != st.describe() and not ctx.dequantizing:
        check.note = f"stored as {st_found.describe()}, expected {st.describe()}"
        check.verdict = "other change" if check.verdict in OK_VERDICTS else check.verdict
    return check
