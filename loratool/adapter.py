"""The canonical in-memory model of a LoRA adapter (DESIGN.md section 2).

Format-neutral: names of on-disk keys (lora_A, lora_down, ...) never appear here. Tensors are
lazy TensorRefs, so building an Adapter from a file reads only its header (and kohya's 0-d alphas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from loratool.io.tensors import TensorRef

Kind = Literal["linear", "conv", "embedding"]
AlphaSource = Literal["tensor", "config", "pattern", "metadata", "implied"]
DoraAxis = Literal["out", "in"]
# LyCORIS module algorithms whose ΔW loratool computes exactly (maths.lycoris.lyco_delta)
LycoAlgo = Literal["loha", "lokr", "tucker", "full", "norm", "bias"]


@dataclass(frozen=True)
class Expert:
    """Where a module sits in an expert-indexed (fused 3-D) parameter: docs/moe.md.

    One expert of a parameter such as `model.layers.0.mlp.experts.gate_up_proj` (shape
    (count, out, in), or (count, in, out) where the model stores experts transposed, as gpt-oss does)
    is one ordinary LoraModule: its own down (r, in), up (out, r) and scale, ΔW_e = s · up @ down as
    a map from in to out. The module is named `expert_name(param, index)`.

    Attributes:
        param: the fused parameter's path in the base model (no `.weight`).
        index: this expert's index along the parameter's first axis.
        count: how many experts the parameter holds.
    """

    param: str
    index: int
    count: int


def expert_name(param: str, index: int) -> str:
    """The canonical module name of one expert of a fused parameter: `...experts.gate_up_proj[3]`."""
    return f"{param}[{index}]"


@dataclass
class LoraModule:
    """One adapted layer: ΔW = scale · up @ down (reshaped per kind).

    Attributes:
        name: module path in the base model without `.weight` (kohya: the stored underscore name).
        down: A, (r, in) or conv (r, in, kh, kw); embedding: (r, num_embeddings).
        up: B, (out, r) or conv (out, r, 1, 1); embedding: (embedding_dim, r).
        alpha: the stored or implied alpha.
        alpha_source: where alpha came from; wrong alpha is the most common user complaint.
        rslora: scale is alpha / sqrt(r) instead of alpha / r.
        magnitude: DoRA magnitude, or None: one value per output row (PEFT, LyCORIS wd_on_out=True), or
            with dora_axis "in" one per input column (OneTrainer, LyCORIS wd_on_out=False).
        dora_axis: the axis the DoRA weight norm runs over: "out" (per output row) or "in".
        bias: a bias delta added to the base bias, or None: PEFT's lora_B.bias (scaled like the
            weight delta) or, with bias_scaled False, a ComfyUI/LyCORIS `.diff_b` (added as it is).
        kind: linear, conv or embedding.
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2 Conv1D; an expert of a
            transposed fused parameter, once matched to its base).
        expert: for one expert of a fused 3-D parameter (PEFT target_parameters), where it sits;
            None for every other module (per-expert modules such as `experts.3.w1` are ordinary).
    """

    name: str
    down: TensorRef
    up: TensorRef
    alpha: float
    alpha_source: AlphaSource = "implied"
    rslora: bool = False
    magnitude: TensorRef | None = None
    bias: TensorRef | None = None
    kind: Kind = "linear"
    fan_in_fan_out: bool = False
    bias_scaled: bool = True
    dora_axis: DoraAxis = "out"
    expert: Expert | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def bias_scale(self) -> float:
        """The factor the stored bias delta is applied with: scale (lora_B.bias) or 1 (.diff_b)."""
        return self.scale if self.bias_scaled else 1.0

    @property
    def scale(self) -> float:
        return scale_for(self.alpha, self.rank, self.rslora)

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_features(self) -> int:
        """Input width (embedding: vocabulary size); conv: input channels."""
        return self.down.shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.down.shape[2:])

    @property
    def dtype(self) -> str:
        return self.up.dtype

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module adapts (as stored in the checkpoint)."""
        if self.kind == "embedding":
            return (self.in_features, self.out_features)
        if self.kind == "conv":
            return (self.out_features, self.in_features, *self.kernel)
        if self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def params(self) -> int:
        return self.down.numel + self.up.numel

    @property
    def short_name(self) -> str:
        """The last component of the module name (q_proj, to_k, ...; an expert's parameter, gate_up_proj),
        for summaries."""
        return short_name(self.expert.param if self.expert is not None else self.name)

    def with_(self, **changes: Any) -> LoraModule:
        return replace(self, **changes)


