"""The source database: connect to a CNPG instance as streaming_replica over verified TLS and
call reflink_snapshot(label). No gRPC here; failures are domain errors."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import errors as pg_errors

from ..core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    OperationInProgress,
    ResourceExhausted,
    SourceUnavailable,
)
from ..core.freshness import Position
from ..core.layout import is_guid
from ..core.locator import SourceServer

REPLICATION_USER = "streaming_replica"
FUNCTION = "reflink_snapshot(text)"
INSTALL_HINT = "install deploy/postgres/reflink_snapshot.sql (see deploy/postgres/README.md)"
# Key material lives only in memory-backed storage, never on a disk.
KEY_DIR_PARENT = Path("/dev/shm")
# The PostgreSQL majors a source may run (pg_backup_start/stop came in 15; docs/install.md has
# what each was tested on). A source outside them is refused before anything is asked of it.
SUPPORTED_MAJORS = range(15, 19)
# A source is the tenant's own server: nothing it sends is trusted to be small or timely.
# Catalog lookups that take longer than this are a server that is not answering.
QUICK_SECONDS = 10.0
# Beyond a statement's own timeout, how long the server has to report it before we cut the
# connection ourselves (a stopped backend never does).
ANSWER_GRACE_SECONDS = 5.0
# The longest directory reflink_snapshot() may return (PATH_MAX); it is cut on the server.
MAX_PATH_BYTES = 4096

# libpq reports a failed connection without a SQLSTATE (checked with psycopg 3): its message is
# the only signal there. These client-side TLS failures are configuration, not outages.
_TLS_FAILURES = (
    "certificate verify failed",
    "does not match host name",
    "ssl error",
    "sslv3",
    "tlsv1",
    "certificate",
)
# Server answers that name the role or its certificate (pg_hba, cert authentication).
_REJECTED = ("no pg_hba.conf entry", "authentication failed")


@dataclass(frozen=True)
class HotCloneResult:
    directory: str  # the <label> directory as the source server sees it
    seconds: float


@contextlib.contextmanager
def _key_material(server: SourceServer) -> Iterator[dict[str, str]]:
    """Write the CA, certificate and key to a private tmpfs directory; remove it on exit."""
    if not KEY_DIR_PARENT.is_dir():
        raise FailedPrecondition(
            f"{KEY_DIR_PARENT} (tmpfs) is missing; keys are never written "
            "to disk, mount a tmpfs there"
        )
    directory = Path(tempfile.mkdtemp(prefix="pg-reflinker-tls.", dir=KEY_DIR_PARENT))
    try:
        os.chmod(directory, 0o700)
        paths = {}
        for name, data in (
            ("sslrootcert", server.ca_cert),
            ("sslcert", server.client_cert),
            ("sslkey", server.client_key),
        ):
            path = directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths[name] = str(path)
        yield paths
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _connect_error(err: psycopg.OperationalError, server: SourceServer) -> Exception:
    """SQLSTATE when the server sent one; otherwise libpq's message is all there is."""
    state = err.sqlstate or ""
    text = str(err).lower()
    if state.startswith("28") or any(marker in text for marker in _REJECTED):
        return FailedPrecondition(
            f"{server.where} rejected role {REPLICATION_USER}: {_first_line(err)}; check secret "
            f"{server.cluster}-replication (tls.crt must have CN={REPLICATION_USER} and be "
            f"signed by {server.cluster}-ca) and that pg_hba allows it over TLS"
        )
    if state == "3D000":
        return FailedPrecondition(f"{server.where} has no database postgres: {_first_line(err)}")
    if not state and any(marker in text for marker in _TLS_FAILURES):
        return FailedPrecondition(
            f"TLS with {server.where} failed: {_first_line(err)}; check secret "
            f"{server.cluster}-ca (ca.crt must sign the server certificate for "
            f"{server.host_name}) and secret {server.cluster}-replication"
        )
    # Refused, unreachable, timed out, starting up or shutting down (57P03), too many
    # connections (53300): an outage that passes.
    return SourceUnavailable(
        f"cannot reach PostgreSQL of {server.where} on port {server.port}: "
        f"{_first_line(err)}; retrying is safe once the instance is up"
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _query_error(
    err: psycopg.Error, server: SourceServer, timed_out: bool, what: str = FUNCTION
) -> Exception:
    """By psycopg's error classes (SQLSTATE), most specific first; text only for the first
    line shown. timed_out: the statement had run for its whole statement_timeout when it failed. A
    timeout that fires while COPY ... TO PROGRAM runs comes back as the program's failure
    (SQLSTATE 38000), not as query_canceled, and is a deadline all the same."""
    if what == FUNCTION and isinstance(err, pg_errors.UndefinedFunction) and not err.diag.context:
        return FailedPrecondition(
            f"function {FUNCTION} does not exist in database postgres of {server.where}; "
            f"{INSTALL_HINT}"
        )
    if what == FUNCTION and isinstance(err, pg_errors.InsufficientPrivilege):
        return FailedPrecondition(
            f"role {REPLICATION_USER} may not run {FUNCTION} on {server.where}: "
            f"{_first_line(err)}; grant EXECUTE as deploy/postgres/reflink_snapshot.sql does"
        )
    if isinstance(err, pg_errors.QueryCanceled) or (
        timed_out and isinstance(err, pg_errors.ExternalRoutineException)
    ):
        return DeadlineExceeded(
            f"{what} on {server.where} ran past the statement timeout: {_first_line(err)}; "
            "raise PG_STATEMENT_TIMEOUT (and BACKUP_MODE_LIMIT, which bounds it for clones) or "
            "retry when the instance is less busy"
        )
    if isinstance(err, pg_errors.ObjectInUse | pg_errors.LockNotAvailable):
        return OperationInProgress(f"{_first_line(err)} ({server.where}); retry later")
    if isinstance(err, pg_errors.DiskFull):
        return ResourceExhausted(f"{what} on {server.where}: {_first_line(err)}")
    if isinstance(err, pg_errors.OperatorIntervention):  # 57: shut down, crashed, recovery
        return SourceUnavailable(f"{server.where} went away: {_first_line(err)}; retrying")
    if isinstance(err, psycopg.OperationalError) and not err.sqlstate:
        return SourceUnavailable(f"lost the connection to {server.where}: {_first_line(err)}")
    return FailedPrecondition(f"{what} failed on {server.where}: {_first_line(err)}")


@contextlib.contextmanager
def session(
    server: SourceServer,
    connect_timeout: float = 10,
    statement_timeout: float = 300,
    idle_timeout: float | None = None,
) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """One autocommit session as streaming_replica over verified TLS. The key material exists
    only while libpq connects; connection failures are domain errors. The server ends the
    session (and any backup it holds) once it has been idle for idle_timeout (default: the
    statement timeout), whatever becomes of this process or the network."""
    with _key_material(server) as keys:
        try:
            conn = psycopg.connect(
                sslrootcert=keys["sslrootcert"],
                sslcert=keys["sslcert"],
                sslkey=keys["sslkey"],
                hostaddr=server.pod_ip,
                host=server.host_name,
                port=server.port,
                dbname="postgres",
                user=REPLICATION_USER,
                sslmode="verify-full",
                gssencmode="disable",
                connect_timeout=max(2, math.ceil(connect_timeout)),
                application_name="pg-reflinker",
                # Names resolve in pg_catalog first whatever the role's search_path says (the
                # connection's options outrank ALTER ROLE ... SET), and every call below is
                # schema-qualified besides: a source cannot shadow what we call.
                options=f"-c statement_timeout={int(statement_timeout * 1000)} "
                "-c search_path=pg_catalog",
                autocommit=True,
                # TCP: a peer gone silent is noticed in seconds, not after two hours.
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                tcp_user_timeout=15000,
            )
        except psycopg.OperationalError as err:
            raise _connect_error(err, server) from None
    with conn:
        check_major(conn.info.server_version, server)
        idle = idle_timeout if idle_timeout is not None else statement_timeout
        # Set once the major is known to have it (PostgreSQL 14 and later).
        run(
            conn,
            server,
            "SELECT pg_catalog.set_config('idle_session_timeout', %s, false)",
            (str(int(idle * 1000) + 1000),),
        )
        yield conn


def run(
    conn: psycopg.Connection[tuple[object, ...]],
    server: SourceServer,
    query: str,
    params: tuple[object, ...] = (),
    seconds: float = QUICK_SECONDS,
    what: str = "a catalog lookup",
) -> tuple[object, ...] | None:
    """One statement and its first row, answered within seconds (else FailedPrecondition)."""
    with answer_within(conn, server, seconds, what):
        return conn.execute(query, params).fetchone()


@contextlib.contextmanager
def answer_within(
    conn: psycopg.Connection[tuple[object, ...]], server: SourceServer, seconds: float, what: str
) -> Iterator[None]:
    """A statement without an answer within seconds ends the session from our side: the
    socket is shut down, so a source that stops its backend after authentication, or never
    answers, holds a worker no longer than that (statement_timeout needs a server that works)."""
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        with contextlib.suppress(OSError, psycopg.Error):
            sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    except psycopg.Error:
        if fired.is_set():
            raise FailedPrecondition(
                f"{server.source} did not answer {what} within {seconds:.0f} s; the session "
                "was closed. The clone is retried; a server that keeps not answering is not "
                "a usable source"
            ) from None
        raise
    finally:
        timer.cancel()


def check_major(server_version: int, server: SourceServer) -> None:
    """server_version as libpq reports it (180006 for 18.6)."""
    major = server_version // 10000
    if major not in SUPPORTED_MAJORS:
        raise FailedPrecondition(
            f"{server.where} runs PostgreSQL {major}, which pg-reflinker does not clone: "
            f"supported majors are {SUPPORTED_MAJORS[0]} to {SUPPORTED_MAJORS[-1]}"
        )


def has_function(conn: psycopg.Connection[tuple[object, ...]], server: SourceServer) -> bool:
    """reflink_snapshot(text) exists in database postgres and this role may run it."""
    row = run(
        conn,
        server,
        "SELECT pg_catalog.to_regprocedure('public.reflink_snapshot(text)') IS NOT NULL AND "
        "pg_catalog.has_function_privilege('public.reflink_snapshot(text)', 'EXECUTE')",
    )
    return bool(row and row[0])


# One statement, so every part is read at one moment. A WAL receiver's pid is shown to any role
# (its details need pg_read_all_stats, which streaming_replica has not): enough to know the
# stream runs. An LSN is cut on the server: a real one is at most 17 characters.
_POSITION = """
SELECT r,
       pg_catalog.left((CASE WHEN r THEN pg_catalog.pg_last_wal_replay_lsn()
                             ELSE pg_catalog.pg_current_wal_lsn() END)::text, 20),
       pg_catalog.date_part('epoch', CASE WHEN r THEN pg_catalog.pg_last_xact_replay_timestamp()
                                          ELSE pg_catalog.clock_timestamp() END)::float8,
       EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_wal_receiver() w WHERE w.pid IS NOT NULL),
       coalesce(pg_catalog.pg_last_wal_receive_lsn() <= pg_catalog.pg_last_wal_replay_lsn(),
                false),
       pg_catalog.date_part('epoch', pg_catalog.clock_timestamp())::float8
FROM pg_catalog.pg_is_in_recovery() r
"""


def position(conn: psycopg.Connection[tuple[object, ...]], server: SourceServer) -> Position:
    """Where the source is (core/freshness.py): what a copy taken now holds at least, and how
    far behind production it is."""
    row = run(conn, server, _POSITION, what="where its WAL is")
    try:
        assert row is not None and len(row) == 6
        recovery, lsn, replayed, streaming, caught_up, now = row
        return Position(
            lsn=str(lsn),
            in_recovery=recovery is True,
            replayed_at=float(replayed) if isinstance(replayed, float) else None,
            streaming=streaming is True,
            caught_up=caught_up is True,
            read_at=float(now) if isinstance(now, float) else time.time(),
        )
    except (AssertionError, ValueError) as err:
        raise FailedPrecondition(
            f"{server.source} answered where its WAL is with what PostgreSQL never returns "
            f"({err}); it is not a usable source"
        ) from None


def hot_clone(
    server: SourceServer, label: str, connect_timeout: float = 10, statement_timeout: float = 300
) -> HotCloneResult:
    """Ask the source server for a consistent reflink copy of its data directory named label."""
    if not is_guid(label):
        raise InvalidArgument(f"label {label[:80]!r} must be a lowercase UUID")
    start = time.monotonic()
    with session(server, connect_timeout, statement_timeout) as conn:
        return call_function(conn, server, label, statement_timeout, start)


def call_function(
    conn: psycopg.Connection[tuple[object, ...]],
    server: SourceServer,
    label: str,
    statement_timeout: float,
    start: float,
) -> HotCloneResult:
    """SELECT reflink_snapshot(label) in an open session."""
    started = time.monotonic()
    try:
        # The answer is cut on the server: a function that returns 600 MB sends us 4 KiB.
        row = run(
            conn,
            server,
            "SELECT pg_catalog.left(public.reflink_snapshot(%s)::text, %s)",
            (label, MAX_PATH_BYTES + 1),
            statement_timeout + ANSWER_GRACE_SECONDS,
            FUNCTION,
        )
    except psycopg.Error as err:
        timed_out = time.monotonic() - started >= statement_timeout
        raise _query_error(err, server, timed_out) from None
    directory = row[0] if row is not None else None
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise FailedPrecondition(
            f"{FUNCTION} on {server.source} returned {str(directory)[:80]!r}, not an absolute "
            f"directory; {INSTALL_HINT}"
        )
    if len(directory.encode()) > MAX_PATH_BYTES:
        raise FailedPrecondition(
            f"{FUNCTION} on {server.source} returned a path longer than {MAX_PATH_BYTES} bytes "
            f"({directory[:40]!r}...), which no directory has; {INSTALL_HINT}"
        )
    return HotCloneResult(directory=directory, seconds=time.monotonic() - start)
