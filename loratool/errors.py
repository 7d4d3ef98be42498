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


class LoratoolWarning(UserWarning):
    """Something the user should know that does not stop the command (shown on stderr by the CLI)."""


# ---------------------------------------------------------------------------------------------
# secrets: nothing loratool prints may show a Hub token

_SECRETS: set[str] = set()
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_TOKEN_RE = None


def register_secret(secret: str | None) -> None:
    """Remember a secret (a Hub token in use) so that scrub() hides it wherever it appears."""
    if secret and len(secret) >= 4:
        _SECRETS.add(secret)


def scrub(text: str) -> str:
    """`text` with every known secret and anything shaped like a Hugging Face token replaced by ***.

    Known secrets: those registered, the HF_TOKEN / HUGGING_FACE_HUB_TOKEN environment variables.
    Used on every message, warning and traceback the CLI prints.
    """
    import os
    import re

    global _TOKEN_RE
    for name in _TOKEN_ENV:
        register_secret(os.environ.get(name))
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    if _TOKEN_RE is None:
        _TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
    text = re.sub(r"(?i)(authorization:\s*bearer\s+|bearer\s+)[^\s'\"]+", r"\1***", text)
    return _TOKEN_RE.sub("hf_***", text)
