"""Hot clones of a running PostgreSQL through reflink_snapshot(), over CNPG-style TLS.

A real server on a real XFS reflink filesystem; clones are booted as real servers and checked.
Every test runs on the newest PostgreSQL major obtained here (pg_majors(): 15, 17 and 18 after
`make pg-majors`), the clone booted by the source's own major; the tests whose path depends on
the major (marked every_major) run on every major, pairwise over the two methods (one method a
major, in turn: tests/conftest.py), and `make hot-clone-matrix` runs every test on every major;
the tests of the copy paths (marked every_filesystem) run again on the newest major with the
source's volume a btrfs subvolume (a native copy is then a subvolume snapshot)."""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from reflinker_csi.core import errors
from reflinker_csi.core.freshness import Position, check_lag
from reflinker_csi.core.locator import SourceServer
from reflinker_csi.disk.backup import LocalCopier
from reflinker_csi.disk.subvolume import is_subvolume
from reflinker_csi.pg import source as source_module
from reflinker_csi.pg.backup import native_hot_clone
from reflinker_csi.pg.source import hot_clone
from tests.conftest import ROOT, Filesystem, requires_mount
from tests.pgserver import (
    Certificates,
    PostgresServer,
    boot_clone,
    chown_postgres,
    free_port,
    pg_majors,
    remove,
)

pytestmark = [pytest.mark.integration, requires_mount]
SCALE = 50


MAJORS = pg_majors()


class Source:
    def __init__(
        self, fs: Filesystem, major: int, waldir: Path | None = None, scale: int = SCALE
    ) -> None:
        self.fs = fs
        self.certs = Certificates.create(fs.work / "certs", "pg-xyz", "apps")
        os.chmod(fs.work, 0o755)
        os.chmod(self.certs.directory, 0o755)
        self.server = PostgresServer(
            volume=fs.new_volume(fs.mnt / "volume-src"),
            port=free_port(),
            socket_dir=fs.work / "sock",
            certs=self.certs,
            bin=MAJORS[major],
        )
        self.server.initdb(waldir)
        self.server.start()
        try:
            self.server.install_function()
            self.server.psql("CREATE DATABASE app")
            self.server.pgbench("-i", "-s", str(scale), "-q")
            self.server.psql("CHECKPOINT")
        except BaseException:
            self.server.stop("immediate")
            raise

    @property
    def endpoint(self) -> SourceServer:
        return SourceServer(
            pod_ip="127.0.0.1",
            port=self.server.port,
            cluster="pg-xyz",
            namespace="apps",
            ca_cert=self.certs.read("ca.crt"),
            client_cert=self.certs.read("replication.crt"),
            client_key=self.certs.read("replication.key"),
            pod="pg-xyz-1",
        )

    @property
    def clone_area(self) -> Path:
        return self.server.volume / ".pg-reflinker"


# (major, filesystem): every major on XFS, the newest on btrfs too, for the tests marked
# every_filesystem (the copy paths); the others test what no filesystem changes, on XFS only.
SETUPS = [(major, "xfs") for major in MAJORS] + [(max(MAJORS), "btrfs")]


@pytest.fixture(
    scope="session",
    params=SETUPS,
    ids=lambda setup: f"pg{setup[0]}" + ("" if setup[1] == "xfs" else f"-{setup[1]}"),
)
def setup(request: pytest.FixtureRequest) -> tuple[int, str]:
    return (int(request.param[0]), str(request.param[1]))


@pytest.fixture(scope="session")
def major(setup: tuple[int, str]) -> int:
    return setup[0]


@pytest.fixture(scope="session")
def source(setup: tuple[int, str]) -> Iterator[Source]:
    major, kind = setup
    fs = Filesystem(kind, size="16G")
    try:
        src = Source(fs, major)
        yield src
        src.server.stop("immediate")
    finally:
        fs.close()


