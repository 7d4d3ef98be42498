"""Kandinsky 5 LoRAs in every dialect: detection, conversion (every module a rename) and diffusers itself.

Files are generated at test time from the family table (fixtures/families.py). Independent check: our
diffusers output loads into a tiny Kandinsky5Transformer3DModel built here (every linear wrapped) with
`load_lora_adapter` and fuses to loratool's merge of the same file (diffusers has no converter for
Kandinsky 5's other dialects: its names are the same on both sides).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import (
    adapter_names,
    deltas,
    fixture_families,
    fuse_equals_merge,
    linears,
    merge_equals_numpy,
    round_trip_is_identity,
    write,
)

from loratool.families import detect
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter

kandinsky5_lora = fixture_families.kandinsky5_lora
kandinsky5_shapes = fixture_families.kandinsky5_shapes


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "peft", "onetrainer"])
def test_inspect_names_the_family(tmp_path: Path, dialect: str) -> None:
    path = tmp_path / "l" if dialect == "peft" else write(tmp_path, "l.safetensors", kandinsky5_lora(dialect))
    if dialect == "peft":
        convert(write(tmp_path, "k.safetensors", kandinsky5_lora("kohya")), path, to="peft")
    fam = inspect_adapter(path).to_dict()["family"]
    assert fam["family"] == "kandinsky-5" and fam["dialect"] == dialect
    assert fam["matched"] == fam["total"] == len(kandinsky5_shapes()) and fam["confident"]


def test_block_indices_past_pro_are_not_kandinsky5() -> None:
    det = detect(["lora_unet_visual_transformer_blocks_59_feed_forward_in_layer",
                  "lora_unet_visual_transformer_blocks_60_feed_forward_in_layer"])
    assert det.family == "kandinsky-5" and det.matched == 1 and not det.confident


def test_header_metadata_names_it() -> None:
    from loratool.families import metadata_family

    assert metadata_family({"ss_base_model_version": "kandinsky5_lite_t2v"}) == \
        ("kandinsky-5", "ss_base_model_version says kandinsky5_lite_t2v")


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    round_trip_is_identity(tmp_path, kandinsky5_lora("kohya", seed=5, biases=True), target,
                           "kandinsky-5")


def test_kohya_names_are_the_dotted_paths(tmp_path: Path) -> None:
    """Every module is a rename: the same deltas, the diffusers name is the path with its dots back."""
    src = write(tmp_path, "k.safetensors", kandinsky5_lora("kohya"))
    convert(src, tmp_path / "d.safetensors", to="diffusers")
    dk, dd = deltas(src), deltas(tmp_path / "d.safetensors")
    want = {"transformer." + p: dk["lora_unet_" + p.replace(".", "_")] for p in kandinsky5_shapes()}
    assert set(dd) == set(want) and all(torch.equal(dd[n], want[n]) for n in want)
    assert adapter_names(kandinsky5_lora("comfyui"))[0].startswith("diffusion_model.")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merge_into_the_original_layout_equals_numpy(tmp_path: Path, prefix: str) -> None:
    shapes = kandinsky5_shapes()
    assert merge_equals_numpy(tmp_path, "kandinsky-5", shapes, prefix) == len(shapes)


# ---------------------------------------------------------------------------------------------
# diffusers itself

diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=12, in_text_dim2=10, time_dim=8, out_visual_dim=4,
                                         model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=1,
                                         axes_dims=(2, 2, 4))
    have = linears(model)
    assert have == {k: v for k, v in kandinsky5_shapes().items()}  # the table covers every linear of the model
    wrapped, changed, _ = fuse_equals_merge(model, kandinsky5_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
    assert wrapped == set(have) and changed == len(wrapped)
