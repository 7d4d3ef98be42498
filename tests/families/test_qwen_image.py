"""Qwen-Image LoRAs in every dialect: detection, conversion (every module a rename) and diffusers itself.

Files are generated at test time from the family table (fixtures/families.py). Independent checks:
diffusers' own converter for musubi-tuner / ComfyUI files (`_convert_non_diffusers_qwen_lora_to_diffusers`)
gives the names and deltas of our `--to diffusers`, and our diffusers output loads into a tiny
QwenImageTransformer2DModel built here (every linear wrapped) and fuses to loratool's merge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import deltas, fixture_families, fuse_equals_merge, write
from safetensors.torch import load_file

from loratool.families import detect
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

qwen_image_lora = fixture_families.qwen_image_lora
qwen_image_shapes = fixture_families.qwen_image_shapes
flux_lora = fixture_families.flux_lora
sd3_lora = fixture_families.sd3_lora




def names_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".lora_")[0].removesuffix(".alpha").removeprefix("base_model.model.") for k in tensors})


# every dialect is confident: Qwen-Image's img_mlp / img_mod / img_in are no other family's modules
@pytest.mark.parametrize("dialect,confident", [("kohya", True), ("comfyui", True), ("diffusers", True),
                                               ("onetrainer", True)])
def test_detect_family_and_dialect(tmp_path: Path, dialect: str, confident: bool) -> None:
    fam = inspect_adapter(write(tmp_path, "q.safetensors", qwen_image_lora(dialect))).to_dict()["family"]
    assert fam["family"] == "qwen-image" and fam["dialect"] == dialect and fam["matched"] == fam["total"]
    assert fam["confident"] is confident and not fam["ambiguous"]


def test_other_families_keep_their_kohya_detection() -> None:
    """Qwen-Image's kohya names share `img_in` / `txt_in` with FLUX.1's: the rest decides."""
    assert detect(names_of(flux_lora("kohya"))).describe() == "flux.1, kohya dialect"
    assert detect(names_of(sd3_lora("kohya"))).describe() == "sd3, kohya dialect"
    assert detect(names_of(qwen_image_lora("kohya"))).describe() == "qwen-image, kohya dialect"
    # diffusers names: FLUX.1's file has modules Qwen-Image lacks (ff.net, single blocks), and back;
    # HunyuanVideo has all of them (a tie, reported as ambiguous)
    assert detect(names_of(flux_lora("diffusers"))).tied == ["flux.1", "hunyuan-video"]
    assert detect(names_of(qwen_image_lora("diffusers"))).family == "qwen-image"


def test_block_indices_past_60_are_not_qwen_image() -> None:
    det = detect(["lora_unet_transformer_blocks_60_img_mod_1", "lora_unet_transformer_blocks_59_img_mod_1"])
    assert det.family == "qwen-image" and det.matched == 1 and not det.confident


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    src = write(tmp_path, "k.safetensors", qwen_image_lora("kohya", seed=5, biases=True))
    mid = tmp_path / ("mid" if target == "peft" else "mid.safetensors")
    convert(src, mid, to=target)
    back = tmp_path / "back.safetensors"
    convert(mid, back, to="kohya", family="qwen-image")
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_kohya_names_are_the_dotted_paths(tmp_path: Path) -> None:
    """Every module is a rename: same factors, the diffusers name is the path with its dots back."""
    src = write(tmp_path, "k.safetensors", qwen_image_lora("kohya"))
    report = convert(src, tmp_path / "d.safetensors", to="diffusers")
    assert {m.from_algo for m in report.modules} == {"lora"}
    dk, dd = deltas(src), deltas(tmp_path / "d.safetensors")
    want = {"transformer." + p: dk["lora_unet_" + p.replace(".", "_")] for p in qwen_image_shapes(16, 2)}
    assert set(dd) == set(want) and all(torch.equal(dd[n], want[n]) for n in want)


def test_diffusers_side_to_kohya_by_detection(tmp_path: Path) -> None:
    """A whole diffusers-side file has modules only qwen-image has: detected, converted as with --family."""
    src = write(tmp_path, "d.safetensors", qwen_image_lora("diffusers"))
    convert(src, tmp_path / "k.safetensors", to="kohya")
    convert(src, tmp_path / "k2.safetensors", to="kohya", family="qwen-image")
    a, b = load_file(str(tmp_path / "k.safetensors")), load_file(str(tmp_path / "k2.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dialect", ["comfyui", "kohya", "diffusers"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merges_into_a_bare_key_base(tmp_path: Path, dialect: str, prefix: str) -> None:
    """ComfyUI's diffusion_models layout (`img_in.weight`, bare or under model.diffusion_model.) names
    Qwen-Image's modules as diffusers does: every dialect's file merges into it, equal to numpy
    (issue 25 defect 3: a comfyui-named file had all 34 modules unmatched)."""
    from safetensors.torch import save_file

    from loratool.ops.merge import merge

    shapes = qwen_image_shapes(16, 2)
    gen = torch.Generator().manual_seed(1)
    base = {prefix + k + ".weight": torch.randn(*s, generator=gen) for k, s in shapes.items()}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "qwen_image_fp32.safetensors"))
    t = qwen_image_lora(dialect, seed=4)
    src = write(tmp_path, "l.safetensors", t)
    merge(tmp_path / "base", [src], tmp_path / "merged")
    got = load_file(str(tmp_path / "merged" / "qwen_image_fp32.safetensors"))
    stems = {k.rsplit(".lora_", 1)[0] for k in t if ".lora_" in k}
    assert len(stems) == len(shapes) == 34
    for stem in stems:
        down = t[stem + (".lora_A.weight" if dialect == "diffusers" else ".lora_down.weight")].double().numpy()
        up = t[stem + (".lora_B.weight" if dialect == "diffusers" else ".lora_up.weight")].double().numpy()
        alpha = 4.0 if dialect == "diffusers" else float(t[stem + ".alpha"])
        path = stem.removeprefix("diffusion_model.").removeprefix("transformer.")
        if dialect == "kohya":
            path = next(p for p in shapes if "lora_unet_" + p.replace(".", "_") == stem)
        key = prefix + path + ".weight"
        want = base[key].double().numpy() + (alpha / down.shape[0]) * up @ down
        assert abs(got[key].double().numpy() - want).max() < 1e-5, key


def test_unmatched_merge_names_the_base_file(tmp_path: Path) -> None:
    """The unmatched-modules error names the base's weights file, not its folder."""
    from safetensors.torch import save_file

    from loratool.errors import IncompatibleError
    from loratool.ops.merge import merge

    (tmp_path / "base").mkdir()
    save_file({"img_in.weight": torch.zeros(16, 16)}, str(tmp_path / "base" / "qwen.safetensors"))
    src = write(tmp_path, "l.safetensors", qwen_image_lora("comfyui"))
    with pytest.raises(IncompatibleError) as e:
        merge(tmp_path / "base", [src], tmp_path / "merged")
    assert f"in {tmp_path / 'base' / 'qwen.safetensors'}:" in str(e.value)


# ---------------------------------------------------------------------------------------------
# diffusers itself

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_diffusers_converter_agrees_with_ours(tmp_path: Path, dialect: str) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    t = qwen_image_lora(dialect, rank=4, alpha=8.0, seed=7)
    src = write(tmp_path, "q.safetensors", t)
    theirs = _convert_non_diffusers_qwen_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    ours_path = tmp_path / "d.safetensors"
    convert(src, ours_path, to="diffusers")
    ours = read(ours_path)
    names = {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert names == set(ours.modules) and len(names) == len(qwen_image_shapes(16, 2))
    for name in names:
        a, b = theirs[name + ".lora_A.weight"].double(), theirs[name + ".lora_B.weight"].double()
        m = ours.modules[name]
        want = b @ a  # diffusers folds alpha / rank into the factors
        torch.testing.assert_close(m.up.load().double() @ m.down.load().double() * m.scale, want,
                                   rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                        axes_dims_rope=(2, 2, 4))
    linears = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert linears == set(qwen_image_shapes(16, 2))  # the table covers every linear of the model
    wrapped, changed, _ = fuse_equals_merge(model, qwen_image_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
    assert wrapped == linears
    assert changed == len(wrapped)
