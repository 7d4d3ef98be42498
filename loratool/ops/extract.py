"""extract: an adapter from the difference between a fine-tuned checkpoint and its base.

For every weight present in both checkpoints with equal shapes and a non-zero difference, in the
base's order and one pair of tensors at a time (the next pair is read while the current one is
decomposed, so peak memory is two pairs plus the growing adapter, not a model):

    ΔW = W_tuned − W_base (float32), ΔW ≈ U_k·S_k·Vh_k (truncated SVD),
    up = U_k·√S_k, down = √S_k·Vh_k, alpha = k (scale 1).

Rank: `rank` k, or with `threshold` T the smallest k whose singular values keep the energy share
Σ_{i<k} σ_i² ≥ T·||ΔW||_F² (equivalently: relative Frobenius error sqrt(1 − share) ≤ sqrt(1 − T));
`rank` then caps it. The SVD is exact (torch.linalg.svd) when the matrix's smaller side is at most
`exact_max_dim`, else randomized (Halko et al. 2011: a Gaussian sketch of k + p columns, p =
max(10, k/2), refined by power iterations with re-orthonormalisation, then the SVD of the small
projected matrix); for a threshold it grows the sketch until the share is met. ||ΔW||_F is always
exact, so the reported kept energy is exact for the exact SVD and a lower bound for the randomized.

Layouts: linear (out, in); conv (out, in, kh, kw) flattened to (out, in·kh·kw); embeddings (vocab,
dim) decompose ΔWᵀ (PEFT's lora_embedding_A (r, vocab) / lora_embedding_B (dim, r)); GPT-2 Conv1D
weights (in, out) likewise (fan_in_fan_out). Embeddings and output heads (`embed_tokens`, `lm_head`,
...) only with `embeddings`. Changed 1-D tensors (norms, biases) are reported; with `save_changed`
a changed bias of an extracted module becomes its LoRA bias delta (PEFT lora_bias) and every other
one's module is stored whole (all its tensors, from the tuned model) as modules_to_save.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, Expert, Kind, LoraModule, expert_name
from loratool.errors import IncompatibleError
from loratool.families.moe import EXPERT_PARAMS
from loratool.io.checkpoint import Checkpoint
from loratool.io.copies import BackgroundSha256
from loratool.io.header import TensorInfo, read_side_file
from loratool.io.paths import folder_file
from loratool.io.tensors import TensorRef
from loratool.maths.svd import EXACT_MAX_DIM, truncated_svd
from loratool.ops import Progress, Row, output_size
from loratool.patterns import compile_pattern

if TYPE_CHECKING:
    import torch

SCHEMA = 1

_FLOAT = ("float64", "float32", "float16", "bfloat16")

# Leaf names of token/position embedding layers (nn.Embedding) and of output heads (nn.Linear over
# the vocabulary): extracted only with `embeddings`.
EMBEDDING_NAMES = frozenset({
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "embed_positions", "shared", "token_embedding", "position_embedding", "tok_embeddings", "embed_in",
})
HEAD_NAMES = frozenset({"lm_head", "embed_out"})


@dataclass
class ModuleExtract(Row):
    name: str
    kind: str  # linear, conv or embedding
    shape: list[int]  # the weight's stored shape
    rank: int
    kept_energy: float  # Σ_{i<rank} σ_i² / ||ΔW||_F²
    rel_error: float  # ||ΔW − ΔW_rank||_F / ||ΔW||_F = sqrt(1 − kept_energy)
    rel_change: float  # ||ΔW||_F / ||W_base||_F
    method: str  # "exact" or "randomized"
    bias: bool = False  # its changed bias is stored as the LoRA bias delta


@dataclass
class ChangedTensor(Row):
    """A changed tensor that is not a LoRA module's weight: stored whole, as a bias delta, or skipped."""

    key: str
    shape: list[int]
    action: str  # "saved" (modules_to_save), "bias" (LoRA bias delta) or "skipped"
    reason: str | None  # why it was skipped
    rel_change: float


