"""SD3 / SD3.5 LoRAs in every dialect: detection, exact split / fuse conversion, and diffusers itself.

Files are generated at test time from the family table (fixtures/families.py): two joint blocks, the
first with SD3.5 medium's second attention (`attn2`, 9 modulation chunks), the last with the
pre-only context stream (2 chunks, (shift, scale)), and every embedder. Independent checks: diffusers
has no SD3 LoRA converter, so its single-file *checkpoint* converter
(`convert_sd3_transformer_checkpoint_to_diffusers`) is applied to a SAI-layout base with our kohya
LoRA merged in by the test's own arithmetic; that must equal a tiny SD3Transformer2DModel after
`load_lora_adapter` of our diffusers output + `fuse_lora`, which must equal loratool's merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_tools import deltas, fixture_families, write
from safetensors.torch import load_file, save_file

from loratool.errors import IncompatibleError
from loratool.families import detect
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

sd3_lora = fixture_families.sd3_lora
sd3_shapes = fixture_families.sd3_shapes
flux_lora = fixture_families.flux_lora

H = 16  # hidden width of the generated files




def names_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".lora_")[0].removesuffix(".alpha").removesuffix(".diff_b").removeprefix("base_model.model.")
                   for k in tensors})


# every dialect is confident: pos_embed.proj, attn2 and context_embedder are no other family's modules
@pytest.mark.parametrize("dialect,confident", [("kohya", True), ("comfyui", True), ("diffusers", True),
                                               ("peft", True), ("onetrainer", True)])
def test_detect_family_and_dialect(tmp_path: Path, dialect: str, confident: bool) -> None:
    path = tmp_path / ("p" if dialect == "peft" else "s.safetensors")
    if dialect == "peft":
        convert(write(tmp_path, "k.safetensors", sd3_lora("kohya")), path, to="peft")
    else:
        write(tmp_path, path.name, sd3_lora(dialect))
    fam = inspect_adapter(path).to_dict()["family"]
    assert fam["family"] == "sd3" and fam["dialect"] == dialect and fam["matched"] == fam["total"]
    assert fam["confident"] is confident and fam["evidence"] and not fam["ambiguous"]


def test_flux_and_sd3_kohya_files_keep_their_families() -> None:
    """Both families' kohya files share `final_layer.*` names; the rest decides."""
    assert detect(names_of(flux_lora("kohya"))).describe() == "flux.1, kohya dialect"
    assert detect(names_of(sd3_lora("kohya"))).describe() == "sd3, kohya dialect"
    # single blocks: SD3 has none (HunyuanVideo has, a tie with FLUX.1)
    assert detect(names_of(flux_lora("diffusers"))).tied == ["flux.1", "hunyuan-video"]


def test_diffusers_names_shared_with_flux_are_ambiguous() -> None:
    """An attention-only diffusers file names modules FLUX.1 and SD3 both have: reported, not guessed."""
    names = [f"transformer.transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj")]
    det = detect(names)
    assert det.ambiguous and not det.confident
    assert {"flux.1", "sd3"} <= {f for f, _, n in det.candidates if n == det.matched}


def test_block_indices_past_sd35_large_are_not_sd3() -> None:
    det = detect(["lora_unet_joint_blocks_38_x_block_attn_qkv", "lora_unet_joint_blocks_37_x_block_attn_qkv"])
    assert det.family == "sd3" and det.matched == 1 and not det.confident


