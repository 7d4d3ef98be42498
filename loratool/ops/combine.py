"""combine: several adapters into one, exactly (cat, svd) or with peft's merge methods (DESIGN.md 5).

Inputs may differ in format, rank, alpha, rslora and target set; the result covers the union of
their modules. Every input's own scale s_i (alpha/r or alpha/sqrt(r)) is folded into the factors
with its weight w_i, and every written module has alpha = rank (scale 1), so the result is exact
whatever scaling rule each input used (peft's add_weighted_adapter copies use_rslora from the first
adapter and gets mixed inputs wrong).

Methods, per module, over the inputs that hold it:
    cat      exact: up = [±√|w_i·s_i|·up_i], down = [√|w_i·s_i|·down_i], rank Σ r_i.
    svd      the cat result truncated to --rank by the exact low-rank SVD (QR of both stacked
             factors + SVD of the small core; never a dense out×in matrix). Best rank-k
             approximation of Σ w_i·ΔW_i (Eckart-Young).
    ties, dare_linear, dare_ties, magnitude_prune
             peft.utils.merge_utils on the dense scaled deltas (like peft's *_svd combination
             types), then truncated to --rank by a thin float32 SVD. Dense by nature.
    linear   peft's factor averaging: up = Σ √|c_i|·up_i, down = Σ sign(c_i)·√|c_i|·down_i with
             c_i = w_i·s_i. Needs equal ranks; NOT the weighted sum of deltas (cross terms).

Module matching: by the canonical module name (LoraModule.name). kohya files keep their stored
underscore names; when they are combined with dotted-name inputs (PEFT, diffusers), a kohya name
matches the dotted module whose kohya name (formats.rename.stored_name) it equals, and the result uses
the dotted name. Inputs of different formats that share no module at all are an error.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import IncompatibleError
from loratool.io.tensors import TensorRef
from loratool.ops import Progress, Row, output_size
from loratool.ops.resize import target_dtype

if TYPE_CHECKING:
    import torch

SCHEMA = 1

METHODS: tuple[str, ...] = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "linear")
DENSE: tuple[str, ...] = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
TRUNCATED: tuple[str, ...] = ("svd", *DENSE)  # methods that take --rank
SIGNED: tuple[str, ...] = ("ties", "dare_ties")  # methods that elect signs (--majority-sign)
RANDOM: tuple[str, ...] = ("dare_linear", "dare_ties")  # methods that draw masks (--seed)
MAJORITY_SIGN: tuple[str, ...] = ("total", "frequency")


@dataclass
class ModuleCombine(Row):
    name: str
    input_ranks: list[int | None]  # per input, None where the input lacks the module
    rank: int  # output rank
    fro_retained: float | None  # Frobenius share kept by the rank truncation (svd: of the exact sum)
    rel_error: float | None  # ||result − Σ w_i·ΔW_i||_F / ||Σ w_i·ΔW_i||_F (None when the sum is 0)


@dataclass
class CombineReport:
    out: Path
    format: str
    method: str
    weights: list[float]
    rank: int | None  # the --rank option (None: per module, the largest input rank)
    density: float | None
    majority_sign: str | None
    seed: int | None  # DARE: the seed used (drawn when not given, so the result can be reproduced)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    modules: list[ModuleCombine] = field(default_factory=list)
    size: int = 0
    params: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float | None:
        errs = [m.rel_error for m in self.modules if m.rel_error is not None]
        return max(errs) if errs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "out": str(self.out),
            "format": self.format,
            "method": self.method,
            "weights": self.weights,
            "rank": self.rank,
            "density": self.density,
            "majority_sign": self.majority_sign,
            "seed": self.seed,
            "inputs": self.inputs,
            "num_modules": len(self.modules),
            "params": self.params,
            "max_rel_error": self.max_rel_error,
            "size": self.size,
            "modules": [m.to_dict() for m in self.modules],
            "warnings": self.warnings,
        }


def check_options(
    n_inputs: int,
    weights: list[float],
    method: str,
    rank: int | None,
    density: float | None,
    majority_sign: str,
    seed: int | None,
) -> None:
    """Refuse option combinations that would be ignored or meaningless, before reading any file.

    Raises:
        IncompatibleError: naming the option and what is expected.
    """
    if method not in METHODS:
        raise IncompatibleError(f"--method {method}: unknown", hint=f"use one of {', '.join(METHODS)}")
    if n_inputs < 1:
        raise IncompatibleError("combine needs at least one adapter")
    if len(weights) != n_inputs:
        raise IncompatibleError(
            f"--weights has {len(weights)} value(s) but {n_inputs} adapter(s) were given",
            hint="give one weight per adapter, in order, e.g. --weights " + ",".join(["0.5"] * max(n_inputs, 2)),
        )
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise IncompatibleError(f"--weights: {bad[0]} is not a finite number")
    if rank is not None:
        if method not in TRUNCATED:
            why = "is exact with rank Σ r_i" if method == "cat" else "keeps the inputs' common rank"
            raise IncompatibleError(f"--rank does not apply to --method {method} (it {why})",
                                    hint="use --method svd to get the exact sum truncated to a rank")
        if rank < 1:
            raise IncompatibleError(f"--rank {rank}: must be at least 1")
    if method in DENSE:
        if density is None:
            raise IncompatibleError(f"--method {method} needs --density D (the share of entries kept, in (0, 1])",
                                    hint="e.g. --density 0.5")
        if not (0.0 < density <= 1.0):
            raise IncompatibleError(f"--density {density}: must be in (0, 1]")
    elif density is not None:
        raise IncompatibleError(f"--density does not apply to --method {method}",
                                hint=f"it is used by {', '.join(DENSE)}")
    if majority_sign not in MAJORITY_SIGN:
        raise IncompatibleError(f"--majority-sign {majority_sign}: unknown", hint="use total or frequency")
    if majority_sign != "total" and method not in SIGNED:
        raise IncompatibleError(f"--majority-sign does not apply to --method {method}",
                                hint=f"it is used by {', '.join(SIGNED)}")
    if seed is not None:
        if method not in RANDOM:
            raise IncompatibleError(f"--seed does not apply to --method {method} (nothing random happens)",
                                    hint=f"it is used by {', '.join(RANDOM)}")
        if not 0 <= seed < 2**63:
            raise IncompatibleError(f"--seed {seed}: must be in [0, 2^63)")


# ---------------------------------------------------------------------------------------------
# reading and matching


def _refuse_unsupported(adapter: Adapter) -> None:
    from loratool.formats import require_plain

    require_plain(adapter, "combine")
    dora = next((m for m in adapter.modules.values() if m.magnitude is not None), None)
    if dora is not None:
        raise IncompatibleError(
            f"{adapter.path}: module '{dora.name}' is DoRA (it has a magnitude vector); a weighted sum of "
            "DoRA adapters is not a LoRA, so combine cannot represent it exactly",
            hint="merge DoRA adapters into the base model instead (loratool merge)",
        )
    if adapter.extras:
        key = next(iter(adapter.extras))
        raise IncompatibleError(
            f"{adapter.path}: holds the full tensor '{key}' (modules_to_save); full weights replace base "
            "weights, so they cannot be weighted or summed",
            hint="combine adapters without modules_to_save, or merge such an adapter into the base",
        )


def _family(adapter: Adapter) -> str:
    """"stem" for inputs whose names lost their dots (kohya), else "dotted"."""
    from loratool.formats import get_format

    return "stem" if get_format(adapter.source_format).naming == "stem" else "dotted"


def match_modules(adapters: list[Adapter]) -> tuple[dict[str, list[tuple[int, LoraModule]]], list[str]]:
    """Group the inputs' modules by canonical name, in first-seen order.

    Returns:
        {output name: [(input index, module), ...]} and warnings.

    Raises:
        IncompatibleError: inputs of different formats that share no module.
    """
    from loratool.formats.rename import stored_name

    families = {_family(a) for a in adapters}
    translate: dict[str, str] = {}
    if len(families) > 1:
        stem_format = next(a.source_format for a in adapters if _family(a) == "stem")
        for a in adapters:
            if _family(a) == "dotted":
                for m in a.modules.values():
                    translate.setdefault(stored_name(stem_format, m.name), m.name)
    groups: dict[str, list[tuple[int, LoraModule]]] = {}
    names_of: list[set[str]] = []
    for i, a in enumerate(adapters):
        names: set[str] = set()
        for m in a.modules.values():
            key = translate.get(m.name, m.name) if _family(a) == "stem" else m.name
            groups.setdefault(key, []).append((i, m))
            names.add(key)
        names_of.append(names)
    for i, a in enumerate(adapters):
        others = [j for j, b in enumerate(adapters) if b.source_format != a.source_format]
        if others and not any(names_of[i] & names_of[j] for j in others):
            j = others[0]
            b = adapters[j]
            raise IncompatibleError(
                f"{a.path} ({a.source_format}) and {b.path} ({b.source_format}) share no module: "
                f"'{_example(a)}' ... vs '{_example(b)}' ...",
                hint="they target different models or naming schemes; compare the names with "
                "loratool inspect PATH --modules",
            )
    warnings: list[str] = []
    if len({a.source_format for a in adapters}) > 1:
        partial = [n for n, items in groups.items() if len(items) < len(adapters)]
        if partial:
            shown = ", ".join(partial[:3]) + (f", ... ({len(partial)} in all)" if len(partial) > 3 else "")
            warnings.append(f"{len(partial)} of {len(groups)} modules are in only some of the inputs "
                            f"(formats differ; check the names match): {shown}")
    for name, items in groups.items():
        _check_same_layer(name, items, adapters)
        owners = [i for i, _ in items]
        if len(set(owners)) < len(owners):
            dup = next(i for i in owners if owners.count(i) > 1)
            raise IncompatibleError(
                f"{adapters[dup].path}: two modules match '{name}' after name normalisation",
                hint="the file names the same layer twice; inspect it with loratool inspect PATH --modules",
            )
    return groups, warnings


def _refuse_two_models(adapters: list[Adapter], allow: bool) -> None:
    """Adapters trained on different base models add up to a delta no model can use.

    Raises:
        IncompatibleError: two inputs record different base models (unless `allow`).
    """
    named = [a for a in adapters if a.base_model]
    other = next((b for b in named if b.base_model != named[0].base_model), None) if named else None
    if other is None or allow:
        return
    a = named[0]
    raise IncompatibleError(
        f"the inputs are adapters for different models: {a.path} for {a.base_model} ({len(a.modules)} modules, "
        f"e.g. '{_example(a)}'), {other.path} for {other.base_model} (e.g. '{_example(other)}')",
        hint="combine adapters of one base model; if both names mean the same model, pass --allow-different-bases")


def _refuse_two_dialects(adapters: list[Adapter], groups: dict[str, list[tuple[int, LoraModule]]] | None) -> None:
    """Two adapters for one model family in two namings (a kohya FLUX.1 file and its diffusers
    conversion) whose modules `groups` (match_modules) does not pair would be combined as if they
    adapted different layers. (SD U-Net names pair through the naming rules: those pass.)

    Raises:
        IncompatibleError: naming the `loratool convert` command that puts one in the other's names.
    """
    from loratool import families
    from loratool.ops.convert import FAMILY_TARGETS, text_encoder_modules

    seen: list[tuple[int, set[str], str]] = []  # (input index, the families its names fit, their dialect)
    for i, a in enumerate(adapters):
        te = text_encoder_modules(a)
        names = [n for n in [*a.modules, *a.lycoris] if n not in te]
        det = families.detect(names, a.metadata)
        if not names or det.matched != det.total:
            continue
        fams = {det.family} if det.family else set(det.tied)
        dialect = det.dialect or next(d for f, d, n in det.candidates if n == det.matched)
        met = set(names)  # its family modules (text-encoder modules aside)
        for j, b_fams, b_dialect in seen:
            b = adapters[j]
            common = fams & b_fams
            paired = groups is not None and any(
                {i, j} <= {k for k, _ in items} and any(k == i and m.name in met for k, m in items)
                for items in groups.values())
            if common and dialect != b_dialect and not paired:
                target = b_dialect if b_dialect in FAMILY_TARGETS else "diffusers"
                stem = a.path.name.removesuffix(".safetensors") if a.path else "converted"
                out = f"{stem}_{target}" + ("" if target == "peft" else ".safetensors")
                family = "" if det.confident else f" --family {'|'.join(sorted(common))}"
                raise IncompatibleError(
                    f"{b.path} and {a.path} are both {' / '.join(sorted(common))} adapters, one in {b_dialect} "
                    f"names and one in {dialect} names: combined as they are, no module would meet its counterpart",
                    hint=f"put them in one naming first: loratool convert {a.path} --to {target}{family} -o {out}, "
                         f"then combine {b.path} with {out}")
        seen.append((i, fams, dialect))


def _example(a: Adapter) -> str:
    return next(iter(a.modules), "(no modules)")


def _describe(m: LoraModule) -> str:
    extra = ", fan_in_fan_out" if m.fan_in_fan_out else ""
    return f"{m.kind} {m.base_shape}{extra}"


def _check_same_layer(name: str, items: list[tuple[int, LoraModule]], adapters: list[Adapter]) -> None:
    i0, m0 = items[0]
    for i, m in items[1:]:
        same = (m.kind == m0.kind and m.fan_in_fan_out == m0.fan_in_fan_out and m.out_features == m0.out_features
                and m.in_features == m0.in_features and m.kernel == m0.kernel)
        if not same:
            raise IncompatibleError(
                f"module '{name}': {adapters[i0].path} has {_describe(m0)} but {adapters[i].path} has {_describe(m)}",
                hint="the adapters were trained on different base models, or the names collide",
            )


def _common(values: list[str | None]) -> tuple[str | None, list[str]]:
    present = list(dict.fromkeys(v for v in values if v))
    return (present[0] if present else None), present


# ---------------------------------------------------------------------------------------------
# per-module maths


def _factor_layout(delta: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """A dense ΔW in the base weight's layout (maths.delta.delta) -> the (out, in·k) layout of up @ down."""
    if m.kind == "embedding" or m.fan_in_fan_out:
        return delta.T
    return delta.reshape(m.out_features, -1)