@dataclass
class ExtractReport:
    out: Path
    base: Path
    tuned: Path
    format: str
    rank: int | None
    threshold: float | None
    device: str
    modules: list[ModuleExtract] = field(default_factory=list)
    changed: list[ChangedTensor] = field(default_factory=list)
    unchanged: int = 0  # tensors compared and found bit-identical (or equal in value)
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    lora_params: int = 0
    size: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "out": str(self.out),
            "base": str(self.base),
            "tuned": str(self.tuned),
            "format": self.format,
            "rank": self.rank,
            "threshold": self.threshold,
            "device": self.device,
            "num_modules": len(self.modules),
            "methods": {m: sum(1 for x in self.modules if x.method == m) for m in ("exact", "randomized")},
            "min_kept_energy": min((m.kept_energy for m in self.modules), default=None),
            "lora_params": self.lora_params,
            "size": self.size,
            "unchanged": self.unchanged,
            "only_in_base": self.only_in_base,
            "only_in_tuned": self.only_in_tuned,
            "modules": [m.to_dict() for m in self.modules],
            "changed": [c.to_dict() for c in self.changed],
            "warnings": self.warnings,
        }


def output_formats() -> tuple[str, ...]:
    """The formats extract writes: those that name modules by key paths or their stems. Formats that
    name modules under a pipeline component (diffusers) are reached with `convert --base` after, and so
    is GGUF, whose tensor names come from the architecture's map (`convert --to gguf --base`)."""
    from loratool.formats import get_format, writable_formats

    return tuple(n for n in writable_formats() if get_format(n).naming != "component" and n != "gguf")


# ---------------------------------------------------------------------------------------------
# planning (headers only)


@dataclass
class _Pair:
    key: str
    module: str  # the key without its last part (`.weight`, `.bias`)
    role: str  # "lora", "vector" (1-D) or "skip" (changes are reported, never stored)
    base: TensorInfo
    tuned: TensorInfo
    kind: Kind = "linear"
    transposed: bool = False  # decompose ΔWᵀ: embeddings (vocab, dim), GPT-2 Conv1D (in, out)
    reason: str | None = None  # why a "skip" pair is not extracted
    base_src: Any = None  # (Checkpoint, BaseStorage) the base tensor is read from (dequantized if quantized)
    tuned_src: Any = None

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _load(self.base, self.base_src), _load(self.tuned, self.tuned_src)


