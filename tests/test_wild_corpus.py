"""Every command on files laid out as other tools write them (fixtures/wild.py; issues #11, #15).

For each layout: inspect finds the format, the module count and (where one applies) the family;
validate passes; a round trip through another format gives the same deltas as a numpy reference
computed here from the raw tensors; resize to a lower rank works; merge into a tiny base laid out as
the tool's model is W + ΔW by the same reference. The reference reads alpha the way the writing
tool means it: the 0-d `.alpha` tensor, else the header / config alpha, else the rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures.wild import LAYOUTS, H, Layout, write_layout
from loratool.errors import IncompatibleError
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge
from loratool.ops.resize import resize
from loratool.ops.validate import validate_adapter

PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))
PLAIN = [n for n, lay in LAYOUTS.items() if not lay.lycoris and "dora" not in n]


def raw_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors" if path.is_dir() else path)


def reference_deltas(sd: dict[str, torch.Tensor], header_alpha: float | None) -> dict[str, np.ndarray]:
    """stem -> ΔW (float64, conv flattened to (out, in·kh·kw)) from a tool's raw LoRA tensors."""
    out: dict[str, np.ndarray] = {}
    for key, down in sd.items():
        for dsuf, usuf in PAIRS:
            if not key.endswith(dsuf):
                continue
            stem = key[: -len(dsuf)]
            up = sd[stem + usuf].double().numpy()
            d = down.double().numpy()
            rank = d.shape[0]
            if stem + ".alpha" in sd:
                alpha = float(sd[stem + ".alpha"].double())
            else:
                alpha = header_alpha if header_alpha is not None else rank
            out[stem] = (alpha / rank) * (up.reshape(up.shape[0], rank) @ d.reshape(rank, -1))
    return out


def loratool_deltas(path: Path) -> dict[str, np.ndarray]:
    """name -> ΔW as loratool reads a file it wrote (the maths done here in numpy)."""
    a = read(path)
    out = {}
    for name, m in a.modules.items():
        d = m.down.load().double().numpy()
        u = m.up.load().double().numpy()
        out[name] = m.scale * (u.reshape(u.shape[0], m.rank) @ d.reshape(m.rank, -1))  # (out, in) always
    return out


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(b).max()))))


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> Layout:
    return LAYOUTS[request.param]


def test_inspect_and_validate(tmp_path: Path, layout: Layout) -> None:
    path = write_layout(layout, tmp_path)
    doc = inspect_adapter(path).to_dict()
    assert doc["format"] == layout.format
    assert doc["num_modules"] + doc.get("num_lycoris", 0) == layout.modules
    if layout.lycoris:
        assert doc["num_lycoris"] == layout.modules
    if layout.family is not None:
        fam = doc["family"]
        # Flux.1 and HunyuanVideo share their diffusers module names: detection may honestly say "ambiguous"
        assert fam["family"] == layout.family or (fam["ambiguous"] and layout.family in fam["tied"]), fam
    report = validate_adapter(path)
    assert report.ok, [f.message for f in report.findings]


@pytest.mark.parametrize("name", PLAIN)
def test_alpha_as_the_tool_means_it(tmp_path: Path, name: str) -> None:
    """Each module's scale is what the writing tool means (tensor alpha, header/config alpha, or rank)."""
    lay = LAYOUTS[name]
    path = write_layout(lay, tmp_path)
    ref = reference_deltas(raw_tensors(path), lay.header_alpha)
    got = loratool_deltas(path)
    assert len(got) == len(ref) == lay.modules - sum(k.endswith(".diff") for k in raw_tensors(path))
    # names differ by dialect (prefixes, dots), so pair by the stem's tail
    for stem, delta in ref.items():
        tail = stem.removeprefix("base_model.model.")
        matches = [n for n in got if n == tail or n.endswith(tail) or tail.endswith(n)]
        assert len(matches) == 1, (stem, matches)
        g = got[matches[0]]
        assert _close(g.reshape(delta.shape), delta), stem