def _cat(d: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([d[n] for n in names], dim=0)


def test_kohya_to_diffusers_splits_exactly_and_back_is_bit_identical(tmp_path: Path) -> None:
    src = write(tmp_path, "k.safetensors", sd3_lora("kohya", biases=True))
    dif = tmp_path / "d.safetensors"
    convert(src, dif, to="diffusers")
    dk, dd = deltas(src), deltas(dif)
    t = "transformer.transformer_blocks"
    assert torch.equal(_cat(dd, [f"{t}.0.attn.to_{x}" for x in "qkv"]), dk["lora_unet_joint_blocks_0_x_block_attn_qkv"])
    assert torch.equal(_cat(dd, [f"{t}.0.attn2.to_{x}" for x in "qkv"]),
                       dk["lora_unet_joint_blocks_0_x_block_attn2_qkv"])
    assert torch.equal(_cat(dd, [f"{t}.1.attn.add_{x}_proj" for x in "qkv"]),
                       dk["lora_unet_joint_blocks_1_context_block_attn_qkv"])
    # 6 chunks keep their order; the pre-only block's 2 and the final layer's are swapped
    assert torch.equal(dd[f"{t}.0.norm1_context.linear"],
                       dk["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1"])
    last = dk["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"]
    assert torch.equal(dd[f"{t}.1.norm1_context.linear"], torch.cat([last[H:], last[:H]]))
    fin = dk["lora_unet_final_layer_adaLN_modulation_1"]
    assert torch.equal(dd["transformer.norm_out.linear"], torch.cat([fin[H:], fin[:H]]))
    assert torch.equal(dd["transformer.pos_embed.proj"], dk["lora_unet_x_embedder_proj"])  # the patch conv
    # diffusers -> comfyui (the family named) -> kohya: the original tensors, bit for bit
    comfy = tmp_path / "c.safetensors"
    convert(dif, comfy, to="comfyui", family="sd3")
    back = tmp_path / "k2.safetensors"
    convert(comfy, back, to="kohya")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_independent_split_modules_fuse_block_diagonally(tmp_path: Path) -> None:
    src = write(tmp_path, "d.safetensors", sd3_lora("diffusers", seed=3))
    out = tmp_path / "k.safetensors"
    report = convert(src, out, to="kohya", family="sd3")
    rows = {m.new_name: m for m in report.modules}
    qkv_name = "lora_unet_joint_blocks_0_context_block_attn_qkv"
    assert rows[qkv_name].rank == 12 and rows[qkv_name].from_algo == "fuse-block"
    dd, dk = deltas(src), deltas(out)
    want = _cat(dd, [f"transformer.transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"])
    torch.testing.assert_close(dk[qkv_name], want, rtol=0, atol=1e-12)
    # one module's rows reordered: its own A, B rows swapped back
    last = dd["transformer.transformer_blocks.1.norm1_context.linear"]
    torch.testing.assert_close(dk["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"],
                               torch.cat([last[H:], last[:H]]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    src = write(tmp_path, "k.safetensors", sd3_lora("kohya", seed=5))
    mid = tmp_path / ("mid" if target == "peft" else "mid.safetensors")
    convert(src, mid, to=target)
    back = tmp_path / "back.safetensors"
    convert(mid, back, to="kohya", family="sd3")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_context_modulation_of_an_unknown_shape_is_refused(tmp_path: Path) -> None:
    """4 chunks is neither a full block's 6 nor the pre-only block's 2: never guessed."""
    t = sd3_lora("kohya", layers=1, dual=(), embedders=False)
    k = "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1"
    t[k + ".lora_up.weight"] = torch.ones(4 * H, 4)
    with pytest.raises(IncompatibleError, match=r"adaLN_modulation_1 \(64 x 16, not a shape the table lists"):
        convert(write(tmp_path, "k.safetensors", t), tmp_path / "d.safetensors", to="diffusers", family="sd3")


def test_full_diff_of_the_swapped_modulation_is_refused_not_renamed(tmp_path: Path) -> None:
    """A `.diff` of the pre-only block's (scale, shift) rows would need its rows swapped: refused, where
    the name alone (a 6-chunk block's rename) would have renamed it."""
    k = "lora_transformer_transformer_blocks_1_norm1_context_linear"
    t = {n: v for n, v in sd3_lora("onetrainer", layers=2, dual=(), embedders=False).items() if not n.startswith(k)}
    t[k + ".diff"] = torch.ones(2 * H, H)
    with pytest.raises(IncompatibleError, match="LyCORIS full diff of a module that sd3 fuses"):
        convert(write(tmp_path, "o.safetensors", t), tmp_path / "k.safetensors", to="kohya", family="sd3")


def test_diffusers_side_to_kohya_by_detection(tmp_path: Path) -> None:
    """A whole diffusers-side file has modules only sd3 has: detected, converted as with --family."""
    src = write(tmp_path, "d.safetensors", sd3_lora("diffusers"))
    convert(src, tmp_path / "k.safetensors", to="kohya")
    convert(src, tmp_path / "k2.safetensors", to="kohya", family="sd3")
    a, b = load_file(str(tmp_path / "k.safetensors")), load_file(str(tmp_path / "k2.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# diffusers itself

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=12, caption_projection_dim=H, pooled_projection_dim=10, out_channels=4,
              pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def _sai_base(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random SAI-layout checkpoint of the CONFIG model: every weight, bias and norm the converter reads."""
    sd: dict[str, torch.Tensor] = {}
    for path, shape in sd3_shapes(H, 2, dual=(0,)).items():
        sd[path + ".weight"] = torch.randn(*shape, generator=gen) * 0.1
        sd[path + ".bias"] = torch.randn(shape[0], generator=gen) * 0.1
    for i in range(2):
        for stream, attn in (("x_block", "attn"), ("x_block", "attn2"), ("context_block", "attn")):
            if attn == "attn2" and i != 0:
                continue
            for n in ("ln_q", "ln_k"):
                sd[f"joint_blocks.{i}.{stream}.{attn}.{n}.weight"] = 1 + torch.randn(8, generator=gen) * 0.1
    sd["pos_embed"] = torch.randn(1, 64, H, generator=gen)  # pos_embed_max_size²
    return sd


@pytest.mark.slow
def test_tables_agree_with_diffusers_checkpoint_converter_and_fuse_lora(tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    gen = torch.Generator().manual_seed(0)
    sai = _sai_base(gen)
    base = convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))
    model = SD3Transformer2DModel(**CONFIG)
    targets = {n for n, mod in model.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
    model.load_state_dict(base, strict=True)  # the fixture's shapes are the model's, key for key
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(state, str(base_dir / "diffusion_pytorch_model.safetensors"))
    (base_dir / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))

    kohya = sd3_lora("kohya", hidden=H, rank=4, alpha=2.0, seed=9)
    src = write(tmp_path, "k.safetensors", kohya)
    # the reference: the kohya delta added to the SAI weights by hand, then diffusers' own converter
    merged_sai = dict(sai)
    for path, shape in sd3_shapes(H, 2, dual=(0,)).items():
        k = "lora_unet_" + path.replace(".", "_")
        down, up = kohya[k + ".lora_down.weight"].double(), kohya[k + ".lora_up.weight"].double()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (float(kohya[k + ".alpha"]) / down.shape[0])
        merged_sai[path + ".weight"] = (sai[path + ".weight"].double() + delta).float()
    want = convert_sd3_transformer_checkpoint_to_diffusers(dict(merged_sai))

    out_dir = tmp_path / "lora"
    out_dir.mkdir()
    convert(src, out_dir / "pytorch_lora_weights.safetensors", to="diffusers")
    model.load_lora_adapter(str(out_dir), weight_name="pytorch_lora_weights.safetensors", prefix="transformer",
                            adapter_name="ours")
    wrapped = {n.removesuffix(".lora_A.ours") for n, _ in model.named_modules() if n.endswith(".lora_A.ours")}
    assert len(wrapped) == len(read(out_dir / "pytorch_lora_weights.safetensors").modules) == 37
    assert wrapped == targets  # the table covers every linear and the patch conv of the model
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    fused = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(fused[k], v, rtol=1e-6, atol=1e-6, msg=k)

    from loratool.ops.merge import merge

    # the kohya file merged into the SAI single-file layout (ComfyUI's key prefix) by loratool
    sai_file = tmp_path / "sd3_sai.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in sai.items()}, str(sai_file))
    merge(sai_file, [src], tmp_path / "merged_sai.safetensors")
    ours_sai = load_file(str(tmp_path / "merged_sai.safetensors"))
    for k, v in merged_sai.items():
        torch.testing.assert_close(ours_sai["model.diffusion_model." + k], v, rtol=1e-6, atol=1e-6, msg=k)

    merged = tmp_path / "merged"
    merge(base_dir, [out_dir / "pytorch_lora_weights.safetensors"], merged)
    ours = load_file(str(merged / "diffusion_pytorch_model.safetensors"))
    changed = 0
    for k, v in ours.items():
        torch.testing.assert_close(fused[k], v, rtol=1e-6, atol=1e-6)
        changed += not torch.equal(v, state[k])
    assert changed == len(wrapped)
