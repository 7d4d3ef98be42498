"""Run a subprocess with a pseudo-terminal on one of its streams and collect what it writes there."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_a_terminal(run: Callable[[int], T], *, columns: int | None = None) -> tuple[T, bytes]:
    """Call run(fd) with fd the terminal side of a new pty (columns wide when given); return what
    run returned and every byte written to the terminal, read by a thread so the child never blocks."""
    master, slave = pty.openpty()
    if columns is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal closed it
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result = run(slave)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return result, b"".join(chunks)
