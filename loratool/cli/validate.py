from __future__ import annotations

import click

from loratool.cli._options import RuntimeTarget, allow_pickle_option, input_path, json_option, quiet_option


@click.command()
@click.argument("path", type=click.Path())
@click.option("--base", type=click.Path(), help="Base checkpoint (.safetensors, model dir or sharded dir).")
@click.option("--strict", is_flag=True, help="Treat warnings as failures.")
@click.option("--for", "for_runtime", type=RuntimeTarget(), default=None,
              help="Also report what this runtime rejects, ignores or mis-scales, per setting and module, with "
              "the fix; NAME@VERSION checks an older release (docs/runtimes.md).")
@json_option
@allow_pickle_option
@quiet_option
def validate(path: str, base: str | None, strict: bool, for_runtime: str | None, as_json: bool, allow_pickle: bool,
             quiet: bool) -> int:
    """Check an adapter for broken pairs, shape/rank mismatches, NaN/Inf, bad configs and base fit.

    Exit 0 when clean (warnings allowed unless --strict), 1 when problems were found, 2 when the
    input cannot be read at all.

    \b
    Example: loratool validate adapter_dir --base ./Llama-3.2-1B
    Example: loratool validate adapter_dir --for vllm
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.validate import validate_adapter

    path = input_path(path, quiet=quiet or as_json)
    base = input_path(base, quiet=quiet or as_json)
    with _render.progress("checking tensors", enabled=not (quiet or as_json)) as cb:
        report = validate_adapter(path, base=base, strict=strict, allow_pickle=allow_pickle, progress=cb,
                                  for_runtime=for_runtime)
    return emit(report.to_dict(), _render.render_validate, as_json=as_json, quiet=quiet, code=0 if report.ok else 1)
