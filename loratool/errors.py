"""The only exceptions the library raises at users.

Every failure a user can cause is a LoratoolError (or subclass) whose message names the file and,
where there is one, the tensor key. The CLI maps them to exit code 2; anything else is a bug (3).
"""

from __future__ import annotations

import importlib
from typing import Any


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


def optional_module(name: str, *, needed_by: str, extra: str, error: type[LoratoolError] | None = None) -> Any:
    """Import the optional package `name` (lazily, where it is needed); when it is not installed, a
    LoratoolError (or `error`) saying what needs it and how to install it. loratool is installed
    from a checkout, not from the package index, so the hint names the package and the extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise (error or LoratoolError)(
            f"{needed_by} needs the '{name}' package, which is not installed",
            hint=f"pip install {name}  (or, in a loratool checkout: pip install -e '.[{extra}]')",
        ) from None


class LoratoolWarning(UserWarning):
    """Something the user should know that does not stop the command (shown on stderr by the CLI)."""


# ---------------------------------------------------------------------------------------------
# secrets: nothing loratool prints or writes may show a Hub token
#
# scrub() is the one scrubber: the CLI runs everything it prints to stdout and stderr through it
# (cli.LoratoolGroup.main), HubError messages are built with it, and every text loratool writes into
# an output (safetensors metadata, adapter configs, the merge's rewritten configs, model cards) goes
# through it (io.writers._header_bytes, io.writers.write_text_output, io.copies.copy_input_file for
# copied side files).

_SECRETS: set[str] = set()
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_TOKEN_RE = None


def register_secret(secret: str | None) -> None:
    """Remember a secret (a Hub token in use) so that scrub() hides it wherever it appears, whatever
    its length; also the forms JSON and repr() give it (escaped non-ASCII or control characters)."""
    if not secret or secret.strip("*") == "":
        return  # nothing to hide ("***" is what a hidden secret becomes)
    import json

    _SECRETS.add(secret)
    for form in (json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1]):
        if form:
            _SECRETS.add(form)


def known_secrets() -> list[str]:
    """The known secrets (registered, and HF_TOKEN / HUGGING_FACE_HUB_TOKEN), longest first."""
    import os

    for name in _TOKEN_ENV:
        register_secret(os.environ.get(name))
    return sorted(_SECRETS, key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` with every known secret and anything shaped like a Hugging Face token replaced by ***.

    Known secrets: those registered (the token a Hub call used, --token), the HF_TOKEN /
    HUGGING_FACE_HUB_TOKEN environment variables, of any length. Used on everything the CLI prints
    (stdout and stderr, tracebacks included) and every text loratool writes.
    """
    import re

    global _TOKEN_RE
    for secret in known_secrets():
        text = text.replace(secret, "***")
    if _TOKEN_RE is None:
        _TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
    # a credential after "Bearer" (an echoed Authorization header), not an ordinary word ("bearer bonds")
    text = re.sub(r"(?i)(bearer\s+)[A-Za-z0-9_.~+/=-]{8,}", r"\1***", text)
    return _TOKEN_RE.sub("hf_***", text)


def scrub_bytes(data: bytes) -> bytes:
    """`data` with every known secret (as UTF-8) replaced by ***: for bytes copied into an output."""
    for secret in known_secrets():
        raw = secret.encode("utf-8", "surrogatepass")
        if raw in data:
            data = data.replace(raw, b"***")
    return data
