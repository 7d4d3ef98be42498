"""LTX-2 (audio-video) LoRAs in every dialect: detection (apart from LTX-Video 0.9), renames, and the real clients.

Files are generated at test time from the family table (fixtures/families.py). Independent checks:
diffusers' own converter (`_convert_non_diffusers_ltx2_lora_to_diffusers`) on our ComfyUI file gives the
names and deltas of our `--to diffusers`; our diffusers output loads into a tiny LTX2VideoTransformer3DModel
(every linear wrapped) with `load_lora_adapter` and fuses to loratool's merge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import (
    adapter_names,
    converter_agrees,
    fixture_families,
    fuse_equals_merge,
    linears,
    lora_state,
    merge_equals_numpy,
    round_trip_is_identity,
    write,
)

from loratool.families import detect
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

ltx2_lora, ltx2_shapes, ltx_lora = fixture_families.ltx2_lora, fixture_families.ltx2_shapes, fixture_families.ltx_lora
# the original names that differ on diffusers' side, written out from diffusers' converter's rename table
RENAMED = {"patchify_proj": "proj_in", "audio_patchify_proj": "audio_proj_in", "adaln_single.": "time_embed.",
           "audio_adaln_single.": "audio_time_embed.",
           "av_ca_video_scale_shift_adaln_single.": "av_cross_attn_video_scale_shift.",
           "av_ca_a2v_gate_adaln_single.": "av_cross_attn_video_a2v_gate.",
           "av_ca_audio_scale_shift_adaln_single.": "av_cross_attn_audio_scale_shift.",
           "av_ca_v2a_gate_adaln_single.": "av_cross_attn_audio_v2a_gate."}


def diffusers_name(path: str) -> str:
    for old, new in RENAMED.items():
        if path.startswith(old):
            return new + path[len(old):]
    return path


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer"])
def test_inspect_names_the_family(tmp_path: Path, dialect: str) -> None:
    fam = inspect_adapter(write(tmp_path, "l.safetensors", ltx2_lora(dialect))).to_dict()["family"]
    assert fam["family"] == "ltx-2" and fam["dialect"] == dialect and fam["confident"]
    assert fam["matched"] == fam["total"] == len(ltx2_shapes())


def test_video_half_alone_fits_ltx_video_too() -> None:
    """LTX-2's video modules have LTX-Video 0.9's names: such a file is ambiguous unless its header says."""
    names = adapter_names(ltx_lora("comfyui"))
    det = detect(names)
    assert det.ambiguous and det.tied == ["ltx-video", "ltx-2"]
    assert detect(names, {"ss_base_model_version": "ltx-2-19b-dev"}).family == "ltx-2"
    assert detect(names, {"ss_base_model_version": "ltxv-13b-0.9.8"}).family == "ltx-video"
    det = detect(["diffusion_model.transformer_blocks.0.attn1.to_q",
                  "diffusion_model.transformer_blocks.0.audio_ff.net.2"])
    assert det.family == "ltx-2" and det.confident
    assert "not ltx-video: diffusion_model.transformer_blocks.0.audio_ff.net.2 is not one of its modules" in det.reasons


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    round_trip_is_identity(tmp_path, ltx2_lora("kohya", seed=5, biases=True), target, "ltx-2")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merge_into_the_original_layout_equals_numpy(tmp_path: Path, prefix: str) -> None:
    shapes = ltx2_shapes()
    assert merge_equals_numpy(tmp_path, "ltx-2", shapes, prefix) == len(shapes)


# ---------------------------------------------------------------------------------------------
# the real clients

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_diffusers_ltx2_converter_agrees_with_ours(tmp_path: Path) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    t = ltx2_lora("comfyui", rank=4, alpha=4.0, seed=7)  # alpha = rank: diffusers' converter ignores .alpha
    theirs = _convert_non_diffusers_ltx2_lora_to_diffusers(lora_state(t))
    out = tmp_path / "d.safetensors"
    convert(write(tmp_path, "c.safetensors", t), out, to="diffusers")
    assert converter_agrees(theirs, out) == {"transformer." + diffusers_name(p) for p in ltx2_shapes()}


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=1, caption_channels=16)
    # the table covers every linear of the model
    assert linears(model) == {diffusers_name(p): s for p, s in ltx2_shapes().items()}
    wrapped, changed, ours = fuse_equals_merge(model, ltx2_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
    assert wrapped == set(linears(model)) and changed == len(wrapped) == len(ours.modules)
