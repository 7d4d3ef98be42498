"""One module per verb. Each takes typed arguments and returns a result dataclass with to_dict().

Nothing here prints or exits; long loops take a progress callback (done, total), and commands
whose start-up takes seconds (merge, convert) a `phase` callback told what they are doing before
there is anything to count ("reading the adapters", "writing ...").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Progress = Callable[[int, int], None]


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that reads the numbers in a name as numbers: double_blocks_2 before double_blocks_10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)

Phase = Callable[[str], None]


class Row:
    """A report row (one module, one tensor): a dataclass whose fields are its JSON object."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def written(out: Path, fmt: str) -> dict[str, Any]:
    """The head of the --json document of a command that writes an adapter (combine, rescale, resize)."""
    return {"schema": 1, "out": str(out), "format": fmt}


def output_size(path: Path) -> int:
    """Bytes written: a file's size, or the sum over a directory's files."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size
