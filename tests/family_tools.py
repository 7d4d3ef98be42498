"""Shared by the model-family tests: the fixture generators (fixtures/families.py, loaded by path:
fixtures/ is not a package) and the small helpers every family test uses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
