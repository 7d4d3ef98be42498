"""FLUX.1 LoRAs in every dialect: detection, exact split / fuse conversion, and the real clients.

Files are generated at test time from the family table (fixtures/families.py). Independent checks:
diffusers' own kohya converter (`_convert_kohya_flux_lora_to_diffusers`) on our kohya file, and
`load_lora_adapter` + `fuse_lora` on a tiny FluxTransformer2DModel built here, compared with
loratool's merge into the same base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import deltas, fixture_families, fuse_equals_merge, write
from safetensors.torch import load_file

from loratool.errors import IncompatibleError
from loratool.families import detect
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

flux_lora = fixture_families.flux_lora




def original_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Deltas in the original (BFL) layout: diffusers-side modules fused by concatenating rows."""
    d = deltas(path)
    return d  # callers compare within one layout


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer"])
def test_detect_family_and_dialect(tmp_path: Path, dialect: str) -> None:
    path = write(tmp_path, "f.safetensors", flux_lora(dialect))
    fam = inspect_adapter(path).to_dict()["family"]
    if dialect in ("kohya", "comfyui"):
        # FLUX.1's own names: HunyuanVideo's kohya names share the attention ones, not img_mlp_0
        assert fam["family"] == "flux.1" and fam["dialect"] == dialect and fam["matched"] == fam["total"]
        assert fam["confident"] and fam["evidence"]
        # kohya: HunyuanVideo's kohya files are written in ComfyUI's names, FLUX.1's (issue 25): the
        # names are FLUX.1's own spelling, HunyuanVideo's only as respelled for ComfyUI
        assert dialect == "comfyui" or fam["reasons"] == [
            "not hunyuan-video: the names are flux.1's own (kohya); hunyuan-video's are spelled so only for ComfyUI"]
    else:
        # every diffusers-side name of these blocks is HunyuanVideo's too: ambiguous, no family
        assert fam["family"] is None and fam["ambiguous"] and not fam["confident"]
        # (the modulations rule Chroma out)
        assert fam["tied"] == ["flux.1", "hunyuan-video"] and fam["matched"] == fam["total"]


def test_hunyuan_block_indices_are_not_flux() -> None:
    det = detect(["lora_unet_double_blocks_19_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_qkv"])
    # HunyuanVideo 1.0 (20 double blocks) or 1.5 (54): both have these names; FLUX.1 (19) is out
    assert det.ambiguous and det.tied == ["hunyuan-video", "hunyuan-video-1.5"] and det.matched == det.total == 2
    assert ("flux.1", "kohya", 1) in det.candidates


