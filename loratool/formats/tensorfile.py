"""TensorFile: the tensors of one adapter file as lazy refs, with its header metadata; what every
container reader (safetensors, .npz, GGUF, pickle) hands the format readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratool.io.tensors import TensorRef


@dataclass
class TensorFile:
    """The tensors of one adapter file as lazy refs, with its header metadata."""

    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]
