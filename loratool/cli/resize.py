from __future__ import annotations

import click

from loratool.cli._options import (
    allow_variant_option,
    device_option,
    dtype_option,
    input_path,
    modules_option,
    preflight,
    write_options,
)
from loratool.maths.svd import RANK_METHODS


@click.command()
@click.argument("path", type=click.Path())
@click.option("--rank", "-r", type=int, default=None, help="Target rank (with --method: the cap).")
@click.option("--method", type=click.Choice(RANK_METHODS), default=None,
              help="Dynamic rank rule (smallest rank meeting --threshold).")
@click.option("--threshold", type=float, default=None,
              help="sv_ratio: keep σ ≥ σ_max/T; sv_fro / sv_cumulative: kept share; max_error: relative error.")
@click.option("--conv-rank", type=int, default=None, help="Fixed rank for conv modules with kernels > 1x1.")
@modules_option
@device_option
@dtype_option
@write_options
@allow_variant_option
def resize(path: str, rank: int | None, method: str | None, threshold: float | None, conv_rank: int | None,
           modules: str | None, device: str, dtype: str, out: str, force: bool, fmt: str | None, as_json: bool,
           quiet: bool, allow_pickle: bool, allow_variant: bool) -> int:
    """Resize an adapter to a lower rank with an exact truncated SVD (no dense out x in matrices).

    Fixed: --rank K. Dynamic: --method sv_fro --threshold 0.9 [--rank CAP] keeps, per module, the
    smallest rank that meets the threshold. Alpha is chosen so each module keeps its scale.

    \b
    Example: loratool resize adapter_dir -o adapter_r16 --rank 16
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.resize import check_options
    from loratool.ops.resize import resize as run

    check_options(rank, method, threshold, conv_rank)
    preflight(out=out, force=force, kind="adapter", inputs=[path], device=device, modules=modules)
    path = input_path(path, quiet=quiet or as_json)
    with _render.progress("resizing", enabled=not (quiet or as_json)) as cb:
        report = run(path, out, rank=rank, method=method, threshold=threshold, conv_rank=conv_rank,
                     modules=modules, fmt=fmt, device=device, dtype=dtype, force=force,
                     allow_pickle=allow_pickle, progress=cb, allow_variant=allow_variant)
    return emit(report.to_dict(), _render.render_resize, as_json=as_json, quiet=quiet)
