"""LyCORIS module tensors in kohya-style files (and ComfyUI's dotted names): LoHa, LoKr, LoCon with
Tucker, full and norm diffs, bias diffs.

Keys are `<name>.<role>` with the module name in any dialect (`lora_unet_..._to_q`,
`diffusion_model.blocks.0.self_attn.q`); roles as LyCORIS (KohakuBlueleaf/LyCORIS lycoris/modules)
writes them:

    LoHa   .hada_w1_a .hada_w1_b .hada_w2_a .hada_w2_b [.hada_t1 .hada_t2] .alpha
    LoKr   .lokr_w1 | .lokr_w1_a .lokr_w1_b ; .lokr_w2 | .lokr_w2_a .lokr_w2_b [.lokr_t2] ; .alpha
    LoCon  .lora_down.weight .lora_mid.weight .lora_up.weight .alpha   (Tucker / CP conv)
    full   .diff [.diff_b]          norm   .w_norm [.b_norm]           bias only   .diff_b
    Wan    <block>.diff_m   (lightx2v: the full diff of the block's `modulation` parameter)

`.diff_b` beside a plain `.lora_down/.lora_up` pair is that LoRA's unscaled bias delta (ComfyUI's
reading); the kohya reader keeps it on the LoraModule. `.dora_scale` beside a LoHa, LoKr, Tucker
LoCon or full module is its DoRA magnitude (LyCORIS weight_decompose; OneTrainer's LoKr), one value
per output row, `(out, 1, ...)` (wd_on_out=True, the default of recent LyCORIS versions), or per
input column, `(1, in, ...)` (wd_on_out=False, the default of earlier ones): the shape decides.
Beside a norm diff or a bias diff alone it means nothing known: those keys stay "unsupported" and
operations refuse them.
"""

from __future__ import annotations

from pathlib import Path

from loratool.adapter import DoraAxis, LycoAlgo, LycoModule
from loratool.formats._common import Findings, alpha_missing, magnitude_axis
from loratool.io.tensors import TensorRef

# suffix -> (algo it belongs to, role); None algo: shared by several algos
_ROLES: tuple[tuple[str, LycoAlgo | None, str], ...] = (
    (".hada_w1_a", "loha", "w1a"), (".hada_w1_b", "loha", "w1b"), (".hada_w2_a", "loha", "w2a"),
    (".hada_w2_b", "loha", "w2b"), (".hada_t1", "loha", "t1"), (".hada_t2", "loha", "t2"),
    (".lokr_w1_a", "lokr", "w1a"), (".lokr_w1_b", "lokr", "w1b"), (".lokr_w2_a", "lokr", "w2a"),
    (".lokr_w2_b", "lokr", "w2b"), (".lokr_w1", "lokr", "w1"), (".lokr_w2", "lokr", "w2"),
    (".lokr_t1", "lokr", "t1"), (".lokr_t2", "lokr", "t2"),
    (".lora_mid.weight", "tucker", "mid"), (".lora_down.weight", None, "down"), (".lora_up.weight", None, "up"),
    (".diff_b", None, "bias"), (".diff", "full", "diff"),
    (".w_norm", "norm", "w_norm"), (".b_norm", "norm", "bias"),
    (".alpha", None, "alpha"), (".dora_scale", None, "dora"),
)


# suffix -> the parameter (not `.weight`) whose whole diff it holds: lightx2v's Wan distill LoRAs store
# `diffusion_model.blocks.N.diff_m`, the diff of `blocks.N.modulation` (a (1, 6, dim) nn.Parameter).
# Read as a full diff of the module `<stem>.modulation`, the name ComfyUI's key map loads `.diff` under.
PARAMETER_DIFFS = {".diff_m": "modulation"}


def split_key(key: str) -> tuple[str, LycoAlgo | None, str] | None:
    """'x.hada_w1_a' -> ('x', 'loha', 'w1a'); 'blocks.0.diff_m' -> ('blocks.0.modulation', 'full', 'diff');
    None for keys that are not LyCORIS/LoRA roles."""
    for suffix, param in PARAMETER_DIFFS.items():
        if key.endswith(suffix):
            return f"{key[: -len(suffix)]}.{param}", "full", "diff"
    for suffix, algo, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], algo, role
    return None


def looks_like(keys: list[str]) -> bool:
    """Any LoHa / LoKr / Tucker / full / norm tensor (a bias diff alone decides nothing)."""
    return any((p := split_key(k)) is not None and p[1] is not None for k in keys)


def partition(keys: list[str]) -> set[str]:
    """The module names whose tensors are LyCORIS (not a plain LoRA pair): a LyCORIS-only role, or
    nothing but a bias diff (and alpha)."""
    roles: dict[str, set[str]] = {}
    lyco: set[str] = set()
    for key in keys:
        parts = split_key(key)
        if parts is not None:
            roles.setdefault(parts[0], set()).add(parts[2])
            if parts[1] is not None:
                lyco.add(parts[0])
    return lyco | {n for n, r in roles.items() if "bias" in r and r <= {"bias", "alpha"}}


