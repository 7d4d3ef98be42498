"""Benchmark: loratool verify of a 1.1B merge, against the merge itself (time and peak RSS).

Input: the random Llama of bench_merge.py (hidden 2048, intermediate 8192, 16 layers: about 1.1B
parameters, bf16, shards of at most 1 GB) and its peft r16 adapter on q,k,v,o,gate,up,down. Runs,
each as a whole process followed by `sync`, peak RSS from ru_maxrss: `loratool merge`, then
`loratool verify MERGED --base BASE ADAPTER` (must exit 0: every adapted tensor `merged`, the rest
`unchanged`), then verify against the bare base (must exit 1: every adapted tensor `not merged`).

Run once: python tests/perf/bench_verify.py [--layers 16] [--workdir /tmp/bench_verify] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench_merge import MAKE_SCRIPT, rss_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--workdir", default="/tmp/bench_verify")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    d = Path(args.workdir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    base, adapter, merged = d / "base", d / "adapter", d / "merged"
    params = int(subprocess.run([sys.executable, "-c", MAKE_SCRIPT, str(args.layers), str(base), str(adapter)],
                                check=True, capture_output=True, text=True).stdout.split()[-1])
    size = sum(f.stat().st_size for f in base.iterdir())
    subprocess.run(["sync"], check=True)
    lt = [sys.executable, "-m", "loratool"]
    t_merge, rss_merge = rss_of([*lt, "merge", str(base), str(adapter), "-o", str(merged), "-q"])
    t_verify, rss_verify = rss_of([*lt, "verify", str(merged), "--base", str(base), str(adapter), "-q"])
    doc = json.loads(subprocess.run([*lt, "verify", str(merged), "--base", str(base), str(adapter), "--json"],
                                    check=True, capture_output=True, text=True).stdout)
    assert doc["ok"] and set(doc["verdicts"]) == {"merged", "unchanged"}, doc["verdicts"]
    bad = subprocess.run([*lt, "verify", str(base), "--base", str(base), str(adapter), "--json"],
                         capture_output=True, text=True)
    bad_doc = json.loads(bad.stdout)
    assert bad.returncode == 1 and bad_doc["verdicts"].get("not merged") == doc["verdicts"]["merged"], bad_doc
    print(f"{args.layers} layers, {params / 1e9:.2f}B params, {size / 1e9:.2f} GB: "
          f"merge {t_merge:.1f} s, peak {rss_merge:.0f} MB | verify {t_verify:.1f} s ({t_verify / t_merge:.2f}x "
          f"merge), peak {rss_verify:.0f} MB | verdicts {doc['verdicts']}; against the bare base: "
          f"{bad_doc['verdicts']}", flush=True)
    print(f"machine: {os.cpu_count()} cpus; load average {os.getloadavg()}")
    if not args.keep:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
