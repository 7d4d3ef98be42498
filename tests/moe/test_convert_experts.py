"""convert between PEFT's fused experts (`target_parameters`), per-expert Linears (`experts.3.gate_proj`,
Mixtral `experts.3.w1`) and MLX switch layers, by the layout of `--base` (docs/moe.md). Adapters are made by
peft itself on tiny transformers MoE models (tests/moe/moe_models.py); merges and logits are checked against
peft's and transformers' own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from moe_models import peft_model, per_expert_model
from safetensors.torch import load_file, save_file

from loratool.formats import read
from loratool.maths.delta import delta

IDS = (torch.arange(24).reshape(3, 8) * 7) % 64
PARTS = {"qwen3_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
         "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2"))}


def _fused_base(src: Path, out: Path) -> Path:
    """The checkpoint as transformers 5 holds it in memory (experts fused, `mlp.experts.gate_up_proj`
    (E, 2·I, H)), saved with its config: the fused layout some tools write."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors", {"format": "pt"})
    shutil.copy(src / "config.json", out / "config.json")
    return out


def _convert(src: Path, base: Path, out: Path) -> Path:
    r = run_cli(["convert", src, "--to", "peft", "--base", base, "-o", out])
    assert r.code == 0, r.err
    return out


def _merged(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    r = run_cli(["merge", base, adapter, "-o", out])
    assert r.code == 0, r.err
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_fused_experts_become_the_base_s_per_expert_linears_and_back_bit_exact(moe_dir, tmp_path, name):
    """peft's target_parameters adapter against the checkpoint on disk (one Linear per expert): gate and up
    are the row halves of gate_up's B with its A (slices of peft's tensors, bit for bit); against a fused
    base the result goes back to peft's own file, tensor for tensor."""
    base, lora = moe_dir / name / "base", moe_dir / name / "lora"
    src = read(lora)
    per = _convert(lora, base, tmp_path / "per")
    got = read(per)
    keys = {k.removesuffix(".weight") for k in load_file(base / "model.safetensors") if ".experts." in k}
    assert {n for n in got.modules if ".experts." in n} == keys  # 2 layers x 4 experts x 3 Linears
    assert all(m.expert is None for m in got.modules.values())
    config = json.loads((per / "adapter_config.json").read_text())
    assert "target_parameters" not in config and len(config["target_modules"]) == 2 * 4 * 3 + 2
    parent, (gate, up, down) = PARTS[name]
    for layer in range(2):
        for e in range(4):
            gu = src.modules[f"model.layers.{layer}.mlp.experts.gate_up_proj[{e}]"]
            dn = src.modules[f"model.layers.{layer}.mlp.experts.down_proj[{e}]"]
            half = gu.out_features // 2
            for part, (b, a, m) in ((gate, (gu.up.load()[:half], gu.down.load(), gu)),
                                    (up, (gu.up.load()[half:], gu.down.load(), gu)),
                                    (down, (dn.up.load(), dn.down.load(), dn))):
                mod = got.modules[f"model.layers.{layer}.{parent}.{e}.{part}"]
                assert torch.equal(mod.up.load(), b) and torch.equal(mod.down.load(), a)
                assert mod.scale == m.scale
    back = _convert(per, _fused_base(base, tmp_path / "fused"), tmp_path / "back")
    want, have = load_file(lora / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert sorted(want) == sorted(have) and all(torch.equal(want[k], have[k]) for k in want)
    config = json.loads((back / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    assert config["r"] == 4 and config["lora_alpha"] == 8 and not config["rank_pattern"]
    with torch.no_grad():  # peft loads it onto the transformers 5 model as it loads its own file
        torch.testing.assert_close(peft_model(base, back)(IDS).logits, peft_model(base, lora)(IDS).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_per_expert_conversion_merges_and_runs_like_peft_s_adapter(moe_dir, tmp_path, name):
    """The per-expert adapter merged into the per-expert checkpoint equals the original merged into it,
    and the merged model's logits equal peft's base + adapter; peft itself, wrapping the checkpoint's
    per-expert Linears, merges the converted file to the same weights."""
    import transformers

    base, lora = moe_dir / name / "base", moe_dir / name / "lora"
    per = _convert(lora, base, tmp_path / "per")
    ours = _merged(base, per, tmp_path / "ours")
    original = _merged(base, lora, tmp_path / "orig")
    plain = load_file(base / "model.safetensors")
    assert list(ours) == list(original)
    changed = 0
    for k, t in original.items():
        torch.testing.assert_close(ours[k], t, rtol=1e-6, atol=1e-6, msg=k)
        changed += not torch.equal(plain[k], t)
    assert changed == 2 * 4 * 3 + 2
    with torch.no_grad():
        want = peft_model(base, lora)(IDS).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    import peft

    pm = peft.PeftModel.from_pretrained(per_expert_model(base), per)  # q_proj: not in this expert-only model
    for key, m in pm.merge_and_unload().named_modules():
        if isinstance(m, torch.nn.Linear):
            torch.testing.assert_close(m.weight.detach(), ours[key + ".weight"], rtol=1e-6, atol=1e-6, msg=key)


def test_peft_per_expert_adapter_into_a_fused_base(moe_dir, tmp_path):
    """A per-expert adapter made by peft on Mixtral's per-expert Linears (w1 and w3 with their own A): into a
    fused base its gate_up experts take A = [A_w1; A_w3] and a block-diagonal B (rank 2r, exact); peft loads
    the result onto the transformers 5 model with the logits of the per-expert adapter merged."""
    import peft
    import transformers

    base = moe_dir / "mixtral" / "base"
    torch.manual_seed(5)
    pm = peft.get_peft_model(per_expert_model(base), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["w1", "w2", "w3"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "per")
    fused = _fused_base(base, tmp_path / "fused")
    out = _convert(tmp_path / "per", fused, tmp_path / "out")
    src, got = read(tmp_path / "per"), read(out)
    assert sorted(got.modules) == sorted(f"model.layers.{i}.mlp.experts.{p}[{e}]" for i in range(2)
                                         for p in ("gate_up_proj", "down_proj") for e in range(4))
    for layer in range(2):
        for e in range(4):
            gu = got.modules[f"model.layers.{layer}.mlp.experts.gate_up_proj[{e}]"]
            assert gu.rank == 4  # w1's and w3's A differ: stacked
            parts = [delta(src.modules[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{p}"]) for p in ("w1", "w3")]
            torch.testing.assert_close(delta(gu), torch.cat(parts), rtol=1e-6, atol=1e-7)
            dn = got.modules[f"model.layers.{layer}.mlp.experts.down_proj[{e}]"]
            w2 = src.modules[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2"]
            assert dn.rank == 2 and torch.equal(dn.down.load(), w2.down.load())
            assert torch.equal(dn.up.load(), w2.up.load())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and "target_parameters" in config
    _merged(base, tmp_path / "per", tmp_path / "merged")  # the per-expert adapter in the per-expert checkpoint
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(IDS).logits
        torch.testing.assert_close(peft_model(fused, out)(IDS).logits, want, rtol=0, atol=1e-5)
    # and back to per-expert Linears: the same deltas, not the same factors (w1 and w3 now share the stacked
    # A of rank 4, their B blocks padded with zeros), so compared as deltas to 1e-6 relative
    again = read(_convert(out, base, tmp_path / "again"))
    assert sorted(again.modules) == sorted(src.modules)
    for n, m in src.modules.items():
        torch.testing.assert_close(delta(again.modules[n]), delta(m), rtol=1e-6, atol=1e-7, msg=n)


def test_mlx_gpt_oss_switch_experts_back_to_peft_bit_exact(moe_dir, tmp_path):
    """gpt-oss's switch layers (`mlp.experts.gate_proj` / `up_proj`, rows interleaved in the fused
    gate_up_proj): with --base they become peft's target_parameters again, bit for bit; without, refused."""
    base, lora = moe_dir / "gpt_oss" / "base", moe_dir / "gpt_oss" / "lora"
    mlx = tmp_path / "mlx"
    assert run_cli(["convert", lora, "--to", "mlx", "--base", base, "-o", mlx]).code == 0
    r = run_cli(["convert", mlx, "--to", "peft", "-o", tmp_path / "nobase"])
    assert r.code == 2 and "Traceback" not in r.err
    errors = [ln for ln in r.err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "'model.layers.0.mlp.experts.gate_proj[0]'" in errors[0] and "gpt-oss" in errors[0]
    assert "Hint: pass --base" in r.err and not (tmp_path / "nobase").exists()
    back = _convert(mlx, base, tmp_path / "back")
    want, have = load_file(lora / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert sorted(want) == sorted(have) and all(torch.equal(want[k], have[k]) for k in want)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(base, back)(IDS).logits, peft_model(base, lora)(IDS).logits,
                                   rtol=0, atol=1e-5)


def test_gpt_oss_keeps_its_fused_experts(moe_dir, tmp_path):
    """gpt-oss's checkpoint stores experts fused: --to peft --base leaves peft's file as it is."""
    lora = moe_dir / "gpt_oss" / "lora"
    out = _convert(lora, moe_dir / "gpt_oss" / "base", tmp_path / "out")
    want, have = load_file(lora / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(want) == sorted(have) and all(torch.equal(want[k], have[k]) for k in want)


SHAPES = {"gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}


@pytest.fixture(scope="module")
def fused_qwen(moe_dir, tmp_path_factory):
    return _fused_base(moe_dir / "qwen3_moe" / "base", tmp_path_factory.mktemp("fq") / "fused")


def test_missing_expert_or_part_into_a_fused_base_is_refused_by_name(fused_qwen, make_adapter, tmp_path):
    modules = {f"model.layers.{i}.mlp.experts.{e}.{p}": s
               for i in range(2) for e in range(4) for p, s in SHAPES.items()}
    del modules["model.layers.1.mlp.experts.2.up_proj"], modules["model.layers.1.mlp.experts.2.gate_proj"]
    r = run_cli(["convert", make_adapter(modules=modules), "--to", "peft", "--base", fused_qwen, "-o", tmp_path / "a"])
    assert r.code == 2 and "Traceback" not in r.err
    errors = [ln for ln in r.err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "'model.layers.1.mlp.experts.gate_up_proj' fused (4 experts)" in errors[0]
    assert "experts 0, 1, 3" in errors[0] and "Hint:" in r.err and not (tmp_path / "a").exists()
    modules["model.layers.1.mlp.experts.2.gate_proj"] = SHAPES["gate_proj"]  # expert 2 without its up_proj
    r = run_cli(["convert", make_adapter(modules=modules), "--to", "peft", "--base", fused_qwen, "-o", tmp_path / "b"])
    assert r.code == 2 and "only 'model.layers.1.mlp.experts.2.gate_proj' for expert 2" in r.err
    assert not (tmp_path / "b").exists()


def test_fused_experts_that_fit_no_base_weight_are_refused(moe_dir, fused_qwen, tmp_path):
    """Against a fused base with 8 experts (the adapter has 4): one Error line naming the expert and shapes."""
    base = tmp_path / "base"
    shutil.copytree(fused_qwen, base)
    tensors = load_file(base / "model.safetensors")
    for k in [k for k in tensors if ".mlp.experts." in k]:
        tensors[k] = torch.cat([tensors[k], tensors[k]])
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    r = run_cli(["convert", moe_dir / "qwen3_moe" / "lora", "--to", "peft", "--base", base, "-o", tmp_path / "out"])
    assert r.code == 2 and "Traceback" not in r.err
    errors = [ln for ln in r.err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "experts.gate_up_proj[0]" in errors[0] and "(8, 32, 32)" in errors[0], r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("via_gguf", [False, True])
def test_per_expert_adapter_into_gpt_oss_fuses_interleaved_rows(moe_dir, make_adapter, tmp_path, via_gguf):
    """gpt-oss keeps gate and up interleaved in its fused gate_up_proj: per-expert gate / up modules with their
    own A (scale 2) become rows 0::2 / 1::2 of the fused expert's delta, directly or through a GGUF file."""
    base = moe_dir / "gpt_oss" / "base"
    modules = {f"model.layers.{i}.mlp.experts.{e}.{p}": s
               for i in range(2) for e in range(4) for p, s in SHAPES.items()}
    src_path = make_adapter(modules=modules, rank=2, alpha=4)
    src = read(src_path)
    if via_gguf:
        gguf_file = tmp_path / "a.gguf"
        assert run_cli(["convert", src_path, "--to", "gguf", "--base", base, "-o", gguf_file]).code == 0
        src_path = gguf_file
    got = read(_convert(src_path, base, tmp_path / "out"))
    for layer in range(2):
        for e in range(4):
            gu = delta(got.modules[f"model.layers.{layer}.mlp.experts.gate_up_proj[{e}]"])
            gate, up = (delta(src.modules[f"model.layers.{layer}.mlp.experts.{e}.{p}"])
                        for p in ("gate_proj", "up_proj"))
            assert gate.abs().max() > 0.1
            torch.testing.assert_close(gu[0::2], gate, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(gu[1::2], up, rtol=1e-6, atol=1e-7)
            dn = got.modules[f"model.layers.{layer}.mlp.experts.down_proj[{e}]"]
            want = delta(src.modules[f"model.layers.{layer}.mlp.experts.{e}.down_proj"])
            torch.testing.assert_close(delta(dn), want, rtol=1e-6, atol=1e-7)


def test_fused_experts_against_a_base_without_experts_are_refused(moe_dir, make_base, tmp_path):
    base = make_base({f"model.layers.{i}.self_attn.q_proj.weight": (32, 32) for i in range(2)})
    r = run_cli(["convert", moe_dir / "qwen3_moe" / "lora", "--to", "peft", "--base", base, "-o", tmp_path / "out"])
    assert r.code == 2 and "Traceback" not in r.err
    errors = [ln for ln in r.err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "16 module(s) match no single weight" in errors[0]
    assert "model.layers.0.mlp.experts.down_proj[0]" in errors[0] and "Hint:" in r.err
    assert not (tmp_path / "out").exists()
