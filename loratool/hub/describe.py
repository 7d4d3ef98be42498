"""What a local path holds, from headers only: an adapter, a base checkpoint, or other files."""

from __future__ import annotations

import os
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



def describe(path: str | os.PathLike[str]) -> Described:
    """What a local path holds, from headers only (no tensor bytes are read)."""
    from loratool.ops.inspect import inspect_adapter

    p = Path(path)
    try:
        doc = inspect_adapter(p).to_dict()
    except LoratoolError as e:
        note = e.message
    else:
        doc.pop("modules", None)
        return Described("adapter", doc)
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

