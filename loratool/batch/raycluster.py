"""The Ray executor: each item is one Ray task on an existing cluster (optional extra loratool[ray]).

The task runs the same runner as the local executor's workers (the single command, in-process),
so the NDJSON lines and the ledger are the same. Ray reuses its worker processes, so Python and torch
start once per worker, not once per item. At most `jobs` tasks are in flight; a task still running
`timeout` seconds after it was submitted is cancelled with force (its worker process is killed) and
reported as `timeout`. `memory` lowers the worker's RLIMIT_AS while the item runs and is also given
to Ray's scheduler as the task's memory request.

Paths are passed as the driver sees them (absolute), and the task changes to the driver's working
directory first: on a multi-node cluster, inputs and --out-dir must be on a filesystem every node
mounts at the same path.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from loratool.batch.items import Outcome, Task
from loratool.errors import IncompatibleError, optional_module

Runner = Callable[[list[str], str], tuple[int, str, str]]


def _run_task(runner: Runner, task: Task, memory: int | None) -> Outcome:
    """Body of one Ray task (module level, so Ray pickles it by reference)."""
    from loratool.batch.items import apply_settings
    from loratool.batch.local import limit_memory

    saved = None
    if memory:
        with contextlib.suppress(ImportError, ValueError, OSError):
            import resource

            saved = resource.getrlimit(resource.RLIMIT_AS)
        limit_memory(memory)
    apply_settings(task.env)
    t0 = time.perf_counter()
    try:
        code, out, err = runner(task.argv, task.cwd)
    finally:
        if saved is not None:  # the worker process outlives the item: give the next one its full space
            import resource

            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_AS, saved)
    return Outcome(task.index, code, out, err, time.perf_counter() - t0)


def _ray() -> Any:
    return optional_module("ray", needed_by="--executor ray", extra="ray", error=IncompatibleError)


def run_ray(tasks: list[Task], runner: Runner, *, jobs: int = 1, timeout: float | None = None,
            memory: int | None = None, address: str | None = None) -> Iterator[Outcome]:
    """Run the tasks as Ray tasks, `jobs` at a time, and yield each Outcome as it finishes.

    Args:
        address: the cluster (`ray://HOST:10001`, `HOST:6379`, or None: RAY_ADDRESS, else a running local
            cluster); never starts a cluster of its own.

    Raises:
        IncompatibleError: Ray is missing, or no cluster answers at `address`.
    """
    if not tasks:
        return
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address or "auto", log_to_driver=False, logging_level="ERROR",
                     include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise IncompatibleError(f"--executor ray: cannot join the Ray cluster at {address or 'auto'} "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                                    hint="start one with `ray start --head`, or give --address HOST:PORT") from None
    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0}
    if memory:
        options["memory"] = memory
    remote = ray.remote(**options)(_run_task)
    runner_ref = ray.put(runner)
    pending = list(tasks)
    in_flight: dict[Any, tuple[Task, float]] = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < jobs:
                task = pending.pop(0)
                in_flight[remote.remote(runner_ref, task, memory)] = (task, time.monotonic())
            wait_for = None
            if timeout:
                first = min(t for _, t in in_flight.values())
                wait_for = max(0.0, first + timeout - time.monotonic())
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_for)
            for ref in done:
                task, started = in_flight.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as e:  # the task's worker died, or Ray could not run it at all
                    reason = str(e).splitlines()[0] if str(e) else ""
                    yield Outcome(task.index, 3, "", "", time.monotonic() - started, "crashed",
                                  f"the Ray task failed ({type(e).__name__}: {reason})")
            if timeout:
                now = time.monotonic()
                for ref, (task, started) in list(in_flight.items()):
                    if now - started > timeout:
                        with contextlib.suppress(Exception):
                            ray.cancel(ref, force=True)
                        del in_flight[ref]
                        yield Outcome(task.index, 2, "", "", now - started, "timeout",
                                      f"took longer than {timeout:g} s; its Ray task was cancelled")
    finally:
        for ref in in_flight:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
