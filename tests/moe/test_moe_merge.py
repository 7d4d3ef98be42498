"""merge into MoE bases: the same tensors as peft's merge_and_unload + save_pretrained, and the merged
model's logits equal base + adapter in peft (1e-5). Bases built from configs; adapters made by peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clirun import run_cli
from moe_models import make_adapter, make_base, peft_model, per_expert_model
from safetensors.torch import load_file, save_file

IDS = (torch.arange(24).reshape(3, 8) * 7) % 64


def _peft_merged(base: Path, adapter: Path, out: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    pm = peft_model(base, adapter)
    with torch.no_grad():
        logits = pm(IDS).logits
    pm.merge_and_unload().save_pretrained(out)
    return load_file(out / "model.safetensors"), logits


def _check(base: Path, adapter: Path, tmp_path: Path) -> None:
    import transformers

    ours = tmp_path / "ours"
    r = run_cli(["merge", str(base), str(adapter), "-o", str(ours)])
    assert r.code == 0, r.err
    want, logits = _peft_merged(base, adapter, tmp_path / "peft")
    got = load_file(ours / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert list(got) == list(original)  # the base's keys, in its order
    changed = 0
    for k, t in want.items():
        torch.testing.assert_close(got[k], t, rtol=1e-6, atol=1e-6, msg=k)
        changed += not torch.equal(original[k], got[k])
    assert changed >= 2 * 2 + 2  # every expert tensor of both layers and q_proj
    model = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_merge_target_parameters_equals_peft(moe_dir: Path, name: str, tmp_path: Path) -> None:
    """qwen3_moe / mixtral: experts stored one Linear per expert on disk (gate_up split by rows; Mixtral's
    block_sparse_moe w1/w3/w2); gpt_oss: fused (E, in, out) tensors, gate/up interleaved."""
    _check(moe_dir / name / "base", moe_dir / name / "lora", tmp_path)


def test_merge_shared_expert_and_experts(tmp_path: Path) -> None:
    """Qwen2-MoE: the shared expert's Linears (ordinary modules) and the routed experts together."""
    base = tmp_path / "base"
    make_base("qwen2_moe", base)
    make_adapter(base, tmp_path / "lora", r=3, alpha=5, use_rslora=True,
                 target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    _check(base, tmp_path / "lora", tmp_path)


def test_merge_into_sharded_base_streams_each_file(moe_dir: Path, tmp_path: Path) -> None:
    """A base split into two shards, fused expert tensors in both: the output keeps the sharding."""
    import json

    src = moe_dir / "gpt_oss" / "base"
    base = tmp_path / "base"
    base.mkdir()
    tensors = load_file(src / "model.safetensors")
    keys = list(tensors)
    half = {k: tensors[k] for k in keys if ".layers.1." in k}
    rest = {k: tensors[k] for k in keys if k not in half}
    save_file(rest, base / "model-00001-of-00002.safetensors", {"format": "pt"})
    save_file(half, base / "model-00002-of-00002.safetensors", {"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (k in half)}-of-00002.safetensors" for k in keys}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in src.iterdir():
        if f.suffix == ".json":
            (base / f.name).write_text(f.read_text())
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    r = run_cli(["merge", str(base), str(moe_dir / "gpt_oss" / "lora"), "-o", str(out)])
    assert r.code == 0, r.err
    want, _ = _peft_merged(src, moe_dir / "gpt_oss" / "lora", tmp_path / "peft")
    got = {**load_file(out / "model-00001-of-00002.safetensors"), **load_file(out / "model-00002-of-00002.safetensors")}
    for k, t in want.items():
        torch.testing.assert_close(got[k], t, rtol=1e-6, atol=1e-6, msg=k)


def test_merge_refuses_base_with_other_expert_count(moe_dir: Path, tmp_path: Path) -> None:
    """An adapter for 4 experts into a fused base of 8: one Error line naming the module and shapes."""
    base = tmp_path / "base"
    make_base("gpt_oss", base)  # 4 experts; rewrite its fused tensors with 8
    tensors = load_file(base / "model.safetensors")
    for k in [k for k in tensors if ".mlp.experts." in k]:
        tensors[k] = torch.cat([tensors[k], tensors[k]])
    save_file(tensors, base / "model.safetensors", {"format": "pt"})
    r = run_cli(["merge", str(base), str(moe_dir / "gpt_oss" / "lora"), "-o", str(tmp_path / "out")])
    assert r.code == 2
    errors = [ln for ln in r.err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "experts.gate_up_proj[" in errors[0] and "(8, 32, 32)" in errors[0], r.err
    assert not (tmp_path / "out").exists()


def test_merge_per_expert_target_modules_equals_peft(moe_dir: Path, tmp_path: Path) -> None:
    """A per-expert adapter (`experts.3.w1`, peft target_modules on one Linear per expert) into Mixtral's
    per-expert checkpoint: tensor for tensor what peft's merge_and_unload makes of the same Linears."""
    import peft

    base = moe_dir / "mixtral" / "base"
    torch.manual_seed(3)
    pm = peft.get_peft_model(per_expert_model(base), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["w1", "w2", "w3"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    want = {k + ".weight": m.weight for k, m in pm.merge_and_unload().named_modules()
            if isinstance(m, torch.nn.Linear)}
    assert len(want) == 2 * 4 * 3
    r = run_cli(["merge", str(base), str(tmp_path / "lora"), "-o", str(tmp_path / "out")])
    assert r.code == 0, r.err
    got, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    for k, t in want.items():
        assert not torch.equal(got[k], original[k]), k
        torch.testing.assert_close(got[k], t.detach(), rtol=1e-6, atol=1e-6, msg=k)


def test_fused_experts_expert_by_expert_and_whole_tensor_agree(moe_dir: Path, tmp_path: Path) -> None:
    """One adapter merges a fused tensor one expert slice at a time (merge_blocked); two adapters on the
    same tensor take the whole-tensor kernel (merged_tensor): 0.5 + 0.5 of one adapter equals it once."""
    base, lora = moe_dir / "gpt_oss" / "base", moe_dir / "gpt_oss" / "lora"
    assert run_cli(["merge", str(base), str(lora), "-o", str(tmp_path / "one")]).code == 0
    r = run_cli(["merge", str(base), str(lora), str(lora), "--weights", "0.5,0.5", "-o", str(tmp_path / "two")])
    assert r.code == 0, r.err
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-6, atol=1e-6, msg=k)


def test_fused_experts_streamed_by_pieces_equal_peft_and_the_whole_tensor(moe_dir: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused expert tensor larger than a piece (ops.merge.PIECE_BYTES, here made tiny) is read, merged
    and written a few experts at a time: the same bits as the tensor merged whole, and peft's result."""
    import loratool.ops.merge as ops_merge
    from loratool.io.writers import StreamingWriter

    base, lora = moe_dir / "gpt_oss" / "base", moe_dir / "gpt_oss" / "lora"
    assert run_cli(["merge", str(base), str(lora), "-o", str(tmp_path / "whole")]).code == 0
    pieces: list[tuple[str, int]] = []
    real = StreamingWriter.write_piece

    def spy(self, key, tensor, last):  # type: ignore[no-untyped-def]
        pieces.append((key, tensor.shape[0]))
        return real(self, key, tensor, last)

    monkeypatch.setattr(ops_merge, "PIECE_BYTES", 1)  # two experts a piece, the least it cuts
    monkeypatch.setattr(StreamingWriter, "write_piece", spy)
    _check(base, lora, tmp_path)  # into tmp_path / "ours": equals peft, tensors and logits
    fused = {k for k, _ in pieces}
    assert fused and all(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in fused)
    original = load_file(base / "model.safetensors")
    for k in fused:
        assert sum(n for key, n in pieces if key == k) == original[k].shape[0]
        assert len([n for key, n in pieces if key == k]) > 1
    whole, cut = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    for k in whole:
        assert torch.equal(whole[k], cut[k]), k
