"""Where the maths runs: `--device auto|cpu|cuda|cuda:N`."""

from __future__ import annotations

from loratool.errors import IncompatibleError


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; other values are checked.

    Raises:
        IncompatibleError: CUDA asked for but not available, or not a device name.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IncompatibleError(f"--device {device}: CUDA is not available here", hint="use --device cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise IncompatibleError(f"--device {device}: not a device", hint="use auto, cpu, cuda or cuda:N") from None
    return device
