"""A capture: one consistent copy of a whole running CNPG instance, from which the volumes and
snapshots of one group are cut.

A CNPG instance may keep its WAL on a claim of its own and each tablespace on another. The
requests that belong together (the claims of one new CNPG instance, the VolumeSnapshots of one
CNPG Backup) share one capture: one hot copy (either method) of the data directory with the WAL
its backup needs, and every tablespace directory, taken at one moment. Each request is then a
piece, a reflink copy of the capture's part for it:

    capture/pgdata                      -> PG_DATA piece: pgdata (its WAL inside, or pg_wal a
                                           link to the new instance's WAL volume, WAL_LINK)
    capture/pgdata/pg_wal               -> PG_WAL piece: pg_wal
    capture/tablespaces/<name>          -> PG_TABLESPACE:<name> piece: the volume's top (data/)

The source is in backup mode only while the capture is taken, never while siblings are awaited.
A capture is removed when every piece its group wants has been cut, or CAPTURE_WAIT seconds
after it was made (whichever comes first); a request of the group that comes later finds its
siblings cut from a capture that is gone and is refused, so a set is never mixed from two
moments."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .keys import CNPG_TABLESPACES_MOUNT, CNPG_WAL_MOUNT, CTX_PIECES
from .records import VolumeRecord

PG_DATA = "PG_DATA"
PG_WAL = "PG_WAL"
PG_TABLESPACE = "PG_TABLESPACE"
# Where CNPG's instance finds its WAL when it has a WAL volume (its PGDATA's pg_wal links there).
WAL_LINK = CNPG_WAL_MOUNT + "/pg_wal"


def tablespace_piece(name: str) -> str:
    return f"{PG_TABLESPACE}:{name}"


def pieces_of(volumes: dict[str, str]) -> list[str]:
    """The pieces of a running instance, from its pod's other volumes (mount path in the pod):
    PG_DATA, PG_WAL when it has a WAL volume, one per tablespace volume."""
    pieces = [PG_DATA]
    if CNPG_WAL_MOUNT in volumes:
        pieces.append(PG_WAL)
    prefix = CNPG_TABLESPACES_MOUNT + "/"
    for mount in sorted(volumes):
        name = mount[len(prefix) :] if mount.startswith(prefix) else ""
        if name and "/" not in name:
            pieces.append(tablespace_piece(name))
    return pieces


def pieces_held(capture: VolumeRecord) -> list[str]:
    return [p for p in capture.context.get(CTX_PIECES, "").split(",") if p]


@dataclass(frozen=True)
class Part:
    """Where a piece is in its capture, and where it goes in the new volume (relative paths;
    "" is the directory itself)."""

    inside: str
    into: str


def part_of(piece: str) -> Part:
    if piece in ("", PG_DATA):
        return Part("pgdata", "pgdata")
    if piece == PG_WAL:
        return Part("pgdata/pg_wal", "pg_wal")
    name = piece.removeprefix(PG_TABLESPACE + ":")
    if piece.startswith(PG_TABLESPACE + ":") and name and "/" not in name and name != "..":
        return Part(f"tablespaces/{name}", "")
    raise ValueError(f"no such piece {piece[:80]!r}")


def capture_name(group: str, source: str) -> str:
    """The capture's request name: one per group and source instance."""
    digest = hashlib.sha256(f"{group}\n{source}".encode()).hexdigest()[:40]
    return f"capture-{digest}"


def expires_in(capture: VolumeRecord, now: float, wait: float) -> float:
    """Seconds until the capture has waited `wait` seconds for its group (<= 0: expired).
    CNPG creates the claims of a new instance, and the VolumeSnapshots of a Backup, within
    seconds of each other."""
    return capture.created_at + wait - now
