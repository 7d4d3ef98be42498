from __future__ import annotations

import re
from typing import TYPE_CHECKING

import click

from loratool.cli._options import allow_pickle_option, device_option, input_path, json_option, quiet_option
from loratool.errors import IncompatibleError

if TYPE_CHECKING:
    from loratool.patterns import SafePattern


@click.command()
@click.argument("path", type=click.Path())
@json_option
@click.option("--modules", "modules", metavar="[REGEX]", is_flag=False, flag_value="", default=None,
              help="One row per module; with REGEX only the modules whose name matches it (re.search).")
@click.option("--spectrum", is_flag=True, help="Exact singular values per module (reads tensor bytes).")
@allow_pickle_option
@device_option
@quiet_option
def inspect(path: str, as_json: bool, modules: str | None, spectrum: bool, allow_pickle: bool, device: str,
            quiet: bool) -> int:
    """Show what an adapter holds: format, ranks, alphas (and where they came from), targets, metadata.

    Reads only the file header unless --spectrum is given.

    \b
    Example: loratool inspect adapter_dir --modules
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.inspect import inspect_adapter

    path = input_path(path, quiet=quiet or as_json)
    with _render.progress("spectrum", enabled=spectrum and not (quiet or as_json)) as cb:
        report = inspect_adapter(path, spectrum=spectrum, allow_pickle=allow_pickle, device=device, progress=cb)
    pattern = _pattern(modules) if modules else None
    return emit(report.to_dict(), lambda d: _render.render_inspect(d, modules=modules is not None, spectrum=spectrum,
                                                                   only=pattern), as_json=as_json, quiet=quiet)


def _pattern(regex: str) -> SafePattern:
    from loratool.patterns import compile_pattern

    try:
        return compile_pattern(regex)  # matched in bounded time (loratool.patterns)
    except re.error as e:
        raise IncompatibleError(f"--modules {regex!r}: not a regular expression ({e})") from None
