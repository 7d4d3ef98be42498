from __future__ import annotations

import click

from loratool.cli._options import (
    RuntimeTarget,
    allow_pickle_option,
    allow_variant_option,
    input_path,
    out_option,
    output_options,
    preflight,
)
from loratool.families import families
from loratool.formats import writable_formats


@click.command()
@click.argument("path", type=click.Path())
@click.option("--to", "to", type=click.Choice([*writable_formats(), "lora"]), default=None,
              help="Output format: peft or mlx (a directory), kohya, diffusers or comfyui (a .safetensors file), "
              "gguf (a .gguf file); lora: the source's own format with LyCORIS modules turned into plain LoRA.")
@click.option("--for", "for_runtime", type=RuntimeTarget(), default=None,
              help="Write what this runtime serves exactly (implies --to): one rank and one alpha where it "
              "reads one, scales baked into the factors; see docs/commands/convert.md.")
@click.option("--dora-to-lora", "dora_base", default=None, type=click.Path(),
              help="A base model: write every DoRA module as the best plain LoRA of its rank for this base "
              "(an approximation; the relative error of each module is printed).")
@click.option("--drop", is_flag=True,
              help="With --for: remove what the runtime cannot hold (DoRA magnitudes, modules_to_save, ...) "
              "with a warning saying what is lost, instead of refusing.")
@out_option
@click.option("--base", default=None, type=click.Path(),
              help="The base model: kohya names are placed by its keys, every module must match one of its "
              "weights, and factors take its layout (linear or 1x1 conv; MoE experts: fused or one per expert Linear).")
@click.option("--family", "family", default=None,
              help=f"The model family ({', '.join(f.name for f in families())}): convert "
              "between its dialects by its table, splitting and fusing modules exactly; detected from the names when "
              "they fit one family best.")
@click.option("--fuse-rank", "fuse_rank", type=click.IntRange(min=1), default=None,
              help="With a family: truncate fused (block-diagonal) modules to this rank; the error is reported.")
@click.option("--rank", "-r", "rank", type=click.IntRange(min=1), default=None,
              help="LyCORIS modules become LoRA of at most this rank (best truncation, error reported); "
              "default: exact.")
@output_options
@allow_pickle_option
@allow_variant_option
@click.option("--initial-adapter", "initial_adapter", default=None, type=click.Path(),
              help="The adapter PEFT saved right after a PiSSA / OLoRA / CorDA initialisation: write PEFT's own "
              "conversion to plain LoRA (ΔW = s·(B·A − B0·A0), rank 2r), which serves on the original base.")
def convert(path: str, to: str | None, for_runtime: str | None, dora_base: str | None, drop: bool, out: str,
            base: str | None, family: str | None, fuse_rank: int | None, rank: int | None, force: bool,
            as_json: bool, quiet: bool, allow_pickle: bool, allow_variant: bool, initial_adapter: str | None) -> int:
    """Convert an adapter to another format (peft, kohya, diffusers, comfyui, mlx, gguf), deltas exact.

    The factors are copied bit for bit; module names, the way alpha is stored (each module's scale
    is kept exactly; kohya alphas are float32) and DoRA magnitude names are translated. kohya names
    lost their dots: --base places them by the base's keys; without it, the kohya naming rules
    place a name only when they allow exactly one reading, and the names they cannot place are
    listed in the error.

    LyCORIS modules become plain LoRA: LoHa exactly (rank r1·r2), LoCon Tucker exactly (rank r),
    LoKr exactly or, with --rank, truncated through the SVDs of its Kronecker factors (the error is
    reported per module); full and norm diffs without a LoRA form stay as they are (kohya only).

    \b
    --for RUNTIME (vllm, sglang, llama.cpp, mlx, diffusers, comfyui) writes the layout that runtime
    serves exactly: for vLLM and SGLang one rank and one alpha for every module (ranks zero-padded,
    per-module scales baked into the factors); DoRA and modules_to_save are refused, or removed by
    --drop with a warning.

    \b
    Example: loratool convert lora.safetensors --to peft -o lora_peft --base ./sd_xl_base_1.0.safetensors
    Example: loratool convert adapter_dir --for vllm -o adapter_vllm
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.convert import convert as run

    if to is None and for_runtime is None:
        raise click.UsageError("give --to FORMAT or --for RUNTIME")
    if drop and for_runtime is None:
        raise click.UsageError("--drop needs --for RUNTIME")
    preflight(out=out, force=force, kind="adapter", inputs=[path, base, dora_base])
    if family is not None:
        from loratool.families import check_name

        check_name(family)
    path = input_path(path, quiet=quiet or as_json)
    base = input_path(base, quiet=quiet or as_json)
    dora_base = input_path(dora_base, quiet=quiet or as_json)
    initial_adapter = input_path(initial_adapter, quiet=quiet or as_json)
    with _render.progress("converting", enabled=not (quiet or as_json), phase="starting") as bar:
        report = run(path, out, to=to, base=base, force=force, allow_pickle=allow_pickle, for_runtime=for_runtime,
                     drop=drop, dora_to_lora=dora_base, rank=rank, family=family, fuse_rank=fuse_rank,
                     allow_variant=allow_variant, initial_adapter=initial_adapter, phase=bar.phase)
    return emit(report.to_dict(), _render.render_convert, as_json=as_json, quiet=quiet)
