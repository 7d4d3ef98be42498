"""loratool: inspect, validate, rescale, resize, combine and merge LoRA adapters.

The public API re-exports only; see the submodules for details. Importing loratool does not import
torch or huggingface_hub; the names below are imported on first use, so `import loratool` (which
the console script does before it can handle Ctrl-C, see loratool.__main__) takes no time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loratool._version import __version__
from loratool.errors import FormatError, HubError, IncompatibleError, LoratoolError, OutputExistsError

if TYPE_CHECKING:
    from loratool.adapter import Adapter, LoraModule
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

_LAZY = {"Adapter": "loratool.adapter", "LoraModule": "loratool.adapter", "detect": "loratool.formats",
         "read": "loratool.formats", "write": "loratool.formats"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")
