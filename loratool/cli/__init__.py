"""The `loratool` command: a click group over loratool.ops. Thin: parse, call one op, render, exit.

Exit codes: 0 success; 1 validate found problems; 2 could not do it (one `Error:` line naming the
file and key, plus a `Hint:`); 3 internal bug (traceback only with LORATOOL_DEBUG=1); 130 interrupted
(143 terminated by SIGTERM, handled like Ctrl-C). Everything printed goes through errors.scrub, so a Hub
token never shows, tracebacks included.
LoratoolGroup.main is the one place that maps exceptions to exit codes and messages, so the
console script, `python -m loratool` and click's CliRunner behave the same.

Adding a command:
1. write loratool/cli/<name>.py with one `@click.command()` function; take the shared options from
   cli/_options.py (an option name means one thing in every command: tests/cli/test_options.py
   checks it), type every path parameter click.Path (an input: recorded before the command runs, so
   no output lands on it) or OutputPath (an output), turn every input path with `input_path()`
   (hf:// support), call ONE library op, and
   end with `return emit(doc, _render.render_<name>, as_json=..., quiet=...)` (cli/_output.py);
2. add it to COMMANDS below;
3. add docs/commands/<name>.md (every option named, a console example that runs), a row in
   docs/cli.md, a mention in README.md, its `--json` keys in docs/json.md and an example
   invocation in tests/test_docs.py `_json_examples` (tests/test_docs.py checks all of these).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import os
import signal
import sys
import threading
import traceback
import warnings
from typing import Any

import click

from loratool import __version__
from loratool.cli import batch as _batch
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
from loratool.cli import scan as _scan
from loratool.cli import validate as _validate
from loratool.cli import verify as _verify
from loratool.cli._options import OutputPath
from loratool.errors import LoratoolError, LoratoolWarning, register_secret, scrub

EXIT_USER = 2
EXIT_BUG = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


COMMANDS: list[click.Command] = [
    _inspect.inspect, _validate.validate, _rescale.rescale, _resize.resize, _combine.combine, _merge.merge,
    _extract.extract, _convert.convert, _diff.diff, _verify.verify, _pull.pull, _push.push, _batch.batch,
    _scan.scan,
]


class LoratoolGroup(click.Group):
    """A click group whose main() maps every outcome to loratool's exit codes and messages.

    CliRunner.invoke, `python -m loratool` and the console script all go through main(), so they
    print the same `Error:` / `Hint:` lines and exit with the same codes. With
    standalone_mode=False, main() returns the exit code instead of calling sys.exit.
    """

    # runs one command line in this process as `loratool ARGV` would (run_item below); batch hands it to
    # its workers, and finds it here through click's context (cli/batch.py cannot import this module)
    item_runner: Any = None

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = sys.argv[1:] if args is None else list(args)
        for i, arg in enumerate(argv):  # a token on the command line is hidden like one from HF_TOKEN
            if arg == "--token" and i + 1 < len(argv):
                register_secret(argv[i + 1])
            elif isinstance(arg, str) and arg.startswith("--token="):
                register_secret(arg.partition("=")[2])
        previous = warnings.showwarning
        warnings.showwarning = _show_warning
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Scrubbed(sys.stdout), _Scrubbed(sys.stderr)
        try:
            code = run_mapped(lambda: super(LoratoolGroup, self).main(
                args=args, prog_name=prog_name or "loratool", complete_var=complete_var, standalone_mode=False,
                **extra))
        finally:
            warnings.showwarning = previous
            for wrapped in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    wrapped.flush()
            sys.stdout, sys.stderr = streams
        if standalone_mode:
            sys.exit(code)
        return code


class _Scrubbed(io.TextIOBase):
    """stdout or stderr for the length of a command: every byte passes errors.scrub on its way out.

    Text is passed on a line at a time (a token never spans a line), and at flush(); click.echo and
    rich flush after each message, so a message is scrubbed whole."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        cut = self._pending.rfind("\n") + 1
        if cut:
            done, self._pending = self._pending[:cut], self._pending[cut:]
            self.stream.write(scrub(done))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            done, self._pending = self._pending, ""
            self.stream.write(scrub(done))
        self.stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return bool(self.stream.isatty())

    def fileno(self) -> int:
        return int(self.stream.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.stream, "encoding", None) or "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.stream, "errors", None)


