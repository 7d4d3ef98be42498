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
