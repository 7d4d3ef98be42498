"""LyCORIS modules (LoHa, LoKr, LoCon Tucker, full/norm/bias diffs): read, delta, LoRA form.

The reference is the `lycoris-lora` package itself: real LyCORIS modules wrap torch layers, their
state dicts are saved as the files we read, and the reference ΔW is what the wrapped layer's
forward pass adds (module(x) − layer(x) on one-hot inputs), so no formula of ours is involved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from loratool.adapter import LycoModule
from loratool.formats import read
from loratool.maths.lycoris import lyco_delta, lyco_to_lora

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def lycoris_module(cls: type, org: nn.Module, seed: int, **kw: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A LyCORIS module on `org` with random weights: (its saved tensors, the ΔW its forward adds)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        org.weight.normal_()
    m = cls("lora_unet_x", org, 1, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.startswith("org"):
                p.normal_(std=0.5)
    sd = m.custom_state_dict() if hasattr(m, "custom_state_dict") else m.state_dict()
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    m.apply_to()
    w = org.weight.detach().clone()
    with torch.no_grad():
        if isinstance(org, nn.Linear):
            x = torch.eye(w.shape[1])
            d = (m(x) - x @ w.T).T
        else:
            out_c, in_c, kh, kw = w.shape
            x = torch.eye(in_c * kh * kw).reshape(-1, in_c, kh, kw)
            d = (m(x) - F.conv2d(x, w)).reshape(in_c * kh * kw, out_c).T.reshape(w.shape)
    return sd, d


def save_module(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "lora_unet_x") -> Path:
    path = tmp_path / "lyco.safetensors"
    save_file({f"{name}.{k}": v for k, v in sd.items()}, str(path))
    return path


CASES = {
    "loha-linear": (LohaModule, lambda: nn.Linear(24, 16, bias=False), {"lora_dim": 4, "alpha": 2}),
    "loha-conv": (LohaModule, lambda: nn.Conv2d(8, 16, 3, bias=False), {"lora_dim": 3, "alpha": 1}),
    "loha-tucker": (LohaModule, lambda: nn.Conv2d(8, 16, 3, bias=False),
                    {"lora_dim": 3, "alpha": 2, "use_tucker": True}),
    "lokr-linear": (LokrModule, lambda: nn.Linear(64, 96, bias=False), {"lora_dim": 2, "alpha": 1, "factor": 8}),
    "lokr-both": (LokrModule, lambda: nn.Linear(64, 96, bias=False),
                  {"lora_dim": 2, "alpha": 3, "factor": 8, "decompose_both": True}),
    "lokr-full": (LokrModule, lambda: nn.Linear(12, 20, bias=False), {"lora_dim": 8, "alpha": 1, "factor": 4}),
    "lokr-conv": (LokrModule, lambda: nn.Conv2d(16, 32, 3, bias=False), {"lora_dim": 2, "alpha": 1, "factor": 4}),
    "lokr-tucker": (LokrModule, lambda: nn.Conv2d(16, 32, 3, bias=False),
                    {"lora_dim": 2, "alpha": 4, "factor": 4, "use_tucker": True}),
    "locon-tucker": (LoConModule, lambda: nn.Conv2d(8, 16, 3, bias=False),
                     {"lora_dim": 4, "alpha": 1, "use_tucker": True}),
}
ALGO = {"loha": "loha", "lokr": "lokr", "locon": "tucker"}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, LycoModule, torch.Tensor]:
    cls, org, kw = CASES[request.param]
    sd, ref = lycoris_module(cls, org(), seed=len(request.param), **kw)
    adapter = read(save_module(tmp_path, sd))
    assert adapter.source_format == "kohya" and not adapter.modules and not adapter.unsupported
    (module,) = adapter.lycoris.values()
    assert module.algo == ALGO[request.param.split("-")[0]]
    return request.param, module, ref


def _fit(d: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return d.reshape(ref.shape)


def test_delta_equals_lycoris_forward(case: tuple[str, LycoModule, torch.Tensor]) -> None:
    _, module, ref = case
    assert module.fits(tuple(ref.shape))
    d = lyco_delta(module)
    torch.testing.assert_close(_fit(d, ref), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_lora_form_is_exact(case: tuple[str, LycoModule, torch.Tensor]) -> None:
    name, module, ref = case
    form = lyco_to_lora(module)
    assert form.fro_retained == pytest.approx(1.0) and form.rel_error == pytest.approx(0.0, abs=1e-6)
    d = (form.up.double() @ form.down.double()).reshape(ref.shape)
    scale = float(ref.abs().max())
    assert float((d - ref.double()).abs().max()) <= 1e-5 * scale
    if name.startswith("loha"):  # exactly rank r1·r2
        r = module.tensors["w1b"].shape[0]
        assert form.up.shape[1] == r * r


def test_loha_to_lora_exact_to_1e6_in_float64(tmp_path: Path) -> None:
    """The Khatri–Rao factors reproduce the Hadamard product to rounding (1e-6 relative, here 1e-12)."""
    sd, _ = lycoris_module(LohaModule, nn.Linear(40, 30, bias=False), seed=3, lora_dim=5, alpha=3)
    (m,) = read(save_module(tmp_path, sd)).lycoris.values()
    w1a, w1b, w2a, w2b = (sd[k].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    ref = (w1a @ w1b) * (w2a @ w2b) * (3 / 5)  # numpy-style reference of the LoHa formula
    form = lyco_to_lora(m)
    got = form.up.double() @ form.down.double()
    assert form.up.shape == (30, 25) and form.down.shape == (25, 40)
    assert float((got - ref).norm() / ref.norm()) < 1e-6


def test_truncation_is_the_best_rank_k_with_its_error_reported(case: tuple[str, LycoModule, torch.Tensor]) -> None:
    _, module, ref = case
    mat = ref.double().reshape(ref.shape[0], -1)
    s = torch.linalg.svdvals(mat)
    k = 3
    form = lyco_to_lora(module, rank=k)
    assert form.up.shape[1] <= k
    got = form.up.double() @ form.down.double()
    err = float((got - mat).norm() / mat.norm())
    best = float(s[k:].norm() / s.norm())  # Eckart–Young: the best possible rank-k error
    assert err == pytest.approx(best, rel=1e-3, abs=1e-5)
    assert form.rel_error == pytest.approx(best, rel=1e-3, abs=1e-5)


def test_lokr_lora_form_never_forms_the_dense_matrix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoKr -> LoRA takes SVDs of the Kronecker factors only: no matrix of ΔW's size is decomposed."""
    sd, ref = lycoris_module(LokrModule, nn.Linear(256, 384, bias=False), seed=1, lora_dim=4, alpha=4, factor=16)
    (m,) = read(save_module(tmp_path, sd)).lycoris.values()
    seen: list[tuple[int, ...]] = []
    real_svd = torch.linalg.svd

    def svd(a: torch.Tensor, *args: Any, **kw: Any) -> Any:
        seen.append(tuple(a.shape))
        return real_svd(a, *args, **kw)

    def kron(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the LoRA form must not build kron(W1, W2)")

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(torch, "kron", kron)
    form = lyco_to_lora(m, rank=16)
    monkeypatch.undo()
    assert all(a * b < 384 * 256 / 8 for a, b in seen), seen
    got = form.up.double() @ form.down.double()
    s = torch.linalg.svdvals(ref.double())
    assert float((got - ref.double()).norm() / ref.double().norm()) == pytest.approx(
        float(s[16:].norm() / s.norm()), rel=1e-3)


def test_full_norm_and_bias_diffs(tmp_path: Path) -> None:
    path = tmp_path / "diffs.safetensors"
    save_file({
        "diffusion_model.blocks.0.ffn.0.diff": torch.randn(8, 4),
        "diffusion_model.blocks.0.ffn.0.diff_b": torch.randn(8),
        "diffusion_model.blocks.0.norm3.w_norm": torch.randn(4),
        "diffusion_model.blocks.0.norm3.b_norm": torch.randn(4),
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 4),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(4, 2),
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0),
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(4),
        "diffusion_model.head.head.diff_b": torch.randn(4),
    }, str(path))
    a = read(path)
    assert set(a.modules) == {"diffusion_model.blocks.0.self_attn.q"}
    q = a.modules["diffusion_model.blocks.0.self_attn.q"]
    assert q.bias is not None and not q.bias_scaled and q.bias_scale == 1.0 and q.scale == 0.5
    kinds = {n: m.algo for n, m in a.lycoris.items()}
    assert kinds == {"diffusion_model.blocks.0.ffn.0": "full", "diffusion_model.blocks.0.norm3": "norm",
                     "diffusion_model.head.head": "bias"}
    assert a.lycoris["diffusion_model.blocks.0.ffn.0"].bias is not None
    assert a.lycoris["diffusion_model.blocks.0.norm3"].fits((4,))
    assert not a.unsupported


