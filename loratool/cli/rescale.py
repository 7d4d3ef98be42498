from __future__ import annotations

import click

from loratool.cli._options import (
    blocks_option,
    input_path,
    module_weights_option,
    modules_option,
    preflight,
    write_options,
)
from loratool.errors import IncompatibleError


@click.command()
@click.argument("path", type=click.Path())
@click.option("--factor", type=float, default=None, help="Multiply every delta by F (negative allowed).")
@click.option("--alpha", type=float, default=None, help="Set alpha to A, keeping every delta.")
@click.option("--normalize", is_flag=True, help="Set alpha = rank everywhere, keeping every delta.")
@click.option("--to-rslora", is_flag=True, help="Switch to rsLoRA scaling (alpha/sqrt(r)), keeping every delta.")
@click.option("--from-rslora", is_flag=True, help="Switch to plain scaling (alpha/r), keeping every delta.")
@modules_option
@module_weights_option
@blocks_option
@write_options
def rescale(path: str, factor: float | None, alpha: float | None, normalize: bool, to_rslora: bool,
            from_rslora: bool, modules: str | None, module_weights: str | None, blocks: str | None, out: str,
            force: bool, fmt: str | None, as_json: bool,
            quiet: bool, allow_pickle: bool) -> int:
    """Change an adapter's strength, or its alpha convention without changing what it does.

    --factor multiplies the delta (only alpha changes; factors stay bit-identical). --alpha,
    --normalize, --to-rslora and --from-rslora keep the delta exactly.

    \b
    Example: loratool rescale style.safetensors -o style_half.safetensors --factor 0.5
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.rescale import check_options
    from loratool.ops.rescale import rescale as run

    chosen = [(name, v) for name, v in (("factor", factor), ("alpha", alpha), ("normalize", normalize or None),
                                        ("to_rslora", to_rslora or None), ("from_rslora", from_rslora or None))
              if v is not None]
    if not chosen and (module_weights is not None or blocks is not None):
        chosen = [("factor", 1.0)]  # per-module weights alone: a factor of 1 times each module's weight
    if len(chosen) != 1:
        raise IncompatibleError(
            "rescale needs exactly one of --factor, --alpha, --normalize, --to-rslora, --from-rslora"
            + (f" (got {', '.join('--' + n.replace('_', '-') for n, _ in chosen)})" if chosen else ""),
        )
    mode, value = chosen[0]
    check_options(mode, value, per_module=module_weights is not None or blocks is not None)
    preflight(out=out, force=force, kind="adapter", inputs=[path], module_weights=module_weights, blocks=blocks,
              modules=modules)
    path = input_path(path, quiet=quiet or as_json)
    report = run(path, out, mode=mode, value=value if mode in ("factor", "alpha") else None, modules=modules,
                 fmt=fmt, force=force, allow_pickle=allow_pickle, module_weights=module_weights, blocks=blocks)
    return emit(report.to_dict(), _render.render_rescale, as_json=as_json, quiet=quiet)
