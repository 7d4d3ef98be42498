"""Copies and checksums: a folder's files and single input files copied into an output, and sha256.

copy_tree_files walks an input folder without following a link out of it; copy_input_file copies one
input through the guarded open, replacing a Hub token it finds by ***; sha256_file and
BackgroundSha256 hash inputs (the latter on a thread, overlapped with the work that reads them).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from loratool.errors import FormatError, LoratoolWarning, known_secrets, scrub_bytes
from loratool.io.header import _kind_of, _strerror, open_input
from loratool.io.paths import _LINK_HINT, leads_out


def copy_tree_files(root: Path, *, refuse_links_out: bool = False) -> Iterator[tuple[Path, Path]]:
    """(file, its path relative to root) for every file under root to copy, links inside root followed.

    Hidden entries (.git, .cache, loratool's own temporaries) are skipped. A file or folder that
    resolves outside root (a symbolic link to /proc/self/environ, /dev/..., another folder; see
    leads_out) is never read: it is skipped, and one LoratoolWarning names what was skipped once the
    walk is done (with refuse_links_out, e.g. for an upload, it raises instead). Nothing else is
    skipped silently: an unreadable folder, a special file (FIFO, device, socket), a broken link
    inside root or a link loop raises.

    Raises:
        FormatError: naming the entry.
    """
    import warnings

    skipped: list[str] = []

    def walk(folder: Path, rel: Path, chain: tuple[str, ...]) -> Iterator[tuple[Path, Path]]:
        real = os.path.realpath(folder)
        if real in chain:
            raise FormatError(f"{folder}: symbolic link loop (leads back to {real})")
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise FormatError(f"{folder}: cannot list this folder ({_strerror(e)}); its files would be missing "
                              "from the output", hint="make it readable, or remove it from the input") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink() and not os.path.exists(path):
                raise FormatError(f"{path}: broken symbolic link (to {os.readlink(path)})",
                                  hint="fix or remove the link")
            out = leads_out(path, root)
            if out is not None:
                if refuse_links_out:
                    raise FormatError(f"{path}: is a symbolic link leading out of the input folder {root} (to "
                                      f"{out}); refusing to read it", hint=_LINK_HINT)
                skipped.append(f"{rel / entry.name} (to {out})")
                continue
            try:
                mode = os.stat(path).st_mode  # through links (inside root)
            except FileNotFoundError:
                raise FormatError(f"{path}: broken symbolic link (to {os.readlink(path)})",
                                  hint="fix or remove the link") from None
            except OSError as e:
                raise FormatError(f"{path}: cannot read ({_strerror(e)})") from None
            if stat.S_ISDIR(mode):
                yield from walk(path, rel / entry.name, (*chain, real))
            elif stat.S_ISREG(mode):
                yield path, rel / entry.name
            else:
                raise FormatError(f"{path}: is {_kind_of(mode)}; refusing to copy it",
                                  hint="remove it from the input folder")

    yield from walk(root, Path(), ())
    if skipped:
        warnings.warn(f"{root}: not copied: {len(skipped)} symbolic link(s) leading out of the input folder "
                      f"(loratool never follows them): {', '.join(skipped[:5])}"
                      + (f", ... ({len(skipped)} in all)" if len(skipped) > 5 else ""),
                      LoratoolWarning, stacklevel=2)


def copy_input_file(src: Path, dst: Path) -> None:
    """Copy a regular file (through links) to a new file `dst`, keeping its mode and times.

    A known Hub token in the bytes (errors.known_secrets) is written as *** (with a warning): no output
    carries the token, even when an input did.

    Raises:
        FormatError: src cannot be read (naming it); OSError from writing dst.
    """
    import warnings

    try:
        fin = open_input(src)
    except OSError as e:
        raise FormatError(f"{src}: cannot read ({_strerror(e)}); it would be missing from the output") from None
    keep = max((len(s.encode("utf-8", "surrogatepass")) for s in known_secrets()), default=1) - 1
    carry = b""
    scrubbed = False
    with fin, open(dst, "xb") as fout:
        while True:
            try:
                chunk = fin.read(_COPY_CHUNK)
            except OSError as e:
                raise FormatError(f"{src}: cannot read ({_strerror(e)})") from None
            data = carry + chunk
            clean = scrub_bytes(data)
            scrubbed = scrubbed or clean != data
            if not chunk:
                fout.write(clean)
                break
            # a token may begin in the last `keep` bytes and end in the next chunk: hold them back
            cut = max(len(clean) - keep, 0)
            fout.write(clean[:cut])
            carry = clean[cut:]
    with contextlib.suppress(OSError):
        shutil.copystat(src, dst)
    if scrubbed:
        warnings.warn(f"{src}: holds a Hub token; the copy in the output has it replaced by ***", LoratoolWarning,
                      stacklevel=2)


_COPY_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_lead(floor: int = 1 << 30) -> int:
    """How far a second reader of the same files may run ahead of the first and still find the bytes in the
    page cache: a quarter of the memory the kernel says is available (Linux /proc/meminfo), `floor` at least
    (and where that cannot be read)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return max(floor, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError, IndexError):
        pass
    return floor


class BackgroundSha256:
    """sha256 of whole files, computed in a daemon thread while other work goes on (provenance).

    With `lead`, the thread stays at most that many bytes ahead of what the caller reports as
    consumed (`advance`), so a file read by both is still in the page cache the second time and
    the disk is read once. `stop` ends it between chunks: an error or Ctrl-C never waits for the
    rest of a large checkpoint to be hashed.
    """

    def __init__(self, paths: list[Path], *, lead: int | None = None) -> None:
        import threading
        from concurrent.futures import Future

        self.paths = list(paths)
        self.digests: list[Future[str]] = [Future() for _ in self.paths]
        # every file is opened now, so what is hashed is what the caller opened next to it, whenever the
        # thread gets there (a file removed or replaced meanwhile is still the one that was named)
        self._files: list[io.FileIO] = []
        try:
            for path in self.paths:
                self._files.append(open(path, "rb", buffering=0))  # noqa: SIM115 (closed by _run)
        except OSError as e:
            for f in self._files:
                f.close()
            raise FormatError(f"{path}: cannot read it to compute its sha256 ({_strerror(e)})") from None
        self._allowed = math.inf if lead is None else lead
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="loratool-sha256", daemon=True)
        self._thread.start()

    def advance(self, nbytes: int) -> None:
        """The caller has consumed nbytes more: the hasher may run that much further."""
        with self._cond:
            self._allowed += nbytes
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def result(self) -> dict[str, str]:
        """{str(path): hex digest} once every file is hashed; re-raises a read error."""
        return {str(p): d.result() for p, d in zip(self.paths, self.digests)}

    def _run(self) -> None:
        done = 0
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        try:
            for f, digest in zip(self._files, self.digests):
                hasher = hashlib.sha256()
                with f:
                    while True:
                        with self._cond:
                            while not self._stopped and done >= self._allowed:
                                self._cond.wait()
                            if self._stopped:
                                return
                        n = f.readinto(buf)
                        if not n:
                            break
                        hasher.update(view[:n])
                        done += n
                digest.set_result(hasher.hexdigest())
        except BaseException as e:  # handed to whoever waits for a digest
            if isinstance(e, OSError):  # removed or unreadable meanwhile: the user's doing, not a bug
                e = FormatError(f"{getattr(e, 'filename', None) or 'an input file'}: cannot read it to compute "
                                f"its sha256 ({_strerror(e)})", hint="leave the inputs alone while the command runs")
            for digest in self.digests:
                if not digest.done():
                    digest.set_exception(e)
        finally:
            for f in self._files:
                f.close()  # those not reached (stopped early, or an error)
