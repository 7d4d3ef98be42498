"""GGUF expert stacks (llama.cpp's `blk.N.ffn_{gate,up,down}_exps`, lora_a (E, r, in), lora_b (E, out, r)):
names against gguf-py's own tables, factors read back with gguf's GGUFReader (not loratool's reader),
exact round trips. Adapters are made by peft itself on tiny transformers MoE models (tests/moe/moe_models.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli

gguf = pytest.importorskip("gguf")

from loratool.formats import read  # noqa: E402
from loratool.formats.gguf import ARCH_OF_HF, from_gguf_layout  # noqa: E402
from loratool.maths.delta import delta  # noqa: E402
from loratool.ops.validate import validate_adapter  # noqa: E402

MODELS = ("qwen3_moe", "gpt_oss", "mixtral")
ARCH = {"qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "mixtral": "llama"}


def _stacks(path: Path) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(alpha, {stack name: (lora_a, lora_b)}) as gguf's own reader returns them (numpy order)."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    out = {}
    for name, a in tensors.items():
        if name.endswith("_exps.weight.lora_a"):
            stem = name.removesuffix(".weight.lora_a")
            out[stem] = (a, tensors[stem + ".weight.lora_b"])
    return alpha, out


def test_expert_names_are_gguf_py_s_own():
    from gguf import MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, get_tensor_name_map

    arch_of = {v: k for k, v in MODEL_ARCH_NAMES.items()}
    for hf in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM", "GptOssForCausalLM",
               "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        arch = arch_of[ARCH_OF_HF[hf]]
        for t, stem in ((MODEL_TENSOR.FFN_GATE_EXP, "ffn_gate_exps"), (MODEL_TENSOR.FFN_UP_EXP, "ffn_up_exps"),
                        (MODEL_TENSOR.FFN_DOWN_EXP, "ffn_down_exps")):
            assert t in MODEL_TENSORS[arch] and TENSOR_NAMES[t].format(bid=3) == f"blk.3.{stem}"
        tmap = get_tensor_name_map(arch, 4)
        parent = "block_sparse_moe.experts" if hf == "MixtralForCausalLM" else "mlp.experts"
        parts = ("w1", "w3", "w2") if hf == "MixtralForCausalLM" else ("gate_proj", "up_proj", "down_proj")
        for part, stem in zip(parts, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
            assert tmap.get_name(f"model.layers.3.{parent}.{part}.weight", try_suffixes=(".weight",)) \
                == f"blk.3.{stem}.weight"


def _to_gguf(moe_dir: Path, name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}.gguf"
    r = run_cli(["convert", moe_dir / name / "lora", "--to", "gguf", "--base", moe_dir / name / "base", "-o", out])
    assert r.code == 0, r.err
    return out


@pytest.mark.parametrize("name", MODELS)
def test_fused_experts_become_llama_cpp_stacks(moe_dir, tmp_path, name):
    """Every expert of peft's fused gate_up_proj / down_proj lands in its stack: gate and up are the row
    halves of gate_up (alternate rows for gpt-oss), llama.cpp's alpha / r restores each expert's scale."""
    src = read(moe_dir / name / "lora")
    out = _to_gguf(moe_dir, name, tmp_path)
    assert validate_adapter(out, for_runtime="llama.cpp").ok  # what llama.cpp loads natively
    alpha, stacks = _stacks(out)
    assert sorted(stacks) == [f"blk.{i}.ffn_{p}_exps" for i in range(2) for p in ("down", "gate", "up")]
    for layer in range(2):
        for e in range(4):
            gate_up = delta(src.modules[f"model.layers.{layer}.mlp.experts.gate_up_proj[{e}]"]).numpy()
            down = delta(src.modules[f"model.layers.{layer}.mlp.experts.down_proj[{e}]"]).numpy()
            gate, up = (gate_up[0::2], gate_up[1::2]) if name == "gpt_oss" else np.split(gate_up, 2)
            for stem, want in (("gate", gate), ("up", up), ("down", down)):
                a, b = stacks[f"blk.{layer}.ffn_{stem}_exps"]
                assert a.shape[0] == b.shape[0] == 4 and a.shape[1] == b.shape[2]
                got = alpha / a.shape[1] * b[e].astype(np.float64) @ a[e].astype(np.float64)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_gguf_back_to_the_per_expert_checkpoint_names(moe_dir, tmp_path, name):
    """Qwen3-MoE and Mixtral checkpoints store one Linear per expert: the stacks come back as those modules,
    their factors the very slices of peft's (bit-exact)."""
    src = read(moe_dir / name / "lora")
    back = tmp_path / "back"
    r = run_cli(["convert", _to_gguf(moe_dir, name, tmp_path), "--to", "peft", "--base", moe_dir / name / "base",
                 "-o", back])
    assert r.code == 0, r.err
    got = read(back)
    parts = ("w1", "w3", "w2") if name == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    parent = "block_sparse_moe.experts" if name == "mixtral" else "mlp.experts"
    for layer in range(2):
        for e in range(4):
            gu = src.modules[f"model.layers.{layer}.mlp.experts.gate_up_proj[{e}]"]
            dn = src.modules[f"model.layers.{layer}.mlp.experts.down_proj[{e}]"]
            half = gu.out_features // 2
            for part, (up, down, m) in zip(parts, ((gu.up.load()[:half], gu.down.load(), gu),
                                                   (gu.up.load()[half:], gu.down.load(), gu),
                                                   (dn.up.load(), dn.down.load(), dn))):
                mod = got.modules[f"model.layers.{layer}.{parent}.{e}.{part}"]
                assert torch.equal(mod.down.load(), down) and torch.equal(mod.up.load(), up)
                assert mod.scale == m.scale


