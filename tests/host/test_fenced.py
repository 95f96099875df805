"""A fenced CNPG instance is a stopped database: its volume is copied cold while its pod still
mounts it, but only while its PostgreSQL is down (no postmaster.pid, a control file that says it
was shut down), checked before and after the copy. Real PostgreSQL on a real XFS volume, on each
major here (the control file's state is read the same way on each)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflinker_csi.core.errors import FailedPrecondition, SourceUnavailable
from reflinker_csi.core.keys import CTX_SOURCE_POD
from reflinker_csi.core.layout import Layout
from reflinker_csi.core.records import VolumeRecord
from reflinker_csi.disk.local import LocalDisk
from tests.conftest import Filesystem
from tests.pgserver import (
    Certificates,
    PostgresServer,
    boot_clone,
    chown_postgres,
    free_port,
    pg_majors,
    remove,
)

pytestmark = pytest.mark.integration

INSTANCE = "apps/pg-prod-1"
MAJORS = pg_majors()


def record(guid: str = "") -> VolumeRecord:
    return VolumeRecord(
        guid=guid or str(uuid.uuid4()),
        name=f"snapshot-{uuid.uuid4()}",
        node="node-a",
        required_bytes=0,
        limit_bytes=0,
        context={CTX_SOURCE_POD: INSTANCE},
    )


@pytest.fixture(params=list(MAJORS), ids=lambda major: f"pg{major}")
def instance(
    xfs: Filesystem, request: pytest.FixtureRequest
) -> Iterator[tuple[LocalDisk, VolumeRecord, PostgresServer]]:
    os.chmod(xfs.work, 0o755)  # postgres reaches its volume through it
    prefix = xfs.mnt / f"fenced-{uuid.uuid4().hex[:8]}"
    prefix.mkdir()
    disk = LocalDisk(Layout(prefix))
    disk.layout.state_dir.mkdir()
    source = record()
    volume = disk.data_dir(source)
    volume.mkdir()
    chown_postgres(volume)
    certs = Certificates.create(prefix / ".certs", "pg-prod", "apps")
    os.chmod(certs.directory, 0o755)
    server = PostgresServer(
        volume=volume,
        port=free_port(),
        socket_dir=xfs.work / "sock",
        certs=certs,
        bin=MAJORS[request.param],
    )
    server.initdb()
    server.start(extra="-c listen_addresses='' -c ssl=off")
    server.wait_ready()
    server.psql("CREATE TABLE kept AS SELECT g FROM generate_series(1, 1000) g")
    try:
        yield disk, source, server
    finally:
        server.stop("immediate")
        remove(prefix)


def copies(disk: LocalDisk) -> list[str]:
    return sorted(p.name for p in disk.layout.prefix.iterdir() if not p.name.startswith("."))


def test_a_fenced_instance_is_copied_only_once_its_postgresql_has_shut_down(instance) -> None:  # type: ignore[no-untyped-def]
    disk, source, server = instance
    pgdata = disk.data_dir(source) / "pgdata"
    copy = record()
    # Still running (CNPG has fenced it, the instance manager is stopping it): retried later.
    with pytest.raises(SourceUnavailable) as running:
        disk.reflink_copy(source, copy, stopped=pgdata)
    assert str(running.value) == (
        f"{INSTANCE} is fenced, but its PostgreSQL has not shut down yet (postmaster.pid "
        "present); the cold copy is retried once it has"
    )
    assert copies(disk) == [source.guid]
    # Down, but not cleanly (a crash leaves the control file "in production"): not a stopped
    # database either.
    server.stop("immediate")
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    with pytest.raises(SourceUnavailable) as crashed:
        disk.reflink_copy(source, copy, stopped=pgdata)
    assert "control file state 6" in str(crashed.value)
    assert copies(disk) == [source.guid]
    # Shut down cleanly, as CNPG's fencing does: copied, though the pod still mounts it.
    server.start(extra="-c listen_addresses='' -c ssl=off")
    server.wait_ready()
    server.stop("fast")
    disk.reflink_copy(source, copy, stopped=pgdata)
    assert copies(disk) == sorted([source.guid, copy.guid])
    clone = boot_clone(disk.data_dir(copy), server.socket_dir, server.bin)
    try:
        assert clone.psql("SELECT count(*) FROM kept") == "1000"
    finally:
        clone.stop()


def test_a_fenced_pgdata_reached_through_a_link_is_refused(instance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The PGDATA to check is named by the controller from the pod's volumes; a link on the way
    (a tenant's pgdata pointing at another volume) is never followed."""
    disk, source, server = instance
    server.stop("fast")
    elsewhere = disk.layout.prefix / str(uuid.uuid4())
    elsewhere.mkdir()
    (elsewhere / "pgdata").symlink_to(disk.data_dir(source) / "pgdata")
    with pytest.raises(FailedPrecondition, match="is a symbolic link"):
        disk.reflink_copy(source, record(), stopped=elsewhere / "pgdata")


def test_a_data_directory_no_pod_uses_is_copied_cold_only_once_it_shut_down_cleanly(
    instance,
) -> None:  # type: ignore[no-untyped-def]
    """A CNPG pod deleted mid-failover leaves its volume unused for a second while its
    PostgreSQL has not shut down cleanly; with its WAL on another volume (walStorage: pg_wal a
    link) a cold copy then is no database at all, so it waits (retried, and taken hot once the
    instance runs again); once the server shut down cleanly the volume is copied cold. With its
    WAL inside, a crashed data directory is copied as crash recovery finds it."""
    disk, source, server = instance
    pgdata = disk.data_dir(source) / "pgdata"
    server.stop("immediate")
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    crashed = record()
    disk.reflink_copy(source, crashed, clean=True)  # WAL inside: copied
    assert copies(disk) == sorted([source.guid, crashed.guid])
    wal = disk.data_dir(source) / "wal"
    os.rename(pgdata / "pg_wal", wal)
    os.symlink(wal, pgdata / "pg_wal")
    copy = record()
    with pytest.raises(SourceUnavailable) as waiting:
        disk.reflink_copy(source, copy, clean=True)
    assert str(waiting.value) == (
        f"source volume {source.guid} holds a PostgreSQL data directory that no running "
        "instance uses and that was not shut down cleanly (control file state 6): its "
        "instance is restarting or crashed; the clone is retried, and taken hot once the "
        "instance runs again"
    )
    server.start(extra="-c listen_addresses='' -c ssl=off")
    server.wait_ready()
    server.stop("fast")
    disk.reflink_copy(source, copy, clean=True)
    assert copy.guid in copies(disk)
    # A volume with no data directory in it is files, copied as they are.
    plain = record()
    disk.data_dir(plain).mkdir()
    (disk.data_dir(plain) / "seed.sql").write_text("select 1;\n")
    disk.reflink_copy(plain, record(), clean=True)