@pytest.fixture(scope="module", autouse=True)
def private_key_parent() -> Iterator[Path]:
    """hot_clone() writes key material in a pg-reflinker-tls.* directory below /dev/shm, as do
    other processes on the machine (a driver, another test run). This module's calls write theirs
    in a /dev/shm directory of its own, so key_dirs() sees only them."""
    parent = Path(
        tempfile.mkdtemp(prefix="pg-reflinker-test-keys.", dir=source_module.KEY_DIR_PARENT)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(source_module, "KEY_DIR_PARENT", parent)
        yield parent
    shutil.rmtree(parent, ignore_errors=True)


def key_dirs() -> list[str]:
    return glob.glob(f"{source_module.KEY_DIR_PARENT}/pg-reflinker-tls.*")


def partials(src: Source) -> list[str]:
    return [p.name for p in src.clone_area.glob("*.partial")] if src.clone_area.exists() else []


def take(
    src: Source,
    method: str,
    label: str = "",
    endpoint: SourceServer | None = None,
    server: PostgresServer | None = None,
) -> Path:
    """One hot clone by either method; return its <label> directory (pgdata inside).
    function: reflink_snapshot() on the server; native: pg_backup_start/stop in our session and
    the copy made here, into the same place."""
    label = label or str(uuid.uuid4())
    endpoint = endpoint or src.endpoint
    if method == "function":
        return Path(hot_clone(endpoint, label).directory)
    target = src.clone_area / label
    if not src.clone_area.exists():
        src.clone_area.mkdir()
        chown_postgres(src.clone_area)  # the function's copies land here too
    copier = LocalCopier((server or src.server).pgdata, target)
    native_hot_clone(endpoint, label, copier)
    return target


METHODS = pytest.mark.parametrize("method", ["function", "native"])


def counts(server: PostgresServer) -> dict[str, str]:
    return {
        t: server.psql(f"SELECT count(*) FROM {t}", db="app")
        for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
    }


def check_clone(src: Source, directory: Path) -> PostgresServer:
    clone = boot_clone(directory, src.fs.work / "sock", src.server.bin)
    assert clone.psql("SELECT pg_is_in_recovery()") == "f"
    return clone


@pytest.mark.every_filesystem
@pytest.mark.every_major
def test_clone_of_a_pgbench_database_boots_with_the_same_rows(source: Source) -> None:
    label = str(uuid.uuid4())
    result = hot_clone(source.endpoint, label)
    assert result.directory == str(source.clone_area / label)
    assert not Path(result.directory, "pgdata", "postmaster.pid").exists()
    assert (
        Path(result.directory, "pgdata", "backup_label")
        .read_text()
        .startswith("START WAL LOCATION")
    )
    clone = check_clone(source, Path(result.directory))
    try:
        assert counts(clone) == counts(source.server)
        assert counts(clone)["pgbench_accounts"] == str(SCALE * 100000)
    finally:
        clone.stop()
        remove(Path(result.directory))
    assert key_dirs() == []


def history_rows(server: PostgresServer) -> int:
    return int(server.psql("SELECT count(*) FROM pgbench_history", db="app"))


@pytest.mark.every_filesystem
@pytest.mark.every_major
@METHODS
def test_clones_taken_under_write_load_boot_and_pass_amcheck(source: Source, method: str) -> None:
    before = history_rows(source.server)
    # -n: keep pgbench_history (the default truncates it, which would break the invariant
    # between sum(delta) and the balances once the test runs for the second method).
    # 12 s: the three clones below are taken within about 5 s of the first commit.
    bench = source.server.pgbench_background("-n", "-c", "2", "-j", "2", "-T", "12")
    clones: list[tuple[str, int]] = []  # label, rows committed before the clone began
    try:
        # The first clone is taken once the load has committed transactions, however long
        # pgbench takes to get going.
        deadline = time.monotonic() + 60
        while history_rows(source.server) == before and bench.poll() is None:
            assert time.monotonic() < deadline, "pgbench committed nothing in 60 s"
            time.sleep(0.1)
        for _ in range(3):
            committed = history_rows(source.server)
            clones.append((take(source, method).name, committed))
            time.sleep(1.5)
        assert bench.poll() is None, "pgbench ended before the last clone: no load to clone under"
    finally:
        out, _ = bench.communicate(timeout=120)
    assert bench.returncode == 0, out
    assert "tps" in out
    for label, committed in clones:
        directory = source.clone_area / label
        # On btrfs the native copy is one snapshot of the source's subvolume, whatever its size;
        # the function's copy (cp --reflink in the server) is a directory of reflinked files.
        assert is_subvolume(directory) == (method == "native" and source.fs.kind == "btrfs")
        clone = check_clone(source, directory)
        try:
            rows = history_rows(clone)
            assert committed > before, "the clone should be taken under the write load"
            assert rows >= committed, "a transaction committed before the clone is missing"
            pgbench_invariant(clone)
            clone.amcheck()
        finally:
            clone.stop()
        # Data checksums (on by initdb here, as CNPG and PostgreSQL 18 have them): every block
        # of the stopped clone, the pages written during the backup included, checks out.
        assert "Bad checksums:  0" in clone.checksums()
        remove(directory)


def log_since(server: PostgresServer, offset: int) -> str:
    with open(server.log_file, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


@pytest.mark.every_filesystem
def test_same_label_returns_the_finished_directory_without_copying(source: Source) -> None:
    # The checkpointer logs "checkpoint starting" before it lets the backup go on, so the log
    # shows every checkpoint a call asked for by the time the call returns. (pg_stat_bgwriter
    # does not: the checkpointer reports its counters only after waking the waiting backend.)
    label = str(uuid.uuid4())
    start = source.server.log_file.stat().st_size
    first = hot_clone(source.endpoint, label)
    marker = Path(first.directory, "pgdata", "PG_VERSION")
    inode = marker.stat().st_ino
    between = source.server.log_file.stat().st_size
    assert "checkpoint starting" in log_since(source.server, start)
    second = hot_clone(source.endpoint, label)
    assert second.directory == first.directory
    assert marker.stat().st_ino == inode
    # No new backup was started, so no new checkpoint was requested.
    assert "checkpoint starting" not in log_since(source.server, between)
    remove(Path(first.directory))


def test_label_being_copied_by_another_session_fails_cleanly(source: Source) -> None:
    label = str(uuid.uuid4())
    holder = psycopg.connect(
        host=str(source.server.socket_dir),
        port=source.server.port,
        user="postgres",
        dbname="postgres",
        autocommit=False,
    )
    try:
        holder.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"pg_reflinker:{label}",)
        )
        with pytest.raises(errors.OperationInProgress) as err:
            hot_clone(source.endpoint, label)
        assert "already being taken" in str(err.value)
    finally:
        holder.close()
    assert partials(source) == []
    assert key_dirs() == []


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        (
            lambda s, c: replace(s, ca_cert=c.read("wrong-ca.crt")),
            errors.FailedPrecondition,
            "pg-xyz-ca",
        ),
        (
            lambda s, c: replace(
                s, client_cert=c.read("other-user.crt"), client_key=c.read("other-user.key")
            ),
            errors.FailedPrecondition,
            "pg-xyz-replication",
        ),
        (lambda s, c: replace(s, cluster="other"), errors.FailedPrecondition, "other-ca"),
        (lambda s, c: replace(s, port=free_port()), errors.SourceUnavailable, "cannot reach"),
    ],
)
def test_connection_problems_map_to_clear_errors(source: Source, change, error, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as err:
        hot_clone(change(source.endpoint, source.certs), str(uuid.uuid4()), connect_timeout=3)
    assert needle in str(err.value)
    assert key_dirs() == []
    assert partials(source) == []


def test_missing_function_points_at_the_reference_implementation(source: Source) -> None:
    source.server.psql("ALTER FUNCTION reflink_snapshot(text) RENAME TO reflink_snapshot_off")
    try:
        with pytest.raises(errors.FailedPrecondition) as err:
            hot_clone(source.endpoint, str(uuid.uuid4()))
    finally:
        source.server.psql("ALTER FUNCTION reflink_snapshot_off(text) RENAME TO reflink_snapshot")
    message = str(err.value)
    assert "reflink_snapshot(text)" in message and "pg-xyz" in message and "apps" in message
    assert "deploy/postgres" in message
    assert key_dirs() == []


def test_revoked_execute_names_the_role(source: Source) -> None:
    source.server.psql("REVOKE EXECUTE ON FUNCTION reflink_snapshot(text) FROM streaming_replica")
    try:
        with pytest.raises(errors.FailedPrecondition) as err:
            hot_clone(source.endpoint, str(uuid.uuid4()))
    finally:
        source.server.psql("GRANT EXECUTE ON FUNCTION reflink_snapshot(text) TO streaming_replica")
    assert "streaming_replica" in str(err.value)
    assert key_dirs() == []


def test_statement_timeout_then_retry_leaves_no_partial(source: Source) -> None:
    label = str(uuid.uuid4())
    with pytest.raises(errors.DeadlineExceeded):
        hot_clone(source.endpoint, label, statement_timeout=0.05)
    assert key_dirs() == []
    result = hot_clone(source.endpoint, label)
    assert partials(source) == []
    assert Path(result.directory, "pgdata", "backup_label").exists()
    remove(Path(result.directory))


def test_stopped_server_is_unavailable_and_retryable(source: Source) -> None:
    source.server.stop()
    try:
        with pytest.raises(errors.SourceUnavailable) as err:
            hot_clone(source.endpoint, str(uuid.uuid4()), connect_timeout=3)
        assert "pg-xyz" in str(err.value)
    finally:
        source.server.start()
    assert key_dirs() == []
    result = hot_clone(source.endpoint, str(uuid.uuid4()))
    remove(Path(result.directory))


def test_key_material_is_private_while_connecting(source: Source) -> None:
    seen: list[tuple[int, list[int]]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for d in key_dirs():
                try:
                    modes = [os.stat(f).st_mode & 0o777 for f in glob.glob(f"{d}/*")]
                    seen.append((os.stat(d).st_mode & 0o777, modes))
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = hot_clone(source.endpoint, str(uuid.uuid4()))
    finally:
        stop.set()
        watcher.join()
    remove(Path(result.directory))
    assert seen, "the key directory was never observed"
    assert all(d == 0o700 and all(m == 0o600 for m in files) for d, files in seen)
    assert key_dirs() == []


def run_snapshot_cli(source: Source, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    c = source.certs
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "reflinker_csi.cli",
            "snapshot",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--cluster",
            "pg-xyz",
            "--namespace",
            "apps",
            "--ca",
            str(c.path("ca.crt")),
            "--cert",
            str(c.path("replication.crt")),
            "--key",
            str(c.path("replication.key")),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
    )


def test_snapshot_cli_prints_directory_and_time(source: Source) -> None:
    label = str(uuid.uuid4())
    result = run_snapshot_cli(source, source.server.port, "--label", label)
    assert result.returncode == 0, result.stderr
    assert str(source.clone_area / label) in result.stdout
    assert "seconds" in result.stdout
    remove(source.clone_area / label)
    bad = run_snapshot_cli(source, free_port())
    assert bad.returncode == 1

    assert "cannot reach" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.every_filesystem
def test_snapshot_cli_takes_a_native_clone_from_a_data_directory_on_this_host(
    source: Source,
) -> None:
    label = str(uuid.uuid4())
    result = run_snapshot_cli(
        source, source.server.port, "--label", label, "--pgdata", str(source.server.pgdata)
    )
    assert result.returncode == 0, result.stderr
    assert "method     native" in result.stdout
    assert str(source.clone_area / label) in result.stdout
    backup_label = (source.clone_area / label / "pgdata" / "backup_label").read_text()
    assert f"LABEL: {label}" in backup_label
    remove(source.clone_area / label)
    assert partials(source) == []


def test_a_program_failure_after_the_whole_statement_timeout_is_a_deadline() -> None:
    """A statement timeout that fires while COPY ... TO PROGRAM runs reaches the client as the
    program's failure (SQLSTATE 38000), not as query_canceled: whether it is a deadline is
    decided by the time the statement ran, not by the message. The same failure before the
    timeout is the function's own failure."""
    from psycopg import errors as pg_errors

    from reflinker_csi.pg.source import _query_error

    server = SourceServer(pod_ip="10.0.0.1", cluster="pg-xyz", namespace="apps")
    failed = pg_errors.ExternalRoutineException('program "cp ..." failed')
    assert isinstance(_query_error(failed, server, timed_out=True), errors.DeadlineExceeded)
    assert isinstance(_query_error(failed, server, timed_out=False), errors.FailedPrecondition)


@pytest.mark.parametrize("version", [140013, 190000, 90624])
def test_a_major_outside_the_supported_range_is_refused_in_one_line(version: int) -> None:
    """No major below 15 or above 18 is here to run: the check is given the version a source
    of that major reports on connecting (the majors that are here pass it in every test)."""
    from reflinker_csi.pg.source import check_major

    server = SourceServer(pod_ip="10.0.0.1", cluster="pg-xyz", namespace="apps")
    with pytest.raises(errors.FailedPrecondition) as err:
        check_major(version, server)
    assert str(err.value) == (
        f"{server.where} runs PostgreSQL {version // 10000}, which pg-reflinker does not clone: "
        "supported majors are 15 to 18"
    )
    for major in MAJORS:
        check_major(major * 10000 + 1, server)


@pytest.mark.every_filesystem
@METHODS
def test_a_source_with_wal_on_another_filesystem_clones_with_every_row(
    setup: tuple[int, str], method: str
) -> None:
    """CNPG's walStorage: pg_wal links to a second volume (here a second XFS filesystem), which
    cannot be reflinked into the clone; the WAL written during the backup is copied instead."""
    major, kind = setup
    data, wal = Filesystem(kind, size="4G"), Filesystem("xfs", size="2G")
    try:
        os.chmod(wal.work, 0o755)
        src = Source(data, major, waldir=wal.mnt / "wal" / "pg_wal", scale=5)
        try:
            assert (src.server.pgdata / "pg_wal").is_symlink()
            src.server.pgbench("-c", "2", "-t", "500")  # WAL beyond the last checkpoint
            directory = take(src, method)
            copied_wal = directory / "pgdata" / "pg_wal"
            assert copied_wal.is_dir() and not copied_wal.is_symlink()
            clone = check_clone(src, directory)
            try:
                assert counts(clone) == counts(src.server)
                assert history_rows(clone) == history_rows(src.server) == 1000
            finally:
                clone.stop()
        finally:
            src.server.stop("immediate")
    finally:
        data.close()
        wal.close()


def pgbench_invariant(clone: PostgresServer) -> None:
    sums = clone.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ',' ||"
        " (SELECT sum(bbalance) FROM pgbench_branches) || ',' ||"
        " (SELECT sum(tbalance) FROM pgbench_tellers) || ',' ||"
        " (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
        db="app",
    )
    assert len(set(sums.split(","))) == 1, f"pgbench invariant broken: {sums}"


def copied_after(directory: Path) -> list[str]:
    """The files of a copy whose inode changed after global/pg_control's (a copy's files are
    made and stamped when copied; pg_control must come after every other file)."""
    control = (directory / "global" / "pg_control").stat().st_ctime_ns
    return [
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and p.stat().st_ctime_ns > control
        and p.relative_to(directory).parts[0] not in ("pg_wal", "backup_label", "tablespace_map")
    ]


def start_standby(source: Source, volume: str) -> PostgresServer:
    """A streaming standby of the source (pg_basebackup -R) on a volume of its own, started."""
    standby = PostgresServer(
        volume=source.fs.mnt / volume,
        port=free_port(),
        socket_dir=source.fs.work / "sock",
        certs=source.certs,
        bin=source.server.bin,
    )
    source.fs.new_volume(standby.volume)
    chown_postgres(standby.volume)
    source.server.basebackup(standby.pgdata, standby=True)
    standby.start()
    return standby


@pytest.mark.every_filesystem
@pytest.mark.every_major(turn=1)
@METHODS
def test_a_standby_clones_as_a_primary_with_the_rows_it_had(source: Source, method: str) -> None:
    """CNPG's prefer-standby: the backup is taken on a streaming replica (no write stalls on the
    primary) while the primary takes writes; the clone reaches consistency, opens as a primary,
    keeps pgbench's invariant and passes amcheck, and its global/pg_control was copied after
    every other file of the data directory (recovery from a standby's backup takes the backup's
    end from it, as from pg_basebackup's copy)."""
    standby = start_standby(source, "volume-standby")
    try:
        source.server.pgbench("-n", "-c", "2", "-t", "200")
        target = source.server.psql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + 60
        while standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'") != "t":
            assert time.monotonic() < deadline, "the standby did not catch up in 60 s"
            time.sleep(0.1)
        assert standby.psql("SELECT pg_is_in_recovery()") == "t"
        replayed = history_rows(standby)
        bench = source.server.pgbench_background("-n", "-c", "2", "-j", "2", "-T", "8")
        try:
            deadline = time.monotonic() + 60
            while history_rows(standby) == replayed and bench.poll() is None:
                assert time.monotonic() < deadline, "the standby replayed no write in 60 s"
                time.sleep(0.1)
            committed = history_rows(standby)
            directory = take(
                source, method, endpoint=replace(source.endpoint, port=standby.port), server=standby
            )
        finally:
            out, _ = bench.communicate(timeout=120)
        assert bench.returncode == 0, out
        assert committed > replayed, "the clone should be taken under the write load"
        label = (directory / "pgdata" / "backup_label").read_text()
        assert "BACKUP FROM: standby" in label
        assert copied_after(directory / "pgdata") == []
        clone = check_clone(source, directory)  # a primary, not in recovery
        try:
            assert history_rows(clone) >= committed
            pgbench_invariant(clone)
            clone.amcheck()
        finally:
            clone.stop()
    finally:
        standby.stop("immediate")
        remove(standby.volume)


def position_of(endpoint: SourceServer) -> Position:
    with source_module.session(endpoint) as conn:
        return source_module.position(conn, endpoint)


def lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def test_a_standbys_position_says_how_far_behind_production_it_is_and_a_bound_refuses_it(
    source: Source,
) -> None:
    """What a copy is as of and the maxSourceLag bound, read as streaming_replica (no
    pg_read_all_stats): a primary has no lag; a standby that replayed all it received has none;
    one whose replay is paused while the primary writes is behind by the age of its last
    replayed transaction and is refused by a smaller bound; one whose stream is down has an
    unknown lag and is refused by any bound, saying so."""
    standby = start_standby(source, "volume-lagging")
    at_standby = replace(source.endpoint, port=standby.port)

    def caught_up() -> Position:
        deadline = time.monotonic() + 60
        while not (at := position_of(at_standby)).caught_up or not at.streaming:
            assert time.monotonic() < deadline, f"the standby did not catch up in 60 s: {at}"
            time.sleep(0.1)
        return at

    try:
        primary = position_of(source.endpoint)
        assert (primary.in_recovery, primary.lag) == (False, 0.0)
        source.server.pgbench("-n", "-c", "1", "-t", "20")
        at = caught_up()
        assert at.in_recovery and at.lag == 0.0
        assert lsn(primary.lsn) <= lsn(at.lsn) <= lsn(position_of(source.endpoint).lsn)
        check_lag(at, 1.0, "the standby")  # caught up: within any bound

        standby.psql("SELECT pg_wal_replay_pause()")
        source.server.pgbench("-n", "-c", "1", "-t", "20")
        deadline = time.monotonic() + 30
        while (at := position_of(at_standby)).caught_up:
            assert time.monotonic() < deadline, "the paused standby received nothing in 30 s"
            time.sleep(0.1)
        time.sleep(2.0)
        at = position_of(at_standby)
        assert at.lag is not None and at.lag >= 2.0, at
        assert lsn(at.lsn) < lsn(position_of(source.endpoint).lsn)
        with pytest.raises(errors.SourceUnavailable) as refused:
            check_lag(at, 1.0, "the standby")
        assert "s behind production" in str(refused.value)
        assert "over the StorageClass's maxSourceLag of 1 s" in str(refused.value)
        check_lag(at, 3600.0, "the standby")
        standby.psql("SELECT pg_wal_replay_resume()")
        assert caught_up().lag == 0.0

        source.server.stop("fast")
        try:
            deadline = time.monotonic() + 30
            while (at := position_of(at_standby)).streaming:
                assert time.monotonic() < deadline, "the WAL receiver outlived its primary"
                time.sleep(0.2)
            assert at.lag is None
            with pytest.raises(errors.SourceUnavailable) as refused:
                check_lag(at, 3600.0, "the standby")
            assert "its WAL receiver is not running" in str(refused.value)
        finally:
            source.server.start()
    finally:
        standby.stop("immediate")
        remove(standby.volume)


def add_tablespace(src: Source, name: str) -> None:
    """A tablespace outside the data directory, on the source's filesystem."""
    location = src.fs.mnt / f"tablespace-{name}"
    location.mkdir()
    chown_postgres(location)
    src.server.psql(f"CREATE TABLESPACE {name} LOCATION '{location}'")


def test_a_source_with_a_tablespace_is_refused_naming_it_and_left_as_it_was(
    source: Source,
) -> None:
    add_tablespace(source, "archive")
    try:
        with pytest.raises(errors.FailedPrecondition) as err:
            hot_clone(source.endpoint, str(uuid.uuid4()))
    finally:
        source.server.psql("DROP TABLESPACE archive")
    assert str(err.value) == (
        f"reflink_snapshot(text) failed on {source.endpoint.where}: reflink_snapshot: "
        "tablespaces archive cannot be cloned (they live outside the data directory); move "
        "their objects to pg_default"
    )
    assert partials(source) == [] and key_dirs() == []
    assert source.server.psql("SELECT count(*) FROM pg_replication_slots") == "0"


def backends(server: PostgresServer) -> str:
    return server.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-reflinker'"
    )