def test_gpt_oss_gguf_back_to_its_fused_parameters_bit_exact(moe_dir, tmp_path):
    """gpt-oss keeps its experts fused on disk: gate and up (alternate rows) are fused back with their
    shared down, giving peft's own factors again, and peft loads the result with the same logits."""
    from moe_models import peft_model

    base, lora = moe_dir / "gpt_oss" / "base", moe_dir / "gpt_oss" / "lora"
    src = read(lora)
    assert from_gguf_layout(read(_to_gguf(moe_dir, "gpt_oss", tmp_path)), base).modules.keys() == src.modules.keys()
    back = tmp_path / "back"
    r = run_cli(["convert", tmp_path / "gpt_oss.gguf", "--to", "peft", "--base", base, "-o", back])
    assert r.code == 0, r.err
    got = read(back)
    experts = {n: m for n, m in src.modules.items() if m.expert is not None}
    assert len(experts) == 16
    for n, m in experts.items():
        b = got.modules[n]
        assert b.expert == m.expert
        assert torch.equal(b.down.load(), m.down.load()) and torch.equal(b.up.load(), m.up.load())
        assert b.scale == m.scale
    tokens = torch.tensor([[3, 17, 42, 5, 8, 1, 60, 9]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(base, back)(tokens).logits, peft_model(base, lora)(tokens).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_gguf_to_gguf_is_bit_exact(moe_dir, tmp_path, name):
    first = _to_gguf(moe_dir, name, tmp_path)
    second = tmp_path / "again.gguf"
    r = run_cli(["convert", first, "--to", "gguf", "-o", second])
    assert r.code == 0, r.err
    a_alpha, a = _stacks(first)
    b_alpha, b = _stacks(second)
    assert a_alpha == b_alpha and sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1])


def test_per_expert_modules_stack_and_a_missing_expert_is_refused(moe_dir, make_adapter, tmp_path):
    base = moe_dir / "qwen3_moe" / "base"
    shapes = {"gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}
    modules = {f"model.layers.{i}.mlp.experts.{e}.{p}": s
               for i in range(2) for e in range(4) for p, s in shapes.items()}
    full = make_adapter(modules=modules, rank=2, alpha=4)
    out = tmp_path / "full.gguf"
    assert run_cli(["convert", full, "--to", "gguf", "--base", base, "-o", out]).code == 0
    alpha, stacks = _stacks(out)
    src = read(full)
    a, b = stacks["blk.1.ffn_up_exps"]
    for e in range(4):
        want = delta(src.modules[f"model.layers.1.mlp.experts.{e}.up_proj"]).numpy()
        np.testing.assert_allclose(alpha / a.shape[1] * b[e] @ a[e], want, rtol=1e-5, atol=1e-6)
    del modules["model.layers.1.mlp.experts.2.up_proj"]
    short = make_adapter(modules=modules, rank=2, alpha=4)
    r = run_cli(["convert", short, "--to", "gguf", "--base", base, "-o", tmp_path / "short.gguf"])
    assert r.code == 2
    assert "'blk.1.ffn_up_exps' has LoRA for experts 0, 1, 3 of 4" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "short.gguf").exists()