def combine_module(
    items: list[tuple[LoraModule, float]],
    method: str,
    *,
    rank: int | None,
    density: float | None,
    majority_sign: str,
    generator: torch.Generator | None,
    device: str,
    dtype: str,
    alpha_source: str,
) -> tuple[LoraModule, int, float | None, float | None]:
    """One output module from (module, weight) pairs that adapt the same layer.

    Returns:
        (module, rank, kept energy, relative error to the exact weighted sum).
    """
    import torch

    from loratool.maths.combine import merge_dense, weighted_concat
    from loratool.maths.compare import product_fro_norm
    from loratool.maths.delta import delta, factors
    from loratool.maths.guards import F32_MAX, require_finite
    from loratool.maths.svd import fro_retained, lowrank_svd, truncate_dense

    m0 = items[0][0]
    loaded = [(*factors(m, device=device), w * m.scale) for m, w in items]  # up (out, r), down (r, in·k), c_i
    for (m, w), (u_i, d_i, c_i) in zip(items, loaded):
        require_finite(m.name, m.down.file, up=u_i, down=d_i)
        if not math.isfinite(c_i) or abs(c_i) > F32_MAX:
            raise IncompatibleError(f"{m.down.file}: module '{m.name}': weight {w:g} × scale {m.scale:g} = "
                                    f"{c_i:g} is beyond float32", hint="use smaller --weights")
    cat_up, cat_down = weighted_concat(loaded)  # exact: Σ c_i·up_i@down_i
    k_target = rank if rank is not None else max(m.rank for m, _ in items)
    kept: float | None = 1.0
    if method == "cat":
        up, down = cat_up, cat_down
    elif method == "svd":
        u, s, vh = lowrank_svd(cat_up, cat_down)  # float64, (out, R), (R,), (R, in·k)
        k = max(1, min(k_target, s.shape[0]))
        root = s[:k].sqrt()
        up, down = u[:, :k] * root, root[:, None] * vh[:k]
        kept = fro_retained(s.cpu().tolist(), k)
    elif method in DENSE:
        assert density is not None
        deltas = [delta(m, device=device) for m, _ in items]  # base layout, as peft's get_delta_weight
        merged = merge_dense(deltas, [w for _, w in items], method, density=density,
                             majority_sign=majority_sign, generator=generator)  # type: ignore[arg-type]
        del deltas
        up, down, s = truncate_dense(_factor_layout(merged, m0), k_target)
        kept = fro_retained(s.cpu().tolist(), up.shape[1])
    else:  # linear: peft's factor averaging, sign on down as peft puts it on lora_A
        ranks = {m.rank for m, _ in items}
        if len(ranks) > 1:
            raise IncompatibleError(
                f"module '{m0.name}': --method linear needs one rank, got {sorted(ranks)}",
                hint="use --method cat (exact) or --method svd --rank K (exact sum, truncated)",
            )
        up = sum((math.sqrt(abs(c)) * u for u, _, c in loaded), torch.zeros_like(loaded[0][0]))
        down = sum(((1.0 if c >= 0 else -1.0) * math.sqrt(abs(c)) * d for _, d, c in loaded),
                   torch.zeros_like(loaded[0][1]))
        kept = None
    k = up.shape[1]
    out_dtype = getattr(torch, dtype)
    new_up = up.to(out_dtype).reshape(m0.out_features, k, *m0.up.shape[2:]).cpu().contiguous()
    new_down = down.to(out_dtype).reshape(k, *m0.down.shape[1:]).cpu().contiguous()
    # the error of what is stored, against the exact sum, in low-rank form: [up', -up_cat] @ [down'; down_cat]
    exact = product_fro_norm(cat_up, cat_down)
    stored_up = new_up.reshape(m0.out_features, k).to(device)
    stored_down = new_down.reshape(k, -1).to(device)
    diff = product_fro_norm(torch.cat([stored_up.double(), -cat_up.double()], dim=1),
                            torch.cat([stored_down.double(), cat_down.double()], dim=0))
    rel_error = diff / exact if exact > 0 else (0.0 if diff == 0 else None)
    bias = _bias(items, out_dtype)
    module = LoraModule(
        name=m0.name, down=TensorRef.from_tensor(new_down), up=TensorRef.from_tensor(new_up), alpha=float(k),
        alpha_source=alpha_source,  # type: ignore[arg-type]
        rslora=False, bias=bias, kind=m0.kind, fan_in_fan_out=m0.fan_in_fan_out, expert=m0.expert,
    )
    return module, k, kept, rel_error


