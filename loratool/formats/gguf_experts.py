"""GGUF LoRA on mixture-of-experts tensors: llama.cpp's `blk.N.ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`.

Facts read from llama.cpp as vendored in llama-cpp-python 0.3.36 (and the gguf package, 0.19):

- a MoE base holds each layer's experts stacked, numpy shape (E, out, in): `blk.N.ffn_gate_exps.weight`
  (E, n_ff, n_embd), `ffn_up_exps` alike, `ffn_down_exps` (E, n_embd, n_ff). convert_hf_to_gguf.py stacks
  per-expert Linears (conversion/qwen.py:119-141, llama.py:266-289, deepseek.py:184-206) and splits a fused
  transformers `gate_up_proj` into gate and up: its first and second halves of rows (qwen.py:104-116), or
  alternate rows where the model interleaves them (gpt-oss, gpt_oss.py:115-121);
- a LoRA on such a tensor is stacked the same way (convert_lora_to_gguf.py:234-241, LoraTorchTensor under
  torch.stack): `<name>.weight.lora_a` (E, r, in), `<name>.weight.lora_b` (E, out, r); llama.cpp applies
  it with ggml_mul_mat_id, expert by expert, at scale alpha / r (src/llama-graph.cpp:1574-1591). Its load
  check compares in and out only (src/llama-adapter.cpp:358-370), so a stack must hold every expert.

In loratool each expert is one LoraModule (docs/moe.md) named `blk.N.ffn_gate_exps[e]` with
`Expert("blk.N.ffn_gate_exps", e, E)`: reading slices the stacks, writing stacks them back (bit-exact).
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from loratool.adapter import AlphaSource, Expert, LoraModule, expert_name
from loratool.errors import IncompatibleError
from loratool.formats._common import Findings, RawModule, build_module
from loratool.formats.peft_experts import _Loaded
from loratool.io.tensors import TensorRef

if TYPE_CHECKING:
    import torch

# a fused transformers expert parameter -> the GGUF tensors llama.cpp's converter splits it into (row order)
SPLIT: dict[str, tuple[str, ...]] = {"gate_up_proj": ("gate_proj", "up_proj")}

_PER_EXPERT = re.compile(r"^(?P<parent>.+\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")
_STACK = re.compile(r"^blk\.\d+\.ffn_[a-z_]+_exps$")


def is_stack(name: str) -> bool:
    """A GGUF expert stack's tensor name (`blk.0.ffn_gate_exps`)."""
    return _STACK.match(name) is not None


# ---------------------------------------------------------------------------------------------
# reading


def _expert(stack: _Loaded, e: int) -> torch.Tensor:
    return stack.take(lambda t: t[e].clone())


def split_stack(name: str, rm: RawModule, *, alpha: float, findings: Findings, where: Path,
                alpha_source: AlphaSource = "metadata") -> dict[str, LoraModule]:
    """The experts of one stack (lora_a (E, r, in), lora_b (E, out, r): GGUF's, and mlx-lm's LoRASwitchLinear),
    one module each; alpha 0 means alpha = rank (scale 1)."""
    assert rm.down is not None and rm.up is not None
    a, b = rm.down.shape, rm.up.shape
    if len(a) != 3 or len(b) != 3 or a[0] != b[0] or a[1] != b[2]:
        findings.error("rank-mismatch", name, f"{where}: expert stack '{name}' has lora_a {a} and lora_b {b}; "
                       "expected (E, r, in) and (E, out, r)")
        return {}
    count, rank = a[0], a[1]
    down_stack, up_stack = _Loaded(rm.down, count), _Loaded(rm.up, count)  # read once for its experts' slices
    out: dict[str, LoraModule] = {}
    for e in range(count):
        one = RawModule(
            down=TensorRef.computed((rank, a[2]), rm.down.dtype, partial(_expert, down_stack, e),
                                    f"{rm.down.source} [{e}]"),
            up=TensorRef.computed((b[1], rank), rm.up.dtype, partial(_expert, up_stack, e), f"{rm.up.source} [{e}]"),
            keys=rm.keys)
        label = expert_name(name, e)
        m = build_module(label, one, alpha=alpha or float(rank), alpha_source=alpha_source, rslora=False,
                         fan_in_fan_out=False, findings=findings, where=where)
        if m is not None:
            out[label] = m.with_(expert=Expert(name, e, count))
    return out


# ---------------------------------------------------------------------------------------------
# transformers names -> GGUF stacks


