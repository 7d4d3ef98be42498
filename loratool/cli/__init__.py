"""The `loratool` command: a click group over loratool.ops. Thin: parse, call one op, render, exit.

Exit codes: 0 success; 1 validate found problems; 2 could not do it (one `Error:` line naming the
file and key, plus a `Hint:`); 3 internal bug (traceback only with LORATOOL_DEBUG=1); 130 interrupted
(143 terminated by SIGTERM, handled like Ctrl-C).
Everything printed goes through errors.scrub, so a Hub token never shows, tracebacks included.
This module is the one place that maps exceptions to exit codes and messages.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import traceback
import warnings

import click

from loratool import __version__
from loratool.cli import combine as _combine
from loratool.cli import convert as _convert
from loratool.cli import diff as _diff
from loratool.cli import extract as _extract
from loratool.cli import inspect as _inspect
from loratool.cli import merge as _merge
from loratool.cli import pull as _pull
from loratool.cli import push as _push
from loratool.cli import rescale as _rescale
from loratool.cli import resize as _resize
from loratool.cli import validate as _validate
from loratool.cli import verify as _verify
from loratool.errors import LoratoolError, LoratoolWarning, register_secret, scrub

EXIT_USER = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="loratool")
def cli() -> None:
    """Inspect, validate, rescale, resize, combine, merge, extract and convert LoRA adapters, and
    pull and push them to the Hugging Face Hub.

    Reads PEFT directories, kohya .safetensors and diffusers files; every input path also takes
    hf://OWNER/REPO[@REVISION][/PATH]. Exact maths, bounded memory, clear errors. Set
    LORATOOL_DEBUG=1 for tracebacks.

    \b
    Example: loratool inspect fixtures/peft_llama
    """


cli.add_command(_inspect.inspect)
cli.add_command(_validate.validate)
cli.add_command(_rescale.rescale)
cli.add_command(_resize.resize)
cli.add_command(_combine.combine)
cli.add_command(_merge.merge)
cli.add_command(_extract.extract)
cli.add_command(_convert.convert)
cli.add_command(_diff.diff)
cli.add_command(_verify.verify)
cli.add_command(_pull.pull)
cli.add_command(_push.push)


def _fail(message: str, hint: str | None) -> None:
    # exactly one Error: line and at most one Hint: line, whatever text an exception carried
    click.echo(f"Error: {_one_line(scrub(message))}", err=True)
    if hint:
        click.echo(f"Hint: {_one_line(scrub(hint))}", err=True)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: temporaries are removed, the output is left whole."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    if issubclass(category, LoratoolWarning):
        from loratool.cli import _render

        _render.warn(scrub(str(message)))
    else:
        sys.stderr.write(scrub(warnings.formatwarning(message, category, filename, lineno, line)))


def _interrupted(code: int) -> int:
    from loratool.st import output_states

    states = output_states()
    click.echo("Interrupted" + (f"; {'; '.join(states)}." if states else "."), err=True)
    return code


def _print_traceback() -> None:
    sys.stderr.write(scrub(traceback.format_exc()))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn every outcome into an exit code."""
    debug = os.environ.get("LORATOOL_DEBUG") == "1"
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):  # a token on the command line is hidden like one from HF_TOKEN
        if arg == "--token" and i + 1 < len(args):
            register_secret(args[i + 1])
        elif arg.startswith("--token="):
            register_secret(arg.partition("=")[2])
    warnings.showwarning = _show_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = cli.main(args=argv, prog_name="loratool", standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (and so SIGTERM) into Abort
        code = _interrupted(EXIT_TERMINATED if isinstance(e.__context__, _Terminated) else EXIT_INTERRUPTED)
    except _Terminated:
        code = _interrupted(EXIT_TERMINATED)
    except KeyboardInterrupt:
        code = _interrupted(EXIT_INTERRUPTED)
    except click.ClickException as e:
        buf = io.StringIO()
        e.show(file=buf)
        sys.stderr.write(scrub(buf.getvalue()))
        code = EXIT_USER
    except LoratoolError as e:
        if debug:
            _print_traceback()
        _fail(e.message, e.hint)
        code = EXIT_USER
    except BrokenPipeError:
        code = 0
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
    except Exception as e:
        if debug:
            _print_traceback()
        first = str(e).splitlines()[0] if str(e) else ""
        _fail(f"internal error: {type(e).__name__}: {first}",
              "this is a bug in loratool; rerun with LORATOOL_DEBUG=1 and report the traceback")
        code = EXIT_BUG
    sys.exit(code if isinstance(code, int) else 0)
