"""validate --for / convert --for: what runtimes reject, ignore or mis-scale, and adapters they serve exactly.

The runtimes' scale rules are written out here from their source (vLLM's PEFTHelper up to 0.31: one
lora_alpha / r, or / sqrt(r) with use_rslora, rank_pattern and alpha_pattern not read; since 0.32
PEFTHelper.get_rank_and_scaling applies them as peft does; SGLang 0.5.23: lora_alpha / r always),
applied to the written files with safetensors + json. The reference deltas of
the inputs use peft's own pattern matching (peft.utils.other.get_pattern_key).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from loratool.errors import IncompatibleError
from loratool.ops.convert import convert
from loratool.ops.validate import validate_adapter

PREFIX = "base_model.model."
MODULES = {
    "model.layers.0.self_attn.q_proj": (32, 24),
    "model.layers.0.self_attn.v_proj": (16, 24),
    "model.layers.1.self_attn.q_proj": (32, 24),
    "model.layers.1.mlp.down_proj": (24, 40),
}
RANKS = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 4,
         "model.layers.1.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 2}
ALPHAS = {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.v_proj": 16,
          "model.layers.1.self_attn.q_proj": 3, "model.layers.1.mlp.down_proj": 16}


def peft_deltas(path: Path) -> dict[str, np.ndarray]:
    """ΔW per module the way peft computes it (patterns, rsLoRA), in float64."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for key, a in t.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = t[PREFIX + name + ".lora_B.weight"]
        r = rp.get(get_pattern_key(list(rp), name), cfg["r"])
        alpha = ap.get(get_pattern_key(list(ap), name), cfg["lora_alpha"])
        assert a.shape[0] == r
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[name] = scale * (b.double().numpy() @ a.double().numpy())
    return out


def global_rule_deltas(path: Path, *, honours_rslora: bool) -> dict[str, np.ndarray]:
    """ΔW per module under one global scale from the config's r and lora_alpha (vLLM / SGLang)."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if (honours_rslora and cfg.get("use_rslora")) else alpha / r
    out = {}
    for key, a in t.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = t[PREFIX + name + ".lora_B.weight"]
            assert a.shape[0] == r and b.shape[1] == r  # one rank for every module
            out[name] = scale * (b.double().numpy() @ a.double().numpy())
    return out


@pytest.fixture
def patterned(make_adapter):
    return make_adapter(modules=MODULES, rank=RANKS, alpha=ALPHAS, rslora=True)


@pytest.mark.parametrize("runtime,honours_rslora", [("vllm@0.30", True), ("vllm@0.8", True), ("sglang", False)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_for_serves_the_input_deltas_under_the_global_rule(make_adapter, tmp_path, runtime, honours_rslora,
                                                                    dtype):
    src = make_adapter(modules=MODULES, rank=RANKS, alpha=ALPHAS, rslora=True, dtype=dtype)
    want = peft_deltas(src)
    # the input itself is served wrong: patterns are not read
    naive = global_rule_deltas_unchecked(src, honours_rslora)
    assert any(not np.allclose(naive[n], want[n], rtol=1e-3) for n in want)
    out = tmp_path / f"for_{runtime.replace('@', '_')}"
    report = convert(src, out, for_runtime=runtime)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    assert cfg["use_rslora"] is False and not cfg.get("modules_to_save") and cfg["use_dora"] is False
    got = global_rule_deltas(out, honours_rslora=honours_rslora)
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7 * np.abs(want[n]).max())
    assert report.prepared is not None and report.prepared["rank"] == 8
    assert sorted(report.prepared["baked"])  # at least one scale had to be baked
    # peft itself reads the output with the same deltas (its own rules, no patterns left)
    peft_view = peft_deltas(out)
    for n in want:
        np.testing.assert_allclose(peft_view[n], want[n], rtol=1e-6, atol=1e-7 * np.abs(want[n]).max())


def global_rule_deltas_unchecked(path: Path, honours_rslora: bool) -> dict[str, np.ndarray]:
    """Like global_rule_deltas, but for an input whose modules have different ranks (the runtime pads)."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if (honours_rslora and cfg.get("use_rslora")) else alpha / r
    return {k.removeprefix(PREFIX).removesuffix(".lora_A.weight"):
            scale * (t[k.replace("lora_A", "lora_B")].double().numpy() @ a.double().numpy())
            for k, a in t.items() if k.endswith(".lora_A.weight")}


def test_current_vllm_applies_patterns_and_rslora(patterned, tmp_path):
    """vLLM 0.32+ applies rank_pattern / alpha_pattern and rsLoRA (PEFTHelper.get_rank_and_scaling): the
    input validates clean, and convert --for vllm keeps the patterns."""
    report = validate_adapter(patterned, for_runtime="vllm")
    assert [f for f in report.findings if f.severity == "error"] == [] and report.ok
    out = tmp_path / "served"
    convert(patterned, out, for_runtime="vllm")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["use_rslora"] is True
    want, got = peft_deltas(patterned), peft_deltas(out)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7 * np.abs(want[n]).max())


