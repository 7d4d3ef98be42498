"""`python -m loratool` and the `loratool` console script.

run() imports the command line itself, so Ctrl-C while it loads (click, the commands) ends with
exit 130 and one line, never a traceback; from then on loratool.cli.main handles every signal.
"""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from loratool.cli import main
    except KeyboardInterrupt:
        try:
            sys.stderr.write("Interrupted.\n")
        finally:
            sys.exit(130)
    main()


if __name__ == "__main__":
    run()
