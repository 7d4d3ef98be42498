"""The run's ledger: one JSON line per finished item, keyed by the input's content and the options.

`--resume` skips an item whose key is in the ledger with status ok or findings (a command that ran
to its end and whose answer cannot change while the input and options stay the same); failures,
timeouts and crashes are tried again. The key is the sha256 of the command, its options, the item's
own options and output path, and the content hash of the input (input_hash): renaming or moving
an input keeps its key, changing one byte of it does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loratool.errors import IncompatibleError

DONE = ("ok", "findings")


def input_hash(path: str) -> str:
    """sha256 of a file's bytes; of a folder, over its files' relative names and sha256 (sorted, links
    not followed); an hf:// URL is its own text (pin @REVISION for a key that follows the content)."""
    from loratool.io.copies import sha256_file

    if path.startswith("hf://"):
        return "url:" + path
    p = Path(path)
    try:
        if p.is_file():
            return sha256_file(p)
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink()):
                h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
            return "dir:" + h.hexdigest()
    except OSError:
        pass
    return "missing:" + os.path.abspath(path)  # its command fails; it is never skipped


def item_key(op: str, args: list[str], options: list[str], out: str | None, content: str) -> str:
    doc = json.dumps([op, args, options, os.path.abspath(out) if out else None, content], separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


class Ledger:
    """An append-only JSONL file of item records (each with its `key`); records are flushed one by one,
    so a run killed at any point leaves every finished item in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        self._fd: int | None = None

    def load(self) -> None:
        """Read what earlier runs finished (a torn last line, from a killed run, is ignored)."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if isinstance(rec, dict) and isinstance(rec.get("key"), str) and rec.get("status") in DONE:
                        self.done[rec["key"]] = rec

    def append(self, record: dict[str, Any]) -> None:
        """Add one line with a single O_APPEND write, so shards sharing one ledger never interleave lines."""
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as e:
                raise IncompatibleError(f"{self.path}: cannot write the batch ledger ({e.strerror})") from None
            if os.fstat(self._fd).st_size and not self._ends_with_newline():
                os.write(self._fd, b"\n")  # after a torn line
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
