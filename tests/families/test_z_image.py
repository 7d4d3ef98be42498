"""Z-Image (Lumina2 architecture) LoRAs: detection, exact qkv split / fuse, and the real clients.

Files are generated at test time from the family table (fixtures/families.py `z_image_lora`). Independent
checks: diffusers' own converter (`_convert_non_diffusers_z_image_lora_to_diffusers`) on a file in its
diffusers-side names under `diffusion_model.` (as ai-toolkit writes them), `load_lora_adapter` +
`fuse_lora` on a tiny ZImageTransformer2DModel, and numpy for a merge into the single-file layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from family_tools import deltas, diffusers_deltas, fixture_families, fuses_whole, round_trips, write
from safetensors.torch import load_file

from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge

z_image_lora = fixture_families.z_image_lora
z_image_shapes = fixture_families.z_image_shapes


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer"])
def test_inspect_names_z_image(tmp_path: Path, dialect: str) -> None:
    fam = inspect_adapter(write(tmp_path, "z.safetensors", z_image_lora(dialect))).to_dict()["family"]
    assert fam["family"] == "z-image" and fam["dialect"] == dialect and fam["matched"] == fam["total"], fam
    assert fam["confident"]


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    round_trips(write(tmp_path, "k.safetensors", z_image_lora("kohya", seed=5)), target, "z-image", tmp_path)


def test_qkv_splits_exactly(tmp_path: Path) -> None:
    src = write(tmp_path, "c.safetensors", z_image_lora("comfyui", seed=2))
    out = tmp_path / "d.safetensors"
    convert(src, out, to="diffusers")
    dc, dd = deltas(src), deltas(out)
    for b in ("layers.1", "noise_refiner.0", "context_refiner.0"):
        qkv = torch.cat([dd[f"transformer.{b}.attention.to_{x}"] for x in "qkv"])
        assert torch.equal(qkv, dc[f"diffusion_model.{b}.attention.qkv"])
    assert torch.equal(dd["transformer.all_x_embedder.2-1"], dc["diffusion_model.x_embedder"])


def test_merge_into_the_single_file_base_equals_numpy(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    base = {f"{p}.weight": torch.randn(*s, generator=gen) for p, s in z_image_shapes().items()}
    bpath = write(tmp_path, "z_image.safetensors", base)
    lora = write(tmp_path, "d.safetensors", z_image_lora("diffusers", seed=3))
    out = tmp_path / "m.safetensors"
    assert not merge(bpath, [lora], out).unmatched
    got = load_file(str(out))
    d = diffusers_deltas(lora)

    want = np.concatenate([d(f"layers.0.attention.to_{x}") for x in "qkv"])
    np.testing.assert_allclose(got["layers.0.attention.qkv.weight"].double().numpy(),
                               base["layers.0.attention.qkv.weight"].double().numpy() + want, atol=1e-5)
    np.testing.assert_allclose(got["final_layer.linear.weight"].double().numpy(),
                               base["final_layer.linear.weight"].double().numpy()
                               + d("all_final_layer.2-1.linear"), atol=1e-5)
    assert all(not torch.equal(got[k], base[k]) for k in base)


diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_diffusers_converter_agrees_with_ours(tmp_path: Path) -> None:
    """diffusers' converter takes `diffusion_model.` + diffusers-side names with kohya suffixes and alpha
    (ai-toolkit's Z-Image files); ours reads the same file as diffusers-side names under ComfyUI's prefix."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    t = {"diffusion_model." + k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_down.")
         .replace(".lora_B.", ".lora_up."): v for k, v in z_image_lora("peft", seed=7).items()}
    theirs = _convert_non_diffusers_z_image_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    src = write(tmp_path, "a.safetensors", {k.replace("diffusion_model.", "transformer.", 1)
                                            .replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
                                            for k, v in t.items()})
    ours = read(src)
    names = {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert names == set(ours.modules)
    for name in names:
        a, b = theirs[name + ".lora_A.weight"].double(), theirs[name + ".lora_B.weight"].double()
        m = ours.modules[name]
        torch.testing.assert_close(m.up.load().double() @ m.down.load().double() * m.scale, b @ a)
    # and our conversion of the single-file names lands on the same diffusers modules
    out = tmp_path / "d.safetensors"
    convert(write(tmp_path, "c.safetensors", z_image_lora("comfyui", seed=7)), out, to="diffusers")
    assert set(read(out).modules) == names


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2,
                                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=12,
                                     axes_dims=[2, 2, 4], axes_lens=[64, 32, 32])
    fuses_whole(model, z_image_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
