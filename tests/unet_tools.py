"""Shared by tests/families/test_sd15.py and test_sdxl.py: the checks every Stable Diffusion U-Net
family (`sd1`, `sdxl`) passes, each taking the family name.

The LoRA files are generated from the family table (fixtures/families.py `unet_shapes`: every
linear and conv module, LoCon 3x3 factors included, of a tiny U-Net of the family's real block
structure). The independent references are numpy sums written here and diffusers itself, on a tiny
`UNet2DConditionModel` of the same structure (CONFIGS): its single-file converter
(`convert_ldm_unet_checkpoint`), its kohya LoRA loader (`lora_state_dict`: `_maybe_map_sgm_blocks_to_diffusers`
then `_convert_non_diffusers_lora_to_diffusers`) and `load_lora_adapter` + `fuse_lora`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from family_tools import fixture_families, write
from safetensors.torch import load_file, save_file

from loratool.families import get
from loratool.formats import read
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge
from loratool.ops.validate import validate_adapter
from loratool.ops.verify import verify

# tiny U-Nets of each family's structure: SD1.5 (4 levels, attention in the first 3, 1 transformer
# block each, conv proj_in) and SDXL (3 levels, attention in the last 2 with 2 and 10 transformer
# blocks, linear proj_in, the text_time add_embedding of 6 x 4 time features + 8 pooled features)
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                attention_head_dim=2, cross_attention_dim=12, norm_num_groups=4),
    "sdxl": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 32), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 8), cross_attention_dim=12,
                 norm_num_groups=4, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=4, projection_class_embeddings_input_dim=32),
}
# SD2.x: SD1.x's module tree with linear proj_in / proj_out (the `sd1` family)
CONFIGS["sd2"] = {**CONFIGS["sd1"], "use_linear_projection": True, "attention_head_dim": (2, 4, 8, 8)}
FAMILY_OF = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl"}


def shapes(family: str, *, full: bool = True) -> dict[str, tuple[int, ...]]:
    """The CONFIGS model's (sd1, sd2, sdxl) LoRA-targetable modules (original names); `full=False`:
    SDXL with 2 transformer blocks per level (the same names up to the block index, a quicker merge)."""
    if family in ("sd1", "sd2"):
        return fixture_families.unet_shapes("sd1", (8, 16, 32, 32), linear_proj=family == "sd2")
    return fixture_families.unet_shapes("sdxl", (8, 16, 32), linear_proj=True, depth=None if full else (1, 2, 2))


def lora(family: str, dialect: str, *, full: bool = True, seed: int = 0, rank: int = 4, alpha: float = 2.0,
         every: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA on the CONFIGS model's modules (`every`: on every n-th module only, a quicker merge
    that still holds each kind: linear, 1x1 and 3x3 conv, samplers, embeddings)."""
    picked = dict(list(shapes(family, full=full).items())[::every])
    return fixture_families.family_lora(FAMILY_OF[family], picked, dialect, rank=rank, alpha=alpha, seed=seed)


def stems(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".lora_")[0].removesuffix(".alpha").removeprefix("base_model.model.") for k in tensors})


# ---------------------------------------------------------------------------------------------
# detection and conversion


def check_detect(tmp_path: Path, family: str, dialect: str, *, full: bool = True) -> dict[str, Any]:
    """The family and dialect named, with evidence, every module matched; returns inspect's family doc."""
    path = tmp_path / ("p" if dialect == "peft" else "l.safetensors")
    if dialect == "peft":
        convert(write(tmp_path, "k.safetensors", lora(family, "kohya", full=full)), path, to="peft")
    else:
        write(tmp_path, path.name, lora(family, dialect, full=full))
    fam = inspect_adapter(path).to_dict()["family"]
    assert fam["family"] == family and fam["dialect"] == dialect, fam
    assert fam["matched"] == fam["total"] and fam["confident"] and not fam["ambiguous"] and fam["evidence"]
    return fam


def check_round_trip(tmp_path: Path, family: str) -> None:
    """kohya -> diffusers -> comfyui -> kohya, and through peft: the original tensors, bit for bit."""
    src = write(tmp_path, "k.safetensors", lora(family, "kohya", full=False, seed=1))
    chain = [("diffusers", "d.safetensors"), ("comfyui", "c.safetensors"), ("kohya", "k2.safetensors")]
    prev = src
    for to, name in chain:
        out = tmp_path / name
        convert(prev, out, to=to)
        prev = out
    a, b = load_file(str(src)), load_file(str(prev))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    convert(src, tmp_path / "p", to="peft")
    convert(tmp_path / "p", tmp_path / "k3.safetensors", to="kohya")
    c = load_file(str(tmp_path / "k3.safetensors"))
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# merge into both base layouts against numpy


