"""verify: a real merge is `merged` / `unchanged`; each wrong merge is detected and named.

The merged checkpoints are made by `loratool merge` and, independently, by numpy in the test
(W + s·B@A cast to the stored dtype); the wrong ones by editing those files here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file, save_file

from loratool.ops.merge import merge
from loratool.ops.verify import verify

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

TARGETS = {
    "model.layers.0.self_attn.q_proj": (48, 32),
    "model.layers.0.self_attn.v_proj": (16, 32),
    "model.layers.0.mlp.down_proj": (32, 64),
    "model.layers.1.self_attn.q_proj": (48, 32),
}
OTHERS = {"model.embed_tokens.weight": (100, 32), "model.norm.weight": (32,), "model.layers.0.mlp.up_proj.weight":
          (64, 32)}


def _base_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"{n}.weight": s for n, s in TARGETS.items()} | OTHERS
    return {k: (torch.randn(s, generator=gen) * 0.05).to(dtype) for k, s in shapes.items()}


@pytest.fixture(params=["bfloat16", "float32"])
def setup(request, tmp_path, make_adapter):
    dtype = getattr(torch, request.param)
    base = tmp_path / "base.safetensors"
    save_file(_base_tensors(dtype), str(base))
    adapter = make_adapter(modules=TARGETS, rank=4, alpha=8, seed=1)
    return base, adapter, dtype


def _numpy_merge(base: Path, adapter: Path, out: Path, *, weights: dict[str, float] | None = None,
                 default: float = 1.0, dtype: torch.dtype | None = None) -> None:
    """W + w·(alpha/r)·B@A in float64 numpy, cast to the stored dtype: an independent merge."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(base))
    out_t = {}
    for k, t in tensors.items():
        name = k[: -len(".weight")]
        a = sd.get(f"base_model.model.{name}.lora_A.weight")
        if a is not None:
            b = sd[f"base_model.model.{name}.lora_B.weight"]
            w = (weights or {}).get(name, default)
            new = t.double().numpy() + w * scale * (b.double().numpy() @ a.double().numpy())
            t = torch.from_numpy(new).to(t.dtype)
        out_t[k] = t.to(dtype) if dtype is not None else t
    save_file(out_t, str(out))


def _verdicts(report) -> dict[str, str]:
    return {t.key: t.verdict for t in report.tensors}


TARGET_KEYS = {f"{n}.weight" for n in TARGETS}


def test_real_merge_is_merged_and_unchanged(setup, tmp_path):
    base, adapter, _ = setup
    out = tmp_path / "merged.safetensors"
    merge(base, [adapter], out)
    report = verify(out, base, [adapter])
    assert report.ok, [t.to_dict() for t in report.findings]
    verdicts = _verdicts(report)
    assert {k for k, v in verdicts.items() if v == "merged"} == TARGET_KEYS
    assert {k for k, v in verdicts.items() if v == "unchanged"} == set(OTHERS)
    assert all(abs(t.factor - 1) < 1e-2 for t in report.tensors if t.verdict == "merged")


def test_independent_numpy_merge_is_merged(setup, tmp_path):
    base, adapter, _ = setup
    out = tmp_path / "np.safetensors"
    _numpy_merge(base, adapter, out)
    report = verify(out, base, [adapter])
    assert report.ok and set(_verdicts(report).values()) == {"merged", "unchanged"}


def test_not_merged(setup):
    base, adapter, _ = setup
    report = verify(base, base, [adapter])  # the base itself, passed off as merged
    assert not report.ok
    assert {k for k, v in _verdicts(report).items() if v == "not merged"} == TARGET_KEYS


def test_merged_twice(setup, tmp_path):
    base, adapter, _ = setup
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    _numpy_merge(base, adapter, once)
    _numpy_merge(once, adapter, twice)
    report = verify(twice, base, [adapter])
    assert {k for k, v in _verdicts(report).items() if v == "merged twice"} == TARGET_KEYS
    assert all(t.factor == pytest.approx(2.0, abs=0.02) for t in report.tensors if t.key in TARGET_KEYS)


def test_merged_at_half_weight(setup, tmp_path):
    base, adapter, _ = setup
    out = tmp_path / "half.safetensors"
    _numpy_merge(base, adapter, out, default=0.5)
    report = verify(out, base, [adapter])
    bad = [t for t in report.tensors if t.key in TARGET_KEYS]
    assert {t.verdict for t in bad} == {"wrong weight"}
    assert all(t.factor == pytest.approx(0.5, abs=0.01) for t in bad)
    assert all(t.label.startswith("wrong weight (≈ 0.5") for t in bad)
    # and with the weight it was made with, it is right
    assert verify(out, base, [adapter], weights=[0.5]).ok


def test_one_tensor_edited(setup, tmp_path):
    base, adapter, _ = setup
    out = tmp_path / "m.safetensors"
    _numpy_merge(base, adapter, out)
    t = load_file(str(out))
    edited_delta = "model.layers.0.self_attn.v_proj.weight"
    edited_other = "model.layers.0.mlp.up_proj.weight"
    t[edited_delta] = t[edited_delta].clone()
    t[edited_delta][3] += 0.05  # one row of a merged tensor
    t[edited_other] = t[edited_other].clone()
    t[edited_other][0, 0] += 0.25  # one value of a tensor no adapter touches
    save_file(t, str(out))
    report = verify(out, base, [adapter])
    verdicts = _verdicts(report)
    assert verdicts[edited_delta] == "other change"
    assert verdicts[edited_other] == "other change"
    assert {k for k, v in verdicts.items() if v == "merged"} == TARGET_KEYS - {edited_delta}
    assert len(report.findings) == 2