def slots(server: PostgresServer) -> str:
    return server.psql("SELECT count(*) FROM pg_replication_slots")


@pytest.mark.every_major
@pytest.mark.parametrize(
    "revoke, grant, missing",
    [
        (
            "REVOKE EXECUTE ON FUNCTION pg_backup_start(text, boolean) FROM streaming_replica",
            "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO streaming_replica",
            "pg_backup_start(text, boolean)",
        ),
        (
            "REVOKE EXECUTE ON FUNCTION pg_backup_stop(boolean) FROM streaming_replica",
            "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO streaming_replica",
            "pg_backup_stop(boolean)",
        ),
        (
            "ALTER ROLE streaming_replica NOREPLICATION",
            "ALTER ROLE streaming_replica REPLICATION",
            "REPLICATION",
        ),
    ],
)
def test_native_without_a_grant_names_it_and_leaves_the_source_untouched(
    source: Source, revoke: str, grant: str, missing: str
) -> None:
    offset = source.server.log_file.stat().st_size
    source.server.psql(revoke)
    try:
        with pytest.raises(errors.FailedPrecondition) as err:
            take(source, "native")
    finally:
        source.server.psql(grant)
    message = str(err.value)
    assert missing in message and source.endpoint.where in message
    if missing != "REPLICATION":
        # The two statements to run, as they are written in deploy/postgres/.
        assert (
            "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO streaming_replica; "
            "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO streaming_replica;"
        ) in message
        assert "deploy/postgres/native-grants.sql" in message
        grants = (ROOT / "deploy" / "postgres" / "native-grants.sql").read_text()
        assert (
            "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO streaming_replica;"
            in grants
        )
    assert partials(source) == [] and key_dirs() == []
    assert slots(source.server) == "0"
    assert "pg_backup_start" not in log_since(source.server, offset)


