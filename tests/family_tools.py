"""Shared by the model-family tests: the fixture generators (fixtures/families.py, loaded by path:
fixtures/ is not a package) and the small helpers every family test uses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loratool.formats import read

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fixture_families", ROOT / "fixtures" / "families.py")
assert _spec is not None and _spec.loader is not None
fixture_families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture_families)


def write(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """tensors saved as tmp_path / name."""
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Module name -> dense ΔW (float64; conv flattened to (out, in·kh·kw)) of an adapter as loratool reads it."""
    a = read(path)
    out = {}
    for n, m in a.modules.items():
        up, down = m.up.load().double(), m.down.load().double()
        out[n] = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * m.scale
    return out


def fuse_equals_merge(model: Any, kohya_tensors: dict[str, torch.Tensor], tmp_path: Path
                      ) -> tuple[set[str], int, Any]:
    """The real client against loratool: `kohya_tensors` converted by loratool to diffusers, loaded
    into `model` (a tiny diffusers transformer) with `load_lora_adapter` and fused, must equal
    loratool's merge of the same file into the model's own weights (1e-6 in float32).

    Returns the modules diffusers wrapped, how many tensors the merge changed and the diffusers
    adapter as loratool reads it, for the caller's counts.
    """
    from safetensors.torch import load_file

    from loratool.ops.convert import convert
    from loratool.ops.merge import merge

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(base_dir / "diffusion_pytorch_model.safetensors"))
    (base_dir / "config.json").write_text(json.dumps({"_class_name": type(model).__name__}))
    src = write(tmp_path, "k.safetensors", kohya_tensors)
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir()
    convert(src, lora, to="diffusers")
    model.load_lora_adapter(str(lora.parent), weight_name=lora.name, prefix="transformer", adapter_name="ours")
    wrapped = {n.removesuffix(".lora_A.ours") for n, _ in model.named_modules() if n.endswith(".lora_A.ours")}
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    fused = model.state_dict()
    merged = tmp_path / "merged"
    merge(base_dir, [lora], merged)
    changed = 0
    for k, v in load_file(str(merged / "diffusion_pytorch_model.safetensors")).items():
        torch.testing.assert_close(fused[k], v, rtol=1e-6, atol=1e-6)
        changed += not torch.equal(v, state[k])
    return wrapped, changed, read(lora)


