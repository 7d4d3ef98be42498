"""What loratool trusts of a Hub answer: a wrapper around huggingface_hub's HTTP transport.

Every request huggingface_hub sends while loratool works goes through `GuardedTransport`, which

- bounds the time of the whole request, not only of each read: the status line and headers must
  arrive within `timeout` seconds of sending (a watchdog shuts the connection's socket down when
  they do not), and the body must then bring at least MIN_BYTES per `timeout` seconds (a server
  that trickles a byte every half second times out instead of taking hours);
- refuses, before huggingface_hub acts on it, an answer that would put or read a file outside the
  Hugging Face cache or that is not what the Hub sends: an ETag that is not one plain file name (it
  becomes the blob's path), an X-Repo-Commit that is not a 40-hex commit (it becomes the snapshot
  folder), an API answer that is not JSON, has a wrong type where loratool or huggingface_hub read
  it, or lists a file name with `..`, a NUL, an absolute path.

A refusal is a HostileAnswer (a HubError); the boundary (hub/errors.py) names the repo in it.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sys
import threading
import time
import weakref
from typing import Any

from loratool.errors import HubError

MIN_BYTES = 16 << 10  # per `timeout` seconds of body, once the headers are in

_FILE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")  # an ETag huggingface_hub may use as a file name
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_OID = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
_JSON_MAX = 64 << 20


class HostileAnswer(HubError):
    """The Hub answered something loratool refuses to act on (message without the repo; see _boundary)."""


class Expired:
    """What the guard saw: the first request that ran past its deadline (for the error message)."""

    def __init__(self) -> None:
        self.url: str | None = None


class HubDeadline(TimeoutError):
    """A request ran past its deadline, or was not sent because an earlier one had.

    A TimeoutError, not an httpx exception: huggingface_hub retries those with growing sleeps (five
    times, 1 to 8 s apart), which made a 10 s timeout end after 17-20 s or more. Once the Hub has
    not answered in time, the command's answer is "did not answer within T s", at once."""


def _httpx(obj: Any) -> Any:
    """The httpx module (httpx2 for huggingface_hub 2.x) that `obj` comes from."""
    return sys.modules[type(obj).__module__.split(".")[0]]


class GuardedTransport:
    """Wraps an httpx(2) transport: deadlines and answer checks as described in the module doc."""

    def __init__(self, inner: Any, timeout: float, expired: Expired) -> None:
        self.inner = inner
        self.timeout = timeout
        self.expired = expired
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._httpx = _httpx(inner)

    # transport protocol -------------------------------------------------------------------------

    def handle_request(self, request: Any) -> Any:
        if self.expired.url is not None:
            raise HubDeadline(f"not sent: {self.expired.url} got no answer within {self.timeout:g} s")
        fired = threading.Event()
        watchdog = threading.Timer(self.timeout, self._expire, args=(fired, request))
        watchdog.daemon = True
        request.extensions = {**request.extensions, "trace": self._tracer(request.extensions.get("trace"))}
        watchdog.start()
        try:
            response = self.inner.handle_request(request)
        except Exception as e:
            if fired.is_set() or (self.expired.url is not None and not isinstance(e, HostileAnswer)):
                raise HubDeadline(f"{request.url}: no answer within {self.timeout:g} s") from None
            if isinstance(e, self._httpx.TimeoutException):
                self.expired.url = self.expired.url or str(request.url)
                raise HubDeadline(f"{request.url}: no answer within {self.timeout:g} s") from None
            raise
        finally:
            watchdog.cancel()
        if fired.is_set():  # the headers came just as the watchdog shut the socket: the body is lost
            response.close()
            raise HubDeadline(f"{request.url}: no answer within {self.timeout:g} s")
        response.stream = _paced(self._httpx)(response.stream, self, request)
        _check_headers(response, request)
        if _is_api(request) and 200 <= response.status_code < 300:
            _check_json(response, request)
        return response

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> GuardedTransport:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.inner.__exit__(*exc)

    # deadline -------------------------------------------------------------------------------------

    def _tracer(self, chained: Any) -> Any:
        def trace(event: str, info: dict[str, Any]) -> None:
            if event == "connection.connect_tcp.complete":
                stream = info.get("return_value")
                sock = stream.get_extra_info("socket") if stream is not None else None
                if isinstance(sock, socket.socket):
                    with self._lock:
                        self._sockets.add(sock)
            if chained is not None:
                chained(event, info)

        return trace

    def _expire(self, fired: threading.Event, request: Any) -> None:
        """The watchdog: no headers within the deadline. Wake the blocked read by shutting down the
        connections (the run is failing anyway; other requests in flight end with it)."""
        fired.set()
        if self.expired.url is None:
            self.expired.url = str(request.url)
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def too_slow(self, request: Any, got: int, seconds: float) -> Exception:
        if self.expired.url is None:
            self.expired.url = str(request.url)
        return HubDeadline(f"{request.url}: the answer came at {got} bytes in {seconds:.1f} s (too slow)")


_PACED: dict[str, type] = {}