def _bias(items: list[tuple[LoraModule, float]], out_dtype: torch.dtype) -> TensorRef | None:
    """lora_bias deltas are scaled like the matrix (peft adds scale·bias): Σ w_i·s_i·bias_i, exact."""
    import torch

    terms = [(m, w) for m, w in items if m.bias is not None]
    if not terms:
        return None
    total = sum((m.bias.load().to(torch.float64) * (w * m.bias_scale) for m, w in terms if m.bias is not None),
                torch.zeros(terms[0][0].out_features, dtype=torch.float64))
    return TensorRef.from_tensor(total.to(out_dtype).contiguous())


# ---------------------------------------------------------------------------------------------
# the operation


def combine(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: list[float],
    method: str,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int | None = None,
    fmt: str | None = None,
    dtype: str = "keep",
    device: str = "cpu",
    force: bool = False,
    allow_pickle: bool = False,
    module_weights: str | None = None,
    blocks: str | None = None,
    allow_different_bases: bool = False,
    progress: Progress | None = None,
    allow_variant: bool = False,
) -> CombineReport:
    """Combine adapters into one with weights and write it (see the module docstring for methods).

    Args:
        paths: the adapters (any readable format), one weight each.
        weights: w_i, negative allowed (a difference of adapters).
        method: cat | svd | ties | dare_linear | dare_ties | magnitude_prune | linear.
        rank: svd and dense methods: the output rank (default, per module: the largest input rank).
        density: ties / dare_* / magnitude_prune: the share of each delta's entries kept.
        majority_sign: ties / dare_ties sign election: total (sum of values) or frequency (count).
        seed: dare_*: seeds the torch.Generator that draws the masks (default: drawn and reported).
        fmt: output format (default: the first input's, PEFT if that one is not writable).
        dtype: keep (the inputs' common dtype per module, float32 when they differ) | fp32 | fp16 | bf16.
        device: where the maths runs (masks are always drawn on the CPU).
        module_weights, blocks: per-module multipliers of every input's weight ('REGEX=W,...',
            'PRESET:W1,...'; formats/blocks.py), on the output module names; weight 0 leaves a
            module out of the result.
        allow_different_bases: combine inputs whose recorded base models differ (a warning instead
            of the refusal: one model saved under two names).

    Returns:
        CombineReport with per-module input ranks, output rank, kept energy and error.

    Raises:
        IncompatibleError: bad options; DoRA, modules_to_save or non-LoRA inputs; layers that do not
            match; unequal ranks for linear. FormatError, OutputExistsError.
    """
    import torch

    from loratool.device import resolve_device
    from loratool.formats import check_writable, get_format, read, source_label, writable_formats, write
    from loratool.hub import resolve_path

    check_options(len(paths), weights, method, rank, density, majority_sign, seed)
    if fmt is not None:
        get_format(fmt, writing=True)
    local = [resolve_path(p) for p in paths]
    device = resolve_device(device)
    adapters = [read(p, allow_pickle=allow_pickle) for p in local]
    from loratool.variants import guard

    variant_warnings = [w for a in adapters for w in guard(a, "combine", allow_variant)]  # PiSSA, aLoRA, ...
    for a in adapters:
        _refuse_unsupported(a)
    _refuse_two_models(adapters, allow_different_bases)
    try:
        groups, warnings = match_modules(adapters)
    except IncompatibleError:
        _refuse_two_dialects(adapters, None)  # the error that says how to fix it, where it applies
        raise
    _refuse_two_dialects(adapters, groups)
    warnings = variant_warnings + warnings
    if not groups:
        raise IncompatibleError("the inputs hold no LoRA modules")
    scaled: dict[str, float] = {}
    if module_weights is not None or blocks is not None:
        from loratool.formats.blocks import module_weights as resolve

        mw = resolve(list(groups), module_weights, blocks)
        warnings += mw.warnings(blocks.partition(":")[0] if blocks else None)
        groups = {n: items for n, items in groups.items() if mw.weights[n] != 0.0}  # weight 0: left out
        scaled = mw.weights
        if not groups:
            raise IncompatibleError("every module has weight 0: nothing is left to combine")
    asked = fmt  # write() tells --format peft (a folder) from the default PEFT (-o NAME.safetensors: one file)
    fmt = fmt or (adapters[0].source_format if adapters[0].source_format in writable_formats() else "peft")
    for a in adapters:  # the result holds what its inputs hold (bias deltas, kinds): refuse before the maths
        check_writable(a, fmt)
    _check_names(groups, adapters, fmt)

    if method in RANDOM and seed is None:
        seed = secrets.randbits(32)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    report = CombineReport(
        Path(out), fmt, method, list(weights), rank, density,
        majority_sign if method in SIGNED else None, seed,
        inputs=[{"path": str(p), "format": a.source_format, "num_modules": len(a.modules)}
                for p, a in zip(local, adapters)],
        warnings=warnings,
    )
    base_model, bases = _common([a.base_model for a in adapters])
    if len(bases) > 1:
        report.warnings.append(f"the inputs name different base models: {', '.join(bases)}")
    if len(adapters) > 1 and any(a.rslora for a in adapters) and not all(a.rslora for a in adapters):
        report.warnings.append("inputs mix rsLoRA and plain scaling; each input's own scale is folded in exactly")

    from loratool.maths.guards import single_threaded

    new_modules: dict[str, LoraModule] = {}
    alpha_source = "config" if fmt == "peft" else "tensor"
    with single_threaded(method not in DENSE and str(device) == "cpu"):
        for n, (name, items) in enumerate(groups.items()):
            present = {i: m for i, m in items}
            stored = {m.dtype for _, m in items}
            out_dtype = target_dtype(dtype, stored.pop() if len(stored) == 1 else "float32")
            module, k, kept, err = combine_module(
                [(m, weights[i] * scaled.get(name, 1.0)) for i, m in items], method, rank=rank, density=density,
                majority_sign=majority_sign, generator=generator, device=device, dtype=out_dtype,
                alpha_source=alpha_source,
            )
            new_modules[name] = module
            report.modules.append(ModuleCombine(
                name, [present[i].rank if i in present else None for i in range(len(adapters))], k, kept, err))
            if progress:
                progress(n + 1, len(groups))
    if method == "linear" and (worst := report.max_rel_error):
        report.warnings.append(f"linear averages factors, which is not the weighted sum of deltas "
                               f"(largest relative error {worst:.3g}); --method cat or svd is exact")
    first_peft = next((a for a in adapters if a.source_format == "peft"), None)
    config = {"task_type": first_peft.config.get("task_type")} if first_peft is not None else {}
    result = Adapter(modules=new_modules, source_format=fmt, config=config, base_model=base_model,
                     files=[f for a in adapters for f in a.files])
    report.params = result.lora_params
    params = {"method": method, "weights": list(weights), "rank": rank, "density": density,
              "majority_sign": report.majority_sign, "seed": seed, "dtype": dtype,
              "inputs": [source_label(p) for p in local]}
    params.update({k: v for k, v in (("module_weights", module_weights), ("blocks", blocks)) if v is not None})
    written = write(result, out, fmt=None if asked is None and fmt == "peft" else fmt, force=force, op="combine",
                    params=params, sources=result.files)
    report.size = output_size(written)
    return report


def _check_names(groups: dict[str, list[tuple[int, LoraModule]]], adapters: list[Adapter], fmt: str) -> None:
    from loratool.formats import get_format

    if get_format(fmt).naming != "stem" and len({_family(a) for a in adapters}) > 1:
        # a kohya name that matched no dotted module has no module path to write under PEFT's prefix
        bad = next((n for n, items in groups.items() if all(_family(adapters[i]) == "stem" for i, _ in items)),
                   None)
        if bad is not None:
            raise IncompatibleError(
                f"module '{bad}' comes only from kohya input(s) and matches no module of the other inputs, "
                f"so it has no module path to write in {fmt} format",
                hint="write kohya instead (--format kohya)",
            )
