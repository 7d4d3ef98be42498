"""Hostile-corpus cases that still fail on this branch because other work of issue 22 fixes them.

KNOWN_OPEN maps a case id to the item that fixes it. test_hostile_corpus.py marks these cases
xfail(strict=True): when the fix lands a case passes, the strict xfail fails, and its line here is
to be deleted. The goal is an empty dict.
"""

from __future__ import annotations

HANG_BOUND = 2.0  # seconds: cases known to hang are killed sooner, so the suite stays short

# the item of issue 22 that fixes them -> the cases (delete a line when its case passes)
_BY_ITEM: dict[str, tuple[str, ...]] = {
    "22a item 12: a lora_B.bias of the wrong length (combine exits 3)": ("tensor/bias-wrong-length/combine",),
    "22a item 1: --base is an input (its shard replaced with --force)": ("options/convert/out-is-base",),
    "22b item 6: the token reaches stdout/stderr/an output": (
        "token/token-as-base-model/inspect",
        "token/token-as-base-model/inspect-json",
        "token/token-as-base-model/inspect-spectrum",
        "token/token-as-base-model/rescale",
        "token/token-as-base-model/resize",
        "token/token-as-base-model/convert-peft",
        "token/token-as-base-model/combine",
        "token/token-in-metadata/inspect",
        "token/token-in-metadata/inspect-json",
        "token/token-in-metadata/inspect-spectrum",
        "token/token-in-kohya-metadata/inspect",
        "token/token-in-kohya-metadata/inspect-json",
        "token/token-in-kohya-metadata/inspect-spectrum",
        "token/token-in-kohya-metadata/rescale",
        "token/token-in-kohya-metadata/resize",
        "token/token-in-kohya-metadata/convert",
        "token/token-in-config-key/inspect-json",
        "token/token-in-config-key/rescale",
        "token/token-in-config-key/resize",
        "token/token-in-config-key/convert-peft",
        "token/token-in-bad-config/validate",
        "token/token-in-pattern/inspect-json",
        "base/config-link-environ/merge",
        "base/config-link-environ/merge-report",
        "base/extra-file-link-environ/merge",
        "base/extra-file-link-environ/merge-report",
    ),
}
KNOWN_OPEN: dict[str, str] = {case: item for item, cases in _BY_ITEM.items() for case in cases}


def bound_for(case_id: str) -> float:
    from corpus import BOUND

    return HANG_BOUND if "hang" in KNOWN_OPEN.get(case_id, "") else BOUND
