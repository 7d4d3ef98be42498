"""Claims: one run at a time writes a given output, by a lock file beside it that holds the owner's pid.

_Claim makes its lock as a private temporary, writes the pid, takes flock(2) on it and moves it to
`.NAME.lock` by a rename that refuses an existing name (renameat2 RENAME_NOREPLACE, or link(2)); a lock
found in place is judged without being written to: held by a live run, not a loratool lock at all, or
left by a dead run (then removed and the claim tried again). The renameat2 wrapper and the pid checks
are shared with outputs.py, which swaps a finished output into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError, OutputExistsError
from loratool.io.header import _kind_of, _strerror
from loratool.io.writers import _write_all

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2_fn: Any = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2) with flags; False where the system or filesystem does not offer it."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            import ctypes

            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2_fn = fn
    if not _renameat2_fn:
        return False
    import ctypes

    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


class _Claim:
    """An exclusive lock file beside the output (`.NAME.lock`, holding the owner's pid).

    A lock in place is never opened for writing: the new one is made as a private temporary
    (O_CREAT|O_EXCL|O_NOFOLLOW), given the pid, locked with flock(2), and only then moved to the
    lock's name by a rename that refuses an existing path (or link(2), which refuses one too).
    A lock found in place is judged without writing to it: a symbolic link, a special file, a file
    with other hard links or one that holds no pid is no loratool lock and is refused (exit 2,
    nothing touched); a flock held on it means a live run (exit 2); otherwise its run died and its
    name is removed and the claim tried again. Where flock is unavailable the recorded pid decides.
    """

    def __init__(self, parent: Path, stem: str, shown: Path) -> None:
        self.parent = parent
        self.stem = stem
        self.path = parent / f".{stem}.lock"
        self.shown = shown
        self.fd: int | None = None

    def __enter__(self) -> _Claim:
        for _ in range(20):
            fd, tmp = self._new_lock()
            placed = self._place(tmp, fd)
            if placed is not None:
                self.fd = placed
                return self
            self._judge()  # raises for a live run or a lock that is not ours; returns once a dead run's is gone
        raise self._busy(None)

    def _new_lock(self) -> tuple[int, Path]:
        tmp = self.parent / f".{self.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise LoratoolError(f"{self.shown}: cannot write in {self.shown.parent} ({_strerror(e)}); nothing "
                                "was written", hint="write elsewhere with -o") from None
        try:
            _write_all(fd, f"{os.getpid()}\n".encode())
            try:
                fcntl_flock(fd)
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise  # without flock the file alone is the lock: its pid decides (_judge)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp

    def _place(self, tmp: Path, fd: int) -> int | None:
        """Move the new lock (fd, at tmp) to its name and return the lock's fd, or None when a lock
        is there (it is not touched). fd is closed and tmp removed whenever fd is not returned."""
        ours: int | None = fd
        try:
            try:
                if _renameat2(tmp, self.path, _RENAME_NOREPLACE):
                    ours = None
                    return fd
                os.link(tmp, self.path, follow_symlinks=False)  # no renameat2 here: link(2) refuses a name too
            except FileExistsError:
                return None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                    raise
                os.close(fd)  # no hard links on this filesystem: create the lock by name, exclusively
                ours = None
                return self._create_in_place()
            ours = None
            return fd
        except OSError as e:
            raise LoratoolError(f"{self.shown}: cannot write in {self.shown.parent} ({_strerror(e)}); nothing "
                                "was written", hint="write elsewhere with -o") from None
        finally:
            if ours is not None:
                os.close(ours)
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # after a rename there is nothing left to remove

    def _create_in_place(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return None
        with contextlib.suppress(OSError):
            fcntl_flock(fd)
        _write_all(fd, f"{os.getpid()}\n".encode())
        return fd

    def _judge(self) -> None:
        """A lock is in place: raise if a live run holds it or it is no loratool lock; else remove it."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return  # its run finished meanwhile
        reason = None
        if stat.S_ISLNK(info.st_mode):
            reason = "it is a symbolic link"
        elif not stat.S_ISREG(info.st_mode):
            reason = f"it is {_kind_of(info.st_mode)}"
        elif info.st_nlink != 1:
            reason = f"it has {info.st_nlink} hard links"
        if reason is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            except OSError as e:
                raise LoratoolError(f"{self.path}: cannot read the lock ({_strerror(e)}); nothing was written to "
                                    f"{self.shown}") from None
            try:
                now = os.fstat(fd)
                if (now.st_ino, now.st_dev) != (info.st_ino, info.st_dev):
                    return  # replaced meanwhile: judge again
                raw = os.pread(fd, 64, 0)
                m = re.fullmatch(rb"(\d{1,10})\n?", raw)
                owner = int(m[1]) if m else None
                if raw and owner is None:
                    reason = "it holds no process id"
                else:
                    try:
                        fcntl_flock(fd)
                    except BlockingIOError:
                        raise self._busy(owner) from None
                    except OSError as e:
                        if e.errno not in _NO_FLOCK:
                            raise
                        if owner is not None and _alive(owner):
                            raise self._busy(owner) from None
                    # its run is over: remove the name while holding its lock, if it is still this file
                    again = os.stat(self.path, follow_symlinks=False)
                    if (again.st_ino, again.st_dev) == (info.st_ino, info.st_dev):
                        os.unlink(self.path)
                    return
            except FileNotFoundError:
                return
            finally:
                os.close(fd)
        raise OutputExistsError(f"{self.path}: is not a lock loratool made ({reason}); nothing was written to "
                                f"{self.shown}", hint=f"remove {self.path} yourself, or write elsewhere with -o")

    def _busy(self, owner: int | None) -> OutputExistsError:
        who = f"pid {owner}" if owner else "another process"
        return OutputExistsError(f"{self.shown}: another loratool run ({who}) is writing it; not touched",
                                 hint="wait for that run to finish, or write elsewhere with -o")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                mine = os.fstat(self.fd)
                now = os.stat(self.path, follow_symlinks=False)
                if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                    os.unlink(self.path)  # while still holding the lock
            os.close(self.fd)
            self.fd = None


_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def fcntl_flock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).split()[0])
    return None


_PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT; other systems stay below it too


def _alive(pid: int) -> bool:
    if not 0 < pid <= _PID_MAX:
        return False  # no process has this id (and 0 or -1 would ask about whole process groups)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
