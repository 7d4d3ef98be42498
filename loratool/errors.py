"""The only exceptions the library raises at users.

Every failure a user can cause is a LoratoolError (or subclass) whose message names the file and,
where there is one, the tensor key. The CLI maps them to exit code 2; anything else is a bug (3).
"""

from __future__ import annotations


class LoratoolError(Exception):
    """A failure the user can act on.

    Args:
        message: one line naming the file and tensor key, showing both sides of a mismatch.
        hint: the next thing to try (an exact command where there is one), or None.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class FormatError(LoratoolError):
    """The input is not a readable adapter/checkpoint (corrupt, truncated, unknown layout)."""


class IncompatibleError(LoratoolError):
    """Inputs are readable but do not fit together (shapes, ranks, unmatched keys, options)."""


class HubError(LoratoolError):
    """A Hugging Face Hub request failed (auth, not found, offline)."""


class OutputExistsError(LoratoolError):
    """The output path exists and --force was not given."""
