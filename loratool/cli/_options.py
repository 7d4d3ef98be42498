"""Options shared by several commands, defined once."""

from __future__ import annotations

import math
from typing import overload

import click

from loratool.device import resolve_device  # noqa: F401  (re-exported for the commands)
from loratool.formats import writable_formats

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or warnings on stderr.")
force_option = click.option("--force", is_flag=True, help="Replace OUT if it exists.")
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow .bin/.pt pickle adapters (loaded with torch.load(weights_only=True)). Only for trusted files.",
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the maths runs: auto (cuda if available), cpu, cuda or cuda:N.",
)
out_option = click.option(
    "-o", "--out", "out", required=True, type=click.Path(), help="Output path (a directory for PEFT, a file for kohya)."
)


def parse_weights(text: str) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3]; anything but finite numbers is the user's error."""
    from loratool.errors import IncompatibleError

    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise IncompatibleError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None
    for word, w in zip(text.split(","), weights):
        if not math.isfinite(w):
            raise IncompatibleError(f"--weights {text!r}: {word.strip()!r} is not a finite number")
    return weights


format_option = click.option(
    "--format", "fmt", type=click.Choice(writable_formats()), default=None,
    help="Output format (default: the input's).",
)
dtype_option = click.option(
    "--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), default="keep", show_default=True,
    help="dtype of the written factors.",
)
modules_option = click.option(
    "--modules", "modules", metavar="REGEX", default=None,
    help="Only modules whose name matches this regex (re.search); others are copied unchanged.",
)


def write_options(f):  # type: ignore[no-untyped-def]
    """-o/--out, --force, --format, --json, -q and --allow-pickle, in that order of --help."""
    for opt in reversed((out_option, force_option, format_option, json_option, quiet_option, allow_pickle_option)):
        f = opt(f)
    return f


token_option = click.option(
    "--token", default=None, metavar="TOKEN",
    help="Hugging Face token (default: HF_TOKEN, then the token saved by `hf auth login`). Never printed.",
)


@overload
def input_path(path: str, *, quiet: bool = False) -> str: ...
@overload
def input_path(path: None, *, quiet: bool = False) -> None: ...
def input_path(path: str | None, *, quiet: bool = False) -> str | None:
    """The one place input paths meet the Hub: hf://OWNER/REPO[@REVISION][/PATH] -> a local path.

    Call it at the start of every command, on every argument/option that names an input (adapter,
    base model). Plain paths come back unchanged; hf:// ones are downloaded through the Hugging Face
    cache (HF_HUB_OFFLINE=1: from the cache only) and the local path is returned. Download bars
    appear on stderr only when it is a terminal and not `quiet`. Raises HubError (exit 2).
    """
    if path is None or not path.startswith("hf://"):
        return path
    import sys

    from loratool.hub import resolve_path

    return str(resolve_path(path, progress=not quiet and sys.stderr.isatty()))
