"""The Hub environment, read when a function is called (HF_ENDPOINT, HF_HOME / HF_HUB_CACHE,
HF_TOKEN, HF_HUB_OFFLINE), and the huggingface_hub client."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from loratool.hub._guard import Expired, GuardedTransport

_TRUE = {"1", "ON", "YES", "TRUE"}

# Seconds to wait for the Hub to answer one request (connect, then the whole status line and headers;
# then at least _guard.MIN_BYTES of body per that many seconds); LORATOOL_HUB_TIMEOUT or the `timeout`
# argument change it. A server that accepts the connection and never answers, or trickles its
# answer, then ends in one HubError, and downloads fall back to the local cache.
DEFAULT_TIMEOUT = 10.0
TIMEOUT_ENV = "LORATOOL_HUB_TIMEOUT"


def _timeout(timeout: float | None) -> float:
    """The Hub request timeout in seconds: the argument, else LORATOOL_HUB_TIMEOUT, else 10."""
    from loratool.errors import HubError

    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            timeout = float("nan")
        shown = f"{TIMEOUT_ENV}={raw}"
    else:
        shown = f"timeout={timeout!r}"
    if not timeout > 0 or timeout == float("inf"):
        raise HubError(f"{shown}: not a positive number of seconds", hint=f"e.g. {TIMEOUT_ENV}=30")
    return float(timeout)


@contextlib.contextmanager
def _client_timeout(seconds: float) -> Iterator[Expired]:
    """huggingface_hub's shared HTTP client, for the duration, with a timeout (it has none by
    default, so a server that never answers blocks forever) and its transport wrapped in
    _guard.GuardedTransport (a deadline per request; answers checked before huggingface_hub acts
    on them); its own factory is put back after. Yields what the guard saw run past its deadline."""
    expired = Expired()
    try:
        from huggingface_hub.utils import _http
    except ImportError:  # pragma: no cover - an older huggingface_hub (requests): per-call timeouts only
        yield expired
        return
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    set_factory = getattr(_http, "set_client_factory", None)
    if previous is None or set_factory is None:  # pragma: no cover
        yield expired
        return

    def factory() -> Any:
        client = previous()
        with contextlib.suppress(Exception):
            client.timeout = seconds  # httpx: connect, read, write and pool timeouts
        inner = getattr(client, "_transport", None)
        if inner is not None and hasattr(inner, "handle_request"):
            client._transport = GuardedTransport(inner, seconds, expired)
        return client

    set_factory(factory)
    try:
        yield expired
    finally:
        set_factory(previous)


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
    from loratool.errors import register_secret

    if not token:
        from huggingface_hub import get_token

        token = get_token()  # HF_TOKEN, then the token saved by `hf auth login`
    register_secret(token)  # scrubbed from everything the CLI prints, tracebacks included
    return token


def _api(endpoint: str, token: str | None) -> Any:
    from huggingface_hub import HfApi

    from loratool._version import __version__

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

