"""A small Hugging Face Hub-compatible HTTP server for tests: standard library only, 127.0.0.1 only.

It implements what huggingface_hub (2.4, and 1.x) needs for loratool's pull/push and hf:// paths, and
nothing else. Repos live in memory with real commits, branches (names may hold '/') and revisions.
Every upload is answered `uploadMode: "regular"`, so file contents travel base64-encoded inside the
NDJSON commit: no LFS or Xet server is needed.

    with HubServer(users={"tok-alice": "alice"}) as hub:
        hub.add_repo("alice/lora", {"adapter_config.json": b"{}"})
        os.environ["HF_ENDPOINT"] = hub.url

Auth is a Bearer token: a known token is its user; an unknown one is answered 401 everywhere (like the
Hub's "Invalid credentials in Authorization header"). Private repos are invisible to everyone but
their owner (401 anonymous / 404 signed in, `X-Error-Code: RepoNotFound`). Gated repos list their
files but refuse downloads to users not granted (401 / 403, `X-Error-Code: GatedRepo`). Pushing to
someone else's repo or namespace is 403.

Requests huggingface_hub sends and what this server answers (facts read from huggingface_hub's source):
- revisions in API paths are one segment, percent-encoded with `quote(rev, safe="")`; file paths in
  `/resolve/` keep their '/'; so the path is split on '/' first and each segment decoded after.
- `HEAD /{repo}/resolve/{rev}/{path}` must carry X-Repo-Commit, ETag and Content-Length (and no
  Content-Encoding), or hf_hub_download refuses the response.
- `GET /api/agent-harnesses` is fetched once by huggingface_hub's user-agent code (unless
  HF_HUB_DISABLE_TELEMETRY=1); it gets an empty registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DATE = "2024-01-01T00:00:00.000Z"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
REPO_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
# what the Hub accepts as a model id in card metadata: OWNER/NAME or a canonical NAME (gpt2)
MODEL_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def _card_metadata_errors(meta: dict[str, Any]) -> list[str]:
    """The Hub's checks of README front matter that loratool's cards touch: `base_model` is a model
    id or a list of them (an empty string, a local path or a number is refused, as PEFT's
    `base_model: ''` is on the Hub), `tags` a list of strings, `library_name` a string."""
    errors = []
    if "base_model" in meta:
        bases = meta["base_model"]
        for b in bases if isinstance(bases, list) else [bases]:
            if not isinstance(b, str) or not b:
                errors.append(f'"base_model" must be a non-empty string or list of model ids, got {b!r}')
            elif not MODEL_ID_RE.fullmatch(b) or "--" in b or ".." in b:
                errors.append(f'"base_model" must be a valid model id, got {b!r}')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    return errors


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1, which is what the Hub reports as the oid / ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    parent: str | None
    message: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Request:
    method: str
    path: str  # raw (still percent-encoded) path, without the query
    authorization: str | None


class HubServer:
    """The server and its state. Use as a context manager, or start()/stop()."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users = dict(users or {})  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.validated_yaml: list[str] = []
        self.echo_tokens = False  # a careless server: quote the caller's token in 401/403 messages
        # A hostile (or broken) server, for tests/hub/test_hub_hostile.py; each key switches one lie on:
        #   etag: str         the ETag (and X-Linked-Etag) of every file, e.g. '"../../../planted"'
        #   commit: str       X-Repo-Commit of every file, and the `sha` of repo_info
        #   sha: Any          only repo_info's `sha` (any JSON value: a NUL, a number)
        #   repo_info: Any    repo_info's whole answer (any JSON value)
        #   siblings: Any     repo_info's `siblings`
        #   paths_info: Any   the answer to paths-info (what `pull --subfolder` / hf://.../PATH asks)
        #   not_json: bytes   every /api/ answer is these bytes (200, application/json)
        #   redirect_loop     every file answers 302 to itself
        #   size_lie: int     HEAD promises this many bytes more than GET sends
        #   trickle: float    send every answer one byte at a time, this many seconds apart
        #   echo_token        put the caller's token into commit URLs and repo_info (a careless echo)
        #   not_found         every request is a plain 404 (not the Hub's; a wrong HF_ENDPOINT)
        #   mute_files: float file requests (HEAD/GET .../resolve/...) get no answer for this many seconds
        self.hostile: dict[str, Any] = {}
        self._current_token = ""
        self.lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._url = ""

    # lifecycle ---------------------------------------------------------------------------------

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        default_handle_error = self._httpd.handle_error

        def handle_error(request: Any, client_address: Any) -> None:
            import sys

            if not isinstance(sys.exc_info()[1], OSError):  # a client that hung up is no server bug
                default_handle_error(request, client_address)

        self._httpd.handle_error = handle_error  # type: ignore[method-assign]
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver",
                                        daemon=True)
        self._thread.start()
        host, port = self._httpd.server_address[:2]
        self._url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT (still given after stop(): the port is then closed)."""
        return self._url

    # state helpers for tests -------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, owner: str | None = None,
                 private: bool = False, gated: bool = False, granted: set[str] | None = None) -> str:
        """Create a repo whose main branch holds .gitattributes plus `files`; return the head commit."""
        with self.lock:
            repo = Repo(repo_id, owner or repo_id.split("/")[0], private, gated, set(granted or ()))
            self.repos[repo_id] = repo
            oid = self._commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit")
            repo.branches["main"] = oid
            if files:
                oid = self.commit(repo_id, files)
            return oid

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", message: str = "update",
               deleted: tuple[str, ...] = ()) -> str:
        """Commit files to a branch (created from main if missing); return the new commit."""
        with self.lock:
            repo = self.repos[repo_id]
            head = repo.branches.get(branch) or repo.branches["main"]
            tree = dict(repo.commits[head].files)
            for d in deleted:
                tree.pop(d, None)
            tree.update(files)
            oid = self._commit(repo, head, tree, message)
            repo.branches[branch] = oid
            return oid

    def files_at(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[self._resolve_rev(repo, revision)].files)

    def _commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], message: str) -> str:
        self._counter += 1
        digest = hashlib.sha1(json.dumps([self._counter, repo.repo_id, parent, message,
                                          sorted((k, git_blob_oid(v)) for k, v in files.items())]).encode())
        oid = digest.hexdigest()
        repo.commits[oid] = Commit(oid, dict(files), parent, message)
        return oid

    # access rules ------------------------------------------------------------------------------

    def _user(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        token = authorization.split(" ", 1)[1].strip() if " " in authorization else authorization
        self._current_token = token  # requests are served one at a time (under self.lock)
        if token in self.users:
            return self.users[token]
        if self.echo_tokens:
            raise HttpError(401, f"Invalid credentials in Authorization header: {authorization}")
        raise HttpError(401, "Invalid credentials in Authorization header")

    def _readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise HttpError(401, "You must be authenticated to write to a repo")
        repo = self._readable(repo_id, user)
        if user != repo.owner:
            said = f" with token {self._current_token}" if self.echo_tokens else ""
            raise HttpError(403, f"You don't have the rights to push to {repo_id}{said}")
        return repo

    def _content_allowed(self, repo: Repo, user: str | None) -> None:
        if repo.gated and user != repo.owner and user not in repo.granted:
            msg = (f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                   "authenticated to access it." if user is None else
                   f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.")
            raise HttpError(401 if user is None else 403, msg, "GatedRepo")

    @staticmethod
    def _resolve_rev(repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            found = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def _entry(path: str, files: dict[str, bytes], is_dir: bool, commit: str) -> dict[str, Any]:
    if is_dir:
        return {"type": "directory", "oid": hashlib.sha1(f"{commit}:{path}".encode()).hexdigest(), "size": 0,
                "path": path}
    data = files[path]
    return {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}


def _dirs(files: dict[str, bytes]) -> set[str]:
    out: set[str] = set()
    for p in files:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add("/".join(parts[:i]))
    return out


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave in separate writes: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # plumbing ----------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", length: int | None = None) -> None:
        trickle = self.hub.hostile.get("trickle")
        if trickle and not isinstance(self.wfile, _Trickle):
            self.wfile = _Trickle(self.wfile, float(trickle))  # type: ignore[assignment]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, doc: Any, status: int = 200) -> None:
        self._send(status, json.dumps(doc).encode())

    def _handle(self) -> None:
        split = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append(Request(self.command, split.path, self.headers.get("Authorization")))
        body = self._body() if self.command in ("POST", "PUT") else b""
        hostile = self.hub.hostile
        if "mute_files" in hostile and "/resolve/" in split.path:
            import time

            time.sleep(float(hostile["mute_files"]))  # outside the lock: other requests go on
            return
        if "not_found" in hostile:
            return self._send(404, b"<html>404 Not Found</html>", content_type="text/html")
        if "not_json" in hostile and split.path.startswith("/api/") and "agent-harnesses" not in split.path:
            raw = hostile["not_json"]
            return self._send(200, raw if isinstance(raw, bytes) else str(raw).encode())
        try:
            segs = [unquote(s) for s in split.path.split("/")[1:]]
            with self.hub.lock:
                self._route(segs, parse_qs(split.query), body)
        except HttpError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, json.dumps({"error": e.message}).encode(), headers)

    do_GET = do_HEAD = do_POST = _handle

    # routes ------------------------------------------------------------------------------------

    def _route(self, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        hub, method = self.hub, self.command
        user = hub._user(self.headers.get("Authorization"))
        if segs[:1] == ["api"]:
            if segs == ["api", "whoami-v2"] and method == "GET":
                if user is None:
                    raise HttpError(401, "Invalid username or password.")
                return self._json({"type": "user", "name": user, "fullname": user, "orgs": [],
                                   "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            if segs == ["api", "agent-harnesses"] and method == "GET":
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if segs == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(user, json.loads(body or b"{}"))
            if segs == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml(json.loads(body or b"{}"))
            if segs == ["api", "models"] and method == "GET":  # list_models(author=...): loratool batch hf://OWNER
                author = (query.get("author") or [None])[0]
                return self._json([{"_id": hashlib.sha1(r.repo_id.encode()).hexdigest()[:24], "id": r.repo_id,
                                    "modelId": r.repo_id, "author": r.owner, "private": r.private}
                                   for r in sorted(hub.repos.values(), key=lambda r: r.repo_id)
                                   if (author is None or r.owner == author) and (not r.private or r.owner == user)])
            if len(segs) >= 4 and segs[1] == "models":
                return self._repo_api(f"{segs[2]}/{segs[3]}", segs[4:], user, query, body)
            raise HttpError(404, f"no route for {method} {self.path}")
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), user)
        raise HttpError(404, f"no route for {method} {self.path}")

    def _create_repo(self, user: str | None, payload: dict[str, Any]) -> None:
        if user is None:
            raise HttpError(401, "You must be authenticated to create a repo")
        ns = payload.get("organization") or user
        repo_id = f"{ns}/{payload['name']}"
        if ns != user:
            raise HttpError(403, f'You don\'t have the rights to create a model under the namespace "{ns}"')
        if not REPO_ID_RE.fullmatch(repo_id):
            raise HttpError(400, f"invalid repo name {repo_id}")
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.hub.add_repo(repo_id, owner=user, private=private)
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        import yaml

        content = payload.get("content", "")
        self.hub.validated_yaml.append(content)
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append("front matter is not closed by ---")
            else:
                try:
                    meta = yaml.safe_load(content[3:end])
                except yaml.YAMLError as e:
                    errors.append(f"invalid YAML: {e}")
                else:
                    if meta is not None and not isinstance(meta, dict):
                        errors.append("metadata must be a mapping")
                    elif meta:
                        errors += _card_metadata_errors(meta)
        if errors:
            return self._json({"errors": [{"message": m} for m in errors], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def _repo_api(self, repo_id: str, rest: list[str], user: str | None, query: dict[str, list[str]],
                  body: bytes) -> None:
        hub, method = self.hub, self.command
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = hub._readable(repo_id, user)
            rev = rest[1] if len(rest) > 1 else "main"
            oid = hub._resolve_rev(repo, rev)
            files = repo.commits[oid].files
            doc: Any = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo.owner, "sha": oid, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "lastModified": DATE, "createdAt": DATE,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            }
            hostile = hub.hostile
            for key in ("sha", "siblings"):
                if key in hostile:
                    doc[key] = hostile[key]
            if "commit" in hostile:
                doc["sha"] = hostile["commit"]
            if "echo_token" in hostile:
                doc["cardData"] = {"base_model": hub._current_token}
            return self._json(hostile.get("repo_info", doc))
        if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            repo = hub._readable(repo_id, user)
            oid = hub._resolve_rev(repo, rest[1])
            return self._json(self._tree(repo.commits[oid], "/".join(rest[2:]).strip("/"),
                                         (query.get("recursive") or ["false"])[0].lower() in ("1", "true")))
        if method == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            repo = hub._readable(repo_id, user)
            oid = hub._resolve_rev(repo, rest[1])
            files = repo.commits[oid].files
            dirs = _dirs(files)
            paths = parse_qs(body.decode()).get("paths", [])
            if "paths_info" in hub.hostile:
                return self._json(hub.hostile["paths_info"])
            return self._json([_entry(p.strip("/"), files, p.strip("/") in dirs, oid)
                               for p in paths if p.strip("/") in files or p.strip("/") in dirs])
        if method == "GET" and rest == ["refs"]:
            repo = hub._readable(repo_id, user)
            return self._json({
                "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                             for b, o in sorted(repo.branches.items())],
                "tags": [], "converts": [],
            })
        if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
            repo = hub._writable(repo_id, user)
            branch = rest[1]
            if branch in repo.branches:
                raise HttpError(409, "Reference already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[branch] = hub._resolve_rev(repo, start)
            return self._json({})
        if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
            repo = hub._writable(repo_id, user)
            oid = hub._resolve_rev(repo, rest[1])
            files = repo.commits[oid].files
            out = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                    "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
                   for f in json.loads(body)["files"]]
            return self._json({"files": out, "commitOid": oid})
        if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
            return self._commit(hub._writable(repo_id, user), rest[1], body)
        raise HttpError(404, f"no route for {method} {self.path}")

    def _tree(self, commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
        files, dirs = commit.files, _dirs(commit.files)
        if path and path not in dirs:
            raise HttpError(404, f"{path} does not exist or is not a folder", "EntryNotFound")
        prefix = f"{path}/" if path else ""
        out = []
        for p in sorted(dirs | set(files)):
            if not p.startswith(prefix) or p == path:
                continue
            if not recursive and "/" in p[len(prefix):]:
                continue
            out.append(_entry(p, files, p in dirs, commit.oid))
        return out

    def _commit(self, repo: Repo, branch: str, body: bytes) -> None:
        if branch not in repo.branches:
            raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = repo.branches[branch]
        tree = dict(repo.commits[head].files)
        message = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary") or message
                parent = value.get("parentCommit")
                if parent and parent != head:
                    raise HttpError(412, "parent commit is not the head of the branch")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HttpError(400, "only base64 file contents are supported")
                tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in tree:
                    raise HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                tree.pop(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in tree if p.startswith(prefix)]:
                    tree.pop(p)
            else:
                raise HttpError(400, f"this test server does not support '{key}' (LFS/Xet) operations")
        oid = self.hub._commit(repo, head, tree, message)
        repo.branches[branch] = oid
        url = f"{self.hub.url}/{repo.repo_id}/commit/{oid}"
        if "echo_token" in self.hub.hostile:
            url += f"?by={self.hub._current_token}"
        return self._json({"commitUrl": url, "commitOid": oid, "success": True, "pullRequestUrl": None})

    def _resolve(self, repo_id: str, rev: str, path: str, user: str | None) -> None:
        repo = self.hub._readable(repo_id, user)
        self.hub._content_allowed(repo, user)
        oid = self.hub._resolve_rev(repo, rev)
        files = repo.commits[oid].files
        if path not in files:
            raise HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        data = files[path]
        hostile = self.hub.hostile
        if "redirect_loop" in hostile:
            return self._send(302, b"", {"Location": self.path, "X-Repo-Commit": oid})
        etag = hostile.get("etag", f'"{git_blob_oid(data)}"')
        headers = {"X-Repo-Commit": hostile.get("commit", oid), "ETag": etag, "Accept-Ranges": "bytes"}
        if "etag" in hostile:
            headers["X-Linked-Etag"] = etag
        length = len(data) + int(hostile["size_lie"]) if "size_lie" in hostile and self.command == "HEAD" else None
        self._send(200, data, headers, content_type="application/octet-stream", length=length)


class _Trickle:
    """A writer that sends one byte at a time, `delay` seconds apart (a server that never quite stalls)."""

    def __init__(self, f: Any, delay: float) -> None:
        self.f, self.delay = f, delay
        self.gone = False  # the client hung up: drop the rest quietly (no traceback on the test's stderr)

    def write(self, data: bytes) -> int:
        import time

        for i in range(len(data)):
            if self.gone:
                break
            try:
                self.f.write(data[i:i + 1])
                self.f.flush()
            except OSError:
                self.gone = True
                break
            time.sleep(self.delay)
        return len(data)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.f.flush()
            except OSError:
                self.gone = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)
