from __future__ import annotations

import click

from loratool.cli._options import (
    allow_pickle_option,
    check_adapter_args,
    device_option,
    json_option,
    parse_weights,
    preflight,
    quiet_option,
    weighting_options,
)


@click.command()
@click.argument("merged", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="The base checkpoint MERGED was made from.")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@weighting_options
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp16", "fp32"]), default="keep", show_default=True,
              help="The dtype merge was asked for; tensors stored in another dtype are findings.")
@device_option
@click.option("--allow-unmatched", is_flag=True, help="Skip adapter modules that match no base weight, as merge.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not only the findings.")
@json_option
@quiet_option
@allow_pickle_option
def verify(merged: str, base: str, adapters: tuple[str, ...], weights: str | None, module_weights: str | None,
           blocks: str | None, dtype: str, device: str,
           allow_unmatched: bool, show_all: bool, as_json: bool, quiet: bool, allow_pickle: bool) -> int:
    """Check that MERGED really is BASE plus the adapters' deltas, tensor by tensor.

    Each tensor gets a verdict: merged, not merged, merged twice, wrong weight (≈ k×), other
    change, or unchanged (tensors no adapter touches), within one rounding of the stored dtype.
    On a quantized base (fp8, scaled or block fp8, bitsandbytes nf4/fp4/int8) both are read
    dequantized and each merged tensor is checked against requantizing BASE + delta with the
    base's scheme, within twice that requantization's own error.
    Both checkpoints are streamed; deltas are measured from the factors, never as dense matrices.
    Exit 0 when everything is as expected, 1 with findings.

    \b
    Example: loratool verify ./merged --base ./Llama-3.2-1B ./my-adapter
    """
    from loratool.cli import _render
    from loratool.cli._options import input_path
    from loratool.cli._output import emit
    from loratool.ops.verify import verify as run

    check_adapter_args(adapters, weights)
    parsed = None if weights is None else parse_weights(weights)
    preflight(device=device, module_weights=module_weights, blocks=blocks)
    merged = input_path(merged, quiet=quiet or as_json)
    base = input_path(base, quiet=quiet or as_json)
    paths = [input_path(a, quiet=quiet or as_json) for a in adapters]
    with _render.progress("verifying", enabled=not (quiet or as_json), unit="bytes") as cb:
        report = run(merged, base, paths, weights=parsed, dtype=dtype, device=device, allow_unmatched=allow_unmatched,
                     allow_pickle=allow_pickle, module_weights=module_weights, blocks=blocks, progress=cb)
    return emit(report.to_dict(), lambda d: _render.render_verify(d, show_all=show_all), as_json=as_json,
                quiet=quiet, code=0 if report.ok else 1)