# Round trips: (layout, intermediate format, the source's own format, --family for the way back).
ROUND_TRIPS = [
    ("kohya_sd15", "peft", "kohya", None),  # lora_te_ came back as SDXL's lora_te1_
    ("kohya_sdxl", "peft", "kohya", None),
    ("kohya_sd3", "peft", "kohya", "sd3"),
    ("aitoolkit_flux", "kohya", "diffusers", "flux.1"),
    ("simpletuner_flux", "peft", "diffusers", "flux.1"),
    ("diffusers_sd15_train", "peft", "diffusers", None),
    # SDXL keeps lora_te1_ (the SD1/2 rule must not fire); OneTrainer names the U-Net's diffusers side
    # under lora_unet_, kohya the original (SGM) side: the kohya file has the same modules in SGM names
    ("onetrainer_sdxl", "peft", "kohya", None),
    ("diffusers_sdxl_train", "kohya", "diffusers", None),
    ("musubi_wan", "peft", "kohya", "wan"),
    ("musubi_hunyuan_video", "peft", "kohya", "hunyuan-video"),
    ("musubi_qwen_image", "peft", "kohya", "qwen-image"),
    ("comfyui_flux_lorasave", "peft", "comfyui", "flux.1"),
    ("comfyui_flux_ab", "kohya", "comfyui", "flux.1"),
    ("peft_llama", "kohya", "peft", None),
    ("peft_qwen2", "kohya", "peft", None),
    ("peft_gemma", "kohya", "peft", None),
    ("peft_phi3", "kohya", "peft", None),
    ("peft_bert", "kohya", "peft", None),
]


def _out(tmp_path: Path, stem: str, fmt: str) -> Path:
    return tmp_path / (stem if fmt == "peft" else f"{stem}.safetensors")


@pytest.mark.parametrize(("name", "via", "back_to", "family"), ROUND_TRIPS)
def test_convert_and_back(tmp_path: Path, name: str, via: str, back_to: str, family: str | None) -> None:
    """Source -> another format -> the source's own format: the same module names and deltas."""
    lay = LAYOUTS[name]
    src = write_layout(lay, tmp_path)
    ref = reference_deltas(raw_tensors(src), lay.header_alpha)
    mid, back = _out(tmp_path, "mid", via), _out(tmp_path, "back", back_to)
    convert(src, mid, to=via, family=family if via != "peft" else None)
    convert(mid, back, to=back_to, family=family)
    got = loratool_deltas(back)
    src_names = list(read(src).modules)
    written = {n: _kohya_sdxl_name(n) if name == "onetrainer_sdxl" else
               _kohya_hunyuan_name(n) if name == "musubi_hunyuan_video" else n for n in src_names}
    assert set(got) == set(written.values())
    for n in src_names:
        stem = next(k for k in ref if k.removeprefix("base_model.model.") == n)
        assert _close(got[written[n]].reshape(ref[stem].shape), ref[stem]), n


def _kohya_sdxl_name(name: str) -> str:
    """A OneTrainer SDXL U-Net name (diffusers side) as kohya names it (original side), by the table."""
    from loratool.families import get

    fam = get("sdxl")
    ident = fam.identify(name, "onetrainer")
    return name if ident is None else fam.name_in("kohya", ident[0].original, original=True)


def _kohya_hunyuan_name(name: str) -> str:
    """A musubi-tuner HunyuanVideo name (Tencent's spelling) as loratool writes kohya: ComfyUI's
    module names (issue 25: `img_mod_linear` -> `img_mod_lin`, `time_in_mlp_0` -> `time_in_in_layer`)."""
    from loratool.families import get

    fam = get("hunyuan-video")
    ident = fam.identify(name, "kohya")
    assert ident is not None and ident[2] is None
    path = ident[0].original if ident[1] is None else ident[0].original.replace("{i}", str(ident[1]))
    return fam.name_in("kohya", path, original=True)


