"""Run many `loratool` command lines fast and bounded: one driver process imports torch and the
whole package once, then forks one child per command line (each child calls the console entry
point, loratool.cli.main, with stdout/stderr going to files), a few children at a time.

A child that runs past its wall-clock bound is killed (SIGKILL) and counted as over-bound; its
address space is capped so a runaway allocation fails inside the child (MemoryError) instead of
taking the shared machine's memory. Used by tests/hostile/test_hostile_corpus.py and
tests/perf/hostile_tally.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# A fake Hugging Face token put into every run's environment: it must appear in no output.
FAKE_TOKEN = "hf_HostileCorpusFakeTokenXq7Zr2Lm9Pw4Kd8Vn3"

MEMORY_HEADROOM = 3 << 30  # bytes of address space a child may add to what the driver has mapped


@dataclass
class Job:
    argv: list[str]
    cwd: str
    bound: float  # seconds
    code: str | None = None  # Python run instead of loratool (the harness's own tests)


@dataclass
class Result:
    code: int  # exit code; -N: killed by signal N
    stdout: str
    stderr: str
    seconds: float
    over_bound: bool


_DRIVER = r"""
import json, os, resource, signal, sys, time, traceback, importlib, pkgutil
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch, numpy, safetensors.torch, rich.table, click.testing
import loratool
for m in pkgutil.walk_packages(loratool.__path__, "loratool."):  # every lazy import done once, here
    try:
        importlib.import_module(m.name)
    except ImportError:
        pass
try:
    import gguf  # noqa
except ImportError:
    pass
from loratool.cli import main
import gc
gc.freeze()

spec = json.load(sys.stdin)
jobs, workers, outdir, headroom = spec["jobs"], spec["workers"], spec["outdir"], spec["headroom"]

def vmsize():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0

limit = vmsize() + headroom
running = {}  # pid -> (index, start)
results = [None] * len(jobs)
nxt = 0
devnull = os.open(os.devnull, os.O_RDONLY)
while nxt < len(jobs) or running:
    while nxt < len(jobs) and len(running) < workers:
        job = jobs[nxt]
        out, err = os.path.join(outdir, f"{nxt}.out"), os.path.join(outdir, f"{nxt}.err")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                os.dup2(devnull, 0)
                os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
                os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                os.chdir(job["cwd"])
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                torch.set_num_threads(1)
                try:
                    if job["code"] is not None:
                        exec(job["code"], {"argv": job["argv"]})
                    else:
                        main(job["argv"])
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    traceback.print_exc()  # as the interpreter prints an exception that escapes
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # also here: the child may not have run yet when it must be killed
        except OSError:
            pass
        running[pid] = (nxt, time.monotonic())
        nxt += 1
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid:
        i, start = running.pop(pid)
        results[i] = [os.waitstatus_to_exitcode(status), time.monotonic() - start, results[i] is not None]
        continue
    now = time.monotonic()
    for pid, (i, start) in list(running.items()):
        if now - start > jobs[i]["bound"] and results[i] is None:
            results[i] = True  # marks: killed for running past its bound
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.005)
print(json.dumps(results))
"""


def run_jobs(
    jobs: list[Job], *, workdir: Path, workers: int = 2, env: dict[str, str] | None = None, timeout: float = 1800
) -> list[Result]:
    """Run every job in a forked child of one driver process; results in the jobs' order."""
    outdir = workdir / ".runs"
    outdir.mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        "COLUMNS": "200",
        "HF_TOKEN": FAKE_TOKEN,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(workdir / ".hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **(env or {}),
    }
    full_env.pop("LORATOOL_DEBUG", None)
    spec = {
        "jobs": [{"argv": j.argv, "cwd": j.cwd, "bound": j.bound, "code": j.code} for j in jobs],
        "workers": workers,
        "outdir": str(outdir),
        "headroom": MEMORY_HEADROOM,
    }
    p = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if p.returncode != 0:
        raise RuntimeError(f"the corpus driver failed ({p.returncode}):\n{p.stderr[-4000:]}")
    raw = json.loads(p.stdout.splitlines()[-1])
    results = []
    for i, (code, seconds, over) in enumerate(raw):
        out = (outdir / f"{i}.out").read_text(errors="replace")
        err = (outdir / f"{i}.err").read_text(errors="replace")
        results.append(Result(code, out, err, seconds, over))
    return results