def _load(info: TensorInfo, src: Any) -> torch.Tensor:
    """One tensor as stored, or dequantized to float32 when its checkpoint stores it quantized."""
    from loratool.io.tensors import load_tensor
    from loratool.storage import dequantize

    if src is None or src[1].of(info.key) is None:
        return load_tensor(info)
    ckpt, store = src
    return dequantize(store.of(info.key), load_tensor(ckpt.tensors[info.key]),
                      lambda k: load_tensor(ckpt.tensors[k]))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _plan(base: Checkpoint, tuned: Checkpoint, *, modules: str | None, embeddings: bool,
          report: ExtractReport, quantized: set[str] | None = None) -> list[_Pair]:
    """The tensor pairs to compare, in the base's order. Raises on a shape mismatch it would use."""
    from loratool.formats import is_transposed_layer  # GPT-2 Conv1D layers store their weight (in, out)
    from loratool.keymap import moe_transposed

    transposed_experts = moe_transposed(base.root)

    rx = None
    if modules is not None:
        try:
            rx = compile_pattern(modules)
        except re.error as e:
            raise IncompatibleError(f"--modules {modules!r}: not a valid regular expression ({e})") from None
    common = [k for k in base.tensors if k in tuned.tensors]
    if not common:
        raise IncompatibleError(
            f"{report.base} and {report.tuned} share no tensor name "
            f"(e.g. '{next(iter(base.tensors), '')}' vs '{next(iter(tuned.tensors), '')}')",
            hint="pass the base model the tuned one was fine-tuned from, both as safetensors checkpoints",
        )
    report.only_in_base = [k for k in base.tensors if k not in tuned.tensors]
    report.only_in_tuned = [k for k in tuned.tensors if k not in base.tensors]
    pairs: list[_Pair] = []
    selected = 0
    for key in common:
        bi, ti = base.tensors[key], tuned.tensors[key]
        module, _, leaf = key.rpartition(".")
        if rx is not None and not rx.search(module or key):
            continue
        selected += 1
        floats = key in (quantized or ()) or (bi.dtype in _FLOAT and ti.dtype in _FLOAT)
        if not floats or not bi.shape or math.prod(bi.shape) == 0:
            continue
        weight = leaf == "weight" and len(bi.shape) >= 2
        vocab = weight and len(bi.shape) == 2 and (_leaf(module) in EMBEDDING_NAMES or _leaf(module) in HEAD_NAMES)
        if bi.shape != ti.shape:
            if vocab and not embeddings:
                report.warnings.append(f"'{key}' is {bi.shape} in the base but {ti.shape} in the tuned model "
                                       "(resized vocabulary?); skipped")
                continue
            raise IncompatibleError(
                f"'{key}' is {bi.shape} in {report.base} but {ti.shape} in {report.tuned}",
                hint="extract needs equal shapes; leave such tensors out with --modules REGEX"
                + ("" if not vocab else ", or drop --embeddings"),
            )
        if vocab and not embeddings:
            pairs.append(_Pair(key, module, "skip", bi, ti, reason="embedding or output head: pass --embeddings"))
        elif weight:
            is_embedding = vocab and _leaf(module) in EMBEDDING_NAMES
            conv1d = len(bi.shape) == 2 and bool(is_transposed_layer(module))
            kind: Kind = "embedding" if is_embedding else ("conv" if len(bi.shape) > 2 else "linear")
            pairs.append(_Pair(key, module, "lora", bi, ti, kind=kind, transposed=is_embedding or conv1d))
        elif len(bi.shape) == 1:
            pairs.append(_Pair(key, module, "vector", bi, ti))
        elif len(bi.shape) == 3 and ".experts" in module and leaf in EXPERT_PARAMS:
            # a fused MoE expert parameter (E, out, in), (E, in, out) where the model stores experts
            # transposed (docs/moe.md): one LoRA per expert, named `<key>[e]`
            pairs.append(_Pair(key, key, "experts", bi, ti, transposed=bool(transposed_experts)))
        else:
            pairs.append(_Pair(key, module, "skip", bi, ti, reason="not a layer's weight"))
    if rx is not None and not selected:
        raise IncompatibleError(f"--modules {modules!r} matches none of the {len(common)} shared tensors",
                                hint="the regex is searched in the key without its last part, e.g. "
                                "model.layers.0.self_attn.q_proj")
    return pairs


# ---------------------------------------------------------------------------------------------
# streaming


def _source_files(ckpt: Checkpoint) -> list[Path]:
    extra = [folder_file(ckpt.root, n) for n in ("config.json", "model.safetensors.index.json")]
    return [*ckpt.files, *(p for p in extra if p.is_file() and p not in ckpt.files)]


