"""Wall times for the summary `make test` prints at its end (tests/tools/timer.sh report)."""

from __future__ import annotations

import os


def record(name: str, seconds: float) -> None:
    """Append one line to $TIMINGS, if `make test` set it; indented: it runs inside a stage."""
    path = os.environ.get("TIMINGS")
    if path:
        with open(path, "a") as out:
            out.write(f"{seconds:.1f}\t  {name}\n")