def run_mapped(call: Any) -> int:
    """Run the CLI and turn every outcome into an exit code (printing Error:/Hint: where one failed)."""
    try:
        return _run_mapped(call)
    finally:
        outputs = sys.modules.get("loratool.io.outputs")
        if outputs is not None:  # the paths this command read are not a later library call's inputs
            outputs.INPUTS.clear()


def _run_mapped(call: Any) -> int:
    debug = os.environ.get("LORATOOL_DEBUG") == "1"
    outputs = sys.modules.get("loratool.io.outputs")
    if outputs is not None:  # "Interrupted; X was written" names this command's outputs only (library use before it)
        outputs.OUTPUTS.clear()
        outputs.INPUTS.clear()
    try:
        code = call()
        code = code if isinstance(code, int) else 0
        _flush()  # inside the try: a Ctrl-C or a closed pipe while flushing is handled here
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (and so SIGTERM) into Abort
        code = _interrupted(EXIT_TERMINATED if isinstance(e.__context__, _Terminated) else EXIT_INTERRUPTED)
    except _Terminated:
        code = _interrupted(EXIT_TERMINATED)
    except KeyboardInterrupt:
        code = _interrupted(EXIT_INTERRUPTED)
    except click.exceptions.Exit as e:
        code = e.exit_code
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
        _devnull_stdout()
    except Exception as e:
        if debug:
            _print_traceback()
        first = str(e).splitlines()[0] if str(e) else ""
        _fail(f"internal error: {type(e).__name__}: {first}",
              "this is a bug in loratool; rerun with LORATOOL_DEBUG=1 and report the traceback")
        code = EXIT_BUG
    return code


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


def _quiet_echo(text: str) -> None:
    with contextlib.suppress(OSError, ValueError, KeyboardInterrupt):
        click.echo(text, err=True)


def _devnull_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        return  # not a real file (CliRunner's capture)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)


def version_text() -> str:
    """`loratool --version`: loratool, Python, and the libraries that decide what it can do (torch
    is imported here to ask whether CUDA works; --help never imports it)."""
    import platform
    from importlib import metadata

    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"loratool {__version__}", f"Python {platform.python_version()}"]
    try:
        import torch

        if torch.cuda.is_available():
            cuda = f"CUDA {torch.version.cuda} available, {torch.cuda.device_count()} device(s)"
        else:
            cuda = "CUDA not available" + (f" (built for CUDA {torch.version.cuda})" if torch.version.cuda else "")
        lines.append(f"torch {torch.__version__} ({cuda})")
    except ImportError:
        lines.append("torch not installed")
    lines += [f"safetensors {dist('safetensors')}", f"huggingface_hub {dist('huggingface_hub')}"]
    return "\n".join(lines)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


@click.group(cls=LoratoolGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions of loratool, Python, torch (and whether CUDA works), safetensors and "
                   "huggingface_hub, and exit.")
def cli() -> None:
    """Inspect, validate, rescale, resize, combine, merge, extract and convert LoRA adapters, and
    pull and push them to the Hugging Face Hub.

    Reads PEFT directories; kohya, diffusers, ComfyUI, XLabs and LyCORIS .safetensors files; MLX
    and GGUF adapters (formats: peft, kohya, diffusers, comfyui, xlabs, mlx, gguf); every input
    path also takes hf://OWNER/REPO[@REVISION][/PATH]. Exact maths, bounded memory, clear errors.
    Set LORATOOL_DEBUG=1 for tracebacks.

    \b
    Example: loratool inspect fixtures/peft_llama
    """


