"""Per-module weights (--module-weights, --blocks) in merge, combine, rescale and verify.

The block layouts below are written out here from the documented LoRA Block Weight convention
(hako-mikan/sd-webui-lora-block-weight: BLOCKID17, BLOCKID26, BLOCKID12, BLOCKID20, BLOCKIDFLUX) and
the Wan block list, independently of loratool/formats/blocks.py, with one module name per block
in each dialect that names it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.errors import IncompatibleError
from loratool.formats import read
from loratool.formats.blocks import PRESETS, block_of, module_weights
from loratool.ops.combine import combine
from loratool.ops.merge import merge
from loratool.ops.rescale import rescale
from loratool.ops.verify import verify

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

IN = [f"IN{i:02d}" for i in range(12)]
OUT = [f"OUT{i:02d}" for i in range(12)]
LAYOUTS = {
    "sd15": ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"],
    "sd15-full": ["BASE", *IN, "M00", *OUT],
    "sdxl": ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"],
    "sdxl-full": ["BASE", *IN[:9], "M00", *OUT[:9]],
    "flux": ["CLIP", "T5", "IN", *[f"D{i:02d}" for i in range(19)], *[f"S{i:02d}" for i in range(38)], "OUT"],
    "wan": [f"B{i:02d}" for i in range(40)],
    "wan-1.3b": [f"B{i:02d}" for i in range(30)],
}

# one module name per block, in the dialects users meet: kohya (LDM and diffusers naming),
# diffusers / PEFT dotted names, original checkpoint keys
UNET_NAMES = {
    "BASE": ["lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_3_mlp_fc1",
             "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
             "text_encoder.text_model.encoder.layers.0.mlp.fc2"],
    "IN00": ["lora_unet_conv_in", "lora_unet_input_blocks_0_0"],
    "IN01": ["lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.resnets.0.conv1",
             "lora_unet_input_blocks_1_1_proj_in"],
    "IN02": ["lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q",
             "lora_unet_input_blocks_2_1_proj_out"],
    "IN03": ["lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_input_blocks_3_0_op"],
    "IN04": ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
             "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"],
    "IN05": ["unet.down_blocks.1.attentions.1.proj_in", "lora_unet_input_blocks_5_1_proj_out"],
    "IN06": ["lora_unet_down_blocks_1_downsamplers_0_conv"],
    "IN07": ["lora_unet_down_blocks_2_attentions_0_proj_in", "lora_unet_input_blocks_7_1_proj_in"],
    "IN08": ["lora_unet_down_blocks_2_resnets_1_conv2", "lora_unet_input_blocks_8_1_proj_in"],
    "IN09": ["lora_unet_down_blocks_2_downsamplers_0_conv"],
    "IN10": ["lora_unet_down_blocks_3_resnets_0_conv1", "lora_unet_input_blocks_10_0_in_layers_2"],
    "IN11": ["lora_unet_down_blocks_3_resnets_1_conv1"],
    "M00": ["lora_unet_mid_block_attentions_0_proj_in", "lora_unet_middle_block_1_proj_out",
            "unet.mid_block.resnets.1.conv2"],
    "OUT00": ["lora_unet_up_blocks_0_resnets_0_conv1", "lora_unet_output_blocks_0_1_proj_in"],
    "OUT01": ["lora_unet_up_blocks_0_attentions_1_proj_in"],
    "OUT02": ["lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_up_blocks_0_resnets_2_conv1"],
    "OUT03": ["lora_unet_up_blocks_1_attentions_0_proj_in",
              "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"],
    "OUT04": ["lora_unet_up_blocks_1_attentions_1_proj_in"],
    "OUT05": ["lora_unet_up_blocks_1_attentions_2_proj_out", "lora_unet_up_blocks_1_upsamplers_0_conv"],
    "OUT06": ["lora_unet_up_blocks_2_attentions_0_proj_in"],
    "OUT07": ["lora_unet_up_blocks_2_attentions_1_proj_in"],
    "OUT08": ["lora_unet_up_blocks_2_attentions_2_proj_in", "lora_unet_output_blocks_8_1_proj_in"],
    "OUT09": ["lora_unet_up_blocks_3_attentions_0_proj_in"],
    "OUT10": ["lora_unet_up_blocks_3_attentions_1_proj_in"],
    "OUT11": ["lora_unet_up_blocks_3_attentions_2_proj_out", "lora_unet_output_blocks_11_1_proj_out"],
    None: ["lora_unet_time_embedding_linear_1", "lora_unet_conv_out", "lora_unet_time_embed_0"],
}
FLUX_NAMES = {
    "CLIP": ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
             "text_encoder.text_model.encoder.layers.1.mlp.fc1"],
    "T5": ["lora_te3_encoder_block_0_layer_0_SelfAttention_q",
           "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"],
    "IN": ["lora_unet_img_in", "lora_unet_txt_in", "lora_unet_time_in_in_layer", "transformer.x_embedder",
           "transformer.context_embedder"],
    "D00": ["lora_unet_double_blocks_0_img_attn_qkv", "transformer.transformer_blocks.0.attn.to_q"],
    "D18": ["lora_unet_double_blocks_18_txt_mlp_2", "transformer.transformer_blocks.18.ff.net.2"],
    "S00": ["lora_unet_single_blocks_0_linear1", "transformer.single_transformer_blocks.0.proj_out"],
    "S37": ["lora_unet_single_blocks_37_linear2", "transformer.single_transformer_blocks.37.attn.to_k"],
    "OUT": ["lora_unet_final_layer_linear", "transformer.proj_out", "transformer.norm_out.linear"],
}
WAN_NAMES = {
    "B00": ["diffusion_model.blocks.0.self_attn.q", "lora_unet_blocks_0_cross_attn_k",
            "transformer.blocks.0.attn1.to_q"],
    "B29": ["diffusion_model.blocks.29.ffn.0"],
    "B39": ["lora_unet_blocks_39_ffn_2", "diffusion_model.blocks.39.self_attn.o"],
    None: ["diffusion_model.head.head", "diffusion_model.text_embedding.0"],
}
FAMILY_NAMES = {"sd15": UNET_NAMES, "sd15-full": UNET_NAMES, "sdxl": UNET_NAMES, "sdxl-full": UNET_NAMES,
                "flux": FLUX_NAMES, "wan": WAN_NAMES, "wan-1.3b": WAN_NAMES}


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_preset_layout_matches_the_convention(preset):
    assert list(PRESETS[preset].blocks) == LAYOUTS[preset]


@pytest.mark.parametrize("preset", sorted(LAYOUTS))
def test_each_weight_reaches_exactly_its_block(preset):
    layout = LAYOUTS[preset]
    names = {block: ns for block, ns in FAMILY_NAMES[preset].items() if block is None or block in layout}
    everything = [n for ns in names.values() for n in ns]
    for i, block in enumerate(layout):
        weights = ["0"] * len(layout)
        weights[i] = "0.25"
        got = module_weights(everything, blocks=f"{preset}:{','.join(weights)}")
        for b, ns in names.items():
            for n in ns:
                want = 1.0 if b is None else (0.25 if b == block else 0.0)
                assert got.weights[n] == want, (preset, block, n)
        assert sorted(got.outside) == sorted(names.get(None, []))


@pytest.mark.parametrize("family,names", [("unet", UNET_NAMES), ("flux", FLUX_NAMES), ("wan", WAN_NAMES)])
def test_block_of_every_dialect(family, names):
    for block, ns in names.items():
        for n in ns:
            assert block_of(n, family) == block, n


def test_block_outside_the_short_layout_is_refused():
    with pytest.raises(IncompatibleError, match=r"block IN03, which the sd15 layout \(17 weights\)") as e:
        module_weights(["lora_unet_input_blocks_3_0_op"], blocks="sd15:" + ",".join(["1"] * 17))
    assert "sd15-full" in (e.value.hint or "")


@pytest.mark.parametrize("spec,match", [("sd15:1,1", "2 weight"), ("sd3:1", "preset of"), ("sdxl", "PRESET:"),
                                        ("sdxl:" + ",".join(["x"] * 12), "numbers"),
                                        ("sdxl:" + ",".join(["nan"] * 12), "finite")])
def test_bad_blocks_specs(spec, match):
    with pytest.raises(IncompatibleError, match=match):
        module_weights(["a"], blocks=spec)


def test_module_weights_first_match_wins():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.10.mlp.up_proj"]
    got = module_weights(names, module_weights=r"layers\.1\d\.=0, mlp=0.5, .*=2")
    assert got.weights == {names[0]: 2.0, names[1]: 0.5, names[2]: 0.0}
    got = module_weights(names, module_weights=r"layers\.[0-9]{1,2}\.mlp=3")  # a regex with a comma
    assert got.weights == {names[0]: 1.0, names[1]: 3.0, names[2]: 3.0}
    with pytest.raises(IncompatibleError, match="not a regular expression"):
        module_weights(names, module_weights="(=1")
    with pytest.raises(IncompatibleError, match="cannot read"):
        module_weights(names, module_weights="mlp:0.5")


# ---------------------------------------------------------------------------------------------
# the operations: all ones is the plain operation, bit for bit; zeros remove exactly those blocks

KOHYA = FIXTURES / "kohya_sd.safetensors"
SD_BASE = FIXTURES / "base_sd.safetensors"
ONES_SDXL_FULL = "sdxl-full:" + ",".join(["1"] * 20)


def _tensors(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    out = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            out[k] = v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() + str(v.dtype).encode()
    return out


def test_merge_all_ones_is_plain_merge_bit_for_bit(tmp_path):
    plain, ones = tmp_path / "plain.safetensors", tmp_path / "ones.safetensors"
    merge(SD_BASE, [KOHYA], plain, weights=[0.8])
    merge(SD_BASE, [KOHYA], ones, weights=[0.8], blocks=ONES_SDXL_FULL, module_weights=".*=1")
    assert _tensors(plain) == _tensors(ones)


def test_merge_zero_blocks_leave_exactly_those_modules_out(tmp_path):
    # BASE (text encoder) and IN04 to 0, everything else 1
    weights = ["1"] * 20
    weights[0] = weights[5] = "0"
    out = tmp_path / "m.safetensors"
    report = merge(SD_BASE, [KOHYA], out, blocks="sdxl-full:" + ",".join(weights))
    adapter = read(KOHYA)
    gone = {n for n in adapter.modules if n.startswith("lora_te1_") or n.startswith("lora_unet_input_blocks_4_")}
    assert len(gone) == 9 and report.merged == len(adapter.modules) - len(gone)
    base, merged = load_file(str(SD_BASE)), load_file(str(out))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert len(changed) == len(adapter.modules) - len(gone)
    assert not any(k.startswith("conditioner.") or ".input_blocks.4." in k for k in changed)
    # verify knows what was asked for
    assert verify(out, SD_BASE, [KOHYA], blocks="sdxl-full:" + ",".join(weights)).ok
    assert not verify(out, SD_BASE, [KOHYA]).ok


def test_merge_block_weight_scales_the_delta(tmp_path):
    weights = ["1"] * 20
    weights[0] = "0.5"  # the text encoder at half strength
    half = tmp_path / "half.safetensors"
    merge(SD_BASE, [KOHYA], half, blocks="sdxl-full:" + ",".join(weights))
    report = verify(half, SD_BASE, [KOHYA])
    te = [t for t in report.tensors if t.key.startswith("conditioner.") and t.expected == "merged"]
    assert te and all(t.verdict == "wrong weight" and abs(t.factor - 0.5) < 0.02 for t in te)
    assert all(t.verdict == "merged" for t in report.tensors if t.expected == "merged" and t not in te)


def test_combine_all_ones_and_zeros(tmp_path):
    a = FIXTURES / "diffusers_sd.safetensors"
    plain, ones, zeros = tmp_path / "p.safetensors", tmp_path / "o.safetensors", tmp_path / "z.safetensors"
    combine([a, a], plain, weights=[0.7, 0.3], method="cat")
    combine([a, a], ones, weights=[0.7, 0.3], method="cat", blocks=ONES_SDXL_FULL)
    assert _tensors(plain) == _tensors(ones)
    mw = r"attn1\.to_(q|k)=0"
    report = combine([a, a], zeros, weights=[0.7, 0.3], method="cat", module_weights=mw)
    names = set(read(a).modules)
    kept = {m.name for m in report.modules}
    assert kept == {n for n in names if not n.endswith(("attn1.to_q", "attn1.to_k"))} and len(kept) == 4


def test_rescale_per_module_factors(tmp_path):
    plain, ones, mixed = tmp_path / "p.safetensors", tmp_path / "o.safetensors", tmp_path / "m.safetensors"
    rescale(KOHYA, plain, mode="factor", value=0.5)
    rescale(KOHYA, ones, mode="factor", value=0.5, blocks=ONES_SDXL_FULL)
    assert _tensors(plain) == _tensors(ones)
    report = rescale(KOHYA, mixed, mode="factor", value=0.5, module_weights="lora_te1_=0,attn1_to_q=2")
    adapter = read(KOHYA)
    assert report.removed == [n for n in adapter.modules if n.startswith("lora_te1_")]
    factors = {m.name: m.delta_factor for m in report.modules}
    assert factors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == 1.0
    assert {v for k, v in factors.items() if not k.endswith("attn1_to_q")} == {0.5}
    written = load_file(str(mixed))
    assert not any(k.startswith("lora_te1_") for k in written)
    with pytest.raises(IncompatibleError, match="go with --factor"):
        rescale(KOHYA, tmp_path / "x.safetensors", mode="normalize", blocks=ONES_SDXL_FULL)


def test_cli_options(tmp_path, capsys):
    from loratool.cli import main

    out = tmp_path / "r.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["rescale", str(KOHYA), "-o", str(out), "--module-weights", "lora_te1_=0", "--json"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(SD_BASE), str(KOHYA), "-o", str(tmp_path / "m.safetensors"), "--blocks", "sdxl:1,1"])
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and err.startswith("Error: --blocks sdxl: 2 weight(s) given, the layout has 12: BASE,")


def test_zero_weight_base_tensor_unchanged_in_sharded_merge(tmp_path):
    """A module at weight 0 leaves its base tensor byte for byte (copied, not re-cast)."""
    base = tmp_path / "b.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(32, 48, generator=gen).to(torch.bfloat16),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=gen).to(torch.bfloat16),
               "model.layers.0.self_attn.v_proj.weight": torch.randn(16, 32, generator=gen).to(torch.bfloat16)},
              str(base))
    from factories import build_adapter

    adapter = build_adapter(tmp_path, seed=3)
    out = tmp_path / "m.safetensors"
    report = merge(base, [adapter], out, module_weights="mlp=0")
    assert report.merged == 2 and report.copied == 1
    assert _tensors(base)["model.layers.0.mlp.down_proj.weight"] == _tensors(out)["model.layers.0.mlp.down_proj.weight"]
