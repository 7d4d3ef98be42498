"""What a local path holds, for pull's summary and push's model card: an adapter (the inspect document
without its module rows), a base checkpoint, or other files; and pull / push with that description.

hub/ sits below the format readers, so it cannot read an adapter itself: hub.pull and hub.push take a
`describe` callable, and these are the ones the CLI (and a Python caller who wants the adapter summary)
passes. Headers only: no tensor bytes are read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError
from loratool.hub.describe import Described, describe_files
from loratool.hub.pull import PEFT_CONFIG, PullResult
from loratool.hub.push import PushResult


def describe(path: str | os.PathLike[str]) -> Described:
    """An adapter's inspect document (without modules); otherwise a checkpoint's or files' counts,
    with the reason it is not an adapter as the note."""
    from loratool.ops.inspect import inspect_adapter

    try:
        doc = inspect_adapter(Path(path)).to_dict()
    except LoratoolError as e:
        return describe_files(path, e.message)
    doc.pop("modules", None)
    return Described("adapter", doc)


def describe_for_push(src: str | os.PathLike[str]) -> Described:
    """As describe, but what looks like an adapter must read cleanly (no broken upload); other
    directories (a merged model) are described from their headers.

    Raises:
        FormatError, IncompatibleError: an adapter that does not read, naming the file and key.
    """
    from loratool.ops.inspect import inspect_adapter

    src = Path(src)
    if src.is_file() or (src / PEFT_CONFIG).exists() or (src / "adapter_model.safetensors").exists():
        doc = inspect_adapter(src).to_dict()
        doc.pop("modules", None)
        return Described("adapter", doc)
    return describe_files(src)


def pull(repo_id: str, *args: Any, **kwargs: Any) -> PullResult:
    """loratool.hub.pull with the adapter description (same arguments)."""
    from loratool.hub.pull import pull as hub_pull

    return hub_pull(repo_id, *args, describe=describe, **kwargs)


def push(path: str | os.PathLike[str], repo_id: str, *args: Any, **kwargs: Any) -> PushResult:
    """loratool.hub.push with the adapter read and checked for the model card (same arguments)."""
    from loratool.hub.push import push as hub_push

    return hub_push(path, repo_id, *args, describe=describe_for_push, **kwargs)