def _config(ckpt: Checkpoint) -> dict[str, Any]:
    try:
        data = json.loads(read_side_file(folder_file(ckpt.root, "config.json")).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # FIFOs, devices, absurd sizes: FormatError, not ignored
        return {}
    return data if isinstance(data, dict) else {}


def _target_modules(names: list[str], base: Checkpoint) -> list[str]:
    """The short names when peft would wrap exactly these modules with them, else the exact paths."""
    shorts = sorted({_leaf(n) for n in names})
    paths: set[str] = set()
    for key in base.tensors:
        parts = key.split(".")[:-1]
        paths.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    wrapped = {p for p in paths if _leaf(p) in shorts}  # peft: name == t or name.endswith("." + t)
    return shorts if wrapped == set(names) else sorted(names)


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    threshold: float | None = None,
    modules: str | None = None,
    embeddings: bool = False,
    save_changed: bool = False,
    fmt: str = "peft",
    device: str = "cpu",
    force: bool = False,
    exact_max_dim: int = EXACT_MAX_DIM,
    progress: Progress | None = None,
) -> ExtractReport:
    """Extract a LoRA adapter from W_tuned − W_base and write it.

    Args:
        base, tuned: checkpoints (a .safetensors file, a directory with model.safetensors, or a
            sharded directory) with the same tensor names.
        rank: the rank of every module, or with `threshold` the cap.
        threshold: energy share in (0, 1]: per module the smallest rank with Σ_{i<k} σ_i² ≥ T·||ΔW||_F².
        modules: regex (re.search) on the module name (the key without `.weight` / `.bias`).
        embeddings: also extract embeddings (PEFT embedding LoRA) and output heads (`lm_head`).
        save_changed: store changed 1-D tensors (biases of extracted modules as LoRA bias deltas,
            the rest whole as modules_to_save); PEFT only.
        fmt: one of output_formats() ("peft" or "kohya").
        exact_max_dim: matrices whose smaller side exceeds this use the randomized SVD.
        progress: called with (pairs done, pairs total).

    Raises:
        IncompatibleError: bad options, shape mismatches, nothing changed, content the format
            cannot hold. FormatError, OutputExistsError.
    """
    from loratool.device import resolve_device
    from loratool.formats import get_format
    from loratool.hub import resolve_path
    from loratool.io.checkpoint import open_checkpoint

    if rank is None and threshold is None:
        raise IncompatibleError("extract needs --rank K or --threshold T", hint="e.g. --rank 16, or --threshold 0.9")
    if rank is not None and rank < 1:
        raise IncompatibleError(f"--rank {rank}: must be at least 1")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise IncompatibleError(f"--threshold {threshold}: an energy share in (0, 1]", hint="e.g. --threshold 0.9")
    if fmt not in output_formats():
        raise IncompatibleError(f"--format {fmt}: extract writes {' or '.join(output_formats())}",
                                hint=f"write peft, then convert: loratool convert OUT --to {fmt} --base BASE")
    caps = get_format(fmt, writing=True).capabilities
    if save_changed and not (caps.extras and caps.bias):
        raise IncompatibleError(f"--save-changed stores full tensors and bias deltas, which {fmt} files cannot hold",
                                hint="write PEFT (--format peft), or drop --save-changed")
    base, tuned, device = resolve_path(base), resolve_path(tuned), resolve_device(device)
    from loratool.storage import detect

    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    # quantized weights (fp8, bitsandbytes, ...) are compared dequantized; unknown schemes are refused
    stores = {id(c): detect(c) for c in (base_ckpt, tuned_ckpt)}
    for c, where in ((base_ckpt, base), (tuned_ckpt, tuned)):
        stores[id(c)].refuse_unsupported(Path(where))
    report = ExtractReport(Path(out), Path(base), Path(tuned), fmt, rank, threshold, device)
    quantized = {k for st in stores.values() for k in st.tensors}
    views = [dataclasses.replace(c, tensors=stores[id(c)].logical(c.tensors)) for c in (base_ckpt, tuned_ckpt)]
    pairs = _plan(views[0], views[1], modules=modules, embeddings=embeddings, report=report, quantized=quantized)
    readers = {id(views[0]): (base_ckpt, stores[id(base_ckpt)]), id(views[1]): (tuned_ckpt, stores[id(tuned_ckpt)])}
    for pair in pairs:
        pair.base_src, pair.tuned_src = readers[id(views[0])], readers[id(views[1])]
    bad = [p.key for p in pairs if p.role == "lora" and p.transposed
           and not (caps.embedding if p.kind == "embedding" else caps.fan_in_fan_out)]
    if bad:  # refused here, before any SVD, as the writer would (formats.check_writable)
        raise IncompatibleError(f"'{bad[0]}' is an embedding or GPT-2 Conv1D weight, which {fmt} files cannot "
                                f"hold ({len(bad)} such)", hint="write PEFT (--format peft)")

    hasher = BackgroundSha256([*_source_files(base_ckpt), *_source_files(tuned_ckpt)])
    try:
        return _extract(base_ckpt, tuned_ckpt, pairs, report, hasher, rank=rank, threshold=threshold,
                        modules=modules, embeddings=embeddings, save_changed=save_changed, fmt=fmt, device=device,
                        force=force, exact_max_dim=exact_max_dim, progress=progress)
    finally:
        hasher.stop()


