"""HunyuanVideo LoRAs in every dialect: detection, exact split / fuse conversion, and the real clients.

Files are generated at test time from the family table (fixtures/families.py). Independent checks:
diffusers' own converter (`_convert_hunyuan_video_lora_to_diffusers`) on our ComfyUI-named file, and
`load_lora_adapter` + `fuse_lora` on a tiny HunyuanVideoTransformer3DModel built here, compared with
loratool's merge into the same base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import deltas, fixture_families, fuse_equals_merge, write
from safetensors.torch import load_file

from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

hunyuan_video_lora = fixture_families.hunyuan_video_lora
hunyuan_video_shapes = fixture_families.hunyuan_video_shapes
family_lora = fixture_families.family_lora

N_MODULES = 31  # original-layout modules of one double, one single and one refiner block + embedders
# the embedders ComfyUI loads under its own names (comfy/ldm/hunyuan_video/model.py: MLPEmbedder's
# in_layer / out_layer), which its key map takes, not Tencent's, under diffusion_model.
COMFY_EMBEDDERS = {f"{e}.{a}": f"{e}.{b}" for e in ("time_in", "guidance_in", "txt_in.t_embedder")
                   for a, b in (("mlp.0", "in_layer"), ("mlp.2", "out_layer"))}
COMFY_EMBEDDERS.update({f"txt_in.c_embedder.linear_{n}": f"txt_in.c_embedder.{b}" for n, b in ((1, "in_layer"),
                                                                                               (2, "out_layer"))})


def tencent(key: str) -> str:
    """A comfyui key in Tencent's spelling (what diffusers' converter and diffusion-pipe read)."""
    for theirs, comfy in COMFY_EMBEDDERS.items():
        key = key.replace(f".{comfy}.", f".{theirs}.")
    return key




@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer", "diffusion-pipe"])
def test_detect_family_and_dialect(tmp_path: Path, dialect: str) -> None:
    path = write(tmp_path, "h.safetensors", hunyuan_video_lora(dialect))
    fam = inspect_adapter(path).to_dict()["family"]
    assert fam["family"] == "hunyuan-video" and fam["dialect"] == dialect and fam["matched"] == fam["total"]
    assert fam["confident"] and not fam["ambiguous"]
    # FLUX.1 fits part of it (the shared attention / single-block names): a module it lacks rules it out
    reasons = fam["reasons"]
    assert any(r.startswith("not flux.1: ") for r in reasons) and all(r.startswith("not ") for r in reasons)
    # HunyuanVideo 1.5 has the double blocks and embedders but no single blocks, vector_in or guidance_in
    assert any(r.startswith("not hunyuan-video-1.5: ") for r in reasons)


def test_kohya_diffusers_comfyui_kohya_is_the_identity(tmp_path: Path) -> None:
    src = write(tmp_path, "k.safetensors", hunyuan_video_lora("kohya", biases=True))
    dif, comfy, back = tmp_path / "d.safetensors", tmp_path / "c.safetensors", tmp_path / "k2.safetensors"
    convert(src, dif, to="diffusers")
    dk, dd = deltas(src), deltas(dif)
    assert len(dk) == N_MODULES
    qkv = torch.cat([dd[f"transformer.transformer_blocks.0.attn.to_{x}"] for x in "qkv"])
    assert torch.equal(qkv, dk["lora_unet_double_blocks_0_img_attn_qkv"])
    txt = torch.cat([dd[f"transformer.transformer_blocks.0.attn.add_{x}_proj"] for x in "qkv"])
    assert torch.equal(txt, dk["lora_unet_double_blocks_0_txt_attn_qkv"])
    refiner = torch.cat([dd[f"transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_{x}"] for x in "qkv"])
    assert torch.equal(refiner, dk["lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_qkv"])
    lin1 = torch.cat([dd[f"transformer.single_transformer_blocks.0.attn.to_{x}"] for x in "qkv"]
                     + [dd["transformer.single_transformer_blocks.0.proj_mlp"]])
    assert torch.equal(lin1, dk["lora_unet_single_blocks_0_linear1"])
    shift, scale = dk["lora_unet_final_layer_adaLN_modulation_1"].chunk(2)
    assert torch.equal(dd["transformer.norm_out.linear"], torch.cat([scale, shift]))
    convert(dif, comfy, to="comfyui")  # the token refiner names the family: no --family needed
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_down.weight" in load_file(str(comfy))
    convert(comfy, back, to="kohya")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    src = write(tmp_path, "k.safetensors", hunyuan_video_lora("kohya", seed=5))
    mid = tmp_path / ("mid" if target == "peft" else "mid.safetensors")
    convert(src, mid, to=target)
    back = tmp_path / "back.safetensors"
    convert(mid, back, to="kohya", family="hunyuan-video")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_independent_split_modules_fuse_exactly(tmp_path: Path) -> None:
    src = write(tmp_path, "d.safetensors", hunyuan_video_lora("diffusers", seed=3))
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya")
    dd, dk = deltas(src), deltas(out)
    for fused, parts in [
        ("lora_unet_double_blocks_0_img_attn_qkv", [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]),
        ("lora_unet_single_blocks_0_linear1", [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
         + ["single_transformer_blocks.0.proj_mlp"]),
        ("lora_unet_final_layer_adaLN_modulation_1", ["norm_out.linear"]),
    ]:
        want = torch.cat([dd[f"transformer.{p}"] for p in parts])
        if "adaLN" in fused:
            want = torch.cat(want.chunk(2)[::-1])
        torch.testing.assert_close(dk[fused], want, rtol=0, atol=1e-12)


def test_diffusion_pipe_names_convert_to_every_dialect(tmp_path: Path) -> None:
    """diffusion-pipe's layout (Tencent names under `transformer.`, lora_A / lora_B), which ComfyUI and
    diffusers load: read as the original side, so to comfyui it is a rename of the same factors."""
    t = hunyuan_video_lora("diffusion-pipe", seed=11)
    assert "transformer.double_blocks.0.img_attn_qkv.lora_A.weight" in t
    src = write(tmp_path, "dp.safetensors", t)
    comfy = tmp_path / "c.safetensors"
    convert(src, comfy, to="comfyui")
    got = load_file(str(comfy))
    assert len([k for k in got if k.endswith(".lora_down.weight")]) == N_MODULES
    for k, v in t.items():
        stem = k.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        stem = "diffusion_model." + COMFY_EMBEDDERS.get(stem, stem)  # the embedders as ComfyUI names them
        assert torch.equal(got[stem + (".lora_down.weight" if ".lora_A." in k else ".lora_up.weight")], v), k
    dif = tmp_path / "d.safetensors"
    convert(src, dif, to="diffusers")
    qkv = torch.cat([deltas(dif)[f"transformer.transformer_blocks.0.attn.to_{x}"] for x in "qkv"])
    assert torch.equal(qkv, deltas(src)["transformer.double_blocks.0.img_attn_qkv"])


# ---------------------------------------------------------------------------------------------
# the real clients

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["comfyui", "diffusion-pipe"])
def test_diffusers_hunyuan_converter_agrees_with_ours(tmp_path: Path, layout: str) -> None:
    """diffusers' converter (its single-block split assumes hidden 3072) gives our names and deltas, from
    the kohya-suffixed comfyui file and from diffusion-pipe's (`transformer.` + Tencent names, lora_A / B)."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    shapes = hunyuan_video_shapes(hidden=3072, text_dim=32, pooled_dim=32, freq_dim=32, out_dim=64)
    # diffusers 0.42.1 splits the refiner's self_attn_qkv lora_A in three as if it were B (its LoRA
    # converter reuses the checkpoint's rule): a diffusers bug, so that module is left out here
    del shapes["txt_in.individual_token_refiner.blocks.0.self_attn_qkv"]
    t = family_lora("hunyuan-video", shapes, "comfyui", rank=2, alpha=2.0, seed=7)  # alpha = rank: scale 1
    t = {tencent(k): v for k, v in t.items()}  # diffusers reads Tencent's embedder names (we read both)
    if layout == "diffusion-pipe":
        t = family_lora("hunyuan-video", shapes, "diffusion-pipe", rank=2, seed=7)
        t = {"diffusion_model." + k.removeprefix("transformer."): v for k, v in t.items()}  # for a_orig below
    src = write(tmp_path, "c.safetensors", t if layout == "comfyui" else
                {"transformer." + k.removeprefix("diffusion_model."): v for k, v in t.items()})
    # diffusers takes lora_A / lora_B names (no alpha), under either prefix
    prefix = "diffusion_model." if layout == "comfyui" else "transformer."
    theirs_in = {prefix + k.removeprefix("diffusion_model.").replace(".lora_down.", ".lora_A.")
                 .replace(".lora_up.", ".lora_B."): v.clone() for k, v in t.items() if not k.endswith(".alpha")}
    theirs = _convert_hunyuan_video_lora_to_diffusers(theirs_in)
    out = tmp_path / "d.safetensors"
    convert(src, out, to="diffusers")
    ours = read(out)
    names = {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert names == set(ours.modules)
    # and it swaps the halves of final_layer.adaLN_modulation.1's lora_A as well as of its lora_B, which
    # permutes A's rank rows against B's columns (another diffusers bug; ours swaps B's rows only)
    a_orig = t["diffusion_model.final_layer.adaLN_modulation.1." + ("lora_down" if layout == "comfyui" else "lora_A")
               + ".weight"]
    assert torch.equal(theirs["transformer.norm_out.linear.lora_A.weight"], torch.cat(a_orig.chunk(2)[::-1]))
    assert torch.equal(ours.modules["transformer.norm_out.linear"].down.load(), a_orig)
    names.discard("transformer.norm_out.linear")
    g = torch.Generator().manual_seed(0)
    for name in names:
        a, b = theirs[name + ".lora_A.weight"].double(), theirs[name + ".lora_B.weight"].double()
        m = ours.modules[name]
        x = torch.randn(a.shape[1], 2, generator=g, dtype=torch.float64)
        torch.testing.assert_close(m.up.load().double() @ (m.down.load().double() @ x) * m.scale, b @ (a @ x),
                                   rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import HunyuanVideoTransformer3DModel


    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                           patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(2, 2, 4))
    wrapped, changed, ours = fuse_equals_merge(model, hunyuan_video_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
    assert len(wrapped) == len(ours.modules)
    assert changed == len(wrapped)
