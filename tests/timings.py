"""Wall times for the summary `make test` prints at its end (tests/tools/timer.sh report)."""

from __future__ import annotations

import os


def record(name: str, seconds: float) -> None:
    """Append one line to $TIMINGS, if `make test` set it; indented: it runs inside a stage."""
    path = os.environ.get("TIMINGS")
    if path:
        with open(path, "a") as out:
            out.write(f"{seconds:.1f}\t  {name}\n")


def record_failures(nodeids: list[str]) -> None:
    """The tests that failed, for the end of `make test`'s summary: the last lines of a long
    run are often all that is kept of it."""
    path = os.environ.get("TIMINGS")
    if path and nodeids:
        with open(f"{path}.failed", "a") as out:
            out.writelines(f"{nodeid}\n" for nodeid in nodeids)
