"""adapter.py on its own: the canonical model's derived facts (rank, scale, layouts, names)."""

from __future__ import annotations

import math

import pytest
import torch

from loratool.adapter import Adapter, LoraModule, scale_for, short_name
from loratool.io.tensors import TensorRef


def _module(name: str = "model.layers.0.q_proj", rank: int = 4, out_f: int = 16, in_f: int = 8,
            kernel: tuple[int, ...] = (), **kw) -> LoraModule:  # type: ignore[no-untyped-def]
    down = TensorRef.from_tensor(torch.zeros(rank, in_f, *kernel, dtype=torch.bfloat16))
    up = TensorRef.from_tensor(torch.zeros(out_f, rank, *([1] * len(kernel)), dtype=torch.bfloat16))
    kw.setdefault("alpha", 8.0)
    kw.setdefault("kind", "conv" if kernel else "linear")
    return LoraModule(name=name, down=down, up=up, **kw)


def test_scale_rules():
    assert _module().scale == 8.0 / 4
    assert _module(rslora=True).scale == 8.0 / math.sqrt(4)
    assert scale_for(8.0, 0, False) == 0.0
    assert scale_for(-3.0, 9, True) == -1.0


@pytest.mark.parametrize(("kw", "base_shape"), [
    ({}, (16, 8)),
    ({"fan_in_fan_out": True}, (8, 16)),
    ({"kind": "embedding"}, (8, 16)),  # (num_embeddings, embedding_dim): down is (r, vocab)
    ({"kernel": (3, 3)}, (16, 8, 3, 3)),
])
def test_shapes(kw, base_shape):
    m = _module(**kw)
    assert (m.rank, m.out_features, m.in_features) == (4, 16, 8)
    assert m.base_shape == base_shape
    assert m.kernel == kw.get("kernel", ())
    assert m.params == m.down.numel + m.up.numel
    assert m.dtype == "bfloat16"


@pytest.mark.parametrize(("name", "short"), [
    ("model.layers.0.self_attn.q_proj", "q_proj"),
    ("unet.mid_block.attentions.0.to_out.0", "to_out.0"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "to_q"),
    ("lora_unet_down_blocks_0_attentions_0_ff_net_2", "ff_net_2"),
    ("lora_te1_text_model_encoder_layers_11_mlp_fc1", "fc1"),
    ("lora_unet_some_unknown_layer_7", "unknown_layer_7"),
    ("plain", "plain"),
])
def test_short_names(name, short):
    assert short_name(name) == short
    assert _module(name).short_name == short


def test_modules_and_adapters_are_never_changed_in_place():
    m = _module()
    m2 = m.with_(alpha=1.0, rslora=True)
    assert (m.alpha, m.rslora) == (8.0, False) and (m2.alpha, m2.rslora) == (1.0, True)
    a = Adapter(modules={"x": m, "y": _module("y", rank=2, magnitude=TensorRef.from_tensor(torch.ones(16)))},
                source_format="peft")
    assert a.ranks == [4, 2] and a.dora and not a.rslora and not a.fan_in_fan_out
    assert a.lora_params == sum(x.params for x in a.modules.values())
    b = a.with_modules({"x": m2}, source_format="kohya")
    assert list(a.modules) == ["x", "y"] and a.source_format == "peft"
    assert list(b.modules) == ["x"] and b.source_format == "kohya" and b.rslora
