"""XLabs (x-flux) FLUX.1 LoRA files: read as the diffusers modules they amount to.

Independent references: diffusers' own converter (`_convert_xlabs_flux_lora_to_diffusers`, what
`FluxPipeline.load_lora_weights` runs on such a file) and numpy deltas of XLabs' processors
(each layer adds up @ down to the output of the layer it wraps, scale 1: no alpha in the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.errors import FormatError
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.resize import resize

H, R = 8, 2  # hidden width, rank (FLUX.1: 3072, mlp 4 * 3072)


def xlabs_file(tmp_path: Path, *, prefix: str = "", blocks: tuple[int, int] = (2, 2)) -> Path:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for i in range(blocks[0]):
        for layer, out in (("qkv_lora1", 3 * H), ("qkv_lora2", 3 * H), ("proj_lora1", H), ("proj_lora2", H)):
            sd[f"{prefix}double_blocks.{i}.processor.{layer}.down.weight"] = torch.randn(R, H, generator=g)
            sd[f"{prefix}double_blocks.{i}.processor.{layer}.up.weight"] = torch.randn(out, R, generator=g)
    for i in range(blocks[1]):
        sd[f"{prefix}single_blocks.{i}.processor.qkv_lora.down.weight"] = torch.randn(R, H, generator=g)
        sd[f"{prefix}single_blocks.{i}.processor.qkv_lora.up.weight"] = torch.randn(3 * H, R, generator=g)
        sd[f"{prefix}single_blocks.{i}.processor.proj_lora.down.weight"] = torch.randn(R, 5 * H, generator=g)
        sd[f"{prefix}single_blocks.{i}.processor.proj_lora.up.weight"] = torch.randn(H, R, generator=g)
    path = tmp_path / "xlabs.safetensors"
    save_file(sd, str(path))
    return path


def deltas(path: Path) -> dict[str, np.ndarray]:
    a = read(path)
    return {n: (m.up.load().double() @ m.down.load().double()).numpy() * m.scale for n, m in a.modules.items()}


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_read_equals_diffusers_own_xlabs_converter(tmp_path: Path, prefix: str) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    path = xlabs_file(tmp_path, prefix=prefix)
    ref = _convert_xlabs_flux_lora_to_diffusers(dict(load_file(str(path))))
    ref_deltas = {k[: -len(".lora_A.weight")]: (ref[k[: -len("lora_A.weight")] + "lora_B.weight"].double()
                                                @ ref[k].double()).numpy()
                  for k in ref if k.endswith(".lora_A.weight")}
    ours = deltas(path)
    assert set(ours) == set(ref_deltas) and len(ours) == 2 * 8 + 2 * 4
    for name, d in ref_deltas.items():
        np.testing.assert_allclose(ours[name], d, rtol=0, atol=1e-12)
    a = read(path)
    assert a.source_format == "xlabs" and {m.alpha_source for m in a.modules.values()} == {"implied"}


def test_convert_to_kohya_is_the_processors_weight_deltas(tmp_path: Path) -> None:
    """kohya linear1 = [qkv_lora's up @ down; zero MLP rows (4h)], the rest as they are, rank kept."""
    path = xlabs_file(tmp_path)
    raw = {k: v.double().numpy() for k, v in load_file(str(path)).items()}
    out = tmp_path / "k.safetensors"
    report = convert(path, out, to="kohya")
    assert report.to_dict()["format"] == "kohya"
    got = deltas(out)
    p = "single_blocks.0.processor.qkv_lora."
    linear1 = np.concatenate([raw[p + "up.weight"] @ raw[p + "down.weight"], np.zeros((4 * H, H))])
    np.testing.assert_allclose(got["lora_unet_single_blocks_0_linear1"], linear1, rtol=0, atol=1e-12)
    p = "double_blocks.1.processor.qkv_lora2."
    np.testing.assert_allclose(got["lora_unet_double_blocks_1_txt_attn_qkv"],
                               raw[p + "up.weight"] @ raw[p + "down.weight"], rtol=0, atol=1e-12)
    p = "single_blocks.1.processor.proj_lora."
    np.testing.assert_allclose(got["lora_unet_single_blocks_1_linear2"],
                               raw[p + "up.weight"] @ raw[p + "down.weight"], rtol=0, atol=1e-12)
    a = read(out)
    assert len(a.modules) == 12 and {m.rank for m in a.modules.values()} == {R}  # shared A: fused at rank r


def test_operations_write_diffusers_by_default(tmp_path: Path) -> None:
    path = xlabs_file(tmp_path)
    out = tmp_path / "r.safetensors"
    resize(path, out, rank=1)
    a = read(out)
    assert a.source_format == "diffusers" and len(a.modules) == 24
    assert all(n.startswith("transformer.") for n in a.modules)


def test_a_file_mixing_xlabs_and_other_keys_is_refused_by_name(tmp_path: Path) -> None:
    sd = dict(load_file(str(xlabs_file(tmp_path))))
    sd["something.else.weight"] = torch.zeros(2)
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    with pytest.raises(FormatError, match="XLabs"):
        read(path)


def test_broken_xlabs_layers_are_named(tmp_path: Path) -> None:
    sd = dict(load_file(str(xlabs_file(tmp_path))))
    del sd["double_blocks.0.processor.proj_lora1.up.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(FormatError, match=r"proj_lora1\.down\.weight' has no matching \.up\.weight"):
        read(path)
    sd = dict(load_file(str(xlabs_file(tmp_path))))
    sd["single_blocks.0.processor.qkv_lora.up.weight"] = torch.zeros(3 * H + 1, R)
    save_file(sd, str(path))
    with pytest.raises(FormatError, match="not 3 equal parts"):
        read(path)
