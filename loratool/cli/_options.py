"""Options shared by several commands, defined once.

An option name means one thing in every command that has it (tests/cli/test_options.py walks every
command and fails otherwise; docs/cli.md "Shared options" is the table): a new command takes its
options from here, and an option with a new meaning gets a new name.
"""

from __future__ import annotations

import math
import os
from typing import overload

import click

from loratool.formats import writable_formats

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or warnings on stderr.")
force_option = click.option("--force", is_flag=True, help="Replace OUT if it exists.")
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow .bin/.pt pickle adapters (loaded with torch.load(weights_only=True)). Only for trusted files.",
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the maths runs: auto (cuda if available), cpu, cuda or cuda:N.",
)


class OutputPath(click.Path):
    """A path the command writes (-o/--out, merge --report). Every other click.Path parameter is an
    input: loratool.cli records it before the command runs, and no output may be, hold or lie
    inside it (io.outputs.note_inputs)."""


def local_out(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """-o/--out is a local path: an hf:// output is refused with the two-step way to get there."""
    if value is not None and value.startswith("hf://"):
        raise click.BadParameter(
            f"{value}: outputs are written locally; write to a directory, then upload it with "
            f"`loratool push DIR {value[len('hf://'):].split('@')[0] or 'OWNER/REPO'}`", ctx=ctx, param=param)
    return value


out_option = click.option(
    "-o", "--out", "out", required=True, type=OutputPath(), callback=local_out,
    help="Output path (a directory for PEFT, a file for kohya).",
)
weights_option = click.option(
    "-w", "--weights", "weights", default=None, metavar="W1,W2,...",
    help="One weight per adapter, comma-separated, in order; negative values subtract (default: 1 each).",
)


def check_adapter_args(paths: tuple[str, ...] | list[str], weights: str | None) -> None:
    """Refuse an ADAPTER argument that is a number and no file: `--weights 0.5 0.5` takes only the
    first 0.5 as the option's value and the second as an adapter path."""
    from pathlib import Path

    from loratool.errors import IncompatibleError

    for p in paths:
        try:
            float(p)
        except ValueError:
            continue
        if not Path(p).exists():
            given = f"--weights {weights} {p}" if weights is not None else p
            example = ",".join(filter(None, [weights, p]))
            raise IncompatibleError(f"'{p}' is given as an adapter but is a number and no file ({given})",
                                    hint=f"weights are one comma-separated value: --weights {example}")


def parse_weights(text: str) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3]; anything but finite numbers is the user's error."""
    from loratool.errors import IncompatibleError

    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise IncompatibleError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None
    for word, w in zip(text.split(","), weights):
        if not math.isfinite(w):
            raise IncompatibleError(f"--weights {text!r}: {word.strip()!r} is not a finite number")
    return weights


format_option = click.option(
    "--format", "fmt", type=click.Choice(writable_formats()), default=None,
    help="Output format (default: the input's).",
)
dtype_option = click.option(
    "--dtype", type=click.Choice(["keep", "fp32", "fp16", "bf16"]), default="keep", show_default=True,
    help="dtype of the written factors.",
)
modules_option = click.option(
    "--modules", "modules", metavar="REGEX", default=None,
    help="Only modules whose name matches this regex (re.search); others are copied unchanged.",
)


def write_options(f):  # type: ignore[no-untyped-def]
    """-o/--out, --force, --format, --json, -q and --allow-pickle, in that order of --help."""
    for opt in reversed((out_option, force_option, format_option, json_option, quiet_option, allow_pickle_option)):
        f = opt(f)
    return f


revision_option = click.option(
    "--revision", metavar="REV", default=None,
    help="Branch ('/' allowed), tag or commit sha (same as REPO_ID@REV).",
)


def repo_ref(ref: str, revision: str | None, *, what: str) -> tuple[str, str | None, str]:
    """REPO_ID[@REV] or hf://OWNER/REPO[@REV][/PATH], plus --revision -> (repo_id, revision, path).

    The same spelling works in `pull` and `push`; --revision and @REV must agree when both are
    given. A repo id without an owner (push: your namespace) is passed on unchanged.
    """
    from loratool.hub import is_hf_url, parse_hf_url, split_repo_ref

    if is_hf_url(ref):
        url = parse_hf_url(ref)
        repo_id, rev, path = url.repo_id, url.revision, url.path
    elif "/" not in ref.split("@", 1)[0]:
        repo_id, _, rev_s = ref.partition("@")
        rev, path = rev_s or None, ""
    else:
        repo_id, rev = split_repo_ref(ref)
        path = ""
    if revision is not None and rev is not None and revision != rev:
        raise click.UsageError(f"{what} {ref} names revision {rev!r} but --revision says {revision!r}; give one")
    return repo_id, revision if revision is not None else rev, path


