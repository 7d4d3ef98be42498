"""Internal errors (exit 3) the hostile corpus found that no other item of issue 22 lists, each now
one `Error:` line with exit 2 (validate: a finding, exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import run_cli
from corpus import good_peft, llama_base


def _one_error(err: str, *words: str) -> None:
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, err
    assert "internal error" not in errors[0] and "Traceback" not in err
    for w in words:
        assert w in errors[0], (w, errors[0])


@pytest.mark.parametrize("targets", [[1, 2], [["q_proj"]], [None], {"q_proj": 1}])
def test_target_modules_of_wrong_types_are_refused(tmp_path: Path, targets: object) -> None:
    """target_modules holding numbers, lists or an object made every writer fail with a TypeError."""
    ad = good_peft(tmp_path, name="ad", config={"target_modules": targets})
    for args in (
        ["rescale", ad, "-o", tmp_path / "o1", "--factor", "2"],
        ["resize", ad, "-o", tmp_path / "o2", "-r", "2"],
        ["convert", ad, "--to", "peft", "-o", tmp_path / "o3"],
    ):
        r = run_cli(args)
        assert r.code == 2, r
        _one_error(r.err, "adapter_config.json", "target_modules")
    r = run_cli(["validate", ad, "--json"])
    assert r.code == 1
    assert "config-invalid" in {f["code"] for f in json.loads(r.out)["findings"]}
    assert not (tmp_path / "o1").exists()


def test_target_modules_as_names_or_one_regex_still_read(tmp_path: Path) -> None:
    for targets in (["q_proj", "v_proj", "down_proj"], "model.*proj", None):
        ad = good_peft(tmp_path / str(hash(str(targets))), name="ad", config={"target_modules": targets})
        r = run_cli(["rescale", ad, "-o", ad.parent / "out", "--factor", "2"])
        assert r.code == 0, r


@pytest.mark.parametrize(
    "kw",
    [{"config": {"lora_alpha": 1e308}}, {"config": {"alpha_pattern": {"v_proj": 1e308}}}, {"nan": True}, {"inf": True}],
)
def test_verify_refuses_a_delta_beyond_float32(tmp_path: Path, kw: dict[str, object]) -> None:
    """An alpha of 1e308 or a NaN/Inf factor overflowed verify's float64 projection (numpy
    LinAlgError, exit 3); merge refuses such an adapter, so verify says no merge can hold it."""
    ad = good_peft(tmp_path, name="ad", **kw)
    base = llama_base(tmp_path, name="base")
    r = run_cli(["verify", base, "--base", base, ad])
    assert r.code == 2, r
    _one_error(r.err, "NaN/Inf or beyond float32", "'model.layers.0.")
    assert run_cli(["merge", base, ad, "-o", tmp_path / "m"]).code == 2  # what merge says of it


def test_big_endian_npz_reads_as_the_same_adapter(tmp_path: Path) -> None:
    """An .npz of big-endian ('>f4') arrays made torch.from_numpy raise (exit 3); numpy's byte
    order is an encoding, so it reads as the same adapter as its little-endian twin."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "model.layers.0.self_attn.q_proj.lora_a": rng.standard_normal((32, 4)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.lora_b": rng.standard_normal((4, 32)).astype(np.float32),
    }
    for name, order in (("be", ">f4"), ("le", "<f4")):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "adapters.npz", **{k: v.astype(order) for k, v in arrays.items()})
    r = run_cli(["diff", tmp_path / "be" / "adapters.npz", tmp_path / "le" / "adapters.npz", "--json", "-q"])
    assert r.code == 0, r
    assert json.loads(r.out)["identical"] is True


def test_factors_with_an_empty_side_are_a_bad_shape(tmp_path: Path) -> None:
    """down (4, 0) / up (0, 4): rank 4 over no features made resize and inspect --spectrum fail in
    a reshape (exit 3); like rank 0, it is a bad-shape finding naming the module."""
    import torch

    q = "base_model.model.model.layers.0.self_attn.q_proj"
    ad = good_peft(
        tmp_path,
        name="ad",
        drop=(f"{q}.lora_A.weight", f"{q}.lora_B.weight"),
        extra_tensors={f"{q}.lora_A.weight": torch.zeros(4, 0), f"{q}.lora_B.weight": torch.zeros(0, 4)},
    )
    for args in (["inspect", ad, "--spectrum"], ["resize", ad, "-o", tmp_path / "o", "-r", "2"], ["diff", ad, ad]):
        r = run_cli(args)
        assert r.code == 2, r
        _one_error(r.err, "model.layers.0.self_attn.q_proj", "empty factors")
    r = run_cli(["validate", ad, "--json"])
    assert r.code == 1
    assert "bad-shape" in {f["code"] for f in json.loads(r.out)["findings"]}


def test_lycoris_factors_with_an_empty_side_are_a_bad_shape(tmp_path: Path) -> None:
    """A LoKr lokr_w1 of shape (0, 4) made convert fail in a reshape (exit 3)."""
    import torch
    from safetensors.torch import save_file

    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "lokr.safetensors"
    save_file({f"{stem}.lokr_w1": torch.ones(0, 4), f"{stem}.lokr_w2": torch.ones(8, 8)}, str(path))
    r = run_cli(["convert", path, "--to", "kohya", "-o", tmp_path / "o.safetensors"])
    assert r.code == 2, r
    _one_error(r.err, stem, "empty factors", "(0, 4)")
    r = run_cli(["validate", path, "--json"])
    assert r.code == 1
    assert "bad-shape" in {f["code"] for f in json.loads(r.out)["findings"]}


def test_spectrum_of_fp8_factors_with_nan_is_a_clean_error(tmp_path: Path) -> None:
    """Finding the NaN in float8 factors called torch.isfinite on float8 (NotImplementedError, exit 3)."""
    import torch

    q = "base_model.model.model.layers.0.self_attn.q_proj"
    down = torch.full((4, 32), float("nan")).to(torch.float8_e4m3fn)
    ad = good_peft(tmp_path, name="ad", drop=(f"{q}.lora_A.weight",), extra_tensors={f"{q}.lora_A.weight": down})
    r = run_cli(["inspect", ad, "--spectrum"])
    assert r.code == 2, r
    _one_error(r.err, "model.layers.0.self_attn.q_proj", "NaN or Inf")