@pytest.mark.parametrize(("name", "to", "what"), [
    ("kohya_flux_t5", "peft", "a text encoder"),            # one PEFT adapter cannot hold two models' modules
    ("kohya_flux_t5", "diffusers", "text-encoder modules"),  # T5 names cannot be recovered from underscores
    ("peft_gpt2", "kohya", "fan_in_fan_out"),               # kohya files cannot hold Conv1D layers
])
def test_convert_refusals_name_the_file_and_module(tmp_path: Path, name: str, to: str, what: str) -> None:
    src = write_layout(LAYOUTS[name], tmp_path)
    r = run_cli(["convert", src, "--to", to, "-o", _out(tmp_path, "out", to)])
    assert r.code == 2, r.err
    lines = [ln for ln in r.err.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and str(src) in lines[0] and what in lines[0], r.err
    assert "Traceback" not in r.err


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resize_to_a_lower_rank(tmp_path: Path, name: str) -> None:
    lay = LAYOUTS[name]
    src = write_layout(lay, tmp_path)
    if lay.lycoris:
        out = tmp_path / "lora.safetensors"
        if "dora" in name:  # a LoHa with a DoRA magnitude is no plain LoRA: refused, with a hint to merge
            with pytest.raises(IncompatibleError, match="weight decomposition"):
                convert(src, out, to="lora")
            return
        convert(src, out, to="lora")
        src = out
    out = tmp_path / ("small" if lay.config is not None else "small.safetensors")
    report = resize(src, out, rank=2)
    a = read(out)
    if name == "onetrainer_flux_dora":  # per-input-column DoRA magnitudes: kept as they are, (1, in)
        mags = {k: v for k, v in raw_tensors(src).items() if k.endswith(".dora_scale")}
        assert mags and all(torch.equal(raw_tensors(out)[k], v) for k, v in mags.items())
        assert {m.dora_axis for m in a.modules.values()} == {"in"}
    assert len(a.modules) + len(a.lycoris) == lay.modules  # full diffs (.diff) stay as they are
    def diffs(p: Path) -> dict[str, torch.Tensor]:  # dialect-free names: '_' for '.', no prefix
        return {k.replace(".", "_").removeprefix("lora_unet_").removeprefix("diffusion_model_"): v
                for k, v in raw_tensors(p).items() if k.endswith((".diff", ".diff_b"))}

    before, after = diffs(src), diffs(out)
    assert set(before) == set(after), "bias / full diffs dropped"
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert max(m.rank for m in a.modules.values()) <= 2
    assert report.to_dict()


# ------------------------------------------------------------------------------------------------
# merge into a tiny base laid out as the tool's model


def _base(tmp_path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    tensors = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    path = tmp_path / "base.safetensors"
    save_file(tensors, path)
    return path, tensors


def _merge_case(tmp_path: Path, name: str, base_of: dict[str, str], transpose: bool = False) -> None:
    """base_of: raw stem -> base key; the base holds W for those (plus one untouched tensor)."""
    lay = LAYOUTS[name]
    src = write_layout(lay, tmp_path)
    ref = reference_deltas(raw_tensors(src), lay.header_alpha)
    shapes: dict[str, tuple[int, ...]] = {}
    for stem, key in base_of.items():
        out, inp = ref[stem].shape
        shapes[key] = (inp, out) if transpose else (out, inp)
    shapes["untouched.weight"] = (3, 3)
    base, w = _base(tmp_path, shapes)
    out = tmp_path / "merged.safetensors"
    merge(base, [src], out, allow_unmatched=False)
    got = load_file(out)
    assert set(got) == set(w)
    for stem, key in base_of.items():
        d = ref[stem].T if transpose else ref[stem]
        np.testing.assert_allclose(got[key].double().numpy(), w[key].double().numpy() + d, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["untouched.weight"], w["untouched.weight"])


def test_merge_musubi_wan_into_a_wan_checkpoint(tmp_path: Path) -> None:
    stems = {f"lora_unet_blocks_0_{a}_{p}": f"blocks.0.{a}.{p}.weight"
             for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o")}
    stems |= {"lora_unet_blocks_0_ffn_0": "blocks.0.ffn.0.weight", "lora_unet_blocks_0_ffn_2": "blocks.0.ffn.2.weight"}
    _merge_case(tmp_path, "musubi_wan", stems)


def test_merge_peft_llama_into_a_llama_checkpoint(tmp_path: Path) -> None:
    lay = LAYOUTS["peft_llama"]
    stems = {k.removesuffix(".lora_A.weight"): k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
             + ".weight" for k in lay.build() if k.endswith(".lora_A.weight")}
    _merge_case(tmp_path, "peft_llama", stems)


def test_merge_peft_gpt2_into_conv1d_weights(tmp_path: Path) -> None:
    lay = LAYOUTS["peft_gpt2"]
    stems = {k.removesuffix(".lora_A.weight"): k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
             + ".weight" for k in lay.build() if k.endswith(".lora_A.weight")}
    _merge_case(tmp_path, "peft_gpt2", stems, transpose=True)


def test_merge_comfyui_flux_into_a_bfl_checkpoint(tmp_path: Path) -> None:
    lay = LAYOUTS["comfyui_flux_ab"]
    stems = {k.removesuffix(".lora_A.weight"): "model." + k.removesuffix(".lora_A.weight") + ".weight"
             for k in lay.build() if k.endswith(".lora_A.weight")}
    _merge_case(tmp_path, "comfyui_flux_ab", stems)


# ------------------------------------------------------------------------------------------------
# a few through the command line: exit codes and one JSON document


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cli_inspect_and_validate(tmp_path: Path, name: str) -> None:
    path = write_layout(LAYOUTS[name], tmp_path)
    r = run_cli(["inspect", path, "--json"])
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["format"] == LAYOUTS[name].format
    r = run_cli(["validate", path, "--json"])
    assert r.code == 0, r.err
    assert "Traceback" not in r.err


def test_cli_resize_keeps_a_single_file_in_its_dialect(tmp_path: Path) -> None:
    path = write_layout(LAYOUTS["musubi_qwen_image"], tmp_path)
    out = tmp_path / "small.safetensors"
    r = run_cli(["resize", path, "-r", "2", "-o", out])
    assert r.code == 0, r.err
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("lora_unet_transformer_blocks_0_") for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) == LAYOUTS["musubi_qwen_image"].modules


# ------------------------------------------------------------------------------------------------
# across dialects of a family: fused BFL modules are the row-stacked split deltas

FLUX_FUSED = {  # BFL (kohya stem tail) -> the diffusers modules (OneTrainer stem tails) stacked by rows
    "double_blocks_0_img_attn_qkv": ["transformer_blocks_0_attn_to_q", "transformer_blocks_0_attn_to_k",
                                     "transformer_blocks_0_attn_to_v"],
    "double_blocks_0_txt_attn_qkv": ["transformer_blocks_0_attn_add_q_proj", "transformer_blocks_0_attn_add_k_proj",
                                     "transformer_blocks_0_attn_add_v_proj"],
    "double_blocks_0_img_attn_proj": ["transformer_blocks_0_attn_to_out_0"],
    "double_blocks_0_txt_attn_proj": ["transformer_blocks_0_attn_to_add_out"],
    "double_blocks_0_img_mlp_0": ["transformer_blocks_0_ff_net_0_proj"],
    "double_blocks_0_img_mlp_2": ["transformer_blocks_0_ff_net_2"],
    "double_blocks_0_img_mod_lin": ["transformer_blocks_0_norm1_linear"],
    "single_blocks_0_linear1": ["single_transformer_blocks_0_attn_to_q", "single_transformer_blocks_0_attn_to_k",
                                "single_transformer_blocks_0_attn_to_v", "single_transformer_blocks_0_proj_mlp"],
    "single_blocks_0_linear2": ["single_transformer_blocks_0_proj_out"],
    "single_blocks_0_modulation_lin": ["single_transformer_blocks_0_norm_linear"],
}


@pytest.mark.parametrize("to", ["kohya", "comfyui"])
def test_onetrainer_flux_to_the_original_layout(tmp_path: Path, to: str) -> None:
    src = write_layout(LAYOUTS["onetrainer_flux"], tmp_path)
    ref = reference_deltas(raw_tensors(src), None)
    out = tmp_path / "out.safetensors"
    convert(src, out, to=to, family="flux.1")
    got = reference_deltas(raw_tensors(out), None)  # kohya / comfyui files carry their alpha tensors
    prefix = "lora_unet_" if to == "kohya" else "diffusion_model."
    transformer = {k: v for k, v in got.items() if "te1" not in k}
    assert len(transformer) == len(FLUX_FUSED)
    for bfl, parts in FLUX_FUSED.items():
        stem = prefix + (bfl if to == "kohya" else _bfl_dotted(bfl))
        want = np.concatenate([ref["lora_transformer_" + p] for p in parts], axis=0)
        assert _close(got[stem], want), stem
    te = "lora_te1_text_model_encoder_layers_0_self_attn_v_proj"
    assert any(k.endswith("text_model_encoder_layers_0_self_attn_v_proj") or
               k.endswith("text_model.encoder.layers.0.self_attn.v_proj") for k in got), sorted(got)
    te_out = next(k for k in got if "self_attn" in k)
    assert _close(got[te_out], ref[te])


def _bfl_dotted(tail: str) -> str:
    """'double_blocks_0_img_attn_qkv' -> 'double_blocks.0.img_attn.qkv' (BFL module paths)."""
    head, idx, rest = tail.split("_", 3)[0] + "_" + tail.split("_", 3)[1], tail.split("_", 3)[2], tail.split("_", 3)[3]
    for two in ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod"):
        if rest.startswith(two + "_"):
            return f"{head}.{idx}.{two}.{rest[len(two) + 1:]}"
    return f"{head}.{idx}.{rest.replace('_', '.')}"


def test_alpha_tensor_and_header_alpha_that_disagree_are_refused(tmp_path: Path) -> None:
    sd = LAYOUTS["comfyui_flux_ab"].build()
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4})}  # the tensors say 8
    path = tmp_path / "x.safetensors"
    save_file(sd, path, metadata=meta)
    r = run_cli(["inspect", path])
    assert r.code == 2
    assert [ln for ln in r.err.splitlines() if ln.startswith("Error:")] and "disagree about lora_alpha" in r.err
    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})})
    assert {m.alpha_source for m in read(path).modules.values()} == {"tensor"}


