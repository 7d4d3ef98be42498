"""The hostile corpus (tests/hostile/corpus.py) through the command line: over 1,000 runs, none of
which may exit 3 (or die by a signal), print a traceback, run past its bound, change a byte outside
its -o, or show the HF_TOKEN of its environment in anything it prints or writes.

The runs share one driver process (torch imported once) that forks a child per run, three at a time;
tests/perf/hostile_tally.py runs the same cases (or, with --all, every input through every command)
and prints the tally. Cases that other work of issue 22 fixes are listed in known_open.py and
xfail strictly here, so each one must be removed from that list when it passes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from corpus import Case, Outcome, build_corpus, run_corpus, snapshot
from known_open import KNOWN_OPEN, bound_for
from runner import FAKE_TOKEN

ALL = build_corpus()
SUITE = [c for c in ALL if c.suite]
COMMANDS = {"inspect", "validate", "rescale", "resize", "combine", "convert", "merge", "verify", "diff", "extract"}
GROUPS = {"header", "config", "special", "regex", "archive", "gguf", "tensor", "base", "options", "token"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    work = tmp_path_factory.mktemp("hostile")
    done = run_corpus(SUITE, work / "cases", workers=3, bounds={c.id: bound_for(c.id) for c in SUITE})
    return {o.case.id: o for o in done}


def test_corpus_is_large_and_covers_every_command_and_group() -> None:
    assert len(SUITE) >= 1000
    assert len({c.id for c in ALL}) == len(ALL)
    assert {c.command for c in SUITE} == COMMANDS
    assert {c.group for c in SUITE} == GROUPS
    for group in GROUPS - {"base", "options"}:  # every adapter input group meets every command
        assert {c.command for c in SUITE if c.group == group} >= COMMANDS - {"extract"}, group


def test_known_open_names_real_cases_and_the_item_fixing_them() -> None:
    assert set(KNOWN_OPEN) <= {c.id for c in ALL}
    assert all(re.match(r"22[abc] item \d+: ", item) for item in KNOWN_OPEN.values())


def _param(case: Case) -> object:
    if case.id in KNOWN_OPEN:
        return pytest.param(case.id, marks=pytest.mark.xfail(strict=True, reason=KNOWN_OPEN[case.id]))
    return case.id


@pytest.mark.parametrize("case_id", [_param(c) for c in SUITE])
def test_hostile_case(case_id: str, outcomes: dict[str, Outcome]) -> None:
    o = outcomes[case_id]
    assert o.problems == [], f"loratool {' '.join(map(repr, o.argv))}: {o.problems}\n{o.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------
# the judge itself: each kind of failure is seen


def _py(case_id: str, code: str, argv: list[str] | None = None) -> Case:
    return Case(case_id, "self", "self", lambda root: [*(argv or [])], python=code)


def test_the_judge_sees_every_kind_of_failure(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    cases = [
        _py("clean", "print('fine')"),
        _py("token-stdout", "import os; print(os.environ['HF_TOKEN'])"),
        _py("token-in-output", "import os; open('out', 'w').write(os.environ['HF_TOKEN'])", ["-o", "out"]),
        _py("exit-3", "import sys; sys.exit(3)"),
        _py("signal", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"),
        _py("traceback", "raise ValueError('x')"),
        _py("hangs", "import time; time.sleep(60)"),
        _py("writes-beside-out", "open('stray', 'w').write('x')", ["-o", "out"]),
        _py("writes-out", "open('out', 'w').write('x')", ["-o", "out"]),
    ]
    done = {o.case.id: o for o in run_corpus(cases, tmp_path / "c" / "cases", workers=3, bounds={"hangs": 2.0})}
    assert done["clean"].problems == [] and done["clean"].stdout == "fine\n"
    assert done["token-stdout"].leaks == ["stdout"]
    assert done["token-in-output"].leaks == ["out"]
    assert done["exit-3"].problems == ["exit 3"]
    assert done["signal"].code == -11 and done["signal"].problems == ["exit -11"]
    assert done["traceback"].traceback and done["traceback"].code == 1
    assert done["hangs"].over_bound and done["hangs"].seconds < 30
    assert done["writes-beside-out"].changed == ["stray"]
    assert done["writes-out"].problems == []


def test_snapshot_sees_bytes_and_links_and_never_opens_a_fifo(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "l").symlink_to("../a")
    os.mkfifo(tmp_path / "fifo")  # opening it would block
    before = snapshot(tmp_path, set())
    assert set(before) == {"a", "d", "d/l", "fifo"}
    (tmp_path / "a").write_bytes(b"2")
    (tmp_path / "d" / "l").unlink()
    (tmp_path / "d" / "l").symlink_to("../fifo")
    after = snapshot(tmp_path, set())
    assert {k for k in before if before[k] != after[k]} == {"a", "d/l"}
    assert snapshot(tmp_path, {tmp_path / "d"}).keys() == {"a", "fifo"}


def test_fake_token_looks_like_a_token() -> None:
    # shaped like a real one, so loratool's scrubbing treats it as it would a user's
    assert FAKE_TOKEN.startswith("hf_") and len(FAKE_TOKEN) >= 30
