"""Device-sensitive paths on CUDA (marker `gpu`): every command's cuda output equals its cpu output.

These run where torch sees a CUDA device and are skipped, visibly (`-ra` lists the reason), where it
does not; tests/perf/device_check.sh runs them on the GPU machine. merge of a bf16 base must be
bit-identical across devices; the SVD-based commands (resize, combine, extract) agree to 1e-5
relative per module delta (different kernels round differently).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine"),
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "loratool", *args], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return p


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Dense per-module deltas, float64, computed here from the stored factors (tiny fixtures only)."""
    from loratool.formats import read

    a = read(adapter)
    out = {}
    for name, m in a.modules.items():
        up = m.up.load().double().reshape(m.up.shape[0], -1)
        down = m.down.load().double().reshape(m.down.shape[0], -1)
        out[name] = m.scale * (up @ down)
    return out


@pytest.mark.parametrize("dtype", ["keep", "bf16", "fp32"])
def test_merge_cuda_equals_cpu_bitwise(tmp_path: Path, dtype: str) -> None:
    outs = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / dev
        run("merge", str(FIX / "base_llama"), str(FIX / "peft_llama"), "-o", str(out), "--device", dev,
            "--dtype", dtype, "--report", str(tmp_path / f"{dev}.json"), "-q")
        outs[dev] = tensors(out)
        assert json.loads((tmp_path / f"{dev}.json").read_text())["merged_tensors"] > 0
    assert outs["cpu"].keys() == outs["cuda"].keys()
    for key, t in outs["cpu"].items():
        assert torch.equal(t, outs["cuda"][key]), key


def test_merge_auto_picks_cuda(tmp_path: Path) -> None:
    p = run("merge", str(FIX / "base_llama"), str(FIX / "peft_llama"), "-o", str(tmp_path / "m"), "--json")
    assert json.loads(p.stdout)["device"].startswith("cuda")


@pytest.mark.parametrize("args", [
    ("resize", str(FIX / "peft_llama"), "--rank", "2"),
    ("combine", str(FIX / "peft_llama"), str(FIX / "peft_llama"), "--weights", "0.7,0.3", "--method", "svd",
     "--rank", "3"),
    ("extract", str(FIX / "base_llama"), "MERGED", "--rank", "4"),
], ids=["resize", "combine", "extract"])
def test_svd_commands_agree_across_devices(tmp_path: Path, args: tuple[str, ...]) -> None:
    if "MERGED" in args:
        merged = tmp_path / "merged"
        run("merge", str(FIX / "base_llama"), str(FIX / "peft_llama"), "-o", str(merged), "--device", "cpu", "-q")
        args = tuple(str(merged) if a == "MERGED" else a for a in args)
    got = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / f"{args[0]}_{dev}"
        run(*args, "-o", str(out), "--device", dev, "-q")
        got[dev] = deltas(out)
    assert got["cpu"].keys() == got["cuda"].keys() and got["cpu"]
    for name, d in got["cpu"].items():
        rel = float((d - got["cuda"][name]).norm() / max(float(d.norm()), 1e-30))
        assert rel < 1e-5, (name, rel)
