"""keymap.py on its own: which base key each adapter module name matches, and why not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.adapter import LoraModule
from loratool.errors import IncompatibleError
from loratool.io.header import TensorInfo
from loratool.io.tensors import TensorRef
from loratool.keymap import KeyIndex, compatible, match_modules

BASE_KEYS = [
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.bias",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "lm_head.weight",
]


@pytest.mark.parametrize(("name", "key"), [
    ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight"),  # exact
    ("base_model.model.model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj.weight"),  # PEFT wrapper
    ("unet.model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight"),  # diffusers component
    ("lora_unet_input_blocks_1_1_proj_in", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),  # kohya
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
     "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"),
    ("lora_te2_transformer_resblocks_0_attn_out_proj",
     "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight"),
    ("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight"),  # unique normalised suffix
    ("lm_head", "lm_head.weight"),
])
def test_one_candidate(name, key):
    assert KeyIndex(BASE_KEYS).candidates(name) == [key]


def test_ambiguous_and_unmatched_names():
    index = KeyIndex(BASE_KEYS)
    assert sorted(index.candidates("self_attn.q_proj")) == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    assert index.candidates("model.layers.2.self_attn.q_proj") == []
    assert index.candidates("lora_unet_output_blocks_0_proj_in") == []  # only .weight keys are targets


def _module(name: str, out_f: int, in_f: int, *, kernel: tuple[int, ...] = (), **kw) -> LoraModule:  # type: ignore[no-untyped-def]
    down = TensorRef.from_tensor(torch.zeros(2, in_f, *kernel))
    up = TensorRef.from_tensor(torch.zeros(out_f, 2, *([1] * len(kernel))))
    return LoraModule(name=name, down=down, up=up, alpha=2.0, kind="conv" if kernel else "linear", **kw)


def test_compatible_shapes():
    assert compatible(_module("a", 8, 4), (8, 4))
    assert not compatible(_module("a", 8, 4), (4, 8))
    assert compatible(_module("a", 8, 4), (8, 4, 1, 1))  # linear LoRA on a 1x1 conv weight
    assert compatible(_module("a", 8, 4, kernel=(1, 1)), (8, 4))
    assert not compatible(_module("a", 8, 4, kernel=(3, 3)), (8, 4))
    assert compatible(_module("a", 8, 4, fan_in_fan_out=True), (4, 8))  # GPT-2 Conv1D stores (in, out)


def _base(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, "float32", s, Path("base.safetensors"), 0, 0) for k, s in shapes.items()}


def test_match_modules_sorts_every_module_into_one_outcome():
    base = _base({"a.q.weight": (8, 4), "b.q.weight": (8, 4), "c.k.weight": (8, 4), "d.v.weight": (6, 4)})
    mods = [_module("c.k", 8, 4), _module("q", 8, 4), _module("zzz", 8, 4), _module("d.v", 8, 4)]
    match = match_modules(mods, base)
    assert match.matched == {"c.k": "c.k.weight"}
    assert match.ambiguous == {"q": ["a.q.weight", "b.q.weight"]}
    assert match.unmatched == ["zzz"]
    assert match.shape_mismatch == [("d.v", "d.v.weight", (8, 4), (6, 4))]
    assert not match.ok
    doc = match.to_dict()
    assert doc["shape_mismatch"] == [{"module": "d.v", "base_key": "d.v.weight", "expected": [8, 4], "found": [6, 4]}]
    with pytest.raises(IncompatibleError, match=r"a\.safetensors: module 'd\.v' needs a base weight of shape "
                       r"\(8, 4\) but d\.v\.weight in BASE is \(6, 4\)") as exc:
        match.refuse_shape_mismatch("a.safetensors", "BASE")
    assert "loratool validate" in (exc.value.hint or "")
    ok = match_modules([_module("c.k", 8, 4)], base)
    assert ok.ok
    ok.refuse_shape_mismatch("a.safetensors")  # nothing to refuse
