"""hf:// URLs and repo ids: `hf://OWNER/REPO[@REVISION][/PATH]`, `OWNER/REPO[@REVISION]`."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from loratool.errors import HubError

HF_SCHEME = "hf://"
DEFAULT_REVISION = "main"

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_SPECIAL_REF = re.compile(r"^refs/(?:pr/\d+|convert/[\w.-]+)")
_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HfUrl:
    """A parsed `hf://OWNER/REPO[@REVISION][/PATH]`."""

    repo_id: str  # OWNER/REPO
    revision: str | None  # branch, tag or sha as given (decoded); None = the default branch
    path: str  # file or folder inside the repo; "" = the repo root

    def __str__(self) -> str:
        rev = ""
        if self.revision is not None:
            special = _SPECIAL_REF.fullmatch(self.revision)
            rev = "@" + (self.revision if special else self.revision.replace("/", "%2F"))
        return f"{HF_SCHEME}{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")


def is_hf_url(path: str | os.PathLike[str]) -> bool:
    """True for strings starting with hf:// (whatever follows; parse_hf_url checks the rest)."""
    return isinstance(path, str) and path.startswith(HF_SCHEME)


def parse_hf_url(url: str) -> HfUrl:
    """Split `hf://OWNER/REPO[@REVISION][/PATH]` into its parts.

    A leading `models/` is accepted (huggingface_hub's spelling); datasets and spaces are refused.

    Raises:
        HubError: not an hf:// URL, or a malformed one.
    """
    if not is_hf_url(url):
        raise HubError(f"{url}: not an hf:// path", hint="write hf://OWNER/REPO[@REVISION][/PATH]")
    body = url[len(HF_SCHEME):]
    kind, _, rest = body.partition("/")
    if kind in ("datasets", "spaces", "kernels", "buckets"):
        raise HubError(f"{url}: only model repositories are supported, not {kind}",
                       hint="write hf://OWNER/REPO[@REVISION][/PATH]")
    if kind == "models" and rest.count("/") >= 1:
        body = rest
    owner, _, rest = body.partition("/")
    if "@" in rest.split("/", 1)[0]:
        name, _, after = rest.partition("@")
        special = _SPECIAL_REF.match(after)
        if special:
            revision, path = special.group(0), after[special.end():].lstrip("/")
            if after[special.end():] and not after[special.end():].startswith("/"):
                raise HubError(f"{url}: bad revision '{after}'", hint="write @refs/pr/N/PATH")
        else:
            raw_rev, _, path = after.partition("/")
            revision = unquote(raw_rev)
        if not revision:
            raise HubError(f"{url}: empty revision after '@'", hint="write hf://OWNER/REPO@BRANCH_OR_SHA")
    else:
        name, _, path = rest.partition("/")
        revision = None
    repo_id = f"{owner}/{name}"
    _check_repo_id(repo_id, url)
    path = path.strip("/")
    if "//" in path or any(part in (".", "..") for part in path.split("/")):
        raise HubError(f"{url}: bad path inside the repo '{path}'",
                       hint="write the path relative to the repo root, without '.', '..' or '//'")
    return HfUrl(repo_id, revision, path)


# a file or folder in the Hugging Face cache: <cache>/models--OWNER--NAME/snapshots/<commit>[/PATH]
# (the Hub forbids '--' inside names, so the split is unambiguous)
_CACHED = re.compile(
    r"(?:^|/)models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})(?:/(?P<path>.*))?$"
)


def cached_url(path: str | os.PathLike[str]) -> str | None:
    """The hf:// URL, pinned to its commit, of a path in the Hugging Face cache: a file that an
    `hf://alice/lora` input resolved to is `hf://alice/lora@<sha>/adapter_model.safetensors`.
    None for any other path. Used for provenance, so outputs name the repo, not a cache folder.
    """
    m = _CACHED.search(Path(path).as_posix())
    if m is None:
        return None
    return str(HfUrl(f"{m['owner']}/{m['name']}", m["sha"], (m["path"] or "").strip("/")))


def split_repo_ref(ref: str) -> tuple[str, str | None]:
    """`OWNER/REPO[@REVISION]` -> (repo_id, revision). Everything after '@' is the revision, '/' included.

    Raises:
        HubError: malformed repo id or empty revision.
    """
    repo_id, sep, revision = ref.partition("@")
    if sep and not revision:
        raise HubError(f"{ref}: empty revision after '@'", hint="write OWNER/REPO@BRANCH_OR_SHA")
    _check_repo_id(repo_id, ref)
    return repo_id, (revision or None)


def _check_repo_id(repo_id: str, shown: str) -> None:
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise HubError(
            f"{shown}: '{repo_id}' is not a repo id",
            hint="a repo id is OWNER/NAME (letters, digits, '-', '_', '.'), e.g. hf://my-org/my-lora",
        )



def _repo_of(where: str) -> str:
    if is_hf_url(where):
        with contextlib.suppress(HubError):
            return parse_hf_url(where).repo_id
    return where.split("@", 1)[0]


def check_repo_file(name: str, where: str) -> str:
    """A file name from a repository listing (or given for one), refused if it could leave its folder.

    A hostile or broken server can list `../../blobs/x` or `/etc/x`; such a name would be read or
    written outside the cache folder or the -o folder.

    Raises:
        HubError: absolute, `..`, backslash, NUL or empty names, naming the entry.
    """
    from loratool.io.paths import unsafe_name

    problem = unsafe_name(name) if isinstance(name, str) else "is not a string"
    if problem:
        raise HubError(f"{where}: repository file name {name!r} {problem}",
                       hint="refusing a name that could lead outside its folder; the repository listing is corrupt "
                       "or hostile")
    return name


@dataclass
class RepoFiles:
    """What a pull or a push moved: the repo, the revision asked for, the commit, the files, their size."""

    repo_id: str
    revision: str
    commit: str | None
    files: list[str]  # paths in the repo
    size: int

    def _document(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """The --json document: these fields, with the command's own `before` and `after` the files."""
        head = {"schema": 1, "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}
        return {**head, **before, "files": self.files, "size": self.size, **after}