def _paced(httpx: Any) -> type:
    """_Paced as a SyncByteStream of this httpx module (httpx checks the class of a body stream)."""
    if httpx.__name__ not in _PACED:
        _PACED[httpx.__name__] = type("_Paced", (_Paced, httpx.SyncByteStream), {})
    return _PACED[httpx.__name__]


class _Paced:
    """A response body stream that must bring MIN_BYTES per `timeout` seconds (or end)."""

    def __init__(self, stream: Any, guard: GuardedTransport, request: Any) -> None:
        self.stream, self.guard, self.request = stream, guard, request

    def __iter__(self) -> Any:
        window = time.monotonic()
        got = 0
        for chunk in self.stream:
            got += len(chunk)
            now = time.monotonic()
            if now - window >= self.guard.timeout:
                if got < MIN_BYTES:
                    raise self.guard.too_slow(self.request, got, now - window)
                window, got = now, 0
            yield chunk

    def close(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()


# answer checks ------------------------------------------------------------------------------------


def _is_api(request: Any) -> bool:
    path = request.url.path
    return "/api/" in path and "/resolve/" not in path and not path.endswith("/api/agent-harnesses")


def _refuse(request: Any, what: str) -> HostileAnswer:
    return HostileAnswer(f"the Hub's answer to {request.method} {request.url.path} {what}",
                         hint="refusing an answer that could place or read files outside the Hugging Face cache, "
                         "or that no Hub sends; check HF_ENDPOINT (the server is broken or hostile)")


def _check_headers(response: Any, request: Any) -> None:
    headers = response.headers
    for name in ("x-linked-etag", "etag"):
        raw = headers.get(name)
        if raw is None or "/resolve/" not in request.url.path:
            continue
        etag = raw.strip()
        etag = etag[2:] if etag.startswith("W/") else etag
        etag = etag.strip('"')
        if not _FILE_ID.fullmatch(etag):
            raise _refuse(request, f"has the ETag {raw[:80]!r}, which is not a plain file name (huggingface_hub "
                          "would use it as a path in the cache)")
    commit = headers.get("x-repo-commit")
    if commit is not None and not _COMMIT.fullmatch(commit):
        raise _refuse(request, f"names the commit {commit[:80]!r}, which is not a 40-hex commit sha")


def _check_json(response: Any, request: Any) -> None:
    import json

    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > _JSON_MAX:
        raise _refuse(request, f"is {int(length)} bytes long, far more than any Hub API answer")
    raw = response.read()
    if not raw.strip() and request.method == "HEAD":
        return
    try:
        doc = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):
        raise _refuse(request, f"is not JSON (it begins {raw[:40]!r})") from None
    path = request.url.path
    listing = "/tree/" in path or "/paths-info/" in path
    if not (isinstance(doc, list) if listing else doc is None or isinstance(doc, dict)):
        return_type = "a list of entries" if listing else "an object"
        raise _refuse(request, f"is a JSON {type(doc).__name__}, not {return_type}")
    problem = _json_problem(doc)
    if problem:
        raise _refuse(request, problem)


def _json_problem(doc: Any) -> str | None:
    """What is wrong in an API answer where huggingface_hub or loratool would act on it, or None."""
    from loratool.io.paths import unsafe_name

    items = doc if isinstance(doc, list) else [doc]
    for item in items:
        if not isinstance(item, dict):
            if isinstance(doc, list):
                return f"lists {type(item).__name__} {str(item)[:40]!r} where an entry (object) belongs"
            continue
        sha = item.get("sha")
        if "sha" in item and (not isinstance(sha, str) or not _COMMIT.fullmatch(sha)):
            return f"gives the commit sha {repr(sha)[:80]}, which is not 40 hex digits"
        for key in ("oid", "commitOid"):
            if key in item and item[key] is not None and (not isinstance(item[key], str)
                                                          or not _OID.fullmatch(item[key])):
                return f"gives the {key} {repr(item[key])[:80]}, which is not a hex object id"
        if "siblings" in item:
            siblings = item["siblings"]
            if not isinstance(siblings, list) or not all(isinstance(s, dict) for s in siblings):
                return f"gives siblings as {type(siblings).__name__}, not a list of files"
            for s in siblings:
                name = s.get("rfilename")
                why = unsafe_name(name) if isinstance(name, str) else "is not a string"
                if why:
                    return f"lists the repository file name {name!r}, which {why}"
        if isinstance(doc, list):
            if item.get("type") not in ("file", "directory"):
                return f"lists an entry of type {item.get('type')!r} (not a file or a directory)"
            name = item.get("path")
            why = unsafe_name(name) if isinstance(name, str) else "is not a string"
            if why:
                return f"lists the path {name!r}, which {why}"
            if "size" in item and type(item["size"]) is not int:
                return f"gives the size of {name!r} as {item['size']!r}, not a whole number"
        for key in ("commitUrl", "url", "name"):
            if key in item and item[key] is not None and not isinstance(item[key], str):
                return f"gives {key} as {type(item[key]).__name__}, not a string"
    return None