def part_rows(t: TensorRef, part: int, parts: int, interleaved: bool) -> TensorRef:
    """Rows of part `part` of `parts` (a fused gate_up_proj's gate or up): equal consecutive blocks, or every
    parts-th row from `part` where the model interleaves them (gpt-oss)."""
    full = t.load()
    rows = full[part::parts] if interleaved else full.chunk(parts, dim=0)[part]
    return TensorRef.from_tensor(rows.contiguous())


def expert_targets(key: str, m: LoraModule, interleaved: frozenset[str]) -> list[tuple[str, int, LoraModule]] | None:
    """An expert module (transformers naming, prefix already removed as `key`) as the per-expert tensors
    llama.cpp's converter makes: [(stacked transformers name, expert index, module)], or None for a module
    that is not an expert. A fused gate_up_proj expert becomes its gate and up parts (rows of up, the same
    down: exact)."""
    if m.expert is not None:
        param = key[: key.rindex("[")] if key.endswith("]") else key
        head, _, leaf = param.rpartition(".")
        parts = SPLIT.get(leaf)
        if parts is None:
            return [(param, m.expert.index, m)]
        if m.out_features % len(parts):
            raise IncompatibleError(f"'{m.name}': {leaf} has {m.out_features} rows, not {len(parts)} equal parts")
        inter = leaf in interleaved
        return [(f"{head}.{p}", m.expert.index, m.with_(up=part_rows(m.up, i, len(parts), inter)))
                for i, p in enumerate(parts)]
    hit = _PER_EXPERT.match(key)
    if hit is None:
        return None
    return [(f"{hit['parent']}.{hit['proj']}", int(hit["index"]), m)]


def as_stack_member(gguf_name: str, index: int, count: int | None, m: LoraModule) -> LoraModule:
    """Module `m` as expert `index` of the GGUF stack `gguf_name` (`blk.0.ffn_gate_exps`)."""
    if count is None:
        raise IncompatibleError(f"'{m.name}': the base config gives no expert count, needed for '{gguf_name}'",
                                hint="pass --base with a config.json that has num_experts / num_local_experts / "
                                "n_routed_experts, or the GGUF model file")
    if index >= count:
        raise IncompatibleError(f"'{m.name}': expert {index}, but the base has {count} experts")
    return m.with_(name=expert_name(gguf_name, index), expert=Expert(gguf_name, index, count))


# ---------------------------------------------------------------------------------------------
# writing


