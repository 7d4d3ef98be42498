"""The one way tests run the command line in-process: click's CliRunner over loratool.cli.cli.

The group maps errors to exit codes itself (LoratoolGroup.main), so this is what a user gets from
the console script or `python -m loratool`: the same exit code, stdout and stderr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
