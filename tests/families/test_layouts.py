"""merge (and verify) across a family's base layouts (issue #15 item 4), on tiny FLUX.1 models.

A diffusers-dialect LoRA (split to_q / to_k / to_v) into a BFL single-file base (fused qkv, bare or
under ComfyUI's `model.diffusion_model.`), and a kohya LoRA (fused) into a diffusers-layout base
(split). References: numpy, with the BFL row layout written out in this file (q, k, v rows of
`img_attn.qkv`; q, k, v, mlp rows of `linear1`; `final_layer.adaLN_modulation.1` = (shift, scale)
where diffusers' `norm_out.linear` stores (scale, shift)); and merging the adapter after
`convert --to` the base's dialect. The real-client check (slow): diffusers' own `fuse_lora` on a
tiny FluxTransformer2DModel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from family_tools import fixture_families
from safetensors.torch import load_file, save_file

from loratool.errors import IncompatibleError
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.merge import merge
from loratool.ops.verify import verify

flux_lora, flux_shapes = fixture_families.flux_lora, fixture_families.flux_shapes

H, MLP = 16, 64  # hidden, MLP width (flux_shapes' defaults: mlp_ratio 4)


def bfl_to_diffusers(h: int = H) -> dict[str, list[tuple[str, int, int]]]:
    """BFL module -> [(diffusers module, start row, stop row)], written out from the BFL layout."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for s, attn in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        out[f"double_blocks.0.{s}_attn.qkv"] = [(f"transformer_blocks.0.attn.{n}", j * h, (j + 1) * h)
                                                for j, n in enumerate(attn)]
    plain = {"img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
             "img_mod.lin": "norm1.linear", "txt_attn.proj": "attn.to_add_out", "txt_mlp.0": "ff_context.net.0.proj",
             "txt_mlp.2": "ff_context.net.2", "txt_mod.lin": "norm1_context.linear"}
    for o, d in plain.items():
        out[f"double_blocks.0.{o}"] = [(f"transformer_blocks.0.{d}", 0, -1)]
    out["single_blocks.0.linear1"] = [("single_transformer_blocks.0.attn.to_q", 0, h),
                                      ("single_transformer_blocks.0.attn.to_k", h, 2 * h),
                                      ("single_transformer_blocks.0.attn.to_v", 2 * h, 3 * h),
                                      ("single_transformer_blocks.0.proj_mlp", 3 * h, 3 * h + MLP)]
    out["single_blocks.0.linear2"] = [("single_transformer_blocks.0.proj_out", 0, -1)]
    out["single_blocks.0.modulation.lin"] = [("single_transformer_blocks.0.norm.linear", 0, -1)]
    return out


