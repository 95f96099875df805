"""A source server is the tenant's own: it may answer with anything, or not at all. Each case
runs against a real PostgreSQL (the newest major here) on an XFS reflink filesystem, the clone
taken in a child process whose peak memory is read back, as the controller would take it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflinker_csi.core.backup import MAX_BACKUP_WAL_BYTES, BackupStart, BackupStop, checked_stop
from reflinker_csi.core.errors import FailedPrecondition
from reflinker_csi.disk import backup as disk_backup
from tests.conftest import ROOT, Filesystem, requires_mount
from tests.host.test_hot_clone import MAJORS, Source

pytestmark = [pytest.mark.integration, requires_mount]

# The child's peak resident memory may not come near what a hostile answer would cost.
MEMORY_BOUND = 200 << 20

CHILD = """
import json, sys, time
from reflinker_csi.core.locator import SourceServer
from reflinker_csi.pg import source
args = json.loads(sys.argv[1])
server = SourceServer(
    pod_ip="127.0.0.1", port=args["port"], cluster="pg-xyz", namespace="apps", pod="pg-xyz-1",
    claim="apps/pg-xyz-1", ca_cert=open(args["ca"], "rb").read(),
    client_cert=open(args["crt"], "rb").read(), client_key=open(args["key"], "rb").read(),
)
began = time.monotonic()
try:
    source.hot_clone(server, args["label"], 5, args["statement_timeout"])
    outcome = ["ok", ""]
except Exception as err:
    outcome = [type(err).__name__, str(err)]
# VmHWM: the peak of this program's own memory (ru_maxrss would also count the memory of the
# test process it was forked from, before the exec).
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - began, "peak": peak}))
"""


@pytest.fixture(scope="module")
def source() -> Iterator[Source]:
    fs = Filesystem("xfs", size="2G")
    try:
        src = Source(fs, max(MAJORS), scale=1)
        yield src
        src.server.stop("immediate")
    finally:
        fs.close()


def clone_in_child(src: Source, statement_timeout: float = 30) -> dict[str, object]:
    """hot_clone() of src in a child process: its outcome, time and peak memory."""
    args = {
        "port": src.server.port,
        "ca": str(src.certs.path("ca.crt")),
        "crt": str(src.certs.path("replication.crt")),
        "key": str(src.certs.path("replication.key")),
        "label": "0c5b4a1e-2f6d-4a7b-9c8d-1e2f3a4b5c6d",
        "statement_timeout": statement_timeout,
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def shadow(src: Source, body: str) -> None:
    """The tenant's own reflink_snapshot(text), granted to streaming_replica as ours is."""
    src.server.psql(
        "CREATE OR REPLACE FUNCTION public.reflink_snapshot(label text) RETURNS text "
        f"LANGUAGE sql AS $$ {body} $$"
    )


def test_a_600_mb_answer_is_cut_on_the_server_and_refused(source: Source) -> None:
    """reflink_snapshot() returning '/' and 600 million x: the controller receives at most
    4 KiB of it (its memory stays far below its limit), and the refusal names the source claim."""
    shadow(source, "SELECT '/' || repeat('x', 600000000)")
    result = clone_in_child(source)
    kind, message = result["outcome"]  # type: ignore[misc]
    assert kind == "FailedPrecondition", message
    assert message.startswith(
        "reflink_snapshot(text) on source claim apps/pg-xyz-1 (CNPG cluster pg-xyz in namespace "
        "apps (pod pg-xyz-1, 127.0.0.1)) returned a path longer than 4096 bytes"
    ), message
    assert int(result["peak"]) < MEMORY_BOUND, result  # type: ignore[call-overload]


def _stop_our_backend(src: Source, deadline: float) -> int:
    """SIGSTOP the backend of our session as soon as it exists: a server that authenticated
    us and then never answers."""
    while time.monotonic() < deadline:
        pid = src.server.psql(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-reflinker' LIMIT 1"
        )
        if pid:
            os.kill(int(pid), signal.SIGSTOP)
            return int(pid)
        time.sleep(0.02)
    raise AssertionError("our session never reached the server")


def test_a_backend_stopped_after_authentication_holds_the_clone_seconds_not_forever(
    source: Source,
) -> None:
    """The backend stops (SIGSTOP) while it runs our statement: no statement_timeout fires on
    a stopped server and TCP stays up, so without a deadline of our own the worker would wait
    forever. The session is cut within the statement timeout and a few seconds."""
    shadow(source, "SELECT pg_sleep(1); SELECT '/nowhere'")
    import threading

    stopped: list[int] = []
    finder = threading.Thread(
        target=lambda: stopped.append(_stop_our_backend(source, time.monotonic() + 30))
    )
    finder.start()
    try:
        result = clone_in_child(source, statement_timeout=3)
    finally:
        finder.join()
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
    kind, message = result["outcome"]  # type: ignore[misc]
    assert kind == "FailedPrecondition", message
    assert "source claim apps/pg-xyz-1" in message and "did not answer" in message, message
    assert float(result["seconds"]) < 20, result  # type: ignore[arg-type]


def test_a_wal_range_of_two_to_the_32_segments_is_refused_at_both_ends(tmp_path: Path) -> None:
    """No real PostgreSQL returns such a range (its LSNs are its own), so this stands in for a
    server that lies: the controller refuses the stop before asking the node for it, and the
    node's own check refuses it in constant memory instead of listing 2^32 segments."""
    start = BackupStart("x", "0/0", "1", 16 << 20)
    huge = BackupStop("FFFFFFFF/FFFFFFFF", "START WAL LOCATION: 0/0\n", "")
    with pytest.raises(ValueError, match="beyond 1024 GiB"):
        checked_stop(start, huge)
    partial = tmp_path / "partial"
    (partial / "pgdata" / "pg_wal").mkdir(parents=True)
    (partial / disk_backup.ATTEMPT_FILE).write_text("a\n")
    (tmp_path / "wal").mkdir()
    began = time.monotonic()
    with pytest.raises(FailedPrecondition) as err:
        disk_backup.finish(
            partial, "a", tmp_path / "wal", "label", "", 0, MAX_BACKUP_WAL_BYTES * 4, 16 << 20
        )
    assert "beyond 1024 GiB" in str(err.value)
    assert time.monotonic() - began < 1
