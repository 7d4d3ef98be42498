"""The Hugging Face Hub: `hf://` input paths, pull, push and the model card we generate.

    hf://OWNER/REPO[@REVISION][/PATH]

REVISION is a branch, tag or commit sha. A branch whose name holds '/' is written with '%2F'
(`hf://me/adapters@exp%2Frank16/style`), as in huggingface_hub's own hf:// URIs; `refs/pr/N` is
accepted as is. Downloads go through the Hugging Face cache, so a file is fetched once and
HF_HUB_OFFLINE=1 works from what is cached.

Library rules: nothing here prints or exits; huggingface_hub is imported inside functions (so
`loratool --help` stays fast); every Hub failure leaves as a HubError(message, hint) that names the
repo, and the token never appears in a message. HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE are read when a function is called, not when huggingface_hub was imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from loratool.errors import FormatError, HubError, LoratoolError, register_secret

HF_SCHEME = "hf://"
DEFAULT_REVISION = "main"

# What an adapter or a base model needs; pickles only when a repo has no safetensors at all (the
# readers then refuse them unless --allow-pickle). Never code (*.py) or other frameworks' weights.
FILE_PATTERNS = ("*.safetensors", "*.json", "*.md", "*.txt", "*.model", "*.tiktoken", "*.jinja")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
PEFT_CONFIG = "adapter_config.json"

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_SPECIAL_REF = re.compile(r"^refs/(?:pr/\d+|convert/[\w.-]+)")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}


# ---------------------------------------------------------------------------------------------
# hf:// URLs


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


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Described:
    """What a local path holds, from headers only: an adapter, a base checkpoint, or other files."""

    kind: str  # "adapter", "checkpoint" or "files"
    summary: dict[str, Any]  # adapter: the inspect document without modules; checkpoint: counts
    note: str | None = None  # why it is not an adapter, when it is not


@dataclass
class PullResult:
    """What `pull` fetched and where it lies; to_dict() is the --json document."""

    repo_id: str
    revision: str  # as asked (default branch when none was)
    commit: str | None  # the commit the files come from
    subfolder: str | None
    path: Path  # local directory (or file) to pass to other commands
    files: list[str]  # relative to the repo root
    size: int
    cached_only: bool  # True: path is inside the HF cache; False: copied to -o
    described: Described

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "subfolder": self.subfolder,
            "path": str(self.path),
            "in_cache": self.cached_only,
            "files": self.files,
            "size": self.size,
            "kind": self.described.kind,
            "summary": self.described.summary,
            "note": self.described.note,
        }


@dataclass
class PushResult:
    """What `push` committed; to_dict() is the --json document."""

    repo_id: str
    revision: str  # the branch pushed to
    commit: str
    commit_url: str
    url: str  # the repo page
    files: list[str]  # paths in the repo, README.md included when generated
    size: int
    card: str  # generated | replaced | kept | uploaded (the README.md came with the files)
    created_repo: bool
    created_branch: bool
    changed: bool  # False when the branch already held exactly these files
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "commit_url": self.commit_url,
            "url": self.url,
            "files": self.files,
            "size": self.size,
            "card": self.card,
            "created_repo": self.created_repo,
            "created_branch": self.created_branch,
            "changed": self.changed,
            "warnings": self.warnings,
        }


# ---------------------------------------------------------------------------------------------
# environment, read at call time


def _endpoint(endpoint: str | None) -> str:
    ep = endpoint or os.environ.get("HF_ENDPOINT")
    if not ep:
        from huggingface_hub import constants

        ep = constants.ENDPOINT
    return ep.rstrip("/")


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> str | None:
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's default


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _token(token: str | None) -> str | None:
    if not token:
        from huggingface_hub import get_token

        token = get_token()  # HF_TOKEN, then the token saved by `hf auth login`
    register_secret(token)  # scrubbed from everything the CLI prints, tracebacks included
    return token


def _api(endpoint: str, token: str | None) -> Any:
    from huggingface_hub import HfApi

    from loratool import __version__

    return HfApi(endpoint=endpoint, token=token, library_name="loratool", library_version=__version__)


@contextlib.contextmanager
def _hf_quiet(progress: bool) -> Iterator[None]:
    """huggingface_hub's progress bars only when asked, and none of its retry/warning log lines."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    bars_were_off = are_progress_bars_disabled()
    if not progress and not bars_were_off:
        disable_progress_bars()
    try:
        yield
    finally:
        hf_logger.setLevel(level)
        if not progress and not bars_were_off:
            enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# errors: the one boundary where Hub failures become HubError


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{6,}", "hf_***", text)


