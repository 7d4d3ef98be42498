"""--executor ray against a local Ray head this test starts on 127.0.0.1 and stops (issue 28).

The head is started with its own --temp-dir; at the end exactly the processes whose command line
names that directory are stopped (never `ray stop`, which would stop every cluster of this user).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from clirun import run_cli
from factories import build_adapter

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install loratool[ray]): Ray executor untested")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(tag: str) -> list[int]:
    """Process ids whose command line names `tag` (the head's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if tag.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def head():
    # the `ray` script pip installed beside this interpreter (a pyenv shim for it may not exist yet)
    beside = Path(sys.executable).with_name("ray")
    ray_bin = str(beside) if beside.is_file() else shutil.which("ray")
    if ray_bin is None:
        pytest.skip("the `ray` command is not on PATH")
    temp = tempfile.mkdtemp(prefix="lt-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    cmd = [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
           "--include-dashboard=false", "--temp-dir", temp, "--disable-usage-stats"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                           env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        if r.returncode != 0:
            pytest.skip(f"ray start failed here: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _ours(temp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while _ours(temp) and time.monotonic() < deadline:
                time.sleep(0.2)
        assert not _ours(temp), "processes of the test's Ray head are still running"
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_gives_the_local_executor_results(head, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        build_adapter(folder, fmt="kohya", rank=2, seed=i, name=f"r{i}.safetensors",
                      modules={"lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8)})
    (folder / "r9.safetensors").write_bytes(b"broken")
    runs = {}
    for executor in ("local", "ray"):
        extra = ["--address", head] if executor == "ray" else []
        r = run_cli(["batch", "--executor", executor, *extra, "--jobs", "1", "--out-dir", tmp_path / executor,
                     "rescale", "--factor", "0.5", folder])
        records = [json.loads(x) for x in r.out.splitlines()]
        runs[executor] = (r.code, records)
    (code_l, local), (code_r, remote) = runs["local"], runs["ray"]
    assert code_l == code_r == 2
    def strip(rec):
        return {k: v for k, v in rec.items() if k not in ("seconds", "out", "result")}
    by_item = lambda recs: {r["item"]: r for r in recs if r["type"] == "item"}  # noqa: E731
    a, b = by_item(local), by_item(remote)
    assert a.keys() == b.keys() and len(a) == 7
    for k in a:
        assert strip(a[k]) == strip(b[k])
        if a[k]["result"]:
            assert a[k]["result"]["modules"] == b[k]["result"]["modules"]
            from safetensors.torch import load_file

            la, lb = load_file(tmp_path / "local" / Path(k).name), load_file(tmp_path / "ray" / Path(k).name)
            assert la.keys() == lb.keys() and all((la[t] == lb[t]).all() for t in la)
    assert (tmp_path / "ray" / "ledger.jsonl").is_file()
