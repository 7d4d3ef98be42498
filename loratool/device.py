"""Where the maths runs: `--device auto|cpu|cuda|cuda:N|mps|xpu[:N]`.

Every device string either resolves to one this machine has, or is refused with an
IncompatibleError that lists the devices that are available here (exit 2 in the CLI). torch knows
many device types (meta, hip, xla, hpu, privateuseone, ...); only those whose backend reports
itself available are accepted, and `meta` never (it holds no data to compute with).
"""

from __future__ import annotations

import re
from typing import Any

from loratool.errors import IncompatibleError

# device types loratool can run its maths on, when torch reports the backend available
_BACKENDS = ("cuda", "mps", "xpu")


def _backend(torch: Any, kind: str) -> Any:
    if kind == "mps":
        return getattr(getattr(torch, "backends", None), "mps", None)
    return getattr(torch, kind, None)


def _count(torch: Any, kind: str) -> int:
    """How many devices of this type torch can use here (0 when the backend is absent or fails)."""
    mod = _backend(torch, kind)
    try:
        if mod is None or not mod.is_available():
            return 0
        if kind == "mps":
            return 1
        return int(mod.device_count())
    except Exception:  # a backend that cannot even be queried is not available
        return 0


# what a --device string looks like (torch's own device types: the types loratool does not run on are
# refused by resolve_device, which lists the devices this machine has)
_TORCH_TYPES = ("cpu", "cuda", "mps", "xpu", "meta", "hip", "xla", "hpu", "ipu", "mtia", "maia", "lazy", "vulkan",
                "opengl", "opencl", "ideep", "mkldnn", "fpga", "ve", "privateuseone")
_DEVICE_NAME = re.compile(rf"(?:auto|(?:{'|'.join(_TORCH_TYPES)})(?::\d+)?)")


def check_device_name(device: str) -> None:
    """Refuse a --device string that names no device at all (`gpu`, `cuda0`) without importing torch
    (2 s of CPU), so the mistake is reported at once; resolve_device checks the rest.

    Raises:
        IncompatibleError: not a device name; the message lists the names loratool accepts.
    """
    if _DEVICE_NAME.fullmatch(device) is None:
        raise IncompatibleError(f"--device {device}: not a device name (use auto, cpu, cuda, cuda:N, mps or xpu)",
                                hint="use --device cpu (or auto)" + ("; a GPU is --device cuda"
                                                                    if "gpu" in device.lower() else ""))


def available_devices() -> list[str]:
    """The device names this machine accepts, e.g. ['cpu'] or ['cpu', 'cuda', 'cuda:0', 'cuda:1']."""
    import torch

    names = ["cpu"]
    for kind in _BACKENDS:
        n = _count(torch, kind)
        if n:
            names.append(kind)
            if kind != "mps":
                names += [f"{kind}:{i}" for i in range(n)]
    return names


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; any other value is checked against this machine.

    Raises:
        IncompatibleError: not a device name, a device type loratool does not compute on (meta),
            or a device this machine does not have; the message lists the available ones.
    """
    import torch

    if device == "auto":
        return "cuda" if _count(torch, "cuda") else "cpu"
    avail = available_devices()
    listed = ", ".join(["auto", *avail])

    def refuse(why: str) -> IncompatibleError:
        return IncompatibleError(f"--device {device}: {why}; available here: {listed}",
                                 hint=f"use --device {'cuda' if 'cuda' in avail else 'cpu'} (or auto)")

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise refuse("not a device name") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise refuse("there is one cpu device")
        return "cpu"
    if dev.type == "meta":
        raise refuse("the meta device holds no data, so no maths can run on it")
    if dev.type not in _BACKENDS:
        raise refuse(f"loratool does not run on {dev.type} devices")
    n = _count(torch, dev.type)
    if n == 0:
        what = "CUDA" if dev.type == "cuda" else dev.type
        raise refuse(f"{what} is not available here")
    if dev.index is not None and dev.index >= n:
        raise refuse(f"this machine has {n} {dev.type} device{'s' if n != 1 else ''}")
    return device

