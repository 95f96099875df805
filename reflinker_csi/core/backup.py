"""A native hot clone's hand-off, as data: what pg_backup_start and pg_backup_stop returned, and
the file side's interface. The session runs in pg/backup.py; the copy in disk/backup.py, on this
host or on the source's node through the volume's record (kube/handoff.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

# What a source returns is bounded before anything acts on it: a source is the tenant's own
# server. A backup_label is a few hundred bytes; a tablespace map is a line per tablespace.
MAX_LABEL_BYTES = 64 * 1024
MAX_MAP_BYTES = 1024 * 1024
# The WAL one backup may need: far beyond what a source writes in BACKUP_MODE_LIMIT, far below
# a range whose list of segments would fill the node plugin's memory.
MAX_BACKUP_WAL_BYTES = 1 << 40
_LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


def parse_lsn(lsn: str) -> int:
    """'16/B374D848' -> a byte position in the WAL."""
    if not _LSN.match(lsn):
        raise ValueError(f"not an LSN: {lsn[:40]!r}")
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def wal_range(start_lsn: int, stop_lsn: int, segment_bytes: int) -> tuple[int, int]:
    """The first and last WAL segment numbers a backup from start to stop needs; ValueError
    for a segment size PostgreSQL cannot have or a range no backup spans."""
    if not (1 << 20 <= segment_bytes <= 1 << 30) or segment_bytes & (segment_bytes - 1):
        raise ValueError(f"a WAL segment size of {segment_bytes} bytes")
    if not 0 <= stop_lsn - start_lsn <= MAX_BACKUP_WAL_BYTES:
        raise ValueError(
            f"a backup whose WAL runs from {start_lsn:#x} to {stop_lsn:#x}, beyond "
            f"{MAX_BACKUP_WAL_BYTES >> 30} GiB"
        )
    first = start_lsn // segment_bytes
    return first, max(first, (stop_lsn - 1) // segment_bytes)


def checked_start(start: BackupStart) -> BackupStart:
    """start, once its LSN, system identifier and segment size are ones PostgreSQL returns."""
    parse_lsn(start.lsn)
    if not start.system_id.isdigit():
        raise ValueError(f"a system identifier of {start.system_id[:40]!r}")
    wal_range(0, 0, start.segment_bytes)
    return start


def checked_stop(start: BackupStart, stop: BackupStop) -> BackupStop:
    """stop, once its LSN follows start's within a backup's range and its files are bounded."""
    wal_range(parse_lsn(start.lsn), parse_lsn(stop.lsn), start.segment_bytes)
    if len(stop.label_file.encode()) > MAX_LABEL_BYTES:
        raise ValueError(f"a backup_label longer than {MAX_LABEL_BYTES} bytes")
    if len(stop.map_file.encode()) > MAX_MAP_BYTES:
        raise ValueError(f"a tablespace map longer than {MAX_MAP_BYTES} bytes")
    return stop


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
