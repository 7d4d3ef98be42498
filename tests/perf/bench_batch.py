"""Benchmark: `loratool batch --jobs 2 validate` over N small adapters vs one `loratool validate` process each.

Setup (not timed): N small kohya adapters (4 modules of 64×64 at rank 8, float32, about 40 KB each)
written with safetensors directly (tests/factories.py), every 50th broken (not safetensors) so the
failure path is timed too.

Timed, same machine, same run:
- batch: one process, `python -m loratool batch --jobs 2 validate DIR > out.ndjson` (interpreter
  start, the forkserver and two workers importing torch once each, all N items, the summary);
- separate: `python -m loratool validate FILE --json` once per file, as a shell loop does it, on a
  sample of --sample files spread over the folder (each one a whole new interpreter with its own
  torch import), run sequentially; the time for N files is extrapolated as N × the sample's mean.
  Running the separate processes two at a time would halve that at best (2 cores).
Check: for the sampled files, the batch line's `result` equals the separate process's document and
its status matches its exit code.

Run: python tests/perf/bench_batch.py [--n 1000] [--sample 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

MODULES = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{t}": (64, 64)
           for t in ("q", "k", "v", "out_0")}


def build(folder: Path, n: int) -> None:
    from factories import build_adapter

    folder.mkdir(parents=True)
    for i in range(n):
        name = f"lora_{i:04d}.safetensors"
        if i % 50 == 49:
            (folder / name).write_bytes(b"this upload is not a safetensors file")
        else:
            build_adapter(folder, fmt="kohya", modules=MODULES, rank=8, seed=i, name=name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        folder = tmp / "in"
        build(folder, args.n)
        env = {**os.environ, "LORATOOL_DEBUG": "0"}
        load = os.getloadavg()
        t0 = time.perf_counter()
        with open(tmp / "out.ndjson", "w") as out:
            code = subprocess.run([sys.executable, "-m", "loratool", "batch", "--jobs", str(args.jobs), "-q",
                                   "validate", str(folder)], stdout=out, env=env, cwd=ROOT).returncode
        batch_s = time.perf_counter() - t0
        lines = [json.loads(x) for x in (tmp / "out.ndjson").read_text().splitlines()]
        items = {Path(r["item"]).name: r for r in lines if r["type"] == "item"}
        summary = lines[-1]
        assert len(items) == args.n and summary["type"] == "summary", "batch did not report every item"
        assert code == 2 and summary["failed"] == args.n // 50, (code, summary)

        files = sorted(folder.iterdir())
        step = max(1, len(files) // args.sample)
        sample = files[::step][: args.sample]
        times = []
        for f in sample:
            t1 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "loratool", "validate", str(f), "--json"],
                               capture_output=True, text=True, env=env, cwd=ROOT)
            times.append(time.perf_counter() - t1)
            rec = items[f.name]
            assert rec["exit_code"] == r.returncode, (f, rec["exit_code"], r.returncode)
            if r.returncode in (0, 1):
                assert rec["result"] == json.loads(r.stdout), f
        mean = sum(times) / len(times)
        separate_s = mean * args.n
        print(f"machine: {os.cpu_count()} cores, load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
              f"after {os.getloadavg()[0]:.2f}")
        print(f"batch --jobs {args.jobs} validate over {args.n} adapters: {batch_s:.1f} s "
              f"({1000 * batch_s / args.n:.1f} ms per adapter), exit {code}, summary {summary}")
        print(f"separate `loratool validate` processes: {len(sample)} run, mean {mean:.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}); {args.n} extrapolated: {separate_s:.0f} s")
        print(f"speed-up: {separate_s / batch_s:.1f}x")
    finally:
        if args.keep:
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