token_option = click.option(
    "--token", default=None, metavar="TOKEN",
    help="Hugging Face token (default: HF_TOKEN, then the token saved by `hf auth login`). Never printed.",
)


@overload
def input_path(path: str, *, quiet: bool = False) -> str: ...
@overload
def input_path(path: None, *, quiet: bool = False) -> None: ...
def input_path(path: str | None, *, quiet: bool = False) -> str | None:
    """The one place input paths meet the Hub: hf://OWNER/REPO[@REVISION][/PATH] -> a local path.

    Call it at the start of every command, on every argument/option that names an input (adapter,
    base model). Plain paths come back unchanged; hf:// ones are downloaded through the Hugging Face
    cache (HF_HUB_OFFLINE=1: from the cache only) and the local path is returned. Download bars
    appear on stderr only when it is a terminal and not `quiet`. Raises HubError (exit 2).
    """
    if path is None or not path.startswith("hf://"):
        return path
    import sys

    from loratool.hub import resolve_path
    from loratool.io.outputs import note_inputs

    local = str(resolve_path(path, progress=not quiet and sys.stderr.isatty()))
    note_inputs([local])  # the local copy is an input like any other path (cli._recording_inputs)
    return local


module_weights_option = click.option(
    "--module-weights", "module_weights", metavar="'REGEX=W,...'", default=None,
    help="Per-module weight multipliers: the first REGEX that matches a module name (re.search) gives its "
         "weight; 0 leaves the module out.",
)
blocks_option = click.option(
    "--blocks", "blocks", metavar="PRESET:W1,W2,...", default=None,
    help="Per-block weight multipliers in the LoRA Block Weight layout of PRESET (sd15, sd15-full, sdxl, "
         "sdxl-full, flux, wan, wan-1.3b); 0 leaves a block's modules out.",
)



def weighting_options(f):  # type: ignore[no-untyped-def]
    """--weights, --module-weights and --blocks: how much of each adapter, module and block applies."""
    for opt in reversed((weights_option, module_weights_option, blocks_option)):
        f = opt(f)
    return f


def preflight(*, out: str | None = None, force: bool = False, kind: str | None = None,
              inputs: tuple[str | None, ...] | list[str | None] = (), device: str | None = None,
              module_weights: str | None = None, blocks: str | None = None, modules: str | None = None) -> None:
    """The checks that need no input file, made before a command imports torch (2 s of CPU or more
    on a busy machine) or downloads anything: an existing OUT without --force, a --device that
    names no device, a --module-weights / --blocks / --modules that cannot be read. Each raises the
    same error the library would raise later (exit 2).

    Args:
        kind: what a folder OUT holds when it is ours ("adapter", "model"), as io.outputs.check_output.
        inputs: the command's input paths as given (hf:// ones are left to the command), so an OUT
            that is one of them is refused as such.
    """
    if out is not None and not force and os.path.lexists(out):
        from loratool.io.outputs import check_output

        local = [p for p in inputs if p is not None and not p.startswith("hf://")]
        check_output(out, force=False, directory=os.path.isdir(out), inputs=local, kind=kind)
    if device is not None:
        from loratool.device import check_device_name

        check_device_name(device)
    if module_weights is not None:
        from loratool.formats.blocks import parse_module_weights

        parse_module_weights(module_weights)
    if blocks is not None:
        from loratool.formats.blocks import parse_blocks

        parse_blocks(blocks)
    if modules is not None:
        from loratool.ops.resize import modules_pattern

        modules_pattern(modules)
class RuntimeTarget(click.ParamType):
    """`--for NAME` or `--for NAME@VERSION` (a release of that runtime; see docs/runtimes.md)."""

    name = "runtime"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        from loratool.runtimes import NAMES

        return "[" + "|".join(NAMES) + "][@VERSION]"

    def convert(self, value: str, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from loratool.runtimes import NAMES, parse_target

        name, version = parse_target(value)
        if name not in NAMES:
            self.fail(f"{value!r}: not one of {', '.join(NAMES)} (optionally with @VERSION, e.g. vllm@0.8)",
                      param, ctx)
        if "@" in value and not version:
            self.fail(f"{value!r}: give a version after @, e.g. {name}@0.8", param, ctx)
        return value


allow_variant_option = click.option(
    "--allow-variant", "allow_variant", is_flag=True,
    help="Go on with an unconverted PiSSA / OLoRA / CorDA / LoftQ adapter or an aLoRA one (a warning says what "
    "the result means); by default such adapters are refused.",
)