def bases(tmp_path: Path, family: str, *, full: bool = False, te: str = "cond_stage_model.transformer."
          ) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A random model of `family` in both layouts: a single file (`model.diffusion_model.` + original
    names, with a text-encoder weight and a bias beside them) and a diffusers `unet` folder. Returns
    (single file, folder, original module path -> W in float64)."""
    fam = get(family)
    to_diffusers = {r.original: r.split[0][0] for r in fam.relations}
    gen = torch.Generator().manual_seed(11)
    weights: dict[str, np.ndarray] = {}
    single: dict[str, torch.Tensor] = {}
    folder: dict[str, torch.Tensor] = {}
    for path, shape in shapes(family, full=full).items():
        w = torch.randn(*shape, generator=gen)
        weights[path] = w.double().numpy()
        single[f"model.diffusion_model.{path}.weight"] = w
        folder[f"{to_diffusers[path]}.weight"] = w
        b = torch.randn(shape[0], generator=gen)
        single[f"model.diffusion_model.{path}.bias"] = b
        folder[f"{to_diffusers[path]}.bias"] = b
    single[te + "text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=gen)
    sfile = tmp_path / f"{family}_single.safetensors"
    save_file(single, str(sfile))
    unet = tmp_path / f"{family}_unet"
    unet.mkdir()
    save_file(folder, str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    return sfile, unet, weights


def raw_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """stem -> (alpha / rank) * up @ down, reshaped to the base weight's shape, in numpy (float64)."""
    out: dict[str, np.ndarray] = {}
    for key, down in tensors.items():
        for dsuf, usuf in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(dsuf):
                stem = key[: -len(dsuf)]
                d, u = down.double().numpy(), tensors[stem + usuf].double().numpy()
                r = d.shape[0]
                alpha = float(tensors[stem + ".alpha"]) if stem + ".alpha" in tensors else r
                delta = (u.reshape(u.shape[0], r) @ d.reshape(r, -1)) * (alpha / r)
                out[stem] = delta.reshape(u.shape[0], *d.shape[1:])
    return out


def check_merge_both_layouts(tmp_path: Path, family: str, dialect: str, te: str) -> None:
    """An adapter in `dialect` merged into the single file and into the diffusers folder: W + ΔW for
    every module by a numpy sum, the text encoder's module and the biases untouched; verify agrees
    (the single file); validate --base matches every module."""
    fam = get(family)
    sfile, unet, weights = bases(tmp_path, family, te=te)
    tensors = lora(family, dialect, full=False, seed=3, every=3)
    src = write(tmp_path, f"{dialect}.safetensors", tensors)
    ref = raw_deltas(tensors)
    to_original = {}
    for stem in ref:
        ident = fam.identify(stem, dialect)
        assert ident is not None, stem
        to_original[stem] = ident[0].original
    to_diffusers = {r.original: r.split[0][0] for r in fam.relations}
    for base, out, key in ((sfile, tmp_path / "m.safetensors", lambda p: f"model.diffusion_model.{p}.weight"),
                           (unet, tmp_path / "m_unet", lambda p: f"{to_diffusers[p]}.weight")):
        report = merge(base, [src], out)
        assert report.merged == len(ref) and not report.unmatched
        crossed = fam.writes_original(dialect) != (base == sfile)  # the fixture names the dialect's written side
        assert report.layouts == ([f"{fam.title} {dialect}-dialect adapter mapped onto the {fam.name} "
                                   + ("original" if base == sfile else "diffusers")
                                   + (f" ({fam.original_layout}) layout under 'model.diffusion_model.'"
                                      if base == sfile else " layout")
                                   + f" ({len(ref)} modules renamed)"] if crossed else [])
        got = load_file(str(out / "diffusion_pytorch_model.safetensors" if out.is_dir() else out))
        before = load_file(str(base / "diffusion_pytorch_model.safetensors" if base.is_dir() else base))
        for stem, d in ref.items():
            path = to_original[stem]
            np.testing.assert_allclose(got[key(path)].double().numpy(), weights[path] + d, rtol=1e-5, atol=1e-5,
                                       err_msg=stem)
        for k, v in before.items():
            if not k.endswith(".weight") or "text_model" in k:
                assert torch.equal(got[k], v), k
        if not out.is_dir():  # verify checks what merge wrote (once: it is the slowest step here)
            assert verify(out, base, [src]).ok
        doc = validate_adapter(src, base=base).to_dict()
        assert doc["matched"] == len(ref) and not [f for f in doc["findings"] if f["severity"] == "error"]


