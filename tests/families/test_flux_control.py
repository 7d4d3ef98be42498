"""BFL's FLUX.1 control LoRAs (flux1-depth-dev-lora, flux1-canny-dev-lora): BFL module names without a
prefix, `lora_B.bias` bias deltas, the RMSNorm `*_norm.scale` tensors saved whole (they replace the
base's), and an `img_in` LoRA whose lora_A takes 128 input channels where FLUX.1-dev's img_in takes 64.

What they mean was read (never copied) from Comfy-Org/ComfyUI `comfy/lora_convert.py` at
2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5 (convert_lora_bfl_control: bias -> `.diff_b`, `_norm.scale`
-> `.set_weight`, `img_in.reshape_weight` = (lora_B rows, lora_A columns)) and `comfy/lora.py` at
17358c8f73b581a0d22facc3c385822f09b8bfb1 (pad_tensor_to_shape: the base is zero-padded to the new
shape before the delta is added; "set" copies the tensor). Files are generated here, tiny.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.formats import read
from loratool.ops.merge import merge

H, R, C_IN, C_CONTROL = 16, 4, 4, 8  # hidden, rank, img_in's input channels, with the control latents


def control_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """A BFL control LoRA state dict as BFL ships it (one double block, one single block)."""
    g = torch.Generator().manual_seed(seed)
    t = {"img_in.lora_A.weight": torch.randn(R, C_CONTROL, generator=g),
         "img_in.lora_B.weight": torch.randn(H, R, generator=g), "img_in.lora_B.bias": torch.randn(H, generator=g)}
    for s in ("img", "txt"):
        t[f"double_blocks.0.{s}_attn.qkv.lora_A.weight"] = torch.randn(R, H, generator=g)
        t[f"double_blocks.0.{s}_attn.qkv.lora_B.weight"] = torch.randn(3 * H, R, generator=g)
        t[f"double_blocks.0.{s}_attn.qkv.lora_B.bias"] = torch.randn(3 * H, generator=g)
        for n in ("query", "key"):
            t[f"double_blocks.0.{s}_attn.norm.{n}_norm.scale"] = torch.randn(H // 2, generator=g)
    for n in ("query", "key"):
        t[f"single_blocks.0.norm.{n}_norm.scale"] = torch.randn(H // 2, generator=g)
    t["single_blocks.0.linear1.lora_A.weight"] = torch.randn(R, H, generator=g)
    t["single_blocks.0.linear1.lora_B.weight"] = torch.randn(7 * H, R, generator=g)
    return t


def flux_base(c_in: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """The matching tensors of a FLUX.1-dev checkpoint in BFL's layout (img_in with `c_in` inputs)."""
    g = torch.Generator().manual_seed(seed)
    b = {"img_in.weight": torch.randn(H, c_in, generator=g), "img_in.bias": torch.randn(H, generator=g)}
    for s in ("img", "txt"):
        b[f"double_blocks.0.{s}_attn.qkv.weight"] = torch.randn(3 * H, H, generator=g)
        b[f"double_blocks.0.{s}_attn.qkv.bias"] = torch.randn(3 * H, generator=g)
        for n in ("query", "key"):
            b[f"double_blocks.0.{s}_attn.norm.{n}_norm.scale"] = torch.ones(H // 2)
    for n in ("query", "key"):
        b[f"single_blocks.0.norm.{n}_norm.scale"] = torch.ones(H // 2)
    b["single_blocks.0.linear1.weight"] = torch.randn(7 * H, H, generator=g)
    b["final_layer.linear.weight"] = torch.randn(4, H, generator=g)
    return b


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_the_control_lora_is_read_with_img_in_widened(tmp_path: Path) -> None:
    a = read(_save(tmp_path / "depth.safetensors", control_lora()))
    assert not a.unsupported
    assert a.reshapes == {"img_in": (H, C_CONTROL)}
    assert a.modules["img_in"].bias is not None  # lora_B.bias: the bias delta
    assert "single_blocks.0.norm.key_norm.scale" in a.extras  # replaces the base's tensor
    # an img_in LoRA without the control LoRA's saved norms widens nothing
    plain = {k: v for k, v in control_lora().items() if not k.endswith("_norm.scale")}
    assert read(_save(tmp_path / "plain.safetensors", plain)).reshapes == {}


@pytest.mark.parametrize("c_in", [C_IN, C_CONTROL])
def test_merge_widens_img_in_and_replaces_the_norms(tmp_path: Path, c_in: int) -> None:
    """Into FLUX.1-dev (img_in 64 -> 128 inputs, zero-padded, then + B @ A) or a base whose img_in is
    already wide: every tensor equals numpy's (float64, 1e-6), the header carries the new shape."""
    t = control_lora()
    base = flux_base(c_in)
    out = tmp_path / "merged.safetensors"
    merge(_save(tmp_path / "base.safetensors", base), [_save(tmp_path / "depth.safetensors", t)], out)
    got = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("img_in.weight").get_shape() == [H, C_CONTROL]
    assert set(got) == set(base)

    def n(x: torch.Tensor) -> np.ndarray:
        return x.double().numpy()

    wide = np.zeros((H, C_CONTROL))
    wide[:, :c_in] = n(base["img_in.weight"])
    want = {"img_in.weight": wide + n(t["img_in.lora_B.weight"]) @ n(t["img_in.lora_A.weight"]),
            "img_in.bias": n(base["img_in.bias"]) + n(t["img_in.lora_B.bias"])}
    for s in ("img", "txt"):
        q = f"double_blocks.0.{s}_attn.qkv"
        want[f"{q}.weight"] = n(base[f"{q}.weight"]) + n(t[f"{q}.lora_B.weight"]) @ n(t[f"{q}.lora_A.weight"])
        want[f"{q}.bias"] = n(base[f"{q}.bias"]) + n(t[f"{q}.lora_B.bias"])
    lin = "single_blocks.0.linear1"
    want[f"{lin}.weight"] = n(base[f"{lin}.weight"]) + n(t[f"{lin}.lora_B.weight"]) @ n(t[f"{lin}.lora_A.weight"])
    for key, w in want.items():
        np.testing.assert_allclose(n(got[key]), w, rtol=0, atol=1e-5, err_msg=key)
    for key in base:
        if key.endswith("_norm.scale"):
            assert torch.equal(got[key], t[key]), key  # set, not added
    assert torch.equal(got["final_layer.linear.weight"], base["final_layer.linear.weight"])


def test_a_base_wider_than_the_reshape_is_refused(tmp_path: Path) -> None:
    from loratool.errors import IncompatibleError

    base = flux_base(2 * C_CONTROL)
    with pytest.raises(IncompatibleError, match=r"img_in.*would shrink img_in\.weight from \(16, 16\) to \(16, 8\)"):
        merge(_save(tmp_path / "base.safetensors", base), [_save(tmp_path / "d.safetensors", control_lora())],
              tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def comfy_spelling(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's convert_lora_bfl_control, done here from its rules (comfyanonymous/ComfyUI
    comfy/lora_convert.py at ee9834b8ca0d339c2bc0be3cf6ea8db02bc698df): `diffusion_model.` before every
    key, `.lora_B.bias` -> `.diff_b`, `_norm.scale` -> `_norm.scale.set_weight`, and
    `diffusion_model.img_in.reshape_weight` = [img_in lora_B rows, img_in lora_A columns] (int64)."""
    out = {}
    for k, v in t.items():
        if k.endswith(".lora_B.bias"):
            k = k[: -len(".lora_B.bias")] + ".diff_b"
        elif k.endswith("_norm.scale"):
            k = k + ".set_weight"
        out["diffusion_model." + k] = v
    out["diffusion_model.img_in.reshape_weight"] = torch.tensor(
        [t["img_in.lora_B.weight"].shape[0], t["img_in.lora_A.weight"].shape[1]])
    return out


def test_comfy_spelling_reads_and_merges_as_the_bfl_file(tmp_path: Path) -> None:
    """The same LoRA in ComfyUI's spelling reads to the same modules, bias deltas, norms and widening,
    and merges into FLUX.1-dev to the same bytes as BFL's file."""
    t = control_lora()
    bfl, comfy = _save(tmp_path / "bfl.safetensors", t), _save(tmp_path / "comfy.safetensors", comfy_spelling(t))
    a, b = read(bfl), read(comfy)
    assert not b.unsupported and b.reshapes == a.reshapes == {"img_in": (H, C_CONTROL)}
    assert set(b.modules) == set(a.modules) and set(b.extras) == set(a.extras)
    for name, m in a.modules.items():
        n = b.modules[name]
        assert torch.equal(n.down.load(), m.down.load()) and torch.equal(n.up.load(), m.up.load())
        assert (n.bias is None) == (m.bias is None) and n.scale == m.scale == 1.0
        if m.bias is not None and n.bias is not None:
            assert torch.equal(n.bias.load(), m.bias.load())
    base = _save(tmp_path / "base.safetensors", flux_base(C_IN))
    merge(base, [bfl], tmp_path / "m1.safetensors")
    merge(base, [comfy], tmp_path / "m2.safetensors")
    one, two = load_file(str(tmp_path / "m1.safetensors")), load_file(str(tmp_path / "m2.safetensors"))
    assert set(one) == set(two) == set(flux_base(C_IN))
    for key in one:
        assert one[key].dtype == two[key].dtype and torch.equal(one[key], two[key]), key


def test_comfy_spelling_with_a_wrong_reshape_weight_is_refused_by_name(tmp_path: Path) -> None:
    from loratool.errors import FormatError

    c = comfy_spelling(control_lora())
    c["diffusion_model.img_in.reshape_weight"] = torch.tensor([H, C_IN])
    with pytest.raises(FormatError, match=r"'diffusion_model\.img_in\.reshape_weight' holds \(16, 4\).*\(16, 8\)"):
        read(_save(tmp_path / "bad.safetensors", c))


def test_convert_to_comfyui_writes_comfys_spelling(tmp_path: Path) -> None:
    """convert --to comfyui of BFL's file (and of ComfyUI's own) writes exactly ComfyUI's conversion, key
    for key, tensor for tensor; ComfyUI's key map (tests/comfy_keymap.py) loads every key."""
    from comfy_keymap import not_loaded

    from loratool.ops.convert import convert

    t = control_lora()
    want = comfy_spelling(t)
    for src in (_save(tmp_path / "bfl.safetensors", t), _save(tmp_path / "comfy.safetensors", want)):
        out = tmp_path / f"out-{src.stem}.safetensors"
        convert(src, out, to="comfyui")
        got = load_file(str(out))
        assert set(got) == set(want)
        for key, v in want.items():
            assert got[key].dtype == v.dtype and torch.equal(got[key], v), key
        assert not_loaded("flux", got, flux_base(C_IN)) == []
        assert read(out).reshapes == {"img_in": (H, C_CONTROL)}


@pytest.mark.parametrize("target", ["kohya", "diffusers", "peft"])
def test_conversion_is_refused_by_name(tmp_path: Path, target: str) -> None:
    """No other writer keeps the widening (diffusers' x_embedder names, peft's wider img_in): convert
    names the module or the family problem and writes nothing."""
    from loratool.errors import IncompatibleError
    from loratool.formats import check_writable
    from loratool.ops.convert import convert

    src = _save(tmp_path / "depth.safetensors", control_lora())
    out = tmp_path / ("p" if target == "peft" else "o.safetensors")
    with pytest.raises(IncompatibleError, match=r"img_in|double_blocks\.0"):
        convert(src, out, to=target)
    assert not out.exists()
    with pytest.raises(IncompatibleError, match=r"module 'img_in' widens its base weight to \(16, 8\)"):
        check_writable(read(src), target)


def test_diffusers_converter_reads_the_control_pieces_as_loratool_does(tmp_path: Path) -> None:
    """diffusers' own `_convert_bfl_flux_control_lora_to_diffusers` (FLUX.1's 19 + 38 blocks, so the
    file is full-sized in names, tiny in width) on the same file: its x_embedder LoRA is our img_in
    module (down, up, bias delta), and its norm_q / norm_k / norm_added_q / norm_added_k weights are the
    `_norm.scale` tensors loratool replaces the base's with."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    from fixtures.families import flux_shapes

    g = torch.Generator().manual_seed(7)
    shapes = flux_shapes(H, 19, 38)
    shapes.update({"img_in": (H, C_CONTROL), "txt_in": (H, 8), "time_in.in_layer": (H, 8), "time_in.out_layer": (H, H),
                   "vector_in.in_layer": (H, 8), "vector_in.out_layer": (H, H), "guidance_in.in_layer": (H, 8),
                   "guidance_in.out_layer": (H, H), "final_layer.linear": (4, H),
                   "final_layer.adaLN_modulation.1": (2 * H, H)})
    for i in range(38):  # the converter splits linear1 at FLUX.1's real widths (3 x 3072 + 12288 rows)
        shapes[f"single_blocks.{i}.linear1"] = (3 * 3072 + 12288, H)
    t: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in shapes.items():
        t[f"{name}.lora_A.weight"] = torch.randn(R, in_f, generator=g)
        t[f"{name}.lora_B.weight"] = torch.randn(out_f, R, generator=g)
        t[f"{name}.lora_B.bias"] = torch.randn(out_f, generator=g)
    norms = {}
    for i in range(19):
        for s, (q, k) in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
            norms[f"double_blocks.{i}.{s}_attn.norm.query_norm.scale"] = f"transformer_blocks.{i}.attn.{q}.weight"
            norms[f"double_blocks.{i}.{s}_attn.norm.key_norm.scale"] = f"transformer_blocks.{i}.attn.{k}.weight"
    for i in range(38):
        norms[f"single_blocks.{i}.norm.query_norm.scale"] = f"single_transformer_blocks.{i}.attn.norm_q.weight"
        norms[f"single_blocks.{i}.norm.key_norm.scale"] = f"single_transformer_blocks.{i}.attn.norm_k.weight"
    for key in norms:
        t[key] = torch.randn(H // 2, generator=g)
    theirs = _convert_bfl_flux_control_lora_to_diffusers(dict(t))
    ours = read(_save(tmp_path / "depth.safetensors", t))
    assert not ours.unsupported and ours.reshapes == {"img_in": (H, C_CONTROL)}
    m = ours.modules["img_in"]
    assert m.bias is not None and m.scale == 1.0
    assert torch.equal(theirs["transformer.x_embedder.lora_A.weight"], m.down.load())
    assert torch.equal(theirs["transformer.x_embedder.lora_B.weight"], m.up.load())
    assert torch.equal(theirs["transformer.x_embedder.lora_B.bias"], m.bias.load())
    for bfl, diffusers_key in norms.items():
        assert torch.equal(theirs["transformer." + diffusers_key], ours.extras[bfl].load()), bfl


@pytest.mark.parametrize(("c_in", "ok"), [(C_IN, True), (C_CONTROL, True), (2 * C_CONTROL, False)])
def test_validate_base_agrees_with_merge(tmp_path: Path, c_in: int, ok: bool) -> None:
    """validate --base accepts the bases merge widens (and the already wide one), and reports the
    img_in mismatch of a base wider than the control LoRA."""
    from loratool.ops.validate import validate_adapter

    src = _save(tmp_path / "depth.safetensors", control_lora())
    report = validate_adapter(src, base=_save(tmp_path / "base.safetensors", flux_base(c_in))).to_dict()
    assert report["ok"] is ok
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert [f["code"] for f in errors] == ([] if ok else ["base-shape-mismatch"])


def test_comfy_spelling_validates_like_the_bfl_file(tmp_path: Path) -> None:
    """validate --base on ComfyUI's spelling: the same verdicts as on BFL's file (widened base accepted,
    a wider base reported)."""
    from loratool.ops.validate import validate_adapter

    src = _save(tmp_path / "comfy.safetensors", comfy_spelling(control_lora()))
    for c_in, ok in ((C_IN, True), (2 * C_CONTROL, False)):
        report = validate_adapter(src, base=_save(tmp_path / f"b{c_in}.safetensors", flux_base(c_in))).to_dict()
        assert report["ok"] is ok, c_in


def test_comfyui_refuses_a_control_lora_whose_scale_is_not_one(tmp_path: Path) -> None:
    """ComfyUI's spelling holds no alpha: a module at another scale is refused by name, not written wrong."""
    from loratool.errors import IncompatibleError
    from loratool.formats import check_writable

    a = read(_save(tmp_path / "depth.safetensors", control_lora()))
    a.modules["img_in"].alpha = 2.0 * a.modules["img_in"].rank
    assert a.modules["img_in"].scale == 2.0
    with pytest.raises(IncompatibleError, match=r"module 'img_in' .* has scale 2\.0"):
        check_writable(a, "comfyui")
