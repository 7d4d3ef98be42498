"""Fixtures for the Hub tests: a local Hub-compatible server and two ways to run loratool against it.

No test here touches the network: the server listens on 127.0.0.1, and every process is pointed at it
(or at a closed local port) through HF_ENDPOINT.

- `run_cli(*args, token=..., offline=..., endpoint=...)`: loratool in a subprocess, with HF_ENDPOINT,
  a temporary HF_HOME and HF_TOKEN in its environment (huggingface_hub reads HF_ENDPOINT and HF_HOME
  when it is imported, so only a fresh process sees them as a user's shell would set them).
- library tests call loratool.hub with endpoint= / cache_dir= / token= explicitly.

Every CLI run checks that no token string appears in its stdout or stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# huggingface_hub fetches an "agent harness" list from its import-time endpoint the first time it builds
# request headers, unless telemetry is off. In-process library tests pass the endpoint explicitly, so
# switch that fetch off before huggingface_hub is imported (the subprocess tests get the local server
# as HF_ENDPOINT instead, and the server answers it).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "fixtures"

ALICE = "hf_aliceSecretToken0123456789abcdef"
BOB = "hf_bobSecretToken0123456789abcdefgh"
CAROL = "hf_carolSecretToken0123456789abcdef"  # granted access to the gated repo
BAD = "hf_invalidSecretToken0123456789abcd"
SECRETS = (ALICE, BOB, CAROL, BAD)
USERS = {ALICE: "alice", BOB: "bob", CAROL: "carol"}


@pytest.fixture(scope="session", autouse=True)
def _no_stray_requests() -> None:
    """In-process calls must not reach huggingface_hub's import-time default endpoint."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        if not constants.HF_HUB_DISABLE_TELEMETRY and not constants.ENDPOINT.startswith("http://127.0.0.1"):
            pytest.skip("huggingface_hub was imported before tests/hub/conftest.py with telemetry on; "
                        "run tests/hub first or set HF_HUB_DISABLE_TELEMETRY=1")


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(users=USERS) as server:
        yield server


def closed_port() -> int:
    """A local port nothing listens on (bound, then released): connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def assert_clean_error(r: Run, *needles: str) -> str:
    """Exit 2, exactly one `Error:` line then one `Hint:` line on stderr, no traceback; return the error."""
    assert r.code == 2, (r.code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.err_lines[0].startswith("Error: ") and r.err_lines[1].startswith("Hint: "), r.stderr
    assert len(r.err_lines) == 2, r.stderr
    assert r.stdout == ""
    for n in needles:
        assert n in r.err_lines[0], (n, r.err_lines[0])
    return r.err_lines[0]


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    home = tmp_path / "hf_home"
    home.mkdir()
    return home


@pytest.fixture
def run_cli(hub: HubServer, hf_home: Path) -> Callable[..., Run]:
    """run_cli(*args, token=ALICE|None, offline=False, endpoint=None, home=None, env=None) -> Run."""

    def run(*args: str, token: str | None = ALICE, offline: bool = False, endpoint: str | None = None,
            home: Path | None = None, env: dict[str, str] | None = None) -> Run:
        e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        e.update(HF_ENDPOINT=endpoint or hub.url, HF_HOME=str(home or hf_home), PYTHONUNBUFFERED="1")
        e.pop("LORATOOL_DEBUG", None)
        if token:
            e["HF_TOKEN"] = token
        if offline:
            e["HF_HUB_OFFLINE"] = "1"
        e.update(env or {})
        p = subprocess.run([sys.executable, "-m", "loratool", *args], capture_output=True, text=True, env=e,
                           timeout=120, cwd=REPO_ROOT)
        for secret in SECRETS:
            assert secret not in p.stdout and secret not in p.stderr, f"token leaked in output of {args}"
        return Run(p.returncode, p.stdout, p.stderr)

    return run


@pytest.fixture
def run_main(hub: HubServer, hf_home: Path) -> Callable[..., Run]:
    """run_main(*args, token=ALICE, endpoint=None, env=None) -> Run: the CLI in this process (tests/clirun.py).

    For the many error cases, where a process start per case would cost seconds. loratool reads
    HF_ENDPOINT / HF_HOME / HF_TOKEN when a command runs, so setting them for the run is enough.
    Anonymous cases belong in run_cli (in-process, huggingface_hub would fall back to a token saved in ~).
    """
    from clirun import run_cli as invoke

    def run(*args: str, token: str = ALICE, endpoint: str | None = None, env: dict[str, str | None] | None = None
            ) -> Run:
        # HF_HUB_CACHE would win over HF_HOME: unset, so the cache is always in tmp_path
        r = invoke(args, env={"HF_ENDPOINT": endpoint or hub.url, "HF_HOME": str(hf_home), "HF_TOKEN": token,
                              "HF_HUB_OFFLINE": None, "HF_HUB_CACHE": None, "HUGGING_FACE_HUB_TOKEN": None,
                              **(env or {})})
        for secret in SECRETS:
            assert secret not in r.out and secret not in r.err, f"token leaked in output of {args}"
        return Run(r.code, r.out, r.err)

    return run


def fixture_files(name: str) -> dict[str, bytes]:
    """A fixture adapter/base as {path in repo: bytes}."""
    root = FIXTURES / name
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
