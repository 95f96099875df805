"""The source database: connect to a CNPG instance as streaming_replica over verified TLS and
call reflink_snapshot(label). No gRPC here; failures are domain errors."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
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
    SourceUnavailable,
)
from ..core.layout import is_guid
from ..core.locator import SourceServer

REPLICATION_USER = "streaming_replica"
FUNCTION = "reflink_snapshot(text)"
INSTALL_HINT = "install deploy/postgres/reflink_snapshot.sql (see deploy/postgres/README.md)"
# Key material lives only in memory-backed storage, never on a disk.
KEY_DIR_PARENT = Path("/dev/shm")

_TLS_FAILURES = (
    "certificate verify failed",
    "does not match host name",
    "ssl error",
    "certificate",
    "tls",
    "sslv3",
    "no pg_hba.conf entry",
)
_UNREACHABLE = (
    "connection refused",
    "timeout expired",
    "could not connect",
    "no route to host",
    "network is unreachable",
    "server closed the connection",
    "connection timed out",
    "could not translate host name",
    "host is down",
)


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
    text = str(err).lower()
    if any(marker in text for marker in _UNREACHABLE):
        return SourceUnavailable(
            f"cannot reach PostgreSQL of {server.where} on port {server.port}: "
            f"{_first_line(err)}; retrying is safe once the instance is up"
        )
    if "certificate authentication failed" in text or "password authentication" in text:
        return FailedPrecondition(
            f"{server.where} rejected the client certificate for role {REPLICATION_USER}: "
            f"{_first_line(err)}; check secret {server.cluster}-replication (tls.crt must have "
            f"CN={REPLICATION_USER} and be signed by {server.cluster}-ca)"
        )
    if any(marker in text for marker in _TLS_FAILURES):
        return FailedPrecondition(
            f"TLS with {server.where} failed: {_first_line(err)}; check secret "
            f"{server.cluster}-ca (ca.crt must sign the server certificate for "
            f"{server.host_name}) and secret {server.cluster}-replication"
        )
    return SourceUnavailable(f"cannot connect to {server.where}: {_first_line(err)}")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _query_error(err: psycopg.Error, server: SourceServer, timed_out: bool) -> Exception:
    """timed_out: the statement had run for its whole statement_timeout when it failed. A
    timeout that fires while COPY ... TO PROGRAM runs comes back as the program's failure
    (SQLSTATE 38000), not as query_canceled, and is a deadline all the same."""
    if isinstance(err, pg_errors.UndefinedFunction) and not err.diag.context:
        return FailedPrecondition(
            f"function {FUNCTION} does not exist in database postgres of {server.where}; "
            f"{INSTALL_HINT}"
        )
    if isinstance(err, pg_errors.InsufficientPrivilege):
        return FailedPrecondition(
            f"role {REPLICATION_USER} may not run {FUNCTION} on {server.where}: "
            f"{_first_line(err)}; grant EXECUTE as deploy/postgres/reflink_snapshot.sql does"
        )
    if isinstance(err, pg_errors.QueryCanceled) or (
        timed_out and isinstance(err, pg_errors.ExternalRoutineException)
    ):
        return DeadlineExceeded(
            f"{FUNCTION} on {server.where} ran past the statement timeout: {_first_line(err)}; "
            "raise PG_STATEMENT_TIMEOUT or retry when the instance is less busy"
        )
    if isinstance(err, pg_errors.ObjectInUse | pg_errors.LockNotAvailable):
        return OperationInProgress(f"{_first_line(err)} ({server.where}); retry later")
    if isinstance(err, psycopg.OperationalError) and not err.sqlstate:
        return SourceUnavailable(f"lost the connection to {server.where}: {_first_line(err)}")
    return FailedPrecondition(f"{FUNCTION} failed on {server.where}: {_first_line(err)}")


def hot_clone(
    server: SourceServer, label: str, connect_timeout: float = 10, statement_timeout: float = 300
) -> HotCloneResult:
    """Ask the source server for a consistent reflink copy of its data directory named label."""
    if not is_guid(label):
        raise InvalidArgument(f"label {label[:80]!r} must be a lowercase UUID")
    start = time.monotonic()
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
                options=f"-c statement_timeout={int(statement_timeout * 1000)}",
                autocommit=True,
            )
        except psycopg.OperationalError as err:
            raise _connect_error(err, server) from None
        started = time.monotonic()
        try:
            with conn:
                row = conn.execute("SELECT reflink_snapshot(%s)", (label,)).fetchone()
        except psycopg.Error as err:
            timed_out = time.monotonic() - started >= statement_timeout
            raise _query_error(err, server, timed_out) from None
    if row is None or not isinstance(row[0], str) or not row[0].startswith("/"):
        raise FailedPrecondition(
            f"{FUNCTION} on {server.where} returned {row!r}, not an absolute directory; "
            f"{INSTALL_HINT}"
        )
    return HotCloneResult(directory=row[0], seconds=time.monotonic() - start)
