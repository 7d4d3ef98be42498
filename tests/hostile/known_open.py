"""Hostile-corpus cases that still fail on this branch because other work of issue 22 fixes them.

KNOWN_OPEN maps a case id to the item that fixes it. test_hostile_corpus.py marks these cases
xfail(strict=True): when the fix lands a case passes, the strict xfail fails, and its line here is
to be deleted. The goal is an empty dict.
"""

from __future__ import annotations

HANG_BOUND = 2.0  # seconds: cases known to hang are killed sooner, so the suite stays short

# the item of issue 22 that fixes them -> the cases (delete a line when its case passes)
_BY_ITEM: dict[str, tuple[str, ...]] = {}
KNOWN_OPEN: dict[str, str] = {case: item for item, cases in _BY_ITEM.items() for case in cases}


def bound_for(case_id: str) -> float:
    from corpus import BOUND

    return HANG_BOUND if "hang" in KNOWN_OPEN.get(case_id, "") else BOUND
