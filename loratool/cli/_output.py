"""The one sink for a command's result: a table on stdout, or one --json document, or (quiet) the
result alone; the document's `warnings` go to stderr (in --json they stay inside the document).

Every command ends with `return emit(doc, render, as_json=..., quiet=...)`, where doc is the
library report's to_dict() (the --json document: `schema` and a `warnings` list of strings in
every command) and render prints the human form of the same document to stdout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loratool.cli import _render


def emit(doc: dict[str, Any], render: Callable[[dict[str, Any]], None], *, as_json: bool, quiet: bool,
         code: int = 0) -> int:
    """Print a command's result document and return its exit code."""
    if as_json:
        _render.print_json(doc)
        return code
    if not quiet:
        for w in doc.get("warnings") or []:
            _render.warn(str(w))
    render(doc)
    return code
