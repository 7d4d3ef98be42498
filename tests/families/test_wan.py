"""Wan 2.1 / 2.2 LoRAs in every dialect: detection, renames, LyCORIS diffs, and the real clients.

Files are generated at test time from the family table (fixtures/families.py). Independent checks:
diffusers' own converters (`_convert_non_diffusers_wan_lora_to_diffusers` for `diffusion_model.`
files, `_convert_musubi_wan_lora_to_diffusers` for musubi-tuner's `lora_unet_` files) on our files,
and `load_lora_adapter` + `fuse_lora` on a tiny WanTransformer3DModel built here, compared with
loratool's merge into the same base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_tools import deltas, fixture_families, fuse_equals_merge, write
from safetensors.torch import load_file, save_file

from loratool.errors import IncompatibleError
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

wan_lora = fixture_families.wan_lora
wan_shapes = fixture_families.wan_shapes
family_lora = fixture_families.family_lora




@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "peft", "onetrainer"])
def test_detect_family_and_dialect(tmp_path: Path, dialect: str) -> None:
    t = wan_lora(dialect, i2v=True)
    if dialect == "peft":
        path = tmp_path / "p"
        path.mkdir()
        save_file(t, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                              "target_modules": ["to_q"]}))
    else:
        path = write(tmp_path, "w.safetensors", t)
    fam = inspect_adapter(path).to_dict()["family"]
    assert fam["family"] == "wan" and fam["dialect"] == dialect and fam["matched"] == fam["total"] == 20
    assert fam["evidence"] and not fam["ambiguous"]


def test_musubi_names_are_the_kohya_dialect() -> None:
    """musubi-tuner's Wan LoRA module names (lora_unet_ + the Wan-AI path with underscores)."""
    from loratool.families import detect

    det = detect(["lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_39_ffn_2", "lora_unet_blocks_0_cross_attn_k_img"])
    assert (det.family, det.dialect, det.matched, det.total) == ("wan", "kohya", 3, 3)
    assert detect(["lora_unet_blocks_40_self_attn_q"]).family is None  # 40 blocks at most


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    src = write(tmp_path, "k.safetensors", wan_lora("kohya", i2v=True, biases=True, seed=5))
    mid = tmp_path / ("mid" if target == "peft" else "mid.safetensors")
    convert(src, mid, to=target)
    back = tmp_path / "back.safetensors"
    convert(mid, back, to="kohya", family="wan")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_kohya_diffusers_comfyui_kohya_is_the_identity(tmp_path: Path) -> None:
    src = write(tmp_path, "k.safetensors", wan_lora("kohya", i2v=True, biases=True))
    dif, comfy, back = tmp_path / "d.safetensors", tmp_path / "c.safetensors", tmp_path / "k2.safetensors"
    convert(src, dif, to="diffusers")
    dd, dk = deltas(dif), deltas(src)
    # renames only: each diffusers module's delta is its Wan-AI module's
    assert torch.equal(dd["transformer.blocks.0.attn2.add_k_proj"], dk["lora_unet_blocks_0_cross_attn_k_img"])
    assert torch.equal(dd["transformer.condition_embedder.time_proj"], dk["lora_unet_time_projection_1"])
    assert torch.equal(dd["transformer.proj_out"], dk["lora_unet_head_head"])
    convert(dif, comfy, to="comfyui", family="wan")
    assert "diffusion_model.blocks.0.ffn.0.lora_down.weight" in load_file(str(comfy))
    convert(comfy, back, to="kohya")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lycoris_diffs_move_with_the_family_names(tmp_path: Path) -> None:
    """`.diff` / `.diff_b` of norms and biases (as Wan LoRAs ship them) are renamed, not dropped."""
    t = wan_lora("comfyui")
    g = torch.Generator().manual_seed(1)
    t["diffusion_model.blocks.0.norm3.diff"] = torch.randn(16, generator=g)
    t["diffusion_model.blocks.0.norm3.diff_b"] = torch.randn(16, generator=g)
    t["diffusion_model.blocks.0.self_attn.norm_q.diff"] = torch.randn(16, generator=g)
    t["diffusion_model.blocks.0.self_attn.o.diff_b"] = torch.randn(16, generator=g)  # a bias alone
    src = write(tmp_path, "c.safetensors", t)
    fam = inspect_adapter(src).to_dict()["family"]
    assert fam["family"] == "wan" and fam["matched"] == fam["total"]
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya")
    got = load_file(str(out))
    for key, new in [("diffusion_model.blocks.0.norm3.diff", "lora_unet_blocks_0_norm3.diff"),
                     ("diffusion_model.blocks.0.norm3.diff_b", "lora_unet_blocks_0_norm3.diff_b"),
                     ("diffusion_model.blocks.0.self_attn.norm_q.diff", "lora_unet_blocks_0_self_attn_norm_q.diff")]:
        assert torch.equal(got[new], t[key]), new
    # the LoRA module with a bias-only diff keeps both
    assert torch.equal(got["lora_unet_blocks_0_self_attn_o.diff_b"], t["diffusion_model.blocks.0.self_attn.o.diff_b"])
    assert torch.equal(got["lora_unet_blocks_0_self_attn_o.lora_up.weight"],
                       t["diffusion_model.blocks.0.self_attn.o.lora_up.weight"])
    # diffusers files cannot hold a norm diff: refused, never dropped
    with pytest.raises(IncompatibleError, match="norm3"):
        convert(src, tmp_path / "d.safetensors", to="diffusers")


