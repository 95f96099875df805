"""A native hot clone's hand-off, as data: what pg_backup_start and pg_backup_stop returned, and
the file side's interface. The session runs in pg/backup.py; the copy in disk/backup.py, on this
host or on the source's node through the volume's record (kube/handoff.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


def parse_lsn(lsn: str) -> int:
    """'16/B374D848' -> a byte position in the WAL."""
    high, sep, low = lsn.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {lsn[:40]!r}")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class BackupStart:
    label: str
    lsn: str
    system_id: str  # the source's database system identifier, decimal
    segment_bytes: int


@dataclass(frozen=True)
class BackupStop:
    lsn: str
    label_file: str
    map_file: str


class Copier(Protocol):
    """The file side of a native clone, where the source's data directory can be read."""

    def copy(self, start: BackupStart) -> None:
        """Reflink the source's data directory, without WAL and runtime files, into a partial
        directory of this attempt."""

    def finish(self, start: BackupStart, stop: BackupStop) -> None:
        """Write backup_label and tablespace_map; copy the WAL from the start segment through
        the stop LSN; fail when a segment is missing."""

    def complete(self) -> None:
        """Put the finished copy in place."""

    def abandon(self) -> None:
        """The attempt failed while the session lived: remove its partial copy."""
