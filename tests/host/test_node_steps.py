"""The node's steps of a native hot clone, run again: a step whose answer the API server did not
take is retried, so each step must give the same result a second time."""

from __future__ import annotations

import os
from pathlib import Path

from reflinker_csi.disk import backup as disk_backup
from tests.conftest import Filesystem

SEGMENT = 16 << 20


def test_the_finish_step_run_again_copies_the_wal_anew_on_a_reflink_filesystem(
    xfs: Filesystem,
) -> None:
    """On XFS each WAL segment is a reflink, which refuses a file already there: the second
    run of Finish (after a status write that failed) used to fail the copy with "[Errno 17]
    File exists". It copies the segments again, with what they hold now."""
    work = xfs.mnt / "finish-again"
    wal = work / "wal"
    wal.mkdir(parents=True)
    partial = work / "vol.partial"
    (partial / "pgdata" / "pg_wal").mkdir(parents=True)
    (partial / disk_backup.ATTEMPT_FILE).write_text("a\n")
    names = ["000000010000000000000001", "000000010000000000000002"]
    for name in names:
        (wal / name).write_bytes(b"first" * 100)

    def finish() -> int:
        return disk_backup.finish(
            partial, "a", wal, "START WAL LOCATION: 0/1000028\n", "", 0x1000028, 0x2000100, SEGMENT
        )

    assert finish() == 2
    with open(wal / names[1], "ab") as more:  # the segment took more WAL since
        more.write(b"later")
    assert finish() == 2
    copied = partial / "pgdata" / "pg_wal" / names[1]
    assert copied.read_bytes().endswith(b"later")
    assert (partial / "pgdata" / "backup_label").read_text().startswith("START WAL LOCATION")
    assert sorted(os.listdir(partial / "pgdata" / "pg_wal")) == names
    assert not [p for p in Path(work).rglob("*") if p.is_symlink()]