def test_native_refuses_tablespaces_by_name(source: Source) -> None:
    add_tablespace(source, "cold")
    try:
        with pytest.raises(errors.FailedPrecondition) as err:
            take(source, "native")
    finally:
        source.server.psql("DROP TABLESPACE cold")
    assert str(err.value) == (
        f"{source.endpoint.where} has tablespaces cold, which live outside the data directory "
        "and cannot be cloned with it alone; copy the whole instance: a new CNPG Cluster with "
        "the same tablespaces (its claims share one capture), a CNPG volumeSnapshot Backup, or "
        "an offline Backup (online: false)"
    )
    assert partials(source) == [] and slots(source.server) == "0"


class FailingCopier(LocalCopier):
    """A copy that fails after the backup began, and whose abandon() (the controller's write
    to the API) looks at the source: in the product it may hang on an API server that does
    not answer, so the source must be out of backup mode by then."""

    def __init__(self, source: Path, target: Path, server: PostgresServer) -> None:
        super().__init__(source, target)
        self.server = server
        self.seen_in_abandon: tuple[str, str] | None = None

    def copy(self, start: Any) -> None:
        raise errors.FailedPrecondition("the node could not copy")

    def abandon(self) -> None:
        deadline = time.monotonic() + 5  # a closed session's backend exits within moments
        while True:
            self.seen_in_abandon = (backends(self.server), slots(self.server))
            if self.seen_in_abandon == ("0", "0") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        super().abandon()


