from __future__ import annotations

import json
import os

import click

from loratool.cli._options import (
    OutputPath,
    allow_pickle_option,
    allow_variant_option,
    check_adapter_args,
    device_option,
    force_option,
    json_option,
    out_option,
    parse_weights,
    preflight,
    quiet_option,
    weighting_options,
)
from loratool.errors import LoratoolError
from loratool.io.outputs import atomic_output, check_output
from loratool.io.writers import write_text_output


@click.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@out_option
@weighting_options
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp16", "fp32"]), default="keep", show_default=True,
              help="dtype of the output's floating tensors.")
@device_option
@click.option("--unmerge", is_flag=True, help="Subtract the deltas instead of adding them (not for DoRA).")
@click.option("--allow-unmatched", is_flag=True, help="Skip adapter modules that match no base weight (warn).")
@click.option("--report", "report_file", type=OutputPath(), default=None,
              help="Write per-tensor statistics (delta norm, relative change, cast error, retained delta) as JSON.")
@click.option("--rounding", type=click.Choice(["nearest", "stochastic"]), default="nearest", show_default=True,
              help="How merged values round back to fp8 storage (stochastic: unbiased, seeded).")
@click.option("--seed", type=int, default=None, help="Seed for --rounding stochastic (default 0).")
@click.option("--min-retained", type=float, default=0.5, show_default=True,
              help="Warn when a merged tensor keeps less than this share of its delta after rounding.")
@click.option("--strict", is_flag=True, help="Refuse (write nothing) when a tensor keeps less than --min-retained.")
@click.option("--qlora-base", type=click.Choice(["nf4"]), default=None,
              help="Merge into dequant(quant_nf4(W)), the base a QLoRA adapter was trained on.")
@force_option
@json_option
@quiet_option
@allow_pickle_option
@allow_variant_option
def merge(base: str, adapters: tuple[str, ...], out: str, weights: str | None, module_weights: str | None,
          blocks: str | None, dtype: str, device: str,
          unmerge: bool, allow_unmatched: bool, report_file: str | None, rounding: str, seed: int | None,
          min_retained: float, strict: bool, qlora_base: str | None, force: bool, as_json: bool, quiet: bool,
          allow_pickle: bool, allow_variant: bool) -> int:
    """Merge one or more adapters into a base model, streaming tensor by tensor.

    BASE is a .safetensors file, a directory with model.safetensors, or a sharded Hugging Face
    directory. OUT mirrors it (file names, shards, key order, dtypes, config and tokenizer files).
    Deltas are summed in float32 and cast once; memory stays bounded by the largest tensor.
    A quantized base (fp8, scaled or block fp8, bitsandbytes nf4/fp4/int8) is dequantized,
    merged and quantized back with the same scheme (or written dequantized with --dtype); how
    much of each delta survives is measured and reported.

    \b
    Example: loratool merge ./Llama-3.2-1B ./my-adapter -o ./Llama-3.2-1B-merged
    """
    from loratool.cli import _render
    from loratool.cli._options import input_path
    from loratool.cli._output import emit
    from loratool.ops.merge import merge as run

    check_adapter_args(adapters, weights)
    parsed = None if weights is None else parse_weights(weights)
    preflight(out=out, force=force, kind="model", inputs=[base, *adapters], device=device,
              module_weights=module_weights, blocks=blocks)
    base = input_path(base, quiet=quiet or as_json)
    adapters = tuple(input_path(a, quiet=quiet or as_json) for a in adapters)
    if report_file:  # before the merge, which can take long; the two outputs may not collide
        check_output(report_file, force=force, directory=False, inputs=[base, *adapters], others=[out])
    with _render.progress("merging", enabled=not (quiet or as_json), unit="bytes", phase="starting") as cb:
        report = run(base, list(adapters), out, weights=parsed, dtype=dtype,
                     device=device, unmerge=unmerge, allow_unmatched=allow_unmatched, force=force,
                     allow_pickle=allow_pickle, stats=report_file is not None, module_weights=module_weights,
                     blocks=blocks, rounding=rounding, seed=seed, min_retained=min_retained, strict=strict,
                     qlora_base=qlora_base, progress=cb, phase=cb.phase, allow_variant=allow_variant)
    if report_file:
        try:
            with atomic_output(report_file, force=force, directory=False, inputs=[base, *adapters],
                               others=[out]) as tmp:
                write_text_output(tmp, json.dumps(report.to_dict(tensors=True), indent=2) + "\n")
        except LoratoolError as e:  # say what is on disk: the merged model is there, the report is not
            raise LoratoolError(f"{e.message}; the merged model was written to {out}", e.hint) from None
    if os.environ.get("LORATOOL_TIMINGS") == "1":  # per-stage pipeline timings (tests/perf/device_check.py)
        click.echo("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items()), err=True)
    return emit(report.to_dict(), _render.render_merge, as_json=as_json, quiet=quiet)
