"""loratool: inspect, validate, rescale, resize, combine and merge LoRA adapters.

The public API re-exports only; see the submodules for details. Importing loratool does not import
torch or huggingface_hub.
"""

from __future__ import annotations

from loratool._version import __version__
from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError, HubError, IncompatibleError, LoratoolError, OutputExistsError
from loratool.formats import detect, read, write

__all__ = [
    "Adapter",
    "FormatError",
    "HubError",
    "IncompatibleError",
    "LoraModule",
    "LoratoolError",
    "OutputExistsError",
    "__version__",
    "detect",
    "read",
    "write",
]