def _fused_delta(d: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([d[n] for n in names], dim=0)


def test_kohya_to_diffusers_splits_exactly_and_back_is_bit_identical(tmp_path: Path) -> None:
    src = write(tmp_path, "k.safetensors", flux_lora("kohya", biases=True))
    dif = tmp_path / "d.safetensors"
    convert(src, dif, to="diffusers")
    dk, dd = deltas(src), deltas(dif)
    qkv = _fused_delta(dd, [f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"])
    assert torch.equal(qkv, dk["lora_unet_double_blocks_0_img_attn_qkv"])
    lin1 = _fused_delta(dd, [f"transformer.single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
                        + ["transformer.single_transformer_blocks.0.proj_mlp"])
    assert torch.equal(lin1, dk["lora_unet_single_blocks_0_linear1"])
    # diffusers -> comfyui (the family named) -> kohya: the original tensors, bit for bit
    comfy = tmp_path / "c.safetensors"
    convert(dif, comfy, to="comfyui", family="flux.1")
    back = tmp_path / "k2.safetensors"
    convert(comfy, back, to="kohya")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_independent_split_modules_fuse_block_diagonally(tmp_path: Path) -> None:
    src = write(tmp_path, "d.safetensors", flux_lora("diffusers", seed=3))
    out = tmp_path / "k.safetensors"
    report = convert(src, out, to="kohya", family="flux.1")
    rows = {m.new_name: m for m in report.modules}
    assert rows["lora_unet_double_blocks_0_img_attn_qkv"].rank == 12 and \
        rows["lora_unet_double_blocks_0_img_attn_qkv"].from_algo == "fuse-block"
    dd, dk = deltas(src), deltas(out)
    qkv = _fused_delta(dd, [f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"])
    torch.testing.assert_close(dk["lora_unet_double_blocks_0_img_attn_qkv"], qkv, rtol=0, atol=1e-12)
    # truncated: the best rank-6 approximation, error reported
    out6 = tmp_path / "k6.safetensors"
    report = convert(src, out6, to="kohya", family="flux.1", fuse_rank=6)
    row = next(m for m in report.modules if m.new_name == "lora_unet_double_blocks_0_img_attn_qkv")
    s = torch.linalg.svdvals(qkv)
    best = float(s[6:].norm() / s.norm())
    assert row.rank == 6 and row.rel_error == pytest.approx(best, rel=1e-6)
    got = deltas(out6)["lora_unet_double_blocks_0_img_attn_qkv"]
    assert float((got - qkv).norm() / qkv.norm()) == pytest.approx(best, rel=1e-5)


def test_missing_part_fuses_with_zero_rows(tmp_path: Path) -> None:
    t = flux_lora("diffusers", seed=4)
    t = {k: v for k, v in t.items() if ".attn.to_v." not in k or "single" in k}
    src = write(tmp_path, "d.safetensors", t)
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya", family="flux.1")
    d = deltas(out)["lora_unet_double_blocks_0_img_attn_qkv"]
    assert d.shape == (48, 16) and not d[32:].any()


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    src = write(tmp_path, "k.safetensors", flux_lora("kohya", seed=5))
    mid = tmp_path / ("mid" if target == "peft" else "mid.safetensors")
    convert(src, mid, to=target)
    back = tmp_path / "back.safetensors"
    convert(mid, back, to="kohya", family="flux.1")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_side_to_kohya_needs_the_family(tmp_path: Path) -> None:
    src = write(tmp_path, "d.safetensors", flux_lora("diffusers"))
    # FLUX.1 and HunyuanVideo write these blocks under the same kohya names (ComfyUI's): no --family needed
    report = convert(src, tmp_path / "k.safetensors", to="kohya")
    assert any("fit flux.1 and hunyuan-video equally" in w for w in report.warnings)
    with pytest.raises(IncompatibleError, match=r"flux\.1") as e:  # their comfyui names differ
        convert(src, tmp_path / "c0.safetensors", to="comfyui")
    assert "--family flux.1" in (e.value.hint or "")
    with pytest.raises(IncompatibleError, match="comfyui"):
        convert(write(tmp_path, "x.safetensors", {"lora_unet_foo.lora_down.weight": torch.ones(1, 2),
                                                   "lora_unet_foo.lora_up.weight": torch.ones(2, 1)}),
                tmp_path / "c.safetensors", to="comfyui")


def test_unknown_modules_are_listed(tmp_path: Path) -> None:
    t = flux_lora("kohya")
    t["lora_unet_double_blocks_0_img_attn_norm.lora_down.weight"] = torch.ones(4, 16)
    t["lora_unet_double_blocks_0_img_attn_norm.lora_up.weight"] = torch.ones(16, 4)
    src = write(tmp_path, "k.safetensors", t)
    with pytest.raises(IncompatibleError, match="img_attn_norm"):
        convert(src, tmp_path / "d.safetensors", to="diffusers", family="flux.1")


# ---------------------------------------------------------------------------------------------
# the real clients

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_diffusers_kohya_converter_agrees_with_ours(tmp_path: Path) -> None:
    """diffusers' own sd-scripts converter (full-size Flux dims) gives the same deltas as our diffusers output."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    t = flux_lora("kohya", hidden=3072, double=1, single=1, rank=4, alpha=8.0, seed=7)
    src = write(tmp_path, "k.safetensors", t)
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    ours_path = tmp_path / "d.safetensors"
    convert(src, ours_path, to="diffusers")
    ours = read(ours_path)
    x = torch.randn(3072, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    names = {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert names == set(ours.modules)
    for name in names:
        a, b = theirs[name + ".lora_A.weight"].double(), theirs[name + ".lora_B.weight"].double()
        m = ours.modules[name]
        xin = x if a.shape[1] == 3072 else torch.randn(a.shape[1], 2, dtype=torch.float64)
        want = b @ (a @ xin)  # diffusers folds alpha / rank into the factors
        got = m.up.load().double() @ (m.down.load().double() @ xin) * m.scale
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    tensors = flux_lora("kohya", hidden=16, rank=4, alpha=2.0, seed=9)
    wrapped, changed, ours = fuse_equals_merge(model, tensors, tmp_path)
    assert len(wrapped) == len(ours.modules)  # every module placed: no unexpected / missing keys
    assert changed == len(wrapped)
