from __future__ import annotations

import click

from loratool.cli._options import (
    allow_variant_option,
    check_adapter_args,
    device_option,
    dtype_option,
    input_path,
    parse_weights,
    preflight,
    weighting_options,
    write_options,
)
from loratool.errors import IncompatibleError
from loratool.ops.combine import METHODS, check_options


@click.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@weighting_options
@click.option("--method", type=click.Choice(METHODS), default="cat", show_default=True,
              help="cat / svd: exact sum (svd truncated to --rank); ties, dare_*, magnitude_prune: peft's "
                   "merge methods on dense deltas, then truncated; linear: peft's factor averaging (inexact).")
@click.option("--rank", "-r", type=int, default=None,
              help="Output rank for svd, ties, dare_*, magnitude_prune (default: per module, the largest input rank).")
@click.option("--density", type=float, default=None,
              help="ties, dare_*, magnitude_prune: share of each delta's entries kept, in (0, 1].")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="ties, dare_ties: elect each entry's sign by the sum of values or by the count of signs.")
@click.option("--seed", type=int, default=None,
              help="dare_*: seed for the random masks (default: drawn, and printed in the report).")
@click.option("--allow-different-bases", is_flag=True,
              help="Combine inputs whose recorded base models differ (the same model under two names).")
@device_option
@dtype_option
@write_options
@allow_variant_option
def combine(adapters: tuple[str, ...], weights: str | None, module_weights: str | None, blocks: str | None,
            method: str, rank: int | None, density: float | None,
            majority_sign: str, seed: int | None, allow_different_bases: bool, device: str, dtype: str, out: str,
            force: bool, fmt: str | None, as_json: bool, quiet: bool, allow_pickle: bool, allow_variant: bool) -> int:
    """Combine adapters with weights into one adapter.

    Inputs may differ in format, rank, alpha, rsLoRA and target modules; the result covers the union.
    cat is the exact weighted sum of the deltas (rank = sum of ranks); svd is that sum truncated to
    --rank, computed without dense matrices. DoRA inputs are refused.

    ADAPTER is a PEFT directory, a kohya or diffusers .safetensors file, or hf://OWNER/REPO[@REV][/PATH].

    \b
    Example: loratool combine style/ subject/ -o both/ --weights 0.7,0.5 --method svd --rank 32
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.combine import combine as run

    if len(adapters) < 2:
        raise IncompatibleError(f"combine needs at least two adapters, got {len(adapters)}",
                                hint="to scale one adapter use: loratool rescale ADAPTER -o OUT --factor F")
    check_adapter_args(adapters, weights)
    parsed = [1.0] * len(adapters) if weights is None else parse_weights(weights)
    check_options(len(adapters), parsed, method, rank, density, majority_sign, seed)
    preflight(out=out, force=force, kind="adapter", inputs=list(adapters), device=device,
              module_weights=module_weights, blocks=blocks)
    paths = [input_path(p, quiet=quiet or as_json) for p in adapters]
    with _render.progress("combining", enabled=not (quiet or as_json)) as cb:
        report = run(paths, out, weights=parsed, method=method, rank=rank, density=density,
                     majority_sign=majority_sign, seed=seed, fmt=fmt, dtype=dtype, device=device,
                     force=force, allow_pickle=allow_pickle, module_weights=module_weights, blocks=blocks,
                     allow_different_bases=allow_different_bases, progress=cb, allow_variant=allow_variant)
    return emit(report.to_dict(), _render.render_combine, as_json=as_json, quiet=quiet)