def test_fixture_peft_llama_validates_for_current_vllm_and_not_for_an_old_one():
    fixture = Path(__file__).resolve().parents[2] / "fixtures" / "peft_llama"
    code, out, err = run_cli(["validate", fixture, "--for", "vllm"])
    assert code == 0, out + err
    code, out, _ = run_cli(["validate", fixture, "--for", "vllm@0.8", "--json"])
    doc = json.loads(out)
    assert code == 1 and {f["code"] for f in doc["findings"] if f["severity"] == "error"} == {"runtime-misscales"}
    code, _, err = run_cli(["validate", fixture, "--for", "vllm@0.7"])
    assert code == 2 and "covers releases 0.8.0" in err
    code, _, err = run_cli(["validate", fixture, "--for", "vlm"])
    assert code == 2 and "vllm" in err


def test_validate_for_vllm_lists_misscaled_modules_and_the_output_is_clean(patterned, tmp_path):
    report = validate_adapter(patterned, for_runtime="vllm@0.30")
    mis = {f.module for f in report.findings if f.code == "runtime-misscales"}
    want = peft_deltas(patterned)
    naive = global_rule_deltas_unchecked(patterned, True)
    wrong = {n for n in want if not np.allclose(naive[n], want[n], rtol=1e-6)}
    assert mis == wrong and wrong
    msg = next(f.message for f in report.findings if f.code == "runtime-misscales")
    assert "fix: loratool convert" in msg and "--for vllm@0.30" in msg
    assert not report.ok
    out = tmp_path / "served"
    convert(patterned, out, for_runtime="vllm@0.30")
    clean = validate_adapter(out, for_runtime="vllm@0.30")
    assert [f for f in clean.findings if f.code.startswith("runtime-") and f.severity == "error"] == []


def test_sglang_ignores_rslora(make_adapter):
    src = make_adapter(rank=4, alpha=8, rslora=True)
    codes = {f.code for f in validate_adapter(src, for_runtime="sglang").findings}
    assert "runtime-misscales" in codes
    assert "runtime-misscales" not in {f.code for f in validate_adapter(src, for_runtime="vllm").findings}


def test_modules_to_save_refused_then_dropped_with_a_warning(make_adapter, tmp_path, capsys):
    src = make_adapter(rank=4, config={"modules_to_save": ["lm_head"]},
                       extra_tensors={PREFIX + "lm_head.weight": torch.zeros(10, 32)})
    findings = validate_adapter(src, for_runtime="vllm").findings
    assert any(f.code == "runtime-rejects" and f.module == "lm_head.weight" for f in findings)
    with pytest.raises(IncompatibleError, match="modules_to_save"):
        convert(src, tmp_path / "x", for_runtime="vllm")
    code, _, err = run_cli(["convert", src, "--for", "vllm", "-o", tmp_path / "y", "--drop"])
    assert code == 0, err
    assert "dropped full tensors (modules_to_save) for vllm: lm_head.weight" in err
    cfg = json.loads((tmp_path / "y" / "adapter_config.json").read_text())
    assert not cfg.get("modules_to_save")
    assert not any("lm_head" in k for k in load_file(str(tmp_path / "y" / "adapter_model.safetensors")))


def test_dora_refused_then_dropped(tmp_path, capsys):
    dora = Path(__file__).resolve().parents[2] / "fixtures" / "peft_dora"
    code, _, err = run_cli(["convert", dora, "--for", "vllm", "-o", tmp_path / "x"])
    assert code == 2 and "Error:" in err and "DoRA" in err and "--drop" in err
    code, _, err = run_cli(["convert", dora, "--for", "sglang", "-o", tmp_path / "y", "--drop"])
    assert code == 0 and "dropped DoRA magnitudes" in err
    keys = load_file(str(tmp_path / "y" / "adapter_model.safetensors"))
    assert not any("magnitude" in k for k in keys)
    assert json.loads((tmp_path / "y" / "adapter_config.json").read_text())["use_dora"] is False


def test_rank_above_the_ceiling_is_refused(make_adapter, tmp_path):
    src = make_adapter(modules={"model.layers.0.mlp.up_proj": (600, 600)}, rank=513)
    assert any(f.code == "runtime-rank" for f in validate_adapter(src, for_runtime="vllm").findings)
    with pytest.raises(IncompatibleError, match="ceiling 512"):
        convert(src, tmp_path / "x", for_runtime="vllm")


def test_vllm_rank_setting_hint(make_adapter):
    src = make_adapter(modules={"model.layers.0.mlp.up_proj": (48, 40)}, rank=24)
    msgs = [f.message for f in validate_adapter(src, for_runtime="vllm").findings if f.code == "runtime-setting"]
    assert msgs and "--max-lora-rank 32" in msgs[0]


def test_cli_validate_for_exit_code_and_json(patterned, capsys):
    code, out, _ = run_cli(["validate", patterned, "--for", "sglang", "--json"])
    doc = json.loads(out)
    assert code == 1 and doc["runtime"] == "sglang"
    assert any(f["code"] == "runtime-misscales" for f in doc["findings"])


