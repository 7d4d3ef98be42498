"""Interrupts and concurrent runs never leave a broken output or stray temporaries (issue #12).

Each run is a real process: a small driver (written to tmp_path) wraps one loratool function so
that, at a chosen point of `merge --force` over an existing output, it writes a marker file and
waits. The test polls for the marker (no fixed sleeps: the machine may be loaded), sends SIGINT,
SIGTERM or SIGKILL, lets the driver go on, and checks:

- the exit code (130, 143, or killed) and, for SIGINT/SIGTERM, that the message says truthfully
  whether the output was written;
- the output path holds exactly the old output or exactly the new one (file by file, bytes);
- the next run to the same output succeeds and leaves no temporaries (after SIGKILL it removes
  the dead run's, with a warning).

The concurrency test starts two runs to one `-o` behind a barrier: exactly one succeeds, the
other exits 2, and the output is one run's, whole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import build_adapter, build_base
from test_safety import MODULES, SHAPES, snapshot

from loratool.cli import main

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 180  # seconds to wait for a process step on a loaded machine (never a timing assumption)

DRIVER = r'''
import os, sys, time
from pathlib import Path

at = os.environ.get("SAFETY_HOLD_AT", "")
marker = Path(os.environ.get("SAFETY_MARKER", "/nonexistent"))
release = Path(os.environ.get("SAFETY_RELEASE", "/nonexistent"))


def hold():
    marker.write_text(str(os.getpid()))
    while not release.exists():  # a signal interrupts this sleep where it is delivered at once
        time.sleep(0.01)


from loratool.io import copies, outputs
import loratool.ops.merge as merge_op

if at == "stream":  # the main thread is about to stream the base's second shard
    real_stream, calls = merge_op.stream_file, [0]

    def stream_file(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            hold()
        return real_stream(*args, **kwargs)

    merge_op.stream_file = stream_file
elif at == "copy":  # copying the base's other files (config.json, ...)
    real_copy = copies.copy_input_file

    def copy_input_file(src, dst):
        hold()
        return real_copy(src, dst)

    copies.copy_input_file = copy_input_file
elif at in ("commit", "exchanged"):  # inside the swap: before the rename, or after it (old one not yet removed)
    real_commit, real_remove, inside = outputs._commit, outputs._remove, [False]

    def _commit(*args, **kwargs):
        if at == "commit":
            hold()
        inside[0] = True
        try:
            return real_commit(*args, **kwargs)
        finally:
            inside[0] = False

    def _remove(p):
        if inside[0]:
            hold()
        return real_remove(p)

    outputs._commit, outputs._remove = _commit, _remove

go = os.environ.get("SAFETY_GO")
if go:  # a barrier for the concurrency test
    Path(os.environ["SAFETY_READY"]).write_text("ready")
    while not Path(go).exists():
        time.sleep(0.005)

from loratool.cli import main

main(sys.argv[1:])
'''


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        if proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before reaching the marker: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no marker {path.name} after {DEADLINE} s")
        time.sleep(0.01)


def start(tmp: Path, args: list[object], env: dict[str, str]) -> subprocess.Popen[str]:
    driver = tmp / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    e = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    e.pop("LORATOOL_DEBUG", None)
    return subprocess.Popen([sys.executable, str(driver), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, cwd=tmp)


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A small sharded base with config files, an adapter, and the expected old and new outputs."""
    from loratool.ops.merge import merge

    root = tmp_path_factory.mktemp("signals")
    base = build_base(root, SHAPES, layout="sharded")
    (base / "config.json").write_text('{"model_type": "llama"}\n')
    (base / "tokenizer.json").write_text('{"v": 1}\n')
    adapter = build_adapter(root, fmt="peft", modules=MODULES)
    merge(base, [adapter], root / "old", weights=[0.5])
    merge(base, [adapter], root / "new")
    return {"base": base, "adapter": adapter, "old": snapshot(root / "old"), "new": snapshot(root / "new")}


