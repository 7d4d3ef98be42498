"""Runners for the executor tests, importable by the batch workers (they import a runner by name)."""

from __future__ import annotations

import os
import time


def sleepy(argv: list[str], cwd: str) -> tuple[int, str, str]:
    """`sleep S` sleeps S seconds, `die` kills its own process, anything else answers at once."""
    if argv[0] == "sleep":
        time.sleep(float(argv[1]))
    elif argv[0] == "die":
        os._exit(9)
    elif argv[0] == "oom":  # what run_item returns when the command hits MemoryError
        return 3, "", "Error: internal error: MemoryError: \nHint: this is a bug in loratool\n"
    elif argv[0] == "hog":
        _ = bytearray(int(argv[1]))
    return 0, f'{{"schema": 1, "argv": {len(argv)}}}', ""