def _extract(
    base_ckpt: Checkpoint, tuned_ckpt: Checkpoint, pairs: list[_Pair], report: ExtractReport,
    hasher: BackgroundSha256, *,
    rank: int | None, threshold: float | None, modules: str | None, embeddings: bool, save_changed: bool, fmt: str,
    device: str, force: bool, exact_max_dim: int, progress: Progress | None,
) -> ExtractReport:
    """The streaming loop, what becomes of changed 1-D tensors, and the write."""
    import torch

    from loratool.formats import source_label, write

    pool = ThreadPoolExecutor(max_workers=1)  # reads the next pair while this one is decomposed

    def fetch(i: int) -> Future[tuple[torch.Tensor, torch.Tensor]] | None:
        if i >= len(pairs):
            return None
        return pool.submit(lambda p: p.load(), pairs[i])

    lora: dict[str, LoraModule] = {}
    rows: dict[str, ModuleExtract] = {}
    vectors: list[tuple[_Pair, torch.Tensor, float]] = []  # changed 1-D tensors: delta (float32, CPU)
    try:
        ahead = fetch(0)
        for i, pair in enumerate(pairs):
            assert ahead is not None
            w_base, w_tuned = ahead.result()
            ahead = fetch(i + 1)
            if w_base.dtype == w_tuned.dtype and torch.equal(w_base.view(torch.uint8), w_tuned.view(torch.uint8)):
                report.unchanged += 1
            else:
                _one(pair, w_base, w_tuned, device, rank, threshold, exact_max_dim, report, lora, rows, vectors)
            del w_base, w_tuned
            if progress:
                progress(i + 1, len(pairs))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    extras: dict[str, TensorRef] = {}
    # peft builds lora_bias into every LoRA layer and has none for embedding layers
    embedding_lora = any(m.kind == "embedding" for m in lora.values())
    for pair, d, rel in vectors:
        action, reason = "skipped", None
        owner = lora.get(pair.module)
        if not save_changed:
            reason = "1-D: pass --save-changed to store it"
        elif owner is not None and _leaf(pair.key) == "bias" and embedding_lora:
            reason = "a LoRA layer's bias needs peft's lora_bias, which embedding LoRA layers do not support"
        elif owner is not None and _leaf(pair.key) == "bias":
            lora[pair.module] = owner.with_(bias=TensorRef.from_tensor(d))
            rows[pair.module].bias = True
            action = "bias"
        elif owner is not None:
            reason = "belongs to an extracted LoRA module"
        else:
            # peft's modules_to_save replaces the whole module: store every tensor it owns
            for key, info in tuned_ckpt.tensors.items():
                if key.rpartition(".")[0] == pair.module:
                    extras[key] = TensorRef.from_info(info)
            action = "saved"
        report.changed.append(ChangedTensor(pair.key, list(pair.base.shape), action, reason, rel))
    report.modules = list(rows.values())
    if not lora and not extras:
        skipped = [c.key for c in report.changed]
        if skipped:
            raise IncompatibleError(
                f"nothing to extract: the {len(skipped)} changed tensor(s) are all skipped "
                f"({report.changed[0].key}: {report.changed[0].reason})",
                hint="see the reasons with --json; --embeddings and --save-changed store more",
            )
        raise IncompatibleError(f"nothing to extract: no compared tensor differs between {report.base} and "
                                f"{report.tuned}", hint="is TUNED really fine-tuned from BASE?")
    for side, keys in (("tuned", report.only_in_tuned), ("base", report.only_in_base)):
        if keys:
            report.warnings.append(f"{len(keys)} tensor(s) only in the {side} model were not compared, "
                                   f"e.g. '{keys[0]}'")

    cfg = {**_config(tuned_ckpt), **{k: v for k, v in _config(base_ckpt).items() if k == "_name_or_path"}}
    base_name = cfg.get("_name_or_path") or None
    archs = cfg.get("architectures") or []
    config: dict[str, Any] = {
        "target_modules": _target_modules([n for n, m in lora.items() if m.expert is None], base_ckpt),
        "r": max((m.rank for m in lora.values()), default=None),  # the rest go to rank_pattern
        "base_model_name_or_path": base_name,
        "task_type": "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None,
    }
    adapter = Adapter(modules=lora, source_format="peft", extras=extras, config=config, base_model=base_name,
                      source_modules=tuple(lora))
    report.lora_params = adapter.lora_params
    params = {"rank": rank, "threshold": threshold, "modules": modules, "embeddings": embeddings,
              "save_changed": save_changed, "base": source_label(report.base), "tuned": source_label(report.tuned)}
    written = write(adapter, report.out, fmt=fmt, force=force, op="extract", params=params, sources=[],
                    hashes=hasher.result(), inputs=[report.base, report.tuned])
    report.size = output_size(written)
    return report