def read_modules(
    tensors: dict[str, TensorRef], names: set[str], findings: Findings, where: Path
) -> tuple[dict[str, LycoModule], list[str]]:
    """Build the LycoModules named `names` from a file's tensors.

    Returns the modules and the keys left uninterpreted (a `.dora_scale` beside a norm or bias diff).
    """
    groups: dict[str, dict[str, tuple[str, TensorRef]]] = {}
    algos: dict[str, set[LycoAlgo]] = {}
    for key, ref in tensors.items():
        parts = split_key(key)
        if parts is None or parts[0] not in names:
            continue
        name, key_algo, role = parts
        group = groups.setdefault(name, {})
        if role in group:
            findings.error("duplicate-module", name,
                           f"{where}: module '{name}' has two {role} tensors ('{group[role][0]}' and '{key}')")
            continue
        group[role] = (key, ref)
        if key_algo is not None:
            algos.setdefault(name, set()).add(key_algo)
    modules: dict[str, LycoModule] = {}
    leftover: list[str] = []
    implied: list[str] = []  # modules without an alpha: one warning for all of them
    for name, group in groups.items():
        keys = tuple(k for k, _ in group.values())
        found = algos.get(name, set())
        if "dora" in group and not found & {"loha", "lokr", "tucker", "full"}:
            leftover.extend(keys)  # a magnitude beside a norm / bias diff: no known meaning, refused by name
            continue
        if len(found) > 1:
            findings.error("bad-shape", name, f"{where}: module '{name}' mixes LyCORIS kinds "
                           f"({', '.join(sorted(found))}): keys {', '.join(keys)}")
            continue
        algo: LycoAlgo = next(iter(found)) if found else "bias"
        refs = {role: ref for role, (_, ref) in group.items()}
        alpha_ref = refs.pop("alpha", None)
        bias = refs.pop("bias", None)
        magnitude = refs.pop("dora", None)
        if algo == "tucker" and not {"down", "up"} <= set(refs):
            findings.error("missing-down" if "down" not in refs else "missing-up", name,
                           f"{where}: module '{name}' has a lora_mid tensor without lora_down/lora_up "
                           f"(keys: {', '.join(keys)})")
            continue
        if algo not in ("tucker",) and ({"down", "up"} & set(refs)):
            findings.error("bad-shape", name, f"{where}: module '{name}' mixes lora_down/lora_up with {algo} "
                           f"tensors (keys: {', '.join(keys)})")
            continue
        problem = _shape_problem(algo, refs)
        if problem is None and (empty := [r for r, ref in refs.items() if 0 in ref.shape]):
            problem = f"empty factors: {', '.join(f'{r} is {refs[r].shape}' for r in empty)}"
        if problem is None and bias is not None and len(bias.shape) != 1:
            problem = f"bias diff has shape {bias.shape}, expected one value per output"
        if problem is not None:
            findings.error("bad-shape", name, f"{where}: module '{name}' ({algo}): {problem}")
            continue
        alpha: float | None = None
        if alpha_ref is not None:
            if alpha_ref.numel != 1:
                findings.error("bad-shape", name, f"{where}: '{name}.alpha' has shape {alpha_ref.shape}, "
                               "expected a scalar")
                continue
            alpha = alpha_ref.scalar()
        module = LycoModule(name, algo, refs, alpha, "tensor" if alpha is not None else "implied", bias, keys,
                            parameter=algo == "full" and name.rsplit(".", 1)[-1] in PARAMETER_DIFFS.values())
        if bias is not None and module.delta_shape and module.out_features != bias.shape[0]:
            findings.error("bad-shape", name, f"{where}: module '{name}': bias diff has {bias.shape[0]} values "
                           f"but the weight delta has {module.out_features} outputs")
            continue
        if magnitude is not None:
            axis = _magnitude_axis(magnitude.shape, module.delta_shape)
            if axis is None or not magnitude.dtype.startswith(("float", "bfloat")):
                what = (f"has shape {magnitude.shape} but the weight delta is {module.delta_shape}" if axis is None
                        else f"is {magnitude.dtype}, not floating point")
                findings.error("bad-shape", name, f"{where}: module '{name}' ({algo}): DoRA magnitude (dora_scale) "
                               f"{what}")
                continue
            module.magnitude, module.dora_axis = magnitude, axis
        if alpha is None and (algo in ("loha", "tucker") or (algo == "lokr" and module.rank)):
            implied.append(name)
            module.alpha = float(module.rank)
        modules[name] = module
    alpha_missing(findings, where, implied, ".alpha tensor")
    return modules, leftover


