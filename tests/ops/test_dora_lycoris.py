"""DoRA on either axis and on LyCORIS modules: merge, verify and validate --base apply
W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with the norm per output row or per input column; what cannot hold it
refuses it by name.

References: the `lycoris-lora` package's own modules (LoCon / LoHa / LoKr with weight_decompose, both
wd_on_out settings, linear and conv), whose merged weight is read from their forward pass on one-hot
inputs; and numpy formulas written here for OneTrainer-style files (lycoris is not involved there).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from loratool.errors import IncompatibleError
from loratool.formats import read
from loratool.ops.combine import combine
from loratool.ops.convert import convert
from loratool.ops.merge import merge
from loratool.ops.rescale import rescale
from loratool.ops.resize import resize
from loratool.ops.validate import validate_adapter
from loratool.ops.verify import verify

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

STEM = "lora_unet_blk_x"
KEY = "model.diffusion_model.blk.x.weight"  # where kohya's `lora_unet_` prefix rule places STEM

CASES: dict[str, tuple[type, Any, dict[str, Any]]] = {
    "locon-linear": (LoConModule, lambda: nn.Linear(24, 16, bias=False), {"lora_dim": 4, "alpha": 2}),
    "locon-conv": (LoConModule, lambda: nn.Conv2d(8, 16, 3, bias=False), {"lora_dim": 4, "alpha": 1}),
    "locon-tucker": (LoConModule, lambda: nn.Conv2d(8, 16, 3, bias=False),
                     {"lora_dim": 4, "alpha": 1, "use_tucker": True}),
    "loha-linear": (LohaModule, lambda: nn.Linear(24, 16, bias=False), {"lora_dim": 4, "alpha": 2}),
    "loha-conv": (LohaModule, lambda: nn.Conv2d(8, 16, 3, bias=False), {"lora_dim": 3, "alpha": 1}),
    "lokr-linear": (LokrModule, lambda: nn.Linear(64, 96, bias=False), {"lora_dim": 2, "alpha": 1, "factor": 8}),
    "lokr-conv": (LokrModule, lambda: nn.Conv2d(16, 32, 3, bias=False), {"lora_dim": 2, "alpha": 1, "factor": 4}),
}


def lycoris_dora(cls: type, org: nn.Module, wd_on_out: bool, seed: int, **kw: Any
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A LyCORIS module with weight_decompose on `org`: (its saved tensors, W, the merged weight W').

    W' is what the module's forward pass applies (module(x) on one-hot inputs), so it is LyCORIS'
    own weight decomposition, not a formula of ours. The magnitudes are moved off the base norms
    so the normalisation matters.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        org.weight.normal_()
    m = cls(STEM, org, 1, weight_decompose=True, wd_on_out=wd_on_out, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "dora_scale":
                p.mul_(1 + 0.5 * torch.rand_like(p))
            elif not name.startswith("org"):
                p.normal_(std=0.5)
    sd = {k: v.detach().clone().contiguous() for k, v in m.custom_state_dict().items()}
    w = org.weight.detach().clone()
    m.apply_to()
    with torch.no_grad():
        if isinstance(org, nn.Linear):
            merged = m(torch.eye(w.shape[1])).T
        else:
            out_c, in_c, kh, kw = w.shape
            x = torch.eye(in_c * kh * kw).reshape(-1, in_c, kh, kw)
            merged = m(x).reshape(in_c * kh * kw, out_c).T.reshape(w.shape)
    return sd, w, merged.contiguous()


def write(tmp_path: Path, sd: dict[str, torch.Tensor], w: torch.Tensor) -> tuple[Path, Path]:
    adapter, base = tmp_path / "dora.safetensors", tmp_path / "base.safetensors"
    save_file({f"{STEM}.{k}": v for k, v in sd.items()}, str(adapter))
    save_file({KEY: w}, str(base))
    return adapter, base


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["per-row", "per-column"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_lycoris_weight_decompose(tmp_path: Path, case: str, wd_on_out: bool) -> None:
    cls, make, kw = CASES[case]
    sd, w, want = lycoris_dora(cls, make(), wd_on_out, seed=len(case), **kw)
    assert sd["dora_scale"].shape[0 if not wd_on_out else 1] == 1  # (1, in, ..) or (out, 1, ..)
    adapter, base = write(tmp_path, sd, w)
    a = read(adapter)
    mod = a.lycoris.get(STEM) or a.modules[STEM]
    assert mod.magnitude is not None and mod.dora_axis == ("out" if wd_on_out else "in")
    out = tmp_path / "merged.safetensors"
    report = merge(base, [adapter], out)
    assert report.merged == 1
    got = load_file(str(out))[KEY]
    assert got.dtype == torch.float32 and got.shape == w.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert verify(out, base, [adapter]).ok
    doc = validate_adapter(adapter, base=base).to_dict()
    assert not [f for f in doc["findings"] if f["severity"] == "error"], doc["findings"]
    assert any(f["code"] == "dora-per-input-column" for f in doc["findings"]) == (not wd_on_out)


def test_a_merged_dora_is_not_a_merged_lora(tmp_path: Path) -> None:
    """The check above fails if the magnitude were dropped: W + ΔW is far from LyCORIS' result."""
    sd, w, want = lycoris_dora(LohaModule, nn.Linear(24, 16, bias=False), False, seed=3, lora_dim=4, alpha=2)
    adapter, base = write(tmp_path, {k: v for k, v in sd.items() if k != "dora_scale"}, w)
    merge(base, [adapter], tmp_path / "plain.safetensors")
    plain = load_file(str(tmp_path / "plain.safetensors"))[KEY]
    assert (plain - want).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# OneTrainer DoRA: kohya keys, `.dora_scale` (1, in[, 1, 1]), no eps (norm_epsilon off by default).
