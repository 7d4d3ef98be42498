"""An image LoRA with text-encoder modules beside its transformer ones (kohya FLUX.1 files often
train CLIP-L too: `lora_te1_text_model_encoder_layers_0_mlp_fc1`): the family table converts the
transformer modules, the format's naming rules the text-encoder ones. Before, such a file could not
be converted at all ("cannot place 13 module name(s)").

Independent reference: diffusers' own kohya FLUX.1 converter, which handles both parts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_tools import fixture_families
from safetensors.torch import save_file

from loratool.formats import read
from loratool.ops.convert import convert

TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def flux_with_text_encoder(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    t = fixture_families.flux_lora("kohya", hidden=3072, double=1, single=1, rank=4, alpha=8.0, seed=3)
    g = torch.Generator().manual_seed(5)
    t[f"{TE}.lora_down.weight"] = torch.randn(4, 768, generator=g)
    t[f"{TE}.lora_up.weight"] = torch.randn(768, 4, generator=g)
    t[f"{TE}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "k.safetensors"
    save_file(t, str(path))
    return path, t


def _apply(m, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return m.up.load().double() @ (m.down.load().double() @ x) * m.scale


def test_kohya_with_text_encoder_to_diffusers_matches_diffusers_converter(tmp_path: Path) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    src, t = flux_with_text_encoder(tmp_path)
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in t.items()})
    # the converter leaves text-encoder modules in diffusers' older processor names, which its
    # text-encoder loader maps to the layer (to_q_lora -> q_proj); alpha / rank folded in as above
    for key in [k for k in theirs if "_lora." in k]:
        head, proc, role = key.rsplit(".", 3)[0], key.rsplit(".", 3)[1], key.rsplit(".", 3)[2]
        layer = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}[proc]
        theirs[f"{head}.{layer}.lora_{'A' if role == 'down' else 'B'}.weight"] = theirs.pop(key)
    out = tmp_path / "d.safetensors"
    report = convert(src, out, to="diffusers")
    ours = read(out)
    names = {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert names == set(ours.modules)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in ours.modules
    g = torch.Generator().manual_seed(0)
    for name in names:
        a, b = theirs[name + ".lora_A.weight"].double(), theirs[name + ".lora_B.weight"].double()
        x = torch.randn(a.shape[1], 2, generator=g, dtype=torch.float64)
        torch.testing.assert_close(_apply(ours.modules[name], x), b @ (a @ x), rtol=1e-6, atol=1e-9)
    assert any(row.name == TE and row.new_name.startswith("text_encoder.") for row in report.modules)


def test_text_encoder_modules_keep_kohya_names_for_comfyui_and_come_back(tmp_path: Path) -> None:
    src, _ = flux_with_text_encoder(tmp_path)
    comfy = tmp_path / "c.safetensors"
    convert(src, comfy, to="comfyui")
    c = read(comfy)
    assert TE in c.modules  # ComfyUI reads kohya's text-encoder names
    assert all(n == TE or n.startswith("diffusion_model.") for n in c.modules)
    diffusers = tmp_path / "d.safetensors"
    convert(src, diffusers, to="diffusers")
    back = tmp_path / "back.safetensors"
    convert(diffusers, back, to="kohya", family="flux.1")
    a, b = read(src), read(back)
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():
        x = torch.randn(m.in_features, 2, dtype=torch.float64)
        torch.testing.assert_close(_apply(b.modules[name], x), _apply(m, x), rtol=1e-12, atol=0)


def test_to_peft_with_text_encoder_modules_is_refused(tmp_path: Path) -> None:
    """A PEFT adapter adapts one model: before, the text-encoder modules were written beside the
    transformer's without their component (`text_model.encoder…`), a file that loads nowhere."""
    from loratool.errors import IncompatibleError

    src, _ = flux_with_text_encoder(tmp_path)
    with pytest.raises(IncompatibleError, match="PEFT adapter adapts one model"):
        convert(src, tmp_path / "p", to="peft")
    assert not (tmp_path / "p").exists()


def test_family_names_mixed_with_foreign_ones_are_not_given_generic_kohya_names(tmp_path: Path) -> None:
    """diffusers-side FLUX.1 names plus modules no table knows: the generic rules wrote
    lora_unet_transformer_blocks_0_attn_to_q, a name no loader reads; now it is refused."""
    from loratool.errors import IncompatibleError

    t = fixture_families.flux_lora("peft", hidden=64, double=1, single=1, rank=2, seed=1)
    t["text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(2, 8)
    t["text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.ones(8, 2)
    src = tmp_path / "mixed.safetensors"
    save_file(t, str(src))
    with pytest.raises(IncompatibleError, match="not the family's"):
        convert(src, tmp_path / "k.safetensors", to="kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_inspect_judges_the_family_without_the_text_encoder_modules(tmp_path: Path) -> None:
    from loratool.ops.inspect import inspect_adapter

    src, _ = flux_with_text_encoder(tmp_path)
    fam = inspect_adapter(src).to_dict()["family"]
    assert fam["family"] == "flux.1" and fam["confident"] and fam["text_encoder_modules"] == 1
    assert fam["matched"] == fam["total"]  # the transformer's modules, all the family's
