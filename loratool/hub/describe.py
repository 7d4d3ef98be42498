"""What a local path holds, from headers only: an adapter, a base checkpoint, or other files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError


@dataclass
class Described:
    """What a local path holds, from headers only: an adapter, a base checkpoint, or other files."""

    kind: str  # "adapter", "checkpoint" or "files"
    summary: dict[str, Any]  # adapter: the inspect document without modules; checkpoint: counts
    note: str | None = None  # why it is not an adapter, when it is not



Describe = Callable[[Path], Described]  # what pull / push call to describe a path (loratool.ops.describe)


def describe_files(path: str | os.PathLike[str], note: str | None = None) -> Described:
    """What a local path holds when it is not read as an adapter, from headers only: a base
    checkpoint (tensor and parameter counts) or other files. The adapter description, which needs
    the format readers above this layer, is loratool.ops.describe.describe; pull and push take it
    from their caller."""
    p = Path(path)
    try:
        from loratool.io.checkpoint import open_checkpoint

        ckpt = open_checkpoint(p)
    except LoratoolError:
        files = [f for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
        return Described("files", {"num_files": len(files), "size": sum(f.stat().st_size for f in files)}, note)
    params = 0
    for info in ckpt.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        params += n
    return Described("checkpoint", {"num_tensors": len(ckpt.tensors), "params": params, "num_files": len(ckpt.files),
                                    "size": sum(f.stat().st_size for f in ckpt.files)}, note)