def adapter_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The module names of a LoRA state dict (any dialect's suffixes and PEFT's prefix removed)."""
    return sorted({k.split(".lora_")[0].removesuffix(".alpha").removesuffix(".diff_b").removeprefix("base_model.model.")
                   for k in tensors})


def round_trip_is_identity(tmp_path: Path, tensors: dict[str, torch.Tensor], target: str, family: str) -> None:
    """`tensors` (a kohya file) converted to `target` and back to kohya (--family `family`) is the same
    file bit for bit: the same keys, the same tensors."""
    from loratool.ops.convert import convert

    src = write(tmp_path, "k.safetensors", tensors)
    mid = tmp_path / ("mid" if target == "peft" else "mid.safetensors")
    convert(src, mid, to=target)
    back = tmp_path / "back.safetensors"
    convert(mid, back, to="kohya", family=family)
    a, b = load_file_(src), load_file_(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def load_file_(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def linears(model: Any) -> dict[str, tuple[int, ...]]:
    """name -> weight shape of every nn.Linear of a torch model (what a LoRA may target)."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya-suffixed state dict as diffusers' converters take it from a trainer: `lora_A` / `lora_B`
    for `lora_down` / `lora_up`, alpha tensors dropped (use alpha = rank)."""
    return {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v.clone()
            for k, v in tensors.items() if not k.endswith(".alpha")}


def converter_agrees(theirs: dict[str, torch.Tensor], ours_path: Path) -> set[str]:
    """diffusers' converter output `theirs` names the modules of our diffusers file at `ours_path`, with
    the same deltas (B @ A; 1e-6). Returns the module names."""
    ours = read(ours_path)
    names = {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert names == set(ours.modules)
    for name in names:
        m = ours.modules[name]
        want = theirs[name + ".lora_B.weight"].double() @ theirs[name + ".lora_A.weight"].double()
        torch.testing.assert_close(m.up.load().double() @ m.down.load().double() * m.scale, want, rtol=1e-6, atol=1e-9)
    return names


def merge_equals_numpy(tmp_path: Path, family: str, shapes: dict[str, tuple[int, int]], prefix: str = "") -> int:
    """A ComfyUI-named LoRA of `family` (modules `shapes`, original layout) merged by loratool into a
    single-file base in the original layout (keys under `prefix`, e.g. ComfyUI's `model.diffusion_model.`)
    equals W + (alpha / rank) · up @ down computed here in numpy (float64; 1e-6), every other tensor
    unchanged. Returns how many weights the merge changed."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from loratool.families import get as get_family
    from loratool.ops.merge import merge

    gen = torch.Generator().manual_seed(3)
    base = {f"{prefix}{p}.weight": torch.randn(s, generator=gen) * 0.1 for p, s in shapes.items()}
    base[f"{prefix}extra_norm.weight"] = torch.ones(4)
    base_path = tmp_path / "base.safetensors"
    save_file(base, str(base_path))
    rank, alpha = 4, 2.0
    t = fixture_families.family_lora(family, shapes, "comfyui", rank=rank, alpha=alpha, seed=13)
    lora = write(tmp_path, "c.safetensors", t)
    out = tmp_path / "merged.safetensors"
    merge(base_path, [lora], out)
    got = load_file(str(out))
    assert set(got) == set(base)
    changed = 0
    fam = get_family(family)
    for p in shapes:
        name = fam.name_in("comfyui", p, original=True)  # ComfyUI's spelling where it has its own
        up = t[f"{name}.lora_up.weight"].double().numpy()
        down = t[f"{name}.lora_down.weight"].double().numpy()
        want = base[f"{prefix}{p}.weight"].double().numpy() + alpha / rank * (up @ down)
        np.testing.assert_allclose(got[f"{prefix}{p}.weight"].double().numpy(), want, rtol=0, atol=1e-6)
        changed += 1
    assert torch.equal(got[f"{prefix}extra_norm.weight"], base[f"{prefix}extra_norm.weight"])
    return changed
def round_trips(src: Path, target: str, family: str, tmp_path: Path, back_to: str = "kohya") -> None:
    """`src` converted to `target`, then back to `back_to` (src's own dialect) with --family: every
    tensor of `src` again, bit for bit."""
    from safetensors.torch import load_file

    from loratool.ops.convert import convert

    mid = tmp_path / ("mid" if target == "peft" else "mid.safetensors")
    convert(src, mid, to=target)
    back = tmp_path / "back.safetensors"
    convert(mid, back, to=back_to, family=family)
    a, b = load_file(str(src)), load_file(str(back))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def fuses_whole(model: Any, kohya_tensors: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """`fuse_equals_merge`, and every module of our diffusers file wrapped by diffusers (no unexpected
    or missing keys), changing its weight, at the model's own shape."""
    wrapped, changed, ours = fuse_equals_merge(model, kohya_tensors, tmp_path)
    assert len(wrapped) == len(ours.modules) and changed == len(wrapped)
    state = model.state_dict()
    for name, m in ours.modules.items():
        assert tuple(state[name.removeprefix("transformer.") + ".weight"].shape) == m.base_shape, name


def diffusers_deltas(path: Path) -> Any:
    """name -> float64 numpy B @ A of a diffusers-dialect file written with alpha = rank (scale 1)."""
    from safetensors.torch import load_file

    t = {k: v.double().numpy() for k, v in load_file(str(path)).items()}
    return lambda name: t[f"transformer.{name}.lora_B.weight"] @ t[f"transformer.{name}.lora_A.weight"]