def test_kohya_file_is_not_loaded_by_vllm(tmp_path):
    kohya = Path(__file__).resolve().parents[2] / "fixtures" / "kohya_sd.safetensors"
    codes = {f.code for f in validate_adapter(kohya, for_runtime="vllm").findings}
    assert "runtime-format" in codes
    assert "runtime-format" not in {f.code for f in validate_adapter(kohya, for_runtime="comfyui").findings}


# ---------------------------------------------------------------------------------------------
# DoRA -> plain LoRA for a given base


def _dora_pair(make_adapter, tmp_path, *, exact: bool):
    """A one-module DoRA adapter and a random base; `exact`: magnitude = the merged row norms (g = 1)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 20, generator=gen)
    a = torch.randn(4, 20, generator=gen) / 5
    b = torch.randn(24, 4, generator=gen) / 2
    scale = 8 / 4
    merged = w.double() + scale * (b.double() @ a.double())
    m = merged.norm(dim=1) if exact else merged.norm(dim=1) * (1 + 0.3 * torch.rand(24, generator=gen).double())
    name = "model.layers.0.mlp.up_proj"
    src = make_adapter(modules={name: (24, 20)}, rank=4, alpha=8, config={"use_dora": True},
                       drop=[f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"],
                       extra_tensors={f"{PREFIX}{name}.lora_A.weight": a, f"{PREFIX}{name}.lora_B.weight": b,
                                      f"{PREFIX}{name}.lora_magnitude_vector": m.float()})
    base = tmp_path / "dora_base.safetensors"
    save_file({f"{name}.weight": w}, str(base))
    dora_delta = (m / merged.norm(dim=1))[:, None] * merged - w.double()  # DoRA's W' − W, written out here
    return src, base, name, dora_delta.numpy(), scale * (b.double() @ a.double()).numpy()


@pytest.mark.parametrize("exact", [True, False])
def test_dora_to_lora_reports_the_error_it_makes(make_adapter, tmp_path, capsys, exact):
    src, base, name, want, lora_part = _dora_pair(make_adapter, tmp_path, exact=exact)
    out = tmp_path / f"plain{exact}"
    code, stdout, err = run_cli(["convert", src, "--for", "vllm", "--dora-to-lora", base, "-o", out, "--json"])
    assert code == 0, err
    got = peft_deltas(out)[name]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    reported = json.loads(stdout)["dora_to_lora"][name]
    assert abs(rel - reported) <= 1e-3 * max(rel, 1e-3) + 1e-5
    # the best rank-4 approximation: no worse than the SVD truncation computed here
    s = np.linalg.svd(want, compute_uv=False)
    assert rel <= math.sqrt((s[4:] ** 2).sum() / (s ** 2).sum()) + 1e-5
    if exact:  # magnitude = merged norms: DoRA is the plain LoRA delta
        np.testing.assert_allclose(got, lora_part, rtol=1e-4, atol=1e-5)
    else:  # dropping the magnitude would be worse than the fitted LoRA
        assert rel < np.linalg.norm(lora_part - want) / np.linalg.norm(want)
    assert "magnitude" not in " ".join(load_file(str(out / "adapter_model.safetensors")))
    code, _, err = run_cli(["convert", src, "--to", "peft", "--dora-to-lora", base, "-o", tmp_path / "p"])
    assert code == 0 and f"{name}: DoRA written as plain LoRA" in err and "relative error" in err


def test_every_runtime_fact_and_its_source_is_on_the_runtimes_page():
    """docs/runtimes.md shows every fact of loratool.runtimes with the source line it was read from."""
    from loratool.runtimes import RECORDS

    text = (Path(__file__).resolve().parents[2] / "docs" / "runtimes.md").read_text(encoding="utf-8")
    for rec in RECORDS.values():
        assert f"### {rec.name}" in text and rec.source in text
        for fact in rec.facts:
            assert fact.source in text, (rec.name, fact.field, fact.source)
            if fact.field == "refuses":
                assert fact.value.words in text


def test_versions_resolve_to_the_facts_of_their_release():
    from loratool.runtimes import resolve, version_key

    assert version_key("0.8") == (0, 8, 0) < version_key("0.11.1") < version_key("0.32.0")
    old, mid, new = resolve("vllm", "0.8.5"), resolve("vllm", "0.30"), resolve("vllm")
    assert (old.patterns, mid.patterns, new.patterns) == (False, False, True)
    assert old.bias and old.bias_flag == "--enable-lora-bias" and not mid.bias and mid.bias_refused
    assert {r.key for r in new.refuses} >= {"alora_invocation_tokens", "layer_replication", "use_qalora",
                                            "use_bdlora", "init_lora_weights", "lora_bias", "bias", "use_dora",
                                            "target_modules"}
    assert "modules_to_save" in {r.key for r in mid.refuses} and new.modules_to_save_allowed == ("classifier", "score")
    assert new.version == "0.34.0" and new.checked == "2026-12-07"


def test_provenance_names_the_release_written_for(patterned, tmp_path):
    from safetensors import safe_open

    convert(patterned, tmp_path / "old", for_runtime="vllm@0.30")
    with safe_open(str(tmp_path / "old" / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["loratool.params"])["for"] == "vllm@0.30"
