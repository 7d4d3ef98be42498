"""resize / rescale / combine on experts of fused parameters: each expert's exact low-rank maths,
checked through peft itself loading the written adapter (numpy for the best rank-k reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clirun import run_cli
from moe_models import expert_wrappers, make_adapter, peft_model


def _deltas(base: Path, adapter: Path) -> dict[tuple[str, int], np.ndarray]:
    """peft's own ΔW per (fused parameter, expert), float64 numpy, (out, in) for every model."""
    out = {}
    for param, wrapper in expert_wrappers(peft_model(base, adapter)).items():
        d = wrapper.get_delta_weight("default").detach().double()
        if not wrapper._did_swap_in_out_features:  # stored (E, in, out): gpt-oss
            d = d.transpose(1, 2)
        for e in range(d.shape[0]):
            out[param, e] = d[e].numpy()
    return out


def _best(d: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_resize_each_expert_is_the_best_rank_k(moe_dir: Path, name: str, tmp_path: Path) -> None:
    base, lora = moe_dir / name / "base", moe_dir / name / "lora"
    r = run_cli(["resize", str(lora), "--rank", "2", "-o", str(tmp_path / "out")])
    assert r.code == 0, r.err
    before, after = _deltas(base, lora), _deltas(base, tmp_path / "out")
    assert set(before) == set(after) and len(before) == 16
    for key, d in before.items():
        np.testing.assert_allclose(after[key], _best(d, 2), rtol=0, atol=1e-5 * np.abs(d).max(), err_msg=str(key))
        assert np.linalg.matrix_rank(after[key], tol=1e-6 * np.abs(d).max()) == 2


def test_dynamic_resize_gives_experts_their_own_ranks(moe_dir: Path, tmp_path: Path) -> None:
    """sv_fro keeps a different rank per expert; peft stores one rank per parameter, so the writer pads
    with zeros: each expert's ΔW is still its own best rank-k_e approximation."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    base, lora = moe_dir / "qwen3_moe" / "base", tmp_path / "lora"
    shutil.copytree(moe_dir / "qwen3_moe" / "lora", lora)
    tensors = load_file(lora / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"]  # gate_up_proj: (4·4, in)
    for e in range(4):
        a[e * 4 + e + 1:(e + 1) * 4] *= 0.01  # expert e: e + 1 strong directions
    save_file(tensors, lora / "adapter_model.safetensors", {"format": "pt"})
    r = run_cli(["resize", str(lora), "--method", "sv_fro", "--threshold", "0.999", "-o", str(tmp_path / "out"),
                 "--json"])
    assert r.code == 0, r.err
    kept = {m["name"]: m["new_rank"] for m in json.loads(r.out)["modules"]}
    assert [kept[f"model.layers.0.mlp.experts.gate_up_proj[{e}]"] for e in range(4)] == [1, 2, 3, 4]
    before, after = _deltas(base, lora), _deltas(base, tmp_path / "out")
    for (param, e), d in before.items():
        k = kept[f"{param}[{e}]"]
        np.testing.assert_allclose(after[param, e], _best(d, k), rtol=0, atol=1e-5 * np.abs(d).max())


def test_rescale_scales_every_expert(moe_dir: Path, tmp_path: Path) -> None:
    base, lora = moe_dir / "gpt_oss" / "base", moe_dir / "gpt_oss" / "lora"
    r = run_cli(["rescale", str(lora), "--factor", "-0.75", "-o", str(tmp_path / "out")])
    assert r.code == 0, r.err
    before, after = _deltas(base, lora), _deltas(base, tmp_path / "out")
    for key, d in before.items():
        np.testing.assert_allclose(after[key], -0.75 * d, rtol=1e-5, atol=1e-7)


def test_combine_cat_is_the_exact_weighted_sum_per_expert(moe_dir: Path, tmp_path: Path) -> None:
    base, one = moe_dir / "qwen3_moe" / "base", moe_dir / "qwen3_moe" / "lora"
    two = tmp_path / "two"
    make_adapter(base, two, r=3, alpha=5, seed=7, use_rslora=True)
    r = run_cli(["combine", str(one), str(two), "--weights", "1,-0.5", "-o", str(tmp_path / "out")])
    assert r.code == 0, r.err
    d1, d2, got = _deltas(base, one), _deltas(base, two), _deltas(base, tmp_path / "out")
    for key in d1:
        np.testing.assert_allclose(got[key], d1[key] - 0.5 * d2[key], rtol=1e-5, atol=1e-6)