@dataclass
class LycoModule:
    """A LyCORIS module that is not a plain LoRA: its ΔW is computed exactly from its own tensors.

    Roles in `tensors` per algo (shapes as LyCORIS stores them; k = kernel dims, flattened when 2-D):
        loha: w1a (out, r), w1b (r, in·k), w2a (out, r), w2b (r, in·k); Tucker (conv): t1, t2
            (r, r, *k), w1a/w2a (r, out), w1b/w2b (r, in).  ΔW = s·(w1a@w1b) ⊙ (w2a@w2b).
        lokr: w1 (a, c) or w1a (a, r) + w1b (r, c); w2 (b, d[, *k]) or w2a (b, r) + w2b (r, d·k), or
            Tucker t2 (r, r, *k) with w2a (r, b), w2b (r, d).  ΔW = s·kron(W1, W2), out = a·b, in = c·d.
        tucker: down (r, in, 1, ..), mid (r, r, *k), up (out, r, 1, ..) (LoCon with CP/Tucker).
        full: diff (the whole ΔW, any shape).   norm: w_norm (dim,).   bias: no weight delta.

    Attributes:
        alpha: the stored alpha (None: implied); scale = alpha / rank for loha, lokr (1 when
            neither LoKr factor is decomposed), tucker; full/norm/bias deltas are unscaled.
        bias: an unscaled bias delta (`.diff_b`, `.b_norm`), or None.
        keys: the file's keys of this module, for messages.
        magnitude: the DoRA magnitude (`.dora_scale`, LyCORIS weight_decompose) of a loha, lokr,
            tucker or full module, or None: W' = m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps) with the norm per
            output row (dora_axis "out", LyCORIS wd_on_out=True) or per input column ("in").
        dora_axis: the axis of the magnitude ("out" or "in").
        parameter: a full diff of the parameter `name` itself (lightx2v's Wan `.diff_m`: the diff of
            `blocks.N.modulation`), not of `name.weight`; kept through renames for the writers.
    """

    name: str
    algo: LycoAlgo
    tensors: dict[str, TensorRef]
    alpha: float | None = None
    alpha_source: AlphaSource = "implied"
    bias: TensorRef | None = None
    keys: tuple[str, ...] = ()
    magnitude: TensorRef | None = None
    dora_axis: DoraAxis = "out"
    parameter: bool = False

    @property
    def rank(self) -> int:
        """The rank alpha divides by (0 for unscaled kinds)."""
        t = self.tensors
        if self.algo == "loha":
            return t["w1b"].shape[0]
        if self.algo == "lokr":
            low = t["w2b"] if "w2b" in t else t.get("w1b")  # ComfyUI's reading: w2b's rank wins
            return low.shape[0] if low is not None else 0
        if self.algo == "tucker":
            return t["down"].shape[0]
        return 0

    @property
    def scale(self) -> float:
        if self.algo in ("full", "norm", "bias"):
            return 1.0
        r = self.rank
        if r == 0 or self.alpha is None:  # LoKr with both factors full: LyCORIS uses scale 1
            return 1.0
        return self.alpha / r

    @property
    def bias_scale(self) -> float:
        return 1.0

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape ΔW is computed in: the base layout, or (out, in·k) when the file flattens a conv."""
        t = self.tensors
        if self.algo == "loha":
            if "t1" in t:
                return (t["w1a"].shape[1], t["w1b"].shape[1], *t["t1"].shape[2:])
            return (t["w1a"].shape[0], t["w1b"].shape[1])
        if self.algo == "lokr":
            w1 = (t["w1"].shape if "w1" in t else (t["w1a"].shape[0], t["w1b"].shape[1]))
            if "w2" in t:
                w2 = t["w2"].shape
            elif "t2" in t:
                w2 = (t["w2a"].shape[1], t["w2b"].shape[1], *t["t2"].shape[2:])
            else:
                w2 = (t["w2a"].shape[0], t["w2b"].shape[1])
            return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        if self.algo == "tucker":
            return (t["up"].shape[0], t["down"].shape[1], *t["mid"].shape[2:])
        if self.algo == "full":
            return tuple(t["diff"].shape)
        if self.algo == "norm":
            return tuple(t["w_norm"].shape)
        return ()

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether ΔW fits a base weight of `shape` (a flattened conv delta fits its conv weight)."""
        want = self.delta_shape
        shape = tuple(shape)
        if shape == want:
            return True
        if len(want) == 2 and len(shape) > 2:
            return shape[0] == want[0] and math.prod(shape[1:]) == want[1]
        squeeze = tuple(d for i, d in enumerate(shape) if i < 2 or d != 1)
        return squeeze == tuple(d for i, d in enumerate(want) if i < 2 or d != 1)

    @property
    def out_features(self) -> int:
        shape = self.delta_shape or (self.bias.shape if self.bias is not None else (0,))
        return shape[0]

    @property
    def in_features(self) -> int:
        shape = self.delta_shape
        return shape[1] if len(shape) > 1 else 0

    @property
    def kind(self) -> str:
        shape = self.delta_shape
        return "conv" if len(shape) > 2 else ("linear" if len(shape) == 2 else "vector")

    @property
    def dtype(self) -> str:
        ref = next(iter(self.tensors.values()), self.bias)
        return ref.dtype if ref is not None else "float32"

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values()) + (self.bias.numel if self.bias is not None else 0)

    @property
    def short_name(self) -> str:
        return short_name(self.name)

    def refs(self) -> list[tuple[str, TensorRef]]:
        """Every tensor of the module with its role (bias and DoRA magnitude included)."""
        out = list(self.tensors.items())
        if self.bias is not None:
            out.append(("bias", self.bias))
        if self.magnitude is not None:
            out.append(("dora_scale", self.magnitude))
        return out


