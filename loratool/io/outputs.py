"""Outputs: checked, claimed, written aside, moved into place atomically.

The rules (docs/cli.md, "Safety"): an output is never an input, inside one or around one; two
outputs of one command never coincide or nest; `--force` replaces only a regular file or a folder
that looks like an earlier output of the same kind of command, never a link, a device, a FIFO or
a folder holding anything else; one run at a time writes a given output (a lock beside it, see
claims.py); the new output is swapped in by one rename, so the path holds the old or the new output,
never neither or a mix; temporaries carry their owner's pid and a later run removes those of dead
runs. INPUTS and OUTPUTS are this process's record of what a command read and what it started to
write (the CLI clears them per command and names OUTPUTS on an interrupt).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, Required, TypedDict, Unpack

from loratool.errors import FormatError, IncompatibleError, LoratoolError, LoratoolWarning, OutputExistsError
from loratool.io.claims import _PID_MAX, _RENAME_EXCHANGE, _RENAME_NOREPLACE, _alive, _Claim, _renameat2
from loratool.io.header import _kind_of, _strerror, read_header
from loratool.io.paths import _inside

# What a folder written by each kind of command may hold (anything else: --force refuses it).
OUTPUT_KINDS = ("adapter", "model", "download")
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "adapters.safetensors", "README.md"})
MODEL_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken", ".jinja", ".md", ".py", ".vocab",
                  ".spm", ".bpe")
DOWNLOAD_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".model", ".tiktoken", ".jinja", ".bin", ".pt",
                     ".pth", ".ckpt")
_NAME_MAX = 255


@dataclass
class OutputState:
    """What happened to one output path in this process (for an honest message on interrupt)."""

    path: Path
    existed: bool
    written: bool = False

    def describe(self) -> str:
        if self.written:
            return f"{self.path} was written"
        return f"{self.path} was not written" + (" (the previous one is unchanged)" if self.existed else "")


OUTPUTS: list[OutputState] = []  # every output this process started, in order


def output_states() -> list[str]:
    """One phrase per output this process started: written, or not (and whether an old one is intact)."""
    return [o.describe() for o in OUTPUTS]


INPUTS: list[str] = []  # every path the running command reads (the CLI records its path arguments here)


def note_inputs(paths: Iterable[str | os.PathLike[str] | None]) -> None:
    """Record paths this process's command reads: every later check_output refuses to write them,
    inside them or around them, whatever `inputs` its caller passed. loratool.cli records every
    path parameter of the command (and each hf:// input's local copy) before the command runs;
    it clears the list when the command is over."""
    INPUTS.extend(os.fspath(p) for p in paths if p is not None and os.fspath(p) != "")


def check_output(
    out: str | os.PathLike[str],
    *,
    force: bool,
    directory: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    others: Iterable[str | os.PathLike[str]] = (),
    kind: str | None = None,
) -> None:
    """Refuse an output path that would destroy what is not ours.

    Args:
        force: an existing `out` may be replaced, if it is a regular file (file outputs) or a folder
            that looks like an earlier output of this `kind` (folder outputs).
        directory: the output is a folder.
        inputs: the command's inputs (files or folders): `out` may be none of them, nor inside nor
            around one. The paths in INPUTS (note_inputs: every path the CLI command was given)
            count too.
        others: the command's other outputs: `out` must differ from each and not nest with it.
        kind: for folder outputs, "adapter" (PEFT), "model" (merge) or "download" (pull).

    Raises:
        OutputExistsError: `out` exists (and force is False, or it is not ours to replace).
        IncompatibleError: `out` collides with an input or another output, or is the current
            folder, one above it or the root.
        LoratoolError: the name is longer than the filesystem allows.
    """
    shown = Path(out)
    target = Path(os.path.abspath(out))
    _check_place(shown, target)
    _check_collisions(shown, target, [*inputs, *INPUTS], others)
    if not target.parent.is_dir():
        raise FormatError(f"{shown}: parent directory {shown.parent} does not exist")
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as e:
        raise LoratoolError(f"{shown}: cannot look at it ({_strerror(e)})") from None
    reason = _not_replaceable(target, info, directory=directory, kind=kind)
    if not force:
        raise OutputExistsError(
            f"{shown}: already exists" + (f" ({reason})" if reason else ""),
            hint="pass --force to replace it" if reason is None else "write elsewhere with -o; --force would "
            "not replace it either",
        )
    if reason:
        raise OutputExistsError(
            f"{shown}: refusing to replace it: {reason}",
            hint="--force replaces only a regular file or an earlier output of this command; "
            "remove it yourself or write elsewhere with -o",
        )


def _check_place(shown: Path, target: Path) -> None:
    if target == Path(target.anchor):
        raise IncompatibleError(f"{shown}: is the root folder; refusing to write there",
                                hint="write to a new path with -o")
    real = os.path.realpath(target)
    cwd = os.path.realpath(os.getcwd())
    if _inside(cwd, real):
        what = "the current folder" if cwd == real else "a folder above the current one"
        raise IncompatibleError(f"{shown}: is {what}; refusing to write there", hint="write to a new path with -o")
    name_max = _NAME_MAX
    with contextlib.suppress(OSError, ValueError):
        name_max = os.pathconf(target.parent, "PC_NAME_MAX")
    if len(os.fsencode(target.name)) > name_max:
        raise LoratoolError(f"{shown}: the name is {len(os.fsencode(target.name))} bytes long; the filesystem "
                            f"allows at most {name_max}", hint="choose a shorter output name")


def _forms(p: str | os.PathLike[str]) -> set[str]:
    return {os.path.abspath(p), os.path.realpath(p)}


def _check_collisions(shown: Path, target: Path, inputs: Iterable[str | os.PathLike[str]],
                      others: Iterable[str | os.PathLike[str]]) -> None:
    mine = _forms(target)
    inputs = list(inputs)
    for inp in inputs:
        if mine & _forms(inp):
            raise IncompatibleError(f"{shown}: is an input of this command ({inp}); refusing to write it",
                                    hint="write to a new path with -o")
    for inp in inputs:
        for t in mine:
            for i in _forms(inp):
                if _inside(i, t):
                    raise IncompatibleError(f"{shown}: contains an input of this command ({inp}); refusing to "
                                            "write it", hint="write to a new path with -o")
                if _inside(t, i):
                    raise IncompatibleError(f"{shown}: is inside an input of this command ({inp}); refusing to "
                                            "write there", hint="write to a path outside the inputs with -o")
    for other in others:
        if any(_inside(t, o) or _inside(o, t) for t in mine for o in _forms(other)):
            raise IncompatibleError(f"{shown} and {other}: two outputs of one command must be different paths, "
                                    "neither inside the other", hint="choose separate paths")


def _not_replaceable(target: Path, info: os.stat_result, *, directory: bool, kind: str | None) -> str | None:
    """Why --force must not replace what is at target, or None when it may."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return f"it is a symbolic link (to {os.readlink(target)})"
    if stat.S_ISREG(mode):
        return "it is a file and the output is a directory" if directory else None
    if not stat.S_ISDIR(mode):
        return f"it is {_kind_of(mode)}"
    if not directory:
        return "it is a directory and the output is a file"
    return _foreign_contents(target, kind)


def _foreign_contents(folder: Path, kind: str | None) -> str | None:
    """What in `folder` is not part of an earlier output of `kind`, or None.

    An adapter or model folder is ours only when its weights (at least one .safetensors) carry
    loratool's provenance (`loratool.op`): a folder of config, code or docs alone is not replaced.
    An empty folder may be."""
    links: list[str] = []
    specials: list[str] = []
    foreign: list[str] = []
    not_ours: list[str] = []
    ours: list[str] = []
    others: list[str] = []
    stack = [folder]
    try:
        while stack:
            here = stack.pop()
            for entry in os.scandir(here):
                rel = os.path.relpath(entry.path, folder)
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    links.append(rel)
                elif stat.S_ISDIR(mode):
                    if kind == "adapter":
                        foreign.append(rel + "/")
                    else:
                        stack.append(Path(entry.path))
                elif not stat.S_ISREG(mode):
                    specials.append(rel)
                elif not _belongs(Path(entry.path), kind):
                    foreign.append(rel)
                elif kind in ("adapter", "model") and entry.name.endswith(".safetensors"):
                    (ours if _written_by_loratool(entry.path) else not_ours).append(rel)
                else:
                    others.append(rel)
    except OSError as e:
        return f"its contents cannot be listed ({_strerror(e)})"

    def some(names: list[str]) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")

    if links:
        return f"the folder holds symbolic links ({some(links)})"
    if specials:
        return f"the folder holds special files ({some(specials)})"
    if foreign:
        what = {"adapter": "adapter files", "model": "model files", "download": "downloaded files"}.get(
            kind or "", "files loratool writes")
        return f"the folder holds files other than {what} ({some(foreign)})"
    if not_ours:
        return f"the folder holds weights loratool did not write ({some(not_ours)})"
    if kind in ("adapter", "model") and others and not ours:  # config, code, docs: no earlier output of ours
        return f"the folder holds no weights loratool wrote, only {some(others)}"
    return None


def _belongs(path: Path, kind: str | None) -> bool:
    name = path.name
    if name.startswith("."):
        return False
    if kind == "adapter":
        return name in ADAPTER_FILES
    if kind == "model":
        return name.endswith(MODEL_SUFFIXES)
    if kind == "download":
        return name.endswith(DOWNLOAD_SUFFIXES)
    return False


def _written_by_loratool(path: str) -> bool:
    try:
        return "loratool.op" in read_header(path).metadata
    except LoratoolError:
        return False


def _in_temporary(p: Path, tmp: Path) -> bool:
    try:
        return p.resolve() == tmp.resolve() or tmp.resolve() in p.resolve().parents
    except OSError:
        return True


class OutputChecks(TypedDict):
    """What check_output is told about an output (atomic_output passes it on): force, whether it is
    a directory, the run's inputs and other outputs it must not be, and what it is (for messages)."""

    force: Required[bool]
    directory: Required[bool]
    inputs: NotRequired[Iterable[str | os.PathLike[str]]]
    others: NotRequired[Iterable[str | os.PathLike[str]]]
    kind: NotRequired[str | None]


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str], **checks: Unpack[OutputChecks]) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; move it into place only when the block completes.

    The output is checked (check_output), then claimed: a lock file beside it, held for the whole
    run, makes a second run to the same path fail at once (exit 2) instead of racing. Temporaries of
    earlier runs that died (their pid is in the name) are removed, with a LoratoolWarning. The
    temporary is moved into place by one rename that refuses an existing path (renameat2
    RENAME_NOREPLACE), or with force swaps with the old output (RENAME_EXCHANGE) and then removes it;
    SIGINT/SIGTERM arriving during that step are held until it is over. A crash, an exception or an
    interrupt leaves either no output or the previous one, never a half-written one. The caller
    re-opens/validates the temporary inside the block.

    Raises:
        OutputExistsError: `out` exists and force is False or it is not replaceable, or another run
            is writing it. IncompatibleError: see check_output. LoratoolError: the folder cannot be
            written (read-only, permission, disk full).
    """
    check_output(out, **checks)
    force, directory, kind = checks["force"], checks["directory"], checks.get("kind")
    shown = Path(out)
    target = Path(os.path.abspath(out))
    parent = target.parent
    stem = _stem(target.name)
    state = OutputState(shown, os.path.lexists(target))
    OUTPUTS.append(state)
    with _Claim(parent, stem, shown):
        _remove_stale(parent, stem, shown, target)
        check_output(out, force=force, directory=directory, kind=kind)  # another run may have finished meanwhile
        state.existed = os.path.lexists(target)
        tmp = _make_temp(parent, stem, directory=directory, shown=shown)
        try:
            try:
                yield tmp
            except OSError as e:
                if e.errno in _USER_OS_ERRORS:
                    where = e.filename or tmp
                    if e.filename and not _in_temporary(Path(os.fsdecode(e.filename)), tmp):
                        # not the output: an input (or another file) could not be read
                        raise LoratoolError(f"{e.filename}: {_strerror(e)} (reading it); nothing was written to "
                                            f"{shown}") from None
                    raise LoratoolError(
                        f"{shown}: {_strerror(e)} while writing ({where}); nothing was written to {shown}"
                        + (" (the previous one is unchanged)" if state.existed else ""),
                        hint="free some space or write elsewhere with -o" if e.errno in _FULL else None,
                    ) from None
                raise
            os.chmod(tmp, 0o755 if directory else 0o644)
            with _signals_held():
                _commit(tmp, target, shown, force=force, directory=directory, kind=kind)
                state.written = True
        except BaseException:
            _remove(tmp)
            raise


def _stem(name: str) -> str:
    """The name temporaries and the lock are derived from (hashed when the name is long)."""
    raw = os.fsencode(name)
    return name if len(raw) <= 200 else hashlib.sha256(raw).hexdigest()[:32]


def _make_temp(parent: Path, stem: str, *, directory: bool, shown: Path) -> Path:
    tmp = parent / f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if directory:
            os.mkdir(tmp, 0o700)
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise LoratoolError(f"{shown}: cannot write in {shown.parent} ({_strerror(e)}); nothing was written",
                            hint="write elsewhere with -o") from None
    return tmp


def _commit(tmp: Path, target: Path, shown: Path, *, force: bool, directory: bool, kind: str | None) -> None:
    """Move tmp to target in one step; an existing target is replaced only with force (and if ours)."""
    if not os.path.lexists(target):
        if _renameat2(tmp, target, _RENAME_NOREPLACE):
            return
        if not directory:
            os.link(tmp, target)  # fails with EEXIST rather than replace what appeared meanwhile
            os.unlink(tmp)
            return
        os.rename(tmp, target)  # a folder renames only onto nothing or an empty folder
        return
    if not force:
        raise OutputExistsError(f"{shown}: appeared while this run was writing it; not replaced",
                                hint="pass --force to replace it")
    reason = _not_replaceable(target, os.lstat(target), directory=directory, kind=kind)
    if reason:
        raise OutputExistsError(f"{shown}: refusing to replace it: {reason}")
    if not directory:
        os.replace(tmp, target)  # atomic for files
        return
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        _remove(tmp)  # tmp now holds the old output
        return
    old = target.parent / f".{_stem(target.name)}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)  # no exchange on this system: a moment with no output, the old one in `old`
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # only this run may put its `old` back (another run never does: _remove_stale)
        raise
    _remove(old)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the output is being swapped; deliver them once it is done."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, Any] = {}
    for sig in (int(signal.SIGINT), int(signal.SIGTERM)):
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:
            continue  # installed outside Python or ignored: nothing to hold
        saved[sig] = handler
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if pending:
            handler = saved[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            else:
                os.kill(os.getpid(), pending[0])  # the default action, now that the output is whole


def _remove_stale(parent: Path, stem: str, shown: Path, target: Path) -> None:
    """Remove temporaries that runs which died left for this output (never a live run's), and say so.

    A dead run's `.old-` folder (the previous output, moved aside on a system without
    RENAME_EXCHANGE) is never renamed into place nor removed by another run: it is named in a
    warning and left to the user. A name whose pid no process can have was made by no run and is
    left alone.
    """
    import warnings

    pattern = re.compile(rf"\.{re.escape(stem)}\.(tmp|old)-(\d{{1,10}})-[0-9a-f]+")
    removed: list[str] = []
    kept: list[str] = []
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        pid = int(m[2])
        if not 0 < pid <= _PID_MAX or pid == os.getpid() or _alive(pid):
            continue
        if m[1] == "old":
            kept.append(entry.name)
            continue
        _remove(Path(entry.path))
        removed.append(f"{entry.name} (pid {pid})")
    if removed:
        warnings.warn(f"{shown}: removed {len(removed)} temporary file(s) left by earlier runs that did not finish: "
                      + ", ".join(removed), LoratoolWarning, stacklevel=4)
    for name in kept:
        warnings.warn(f"{shown}: {parent / name} holds an earlier output that a run which did not finish moved "
                      f"aside; left as it is (rename it to {shown} to get it back, or remove it)",
                      LoratoolWarning, stacklevel=4)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_USER_OS_ERRORS = (*_FULL, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENAMETOOLONG)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