def test_fp16_cast_of_the_merged_model(tmp_path, make_adapter):
    base = tmp_path / "base.safetensors"
    save_file(_base_tensors(torch.bfloat16), str(base))
    adapter = make_adapter(modules=TARGETS, rank=4, alpha=8, seed=1)
    out = tmp_path / "fp16.safetensors"
    _numpy_merge(base, adapter, out, dtype=torch.float16)
    report = verify(out, base, [adapter])
    assert not report.ok
    assert all(t.dtype_changed and t.dtype == "float16" and t.expected_dtype == "bfloat16" for t in report.tensors)
    assert {k for k, v in _verdicts(report).items() if v == "merged"} == TARGET_KEYS  # the values are right
    assert "dtype float16, expected bfloat16" in report.findings[0].label
    # what merge --dtype fp16 writes (one rounding, to fp16) is right when fp16 was asked for
    direct = tmp_path / "direct.safetensors"
    merge(base, [adapter], direct, dtype="fp16")
    assert verify(direct, base, [adapter], dtype="fp16").ok
    assert not verify(direct, base, [adapter]).ok


def test_two_adapters_one_at_the_wrong_weight(tmp_path, make_adapter):
    base = tmp_path / "base.safetensors"
    save_file(_base_tensors(torch.float32), str(base))
    a1 = make_adapter(modules=TARGETS, rank=4, alpha=8, seed=1)
    a2 = make_adapter(modules=TARGETS, rank=2, alpha=2, seed=2)
    out = tmp_path / "m.safetensors"
    merge(base, [a1, a2], out, weights=[1.0, 0.3])
    assert verify(out, base, [a1, a2], weights=[1.0, 0.3]).ok
    report = verify(out, base, [a1, a2], weights=[1.0, 1.0])
    bad = [t for t in report.tensors if t.key in TARGET_KEYS]
    assert {t.verdict for t in bad} == {"wrong weight"}
    for t in bad:
        assert t.factors == pytest.approx([1.0, 0.3], abs=1e-3)


@pytest.mark.parametrize("adapter,base", [("peft_llama", "base_llama"), ("peft_gpt2", "base_gpt2"),
                                          ("peft_cls", "base_cls"), ("peft_dora", "base_llama"),
                                          ("kohya_sd.safetensors", "base_sd.safetensors"),
                                          ("diffusers_sd.safetensors", "base_unet")])
def test_fixtures_round_trip(tmp_path, adapter, base):
    """Every fixture pair: conv, fan_in_fan_out, embeddings, modules_to_save, DoRA, sharded bases."""
    out = tmp_path / ("m.safetensors" if base.endswith(".safetensors") else "m")
    report_m = merge(FIXTURES / base, [FIXTURES / adapter], out)
    report = verify(out, FIXTURES / base, [FIXTURES / adapter])
    assert report.ok, [t.to_dict() for t in report.findings]
    counts = report.to_dict()["verdicts"]
    assert counts.get("merged", 0) == report_m.merged
    assert counts.get("replaced", 0) == report_m.replaced
    assert counts["unchanged"] == report_m.copied
    # and against the bare base, every merged tensor is caught
    bad = verify(FIXTURES / base, FIXTURES / base, [FIXTURES / adapter])
    assert {t.verdict for t in bad.findings} == {"not merged"}
    assert len(bad.findings) == report_m.merged + report_m.replaced


def test_sharded_base_and_missing_tensor(tmp_path, make_adapter, make_base):
    shapes = {f"{n}.weight": s for n, s in TARGETS.items()} | OTHERS
    base = make_base(shapes, layout="sharded", shards=2)
    adapter = make_adapter(modules=TARGETS, rank=4, alpha=8, seed=1)
    out = tmp_path / "merged"
    merge(base, [adapter], out)
    assert verify(out, base, [adapter]).ok
    shard = sorted(out.glob("model-*.safetensors"))[0]
    t = load_file(str(shard))
    gone = next(iter(t))
    del t[gone]
    save_file(t, str(shard))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"][gone]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    report = verify(out, base, [adapter])
    assert report.missing == [gone] and not report.ok


def test_cli_exit_codes_and_json(setup, tmp_path, capsys):
    base, adapter, _ = setup
    out = tmp_path / "m.safetensors"
    merge(base, [adapter], out)
    code, stdout, _ = run_cli(["verify", out, "--base", base, adapter])
    assert code == 0 and stdout.startswith("OK: ")
    code, stdout, _ = run_cli(["verify", out, "--base", base, adapter, "--weights", "0.5", "--json"])
    assert code == 1
    doc = json.loads(stdout)
    assert doc["ok"] is False and doc["verdicts"] == {"merged twice": 4, "unchanged": 3}
    code, _, err = run_cli(["verify", out, "--base", base, adapter, "--weights", "1,2"])
    assert code == 2 and err.startswith("Error: --weights has 2 value(s) for 1 adapter(s)")
