"""PEFT target_parameters: read per expert as peft computes it, written back bit for bit (docs/moe.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from moe_models import expert_wrappers, peft_model
from safetensors.torch import load_file

import loratool
from loratool.formats import write
from loratool.io.tensors import TensorRef
from loratool.maths.delta import delta

MODELS = ("qwen3_moe", "gpt_oss", "mixtral")


@pytest.mark.parametrize("name", MODELS)
def test_each_expert_is_peft_s_own_delta(moe_dir: Path, name: str) -> None:
    adapter = loratool.read(moe_dir / name / "lora")
    pm = peft_model(moe_dir / name / "base", moe_dir / name / "lora")
    wrappers = expert_wrappers(pm)
    assert set(wrappers) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    seen = 0
    for param, wrapper in wrappers.items():
        want = wrapper.get_delta_weight("default").float()  # (E, out, in), or (E, in, out) when transposed
        experts = [m for m in adapter.modules.values() if m.expert is not None and m.expert.param == param]
        assert len(experts) == want.shape[0] == 4
        for m in experts:
            assert m.rank == 4 and m.scale == 2.0
            ours = delta(m)  # (out, in)
            ref = want[m.expert.index]
            ref = ref.T if name == "gpt_oss" else ref
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
            seen += 1
    assert seen == 2 * 2 * 4


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_is_bit_exact(moe_dir: Path, name: str, tmp_path: Path) -> None:
    src = moe_dir / name / "lora"
    out = write(loratool.read(src), tmp_path / "out", fmt="peft")
    a, b = load_file(src / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg_a, cfg_b = (json.loads((p / "adapter_config.json").read_text()) for p in (src, out))
    assert sorted(cfg_b["target_parameters"]) == sorted(cfg_a["target_parameters"])
    assert (cfg_b["r"], cfg_b["lora_alpha"]) == (cfg_a["r"], cfg_a["lora_alpha"])


def test_written_adapter_loads_in_peft_with_the_same_logits(moe_dir: Path, tmp_path: Path) -> None:
    name = "qwen3_moe"
    out = write(loratool.read(moe_dir / name / "lora"), tmp_path / "out", fmt="peft")
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        want = peft_model(moe_dir / name / "base", moe_dir / name / "lora")(ids).logits
        got = peft_model(moe_dir / name / "base", out)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unequal_expert_ranks_are_padded_exactly(moe_dir: Path, tmp_path: Path) -> None:
    """Experts of one parameter at different ranks and scales: written with zero padding and the scale
    folded into up, every ΔW_e is kept."""
    adapter = loratool.read(moe_dir / "qwen3_moe" / "lora")
    name = "model.layers.0.mlp.experts.gate_up_proj[2]"
    m = adapter.modules[name]
    short = m.with_(down=TensorRef.from_tensor(m.down.load()[:2].clone()),
                    up=TensorRef.from_tensor(m.up.load()[:, :2].clone()), alpha=5.0)
    changed = adapter.with_modules({**adapter.modules, name: short})
    back = loratool.read(write(changed, tmp_path / "out", fmt="peft"))
    for n, mod in changed.modules.items():
        torch.testing.assert_close(delta(back.modules[n]), delta(mod), rtol=1e-6, atol=1e-6)


def test_stacked_factors_are_read_once_and_let_go() -> None:
    """Each expert's factors are slices of the stacked ones (rows e·r:(e+1)·r of lora_A, columns e::E of
    lora_B), read once for all experts and not kept once every expert has its slice (held, every fused
    factor of an adapter stayed in memory to the end of a merge); a later slice reads it again."""
    import gc
    import weakref

    from loratool.adapter import LoraModule
    from loratool.formats.peft_experts import split_experts

    g = torch.Generator().manual_seed(0)
    experts, r = 4, 2
    a, b = torch.randn(experts * r, 6, generator=g), torch.randn(5, r * experts, generator=g)
    reads: list[weakref.ref[torch.Tensor]] = []

    def reading(t: torch.Tensor) -> TensorRef:
        def load() -> torch.Tensor:
            copy = t.clone()
            reads.append(weakref.ref(copy))
            return copy
        return TensorRef.computed(tuple(t.shape), "float32", load, "stack")

    stacked = LoraModule("p", reading(a), reading(b), alpha=4.0)
    mods = list(split_experts(stacked, "layers.0.experts.gate_up_proj", r).values())
    for e, m in enumerate(mods):
        assert torch.equal(m.down.load(), a[e * r:(e + 1) * r])
        assert torch.equal(m.up.load(), b[:, e::experts])
    gc.collect()
    assert len(reads) == 2 and all(ref() is None for ref in reads)  # read once each, then let go
    assert torch.equal(mods[1].up.load(), b[:, 1::experts]) and len(reads) == 3
