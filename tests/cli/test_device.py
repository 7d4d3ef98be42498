"""Every --device string either works or is refused with exit 2, naming the available devices
(before: mps / xpu / meta passed the check and ended as an internal error, exit 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clirun import run_cli

from loratool.device import available_devices, resolve_device
from loratool.errors import IncompatibleError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ABSENT = [d for d in ("mps", "xpu", "meta", "cuda", "cuda:7", "xpu:0", "hip", "xla", "hpu", "privateuseone",
                      "cpu:1", "nonsense", "") if d not in available_devices()]


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    llama, base = str(FIXTURES / "peft_llama"), str(FIXTURES / "base_llama")
    return {
        "inspect": ["inspect", llama, "--spectrum"],
        "resize": ["resize", llama, "-o", str(tmp_path / "r"), "--rank", "2"],
        "combine": ["combine", llama, llama, "-o", str(tmp_path / "c"), "--weights", "1,1", "--method", "cat"],
        "merge": ["merge", base, llama, "-o", str(tmp_path / "m")],
        "extract": ["extract", base, base, "-o", str(tmp_path / "e"), "--rank", "2"],
    }


@pytest.mark.parametrize("device", ABSENT)
def test_unavailable_devices_are_refused_by_the_library(device):
    with pytest.raises(IncompatibleError) as e:
        resolve_device(device)
    assert "available here: auto, cpu" in e.value.message


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "cuda:7"])
@pytest.mark.parametrize("command", ["inspect", "resize", "combine", "merge", "extract"])
def test_every_command_refuses_with_exit_2(command, device, tmp_path):
    if device in available_devices():
        pytest.skip(f"{device} exists here")
    r = run_cli([*_commands(tmp_path)[command], "--device", device])
    assert r.code == 2, r.err
    lines = [x for x in r.err.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and f"--device {device}" in lines[0] and "available here:" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("device", ["auto", "cpu", "cpu:0"])
def test_cpu_works(device):
    assert resolve_device(device) == "cpu" or torch.cuda.is_available()


def test_gpus_are_counted(monkeypatch):
    """With two CUDA devices, cuda:1 works and cuda:2 is refused, listing cuda:0 and cuda:1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(IncompatibleError) as e:
        resolve_device("cuda:2")
    assert "2 cuda devices" in e.value.message and "cuda:0, cuda:1" in e.value.message
    with pytest.raises(IncompatibleError):
        resolve_device("meta")


def test_an_available_mps_is_accepted(monkeypatch):
    mps = torch.backends.mps
    monkeypatch.setattr(mps, "is_available", lambda: True)
    assert resolve_device("mps") == "mps"
    assert "mps" in available_devices()