def scale_for(alpha: float, rank: int, rslora: bool) -> float:
    if rank == 0:
        return 0.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


_KOHYA_SHORT_HINTS = (
    "to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2",
    "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "img_attn_qkv", "img_attn_proj",
    "txt_attn_qkv", "txt_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2",
    "linear1", "linear2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)


def short_name(name: str) -> str:
    """The layer's own name: `q_proj`; `to_out.0` and `ff.net.2` keep their index."""
    if "." in name:
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    # kohya names lost their dots: match known layer names, else the last two (three) parts
    for hint in sorted(_KOHYA_SHORT_HINTS, key=len, reverse=True):
        if name.endswith("_" + hint):
            return hint
    parts = name.split("_")
    keep = 3 if parts[-1].isdigit() else 2
    return "_".join(parts[-keep:]) if len(parts) >= keep else name


@dataclass
class Adapter:
    """An adapter: ordered modules plus the full tensors and configuration that travel with them.

    Attributes:
        modules: LoraModules by name, in file order.
        extras: full tensors (PEFT modules_to_save, e.g. `classifier.weight`) by base key.
        config: the format's own configuration (PEFT adapter_config.json), kept for round trips.
        metadata: the safetensors `__metadata__`.
        source_format: "peft", "kohya" or "diffusers".
        base_model: the base model's name when recorded, else None.
        lycoris: LyCORIS modules (LoHa, LoKr, LoCon Tucker, full and norm diffs, bias-only diffs) by name.
        unsupported: keys of tensors loratool does not interpret (OFT, IA3, ...), never touched.
        path: where it was read from.
        files: the files it was read from (for provenance hashes).
        source_modules: the module names the source file held.
        key_prefix: for PEFT-style keys read from one file without a config beside it (diffusers
            `save_lora_adapter`, ComfyUI `diffusion_model.` files): the prefix its keys carried before
            the module name ('' or 'base_model.model.'), so a write keeps that single-file dialect.
            None for a PEFT directory and for the kohya / diffusers dialects (always one file).
        family: the model family the format itself implies (an XLabs file is FLUX.1), else None
            (families.detect guesses from the names).
        reshapes: module name -> the shape its base weight takes before the delta is added, zero-padded
            (a BFL FLUX.1 Depth / Canny control LoRA widens `img_in` from 64 to 128 input channels;
            ComfyUI's `.reshape_weight`).
    """

    modules: dict[str, LoraModule]
    source_format: str
    extras: dict[str, TensorRef] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    unsupported: list[str] = field(default_factory=list)
    path: Path | None = None
    files: list[Path] = field(default_factory=list)
    source_modules: tuple[str, ...] = ()  # module names as read (PEFT writer: is target_modules still exact?)
    lycoris: dict[str, LycoModule] = field(default_factory=dict)
    key_prefix: str | None = None
    family: str | None = None
    reshapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self.modules.values()]

    @property
    def lora_params(self) -> int:
        return sum(m.params for m in self.modules.values())

    @property
    def dora(self) -> bool:
        """Any DoRA magnitude, on a LoRA module or a LyCORIS one."""
        return (any(m.magnitude is not None for m in self.modules.values())
                or any(m.magnitude is not None for m in self.lycoris.values()))

    @property
    def rslora(self) -> bool:
        return any(m.rslora for m in self.modules.values())

    @property
    def fan_in_fan_out(self) -> bool:
        return any(m.fan_in_fan_out for m in self.modules.values())

    def with_modules(self, modules: dict[str, LoraModule], **changes: Any) -> Adapter:
        """A new Adapter with the given modules (and other fields changed); self is untouched."""
        return replace(self, modules=modules, **changes)


def compatible(module: LoraModule | LycoModule, shape: tuple[int, ...]) -> bool:
    """Whether the module's delta fits a base weight of `shape` (1x1 conv == linear), and its DoRA
    magnitude the weight's rows or columns (a LyCORIS conv stored flattened shows its input channels
    only through a per-column magnitude)."""
    if isinstance(module, LycoModule):
        if module.algo == "bias":
            return True
        if module.magnitude is not None and (len(shape) < 2 or module.magnitude.numel != shape[
                0 if module.dora_axis == "out" else 1]):
            return False
        return module.fits(tuple(shape))
    want = module.base_shape
    if tuple(shape) == want:
        return True
    squeeze = tuple(d for i, d in enumerate(shape) if i < 2 or d != 1)
    want_sq = tuple(d for i, d in enumerate(want) if i < 2 or d != 1)
    return squeeze == want_sq