# Source: Nerogar/OneTrainer modules/module/LoRAModule.py, DoRAModule (decompose_output_axis False).


def onetrainer_dora(tmp_path: Path, *, conv: bool, dtype: torch.dtype = torch.float32
                    ) -> tuple[Path, Path, dict[str, np.ndarray], np.ndarray]:
    g = torch.Generator().manual_seed(7)
    out_c, in_c, r = 12, 12, 3  # square: only the stored shape tells the axis
    k = (3, 3) if conv else ()
    w = torch.randn(out_c, in_c, *k, generator=g).to(dtype)
    sd = {f"{STEM}.lora_down.weight": torch.randn(r, in_c, *k, generator=g) * 0.5,
          f"{STEM}.lora_up.weight": torch.randn(out_c, r, *((1, 1) if conv else ()), generator=g) * 0.5,
          f"{STEM}.alpha": torch.tensor(2.0),
          f"{STEM}.dora_scale": torch.rand(1, in_c, *((1, 1) if conv else ()), generator=g) + 0.5}
    adapter, base = tmp_path / "ot.safetensors", tmp_path / "base.safetensors"
    save_file(sd, str(adapter))
    save_file({KEY: w}, str(base))
    return adapter, base, {k: v.double().numpy() for k, v in sd.items()}, w.double().numpy()