def test_merge_wan_lora_with_bias_and_norm_diffs(tmp_path: Path) -> None:
    """lightx2v-style Wan file: LoRA deltas, `.diff_b` bias deltas and a full `.diff` on a norm."""
    lay = LAYOUTS["comfyui_wan_diff_b"]
    src = write_layout(lay, tmp_path)
    raw = raw_tensors(src)
    ref = reference_deltas(raw, None)
    shapes: dict[str, tuple[int, ...]] = {}
    for stem, d in ref.items():
        key = "model." + stem
        shapes[key + ".weight"] = d.shape
        if stem + ".diff_b" in raw:
            shapes[key + ".bias"] = (d.shape[0],)
    shapes["model.diffusion_model.blocks.0.norm3.weight"] = (H,)
    shapes["model.diffusion_model.blocks.0.norm3.bias"] = (H,)
    base, w = _base(tmp_path, shapes)
    out = tmp_path / "merged.safetensors"
    merge(base, [src], out)
    got = {k: v.double().numpy() for k, v in load_file(out).items()}
    want = {k: v.double().numpy() for k, v in w.items()}
    for stem, d in ref.items():
        want["model." + stem + ".weight"] += d
    for key, t in raw.items():
        if key.endswith(".diff_b"):
            want["model." + key.removesuffix(".diff_b") + ".bias"] += t.double().numpy()
        elif key.endswith(".diff"):
            want["model." + key.removesuffix(".diff") + ".weight"] += t.double().numpy()
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_merge_lycoris_dora_into_an_sdxl_checkpoint(tmp_path: Path) -> None:
    """LyCORIS DoRA (wd_on_out=True): W' = dora_scale · (W + ΔW) / ||W + ΔW|| per output row."""
    lay = LAYOUTS["lycoris_locon_dora_sdxl"]
    src = write_layout(lay, tmp_path)
    raw = raw_tensors(src)
    ref = reference_deltas(raw, None)
    keys = {stem: "model.diffusion_model." + stem.removeprefix("lora_unet_")
            .replace("input_blocks_4_1_transformer_blocks_0_", "input_blocks.4.1.transformer_blocks.0.")
            .replace("attn1_to_", "attn1.to_").replace("ff_net_2", "ff.net.2") + ".weight" for stem in ref}
    base, w = _base(tmp_path, {keys[s]: d.shape for s, d in ref.items()})
    out = tmp_path / "merged.safetensors"
    merge(base, [src], out)
    got = load_file(out)
    for stem, d in ref.items():
        v = w[keys[stem]].double().numpy() + d
        m = raw[stem + ".dora_scale"].double().numpy()  # (out, 1)
        want = m * v / np.linalg.norm(v, axis=1, keepdims=True)
        np.testing.assert_allclose(got[keys[stem]].double().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=stem)


