"""The library gives Python callers what the CLI gives its users (issue #14 item 2).

Before: resize, combine and extract called with device="auto" raised torch's bare RuntimeError
(only merge resolved it), and a bad device name was not a LoratoolError. hf:// inputs from Python
and their provenance are tested against the local Hub server in tests/hub/test_hub_seams.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratool.errors import IncompatibleError
from loratool.ops.combine import combine
from loratool.ops.extract import extract
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge
from loratool.ops.resize import resize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PEFT = FIXTURES / "peft_llama"


def _base_and_tuned(tmp_path: Path) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=gen)
    delta = torch.randn(24, 2, generator=gen) @ torch.randn(2, 16, generator=gen)  # rank 2
    save_file({"layers.0.proj.weight": w}, str(tmp_path / "base.safetensors"))
    save_file({"layers.0.proj.weight": w + delta}, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def _run(op: str, tmp_path: Path, device: str):  # type: ignore[no-untyped-def]
    out = tmp_path / f"{op}_{device.replace(':', '_')}"
    if op == "resize":
        return resize(PEFT, out, rank=2, device=device)
    if op == "combine":
        return combine([PEFT, PEFT], out, weights=[0.5, 0.5], method="svd", rank=2, device=device)
    if op == "extract":
        base, tuned = _base_and_tuned(tmp_path)
        return extract(base, tuned, out, rank=2, device=device)
    if op == "merge":
        return merge(FIXTURES / "base_llama", [PEFT], out, device=device)
    return inspect_adapter(PEFT, spectrum=True, device=device)


OPS = ("resize", "combine", "extract", "merge", "inspect")


@pytest.mark.parametrize("op", OPS)
def test_device_auto_works_from_python(tmp_path, op):
    report = _run(op, tmp_path, "auto")
    if op == "extract":
        assert report.device == ("cuda" if torch.cuda.is_available() else "cpu")
        assert [m.rank for m in report.modules] == [2]
    elif op == "inspect":
        assert report.spectra


@pytest.mark.parametrize("op", OPS)
def test_a_bad_device_is_a_user_error(tmp_path, op):
    with pytest.raises(IncompatibleError, match="--device gpu0: not a device"):
        _run(op, tmp_path, "gpu0")
