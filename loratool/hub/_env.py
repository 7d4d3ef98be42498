"""The Hub environment, read when a function is called (HF_ENDPOINT, HF_HOME / HF_HUB_CACHE,
HF_TOKEN, HF_HUB_OFFLINE), and the huggingface_hub client."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

_TRUE = {"1", "ON", "YES", "TRUE"}


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
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()  # HF_TOKEN, then the token saved by `hf auth login`


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

