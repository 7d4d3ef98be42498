"""Chroma LoRAs: told apart from FLUX.1 (whose blocks and names it shares), exact conversion, the real clients.

Files are generated at test time from the family table (fixtures/families.py `chroma_lora`). Independent
checks: `load_lora_adapter` + `fuse_lora` on a tiny ChromaTransformer2DModel against loratool's merge, and
numpy for a merge into the BFL layout. diffusers has no Chroma LoRA converter of its own (its Chroma
pipeline loads FLUX.1's: `FluxLoraLoaderMixin`), so none is compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from family_tools import deltas, diffusers_deltas, fixture_families, fuses_whole, round_trips, write
from safetensors.torch import load_file

from loratool.families import detect
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge

chroma_lora = fixture_families.chroma_lora
chroma_shapes = fixture_families.chroma_shapes


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer"])
def test_inspect_names_chroma_not_flux1(tmp_path: Path, dialect: str) -> None:
    path = write(tmp_path, "c.safetensors", chroma_lora(dialect))
    fam = inspect_adapter(path).to_dict()["family"]
    assert fam["family"] == "chroma" and fam["dialect"] == dialect and fam["matched"] == fam["total"], fam
    assert fam["confident"]
    assert any(r.startswith("not flux.1: ") and "distilled_guidance_layer" in r for r in fam["reasons"])


def test_a_modulation_module_says_flux1_and_blocks_alone_fit_both(tmp_path: Path) -> None:
    f1 = write(tmp_path, "f1.safetensors", fixture_families.flux_lora("kohya"))
    fam = inspect_adapter(f1).to_dict()["family"]
    assert fam["family"] == "flux.1" and fam["matched"] == fam["total"] == 13
    assert {"family": "chroma", "dialect": "kohya", "matched": 10} in fam["candidates"]  # not its modulations
    blocks = {k: v for k, v in chroma_lora("kohya").items() if "_blocks_" in k}
    path = write(tmp_path, "b.safetensors", blocks)
    fam = inspect_adapter(path).to_dict()["family"]
    # the same names and shapes in both (and HunyuanVideo's kohya spelling): ambiguous, never FLUX.1
    assert fam["family"] is None and fam["ambiguous"] and {"flux.1", "chroma"} <= set(fam["tied"])
    assert "flux.2" not in fam["tied"]  # FLUX.2's blocks have other shapes
    # the header's training metadata settles it
    path = write(tmp_path, "m.safetensors", blocks, {"ss_base_model_version": "chroma"})
    assert inspect_adapter(path).to_dict()["family"]["family"] == "chroma"


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    round_trips(write(tmp_path, "k.safetensors", chroma_lora("kohya", seed=5)), target, "chroma", tmp_path)


def test_diffusers_names(tmp_path: Path) -> None:
    src = write(tmp_path, "k.safetensors", chroma_lora("kohya", seed=2))
    out = tmp_path / "d.safetensors"
    convert(src, out, to="diffusers")
    dk, dd = deltas(src), deltas(out)
    assert torch.equal(dd["transformer.distilled_guidance_layer.layers.1.linear_2"],
                       dk["lora_unet_distilled_guidance_layer_layers_1_out_layer"])
    lin1 = torch.cat([dd[f"transformer.single_transformer_blocks.0.attn.to_{x}"] for x in "qkv"]
                     + [dd["transformer.single_transformer_blocks.0.proj_mlp"]])
    assert torch.equal(lin1, dk["lora_unet_single_blocks_0_linear1"])
    assert detect([k.rsplit(".lora_", 1)[0] for k in load_file(str(out)) if ".lora_A." in k]).family == "chroma"


def test_merge_into_the_bfl_base_equals_numpy(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    base = {f"{p}.weight": torch.randn(*s, generator=gen) for p, s in chroma_shapes().items()}
    bpath = write(tmp_path, "chroma.safetensors", base)
    lora = write(tmp_path, "d.safetensors", chroma_lora("diffusers", seed=3))
    out = tmp_path / "m.safetensors"
    assert not merge(bpath, [lora], out).unmatched
    got = load_file(str(out))
    d = diffusers_deltas(lora)

    want = np.concatenate([d(f"single_transformer_blocks.0.attn.to_{x}") for x in "qkv"]
                          + [d("single_transformer_blocks.0.proj_mlp")])
    np.testing.assert_allclose(got["single_blocks.0.linear1.weight"].double().numpy(),
                               base["single_blocks.0.linear1.weight"].double().numpy() + want, atol=1e-5)
    np.testing.assert_allclose(got["distilled_guidance_layer.layers.0.in_layer.weight"].double().numpy(),
                               base["distilled_guidance_layer.layers.0.in_layer.weight"].double().numpy()
                               + d("distilled_guidance_layer.layers.0.linear_1"), atol=1e-5)
    assert all(not torch.equal(got[k], base[k]) for k in base)


diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    model = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                     axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                     approximator_hidden_dim=16, approximator_layers=2)
    fuses_whole(model, chroma_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