POINTS = ("stream", "copy", "commit", "exchanged")
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


# each case starts a process (seconds on a small machine): a spread of them in the fast suite, all as slow
FAST = {("SIGINT", "stream"), ("SIGTERM", "commit"), ("SIGINT", "exchanged"), ("SIGKILL", "copy"),
        ("SIGKILL", "exchanged")}
MATRIX = [pytest.param(s, p, marks=() if (s, p) in FAST else pytest.mark.slow) for s in SIGNALS for p in POINTS]


@pytest.mark.parametrize(("signame", "point"), MATRIX)
def test_interrupted_force_merge_leaves_old_or_new_output(world: dict[str, object], tmp_path: Path, point: str,
                                                          signame: str, capsys: pytest.CaptureFixture[str]) -> None:
    from loratool.ops.merge import merge

    base, adapter = world["base"], world["adapter"]
    out = tmp_path / "out"
    merge(base, [adapter], out, weights=[0.5])  # the existing output that --force replaces
    assert snapshot(out) == world["old"]
    marker, release = tmp_path / "marker", tmp_path / "release"
    proc = start(tmp_path, ["merge", base, adapter, "-o", out, "--force"],
                 {"SAFETY_HOLD_AT": point, "SAFETY_MARKER": str(marker), "SAFETY_RELEASE": str(release)})
    wait_for(marker, proc)
    proc.send_signal(SIGNALS[signame])
    release.write_text("go")
    _, err = proc.communicate(timeout=DEADLINE)
    swapped = point == "exchanged"  # the new output was already in place when the signal came
    if signame == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        assert snapshot(out) == (world["new"] if swapped else world["old"])
        assert leftovers(tmp_path, "out")  # a killed run cannot clean up: the next run does
    else:
        # SIGINT/SIGTERM during the swap are held until it is complete, so "commit" ends written too
        written = point in ("commit", "exchanged")
        assert proc.returncode == (130 if signame == "SIGINT" else 143), err
        assert "Traceback" not in err
        expected = f"{out} was written" if written else f"{out} was not written (the previous one is unchanged)"
        assert err.strip().splitlines()[-1].startswith("Interrupted;") and expected in err, err
        assert snapshot(out) == (world["new"] if written else world["old"])
        assert leftovers(tmp_path, "out") == []
    # the next run to the same output: succeeds, leaves no temporaries, says what it removed
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in ("merge", base, adapter, "-o", out, "--force")])
    _, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert snapshot(out) == world["new"]
    assert leftovers(tmp_path, "out") == []
    if signame == "SIGKILL":
        assert "removed" in err and "left by earlier runs that did not finish" in " ".join(err.split())


@pytest.mark.parametrize("kind", ["merge", "rescale"])
def test_two_runs_to_one_output(world: dict[str, object], tmp_path: Path, kind: str) -> None:
    base, adapter = world["base"], world["adapter"]
    if kind == "merge":
        out = tmp_path / "out"
        args: list[object] = ["merge", base, adapter, "-o", out]
    else:
        lora = build_adapter(tmp_path, fmt="kohya", name="lora.safetensors")
        out = tmp_path / "out.safetensors"
        args = ["rescale", lora, "--factor", "2", "-o", out]
    go = tmp_path / "go"
    procs = []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        procs.append(start(tmp_path, args, {"SAFETY_GO": str(go), "SAFETY_READY": str(ready)}))
    for i, p in enumerate(procs):
        wait_for(tmp_path / f"ready{i}", p)
    go.write_text("go")  # both start together
    results = [(p.wait(timeout=DEADLINE), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    errors = [line for line in loser[2].splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and ("another loratool run" in errors[0] or "already exists" in errors[0]), loser[2]
    if kind == "merge":
        assert snapshot(out) == world["new"]  # one run's output, whole
    else:
        from loratool.formats import read

        assert len(read(out).modules) == len(read(args[1]).modules)  # type: ignore[arg-type]
    assert leftovers(tmp_path, out.name) == []
