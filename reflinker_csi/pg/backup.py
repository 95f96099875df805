"""The native hot clone: pg_backup_start and pg_backup_stop in one session of ours, with the
copy made by whoever sees the source's files (a Copier: the node agent of the source's node,
through the volume's record, or this host). The source needs no function of ours: only EXECUTE
on those two functions and the REPLICATION the role already has.

In that one session: a temporary physical replication slot (keeps the WAL from being recycled
until the copy has it), pg_backup_start(label, fast => true), the data copy, pg_backup_stop
(wait_for_archive => false), backup_label, tablespace_map and the WAL from the start segment
through the stop LSN, then the slot is dropped. Dropping it succeeds only while the session
lives, which proves the WAL was protected for the whole copy; only then is the copy put in
place. If this process dies at any point, the session ends, PostgreSQL aborts the backup and
drops the slot, and the partial copy is never put in place."""

from __future__ import annotations

import contextlib
import time

import psycopg

from ..core.backup import (
    MAX_LABEL_BYTES,
    MAX_MAP_BYTES,
    BackupStart,
    BackupStop,
    Copier,
    checked_start,
    checked_stop,
)
from ..core.errors import FailedPrecondition, InvalidArgument, OperationInProgress
from ..core.layout import is_guid
from ..core.locator import SourceServer
from .source import ANSWER_GRACE_SECONDS, REPLICATION_USER, _query_error, run, session

METHOD = "pg_backup_start/stop"
GRANTS_FILE = "deploy/postgres/native-grants.sql"
# What the native method needs beyond CNPG's own grants, by function signature.
NEEDED_FUNCTIONS = ("pg_backup_start(text, boolean)", "pg_backup_stop(boolean)")


def grant_statements() -> str:
    return " ".join(
        f"GRANT EXECUTE ON FUNCTION {f} TO {REPLICATION_USER};" for f in NEEDED_FUNCTIONS
    )


def slot_name(label: str) -> str:
    # The same name reflink_snapshot() uses: one copy per label at a time, by either method.
    return "pg_reflinker_" + label.replace("-", "_")


def check_source(
    conn: psycopg.Connection[tuple[object, ...]], server: SourceServer, whole: bool = False
) -> None:
    """What the native method needs, checked before anything changes on the source: the two
    grants, REPLICATION, and no tablespaces (they live outside the data directory) unless the
    copy is of the whole instance (a capture, whose file side copies each tablespace)."""
    row = run(
        conn,
        server,
        "SELECT pg_catalog.has_function_privilege('pg_catalog.pg_backup_start(text, boolean)', "
        "'EXECUTE'), "
        "pg_catalog.has_function_privilege('pg_catalog.pg_backup_stop(boolean)', 'EXECUTE'), "
        "(SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles "
        " WHERE rolname = current_user), "
        "(SELECT pg_catalog.string_agg(pg_catalog.quote_ident(spcname), ', ' ORDER BY spcname) "
        "FROM pg_catalog.pg_tablespace "
        " WHERE spcname NOT IN ('pg_default', 'pg_global'))",
    )
    assert row is not None
    start_ok, stop_ok, replication, tablespaces = row
    missing = [f for f, ok in zip(NEEDED_FUNCTIONS, (start_ok, stop_ok), strict=True) if not ok]
    if missing:
        raise FailedPrecondition(
            f"role {REPLICATION_USER} may not run {' or '.join(missing)} on {server.where}, "
            f"which a clone without reflink_snapshot() needs; as a superuser run in database "
            f"postgres: {grant_statements()} ({GRANTS_FILE})"
        )
    if not replication:
        raise FailedPrecondition(
            f"role {REPLICATION_USER} lacks REPLICATION on {server.where} (CNPG grants it); "
            f"as a superuser run: ALTER ROLE {REPLICATION_USER} REPLICATION;"
        )
    if tablespaces and not whole:
        raise FailedPrecondition(
            f"{server.where} has tablespaces {tablespaces}, which live outside the data "
            "directory and cannot be cloned with it alone; copy the whole instance: a new CNPG "
            "Cluster with the same tablespaces (its claims share one capture), a CNPG "
            "volumeSnapshot Backup, or an offline Backup (online: false)"
        )