def numpy_dora_per_column(t: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
    down, up = t[f"{STEM}.lora_down.weight"], t[f"{STEM}.lora_up.weight"]
    r = down.shape[0]
    delta = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(w.shape) * (t[f"{STEM}.alpha"] / r)
    v = w + delta
    col = np.sqrt((np.moveaxis(v, 1, 0).reshape(v.shape[1], -1) ** 2).sum(axis=1))  # per input channel
    m = t[f"{STEM}.dora_scale"].reshape(-1)
    shape = [1] * v.ndim
    shape[1] = v.shape[1]
    return v * (m / col).reshape(shape)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_onetrainer_dora_merges_per_input_column(tmp_path: Path, conv: bool) -> None:
    adapter, base, t, w = onetrainer_dora(tmp_path, conv=conv)
    out = tmp_path / "m.safetensors"
    merge(base, [adapter], out)
    np.testing.assert_allclose(load_file(str(out))[KEY].double().numpy(), numpy_dora_per_column(t, w),
                               rtol=1e-5, atol=1e-5)
    assert verify(out, base, [adapter]).ok


def test_bf16_base_is_cast_back(tmp_path: Path) -> None:
    adapter, base, t, w = onetrainer_dora(tmp_path, conv=False, dtype=torch.bfloat16)
    out = tmp_path / "m.safetensors"
    merge(base, [adapter], out)
    got = load_file(str(out))[KEY]
    assert got.dtype == torch.bfloat16
    want = torch.from_numpy(numpy_dora_per_column(t, w)).float().bfloat16()
    assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


def test_scaled_fp8_base_merges_and_verifies(tmp_path: Path) -> None:
    """A ComfyUI scaled-fp8 base: DoRA is applied to the dequantized weight, requantized with its scale."""
    adapter, base, t, w = onetrainer_dora(tmp_path, conv=False)
    scale = float(np.abs(w).max() / 448.0)
    q = torch.from_numpy(w / scale).float().to(torch.float8_e4m3fn)
    save_file({KEY: q, KEY.removesuffix(".weight") + ".scale_weight": torch.tensor(scale)}, str(base))
    deq = q.double().numpy() * scale
    out = tmp_path / "m.safetensors"
    merge(base, [adapter], out)
    got = load_file(str(out))
    assert got[KEY].dtype == torch.float8_e4m3fn
    written = got[KEY].double().numpy() * float(got[KEY.removesuffix(".weight") + ".scale_weight"])
    want = numpy_dora_per_column(t, deq)
    assert np.abs(written - want).max() <= 2 ** -3 * np.abs(want).max()  # e4m3: 3 mantissa bits
    assert verify(out, base, [adapter]).ok


def test_magnitude_that_fits_no_column_of_the_base_is_refused(tmp_path: Path) -> None:
    """A flattened LoHa conv's (1, in, 1, 1) magnitude names its input channels; a base that has
    other channels (same in·k) is a shape mismatch, not a merge."""
    sd, w, _ = lycoris_dora(LohaModule, nn.Conv2d(8, 16, 3, bias=False), False, seed=5, lora_dim=3, alpha=1)
    adapter, base = write(tmp_path, sd, w.reshape(16, 24, 3, 1).contiguous())  # 24·3 = 8·9
    with pytest.raises(IncompatibleError, match="needs a base weight"):
        merge(base, [adapter], tmp_path / "m.safetensors")


def test_unmerge_of_lycoris_dora_is_refused(tmp_path: Path) -> None:
    sd, w, _ = lycoris_dora(LokrModule, nn.Linear(64, 96, bias=False), True, seed=6, lora_dim=2, alpha=1, factor=8)
    adapter, base = write(tmp_path, sd, w)
    with pytest.raises(IncompatibleError, match="unmerging DoRA"):
        merge(base, [adapter], tmp_path / "m.safetensors", unmerge=True)


# ------------------------------------------------------------------------------------------------
# what cannot hold it refuses it; kohya-style files keep the per-column magnitude as it is


def test_per_column_dora_is_refused_by_formats_with_a_per_row_magnitude(tmp_path: Path) -> None:
    adapter, _, _, _ = onetrainer_dora(tmp_path, conv=False)
    for to in ("peft", "diffusers"):
        with pytest.raises(IncompatibleError, match="one magnitude per input column") as info:
            convert(adapter, tmp_path / f"x_{to}", to=to)
        assert "kohya" in (info.value.hint or "")
    with pytest.raises(IncompatibleError, match="DoRA"):
        combine([adapter, adapter], tmp_path / "c.safetensors", weights=[1.0, 1.0], method="cat")


def test_kohya_keeps_the_per_column_magnitude(tmp_path: Path) -> None:
    adapter, _, t, _ = onetrainer_dora(tmp_path, conv=True)
    out = tmp_path / "r.safetensors"
    rescale(adapter, out, mode="factor", value=0.5)
    got = load_file(str(out))
    assert torch.equal(got[f"{STEM}.dora_scale"], torch.from_numpy(t[f"{STEM}.dora_scale"]).float())
    assert read(out).modules[STEM].dora_axis == "in"
    small = tmp_path / "s.safetensors"
    resize(adapter, small, rank=2)
    assert load_file(str(small))[f"{STEM}.dora_scale"].shape == (1, 12, 1, 1)


@pytest.mark.parametrize("op", ["convert", "resize", "rescale"])
def test_lycoris_dora_is_refused_where_it_cannot_be_kept(tmp_path: Path, op: str) -> None:
    sd, w, _ = lycoris_dora(LohaModule, nn.Linear(24, 16, bias=False), True, seed=8, lora_dim=4, alpha=2)
    adapter, _ = write(tmp_path, sd, w)
    out = tmp_path / "o.safetensors"
    with pytest.raises(IncompatibleError, match="weight decomposition") as info:
        if op == "convert":
            convert(adapter, out, to="lora")
        elif op == "resize":
            resize(adapter, out, rank=2)
        else:
            rescale(adapter, out, mode="factor", value=0.5)
    assert "loratool merge" in (info.value.hint or "")
    assert not out.exists()


def test_per_column_dora_moves_across_a_family_layout_only_by_name(tmp_path: Path) -> None:
    """OneTrainer FLUX.1 DoRA into a BFL single-file base: `attn.to_out.0` is `img_attn.proj` there
    (renamed, merged with its magnitude); `attn.to_q` is a third of the fused `img_attn.qkv`, where
    a per-module norm has no meaning: refused by name, never merged without the magnitude."""
    from fixtures.families import flux_shapes

    h = 16
    g = torch.Generator().manual_seed(1)
    base_t = {f"{name}.weight": torch.randn(o, i, generator=g) for name, (o, i) in flux_shapes(h, 1, 1).items()}
    base = tmp_path / "flux1.safetensors"
    save_file(base_t, str(base))
    stems = {"lora_transformer_transformer_blocks_0_attn_to_out_0": "double_blocks.0.img_attn.proj.weight",
             "lora_transformer_transformer_blocks_0_ff_net_2": "double_blocks.0.img_mlp.2.weight"}
    sd: dict[str, torch.Tensor] = {}
    for stem, key in stems.items():
        out_f, in_f = base_t[key].shape
        sd |= {f"{stem}.lora_down.weight": torch.randn(4, in_f, generator=g),
               f"{stem}.lora_up.weight": torch.randn(out_f, 4, generator=g), f"{stem}.alpha": torch.tensor(2.0),
               f"{stem}.dora_scale": torch.rand(1, in_f, generator=g) + 0.5}
    adapter = tmp_path / "ot.safetensors"
    save_file(sd, str(adapter))
    out = tmp_path / "m.safetensors"
    assert merge(base, [adapter], out).merged == 2
    got = load_file(str(out))
    for stem, key in stems.items():
        t = {k.removeprefix(stem): v.double().numpy() for k, v in sd.items() if k.startswith(stem + ".")}
        v = base_t[key].double().numpy() + t[".lora_up.weight"] @ t[".lora_down.weight"] * (2.0 / 4)
        want = t[".dora_scale"] * v / np.linalg.norm(v, axis=0, keepdims=True)
        np.testing.assert_allclose(got[key].double().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=key)
    q = "lora_transformer_transformer_blocks_0_attn_to_q"
    sd |= {f"{q}.lora_down.weight": torch.randn(4, h, generator=g),
           f"{q}.lora_up.weight": torch.randn(h, 4, generator=g),
           f"{q}.dora_scale": torch.rand(1, h, generator=g) + 0.5}
    save_file(sd, str(adapter))
    with pytest.raises(IncompatibleError, match=f"'{q}' is a DoRA module"):
        merge(base, [adapter], tmp_path / "m2.safetensors")


def test_inspect_counts_lycoris_dora_by_axis(tmp_path: Path) -> None:
    from loratool.ops.inspect import inspect_adapter

    sd, w, _ = lycoris_dora(LokrModule, nn.Linear(64, 96, bias=False), False, seed=9, lora_dim=2, alpha=1, factor=8)
    adapter, _ = write(tmp_path, sd, w)
    doc = inspect_adapter(adapter).to_dict()
    assert doc["dora"] and doc["dora_axes"] == {"in": 1}
    row = doc["lycoris_modules"][0]
    assert row["dora"] and row["dora_axis"] == "in" and row["tensors"]["dora_scale"] == [1, 64]


def test_diff_tells_the_magnitude_axes_apart(tmp_path: Path) -> None:
    """A square layer: the same 12 values per output row or per input column are two adapters."""
    from loratool.ops.diff import diff

    adapter, _, t, _ = onetrainer_dora(tmp_path, conv=False)
    rows = tmp_path / "rows.safetensors"
    per_row = {k: torch.from_numpy(v).float() for k, v in t.items()}
    per_row[f"{STEM}.dora_scale"] = per_row[f"{STEM}.dora_scale"].reshape(-1, 1)  # (12, 1): per output row
    save_file(per_row, str(rows))
    doc = diff(adapter, rows).to_dict()
    assert [m["differences"] for m in doc["modules"]] == [["dora_axis"]]


def test_a_magnitude_of_neither_axis_is_a_bad_shape(tmp_path: Path) -> None:
    sd, w, _ = lycoris_dora(LohaModule, nn.Linear(24, 16, bias=False), True, seed=10, lora_dim=4, alpha=2)
    sd["dora_scale"] = torch.ones(2, 8)
    adapter, _ = write(tmp_path, sd, w)
    report = validate_adapter(adapter)
    assert [f.code for f in report.findings if f.severity == "error"] == ["bad-shape"]
    assert "dora_scale" in report.findings[0].message
    with pytest.raises(IncompatibleError, match="DoRA magnitude"):
        read(adapter)


def test_comfyui_applies_only_per_column_dora(tmp_path: Path) -> None:
    """ComfyUI's weight_decompose normalises per input column (a per-row (out, 1) magnitude is divided
    by the norm of W, or by column norms in older versions): validate --for comfyui flags per-row
    DoRA, convert --for comfyui refuses it by name, and per-column DoRA passes both."""
    per_column, _, t, _ = onetrainer_dora(tmp_path, conv=False)
    per_row = tmp_path / "rows.safetensors"
    rows = {k: torch.from_numpy(v).float() for k, v in t.items()}
    rows[f"{STEM}.dora_scale"] = rows[f"{STEM}.dora_scale"].reshape(-1, 1)
    save_file(rows, str(per_row))
    codes = {f.code for f in validate_adapter(per_row, for_runtime="comfyui").findings}
    assert "runtime-dora-axis" in codes
    assert "runtime-dora-axis" not in {f.code for f in validate_adapter(per_column, for_runtime="comfyui").findings}
    with pytest.raises(IncompatibleError, match="DoRA magnitudes per output row") as info:
        convert(per_row, tmp_path / "c.safetensors", for_runtime="comfyui")
    assert "--dora-to-lora" in (info.value.hint or "")
    convert(per_column, tmp_path / "ok.safetensors", for_runtime="comfyui")
    assert load_file(str(tmp_path / "ok.safetensors"))[f"{STEM}.dora_scale"].shape == (1, 12)


@pytest.mark.parametrize("to", ["kohya"])  # comfyui: the same check, but it needs a family file
def test_to_comfyui_or_kohya_warns_of_per_row_dora_as_for_comfyui_refuses_it(tmp_path: Path, to: str) -> None:
    """--to comfyui / kohya write a per-output-row magnitude (the format holds it), with the words
    --for comfyui refuses it with (issue 25 defect 5); per-column DoRA writes without a warning."""
    per_column, _, t, _ = onetrainer_dora(tmp_path, conv=False)
    per_row = tmp_path / "rows.safetensors"
    rows = {k: torch.from_numpy(v).float() for k, v in t.items()}
    rows[f"{STEM}.dora_scale"] = rows[f"{STEM}.dora_scale"].reshape(-1, 1)
    save_file(rows, str(per_row))
    with pytest.raises(IncompatibleError) as info:
        convert(per_row, tmp_path / "f.safetensors", for_runtime="comfyui")
    words = "DoRA magnitudes per output row (it normalises per input column)"
    assert words in str(info.value)
    report = convert(per_row, tmp_path / "c.safetensors", to=to)
    assert any(words in w and STEM in w for w in report.warnings), report.warnings
    ok = convert(per_column, tmp_path / "ok.safetensors", to=to)
    assert not any("DoRA" in w for w in ok.warnings)


def test_a_weight_scales_the_delta_inside_the_norm_with_a_warning(tmp_path: Path) -> None:
    adapter, base, t, w = onetrainer_dora(tmp_path, conv=False)
    out = tmp_path / "m.safetensors"
    report = merge(base, [adapter], out, weights=[0.5])
    half = dict(t)
    half[f"{STEM}.alpha"] = t[f"{STEM}.alpha"] * 0.5  # 0.5·ΔW
    np.testing.assert_allclose(load_file(str(out))[KEY].double().numpy(), numpy_dora_per_column(half, w),
                               rtol=1e-5, atol=1e-5)
    assert any("interpolate" in x and STEM in x for x in report.warnings)
    assert not merge(base, [adapter], tmp_path / "m1.safetensors").warnings
