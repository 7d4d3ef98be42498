"""Run the hostile corpus (tests/hostile/corpus.py) and print its tally (issue 22, "Must show").

    python tests/perf/hostile_tally.py            # the suite's cases (what the test runs)
    python tests/perf/hostile_tally.py --all      # every input through every command (about 4,500 runs)
    python tests/perf/hostile_tally.py --all --grep gguf --show 50 --workers 2

Prints: the number of cases, exit codes, exit-3 count, traceback count, runs past their bound,
cases that changed a byte outside their -o (sha256 of every file in the case folder before and
after), and cases whose stdout, stderr or written files hold the fake HF_TOKEN put into every run's
environment; then each failing case with its command line and last stderr line, known-open ones
(tests/hostile/known_open.py) apart from new ones. Exit status 1 when a case not known to be open
fails. Each case runs in a forked child of one driver process (torch imported once), killed past
its bound.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "hostile")]

import corpus  # noqa: E402
from known_open import KNOWN_OPEN, bound_for  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every case, not only the suite's")
    ap.add_argument("--grep", default=None, help="only cases whose id contains this text")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--show", type=int, default=400, help="failing cases listed (default 400)")
    ap.add_argument("--bound", type=float, default=None, help="seconds every case may run (default: the corpus's)")
    ap.add_argument("--json", dest="json_out", default=None, help="write every outcome to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the case folders (printed)")
    args = ap.parse_args()

    cases = [c for c in corpus.build_corpus() if (args.all or c.suite) and (args.grep is None or args.grep in c.id)]
    work = Path(tempfile.mkdtemp(prefix="hostile-corpus-"))
    started = time.monotonic()
    try:
        outcomes = corpus.run_corpus(
            cases, work / "cases", workers=args.workers, bounds={c.id: args.bound or bound_for(c.id) for c in cases}
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - started

    codes = collections.Counter(o.code if not o.over_bound else "killed" for o in outcomes)
    by_command = collections.Counter(o.case.command for o in outcomes)
    print(f"cases: {len(outcomes)} ({', '.join(f'{k} {v}' for k, v in sorted(by_command.items()))})")
    by_group = collections.Counter(o.case.group for o in outcomes)
    print(f"groups: {', '.join(f'{k} {v}' for k, v in sorted(by_group.items()))}")
    print(f"exit codes: {', '.join(f'{k}: {v}' for k, v in sorted(codes.items(), key=str))}")
    print(f"exit 3: {sum(o.code == 3 and not o.over_bound for o in outcomes)}")
    print(
        f"other crashes (signal, exit not 0/1/2/3): "
        f"{sum(o.code not in (0, 1, 2, 3) and not o.over_bound for o in outcomes)}"
    )
    print(f"tracebacks: {sum(o.traceback for o in outcomes)}")
    print(f"past their bound: {sum(o.over_bound for o in outcomes)}")
    print(f"bytes changed outside -o: {sum(bool(o.changed) for o in outcomes)} cases")
    print(f"token occurrences: {sum(bool(o.leaks) for o in outcomes)} cases")
    failing = [o for o in outcomes if o.problems]
    known = [o for o in failing if o.case.id in KNOWN_OPEN]
    new = [o for o in failing if o.case.id not in KNOWN_OPEN]
    fixed = [o for o in outcomes if o.case.id in KNOWN_OPEN and not o.problems]
    print(f"failing: {len(failing)} ({len(known)} known open, {len(new)} new); known open that now pass: {len(fixed)}")
    print(f"wall time: {seconds:.1f} s with {args.workers} workers")
    shown = 0
    for title, group in (("new", new), ("known open", known)):
        for o in group:
            if shown >= args.show:
                break
            shown += 1
            last = (o.stderr.strip().splitlines() or [""])[-1][:160]
            why = f" [{KNOWN_OPEN[o.case.id]}]" if o.case.id in KNOWN_OPEN else ""
            print(f"  {title}: {o.case.id}{why}: {'; '.join(o.problems)} | {last}")
    for o in fixed[: args.show]:
        print(f"  passes now (remove from KNOWN_OPEN): {o.case.id}")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                [
                    {
                        "id": o.case.id,
                        "group": o.case.group,
                        "argv": o.argv,
                        "code": o.code,
                        "seconds": round(o.seconds, 3),
                        "over_bound": o.over_bound,
                        "traceback": o.traceback,
                        "changed": o.changed,
                        "leaks": o.leaks,
                        "problems": o.problems,
                        "stderr": o.stderr[-2000:],
                    }
                    for o in outcomes
                ],
                indent=1,
            )
        )
    if args.keep:
        print(f"case folders: {work}")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
