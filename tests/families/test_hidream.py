"""HiDream LoRAs (mixture-of-experts feed-forwards): detection, conversion, and the real clients.

Files are generated at test time from the family table (fixtures/families.py `hidream_lora`). Independent
checks: diffusers' own converter (`_convert_non_diffusers_hidream_lora_to_diffusers`) on our comfyui
file against our diffusers conversion, `load_lora_adapter` + `fuse_lora` on a tiny
HiDreamImageTransformer2DModel (experts included), and numpy for a merge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from family_tools import diffusers_deltas, fixture_families, fuses_whole, round_trips, write
from safetensors.torch import load_file

from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge

hidream_lora = fixture_families.hidream_lora
hidream_shapes = fixture_families.hidream_shapes


@pytest.mark.parametrize("dialect", ["kohya", "comfyui", "diffusers", "onetrainer"])
def test_inspect_names_hidream(tmp_path: Path, dialect: str) -> None:
    fam = inspect_adapter(write(tmp_path, "h.safetensors", hidream_lora(dialect))).to_dict()["family"]
    assert fam["family"] == "hidream" and fam["dialect"] == dialect and fam["matched"] == fam["total"], fam
    assert fam["confident"]


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui", "kohya"])
def test_round_trip_through_every_dialect(tmp_path: Path, target: str) -> None:
    round_trips(write(tmp_path, "k.safetensors", hidream_lora("kohya", seed=5)), target, "hidream", tmp_path)


def test_merge_of_expert_modules_equals_numpy(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    base = {f"{p}.weight": torch.randn(*s, generator=gen) for p, s in hidream_shapes().items()}
    bpath = write(tmp_path, "hidream.safetensors", base)
    lora = write(tmp_path, "d.safetensors", hidream_lora("diffusers", seed=3))
    out = tmp_path / "m.safetensors"
    assert not merge(bpath, [lora], out).unmatched
    got, d = load_file(str(out)), diffusers_deltas(lora)
    for name in ("double_stream_blocks.0.block.ff_i.experts.1.w2",
                 "single_stream_blocks.0.block.ff_i.shared_experts.w1", "caption_projection.2.linear"):
        np.testing.assert_allclose(got[name + ".weight"].double().numpy(),
                                   base[name + ".weight"].double().numpy() + d(name), atol=1e-5)
    assert all(not torch.equal(got[k], base[k]) for k in base)


diffusers = pytest.importorskip("diffusers")


@pytest.mark.slow
def test_diffusers_converter_agrees_with_ours(tmp_path: Path) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_hidream_lora_to_diffusers

    t = hidream_lora("comfyui", seed=7)
    theirs = _convert_non_diffusers_hidream_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    out = tmp_path / "d.safetensors"
    convert(write(tmp_path, "c.safetensors", t), out, to="diffusers")
    ours = read(out)
    names = {k.rsplit(".lora_", 1)[0] for k in theirs if ".lora_down." in k}
    assert names == set(ours.modules)
    for name in names:  # theirs keeps kohya suffixes and alpha: diffusers applies alpha / rank when loading
        a, b = theirs[name + ".lora_down.weight"].double(), theirs[name + ".lora_up.weight"].double()
        scale = float(theirs[name + ".alpha"]) / a.shape[0]
        m = ours.modules[name]
        torch.testing.assert_close(m.up.load().double() @ m.down.load().double() * m.scale, b @ a * scale)


@pytest.mark.slow
def test_our_diffusers_output_loads_and_fuses_like_our_merge(tmp_path: Path) -> None:
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    model = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, caption_channels=[12, 10],
                                           text_emb_dim=8, num_routed_experts=2, num_activated_experts=1,
                                           axes_dims_rope=(4, 4), max_resolution=(16, 16), llama_layers=[0, 1])
    fuses_whole(model, hidream_lora("kohya", rank=4, alpha=2.0, seed=9), tmp_path)
