"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or warnings on stderr.")
force_option = click.option("--force", is_flag=True, help="Replace OUT if it exists.")
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow .bin/.pt pickle adapters (loaded with torch.load(weights_only=True)). Only for trusted files.",
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the maths runs: auto (cuda if available), cpu, cuda or cuda:N.",
)
out_option = click.option(
    "-o", "--out", "out", required=True, type=click.Path(), help="Output path (a directory for PEFT, a file for kohya)."
)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; other values are checked."""
    import torch

    from loratool.errors import IncompatibleError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IncompatibleError(f"--device {device}: CUDA is not available here", hint="use --device cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise IncompatibleError(f"--device {device}: not a device", hint="use auto, cpu, cuda or cuda:N") from None
    return device
