"""FLUX.2 (dev, Klein) LoRAs in every dialect: detection (never FLUX.1), round trips, merges, and the real clients.

Files are generated at test time from the family table (fixtures/families.py `flux2_lora`). Independent
checks: diffusers' own converters (`_convert_kohya_flux2_lora_to_diffusers`,
`_convert_non_diffusers_flux2_lora_to_diffusers`) on our kohya / comfyui files, `load_lora_adapter` +
`fuse_lora` on a tiny Flux2Transformer2DModel, and numpy for merges into the BFL layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from family_tools import deltas, diffusers_deltas, fixture_families, fuses_whole, round_trips, write
from safetensors.torch import load_file

from loratool.families import detect
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge

flux2_lora = fixture_families.flux2_lora
flux2_shapes = fixture_families.flux2_shapes


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "peft", "onetrainer"])
def test_inspect_names_flux2_in_every_dialect(tmp_path: Path, dialect: str) -> None:
    path = write(tmp_path, "f.safetensors", flux2_lora(dialect, double=2, single=2))
    if dialect == "peft":  # a bare-path file reads as PEFT only in a folder; the names are what matters here
        names = [k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in load_file(str(path))
                 if ".lora_A." in k]
        det = detect(names)
        assert det.family == "flux.2" and det.confident
        return
    fam = inspect_adapter(path).to_dict()["family"]
    assert fam["family"] == "flux.2" and fam["dialect"] == dialect and fam["matched"] == fam["total"]
    assert fam["confident"] and not fam["ambiguous"]
    assert any(r.startswith("not flux.1: ") for r in fam["reasons"])


def test_a_klein_block_lora_is_flux2_by_its_shapes(tmp_path: Path) -> None:
    """musubi-tuner style: only the blocks' linears, with Klein 4B's block counts (5 double, 20 single,
    within FLUX.1's): the names are FLUX.1's too, the header's shapes are not (SwiGLU MLP (6h, h),
    linear1 (9h, h))."""
    t = {k: v for k, v in flux2_lora("kohya", double=5, single=20).items() if "_blocks_" in k}
    path = write(tmp_path, "klein.safetensors", t)
    fam = inspect_adapter(path).to_dict()["family"]
    assert fam["family"] == "flux.2" and fam["matched"] == fam["total"] == 5 * 8 + 20 * 2
    assert "not flux.1: lora_unet_double_blocks_0_img_mlp_0 is (96, 16), not one of its shapes" in fam["reasons"]
    names = [k.rsplit(".lora_", 1)[0] for k in t if k.endswith("lora_down.weight")]
    assert detect(names).ambiguous  # the names alone cannot tell: neither is named
    # and a FLUX.1 file of the same blocks stays FLUX.1
    f1 = write(tmp_path, "f1.safetensors", fixture_families.flux_lora("kohya", double=5, single=20))
    assert inspect_adapter(f1).to_dict()["family"]["family"] == "flux.1"


def test_flux2_dev_block_indices_are_past_flux1(tmp_path: Path) -> None:
    det = detect(["lora_unet_single_blocks_47_linear2", "lora_unet_single_blocks_0_linear2"])
    assert det.family == "flux.2" and det.confident


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "onetrainer", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    src = write(tmp_path, "k.safetensors", flux2_lora("kohya", double=2, single=2, seed=5))
    if target == "onetrainer":
        # no --to writes OneTrainer's names: its files are read, and convert to diffusers name for name
        mid = write(tmp_path, "mid.safetensors", flux2_lora("onetrainer", double=2, single=2, seed=5))
        out = tmp_path / "d.safetensors"
        convert(mid, out, to="diffusers")
        d_ot, d_out = deltas(mid), deltas(out)
        assert len(d_ot) == len(d_out) == 2 * 12 + 2 * 2 + 11
        for name, delta in d_out.items():
            assert torch.equal(d_ot["lora_transformer_" + name.removeprefix("transformer.").replace(".", "_")], delta)
        return
    round_trips(src, target, "flux.2", tmp_path)


def test_diffusers_names_and_the_swapped_final_modulation(tmp_path: Path) -> None:
    src = write(tmp_path, "k.safetensors", flux2_lora("kohya", seed=2))
    out = tmp_path / "d.safetensors"
    convert(src, out, to="diffusers")
    dk, dd = deltas(src), deltas(out)
    # linear1 stays fused: a rename to to_qkv_mlp_proj, the same delta
    assert torch.equal(dd["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"],
                       dk["lora_unet_single_blocks_0_linear1"])
    qkv = torch.cat([dd[f"transformer.transformer_blocks.0.attn.to_{x}"] for x in "qkv"])
    assert torch.equal(qkv, dk["lora_unet_double_blocks_0_img_attn_qkv"])
    assert torch.equal(dd["transformer.double_stream_modulation_img.linear"],
                       dk["lora_unet_double_stream_modulation_img_lin"])
    shift, scale = dk["lora_unet_final_layer_adaLN_modulation_1"].chunk(2)
    assert torch.equal(dd["transformer.norm_out.linear"], torch.cat([scale, shift]))


def test_merge_into_the_bfl_base_equals_numpy(tmp_path: Path) -> None:
    """A diffusers-named LoRA (split q, k, v) merged into a BFL checkpoint (fused qkv), against numpy."""
    gen = torch.Generator().manual_seed(1)
    shapes = flux2_shapes()
    base = {f"{p}.weight": torch.randn(*s, generator=gen) for p, s in shapes.items()}
    bpath = write(tmp_path, "flux2.safetensors", base)
    lora = write(tmp_path, "d.safetensors", flux2_lora("diffusers", seed=3))
    out = tmp_path / "m.safetensors"
    report = merge(bpath, [lora], out)
    assert not report.unmatched
    got = load_file(str(out))
    d = diffusers_deltas(lora)

    want_qkv = np.concatenate([d(f"transformer_blocks.0.attn.to_{x}") for x in "qkv"])
    np.testing.assert_allclose(got["double_blocks.0.img_attn.qkv.weight"].double().numpy(),
                               base["double_blocks.0.img_attn.qkv.weight"].double().numpy() + want_qkv, atol=1e-5)
    np.testing.assert_allclose(got["single_blocks.0.linear1.weight"].double().numpy(),
                               base["single_blocks.0.linear1.weight"].double().numpy()
                               + d("single_transformer_blocks.0.attn.to_qkv_mlp_proj"), atol=1e-5)
    scale, shift = np.split(d("norm_out.linear"), 2)
    np.testing.assert_allclose(got["final_layer.adaLN_modulation.1.weight"].double().numpy(),
                               base["final_layer.adaLN_modulation.1.weight"].double().numpy()
                               + np.concatenate([shift, scale]), atol=1e-5)
    for k in base:
        assert not torch.equal(got[k], base[k]), k  # every module placed


# ---------------------------------------------------------------------------------------------
# the real clients

diffusers = pytest.importorskip("diffusers")


def _same_deltas(theirs: dict[str, torch.Tensor], ours_path: Path, skip: set[str] = frozenset()) -> set[str]:
    """diffusers' converted state dict (alpha folded into the factors) against our diffusers file."""
    ours = read(ours_path)
    names = {k.rsplit(".lora_", 1)[0] for k in theirs} - skip
    for name in names:
        a, b = theirs[name + ".lora_A.weight"].double(), theirs[name + ".lora_B.weight"].double()
        m = ours.modules[name]
        got = m.up.load().double() @ m.down.load().double() * m.scale
        torch.testing.assert_close(got, b @ a, rtol=1e-6, atol=1e-9)
    return names


