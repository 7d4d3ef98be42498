"""The click group maps every outcome to an exit code itself: CliRunner, `python -m loratool` and
the console script give the same codes and the same Error:/Hint: lines; Ctrl-C is exit 130 with no
traceback, also when it lands after the result was printed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from clirun import run_cli

from loratool.cli import EXIT_BUG, EXIT_INTERRUPTED, EXIT_USER, cli, run_mapped

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"


def _module(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LORATOOL_DEBUG"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "loratool", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def test_clirunner_maps_user_errors_to_exit_2_with_one_error_line(tmp_path):
    # before: under CliRunner a LoratoolError escaped the group (exit 1, no Error: line)
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == EXIT_USER
    assert r.stderr.count("Error:") == 1 and "missing" in r.stderr
    assert r.stdout == ""


def test_clirunner_and_python_m_agree(tmp_path):
    args = ["resize", str(FIXTURES / "peft_llama"), "-o", str(tmp_path / "o"), "--rank", "0"]
    a = run_cli(args)
    b = _module(args)
    assert a.code == b.returncode == EXIT_USER
    assert a.err == b.stderr and a.out == b.stdout == ""


def test_usage_errors_are_exit_2():
    r = run_cli(["resize"])
    assert r.code == 2 and "Missing argument" in r.err


def test_internal_errors_are_exit_3_without_traceback(monkeypatch):
    import loratool.ops.inspect as ops_inspect

    def boom(*a, **k):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(ops_inspect, "inspect_adapter", boom)
    r = run_cli(["inspect", str(FIXTURES / "peft_llama")])
    assert r.code == EXIT_BUG
    assert "Error: internal error: RuntimeError: kaboom" in r.err and "Traceback" not in r.err
    assert "second line" not in r.err


def test_keyboard_interrupt_in_a_command_is_130(monkeypatch):
    import loratool.ops.inspect as ops_inspect

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ops_inspect, "inspect_adapter", interrupted)
    r = run_cli(["inspect", str(FIXTURES / "peft_llama")])
    assert r.code == EXIT_INTERRUPTED and "Interrupted." in r.err and "Traceback" not in r.err


def test_interrupt_while_flushing_the_result_is_130(monkeypatch):
    """Ctrl-C while the result is being flushed: 130, never 0 with a half-written stdout."""

    class Stdout(io.StringIO):
        def flush(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdout", Stdout())
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert run_mapped(lambda: 0) == EXIT_INTERRUPTED
    assert "Interrupted." in err.getvalue()


def test_standalone_mode_false_returns_the_code(tmp_path):
    code = cli.main(["inspect", str(tmp_path / "missing")], standalone_mode=False)
    assert code == EXIT_USER


@pytest.mark.slow
def test_ctrl_c_right_after_wrote_prints_no_traceback(tmp_path):
    """SIGINT the moment `Wrote ...` appears (torch's atexit handlers are still to run): before,
    this printed a KeyboardInterrupt traceback from an atexit callback and exited 0."""
    env = {k: v for k, v in os.environ.items() if k != "LORATOOL_DEBUG"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for i in range(6):
        p = subprocess.Popen([sys.executable, "-m", "loratool", "resize", str(FIXTURES / "peft_llama"),
                              "-o", str(tmp_path / f"o{i}"), "--rank", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("Wrote"):
                time.sleep(0.01 * (i % 3))  # at once, and a little later (shutdown under way)
                p.send_signal(signal.SIGINT)
                break
        _, err = p.communicate(timeout=300)
        assert "Traceback" not in err, err
        # 0 (done before the signal), 130 (our handler), or ended by SIGINT itself once the
        # interpreter has put the default handler back during shutdown (a shell shows 130)
        assert p.returncode in (0, EXIT_INTERRUPTED, -signal.SIGINT), (p.returncode, err)
        assert (tmp_path / f"o{i}" / "adapter_model.safetensors").is_file()
