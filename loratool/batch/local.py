"""The local executor: N worker processes, started once, each running items one at a time.

Workers come from a forkserver (spawn where there is none) that has imported torch and the runner's
module once; a worker lives for the whole run, so Python and torch start once per worker, not once
per item. The parent hands each idle worker the next task over a pipe and waits on all pipes at once.

Bounds per item:
- time: a worker still busy `timeout` seconds after it took a task is killed (SIGKILL: a command
  stuck inside torch's C++ does not answer anything gentler), the item is reported as `timeout`, and
  a fresh worker takes its place;
- memory (where the OS has RLIMIT_AS, i.e. Linux and the BSDs): each worker's address space is
  limited to `memory` bytes, so an item that asks for more gets a MemoryError (the command's exit 3)
  or dies; either way it alone fails and its worker is replaced.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from loratool.batch.items import Outcome, Task, apply_settings

Runner = Callable[[list[str], str], tuple[int, str, str]]


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        return ctx
    return multiprocessing.get_context("spawn")


def limit_memory(memory: int | None) -> None:
    """Lower this process's soft RLIMIT_AS to `memory` bytes (no-op where the OS has none)."""
    if not memory:
        return
    try:
        import resource
    except ImportError:  # Windows
        return
    with contextlib.suppress(ValueError, OSError, AttributeError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (memory if hard == resource.RLIM_INFINITY else min(memory, hard), hard))


def _worker(runner_ref: tuple[str, str], conn: Connection, memory: int | None, threads: int) -> None:
    """A worker's loop: receive a Task, run it, send back its Outcome; None ends the loop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    runner: Runner = getattr(importlib.import_module(runner_ref[0]), runner_ref[1])
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(threads)  # N workers share the cores instead of each taking them all
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        t0 = time.perf_counter()
        limit_memory(memory)
        apply_settings(task.env)
        code, out, err = runner(task.argv, task.cwd)
        conn.send(Outcome(task.index, code, out, err, time.perf_counter() - t0))


class _Slot:
    def __init__(self, ctx: Any, runner_ref: tuple[str, str], memory: int | None, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(runner_ref, child, memory, threads), daemon=True,
                                name="loratool-batch-worker")
        self.proc.start()
        child.close()
        self.task: Task | None = None
        self.started = 0.0
        self.ready = False

    def stop(self, kill: bool = False) -> None:
        if kill:
            with contextlib.suppress(Exception):
                self.proc.kill()
        else:
            with contextlib.suppress(Exception):
                self.conn.send(None)
        self.proc.join(timeout=5 if not kill else None)
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.proc.kill()
            self.proc.join()
        with contextlib.suppress(Exception):
            self.conn.close()


def run_local(tasks: list[Task], runner: Runner, *, jobs: int = 1, timeout: float | None = None,
              memory: int | None = None) -> Iterator[Outcome]:
    """Run every task on `jobs` worker processes and yield each Outcome as it finishes (in finishing order).

    Args:
        runner: a module-level function (workers import it by name) running one task's argv.
        timeout: seconds one item may take (None: no bound); memory: bytes of address space per worker.
    """
    if not tasks:
        return
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        # imported once in the server, shared by every worker it forks (and by a replacement after a timeout)
        ctx.set_forkserver_preload([runner.__module__, "torch"])
    runner_ref = (runner.__module__, runner.__name__)
    jobs = max(1, min(jobs, len(tasks)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending = deque(tasks)
    slots = [_Slot(ctx, runner_ref, memory, threads) for _ in range(jobs)]
    try:
        while pending or any(s.task is not None for s in slots):
            for s in slots:
                if s.ready and s.task is None and pending:
                    s.task = pending.popleft()
                    s.started = time.monotonic()
                    s.conn.send(s.task)
            busy = [s for s in slots if s.task is not None]
            deadline = min((s.started + timeout for s in busy), default=None) if timeout else None
            wait_for = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([s.conn for s in slots], timeout=wait_for)
            for i, s in enumerate(slots):
                if s.conn in ready:
                    try:
                        msg = s.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg == "ready":
                        s.ready = True
                        continue
                    if isinstance(msg, Outcome):
                        task, s.task = s.task, None
                        oom = msg.code == 3 and "MemoryError" in msg.stderr
                        if oom:  # the command's exit 3 says "internal error"; this is the bound at work
                            bound = f" within --max-memory {memory >> 20} MB" if memory else ""
                            msg.status = "failed"
                            msg.detail = f"ran out of memory (MemoryError){bound}; its worker was replaced"
                            slots[i] = _replace(s, ctx, runner_ref, memory, threads)
                        yield msg
                        continue
                    # the worker died: a signal, the OOM killer, or a crash inside a C extension
                    task, code = s.task, s.proc.exitcode
                    s.proc.join(timeout=5)
                    code = s.proc.exitcode if code is None else code
                    slots[i] = _replace(s, ctx, runner_ref, memory, threads, kill=True)
                    if task is not None:
                        yield Outcome(task.index, 3, "", "", time.monotonic() - s.started, "crashed",
                                      f"the worker running it died ({_death(code)})")
                    elif not s.ready:
                        raise RuntimeError(f"a batch worker could not start ({_death(code)})")
            if timeout:
                now = time.monotonic()
                for i, s in enumerate(slots):
                    if s.task is not None and now - s.started > timeout:
                        task = s.task
                        slots[i] = _replace(s, ctx, runner_ref, memory, threads, kill=True)
                        yield Outcome(task.index, 2, "", "", now - s.started, "timeout",
                                      f"took longer than {timeout:g} s; its worker was stopped")
    finally:
        for s in slots:
            s.stop(kill=s.task is not None)


def _replace(slot: _Slot, ctx: Any, runner_ref: tuple[str, str], memory: int | None, threads: int,
             kill: bool = True) -> _Slot:
    slot.task = None
    slot.stop(kill=kill)
    return _Slot(ctx, runner_ref, memory, threads)


def _death(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
