from __future__ import annotations

import click

from loratool.cli._options import allow_pickle_option, device_option, input_path, json_option, quiet_option


@click.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--all", "show_all", is_flag=True, help="List every common module, not only those that differ.")
@device_option
@json_option
@quiet_option
@allow_pickle_option
def diff(a: str, b: str, show_all: bool, device: str, as_json: bool, quiet: bool, allow_pickle: bool) -> int:
    """Compare two adapters module by module: what only one has, rank / alpha / dtype changes, and
    how far apart the deltas are (relative Frobenius distance and cosine, exact from the factors).

    A and B may be in different formats (a kohya file and its PEFT conversion pair up by module).
    Modules are sorted by distance, largest first.

    \b
    Example: loratool diff style_v1.safetensors style_v2.safetensors
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.diff import diff as run

    a = input_path(a, quiet=quiet or as_json)
    b = input_path(b, quiet=quiet or as_json)
    with _render.progress("comparing", enabled=not (quiet or as_json)) as cb:
        report = run(a, b, device=device, allow_pickle=allow_pickle, progress=cb)
    return emit(report.to_dict(), lambda d: _render.render_diff(d, show_all=show_all), as_json=as_json,
                quiet=quiet)
