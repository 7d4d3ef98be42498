"""Shared pytest fixtures; the factories themselves live in tests/factories.py."""

from __future__ import annotations

import os

# huggingface_hub reads this at import time; without it the first Hub request of a test would also
# ask the real endpoint for telemetry. Tests never touch the network.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import signal

# A suite started in the background of a non-interactive shell (`(cmd &)`, nohup) inherits SIGINT
# ignored, and so would every loratool process the tests start: the Ctrl-C tests would then see
# the signal ignored and exit 0. The tests need Ctrl-C as a user's terminal delivers it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from factories import Shape, build_adapter, build_base


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_adapter(**kwargs) -> Path; see build_adapter for the keyword arguments.

    Each call writes to a fresh subdirectory of tmp_path, so one test may build several adapters.
    """
    counter = iter(range(1_000_000))

    def make(**kwargs: Any) -> Path:
        root = tmp_path / f"adapter{next(counter)}"
        root.mkdir()
        return build_adapter(root, **kwargs)

    return make


@pytest.fixture
def make_base(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_base(shapes, layout="file"|"dir"|"sharded", dtype=..., shards=2) -> Path."""
    counter = iter(range(1_000_000))

    def make(shapes: Mapping[str, Shape], **kwargs: Any) -> Path:
        root = tmp_path / f"base{next(counter)}"
        root.mkdir()
        return build_base(root, shapes, **kwargs)

    return make