def test_diffusers_side_to_kohya_names_come_from_the_table(tmp_path: Path) -> None:
    src = write(tmp_path, "d.safetensors", wan_lora("diffusers", i2v=True))
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya", family="wan")
    keys = load_file(str(out))
    assert "lora_unet_blocks_0_cross_attn_v_img.lora_down.weight" in keys
    assert "lora_unet_img_emb_proj_3.lora_up.weight" in keys
    assert not [k for k in keys if "attn1" in k or "condition_embedder" in k]


# ---------------------------------------------------------------------------------------------
# the real clients

diffusers = pytest.importorskip("diffusers")


def _factor_deltas(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """diffusers keys (scale folded into the factors) -> (ΔW, bias delta)."""
    names = {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}
    return {n: (sd[n + ".lora_B.weight"].double() @ sd[n + ".lora_A.weight"].double(), sd.get(n + ".lora_B.bias"))
            for n in names}


def _our_deltas(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    a = read(path)
    # the bias delta as applied: lora_B.bias is scaled like the weight delta (PEFT), a .diff_b is not
    return {n: (m.up.load().double() @ m.down.load().double() * m.scale,
                None if m.bias is None else m.bias.load().double() * m.bias_scale) for n, m in a.modules.items()}


def _assert_same(theirs: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                 ours: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    assert set(theirs) == set(ours)
    for name, (d, b) in theirs.items():
        torch.testing.assert_close(ours[name][0], d, rtol=1e-6, atol=1e-9)
        if b is None:
            assert ours[name][1] is None, name
        else:
            torch.testing.assert_close(ours[name][1], b.double(), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_diffusers_wan_converter_agrees_with_ours(tmp_path: Path) -> None:
    """diffusers' converter for `diffusion_model.` Wan files gives our `--to diffusers` names and deltas."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    t = wan_lora("comfyui", layers=2, i2v=True, biases=True, alpha=8.0, seed=7)
    # diffusers reads alpha in blocks only (an alpha elsewhere is an error there): none outside, alpha = rank
    t = {k: v for k, v in t.items() if not k.endswith(".alpha") or k.startswith("diffusion_model.blocks.")}
    src = write(tmp_path, "c.safetensors", t)
    theirs = _convert_non_diffusers_wan_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    out = tmp_path / "d.safetensors"
    convert(src, out, to="diffusers")
    _assert_same(_factor_deltas(theirs), _our_deltas(out))


@pytest.mark.slow
def test_diffusers_musubi_converter_agrees_with_ours(tmp_path: Path) -> None:
    """musubi-tuner's kohya-style names, read by diffusers' musubi converter and by us."""
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    blocks = {k: v for k, v in wan_shapes(layers=2, i2v=True).items() if k.startswith("blocks.")}
    t = family_lora("wan", blocks, "kohya", alpha=1.0, seed=8)
    src = write(tmp_path, "k.safetensors", t)
    theirs = _convert_musubi_wan_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    out = tmp_path / "d.safetensors"
    convert(src, out, to="diffusers")
    _assert_same(_factor_deltas(theirs), _our_deltas(out))


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel


    torch.manual_seed(0)
    # Wan 2.1 I2V-shaped, tiny: 1 block, dim 16 (2 heads of 8), ffn 32, CLIP image dim 12
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=12,
                                  added_kv_proj_dim=16, rope_max_seq_len=32)
    tensors = wan_lora("kohya", i2v=True, biases=True, rank=4, alpha=2.0, seed=9)
    wrapped, changed, ours = fuse_equals_merge(model, tensors, tmp_path)
    assert len(wrapped) == len(ours.modules) == 20  # every module placed: no unexpected / missing keys
    assert changed == 2 * len(wrapped)  # every weight and (diff_b) every bias


def _lightx2v(tmp_path: Path, layers: int = 2) -> tuple[Path, dict[str, torch.Tensor]]:
    """A lightx2v-style Wan distill LoRA: ComfyUI names plus `diffusion_model.blocks.N.diff_m`, the
    whole diff of each block's (1, 6, dim) `modulation` parameter (Comfy-Org/ComfyUI issue 8922 lists
    the keys of lightx2v/Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v's loras)."""
    t = wan_lora("comfyui", layers=layers)
    g = torch.Generator().manual_seed(4)
    for i in range(layers):
        t[f"diffusion_model.blocks.{i}.diff_m"] = torch.randn(1, 6, 16, generator=g)
    return write(tmp_path, "lightx2v.safetensors", t), t


def test_diff_m_is_read_as_the_whole_diff_of_the_modulation(tmp_path: Path) -> None:
    src, _ = _lightx2v(tmp_path)
    a = read(src)
    assert not a.unsupported
    m = a.lycoris["diffusion_model.blocks.1.modulation"]
    assert (m.algo, m.parameter, m.delta_shape) == ("full", True, (1, 6, 16))
    assert m.keys == ("diffusion_model.blocks.1.diff_m",)
    fam = inspect_adapter(src).to_dict()["family"]
    assert fam["family"] == "wan" and fam["matched"] == fam["total"]


@pytest.mark.parametrize("layout", ["wan-ai", "comfyui", "diffusers"])
def test_diff_m_merges_exactly(tmp_path: Path, layout: str) -> None:
    """W' = W + diff for each block's modulation (numpy, float64 reference), the LoRA modules as
    usual; in a diffusers base the modulation is `blocks.N.scale_shift_table`."""
    import numpy as np

    from loratool.families import get as get_family
    from loratool.ops.merge import merge

    src, t = _lightx2v(tmp_path)
    fam = get_family("wan")
    shapes = wan_shapes(16, 32, 2)
    g = torch.Generator().manual_seed(9)
    prefix = "model.diffusion_model." if layout == "comfyui" else ""

    def diffusers_path(p: str) -> str:
        ident = fam.identify("diffusion_model." + p, "comfyui")
        assert ident is not None
        rel, i, _ = ident
        return rel.split[0][0].replace("{i}", str(i))

    name = {p: (diffusers_path(p) if layout == "diffusers" else p) for p in shapes}
    base = {f"{prefix}{name[p]}.weight": torch.randn(s, generator=g) for p, s in shapes.items()}
    mod = {i: f"{prefix}blocks.{i}.{'scale_shift_table' if layout == 'diffusers' else 'modulation'}" for i in range(2)}
    for i in range(2):
        base[mod[i]] = torch.randn(1, 6, 16, generator=g)
    base_path = write(tmp_path, "base.safetensors", base)
    out = tmp_path / "merged.safetensors"
    merge(base_path, [src], out)
    got = load_file(str(out))
    for i in range(2):
        want = base[mod[i]].double().numpy() + t[f"diffusion_model.blocks.{i}.diff_m"].double().numpy()
        np.testing.assert_allclose(got[mod[i]].double().numpy(), want, rtol=0, atol=1e-6)
    q = "blocks.0.self_attn.q"
    up, down = (t[f"diffusion_model.{q}.lora_{s}.weight"].double().numpy() for s in ("up", "down"))
    np.testing.assert_allclose(got[f"{prefix}{name[q]}.weight"].double().numpy(),
                               base[f"{prefix}{name[q]}.weight"].double().numpy() + 2.0 / 4 * up @ down, atol=1e-6)


def test_diff_m_converts_where_the_target_holds_it(tmp_path: Path) -> None:
    """--to comfyui writes `<block>.modulation.diff`, a key ComfyUI's key map loads (its generic rule for
    parameters not called weight; `load_lora` applies `.diff` as a whole diff), and reads back the same;
    kohya, diffusers and peft cannot address the parameter: refused by name, never dropped."""
    from comfy_keymap import not_loaded

    src, t = _lightx2v(tmp_path)
    out = tmp_path / "c.safetensors"
    convert(src, out, to="comfyui")
    got = load_file(str(out))
    for i in range(2):
        assert torch.equal(got[f"diffusion_model.blocks.{i}.modulation.diff"], t[f"diffusion_model.blocks.{i}.diff_m"])
    base_keys = [f"{p}.weight" for p in wan_shapes(16, 32, 2)] + [f"blocks.{i}.modulation" for i in range(2)]
    assert not_loaded("wan", got, base_keys) == []
    assert not_loaded("wan", t, base_keys) == ["diffusion_model.blocks.0.diff_m", "diffusion_model.blocks.1.diff_m"]
    again = read(out).lycoris["diffusion_model.blocks.0.modulation"]
    assert again.parameter and torch.equal(again.tensors["diff"].load(), t["diffusion_model.blocks.0.diff_m"])
    for target, name in [("kohya", "k.safetensors"), ("diffusers", "d.safetensors"), ("peft", "p")]:
        with pytest.raises(IncompatibleError, match=r"blocks\.0\.(diff_m|modulation)"):
            convert(src, tmp_path / name, to=target)
        assert not (tmp_path / name).exists()