def _is_network_error(e: BaseException) -> bool:
    """A transport failure (refused, DNS, timeout, TLS...). huggingface_hub 2.x raises httpx2
    exceptions that are not OSError, 0.x raised requests'; recognise them by module, never import."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionError, TimeoutError)):
            return True
        for cls in type(cur).__mro__:
            mod = cls.__module__ or ""
            if mod.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and any(
                w in cls.__name__ for w in ("Connect", "Timeout", "Network", "Transport", "Protocol", "Proxy")
            ):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _server_says(e: BaseException, token: str | None) -> str:
    msg = getattr(e, "server_message", None) or ""
    msg = " ".join(str(msg).split())
    return f" ({_scrub(msg, token)})" if msg else ""


def _token_hint(token: str | None) -> str:
    if token:
        return "use a token of an account that can read it (--token, HF_TOKEN or `hf auth login`)"
    return "if it is private, log in with `hf auth login`, set HF_TOKEN or pass --token"


def _as_hub_error(e: BaseException, *, where: str, endpoint: str, token: str | None, offline: bool,
                  writing: bool = False) -> HubError | None:
    """Translate a huggingface_hub / transport exception into our HubError; None for anything else."""
    from huggingface_hub import errors as hfe

    def err(message: str, hint: str | None) -> HubError:
        return HubError(_scrub(message, token), _scrub(hint, token) if hint else None)

    not_cached = tuple(c for c in (getattr(hfe, "LocalEntryNotFoundError", None),
                                   getattr(hfe, "RevisionResolutionError", None),
                                   getattr(hfe, "CachedRepoTreeNotFoundError", None)) if c is not None)
    if isinstance(e, hfe.OfflineModeIsEnabled) or (offline and isinstance(e, not_cached)):
        return err(f"{where}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading",
                   "unset HF_HUB_OFFLINE and run the command once online (or `loratool pull` it first)")
    if isinstance(e, hfe.GatedRepoError):
        who = "this account has not been granted access" if token else "you are not logged in"
        return err(f"{where}: the repository is gated and {who}" + _server_says(e, token),
                   f"request access on {endpoint}/{_repo_of(where)}, then use a token of that account "
                   "(--token, HF_TOKEN or `hf auth login`)")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return err(f"{where}: repository not found (or it is private and "
                   + ("this token cannot see it)" if token else "you are not logged in)"),
                   f"check the name; {_token_hint(token)}")
    if isinstance(e, hfe.RevisionNotFoundError):
        return err(f"{where}: revision not found in the repository",
                   "use an existing branch, tag or commit sha; in an hf:// path write a '/' in a branch name as "
                   "%2F (hf://OWNER/REPO@feature%2Fx/PATH)")
    if isinstance(e, hfe.EntryNotFoundError) and not isinstance(e, not_cached):
        return err(f"{where}: no such file or folder in the repository",
                   f"the repository's files are listed at {endpoint}/{_repo_of(where)}/tree/main")
    if isinstance(e, getattr(hfe, "LocalTokenNotFoundError", ())):
        return err(f"{where}: no Hugging Face token found",
                   "log in with `hf auth login`, set HF_TOKEN or pass --token")
    status = _status(e)
    if status == 401:
        return err(f"{where}: the Hub rejected the token (401 Unauthorized)",
                   "the token from --token, HF_TOKEN or `hf auth login` is invalid or expired; "
                   "create a new one in your Hub settings (Access Tokens)")
    if status == 403:
        what = "write to" if writing else "read"
        return err(f"{where}: permission denied (403 Forbidden): this token cannot {what} it" + _server_says(e, token),
                   "use a token with write access to that namespace, or push to your own namespace"
                   if writing else _token_hint(token))
    if isinstance(e, not_cached) or _is_network_error(e):
        why = "" if isinstance(e, not_cached) else f" ({type(e).__name__})"
        if writing:
            return err(f"{where}: cannot reach the Hub at {endpoint}{why}", "check the network and HF_ENDPOINT")
        return err(f"{where}: cannot reach the Hub at {endpoint}{why} and the files are not in the local cache",
                   "check the network and HF_ENDPOINT; files pulled before work offline with HF_HUB_OFFLINE=1")
    if status is not None:
        return err(f"{where}: the Hub answered {status}" + _server_says(e, token),
                   "retry later; if it persists, check the status of the Hub")
    if isinstance(e, ValueError) and str(e).startswith("Invalid metadata in README.md"):
        return err(f"{where}: the Hub refused README.md: {' '.join(str(e).split())}",
                   "fix the YAML front matter of README.md")
    if isinstance(e, OSError) and e.errno is not None:
        return err(f"{where}: {(e.strerror or str(e)).lower()}" + (f": {e.filename}" if e.filename else ""),
                   "check free space and permissions of the Hugging Face cache (HF_HOME)")
    return None


def _repo_of(where: str) -> str:
    if is_hf_url(where):
        with contextlib.suppress(HubError):
            return parse_hf_url(where).repo_id
    return where.split("@", 1)[0]


@contextlib.contextmanager
def _boundary(*, where: str, endpoint: str, token: str | None, offline: bool, writing: bool = False,
              progress: bool = False) -> Iterator[None]:
    """Run Hub calls; turn their failures into HubError (anything unrecognised is a bug and propagates)."""
    try:
        with _hf_quiet(progress):
            yield
    except LoratoolError:
        raise
    except Exception as e:
        mapped = _as_hub_error(e, where=where, endpoint=endpoint, token=token, offline=offline, writing=writing)
        if mapped is None:
            raise
        raise mapped from e


# ---------------------------------------------------------------------------------------------
# downloading


def resolve_path(path_str: str | os.PathLike[str], *, token: str | None = None, endpoint: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> Path:
    """Turn an input path into a local one: plain paths pass through, hf:// paths are downloaded.

    `hf://OWNER/REPO[@REV]` gives the repo's snapshot directory (adapter/model files only);
    `.../PATH` a file (a PEFT weights file comes with its adapter_config.json) or a folder.
    Files come through the Hugging Face cache; with HF_HUB_OFFLINE=1 only the cache is used.

    Args:
        token: Hub token; default HF_TOKEN or the saved login.
        endpoint: Hub URL; default HF_ENDPOINT or https://huggingface.co.
        cache_dir: default HF_HUB_CACHE, HF_HOME/hub, or huggingface_hub's default.
        progress: let huggingface_hub draw its download bars on stderr.

    Raises:
        HubError: malformed URL, or the Hub could not give the files (the message names the repo).
    """
    if not is_hf_url(str(path_str)):
        return Path(path_str)
    url = parse_hf_url(str(path_str))
    fetched = _fetch(url.repo_id, url.revision, url.path, token=token, endpoint=endpoint, cache_dir=cache_dir,
                     progress=progress, shown=str(url))
    return fetched.path


@dataclass
class _Fetched:
    path: Path
    snapshot: Path  # the snapshot root the files lie in
    files: list[str]


def _fetch(repo_id: str, revision: str | None, subpath: str, *, token: str | None, endpoint: str | None,
           cache_dir: str | os.PathLike[str] | None, progress: bool, shown: str) -> _Fetched:
    from huggingface_hub import snapshot_download

    ep = _endpoint(endpoint)
    tok = _token(token)
    cache = _cache_dir(cache_dir)
    rev = revision or DEFAULT_REVISION
    offline = _offline()
    with _boundary(where=shown, endpoint=ep, token=tok, offline=offline, progress=progress):
        api = _api(ep, tok)
        local_only = offline
        unreachable: BaseException | None = None
        if not offline:
            # One call that fails fast: repo_info is not retried, whereas a refused connection inside
            # snapshot_download/hf_hub_download is retried for ~20 s. It also sorts out 401/404/revision.
            try:
                info = api.repo_info(repo_id, revision=rev)
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
                                  "token": tok, "local_files_only": local_only}
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


def check_repo_file(name: str, where: str) -> str:
    """A file name from a repository listing (or given for one), refused if it could leave its folder.

    A hostile or broken server can list `../../blobs/x` or `/etc/x`; such a name would be read or
    written outside the cache folder or the -o folder.

    Raises:
        HubError: absolute, `..`, backslash, NUL or empty names, naming the entry.
    """
    from loratool.st import unsafe_name

    problem = unsafe_name(name) if isinstance(name, str) else "is not a string"
    if problem:
        raise HubError(f"{where}: repository file name {name!r} {problem}",
                       hint="refusing a name that could lead outside its folder; the repository listing is corrupt "
                       "or hostile")
    return name


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
         cache_dir: str | os.PathLike[str] | None = None, force: bool = False, progress: bool = False) -> PullResult:
    """Download an adapter (or a base model) into the Hugging Face cache, and optionally copy it to out_dir.

    Args:
        repo_id: OWNER/REPO.
        revision: branch ('/' allowed), tag or commit sha; default the default branch.
        subfolder: a folder (or file) inside the repo; default the repo root.
        out_dir: also copy the files here (atomically; refused if it exists unless force).
        token, endpoint, cache_dir, progress: as for resolve_path.

    Raises:
        HubError: the Hub could not give the files. OutputExistsError: out_dir exists.
    """
    _check_repo_id(repo_id, repo_id)
    sub = (subfolder or "").strip("/")
    if sub:
        check_repo_file(sub, f"{HF_SCHEME}{repo_id}")
    shown = str(HfUrl(repo_id, revision, sub))
    fetched = _fetch(repo_id, revision, sub, token=token, endpoint=endpoint, cache_dir=cache_dir,
                     progress=progress, shown=shown)
    path = fetched.path
    if out_dir is not None:
        path = _copy_out(fetched, Path(out_dir), force=force)
    size = sum((fetched.snapshot / f).stat().st_size for f in fetched.files if (fetched.snapshot / f).exists())
    return PullResult(repo_id, revision or DEFAULT_REVISION, _commit_of(fetched.snapshot), sub or None, path,
                      fetched.files, size, out_dir is None, describe(path))


def _copy_out(fetched: _Fetched, out: Path, *, force: bool) -> Path:
    """Copy the fetched files (symlinks into the cache resolved) to out, atomically."""
    from loratool.st import atomic_output

    src = fetched.path
    with atomic_output(out, force=force, directory=True, inputs=[src, fetched.snapshot], kind="download") as tmp:
        if src.is_dir():
            for f in sorted(src.rglob("*")):
                if f.is_file():
                    dest = tmp / f.relative_to(src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, dest)
        else:
            shutil.copyfile(src, tmp / src.name)
            config = src.parent / PEFT_CONFIG
            if config.is_file() and src.name != PEFT_CONFIG:
                shutil.copyfile(config, tmp / PEFT_CONFIG)
    return out if src.is_dir() else out / src.name


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
        from loratool.st import open_checkpoint

        ckpt = open_checkpoint(p)
    except LoratoolError:
        files = [f for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
        return Described("files", {"files": len(files), "size": sum(f.stat().st_size for f in files)}, note)
    params = 0
    for info in ckpt.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        params += n
    return Described("checkpoint", {"tensors": len(ckpt.tensors), "params": params, "files": len(ckpt.files),
                                    "size": sum(f.stat().st_size for f in ckpt.files)}, note)


# ---------------------------------------------------------------------------------------------
# uploading


def _upload_files(path: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) pairs; hidden files and folders (.cache, .git, ...) stay behind."""
    if path.is_file():
        return [(path.name, path)]
    out = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), f))
    return out


