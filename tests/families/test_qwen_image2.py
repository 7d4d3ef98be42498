"""Qwen-Image 2.x LoRAs in every dialect: detection (apart from Qwen-Image), the fused SwiGLU
`img_mlp.gate_up` split and fused exactly, and diffusers itself.

Files are generated at test time from the family table (fixtures/families.py). Independent checks:
the split rows written out here (gate rows first, as diffusers' single-file converter
`convert_qwen_image21_transformer_checkpoint_to_diffusers` cuts ComfyUI's checkpoint); our diffusers
output loaded into a tiny QwenImage21Transformer2DModel with `load_lora_adapter` and fused equals our
merge; and our merge of a ComfyUI-named LoRA into a ComfyUI-layout base, cut by diffusers' own
single-file converter, equals diffusers' fuse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import (
    adapter_names,
    converter_agrees,
    deltas,
    fixture_families,
    fuse_equals_merge,
    linears,
    lora_state,
    merge_equals_numpy,
    round_trip_is_identity,
    write,
)
from safetensors.torch import load_file, save_file

from loratool.families import detect
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge

qwen_image2_lora = fixture_families.qwen_image2_lora
qwen_image2_shapes = fixture_families.qwen_image2_shapes
qwen_image_lora = fixture_families.qwen_image_lora
MLP = 48  # qwen_image2_shapes' defaults: hidden 16, mlp_ratio 3


def diffusers_shapes() -> dict[str, tuple[int, int]]:
    """qwen_image2_shapes on diffusers' side: gate_up cut into gate_layer and proj, written out here."""
    out: dict[str, tuple[int, int]] = {}
    for k, (o, i) in qwen_image2_shapes().items():
        if k.endswith(".gate_up"):
            out[k.replace("gate_up", "gate_layer")] = out[k.replace("gate_up", "proj")] = (o // 2, i)
        else:
            out[k] = (o, i)
    return out


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer"])
def test_inspect_names_the_family(tmp_path: Path, dialect: str) -> None:
    fam = inspect_adapter(write(tmp_path, "l.safetensors", qwen_image2_lora(dialect))).to_dict()["family"]
    assert fam["family"] == "qwen-image-2" and fam["dialect"] == dialect and fam["confident"]
    assert fam["matched"] == fam["total"] == len(qwen_image2_shapes() if dialect in ("kohya", "comfyui")
                                                 else diffusers_shapes())


def test_qwen_image_files_stay_qwen_image() -> None:
    """The two share attention and embedder names; Qwen-Image's dual-stream modules and its 60 blocks decide."""
    for dialect in ("kohya", "comfyui", "diffusers"):
        assert detect(adapter_names(qwen_image_lora(dialect))).family == "qwen-image"
    det = detect(["lora_unet_transformer_blocks_40_attn_to_q", "lora_unet_transformer_blocks_0_attn_to_q"])
    assert det.family == "qwen-image"
    det = detect(["lora_unet_transformer_blocks_0_img_mlp_gate_up", "lora_unet_transformer_blocks_0_attn_to_q"])
    assert det.family == "qwen-image-2" and det.confident
    assert "not qwen-image: lora_unet_transformer_blocks_0_img_mlp_gate_up is not one of its modules" in det.reasons


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    round_trip_is_identity(tmp_path, qwen_image2_lora("kohya", seed=5, biases=True), target, "qwen-image-2")


def test_gate_up_splits_into_gate_then_up_rows(tmp_path: Path) -> None:
    src = write(tmp_path, "c.safetensors", qwen_image2_lora("comfyui", seed=3))
    convert(src, tmp_path / "d.safetensors", to="diffusers")
    dc, dd = deltas(src), deltas(tmp_path / "d.safetensors")
    fused = dc["diffusion_model.transformer_blocks.0.img_mlp.gate_up"]
    torch.testing.assert_close(dd["transformer.transformer_blocks.0.img_mlp.gate_layer"], fused[:MLP],
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(dd["transformer.transformer_blocks.0.img_mlp.proj"], fused[MLP:], rtol=0, atol=1e-12)
    assert set(dd) == {"transformer." + k for k in diffusers_shapes()}


def test_diffusers_gate_and_up_fuse_exactly(tmp_path: Path) -> None:
    """Independent gate / up factors (as diffusers trains them) become one gate_up of rank 2r: exact."""
    src = write(tmp_path, "d.safetensors", qwen_image2_lora("diffusers", seed=4))
    convert(src, tmp_path / "c.safetensors", to="comfyui")
    dd, dc = deltas(src), deltas(tmp_path / "c.safetensors")
    want = torch.cat([dd["transformer.transformer_blocks.0.img_mlp.gate_layer"],
                      dd["transformer.transformer_blocks.0.img_mlp.proj"]])
    torch.testing.assert_close(dc["diffusion_model.transformer_blocks.0.img_mlp.gate_up"], want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merge_into_the_original_layout_equals_numpy(tmp_path: Path, prefix: str) -> None:
    shapes = qwen_image2_shapes()
    assert merge_equals_numpy(tmp_path, "qwen-image-2", shapes, prefix) == len(shapes)


def test_diffsynth_names_are_read(tmp_path: Path) -> None:
    """DiffSynth-Studio saves `<diffusers path>.lora_A.default.weight` with no prefix (alpha = rank): the
    family is named, and `--to comfyui` fuses its gate / up pair to the deltas' rows."""
    t = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
         for k, v in qwen_image2_lora("peft", seed=6).items()}
    src = write(tmp_path, "ds.safetensors", t)
    fam = inspect_adapter(src).to_dict()["family"]
    assert fam["family"] == "qwen-image-2" and fam["confident"]
    convert(src, tmp_path / "c.safetensors", to="comfyui")
    dd, dc = deltas(src), deltas(tmp_path / "c.safetensors")
    want = torch.cat([dd["transformer_blocks.0.img_mlp.gate_layer"], dd["transformer_blocks.0.img_mlp.proj"]])
    torch.testing.assert_close(dc["diffusion_model.transformer_blocks.0.img_mlp.gate_up"], want, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# diffusers itself

diffusers = pytest.importorskip("diffusers")


def _model():  # type: ignore[no-untyped-def]
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    return QwenImage21Transformer2DModel(in_channels=8, out_channels=8, num_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, context_in_dim=12, axes_dims_rope=(2, 2, 4))


@pytest.mark.slow
def test_diffusers_converter_agrees_but_for_gate_up(tmp_path: Path) -> None:
    """diffusers' Qwen-Image converter (which QwenImage21Pipeline's loader uses) strips ComfyUI's prefix:
    it agrees with our names and deltas on every module but `img_mlp.gate_up`, which it passes through
    under a name QwenImage21Transformer2DModel does not have (our `--to diffusers` splits it)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    t = qwen_image2_lora("comfyui", rank=4, alpha=4.0, seed=7)  # alpha = rank: the converter keeps .alpha aside
    theirs = _convert_non_diffusers_qwen_lora_to_diffusers(lora_state(t))
    kept = {k: v for k, v in theirs.items() if ".gate_up." not in k}
    assert set(theirs) - set(kept) == {"transformer.transformer_blocks.0.img_mlp.gate_up.lora_A.weight",
                                       "transformer.transformer_blocks.0.img_mlp.gate_up.lora_B.weight"}
    rest = {k: v for k, v in t.items() if ".gate_up." not in k}
    out = tmp_path / "d.safetensors"
    convert(write(tmp_path, "c.safetensors", rest), out, to="diffusers")
    assert len(converter_agrees(kept, out)) == len(qwen_image2_shapes()) - 1


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    model = _model()
    assert linears(model) == diffusers_shapes()  # the table covers every linear of the model
    wrapped, changed, _ = fuse_equals_merge(model, qwen_image2_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
    assert wrapped == set(diffusers_shapes()) and changed == len(wrapped)


@pytest.mark.slow
def test_merge_into_a_comfyui_base_equals_diffusers_fuse(tmp_path: Path) -> None:
    """ComfyUI's layout (gate_up fused, under model.diffusion_model.), merged by loratool with a
    ComfyUI-named LoRA, then cut by diffusers' own single-file converter: diffusers' fuse of our
    diffusers conversion of the same LoRA."""
    from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers

    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    comfy: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".img_mlp.gate_layer." in k:
            comfy["model.diffusion_model." + k.replace("gate_layer", "gate_up")] = \
                torch.cat([v, state[k.replace("gate_layer", "proj")]]).contiguous()
        elif ".img_mlp.proj." not in k:
            comfy["model.diffusion_model." + k] = v.contiguous()
    base = tmp_path / "qwen_image_2.safetensors"
    save_file(comfy, str(base))
    lora = write(tmp_path, "c.safetensors", qwen_image2_lora("comfyui", rank=4, alpha=2.0, seed=11))
    merged = tmp_path / "merged.safetensors"
    report = merge(base, [lora], merged)
    assert report.merged == len(qwen_image2_shapes()) and not report.unmatched
    ours = convert_qwen_image21_transformer_checkpoint_to_diffusers(load_file(str(merged)))

    dif = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    dif.parent.mkdir()
    convert(lora, dif, to="diffusers")
    model.load_lora_adapter(str(dif.parent), weight_name=dif.name, prefix="transformer", adapter_name="ours")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    fused = model.state_dict()
    assert set(ours) == set(fused)
    for k in fused:
        torch.testing.assert_close(ours[k], fused[k], rtol=1e-6, atol=1e-6)