def test_merge_lycoris_loha_dora_per_input_column(tmp_path: Path) -> None:
    """LyCORIS LoHa with DoRA, wd_on_out=False: W' = dora_scale · V / (||V||_column + eps), V = W + ΔW,
    ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha / r, eps = float32's (lycoris/functional/general.py)."""
    lay = LAYOUTS["lycoris_loha_dora_sdxl"]
    src = write_layout(lay, tmp_path)
    raw = {k: v.double().numpy() for k, v in raw_tensors(src).items()}
    stems = sorted({k.rsplit(".", 1)[0] for k in raw})
    keys = {s: "model.diffusion_model." + s.removeprefix("lora_unet_")
            .replace("input_blocks_4_1_transformer_blocks_0_", "input_blocks.4.1.transformer_blocks.0.")
            .replace("attn1_to_", "attn1.to_").replace("ff_net_2", "ff.net.2") + ".weight" for s in stems}
    shapes = {keys[s]: (raw[s + ".hada_w1_a"].shape[0], raw[s + ".hada_w1_b"].shape[1]) for s in stems}
    base, w = _base(tmp_path, shapes)
    out = tmp_path / "merged.safetensors"
    merge(base, [src], out)
    got = load_file(out)
    for s in stems:
        r = raw[s + ".hada_w1_b"].shape[0]
        d = (raw[s + ".hada_w1_a"] @ raw[s + ".hada_w1_b"]) * (raw[s + ".hada_w2_a"] @ raw[s + ".hada_w2_b"])
        v = w[keys[s]].double().numpy() + d * float(raw[s + ".alpha"]) / r
        want = raw[s + ".dora_scale"] * v / (np.linalg.norm(v, axis=0, keepdims=True) + np.finfo(np.float32).eps)
        np.testing.assert_allclose(got[keys[s]].double().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=s)