def push(path: str | os.PathLike[str], repo_id: str, private: bool = False, revision: str | None = None,
         message: str | None = None, token: str | None = None, endpoint: str | None = None, *,
         overwrite_card: bool = False, progress: bool = False) -> PushResult:
    """Upload an adapter directory or file to a Hub model repo in one commit.

    Creates the repo (private when asked) and the branch when missing. Without a README.md among the
    files, a model card is generated (front matter: base_model, library_name, tags; body: the inspect
    summary and the loratool provenance); an existing README.md on the Hub is kept unless overwrite_card.

    Args:
        path: a PEFT directory, a .safetensors file, or any model directory (e.g. a merged model).
        repo_id: OWNER/NAME, or NAME alone for the token's own namespace.
        revision: branch to commit to ('/' allowed), created from the default branch if missing.
        message: commit message.

    Raises:
        FormatError: path missing, empty or not a readable adapter. HubError: any Hub failure.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub import errors as hfe

    src = Path(path)
    if not src.exists():
        raise FormatError(f"{src}: no such file or directory")
    files = _upload_files(src)
    if not files:
        raise FormatError(f"{src}: nothing to upload (no files outside hidden folders)")
    described = _describe_for_push(src)
    if "/" in repo_id or not re.fullmatch(_NAME, repo_id):
        _check_repo_id(repo_id, repo_id)
    branch = revision or DEFAULT_REVISION
    ep = _endpoint(endpoint)
    tok = _token(token)
    where = f"{HF_SCHEME}{repo_id}" + (f"@{branch}" if revision else "")
    if not tok:
        raise HubError(f"{where}: pushing needs a Hugging Face token with write access",
                       hint="log in with `hf auth login`, set HF_TOKEN or pass --token")
    if _offline():
        raise HubError(f"{where}: HF_HUB_OFFLINE=1 forbids uploading", hint="unset HF_HUB_OFFLINE to push")
    warnings: list[str] = []
    with _boundary(where=where, endpoint=ep, token=tok, offline=False, writing=True, progress=progress):
        api = _api(ep, tok)
        user = api.whoami()["name"]
        if "/" not in repo_id:
            repo_id = f"{user}/{repo_id}"
            where = f"{HF_SCHEME}{repo_id}" + (f"@{branch}" if revision else "")
        created_repo = False
        try:
            info = api.repo_info(repo_id)
        except hfe.GatedRepoError:
            raise
        except hfe.RepositoryNotFoundError:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.repo_info(repo_id)
            created_repo = True
        if private and not created_repo and not info.private:
            warnings.append(f"{repo_id} already exists and is public; --private does not change that")
        head = info.sha
        created_branch = False
        if revision:
            refs = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
            if branch in refs:
                head = refs[branch]
            else:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
                created_branch = True
        names = [rel for rel, _ in files]
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)) for rel, f in files]
        if "README.md" in names:
            card = "uploaded"
        else:
            exists = api.file_exists(repo_id, "README.md", revision=branch)
            if exists and not overwrite_card:
                card = "kept"
                warnings.append("README.md already exists on the Hub; kept it (--overwrite-card replaces it)")
            else:
                card = "replaced" if exists else "generated"
                text = model_card(described, repo_id=repo_id, files=files, source=src)
                ops.insert(0, CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=text.encode()))
                names.insert(0, "README.md")
        commit = api.create_commit(
            repo_id, ops, commit_message=message or f"Upload {src.name} with loratool", revision=branch,
        )
    size = sum(f.stat().st_size for _, f in files)
    return PushResult(repo_id, branch, commit.oid, commit.commit_url, f"{ep}/{repo_id}", names, size, card,
                      created_repo, created_branch, commit.oid != head, warnings)


def _describe_for_push(src: Path) -> Described:
    """Adapters must read cleanly (no broken upload); other directories (a merged model) are allowed."""
    looks_like_adapter = src.is_file() or (src / PEFT_CONFIG).exists() or (src / "adapter_model.safetensors").exists()
    if looks_like_adapter:
        from loratool.ops.inspect import inspect_adapter

        doc = inspect_adapter(src).to_dict()  # raises FormatError/IncompatibleError with the file and key
        doc.pop("modules", None)
        return Described("adapter", doc)
    return describe(src)


# ---------------------------------------------------------------------------------------------
# the model card


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _counts(d: dict[str, Any], what: str = "modules") -> str:
    if len(d) <= 1:
        return ", ".join(d)
    if len(set(d.values())) == 1:
        return f"{', '.join(d)} ({next(iter(d.values()))} {what} each)"
    return ", ".join(f"{k} ({v} {what})" for k, v in d.items())


def model_card(described: Described, *, repo_id: str, files: list[tuple[str, Path]], source: Path) -> str:
    """README.md for a pushed adapter or model: YAML front matter, summary table, provenance, usage."""
    s = described.summary
    adapter = described.kind == "adapter"
    base = s.get("base_model") if adapter else None
    meta: dict[str, str] = dict(s.get("metadata") or {}) if adapter else _checkpoint_metadata(source)
    fmt = s.get("format") if adapter else None

    front = ["---"]
    if base and _REPO_ID.fullmatch(base):  # a local path is no Hub base_model (the Hub rejects it)
        front.append(f"base_model: {_yaml_str(base)}")
    if fmt == "peft":
        front.append("library_name: peft")
    front += ["tags:", "- lora", "- loratool", "---", ""]

    name = repo_id.split("/", 1)[-1]
    body = [f"# {name}", ""]
    if adapter:
        body += [f"A LoRA adapter in {fmt} format"
                 + (f" for `{base}`" if base else "") + ", published with loratool.", ""]
        ranks = s["ranks"]
        rank = (str(ranks["min"]) if ranks["min"] == ranks["max"]
                else f"{ranks['min']} to {ranks['max']} (most common {ranks['most_common']})")
        rows = [
            ("format", str(fmt)),
            ("base model", base or "not recorded"),
            ("modules", str(s["num_modules"])),
            ("rank", rank),
            ("alpha", _counts(s["alphas"]) + f"; from {', '.join(s['alpha_sources'])}"),
            ("scale", _counts(s["scales"])),
            ("targets", _counts(s["targets"])),
            ("rsLoRA / DoRA", f"{'yes' if s['rslora'] else 'no'} / {'yes' if s['dora'] else 'no'}"),
            ("dtypes", ", ".join(s["dtypes"])),
            ("LoRA parameters", f"{s['lora_params']:,}"),
        ]
    else:
        body += ["Model files published with loratool.", ""]
        rows = [(k, str(v)) for k, v in s.items() if k != "size"]
    rows.append(("files", ", ".join(f"`{rel}`" for rel, _ in files)
                 + f" ({_human(sum(f.stat().st_size for _, f in files))})"))
    body += ["| | |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows] + [""]

    body += _provenance(meta)
    body += _usage(fmt, repo_id, files, source, base if base and _REPO_ID.fullmatch(base) else None,
                   (s.get("config") or {}).get("task_type") if adapter else None)
    return "\n".join(front + body).rstrip() + "\n"


def _checkpoint_metadata(src: Path) -> dict[str, str]:
    """The loratool provenance of the first weights file that carries one (e.g. a merged model)."""
    from loratool.st import read_header

    for f in sorted(src.rglob("*.safetensors")) if src.is_dir() else [src]:
        try:
            meta = read_header(f).metadata
        except LoratoolError:
            continue
        if "loratool.op" in meta:
            return dict(meta)
    return {}


def _provenance(meta: dict[str, str]) -> list[str]:
    op = meta.get("loratool.op")
    if not op:
        return []
    out = ["## Provenance", "", f"Made by `loratool {op}`"
           + (f" (loratool {meta['loratool.version']})" if meta.get("loratool.version") else "") + "."]
    params = meta.get("loratool.params")
    if params:
        with contextlib.suppress(ValueError, RecursionError):
            params = json.dumps(json.loads(params), indent=2, sort_keys=True)
        out += ["", "Parameters:", "", "```json", params.replace("```", "'''"), "```"]
    sources = meta.get("loratool.sources")
    if sources:
        try:
            parsed = json.loads(sources)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict) and parsed:
            # file names only: a local absolute path says more about the uploader than about the adapter
            out += ["", "Sources (sha256):", ""]
            out += [f"- `{Path(str(k)).name}`: `{v}`" for k, v in parsed.items()]
    return [*out, ""]


_AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
               "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
               "QUESTION_ANS": "AutoModelForQuestionAnswering"}


def _usage(fmt: str | None, repo_id: str, files: list[tuple[str, Path]], source: Path, base: str | None,
           task_type: Any) -> list[str]:
    if fmt == "peft":
        auto = _AUTO_CLASS.get(str(task_type), "AutoModel")
        code = ["from peft import PeftModel", f"from transformers import {auto}", "",
                f"base = {auto}.from_pretrained({_yaml_str(base) if base else 'BASE_MODEL'})",
                f"model = PeftModel.from_pretrained(base, {_yaml_str(repo_id)})"]
    elif fmt in ("kohya", "diffusers") and source.is_file():
        code = [f"pipe.load_lora_weights({_yaml_str(repo_id)}, weight_name={_yaml_str(files[0][0])})"]
    else:
        code = []
    out = ["## Usage", ""]
    if code:
        out += ["```python", *code, "```", ""]
    out += ["```bash", f"loratool inspect hf://{repo_id}", f"loratool pull {repo_id} -o ./{repo_id.split('/')[-1]}",
            "```", ""]
    return out
