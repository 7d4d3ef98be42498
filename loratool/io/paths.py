"""Names that stay inside their folder: file names read from an index or the Hub, and links in a folder.

unsafe_name refuses a relative name that could leave its folder; member_path and folder_file give
`root / name` only when no symbolic link on the way leads out of root (leads_out), the one exception
being the blob store of the Hugging Face cache that a snapshot folder links into. Nothing here reads
a file's contents.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from loratool.errors import FormatError


def unsafe_name(name: str) -> str | None:
    """Why a relative file name read from a file or the Hub could leave its folder, or None if it cannot.

    Absolute paths, drive letters, backslashes, `..` components and NUL bytes are refused; `.` and
    empty components are harmless (a/./b is a/b).
    """
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if "\\" in name:
        return "contains a backslash"
    if ".." in name.split("/"):
        return "contains '..' (leads out of its folder)"
    if all(part in ("", ".") for part in name.split("/")):
        return "is empty"
    return None


def member_path(root: Path, name: Any, *, source: str | os.PathLike[str]) -> Path:
    """`root / name` for a file name that `source` (an index, a repo listing) names, kept inside root.

    Besides unsafe_name's rules, the file must not be reached through a symbolic link that leads out
    of root, except into the blob store of the Hugging Face cache that root is a snapshot of.

    Raises:
        FormatError: naming source and the entry.
    """
    if not isinstance(name, str):
        raise FormatError(f"{source}: entry {name!r} is not a file name")
    problem = unsafe_name(name)
    if problem:
        raise FormatError(f"{source}: file name {name!r} {problem}",
                          hint="refusing a name that could lead outside its folder: the file is corrupt or hostile")
    path = root / PurePosixPath(name)
    real = leads_out(path, root)
    if real is not None:
        raise FormatError(f"{source}: file name {name!r} is a symbolic link leading out of {root} (to {real})",
                          hint=_LINK_HINT)
    return path


_LINK_HINT = ("loratool never follows a link out of an input folder; copy the file into the folder (or pass "
              "the file itself)")


def folder_file(root: Path, name: str) -> Path:
    """`root / name` for a file that a reader of the input folder `root` opens (its config, weights,
    index): every read of a file inside an input folder goes through here or member_path.

    A missing file is returned as is (the caller says what is missing); a file that resolves outside
    root (a symbolic link, of the file or of a folder on the way, to /proc/self/environ, a device,
    someone else's file) is refused, except a link into the blob store of the Hugging Face cache
    that root is a snapshot of.

    Raises:
        FormatError: naming the file and where it leads.
    """
    path = root / name
    real = leads_out(path, root)
    if real is not None:
        raise FormatError(f"{path}: is a symbolic link leading out of the input folder {root} (to {real}); "
                          "refusing to read it", hint=_LINK_HINT)
    return path


def leads_out(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str | None:
    """Where `path` really leads, when that is outside the folder `root` (and outside the blob store
    of the Hugging Face cache repo whose snapshot holds root); None when it stays inside or does not
    exist at all. The one test of "a link out of an input folder"."""
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    allowed = [os.path.realpath(root), *_hf_blob_stores(root)]
    return None if any(_inside(real, a) for a in allowed) else real


def _hf_blob_stores(root: str | os.PathLike[str]) -> list[str]:
    """The blobs folder of the Hugging Face cache repo whose snapshot holds root, if any:
    root is <cache>/models--OWNER--NAME/snapshots/<revision>[/...]."""
    parts = Path(os.path.abspath(root)).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i >= 1 and i + 1 < len(parts) and re.match(r"^(models|datasets|spaces)--", parts[i - 1]):
            blobs = Path(*parts[:i]) / "blobs"
            if blobs.is_dir() and not blobs.is_symlink():
                return [os.path.realpath(blobs)]
    return []


def _inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """path is folder or below it (both absolute, already normalised or resolved)."""
    p, f = os.fspath(path), os.fspath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)
