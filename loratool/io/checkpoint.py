"""Base checkpoints: one .safetensors file, a folder with model.safetensors, or a sharded index.

open_checkpoint lists every tensor of a base model from the headers alone (no tensor bytes are read);
a sharded index is checked against the shards it names, each shard kept inside the folder
(paths.member_path); a tensor stored in two shards, or listed in the index but in no shard, is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.errors import FormatError
from loratool.io.header import TensorInfo, _pairs_recording, _strerror, read_header, read_side_file
from loratool.io.paths import folder_file, member_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


@dataclass
class Checkpoint:
    """A base checkpoint's tensor list (header-only) across one or more safetensors files."""

    root: Path  # the directory holding the files (or the file's parent)
    files: list[Path]  # weight files in index/file order
    tensors: dict[str, TensorInfo]  # every tensor, in file then header order
    index: dict[str, Any] | None = None  # parsed model.safetensors.index.json, if sharded
    metadata: dict[Path, dict[str, str]] = field(default_factory=dict)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a base model: a .safetensors file, a directory with model.safetensors, or a sharded dir.

    Raises:
        FormatError: nothing readable, a bad index, or a corrupt shard.
    """
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise FormatError(
                f"{p}: pickle checkpoints are not supported as a base",
                hint="convert the base to .safetensors first",
            )
        st = read_header(p)
        return Checkpoint(p.parent, [p], dict(st.tensors), None, {p: st.metadata})
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise FormatError(f"{p}: several safetensors indexes ({', '.join(i.name for i in indexes)})",
                          hint="pass the component directory or a single file")
    if indexes:
        return _open_sharded(p, folder_file(p, indexes[0].name))
    singles = [p / n for n in SINGLE_NAMES if (p / n).is_file()] or sorted(p.glob("*.safetensors"))
    if len(singles) == 1:
        single = folder_file(p, singles[0].name)
        st = read_header(single)
        return Checkpoint(p, [single], dict(st.tensors), None, {single: st.metadata})
    found = sorted(x.name for x in p.iterdir())[:10]
    raise FormatError(
        f"{p}: no model.safetensors or {INDEX_NAME} (found: {', '.join(found) or 'nothing'})",
        hint="pass a .safetensors file or a Hugging Face model directory",
    )


def _open_sharded(p: Path, index_path: Path) -> Checkpoint:
    duplicates: list[str] = []
    try:
        text = read_side_file(index_path).decode("utf-8")
        index = json.loads(text, object_pairs_hook=_pairs_recording(duplicates))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except OSError as e:
        raise FormatError(f"{index_path}: cannot read ({_strerror(e)})") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise FormatError(f"{index_path}: not a valid safetensors index ({e})") from None
    if duplicates:
        raise FormatError(f"{index_path}: key '{duplicates[0]}' appears more than once",
                          hint="the index is corrupt; re-create or re-download it")
    files: list[Path] = []
    for fname in weight_map.values():
        fp = member_path(p, fname, source=index_path)
        if fp not in files:
            files.append(fp)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[Path, dict[str, str]] = {}
    for fp in files:
        st = read_header(fp)
        metadata[fp] = st.metadata
        for key, info in st.tensors.items():
            if key in tensors:
                raise FormatError(f"{p}: tensor '{key}' is stored in both {tensors[key].path.name} and {fp.name}",
                                  hint="the checkpoint is corrupt; re-create or re-download it")
            tensors[key] = info
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise FormatError(
            f"{index_path}: {len(missing)} tensor(s) listed in weight_map are in no shard, "
            f"e.g. '{missing[0]}' (expected in {weight_map[missing[0]]})"
        )
    return Checkpoint(p, files, tensors, index, metadata)