# ---------------------------------------------------------------------------------------------
# diffusers itself


def tiny_unet(family: str) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**CONFIGS[family])
    with torch.no_grad():  # a LoRA on a zero-initialised layer would still fuse; random weights say more
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def check_table_against_ldm_converter(family: str) -> None:
    """Our original-side names of every weight and bias of a tiny U-Net (norms included), converted
    back by diffusers' own single-file converter, give the U-Net's state dict key for key."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    fam = get(FAMILY_OF[family])
    model = tiny_unet(family)
    state = model.state_dict()
    to_original = {r.split[0][0]: r.original for r in fam.relations}
    ldm: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        path, _, suffix = key.rpartition(".")
        assert path in to_original, f"{key}: no relation in the {family} table"
        ldm[f"model.diffusion_model.{to_original[path]}.{suffix}"] = value
    assert len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint(ldm, dict(model.config))
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    # and every relation of the table is a module of the model: nothing listed that the U-Net lacks
    modules = {k.rpartition(".")[0] for k in state}
    assert set(to_original) == modules


def check_diffusers_kohya_loader(tmp_path: Path, family: str) -> None:
    """diffusers' kohya loader reads our kohya file as our `--to diffusers` names it: the same module
    names (peft form) and the same deltas."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    model = tiny_unet(family)
    kohya = lora(family, "kohya", seed=5)
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(kohya), unet_config=model.config)
    theirs = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state_dict.items()})
    # its alpha names are the legacy processor names of the down weight
    # (`...attn1.processor.to_q_lora.down.weight.alpha`): put through the same renaming
    alpha = {next(iter(convert_unet_state_dict_to_peft({k.removeprefix("unet.").removesuffix(".alpha"): 0})))
             .rsplit(".lora_A", 1)[0]: v for k, v in alphas.items()}
    assert len(alpha) == len(alphas)
    src = write(tmp_path, "k.safetensors", kohya)
    out = tmp_path / "d.safetensors"
    convert(src, out, to="diffusers")
    ours = read(out)
    theirs_modules = sorted({k.rsplit(".lora_", 1)[0] for k in theirs})
    assert theirs_modules == sorted(n.removeprefix("unet.") for n in ours.modules)
    for name in theirs_modules:
        down, up = theirs[name + ".lora_A.weight"].double(), theirs[name + ".lora_B.weight"].double()
        r = down.shape[0]
        a = alpha[name]
        want = up.flatten(1) @ down.flatten(1) * (a / r)
        m = ours.modules["unet." + name]
        got = m.up.load().double().flatten(1) @ m.down.load().double().flatten(1) * m.scale
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def check_load_lora_adapter_and_fuse(tmp_path: Path, family: str) -> None:
    """Our diffusers output loads with `load_lora_adapter` (every linear and conv module wrapped,
    nothing left over) and `fuse_lora` gives what our merge of the kohya file into the same base writes."""
    model = tiny_unet(family)
    targets = {n for n, mod in model.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    base = tmp_path / "base"
    base.mkdir()
    save_file(state, str(base / "diffusion_pytorch_model.safetensors"))
    (base / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    src = write(tmp_path, "k.safetensors", lora(family, "kohya", seed=7))
    out = tmp_path / "lora"
    out.mkdir()
    convert(src, out / "pytorch_lora_weights.safetensors", to="diffusers")
    model.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet",
                            adapter_name="ours")
    wrapped = {n.removesuffix(".lora_A.ours") for n, _ in model.named_modules() if n.endswith(".lora_A.ours")}
    assert wrapped == targets
    assert len(read(out / "pytorch_lora_weights.safetensors").modules) == len(targets)
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    fused = model.state_dict()
    merged = tmp_path / "merged"
    merge(base, [src], merged)  # the kohya file itself, into the diffusers layout
    changed = 0
    for k, v in load_file(str(merged / "diffusion_pytorch_model.safetensors")).items():
        torch.testing.assert_close(fused[k], v, rtol=1e-6, atol=1e-6, msg=k)
        changed += not torch.equal(v, state[k])
    assert changed == len(targets)