def stacked_factors(mods: list[LoraModule], alpha: float, where: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts of one stack as llama.cpp's lora_a (E, R, in) and lora_b (E, out, R): R the largest
    rank (others padded with zeros), each expert's scale · R / alpha baked into its lora_b, so llama.cpp's
    alpha / R gives every expert its own delta (exact up to the bake's float32 rounding).

    Raises:
        IncompatibleError: a stack with experts missing (llama.cpp indexes it by expert id).
    """
    import torch

    from loratool.maths.bake import bake_scale, pad_rank

    mods = sorted(mods, key=lambda m: m.expert.index if m.expert else 0)
    first = mods[0].expert
    assert first is not None
    if [m.expert.index for m in mods if m.expert] != list(range(first.count)):
        have = [str(m.expert.index) for m in mods if m.expert]
        raise IncompatibleError(f"{where}: '{first.param}' has LoRA for experts {', '.join(have[:8])}"
                                f"{' ...' if len(have) > 8 else ''} of {first.count}; a GGUF expert stack holds every "
                                "expert (llama.cpp selects by expert id)",
                                hint="merge the adapter into the base instead (loratool merge)")
    rank = max(m.rank for m in mods)
    downs: list[torch.Tensor] = []
    ups: list[torch.Tensor] = []
    for m in mods:
        up, _ = bake_scale(m.up.load(), m.scale * rank / alpha)
        up, down = pad_rank(up, m.down.load(), rank)
        downs.append(down)
        ups.append(up)
    dtype = downs[0].dtype if len({t.dtype for t in downs + ups}) == 1 else torch.float32
    return torch.stack([d.to(dtype) for d in downs]), torch.stack([u.to(dtype) for u in ups])


# ---------------------------------------------------------------------------------------------
# GGUF stacks -> transformers names of a checkpoint


def _fuse(parts: list[LoraModule], interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, scale) of one expert of a fused parameter from its parts (rows in order): the parts'
    down kept when they share it (what a split wrote), else stacked with a block-diagonal up (rank = sum,
    maths.fuse.block_diagonal_fuse); interleaved: the parts' rows alternate (gpt-oss)."""
    import torch

    from loratool.maths.fuse import block_diagonal_fuse

    downs = [p.down.load() for p in parts]
    ups = [p.up.load() for p in parts]
    if len({p.scale for p in parts}) == 1 and all(torch.equal(downs[0], d) for d in downs[1:]):
        up, down, scale = torch.cat(ups, dim=0), downs[0], parts[0].scale
    else:
        up, down, scale = block_diagonal_fuse([(u, d, p.scale) for u, d, p in zip(ups, downs, parts)],
                                              [u.shape[0] for u in ups])
    if interleaved:  # [part 0 rows; part 1 rows] -> row k of part i at k·parts + i
        up = up.reshape(len(parts), -1, up.shape[1]).transpose(0, 1).reshape(-1, up.shape[1])
    return up.contiguous(), down, scale


def to_checkpoint_names(stacks: dict[str, list[LoraModule]], reverse: dict[str, list[str]], keys: set[str],
                        interleaved: frozenset[str], problems: list[str]) -> dict[str, LoraModule]:
    """GGUF expert modules (by stack) named as the checkpoint `keys` stores their experts: one Linear per
    expert (`mlp.experts.3.gate_proj`, Mixtral `block_sparse_moe.experts.3.w1`) or fused 3-D parameters
    (gpt-oss `mlp.experts.gate_up_proj`: gate and up fused back, expert by expert). Returns each GGUF
    module's name -> its module in checkpoint naming (a fused expert under its first part's name only)."""
    out: dict[str, LoraModule] = {}
    fused_parts: dict[tuple[str, int], dict[int, LoraModule]] = {}
    for stack, mods in stacks.items():
        cands = reverse.get(stack, [])
        for m in mods:
            assert m.expert is not None
            e = m.expert.index
            per = [f"{c.rsplit('.', 1)[0]}.{e}.{c.rsplit('.', 1)[1]}" for c in cands if ".experts." in c + "."]
            per = [p for p in per if p + ".weight" in keys]
            if len(per) == 1:
                out[m.name] = m.with_(name=per[0], expert=None)
                continue
            fused: list[tuple[str, str | None, int]] = [(c, None, 0) for c in cands if c in keys]
            for c in cands:  # a part of a fused parameter: gate_proj -> gate_up_proj
                head, _, leaf = c.rpartition(".")
                for joined, names in SPLIT.items():
                    if leaf in names and f"{head}.{joined}" in keys:
                        fused.append((f"{head}.{joined}", joined, names.index(leaf)))
            if len(fused) != 1:
                problems.append(f"{m.name} ({'no' if not fused else len(fused)} match(es))")
                continue
            path, split_of, part = fused[0]
            if split_of is None:
                out[m.name] = m.with_(name=expert_name(path, e), expert=Expert(path, e, m.expert.count))
            else:
                fused_parts.setdefault((path, e), {})[part] = m
    for (path, e), parts in fused_parts.items():
        leaf = path.rsplit(".", 1)[1]
        if len(parts) != len(SPLIT[leaf]):
            problems.append(f"{path} expert {e} (has {len(parts)} of its {len(SPLIT[leaf])} parts)")
            continue
        ordered = [parts[i] for i in range(len(parts))]
        first = ordered[0]
        assert first.expert is not None
        out[first.name] = fused_expert(ordered, Expert(path, e, first.expert.count), leaf in interleaved)
    return out


def fused_expert(parts: list[LoraModule], expert: Expert, interleaved: bool) -> LoraModule:
    """One expert of a fused parameter (`expert`) from its parts in row order (gate, up): the parts' shared
    down kept, same rank and scale, where they share it (what a split wrote: bit-exact), else their downs
    stacked with a block-diagonal up (rank = sum, scales folded into up: exact)."""
    up, down, scale = _fuse(parts, interleaved)
    first = parts[0]
    rank = down.shape[0]
    same = rank == first.rank and scale == first.scale
    return first.with_(name=expert_name(expert.param, expert.index),
                       up=TensorRef.from_tensor(up.to(first.up.load().dtype) if same else up),
                       down=TensorRef.from_tensor(down if same else down.to(up.dtype)),
                       alpha=first.alpha if same else float(rank) * scale, rslora=first.rslora if same else False,
                       expert=expert)
