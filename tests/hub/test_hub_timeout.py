"""A Hub that accepts connections and never answers: every request times out (LORATOOL_HUB_TIMEOUT,
or the library's timeout=), ends in one Error:, and cached files are used instead.

Before, huggingface_hub's client had no timeout: `pull` and `inspect hf://...` hung for minutes,
cache or not. The mute server gives up on its own after GIVE_UP seconds; a test that saw it give up
was answered by that, not by loratool's timeout, and fails.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ALICE, FIXTURES, Run, assert_clean_error, fixture_files
from hubserver import HubServer

from loratool import hub as lh
from loratool.errors import HubError
from loratool.ops import describe as od  # pull, push and describe with the adapter summary

GIVE_UP = 60.0


class MuteServer:
    """Listens on 127.0.0.1, accepts every connection, never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.gave_up = False
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        waited = 0.0
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                waited += 0.2
                if waited >= GIVE_UP and self._held:
                    self.gave_up = True
                    for c in self._held:
                        c.close()
                    self._held.clear()
                continue
            self.accepted += 1
            self._held.append(conn)

    def __enter__(self) -> MuteServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for c in self._held:
            c.close()
        self.sock.close()


@pytest.fixture
def mute() -> Iterator[MuteServer]:
    with MuteServer() as server:
        yield server


def test_library_pull_times_out_with_one_hub_error(mute: MuteServer, tmp_path: Path) -> None:
    with pytest.raises(HubError) as e:
        od.pull("alice/lora", endpoint=mute.url, cache_dir=tmp_path / "cache", token=ALICE, timeout=0.5)
    assert "did not answer within 0.5 s" in e.value.message and "not in the local cache" in e.value.message
    assert "LORATOOL_HUB_TIMEOUT" in (e.value.hint or "")
    assert mute.accepted >= 1 and not mute.gave_up


def test_library_uses_the_cache_when_the_hub_does_not_answer(hub: HubServer, mute: MuteServer,
                                                             tmp_path: Path) -> None:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    cache = tmp_path / "cache"
    first = od.pull("alice/lora", endpoint=hub.url, cache_dir=cache, token=ALICE)
    again = od.pull("alice/lora", endpoint=mute.url, cache_dir=cache, token=ALICE, timeout=0.5)
    assert again.path == first.path and again.described.kind == "adapter"
    one = lh.resolve_path("hf://alice/lora/adapter_model.safetensors", endpoint=hub.url, cache_dir=cache, token=ALICE)
    assert lh.resolve_path("hf://alice/lora/adapter_model.safetensors", endpoint=mute.url, cache_dir=cache,
                           token=ALICE, timeout=0.5) == one
    assert mute.accepted >= 2 and not mute.gave_up


def test_cli_inspect_times_out_then_reads_the_cache(run_main, hub: HubServer, mute: MuteServer,
                                                    tmp_path: Path) -> None:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    from clirun import run_cli

    env = {"HF_HOME": str(tmp_path / "home"), "HF_TOKEN": ALICE, "HF_HUB_OFFLINE": None,
           "LORATOOL_HUB_TIMEOUT": "0.5"}
    r = run_cli(["inspect", "hf://alice/lora"], env={**env, "HF_ENDPOINT": mute.url})
    err = assert_clean_error(Run(r.code, r.out, r.err), "hf://alice/lora", "did not answer within 0.5 s")
    assert "not in the local cache" in err
    assert run_cli(["pull", "alice/lora"], env={**env, "HF_ENDPOINT": hub.url}).code == 0
    r = run_cli(["inspect", "hf://alice/lora"], env={**env, "HF_ENDPOINT": mute.url})
    assert r.code == 0, r.err
    assert "peft, 14 modules" in r.out
    assert not mute.gave_up


def test_cli_push_times_out(mute: MuteServer, tmp_path: Path) -> None:
    from clirun import run_cli

    r = run_cli(["push", str(FIXTURES / "peft_llama"), "alice/x"],
                env={"HF_HOME": str(tmp_path / "home"), "HF_TOKEN": ALICE, "HF_ENDPOINT": mute.url,
                     "HF_HUB_OFFLINE": None, "LORATOOL_HUB_TIMEOUT": "0.5"})
    assert_clean_error(Run(r.code, r.out, r.err), "hf://alice/x", "did not answer within 0.5 s")
    assert not mute.gave_up


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan"])
def test_a_bad_timeout_setting_is_refused(value: str, tmp_path: Path) -> None:
    from clirun import run_cli

    r = run_cli(["pull", "alice/lora"], env={"HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": "http://127.0.0.1:9",
                                             "LORATOOL_HUB_TIMEOUT": value})
    assert r.code == 2 and f"LORATOOL_HUB_TIMEOUT={value}" in r.err