@pytest.mark.parametrize(("name", "prefixes"), [
    ("diffusers_sd15_train", {"lora_te_", "lora_unet_"}),              # SD1/2: one text encoder, lora_te_
    ("diffusers_sdxl_train", {"lora_te1_", "lora_te2_", "lora_unet_"}),  # SDXL: lora_te1_ / lora_te2_
])
def test_kohya_text_encoder_prefix_follows_the_pipeline(tmp_path: Path, name: str, prefixes: set[str]) -> None:
    src = write_layout(LAYOUTS[name], tmp_path)
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya")
    found = {p for k in raw_tensors(out) for p in ("lora_te_", "lora_te1_", "lora_te2_", "lora_unet_")
             if k.startswith(p)}
    assert found == prefixes


@pytest.mark.parametrize("name", ["comfyui_flux_lorasave", "comfyui_wan_diff_b"])
def test_resize_keeps_a_comfyui_file_in_its_dialect(tmp_path: Path, name: str) -> None:
    """Before: a `diffusion_model.` file came back from resize as `lora_unet_...` (kohya dialect)."""
    src = write_layout(LAYOUTS[name], tmp_path)
    out = tmp_path / "small.safetensors"
    resize(src, out, rank=2)
    before = {k.rsplit(".", 1)[0] if k.endswith((".alpha", ".diff", ".diff_b")) else k.rsplit(".", 2)[0]
              for k in raw_tensors(src)}
    after = {k.rsplit(".", 1)[0] if k.endswith((".alpha", ".diff", ".diff_b")) else k.rsplit(".", 2)[0]
             for k in raw_tensors(out)}
    assert after == before
