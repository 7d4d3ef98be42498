"""The one way tests run the command line in-process: click's CliRunner over loratool.cli.cli.

The group maps errors to exit codes itself (LoratoolGroup.main), so this is what a user gets from
the console script or `python -m loratool`: the same exit code, stdout and stderr.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from click.testing import CliRunner


class Run(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(args: Sequence[Any], env: Mapping[str, str | None] | None = None) -> Run:
    """Run `loratool ARGS...` in this process: (exit code, stdout, stderr). Paths may be Path objects."""
    from loratool.cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args], env={"LORATOOL_DEBUG": None, **(env or {})},
                           catch_exceptions=False)
    return Run(r.exit_code, r.stdout, r.stderr)


class Hung(BaseException):
    """Raised by bounded()'s alarm (a BaseException: no handler in loratool turns it into an exit code)."""


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """A wall-clock bound on an in-process run: past it the run fails with Hung instead of hanging
    the suite (an in-process run cannot be killed like a subprocess). Main thread only (SIGALRM)."""

    def alarm(signum: int, frame: object) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