def test_a_failed_copy_ends_the_backup_before_the_api_hears_of_it(source: Source) -> None:
    label = str(uuid.uuid4())
    copier = FailingCopier(source.server.pgdata, source.clone_area / label, source.server)
    with pytest.raises(errors.FailedPrecondition, match="could not copy"):
        native_hot_clone(source.endpoint, label, copier)
    # Our session (and with it the backup and its temporary slot) was gone when abandon ran.
    assert copier.seen_in_abandon == ("0", "0")


class StoppingCopier(LocalCopier):
    """The real file work, with a pause at one point of the hand-off so the test can kill the
    process that holds the backup session there."""

    def __init__(self, source: Path, target: Path, point: str, reached: Any) -> None:
        super().__init__(source, target)
        self.point = point
        self.reached = reached

    def copy(self, start: Any) -> None:
        super().copy(start)
        if self.point == "between start and stop":
            self.reached.set()
            time.sleep(600)

    def finish(self, start: Any, stop: Any) -> None:
        if self.point == "between stop and the WAL copy":
            self.reached.set()
            time.sleep(600)
        super().finish(start, stop)


@pytest.mark.every_filesystem
@pytest.mark.parametrize("point", ["between start and stop", "between stop and the WAL copy"])
def test_killed_mid_clone_leaves_no_backup_no_slot_and_the_retry_succeeds(
    source: Source, point: str
) -> None:
    label = str(uuid.uuid4())
    target = source.clone_area / label
    source.clone_area.mkdir(exist_ok=True)
    offset = source.server.log_file.stat().st_size
    fork = multiprocessing.get_context("fork")
    reached = fork.Event()
    copier = StoppingCopier(source.server.pgdata, target, point, reached)
    child = fork.Process(target=native_hot_clone, args=(source.endpoint, label, copier))
    child.start()
    try:
        assert reached.wait(120), "the clone did not reach the point"
        assert backends(source.server) == "1" and slots(source.server) == "1"
    finally:
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join(30)
    deadline = time.monotonic() + 30
    while backends(source.server) != "0" or slots(source.server) != "0":
        assert time.monotonic() < deadline, "the killed session's backend or slot stayed"
        time.sleep(0.1)
    log = log_since(source.server, offset)
    if point == "between start and stop":
        assert "aborting backup due to backend exiting before pg_backup_stop was called" in log
    assert not target.exists(), "a copy whose WAL was not protected to the end was put in place"
    # The retry with the same label starts over and leaves nothing behind.
    take(source, "native", label=label)
    assert partials(source) == [] and slots(source.server) == "0"
    clone = check_clone(source, target)
    try:
        assert counts(clone) == counts(source.server)
    finally:
        clone.stop()
        remove(target)


