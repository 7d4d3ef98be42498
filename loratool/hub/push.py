"""Uploading: `push` an adapter or model directory to a Hub model repo in one commit."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.errors import FormatError, HubError, known_secrets, scrub_bytes
from loratool.hub._env import _api, _endpoint, _offline, _timeout, _token
from loratool.hub.card import check_base_model, fix_front_matter, hub_model_id, model_card
from loratool.hub.describe import Describe, describe_files
from loratool.hub.errors import _boundary
from loratool.hub.urls import _NAME, DEFAULT_REVISION, HF_SCHEME, RepoFiles, _check_repo_id


@dataclass
class PushResult(RepoFiles):
    """What `push` committed; to_dict() is the --json document. `files` include README.md when generated."""

    commit_url: str
    url: str  # the repo page
    card: str  # generated | replaced | kept | uploaded (the README.md came with the files)
    created_repo: bool
    created_branch: bool
    changed: bool  # False when the branch already held exactly these files
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self._document({"commit_url": self.commit_url, "url": self.url},
                              {"card": self.card, "created_repo": self.created_repo,
                               "created_branch": self.created_branch, "new_commit": self.changed,
                               "warnings": self.warnings})


def _upload_files(path: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) pairs; hidden files and folders (.cache, .git, ...) stay behind.

    A file reached through a symbolic link that leads out of the folder is refused (io.copies.copy_tree_files),
    as are special files: an upload never reads what the folder only points at.
    """
    from loratool.io.copies import copy_tree_files

    if path.is_file():
        return [(path.name, path)]
    return [(rel.as_posix(), f) for f, rel in copy_tree_files(path, refuse_links_out=True)]


_TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".jinja", ".py", ".cfg", ".toml")
_TEXT_MAX = 64 << 20


def _refuse_token_in(files: list[tuple[str, Path]]) -> None:
    """Never publish the token: a text file or a safetensors header (metadata) holding a known
    token (errors.known_secrets) is refused, naming the file, before anything is sent."""
    from loratool.io.header import open_input, read_header

    if not known_secrets():
        return
    for rel, f in files:
        if f.suffix == ".safetensors":
            meta = read_header(f).metadata
            raw = json.dumps(meta, ensure_ascii=False).encode("utf-8", "surrogatepass")
        elif f.suffix in _TEXT_SUFFIXES and f.stat().st_size <= _TEXT_MAX:
            with open_input(f) as fh:
                raw = fh.read(_TEXT_MAX)
        else:
            continue
        if scrub_bytes(raw) != raw:
            raise FormatError(f"{f}: holds the Hub token in use ({rel} would publish it); refusing to upload",
                              hint="remove the token from the file (or its safetensors metadata), then push again")


def push(path: str | os.PathLike[str], repo_id: str, private: bool = False, revision: str | None = None,
         message: str | None = None, token: str | None = None, endpoint: str | None = None, *,
         overwrite_card: bool = False, progress: bool = False, timeout: float | None = None,
         base_model: str | None = None, describe: Describe | None = None) -> PushResult:
    """Upload an adapter directory or file to a Hub model repo in one commit.

    Creates the repo (private when asked) and the branch when missing. Without a README.md among the
    files, a model card is generated (front matter: base_model, library_name, tags; body: the inspect
    summary and the loratool provenance); an existing README.md on the Hub is kept unless overwrite_card.

    Args:
        path: a PEFT directory, a .safetensors file, or any model directory (e.g. a merged model).
        repo_id: OWNER/NAME, or NAME alone for the token's own namespace.
        revision: branch to commit to ('/' allowed), created from the default branch if missing.
        message: commit message.
        base_model: the Hub id of the base model for the card's `base_model:` (default: what the
            adapter records, when it is a Hub model id). A README.md among the files whose
            `base_model` the Hub would refuse (PEFT writes `base_model: ''`) is uploaded repaired
            (card "fixed"; the file on disk is not changed).
        timeout: seconds to wait for each answer of the Hub; default LORATOOL_HUB_TIMEOUT or 10.
        describe: what describes (and checks) the folder for the card: loratool.ops.describe.describe_for_push
            reads an adapter; without it, files are described from headers only.

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
    described = (describe or describe_files)(src)  # the caller's (ops.describe) reads an adapter and checks it
    if base_model is not None:
        check_base_model(base_model)
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
    _refuse_token_in(files)
    warnings: list[str] = []
    secs = _timeout(timeout)
    with _boundary(where=where, endpoint=ep, token=tok, offline=False, writing=True, progress=progress, timeout=secs):
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
            readme = dict(files)["README.md"]
            recorded = described.summary.get("base_model") if described.kind == "adapter" else None
            text, fixed = fix_front_matter(readme.read_text(encoding="utf-8", errors="replace"), base_model,
                                           hub_model_id(recorded))
            if fixed:
                card = "fixed"
                warnings.append(f"README.md: {fixed} in the uploaded copy (the file on disk is unchanged)")
                i = names.index("README.md")
                ops[i] = CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=text.encode())
        else:
            exists = api.file_exists(repo_id, "README.md", revision=branch)
            if exists and not overwrite_card:
                card = "kept"
                warnings.append("README.md already exists on the Hub; kept it (--overwrite-card replaces it)")
            else:
                card = "replaced" if exists else "generated"
                text = model_card(described, repo_id=repo_id, files=files, source=src, base_model=base_model)
                ops.insert(0, CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=text.encode()))
                names.insert(0, "README.md")
        commit = api.create_commit(
            repo_id, ops, commit_message=message or f"Upload {src.name} with loratool", revision=branch,
        )
    size = sum(f.stat().st_size for _, f in files)
    return PushResult(repo_id, branch, commit.oid, names, size, commit_url=commit.commit_url, url=f"{ep}/{repo_id}",
                      card=card, created_repo=created_repo, created_branch=created_branch,
                      changed=commit.oid != head, warnings=warnings)