def _one(
    pair: _Pair, w_base: torch.Tensor, w_tuned: torch.Tensor, device: str, rank: int | None,
    threshold: float | None, exact_max_dim: int, report: ExtractReport, lora: dict[str, LoraModule],
    rows: dict[str, ModuleExtract], vectors: list[tuple[_Pair, torch.Tensor, float]],
) -> None:
    """Handle one pair whose bytes differ: decompose it, remember it, or report it."""
    import torch

    b = w_base.to(device=device, dtype=torch.float32)
    d = w_tuned.to(device=device, dtype=torch.float32) - b  # ΔW in the stored layout
    if not bool(torch.isfinite(d).all()):
        raise IncompatibleError(f"'{pair.key}': W_tuned − W_base has NaN/Inf values",
                                hint="check both checkpoints with: loratool inspect / a NaN scan")
    delta_norm = float(torch.linalg.vector_norm(d, dtype=torch.float64))
    if delta_norm == 0.0:  # equal values, different bits (-0.0, or a dtype change)
        report.unchanged += 1
        return
    rel = delta_norm / max(float(torch.linalg.vector_norm(b, dtype=torch.float64)), 1e-30)
    if pair.role == "vector":
        vectors.append((pair, d.cpu(), rel))
        return
    if pair.role == "skip":
        report.changed.append(ChangedTensor(pair.key, list(pair.base.shape), "skipped", pair.reason, rel))
        return
    shape = tuple(pair.base.shape)
    if pair.role == "experts":  # expert e's ΔW_e (out, in) is d[e], or d[e]ᵀ when stored (in, out)
        for e in range(shape[0]):
            _decompose(pair, expert_name(pair.key, e), d[e].T if pair.transposed else d[e], shape[1:],
                       rank, threshold, exact_max_dim, lora, rows, rel, Expert(pair.key, e, shape[0]))
        return
    m = d.T if pair.transposed else d.reshape(shape[0], -1)  # (out, in·k); embedding (dim, vocab)
    _decompose(pair, pair.module, m, shape, rank, threshold, exact_max_dim, lora, rows, rel, None)


def _decompose(pair: _Pair, name: str, m: torch.Tensor, shape: tuple[int, ...], rank: int | None,
               threshold: float | None, exact_max_dim: int, lora: dict[str, LoraModule],
               rows: dict[str, ModuleExtract], rel: float, expert: Expert | None) -> None:
    """The truncated SVD of one ΔW as (out, in·k) `m`, stored as the LoRA module `name`."""
    u, s, vh, method, total = truncated_svd(m, rank, threshold, exact_max_dim=exact_max_dim)
    k = s.shape[0]
    root = s.sqrt()
    up = (u * root).cpu()  # (out, k)
    down = (root[:, None] * vh).cpu()  # (k, in·k)
    if pair.kind == "conv":
        up = up.reshape(shape[0], k, *([1] * (len(shape) - 2)))  # (out, k, 1, 1)
        down = down.reshape(k, *shape[1:])  # (k, in, kh, kw)
    kept = min(1.0, float((s.double() ** 2).sum()) / total) if total > 0 else 1.0
    lora[name] = LoraModule(
        name=name, down=TensorRef.from_tensor(down.contiguous()), up=TensorRef.from_tensor(up.contiguous()),
        alpha=float(k), alpha_source="config", kind=pair.kind,
        fan_in_fan_out=pair.transposed and pair.kind == "linear" and expert is None, expert=expert,
    )
    rows[name] = ModuleExtract(name, pair.kind, list(shape), k, kept, math.sqrt(max(0.0, 1.0 - kept)), rel, method)
