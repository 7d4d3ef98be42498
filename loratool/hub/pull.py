"""Downloading: hf:// input paths resolved through the Hugging Face cache, and `pull`."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.errors import HubError, LoratoolError
from loratool.hub._env import _api, _cache_dir, _endpoint, _offline, _timeout, _token
from loratool.hub._guard import HubDeadline
from loratool.hub.describe import Describe, Described, describe_files
from loratool.hub.errors import _boundary, _is_network_error
from loratool.hub.urls import (
    _SHA,
    DEFAULT_REVISION,
    HF_SCHEME,
    HfUrl,
    RepoFiles,
    _check_repo_id,
    check_repo_file,
    is_hf_url,
    parse_hf_url,
)

# What an adapter or a base model needs; pickles only when a repo has no safetensors at all (the
# readers then refuse them unless --allow-pickle). Never code (*.py) or other frameworks' weights.
FILE_PATTERNS = ("*.safetensors", "*.json", "*.md", "*.txt", "*.model", "*.tiktoken", "*.jinja")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
PEFT_CONFIG = "adapter_config.json"


@dataclass
class PullResult(RepoFiles):
    """What `pull` fetched and where it lies; to_dict() is the --json document."""

    subfolder: str | None
    path: Path  # local directory (or file) to pass to other commands
    cached_only: bool  # True: path is inside the HF cache; False: copied to -o
    described: Described

    def to_dict(self) -> dict[str, Any]:
        d = self.described
        return self._document({"subfolder": self.subfolder, "path": str(self.path), "in_cache": self.cached_only},
                              {"kind": d.kind, "summary": d.summary, "note": d.note, "warnings": []})


def resolve_path(path_str: str | os.PathLike[str], *, token: str | None = None, endpoint: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool = False,
                 timeout: float | None = None) -> Path:
    """Turn an input path into a local one: plain paths pass through, hf:// paths are downloaded.

    `hf://OWNER/REPO[@REV]` gives the repo's snapshot directory (adapter/model files only);
    `.../PATH` a file (a PEFT weights file comes with its adapter_config.json) or a folder.
    Files come through the Hugging Face cache; with HF_HUB_OFFLINE=1 only the cache is used.

    Args:
        token: Hub token; default HF_TOKEN or the saved login.
        endpoint: Hub URL; default HF_ENDPOINT or https://huggingface.co.
        cache_dir: default HF_HUB_CACHE, HF_HOME/hub, or huggingface_hub's default.
        progress: let huggingface_hub draw its download bars on stderr.
        timeout: seconds to wait for each answer of the Hub; default LORATOOL_HUB_TIMEOUT or 10.
            When the Hub does not answer (or cannot be reached), the files come from the cache.

    Raises:
        HubError: malformed URL, or the Hub could not give the files (the message names the repo).
    """
    if not is_hf_url(str(path_str)):
        return Path(path_str)
    url = parse_hf_url(str(path_str))
    fetched = _fetch(url.repo_id, url.revision, url.path, token=token, endpoint=endpoint, cache_dir=cache_dir,
                     progress=progress, shown=str(url), timeout=timeout)
    return fetched.path


@dataclass
class _Fetched:
    path: Path
    snapshot: Path  # the snapshot root the files lie in
    files: list[str]


def _fetch(repo_id: str, revision: str | None, subpath: str, *, token: str | None, endpoint: str | None,
           cache_dir: str | os.PathLike[str] | None, progress: bool, shown: str,
           timeout: float | None = None) -> _Fetched:
    ep = _endpoint(endpoint)
    tok = _token(token)
    cache = _cache_dir(cache_dir)
    rev = revision or DEFAULT_REVISION
    offline = _offline()
    secs = _timeout(timeout)
    with _boundary(where=shown, endpoint=ep, token=tok, offline=offline, progress=progress, timeout=secs):
        fetched = _fetch_in(repo_id, rev, subpath, ep=ep, tok=tok, cache=cache, offline=offline, secs=secs,
                            shown=shown)
    _check_in_cache(fetched, repo_id, cache, shown)
    return fetched


def _check_in_cache(fetched: _Fetched, repo_id: str, cache: str | None, shown: str) -> None:
    """Every file loratool will read must lie in this repo's part of the cache: the snapshot folder
    inside its snapshots/, each file in its blobs/ (or, where the cache holds no links, in the
    snapshot itself). huggingface_hub builds these paths from the server's answers (the ETag, the
    commit), so a hostile server could otherwise make loratool read, or copy out, any local file.

    Raises:
        HubError: naming the file and where it leads.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from loratool.io.paths import _inside

    storage = Path(cache or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snaps, blobs = os.path.realpath(storage / "snapshots"), os.path.realpath(storage / "blobs")
    snap = os.path.realpath(fetched.snapshot)
    hint = ("refusing a file outside the Hugging Face cache: the server's answers are hostile or the cache was "
            "tampered with; remove the repo's folder from the cache and check HF_ENDPOINT")
    if os.path.dirname(snap) != snaps:
        raise HubError(f"{shown}: the snapshot folder {fetched.snapshot} lies outside the cache's {snaps}", hint=hint)
    names = list(fetched.files)
    if fetched.path.is_file() or fetched.path.is_symlink():  # a file comes with the PEFT config beside it
        beside = fetched.path.parent / PEFT_CONFIG
        if os.path.lexists(beside):
            names.append(os.path.relpath(beside, fetched.snapshot))
    for name in names:
        real = os.path.realpath(fetched.snapshot / name)
        if not (_inside(real, blobs) or _inside(real, snap)):
            raise HubError(f"{shown}: {name} leads out of the Hugging Face cache (to {real})", hint=hint)


def _fetch_in(repo_id: str, rev: str, subpath: str, *, ep: str, tok: str | None, cache: str | None, offline: bool,
              secs: float, shown: str) -> _Fetched:
    """_fetch's Hub calls, inside its boundary."""

    api = _api(ep, tok)
    local_only = offline
    unreachable: BaseException | None = None
    if not offline:
        # One call that fails fast: repo_info is not retried, whereas a refused connection inside
        # snapshot_download/hf_hub_download is retried for ~20 s. It also sorts out 401/404/revision.
        # A Hub that accepts the connection and never answers times out here (secs), and the
        # files then come from the cache.
        try:
            info = api.repo_info(repo_id, revision=rev, timeout=secs)
            for sibling in getattr(info, "siblings", None) or []:
                check_repo_file(sibling.rfilename, shown)
        except LoratoolError:
            raise
        except Exception as e:
            if not _is_network_error(e):
                raise
            local_only = True  # unreachable: serve from the cache, else report the connection error
            unreachable = e
    common: dict[str, Any] = {"repo_id": repo_id, "revision": rev, "cache_dir": cache, "endpoint": ep,
                              "token": tok, "local_files_only": local_only, "etag_timeout": secs}
    try:
        return _download(api, subpath, common, shown, unreachable)
    except HubDeadline as e:
        # the repo answered but a file did not, in time (_guard ends every later request at once):
        # what the cache holds still serves, as when the Hub does not answer at all
        late = e
    try:
        return _download(api, subpath, {**common, "local_files_only": True}, shown, None)
    except Exception as e:
        if _is_not_cached(e):
            raise late from None
        raise


def _download(api: Any, subpath: str, common: dict[str, Any], shown: str,
              unreachable: BaseException | None) -> _Fetched:
    from huggingface_hub import snapshot_download

    local_only = common["local_files_only"]
    try:
        if not subpath:
            snap = Path(snapshot_download(allow_patterns=list(FILE_PATTERNS), **common))
            if not any(snap.rglob("*.safetensors")):
                with contextlib.suppress(Exception):
                    snap = Path(snapshot_download(allow_patterns=[*FILE_PATTERNS, *PICKLE_PATTERNS], **common))
            if not snap.is_dir() or not any(snap.iterdir()):
                raise HubError(f"{shown}: the repository holds no adapter or model files "
                               f"({', '.join(FILE_PATTERNS + PICKLE_PATTERNS)})",
                               hint="check the repository's files; loratool reads safetensors adapters and "
                               "models")
            return _Fetched(snap, snap, _listing(snap))
        if not local_only:
            return _fetch_online(api, subpath, common, shown)
        return _fetch_cached(subpath, common, shown)
    except Exception as e:
        if unreachable is not None and _is_not_cached(e):
            raise unreachable from e
        raise


def _is_not_cached(e: BaseException) -> bool:
    from huggingface_hub import errors as hfe

    kinds = tuple(c for c in (getattr(hfe, "LocalEntryNotFoundError", None),
                              getattr(hfe, "RevisionResolutionError", None)) if c is not None)
    return isinstance(e, kinds)


def _folder_patterns(folder: str) -> list[str]:
    return [f"{folder}/{p}" for p in FILE_PATTERNS]


def _fetch_online(api: Any, subpath: str, common: dict[str, Any], shown: str) -> _Fetched:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    parent = subpath.rsplit("/", 1)[0] if "/" in subpath else ""
    config = f"{parent}/{PEFT_CONFIG}" if parent else PEFT_CONFIG
    infos = {check_repo_file(i.path, shown): i
             for i in api.get_paths_info(common["repo_id"], [subpath, config], revision=common["revision"])}
    entry = infos.get(subpath)
    if entry is None:
        raise HubError(f"{shown}: no such file or folder in the repository",
                       hint=f"the repository's files are listed at {common['endpoint']}/{common['repo_id']}"
                       f"/tree/{common['revision']}")
    if isinstance(entry, RepoFile):
        # A PEFT weights file without its config would read with alpha = rank: fetch the config beside it.
        if config in infos and subpath != config and subpath.endswith((".safetensors", ".bin")):
            hf_hub_download(filename=config, **common)
        local = Path(hf_hub_download(filename=subpath, **common))
        snap = _snapshot_root(local, subpath)
        return _Fetched(local, snap, [subpath])
    snap = Path(snapshot_download(allow_patterns=_folder_patterns(subpath), **common))
    folder = snap / subpath
    return _Fetched(folder, snap, _listing(snap, subpath))


def _fetch_cached(subpath: str, common: dict[str, Any], shown: str) -> _Fetched:
    from huggingface_hub import errors as hfe
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        local = Path(hf_hub_download(filename=subpath, **common))
    except hfe.EntryNotFoundError:
        pass
    else:
        parent = subpath.rsplit("/", 1)[0] if "/" in subpath else ""
        with contextlib.suppress(hfe.EntryNotFoundError):
            hf_hub_download(filename=f"{parent}/{PEFT_CONFIG}" if parent else PEFT_CONFIG, **common)
        return _Fetched(local, _snapshot_root(local, subpath), [subpath])
    snap = Path(snapshot_download(allow_patterns=_folder_patterns(subpath), **common))
    folder = snap / subpath
    if not folder.is_dir() or not any(folder.iterdir()):
        raise hfe.LocalEntryNotFoundError(f"{shown} is not cached")
    return _Fetched(folder, snap, _listing(snap, subpath))


def _snapshot_root(local: Path, subpath: str) -> Path:
    root = local
    for _ in subpath.split("/"):
        root = root.parent
    return root


def _listing(snap: Path, under: str = "") -> list[str]:
    base = snap / under if under else snap
    if base.is_file():
        return [under]
    return sorted(p.relative_to(snap).as_posix() for p in base.rglob("*") if p.is_file())


def _commit_of(snap: Path) -> str | None:
    parts = snap.parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and _SHA.fullmatch(parts[i + 1]):
            return parts[i + 1]
    return None


def pull(repo_id: str, revision: str | None = None, subfolder: str | None = None,
         out_dir: str | os.PathLike[str] | None = None, token: str | None = None, *, endpoint: str | None = None,
         cache_dir: str | os.PathLike[str] | None = None, force: bool = False, progress: bool = False,
         timeout: float | None = None, describe: Describe | None = None) -> PullResult:
    """Download an adapter (or a base model) into the Hugging Face cache, and optionally copy it to out_dir.

    Args:
        repo_id: OWNER/REPO.
        revision: branch ('/' allowed), tag or commit sha; default the default branch.
        subfolder: a folder (or file) inside the repo; default the repo root.
        out_dir: also copy the files here (atomically; refused if it exists unless force).
        token, endpoint, cache_dir, progress, timeout: as for resolve_path.
        describe: what describes the pulled path (loratool.ops.describe.describe reads an adapter);
            without it, files are described from headers only.

    Raises:
        HubError: the Hub could not give the files. OutputExistsError: out_dir exists.
    """
    _check_repo_id(repo_id, repo_id)
    sub = (subfolder or "").strip("/")
    if sub:
        check_repo_file(sub, f"{HF_SCHEME}{repo_id}")
    shown = str(HfUrl(repo_id, revision, sub))
    fetched = _fetch(repo_id, revision, sub, token=token, endpoint=endpoint, cache_dir=cache_dir,
                     progress=progress, shown=shown, timeout=timeout)
    path = fetched.path
    if out_dir is not None:
        path = _copy_out(fetched, Path(out_dir), force=force)
    size = sum((fetched.snapshot / f).stat().st_size for f in fetched.files if (fetched.snapshot / f).exists())
    return PullResult(repo_id, revision or DEFAULT_REVISION, _commit_of(fetched.snapshot), fetched.files, size,
                      subfolder=sub or None, path=path, cached_only=out_dir is None,
                      described=(describe or describe_files)(path))


def _copy_out(fetched: _Fetched, out: Path, *, force: bool) -> Path:
    """Copy the fetched files (symlinks into the cache resolved, checked by _check_in_cache) to out,
    atomically; a known token in a file is written as *** (io.copies.copy_input_file)."""
    from loratool.io.copies import copy_input_file
    from loratool.io.outputs import atomic_output

    src = fetched.path
    with atomic_output(out, force=force, directory=True, inputs=[src, fetched.snapshot], kind="download") as tmp:
        if src.is_dir():
            under = src.relative_to(fetched.snapshot)
            for name in fetched.files:
                rel = Path(name).relative_to(under)
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                copy_input_file(fetched.snapshot / name, dest)
        else:
            copy_input_file(src, tmp / src.name)
            config = src.parent / PEFT_CONFIG
            if config.is_file() and src.name != PEFT_CONFIG:  # checked by _check_in_cache too
                copy_input_file(config, tmp / PEFT_CONFIG)
    return out if src.is_dir() else out / src.name