def _magnitude_axis(shape: tuple[int, ...], delta: tuple[int, ...]) -> DoraAxis | None:
    """The axis of a LyCORIS module's `.dora_scale` (formats._common.magnitude_axis), also for a conv
    whose ΔW the file stores flattened to (out, in·kh·kw) (LoHa, LoKr): there a per-column magnitude
    `(1, in, 1, 1)` gives the input channels, which the base weight confirms when merging
    (adapter.compatible)."""
    if len(delta) < 2:
        return None
    axis = magnitude_axis(shape, delta[0], delta[1])
    if axis is None and len(delta) == 2 and len(shape) > 2 and shape[0] == 1 and shape[1] > 0 \
            and delta[1] % shape[1] == 0 and all(d == 1 for d in shape[2:]):
        return "in"
    return axis


def _shape_problem(algo: LycoAlgo, t: dict[str, TensorRef]) -> str | None:
    """Why the tensors cannot form the algo's ΔW, or None."""
    def need(*roles: str) -> str | None:
        missing = [r for r in roles if r not in t]
        return f"missing {', '.join(missing)}" if missing else None

    if algo == "loha":
        if "t1" in t or "t2" in t:
            if (m := need("w1a", "w1b", "w2a", "w2b", "t1", "t2")):
                return m
            t1, t2 = t["t1"].shape, t["t2"].shape
            r = t1[0]
            ok = (len(t1) >= 3 and t1 == t2 and t1[1] == r and t["w1a"].shape[0] == r and t["w1b"].shape[0] == r
                  and t["w2a"].shape == t["w1a"].shape and t["w2b"].shape == t["w1b"].shape
                  and len(t["w1a"].shape) == 2 and len(t["w1b"].shape) == 2)
            return None if ok else (f"Tucker shapes do not chain: t1 {t1}, t2 {t2}, w1_a {t['w1a'].shape}, "
                                    f"w1_b {t['w1b'].shape}, w2_a {t['w2a'].shape}, w2_b {t['w2b'].shape}")
        if (m := need("w1a", "w1b", "w2a", "w2b")):
            return m
        w1a, w1b, w2a, w2b = (t[k].shape for k in ("w1a", "w1b", "w2a", "w2b"))
        if any(len(s) != 2 for s in (w1a, w1b, w2a, w2b)):
            return f"expected 2-D factors, got w1_a {w1a}, w1_b {w1b}, w2_a {w2a}, w2_b {w2b}"
        if w1a[1] != w1b[0] or w2a[1] != w2b[0]:
            return f"rank differs: w1_a {w1a} @ w1_b {w1b}, w2_a {w2a} @ w2_b {w2b}"
        if w1a[0] != w2a[0] or w1b[1] != w2b[1]:
            return f"the two products differ in shape: ({w1a[0]}, {w1b[1]}) vs ({w2a[0]}, {w2b[1]})"
        return None
    if algo == "lokr":
        if "t1" in t:
            return "lokr_t1 (a Tucker core for w1) is not written by LyCORIS and not supported"
        if "w1" in t:
            if len(t["w1"].shape) != 2:
                return f"lokr_w1 must be 2-D, got {t['w1'].shape}"
        else:
            if (m := need("w1a", "w1b")):
                return m + " (or lokr_w1)"
            a, b = t["w1a"].shape, t["w1b"].shape
            if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
                return f"lokr_w1_a {a} @ lokr_w1_b {b} do not chain"
        if "w2" in t:
            if len(t["w2"].shape) < 2:
                return f"lokr_w2 must be at least 2-D, got {t['w2'].shape}"
            return None
        if (m := need("w2a", "w2b")):
            return m + " (or lokr_w2)"
        a, b = t["w2a"].shape, t["w2b"].shape
        if "t2" in t:
            c = t["t2"].shape
            ok = len(a) == 2 and len(b) == 2 and len(c) >= 3 and c[0] == a[0] and c[1] == b[0]
            return None if ok else f"Tucker shapes do not chain: t2 {c}, w2_a {a}, w2_b {b}"
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            return f"lokr_w2_a {a} @ lokr_w2_b {b} do not chain"
        return None
    if algo == "tucker":
        if (m := need("mid")):
            return m
        d, u, mid = t["down"].shape, t["up"].shape, t["mid"].shape
        r = d[0]
        ok = (len(mid) >= 3 and mid[0] == r and mid[1] == r and u[1] == r and all(x == 1 for x in d[2:])
              and all(x == 1 for x in u[2:]))
        return None if ok else f"down {d}, mid {mid} and up {u} do not chain (expected (r, in, 1..), " \
            "(r, r, *k), (out, r, 1..))"
    if algo == "full":
        return None if len(t["diff"].shape) >= 1 else f"diff has shape {t['diff'].shape}"
    if algo == "norm":
        if (m := need("w_norm")):
            return m
        return None if len(t["w_norm"].shape) == 1 else f"w_norm has shape {t['w_norm'].shape}, expected 1-D"
    return None