def _rng_tensor(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * 0.1


def bfl_base(path: Path, prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny FLUX.1 base in the BFL layout (weights, biases and a norm), saved as one file."""
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for name, (o, i) in flux_shapes(H, 1, 1).items():
        t[f"{prefix}{name}.weight"] = _rng_tensor(gen, (o, i))
        t[f"{prefix}{name}.bias"] = _rng_tensor(gen, (o,))
    t[f"{prefix}double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(8)
    t[f"{prefix}final_layer.adaLN_modulation.1.weight"] = _rng_tensor(gen, (2 * H, H))
    save_file(t, str(path))
    return t


def diffusers_base(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same model in the diffusers layout (split q / k / v, proj_mlp), from its own random numbers."""
    gen = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    shapes = flux_shapes(H, 1, 1)
    for bfl, parts in bfl_to_diffusers().items():
        o, i = shapes[bfl]
        for name, a, b in parts:
            rows = (b if b >= 0 else o) - a
            t[f"{name}.weight"] = _rng_tensor(gen, (rows, i))
            t[f"{name}.bias"] = _rng_tensor(gen, (rows,))
    t["norm_out.linear.weight"] = _rng_tensor(gen, (2 * H, H))
    t["transformer_blocks.0.attn.norm_q.weight"] = torch.ones(8)
    path.mkdir()
    save_file(t, str(path / "diffusion_pytorch_model.safetensors"))
    (path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    return t


def lora_deltas(path: Path) -> dict[str, np.ndarray]:
    """Module name -> scale · B @ A in float64 numpy, from the file's tensors (read here, not by loratool)."""
    sd = load_file(str(path))
    out = {}
    for k in sd:
        if k.endswith((".lora_A.weight", ".lora_down.weight")):
            stem = k.rsplit(".lora_", 1)[0]
            a = sd[k].double().numpy()
            b = sd[stem + (".lora_B.weight" if k.endswith("A.weight") else ".lora_up.weight")].double().numpy()
            alpha = float(sd[stem + ".alpha"]) if stem + ".alpha" in sd else a.shape[0]
            out[stem] = alpha / a.shape[0] * (b @ a)
    return out


def write_lora(tmp_path: Path, dialect: str, *, seed: int = 1, final: bool = True) -> Path:
    t = flux_lora(dialect, hidden=H, double=1, single=1, rank=4, alpha=2.0, seed=seed)
    if final:  # the final layer's modulation: (shift, scale) in BFL, (scale, shift) in diffusers
        gen = torch.Generator().manual_seed(seed + 100)
        a, b = torch.randn(4, H, generator=gen) * 0.3, torch.randn(2 * H, 4, generator=gen) * 0.3
        if dialect == "diffusers":
            t["transformer.norm_out.linear.lora_A.weight"], t["transformer.norm_out.linear.lora_B.weight"] = a, b
        else:
            name = "lora_unet_final_layer_adaLN_modulation_1"
            t[name + ".lora_down.weight"], t[name + ".lora_up.weight"] = a, b
            t[name + ".alpha"] = torch.tensor(2.0)
    path = tmp_path / f"{dialect}.safetensors"
    save_file(t, str(path))
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_diffusers_lora_into_a_bfl_base(tmp_path, prefix):
    base = tmp_path / "flux1.safetensors"
    tensors = bfl_base(base, prefix)
    lora = write_lora(tmp_path, "diffusers")
    out = tmp_path / "merged.safetensors"
    report = merge(base, [lora], out)
    d = lora_deltas(lora)
    want = {k: v.double().numpy().copy() for k, v in tensors.items()}
    for bfl, parts in bfl_to_diffusers().items():
        for name, a, b in parts:
            rows = slice(a, b if b >= 0 else None)
            want[f"{prefix}{bfl}.weight"][rows] += d[f"transformer.{name}"]
    scale_shift = d["transformer.norm_out.linear"]  # (scale, shift) -> BFL (shift, scale)
    want[f"{prefix}final_layer.adaLN_modulation.1.weight"] += np.concatenate([scale_shift[H:], scale_shift[:H]])
    got = load_file(str(out))
    assert sorted(got) == sorted(tensors)
    for k, v in got.items():
        np.testing.assert_allclose(v.double().numpy(), want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    changed = {k for k in got if not torch.equal(got[k], tensors[k])}
    assert changed == {f"{prefix}{b}.weight" for b in bfl_to_diffusers()} | {
        f"{prefix}final_layer.adaLN_modulation.1.weight"}
    assert report.merged == len(changed)
    # 3 + 3 + 4 q/k/v/mlp parts and norm_out's (scale, shift) crossed; the rest are renames
    assert report.layouts == ["FLUX.1 (dev, schnell) diffusers-dialect adapter mapped onto the flux.1 original "
                              "(BFL / ComfyUI single-file) layout" + (f" under '{prefix}'" if prefix else "")
                              + " (11 fused/split modules)"]
    # the same as converting the adapter to the base's dialect first
    conv = tmp_path / "as_kohya.safetensors"
    convert(lora, conv, to="comfyui" if prefix else "kohya", family="flux.1")
    merge(base, [conv], tmp_path / "via_convert.safetensors")
    via = load_file(str(tmp_path / "via_convert.safetensors"))
    for k in got:
        torch.testing.assert_close(got[k], via[k], rtol=1e-6, atol=1e-6)
    # and verify accepts it, names every tensor, and catches the unmerged base
    rep = verify(out, base, [lora])
    assert rep.ok, [t.to_dict() for t in rep.findings]
    assert {t.key for t in rep.tensors if t.verdict == "merged"} == changed
    bad = verify(base, base, [lora])
    assert {t.key for t in bad.findings} == changed and {t.verdict for t in bad.findings} == {"not merged"}


def test_kohya_lora_into_a_diffusers_base(tmp_path):
    base = tmp_path / "transformer"
    tensors = diffusers_base(base)
    lora = write_lora(tmp_path, "kohya")
    out = tmp_path / "merged"
    merge(base, [lora], out)
    d = lora_deltas(lora)
    want = {k: v.double().numpy().copy() for k, v in tensors.items()}
    for bfl, parts in bfl_to_diffusers().items():
        delta = d["lora_unet_" + bfl.replace(".", "_")]
        for name, a, b in parts:
            want[f"{name}.weight"] += delta[a:b if b >= 0 else None]
    shift_scale = d["lora_unet_final_layer_adaLN_modulation_1"]
    want["norm_out.linear.weight"] += np.concatenate([shift_scale[H:], shift_scale[:H]])
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    for k, v in got.items():
        np.testing.assert_allclose(v.double().numpy(), want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert not any(k.endswith(".bias") and not torch.equal(got[k], tensors[k]) for k in got)
    # converting first (B split by rows, A shared) gives the very same bits
    conv = tmp_path / "as_diffusers.safetensors"
    convert(lora, conv, to="diffusers")
    merge(base, [conv], tmp_path / "via")
    via = load_file(str(tmp_path / "via" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(got[k], via[k]) for k in got)
    assert verify(out, base, [lora]).ok
    half = tmp_path / "half"
    merge(base, [lora], half, weights=[0.5])
    rep = verify(half, base, [lora])
    assert not rep.ok and {t.verdict for t in rep.findings} == {"wrong weight"}


def test_one_split_part_changes_only_its_rows(tmp_path):
    """Only to_k trained: the fused qkv gets it in rows h..2h, nothing else moves."""
    base = tmp_path / "flux1.safetensors"
    tensors = bfl_base(base)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, H, generator=gen), torch.randn(H, 4, generator=gen)
    lora = tmp_path / "k.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b}, str(lora))
    out = tmp_path / "m.safetensors"
    merge(base, [lora], out)
    got = load_file(str(out))["double_blocks.0.img_attn.qkv.weight"]
    want = tensors["double_blocks.0.img_attn.qkv.weight"].double().numpy().copy()
    want[H:2 * H] += b.double().numpy() @ a.double().numpy()
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[:H], tensors["double_blocks.0.img_attn.qkv.weight"][:H])
    assert torch.equal(got[2 * H:], tensors["double_blocks.0.img_attn.qkv.weight"][2 * H:])
    assert verify(out, base, [lora]).ok


def test_dora_is_not_split_across_layouts(tmp_path):
    base = tmp_path / "flux1.safetensors"
    bfl_base(base)
    lora = tmp_path / "dora.safetensors"
    gen = torch.Generator().manual_seed(4)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, H, generator=gen),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, 4, generator=gen),
               "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(H)}, str(lora))
    assert read(lora).modules["transformer.transformer_blocks.0.attn.to_q"].magnitude is not None
    with pytest.raises(IncompatibleError, match=r"is a DoRA module; the flux\.1 original"):
        merge(base, [lora], tmp_path / "m.safetensors")


def test_modules_that_fit_no_layout_are_still_unmatched(tmp_path):
    base = tmp_path / "flux1.safetensors"
    bfl_base(base)
    t = flux_lora("diffusers", hidden=H, double=1, single=1, rank=4, seed=1)
    t["transformer.not_a_flux_module.lora_A.weight"] = torch.zeros(4, H)
    t["transformer.not_a_flux_module.lora_B.weight"] = torch.zeros(H, 4)
    lora = tmp_path / "x.safetensors"
    save_file(t, str(lora))
    with pytest.raises(IncompatibleError, match="1 unmatched module"):
        merge(base, [lora], tmp_path / "m.safetensors")
    report = merge(base, [lora], tmp_path / "m.safetensors", allow_unmatched=True)
    assert report.unmatched == ["transformer.not_a_flux_module"]


@pytest.mark.slow
def test_diffusers_fuse_lora_agrees_in_both_layouts(tmp_path):
    """diffusers loads our converted LoRA and fuses it into its model; merging the kohya LoRA straight
    into the diffusers base, and the diffusers LoRA into a BFL file of the same weights, give the same."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    dbase = tmp_path / "transformer"
    dbase.mkdir()
    save_file(state, str(dbase / "diffusion_pytorch_model.safetensors"))
    (dbase / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    # the same weights in the BFL layout: q, k, v (and proj_mlp) rows stacked, as the single file holds them
    bfl: dict[str, torch.Tensor] = {}
    for fused, parts in bfl_to_diffusers().items():
        for suffix in ("weight", "bias"):
            names = [f"{n}.{suffix}" for n, _, _ in parts]
            if all(n in state for n in names):
                bfl[f"{fused}.{suffix}"] = torch.cat([state[n] for n in names])
    bbase = tmp_path / "flux1.safetensors"
    save_file(bfl, str(bbase))
    kohya = write_lora(tmp_path, "kohya", final=False)
    dlora = tmp_path / "lora"
    dlora.mkdir()
    convert(kohya, dlora / "pytorch_lora_weights.safetensors", to="diffusers")
    model.load_lora_adapter(str(dlora), weight_name="pytorch_lora_weights.safetensors", prefix="transformer",
                            adapter_name="ours")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    fused = model.state_dict()
    # kohya (fused) into the diffusers base
    merge(dbase, [kohya], tmp_path / "m_d")
    ours = load_file(str(tmp_path / "m_d" / "diffusion_pytorch_model.safetensors"))
    for k, v in ours.items():
        torch.testing.assert_close(fused[k], v, rtol=1e-6, atol=1e-6)
    # diffusers (split) into the BFL base: each part's rows of the fused weights
    merge(bbase, [dlora / "pytorch_lora_weights.safetensors"], tmp_path / "m_b.safetensors")
    merged_bfl = load_file(str(tmp_path / "m_b.safetensors"))
    for fused_name, parts in bfl_to_diffusers().items():
        rows = merged_bfl[f"{fused_name}.weight"]
        for name, a, b in parts:
            torch.testing.assert_close(rows[a:b if b >= 0 else None], fused[f"{name}.weight"], rtol=1e-6, atol=1e-6)
    assert verify(tmp_path / "m_b.safetensors", bbase, [dlora / "pytorch_lora_weights.safetensors"]).ok


FAMILY_SHAPES = {
    "flux.1": lambda: fixture_families.flux_shapes(16, 1, 1),
    "flux.2": lambda: fixture_families.flux2_shapes(),
    "chroma": lambda: fixture_families.chroma_shapes(),
    "z-image": lambda: fixture_families.z_image_shapes(),
    "hidream": lambda: fixture_families.hidream_shapes(),
    "sd3": lambda: fixture_families.sd3_shapes(16, 2, dual=(0,)),
    "wan": lambda: fixture_families.wan_shapes(),
    "qwen-image": lambda: fixture_families.qwen_image_shapes(16, 2),
    "hunyuan-video": lambda: fixture_families.hunyuan_video_shapes(),
    "ltx-video": lambda: fixture_families.ltx_shapes(),
    "kandinsky-5": lambda: fixture_families.kandinsky5_shapes(),
    "qwen-image-2": lambda: fixture_families.qwen_image2_shapes(),
    "ltx-2": lambda: fixture_families.ltx2_shapes(),
    "hunyuan-video-1.5": lambda: fixture_families.hunyuan_video15_shapes(),
    "sd1": lambda: fixture_families.unet_shapes("sd1"),
    "sdxl": lambda: fixture_families.unet_shapes("sdxl", (8, 16, 32), depth=(1, 2, 2)),  # blocks 2-9: the same
}


def test_every_family_is_covered():
    from loratool.families import families

    assert sorted(f.name for f in families()) == sorted(FAMILY_SHAPES), \
        "a new family: add its fixtures/families.py shapes to FAMILY_SHAPES here (merge across its layouts)"


def _bases(tmp_path: Path, family: str) -> tuple[Path, Path]:
    """One tiny model of `family` in both layouts: original (single file) and diffusers (a folder),
    the diffusers weights cut from the family table's rows."""
    from loratool.families import get
    from loratool.maths.fuse import row_sizes

    fam = get(family)
    gen = torch.Generator().manual_seed(5)
    original: dict[str, torch.Tensor] = {}
    split: dict[str, torch.Tensor] = {}
    for path, shape in FAMILY_SHAPES[family]().items():
        ident = fam.identify(fam.comfy_prefix + path, "comfyui", (shape[0], shape[1]))
        assert ident is not None, path
        rel, i, _ = ident
        w = _rng_tensor(gen, shape)
        original[path + ".weight"] = w
        rows = dict(zip([c for c, _ in rel.chunks], row_sizes([s for _, s in rel.chunks], shape[0], shape[1])))
        start, spans = 0, {}
        for c, _ in rel.chunks:
            spans[c] = (start, start + rows[c])
            start += rows[c]
        for template, chunks in rel.split:
            name = template.replace("{i}", str(i)) if i is not None else template
            split[name + ".weight"] = torch.cat([w[spans[c][0]:spans[c][1]] for c in chunks])
    obase = tmp_path / "original.safetensors"
    save_file(original, str(obase))
    dbase = tmp_path / "diffusers"
    dbase.mkdir()
    save_file(split, str(dbase / "diffusion_pytorch_model.safetensors"))
    return obase, dbase


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_every_family_merges_into_its_other_layout(tmp_path, family):
    """From the tables alone: the result equals merging the adapter converted to the base's dialect."""
    obase, dbase = _bases(tmp_path, family)
    shapes = FAMILY_SHAPES[family]()
    for src, base, to in (("diffusers", obase, "kohya"), ("kohya", dbase, "diffusers")):
        lora = tmp_path / f"{family}_{src}.safetensors"
        save_file(fixture_families.family_lora(family, shapes, src, rank=4, alpha=2.0, seed=7), str(lora))
        out = tmp_path / f"direct_{src}" if base.is_dir() else tmp_path / f"direct_{src}.safetensors"
        report = merge(base, [lora], out)
        assert report.merged > 0 and not report.unmatched
        conv = tmp_path / f"{family}_{src}_as_{to}.safetensors"
        convert(lora, conv, to=to, family=family)
        via = tmp_path / f"via_{src}" if base.is_dir() else tmp_path / f"via_{src}.safetensors"
        merge(base, [conv], via)
        pick = (lambda p: p / "diffusion_pytorch_model.safetensors") if base.is_dir() else (lambda p: p)
        got, want = load_file(str(pick(out))), load_file(str(pick(via)))
        assert sorted(got) == sorted(want)
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
        assert verify(out, base, [lora]).ok


def test_validate_base_matches_as_merge_does(tmp_path):
    from loratool.ops.validate import validate_adapter as validate

    base = tmp_path / "flux1.safetensors"
    bfl_base(base, "model.diffusion_model.")
    lora = write_lora(tmp_path, "diffusers")
    doc = validate(lora, base=base).to_dict()
    assert not [f for f in doc["findings"] if f["severity"] == "error"], doc["findings"]
    assert doc["matched"] == len(read(lora).modules)


def test_into_a_fused_fp8_base(tmp_path):
    """A split LoRA into a BFL base stored in fp8: each part's rows requantized; verify agrees."""
    tensors = bfl_base(tmp_path / "bf.safetensors")
    fp8 = {k: (v.to(torch.float8_e4m3fn) if k.endswith(".weight") and v.dim() == 2 else v) for k, v in tensors.items()}
    base = tmp_path / "fp8.safetensors"
    save_file(fp8, str(base))
    lora = write_lora(tmp_path, "diffusers")
    out = tmp_path / "m.safetensors"
    report = merge(base, [lora], out)
    assert report.storage.endswith("fp8 float8_e4m3fn") and report.layouts
    got = load_file(str(out))
    d = lora_deltas(lora)
    qkv = "double_blocks.0.img_attn.qkv.weight"
    x = fp8[qkv].float().double().numpy().copy()
    for name, a, b in bfl_to_diffusers()["double_blocks.0.img_attn.qkv"]:
        x[a:b] += d[f"transformer.{name}"]
    want = torch.from_numpy(x).float().to(torch.float8_e4m3fn)  # one rounding of the float32 sum, nearest
    assert (got[qkv].float() != want.float()).float().mean() < 0.01  # float32 vs float64 sums: rare ties
    assert verify(out, base, [lora]).ok
    assert {t.verdict for t in verify(base, base, [lora]).findings} == {"not merged"}
