from __future__ import annotations

import click

from loratool.cli._options import (
    device_option,
    input_path,
    out_option,
    output_options,
    preflight,
)
from loratool.ops.extract import output_formats


@click.command()
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@out_option
@click.option("--rank", "-r", type=int, default=None, help="Rank of every module (with --threshold: the cap).")
@click.option("--threshold", type=float, default=None,
              help="Energy share in (0, 1]: per module the smallest rank whose singular values keep "
              "sum(σ_i²) ≥ T·||ΔW||_F².")
@click.option("--modules", "modules", metavar="REGEX", default=None,
              help="Only tensors whose module name (the key without .weight/.bias) matches this regex (re.search).")
@click.option("--embeddings", is_flag=True,
              help="Also extract embeddings (PEFT embedding LoRA) and output heads (lm_head).")
@click.option("--save-changed", is_flag=True,
              help="Store changed 1-D tensors (norms, biases) too: as modules_to_save, or as the LoRA bias of an "
              "extracted layer. PEFT only.")
@click.option("--format", "fmt", type=click.Choice(output_formats()), default="peft", show_default=True,
              help="Output format.")
@device_option
@output_options
def extract(base: str, tuned: str, out: str, rank: int | None, threshold: float | None, modules: str | None,
            embeddings: bool, save_changed: bool, fmt: str, device: str, force: bool, as_json: bool,
            quiet: bool) -> int:
    """Extract a LoRA adapter from a fine-tuned model: the SVD of W_tuned - W_base.

    BASE and TUNED are checkpoints with the same tensor names (a .safetensors file, a directory with
    model.safetensors, or a sharded Hugging Face directory); they are read one pair of tensors at a
    time. Every changed 2-D (and conv) weight becomes a LoRA module with alpha = rank; the SVD is
    exact for small matrices and randomized (with power iterations) for large ones. Unchanged
    weights are skipped; changed norms and biases are reported (stored with --save-changed).

    \b
    Example: loratool extract ./Llama-3.2-1B ./Llama-3.2-1B-sft -o ./sft-lora --rank 16
    """
    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.extract import extract as run

    preflight(out=out, force=force, kind="adapter", inputs=[base, tuned], device=device, modules=modules)
    base = input_path(base, quiet=quiet or as_json)
    tuned = input_path(tuned, quiet=quiet or as_json)
    with _render.progress("extracting", enabled=not (quiet or as_json)) as cb:
        report = run(base, tuned, out, rank=rank, threshold=threshold, modules=modules, embeddings=embeddings,
                     save_changed=save_changed, fmt=fmt, device=device, force=force, progress=cb)
    return emit(report.to_dict(), _render.render_extract, as_json=as_json, quiet=quiet)