def native_clone(
    conn: psycopg.Connection[tuple[object, ...]],
    server: SourceServer,
    label: str,
    copier: Copier,
    statement_timeout: float = 300,
    whole: bool = False,
) -> float:
    """Take a consistent copy of the source named label through copier; return the seconds
    the source spent in backup mode. whole: a copy of the whole instance, tablespaces too."""
    if not is_guid(label):
        raise InvalidArgument(f"label {label[:80]!r} must be a lowercase UUID")
    check_source(conn, server, whole)
    slot = slot_name(label)
    step = "create replication slot"
    try:
        run(
            conn,
            server,
            "SELECT pg_catalog.pg_create_physical_replication_slot(%s, true, true)",
            (slot,),
        )
    except psycopg.errors.DuplicateObject:
        raise OperationInProgress(
            f"a copy named {label} is already being taken on {server.where} (replication slot "
            f"{slot} exists); retry later"
        ) from None
    except psycopg.Error as err:
        raise _query_error(err, server, False, f"{step} {slot}") from None
    began = time.monotonic()
    try:
        step = "pg_backup_start"
        answer = statement_timeout + ANSWER_GRACE_SECONDS
        row = run(
            conn,
            server,
            "SELECT pg_catalog.pg_backup_start(%s, true)::text, "
            "(SELECT system_identifier::text FROM pg_catalog.pg_control_system()), "
            "pg_catalog.pg_size_bytes(pg_catalog.current_setting('wal_segment_size'))",
            (label,),
            answer,
            step,
        )
        assert row is not None
        start = checked_start(BackupStart(label, str(row[0])[:40], str(row[1])[:40], _int(row[2])))
        copier.copy(start)
        step = "pg_backup_stop"
        # Cut on the server: a backup_label is a few hundred bytes, a tablespace map a line
        # per tablespace.
        row = run(
            conn,
            server,
            "SELECT lsn::text, pg_catalog.left(labelfile, %s), "
            "pg_catalog.left(coalesce(spcmapfile, ''), %s) FROM pg_catalog.pg_backup_stop(false)",
            (MAX_LABEL_BYTES + 1, MAX_MAP_BYTES + 1),
            answer,
            step,
        )
        assert row is not None
        in_backup = time.monotonic() - began
        stop = checked_stop(start, BackupStop(str(row[0])[:40], str(row[1]), str(row[2])))
        copier.finish(start, stop)
        # Succeeds only while this session (and so the slot) lived through the WAL copy.
        step = "drop replication slot"
        run(conn, server, "SELECT pg_catalog.pg_drop_replication_slot(%s)", (slot,))
    except ValueError as err:
        _abandon(conn, copier)
        raise FailedPrecondition(
            f"{server.source} answered {step} with what PostgreSQL never returns ({err}); "
            "it is not a usable source"
        ) from None
    except psycopg.Error as err:
        _abandon(conn, copier)
        timed_out = time.monotonic() - began >= statement_timeout
        raise _query_error(err, server, timed_out, step) from None
    except BaseException:
        _abandon(conn, copier)
        raise
    copier.complete()
    return in_backup


def _abandon(conn: psycopg.Connection[tuple[object, ...]], copier: Copier) -> None:
    """A failed copy: the backup ends first (closing the session aborts it on the server and
    drops its temporary slot), then the copier says so to the API, so an API server that
    hangs cannot keep the source in backup mode."""
    with contextlib.suppress(Exception):
        conn.close()
    copier.abandon()


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    raise ValueError(f"a segment size of {str(value)[:40]!r}")


def native_hot_clone(
    server: SourceServer,
    label: str,
    copier: Copier,
    connect_timeout: float = 10,
    statement_timeout: float = 300,
) -> float:
    """native_clone() in a session of its own."""
    with session(server, connect_timeout, statement_timeout) as conn:
        return native_clone(conn, server, label, copier, statement_timeout)