def run_item(argv: list[str], cwd: str) -> tuple[int, str, str]:
    """Run one command line in this process exactly as `loratool ARGV` would: the same group, the same
    exit-code mapping; returns (exit code, stdout, stderr). Called in the batch workers."""
    import contextlib
    import warnings

    if cwd and os.getcwd() != cwd:
        os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    # catch_warnings: a warning shown for one item is shown again for the next (the registry is per process)
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args=argv, standalone_mode=False)
    return int(code or 0), out.getvalue(), err.getvalue()


cli.item_runner = run_item  # type: ignore[attr-defined]


def _recording_inputs(command: click.Command) -> click.Command:
    """Make `command` record every path it is given, before it runs, as an input (io.outputs.note_inputs).

    Every parameter typed click.Path is something the command reads unless it is typed
    OutputPath (-o/--out, merge --report): adapters, --base, --dora-to-lora, ... No output may then
    be, hold or lie inside any of them, whatever the op passes to check_output. A new path option
    is covered by being a click.Path (tests/test_safety_outputs.py checks every command's).
    """
    names = [p.name for p in command.params if isinstance(p.type, click.Path) and not isinstance(p.type, OutputPath)]
    callback = command.callback
    if not names or callback is None:
        return command

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        from loratool.io.outputs import note_inputs

        for name in names:
            value = kwargs.get(name)
            values = value if isinstance(value, (tuple, list)) else (value,)
            note_inputs(v for v in values if isinstance(v, str) and not v.startswith("hf://"))  # hf://: input_path
        return callback(*args, **kwargs)

    command.callback = run
    return command


for _command in COMMANDS:
    cli.add_command(_recording_inputs(_command))


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
    from loratool.io.outputs import output_states

    states = output_states()
    click.echo("Interrupted" + (f"; {'; '.join(states)}." if states else "."), err=True)
    return code


def _print_traceback() -> None:
    sys.stderr.write(scrub(traceback.format_exc()))


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`loratool`, `python -m loratool`): the group's main, then a clean exit."""
    # OpenMP threads that spin after each parallel region (GNU OpenMP's default) take the cores
    # from the merge's reader, writer, hashing and block threads: on 2 busy cores a merge took
    # twice as long. Set before torch is imported (lazily, by the command); the user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # importing torch and a merge's per-block tensor objects ran full collections over every object
    # the import made (0.45 s of a 2.2 GB merge); a short-lived command collects far less often
    gc.set_threshold(50_000, 20, 20)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_sigterm)
    code = None
    try:
        code = cli.main(args=argv, prog_name="loratool", standalone_mode=False)
        _exit(code, in_main)
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM) after the command returned its code but before _exit took over the
        # signals: the results are already flushed, so end at once, saying what was written
        if not in_main:
            raise
        _exit_interrupted(signal.SIGINT, None, done=code)


def _exit(code: int, in_main: bool) -> None:
    """Exit with `code`, with no traceback if Ctrl-C lands while the interpreter shuts down.

    The results were flushed before this point; from here on a SIGINT or SIGTERM (the user pressing
    Ctrl-C just after `Wrote ...`) ends the process at once with the command's own code, as if it
    had come a moment later: nothing was cut short. (Raising KeyboardInterrupt inside atexit
    handlers or thread joins would print a traceback, and "Interrupted." would say the opposite.)
    """
    if in_main and sys.stdout is sys.__stdout__:
        done = functools.partial(_exit_interrupted, done=code)
        signal.signal(signal.SIGINT, done)
        signal.signal(signal.SIGTERM, done)
    sys.exit(code)


def _exit_interrupted(signum: int, frame: Any, done: int | None = None) -> None:
    if done is not None:  # the command had finished and its results were flushed
        _flush_quietly()
        os._exit(done)
    outputs = sys.modules.get("loratool.io.outputs")
    states = outputs.output_states() if outputs is not None else []
    _quiet_echo("Interrupted" + (f"; {'; '.join(states)}." if states else "."))
    os._exit(EXIT_INTERRUPTED)


def _flush_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
