"""Progress from the first second (issue 29, item 5): merge and convert say what they are doing
before there is anything to count, on a terminal only, never with --quiet or --json."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from ptyrun import on_a_terminal

from loratool.ops.convert import convert
from loratool.ops.merge import merge

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_merge_reports_its_phases_in_order(tmp_path):
    seen: list[str] = []
    counts: list[tuple[int, int]] = []
    merge(FIXTURES / "base_llama", [FIXTURES / "peft_llama"], tmp_path / "m", phase=seen.append,
          progress=lambda d, t: counts.append((d, t)))
    assert [s.split()[0] for s in seen] == ["reading", "loading", "reading", "merging"], seen
    assert seen[0] == "reading the headers of base_llama" and seen[-1] == "merging into m"
    assert counts and counts[-1][0] == counts[-1][1] > 0  # the bytes come after the phases


def test_convert_reports_its_phases_in_order(tmp_path):
    seen: list[str] = []
    convert(FIXTURES / "kohya_sd.safetensors", tmp_path / "p", to="peft", phase=seen.append)
    assert seen == ["reading kohya_sd.safetensors", "converting 10 modules to peft", "writing and re-reading p"]


def _stderr_on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    r, shown = on_a_terminal(lambda tty: subprocess.run([sys.executable, "-m", "loratool", *args],
                                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                        stderr=tty, cwd=cwd, timeout=300))
    return r.returncode, ANSI.sub("", shown.decode("utf-8", "replace"))


@pytest.mark.parametrize(("command", "word"), [
    (["merge", str(FIXTURES / "base_llama"), str(FIXTURES / "peft_llama"), "-o", "m"], "merging: "),
    (["convert", str(FIXTURES / "kohya_sd.safetensors"), "--to", "peft", "-o", "p"], "converting: "),
])
def test_a_terminal_sees_the_phase_at_once_and_never_an_unknown_total(tmp_path, command, word):
    code, shown = _stderr_on_a_terminal(command, tmp_path)
    assert code == 0, shown
    assert f"{word}starting" in shown, shown  # drawn before torch is loaded
    assert "?" not in shown, shown  # no `0/? bytes`
    for flag in ("--quiet", "--json"):
        code, shown = _stderr_on_a_terminal([*command[:-1], command[-1] + flag, flag], tmp_path)
        assert code == 0 and word not in shown, (flag, shown)