def test_broken_lycoris_modules_are_named(tmp_path: Path) -> None:
    from loratool.errors import IncompatibleError
    from loratool.formats import Findings

    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_a.hada_w1_a": torch.ones(8, 2), "lora_unet_a.hada_w1_b": torch.ones(2, 8),
               "lora_unet_b.lokr_w1": torch.ones(2, 2), "lora_unet_b.lokr_w2_a": torch.ones(4, 2),
               "lora_unet_b.lokr_w2_b": torch.ones(3, 4)}, str(path))
    with pytest.raises(IncompatibleError, match="lora_unet_a"):
        read(path)
    findings = Findings(strict=False)
    a = read(path, findings=findings)
    assert not a.lycoris
    assert {f.module for f in findings.items if f.code == "bad-shape"} == {"lora_unet_a", "lora_unet_b"}


def test_weight_decomposed_lycoris_keeps_its_magnitude(tmp_path: Path) -> None:
    """`.dora_scale` of a LoHa is its DoRA magnitude (merge applies it: tests/ops/test_dora_lycoris.py);
    beside a norm diff it means nothing known and stays unsupported."""
    sd, _ = lycoris_module(LohaModule, nn.Linear(24, 16, bias=False), seed=2, lora_dim=4, alpha=2,
                           weight_decompose=True)
    assert "dora_scale" in sd
    a = read(save_module(tmp_path, sd))
    lm = a.lycoris["lora_unet_x"]
    assert not a.unsupported and lm.magnitude is not None and lm.magnitude.shape == (16, 1) and lm.dora_axis == "out"
    path = tmp_path / "norm.safetensors"
    save_file({"lora_unet_n.w_norm": torch.ones(8), "lora_unet_n.dora_scale": torch.ones(8, 1)}, str(path))
    assert "lora_unet_n.dora_scale" in read(path).unsupported


def test_lycoris_modules_without_alpha_give_one_warning_with_a_count(tmp_path: Path) -> None:
    """Issue #11 item 12 for LyCORIS: a file of many LoHa modules without .alpha warned once per
    module; now one line names the count."""
    from loratool.ops.inspect import inspect_adapter

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(5):
        for t in ("hada_w1_a", "hada_w2_a"):
            sd[f"lora_unet_m{i}.{t}"] = torch.randn(8, 2, generator=g)
        for t in ("hada_w1_b", "hada_w2_b"):
            sd[f"lora_unet_m{i}.{t}"] = torch.randn(2, 6, generator=g)
    path = tmp_path / "loha.safetensors"
    save_file(sd, str(path))
    warnings = [w for w in inspect_adapter(path).to_dict()["warnings"] if "alpha" in w]
    assert len(warnings) == 1 and "5 modules" in warnings[0], warnings
    a = read(path)
    assert {m.alpha for m in a.lycoris.values()} == {2.0}  # implied = rank