@pytest.mark.every_major
def test_a_source_cannot_shadow_what_the_driver_calls(source: Source) -> None:
    """A source server's own functions in public, first on the role's search_path, are never
    what the driver calls: the copy is checked against the real system identifier, and the
    real pg_backup_start/stop run (the clone boots with the rows)."""
    real = source.server.psql("SELECT system_identifier FROM pg_control_system()")
    source.server.psql(
        "CREATE FUNCTION public.pg_control_system(OUT pg_control_version integer, "
        "OUT catalog_version_no integer, OUT system_identifier bigint, "
        "OUT pg_control_last_modified timestamptz) LANGUAGE sql "
        "AS $$ SELECT 1, 1, 42::bigint, now() $$; "
        "CREATE FUNCTION public.pg_backup_stop(boolean, OUT lsn pg_lsn, OUT labelfile text, "
        "OUT spcmapfile text) LANGUAGE sql AS $$ SELECT '0/0'::pg_lsn, 'forged', '' $$; "
        "GRANT EXECUTE ON FUNCTION public.pg_control_system(), public.pg_backup_stop(boolean) "
        "TO streaming_replica; "
        "ALTER ROLE streaming_replica SET search_path = public, pg_catalog"
    )
    try:
        # The trap works for a session that does not fix its search_path.
        assert (
            source.server.psql(
                "SET ROLE streaming_replica; SET search_path = public, pg_catalog; "
                "SELECT system_identifier FROM pg_control_system()"
            ).splitlines()[-1]
            == "42"
        )
        directory = take(source, "native")
    finally:
        source.server.psql(
            "ALTER ROLE streaming_replica RESET search_path; "
            "DROP FUNCTION public.pg_control_system(); DROP FUNCTION public.pg_backup_stop(boolean)"
        )
    label = (directory / "pgdata" / "backup_label").read_text()
    assert "forged" not in label and "START WAL LOCATION" in label
    assert real != "42"
    clone = check_clone(source, directory)
    try:
        assert counts(clone)["pgbench_accounts"] == str(SCALE * 100000)
    finally:
        clone.stop()
        remove(directory)


def test_a_session_cannot_choose_where_the_function_writes(source: Source, tmp_path: Path) -> None:
    """pg_reflinker.hostpath_prefix comes from the server's configuration files only."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chown_postgres(elsewhere)
    label = str(uuid.uuid4())
    out = source.server.psql(
        f"SET pg_reflinker.hostpath_prefix = '{elsewhere}'; SELECT reflink_snapshot('{label}')"
    )
    assert out.splitlines()[-1] == str(source.clone_area / label)
    assert list(elsewhere.iterdir()) == []
    remove(source.clone_area / label)
