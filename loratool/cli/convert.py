from __future__ import annotations

import click

from loratool.cli._options import (
    allow_pickle_option,
    force_option,
    input_path,
    json_option,
    out_option,
    quiet_option,
)


@click.command()
@click.argument("path", type=click.Path())
@click.option("--to", "to", type=click.Choice(["peft", "kohya", "diffusers"]), required=True,
              help="Output format: peft (a directory), kohya or diffusers (a .safetensors file).")
@out_option
@click.option("--base", default=None, type=click.Path(),
              help="The base model: kohya names are placed by its keys, every module must match one of its "
              "weights, and factors take its layout (linear or 1x1 conv).")
@force_option
@json_option
@quiet_option
@allow_pickle_option
def convert(path: str, to: str, out: str, base: str | None, force: bool, as_json: bool, quiet: bool,
            allow_pickle: bool) -> int:
    """Convert an adapter between PEFT, kohya and diffusers, keeping every delta exact.

    The factors are copied bit for bit; module names, the way alpha is stored (each module's scale
    is kept exactly; kohya alphas are float32) and DoRA magnitude names are translated. kohya names
    lost their dots: --base places them by the base's keys; without it, the kohya naming rules
    place a name only when they allow exactly one reading, and the names they cannot place are
    listed in the error.

    \b
    Example: loratool convert lora.safetensors --to peft -o lora_peft --base ./sd_xl_base_1.0.safetensors
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.convert import convert as run

    path = input_path(path, quiet=quiet or as_json)
    base = input_path(base, quiet=quiet or as_json)
    report = run(path, out, to=to, base=base, force=force, allow_pickle=allow_pickle)
    return emit(report.to_dict(), _render.render_convert, as_json=as_json, quiet=quiet)