@pytest.mark.slow
def test_diffusers_kohya_converter_agrees_with_ours(tmp_path: Path) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    t = flux2_lora("kohya", double=2, single=2, alpha=8.0, seed=7)
    src = write(tmp_path, "k.safetensors", t)
    theirs = _convert_kohya_flux2_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    ours_path = tmp_path / "d.safetensors"
    convert(src, ours_path, to="diffusers")
    names = _same_deltas(theirs, ours_path)
    # theirs leaves out the modulations, guidance and the final modulation (it warns about them)
    assert len(names) == 2 * 12 + 2 * 2 + 5


@pytest.mark.slow
def test_diffusers_bfl_converter_agrees_with_ours_except_its_unswapped_final_modulation(tmp_path: Path) -> None:
    """ai-toolkit's `diffusion_model.` files: diffusers renames final_layer.adaLN_modulation.1 to
    norm_out.linear without the (shift, scale) -> (scale, shift) swap its checkpoint converter makes;
    ours swaps (as the tiny-model fuse test below confirms against Flux2Transformer2DModel)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers

    t = flux2_lora("comfyui", double=2, single=2, alpha=4.0, seed=8)
    t = {k: v for k, v in t.items() if not k.endswith(".alpha")}  # ai-toolkit writes no alpha (alpha = rank)
    src = write(tmp_path, "c.safetensors", t)
    theirs = _convert_non_diffusers_flux2_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    ours_path = tmp_path / "d.safetensors"
    convert(src, ours_path, to="diffusers")
    names = _same_deltas(theirs, ours_path, skip={"transformer.norm_out.linear"})
    assert len(names) == len(read(ours_path).modules) - 1
    a, b = theirs["transformer.norm_out.linear.lora_A.weight"], theirs["transformer.norm_out.linear.lora_B.weight"]
    m = read(ours_path).modules["transformer.norm_out.linear"]
    first, second = (b @ a).chunk(2)
    torch.testing.assert_close(m.up.load() @ m.down.load() * m.scale, torch.cat([second, first]))


def _tiny_flux2(guidance: bool = True) -> object:
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   timestep_guidance_channels=16, mlp_ratio=3.0, axes_dims_rope=(2, 2, 2, 2),
                                   guidance_embeds=guidance)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path, guidance: bool) -> None:
    model = _tiny_flux2(guidance)
    tensors = flux2_lora("kohya", double=2, single=2, rank=4, alpha=2.0, seed=9, guidance=guidance)
    fuses_whole(model, tensors, tmp_path)


@pytest.mark.slow
def test_the_fixture_shapes_are_the_model_shapes() -> None:
    from loratool.families import get

    state = _tiny_flux2().state_dict()
    fam = get("flux.2")
    for path, shape in flux2_shapes(double=2, single=2).items():
        rel, i, _ = fam.identify(fam.comfy_prefix + path, "comfyui", shape)  # type: ignore[misc]
        rows = sum(state[t.replace("{i}", str(i)) + ".weight"].shape[0] for t, _ in rel.split)
        assert rows == shape[0], path
