"""peft's converted target_modules on fused-expert models (docs/moe.md, "peft 0.22"): a target_modules name
such as `gate_proj` / `w1` becomes target_parameters `gate_up_proj` (a bare parameter name) with rank_pattern /
alpha_pattern `.*\\.gate_up_proj` of 2·r / 2·alpha. peft 0.21 does it for Qwen3-MoE and Mixtral, 0.22 for
Qwen2-MoE too. Read exactly (each expert against peft's own ΔW), validated clean, merged as peft merges, and
written so that the installed peft loads it; the tests state which peft does what."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from clirun import run_cli
from moe_models import expert_wrappers, make_adapter, make_base, peft_model
from packaging.version import Version
from test_moe_merge import _check
from test_moe_ops import _best, _deltas

import loratool
from loratool.maths.delta import delta
from loratool.ops.validate import validate_adapter

PEFT_22 = Version(peft.__version__) >= Version("0.22")
LINEARS = ["q_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = ".*\\.gate_up_proj"


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("qwen2_moe") / "base"
    make_base("qwen2_moe", base)
    return base


def _base(name: str, moe_dir: Path, qwen2_base: Path) -> Path:
    return qwen2_base if name == "qwen2_moe" else moe_dir / name / "base"


def _read_exactly(base: Path, lora: Path, same: Path | None = None) -> loratool.Adapter:
    """Every expert of `lora` as loratool reads it equals peft's own ΔW_e of the same file (of `same`, a
    file with the same tensors that peft loads, where it cannot load `lora`)."""
    adapter = loratool.read(lora)
    want = _deltas(base, same or lora)
    ours = {(m.expert.param, m.expert.index): m for m in adapter.modules.values() if m.expert is not None}
    assert set(ours) == set(want) and len(want) == 16
    for key, d in want.items():
        np.testing.assert_allclose(delta(ours[key]).double().numpy(), d, rtol=1e-5, atol=1e-6 * np.abs(d).max(),
                                   err_msg=str(key))
    return adapter


# (model, target_modules, target_parameters (None: both expert parameters), use_rslora, does the installed
# peft convert the target_modules names)
CASES = {
    "qwen2_moe-both": ("qwen2_moe", LINEARS, None, False, PEFT_22),
    "qwen3_moe-modules": ("qwen3_moe", LINEARS, [], False, True),
    "qwen3_moe-both-rslora": ("qwen3_moe", LINEARS, None, True, True),
    "mixtral-modules": ("mixtral", ["q_proj", "w1", "w2", "w3"], [], False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_adapter_reads_as_peft_computes_it(moe_dir: Path, qwen2_base: Path, case: str,
                                                      tmp_path: Path) -> None:
    name, modules, params, rslora, converted = CASES[case]
    base, lora = _base(name, moe_dir, qwen2_base), tmp_path / "lora"
    make_adapter(base, lora, r=4, alpha=8, target_modules=modules, target_parameters=params, use_rslora=rslora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    # what peft wrote: the fused gate_up_proj at twice the rank (and alpha) when it converted the names
    assert (cfg["rank_pattern"].get(FUSED), cfg["alpha_pattern"].get(FUSED)) == ((8, 16) if converted else (None, None))
    if converted:
        assert {"gate_up_proj", "down_proj"} <= set(cfg["target_parameters"])
    wrappers = expert_wrappers(peft_model(base, lora))
    adapter = _read_exactly(base, lora)
    for m in adapter.modules.values():
        if m.expert is None:
            continue
        w = wrappers[m.expert.param]
        assert (m.rank, m.scale) == (w.r["default"], pytest.approx(w.scaling["default"], rel=1e-12))
        if m.expert.param.endswith("gate_up_proj"):
            assert m.rank == (8 if converted else 4)
            assert m.scale == pytest.approx((16 / 8**0.5) if rslora and converted else (8 / 2 if rslora else 2.0))
    for report in (validate_adapter(lora), validate_adapter(lora, base=base)):
        assert report.ok and not report.findings, [f.to_dict() for f in report.findings]


def test_converted_adapter_merges_as_peft_merges(moe_dir: Path, tmp_path: Path) -> None:
    """target_modules only (Qwen3-MoE; converted by both peft versions): our merge equals peft's
    merge_and_unload tensor for tensor, logits to 1e-5."""
    base = moe_dir / "qwen3_moe" / "base"
    make_adapter(base, tmp_path / "lora", r=3, alpha=5, target_modules=LINEARS, target_parameters=[])
    _check(base, tmp_path / "lora", tmp_path)


@pytest.mark.parametrize("case", ["qwen2_moe-both", "mixtral-modules"])
def test_resized_converted_adapter_loads_in_peft(moe_dir: Path, qwen2_base: Path, case: str, tmp_path: Path) -> None:
    """resize to rank 3 everywhere: r becomes 3 and gate_up_proj is no longer 2·r. Written with exact
    target_modules paths (no bare `gate_proj` for peft to convert again into a rank_pattern of 2·r), the
    installed peft loads it and each expert is the best rank-3 approximation of peft's own ΔW_e."""
    name, modules, params, _, _ = CASES[case]
    base, lora = _base(name, moe_dir, qwen2_base), tmp_path / "lora"
    make_adapter(base, lora, r=4, alpha=8, target_modules=modules, target_parameters=params)
    r = run_cli(["resize", str(lora), "--rank", "3", "-o", str(tmp_path / "out")])
    assert r.code == 0, r.err
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and FUSED not in cfg["rank_pattern"]
    assert not {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"} & set(cfg["target_modules"])
    before, after = _deltas(base, lora), _deltas(base, tmp_path / "out")
    assert set(before) == set(after) and len(before) == 16
    for key, d in before.items():
        np.testing.assert_allclose(after[key], _best(d, 3), rtol=0, atol=1e-5 * np.abs(d).max(), err_msg=str(key))


def test_peft_021_qwen2_file_is_rewritten_for_both_versions(qwen2_base: Path, tmp_path: Path) -> None:
    """What peft 0.21 saves for Qwen2-MoE with target_modules gate_proj / up_proj / down_proj (the shared
    expert's Linears) and target_parameters on the experts: gate_up_proj at rank r, the bare names in
    target_modules. peft 0.22 converts those names on load (rank_pattern 2·r) and cannot load the file;
    0.21 loads it. loratool reads it exactly, and what it writes loads in the installed peft with the
    original's logits (and in the other version: checked by hand, docs/moe.md)."""
    base, orig, old = qwen2_base, tmp_path / "orig", tmp_path / "old"
    # the same modules, named so that neither version converts them: the file 0.21 writes with bare names
    make_adapter(base, orig, r=4, alpha=8,
                 target_modules=["q_proj"] + [f"shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj")])
    shutil.copytree(orig, old)
    cfg = json.loads((old / "adapter_config.json").read_text())
    cfg["target_modules"] = LINEARS
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        want = peft_model(base, orig)(ids).logits
    if PEFT_22:
        with pytest.raises(RuntimeError, match="size mismatch"):
            peft_model(base, old)
    else:
        with torch.no_grad():
            torch.testing.assert_close(peft_model(base, old)(ids).logits, want, rtol=0, atol=0)
    adapter = _read_exactly(base, old, same=orig)
    assert {m.rank for m in adapter.modules.values()} == {4}
    r = run_cli(["convert", str(old), "--to", "peft", "-o", str(tmp_path / "out")])
    assert r.code == 0, r.err
    with torch.no_grad():
        torch.testing.assert_close(peft_model(base, tmp_path / "out")(ids).logits, want, rtol=0, atol=0)


def test_router_wrapped_as_a_parameter_is_refused_by_name(qwen2_base: Path, tmp_path: Path) -> None:
    """target_modules `gate` (Qwen2-MoE's router, not a Linear in transformers 5): peft 0.22 turns it into
    target_parameters `gate.weight`, a 2-D ParamWrapper that loratool does not read: refused by name
    (exit 2, no traceback). peft 0.21 refuses to make it."""
    if not PEFT_22:
        with pytest.raises(ValueError, match="not supported"):
            make_adapter(qwen2_base, tmp_path / "lora", target_modules=["q_proj", "gate"], target_parameters=[])
        return
    make_adapter(qwen2_base, tmp_path / "lora", target_modules=["q_proj", "gate"], target_parameters=[])
    r = run_cli(["inspect", str(tmp_path / "lora")])
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert r.err.startswith("Error: ") and "'model.layers.0.mlp.gate.weight'" in r.err and "2-D" in r.err
