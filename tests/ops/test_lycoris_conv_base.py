"""LyCORIS LoHa / LoKr convs stored flattened (`hada_w1_b` (r, in·kh·kw), as lycoris-lora saves them),
converted to LoRA with --base: the factors take the base's conv layout even when the base is the
family's other layout (kohya SGM names onto a diffusers U-Net folder), our own merge takes the
output, and the merged weight equals a numpy reconstruction of ComfyUI's application of the
original (comfy/weight_adapter: LoHa (w1a·w1b)⊙(w2a·w2b)·alpha/r, LoKr kron(w1, w2) at scale 1
for full factors, reshaped to the weight). Issue 25 defect 4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.ops.convert import convert
from loratool.ops.merge import merge

STEM = "lora_unet_input_blocks_1_0_in_layers_2"  # SDXL's first resnet conv1 (SGM name)
KEY = "down_blocks.0.resnets.0.conv1.weight"  # the same weight in diffusers' U-Net
OUT, IN = 16, 8


def _files(tmp_path: Path, algo: str) -> tuple[Path, Path, np.ndarray]:
    """(LyCORIS file, diffusers base folder, ComfyUI's ΔW (out, in, 3, 3) in float64)."""
    g = torch.Generator().manual_seed(7)
    if algo == "loha":
        r, alpha = 3, 2.0
        t = {f"{STEM}.{w}_a": torch.randn(OUT, r, generator=g) for w in ("hada_w1", "hada_w2")}
        t.update({f"{STEM}.{w}_b": torch.randn(r, IN * 9, generator=g) for w in ("hada_w1", "hada_w2")})
        t[f"{STEM}.alpha"] = torch.tensor(alpha)
        n = {k: v.double().numpy() for k, v in t.items()}
        dw = (n[f"{STEM}.hada_w1_a"] @ n[f"{STEM}.hada_w1_b"]) * (n[f"{STEM}.hada_w2_a"] @ n[f"{STEM}.hada_w2_b"])
        dw = dw * alpha / r
    else:
        t = {f"{STEM}.lokr_w1": torch.randn(4, 2, generator=g), f"{STEM}.lokr_w2": torch.randn(4, 4 * 9, generator=g),
             f"{STEM}.alpha": torch.tensor(2.0)}
        dw = np.kron(t[f"{STEM}.lokr_w1"].double().numpy(), t[f"{STEM}.lokr_w2"].double().numpy())  # full: scale 1
    src = tmp_path / f"{algo}.safetensors"
    save_file(t, str(src))
    base = tmp_path / "base"
    base.mkdir()
    save_file({KEY: torch.randn(OUT, IN, 3, 3, generator=g)}, str(base / "diffusion_pytorch_model.safetensors"))
    return src, base, dw.reshape(OUT, IN, 3, 3)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize("to", ["kohya", "lora", "comfyui"])
def test_flattened_conv_takes_the_base_layout(tmp_path: Path, algo: str, to: str) -> None:
    src, base, dw = _files(tmp_path, algo)
    out = tmp_path / f"out_{to}.safetensors"
    report = convert(src, out, to=to, base=base)
    assert not any("--base" in w for w in report.warnings), report.warnings
    got = load_file(str(out))
    down = next(v for k, v in got.items() if k.endswith("lora_down.weight"))
    up = next(v for k, v in got.items() if k.endswith("lora_up.weight"))
    assert down.ndim == 4 and down.shape[1:] == (IN, 3, 3) and up.shape[2:] == (1, 1)
    merged = tmp_path / "merged"
    merge(base, [out], merged)
    w0 = load_file(str(base / "diffusion_pytorch_model.safetensors"))[KEY].double().numpy()
    w1 = load_file(str(merged / "diffusion_pytorch_model.safetensors"))[KEY].double().numpy()
    assert np.abs(w1 - (w0 + dw)).max() <= 1e-5 * max(1.0, np.abs(dw).max())


def test_without_a_weight_in_the_base_the_warning_says_so(tmp_path: Path) -> None:
    src, _, _ = _files(tmp_path, "loha")
    other = tmp_path / "other"
    other.mkdir()
    save_file({"conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(other / "diffusion_pytorch_model.safetensors"))
    report = convert(src, tmp_path / "o.safetensors", to="kohya", base=other)
    assert any("look like convolutions stored flattened" in w and f"--base {other} has no weight" in w
               for w in report.warnings), report.warnings
