"""Volumes on btrfs: each volume a subvolume capped at its size by a qgroup, each copy of a
volume or snapshot a subvolume snapshot, on a real btrfs loop filesystem through the standalone
driver. (The hot clones on btrfs run in tests/host/test_hot_clone.py.)"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import csi_pb2
from reflinker_csi.core.capture import PG_DATA, PG_WAL, WAL_LINK, tablespace_piece
from reflinker_csi.core.layout import Layout, new_guid
from reflinker_csi.core.records import Kind, VolumeRecord
from reflinker_csi.disk import subvolume
from reflinker_csi.disk.local import LocalDisk
from reflinker_csi.disk.subvolume import is_subvolume
from reflinker_csi.disk.usage import measure
from tests.conftest import Driver, Filesystem, create_request, mount_unavailable
from tests.host.test_node import publish
from tests.host.test_space import MiB, write

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def btrfs() -> Iterator[Filesystem]:
    if reason := mount_unavailable():
        pytest.skip(reason)
    fs = Filesystem("btrfs", "3G")
    yield fs
    fs.close()


@pytest.fixture
def driver(btrfs: Filesystem, driver_on) -> Driver:  # type: ignore[no-untyped-def]
    return driver_on(btrfs.mnt)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def volume(driver: Driver, name: str, size: int, source: str = "") -> str:
    made = driver.controller.CreateVolume(create_request(name, source=source, size=size))
    return str(made.volume.volume_id)


def test_a_clone_writing_past_its_size_fails_there_and_its_neighbours_keep_writing(
    driver: Driver,
) -> None:
    source = volume(driver, "pvc-src", 64 * MiB)
    assert is_subvolume(driver.prefix / source)
    write(driver.prefix / source / "base", 40 * MiB, byte=b"\x07")
    clone, sibling = (volume(driver, f"pvc-{n}", 64 * MiB, source) for n in ("clone", "sibling"))
    for name in (clone, sibling):
        assert is_subvolume(driver.prefix / name)  # a snapshot of the source's subvolume
        publish(driver, name, driver.target_root / name)
        assert digest(driver.target_root / name / "base") == digest(driver.prefix / source / "base")

    # 40 MiB shared with the source count towards the clone's 64 MiB: 24 more do not fit.
    with pytest.raises(OSError) as err:
        write(driver.target_root / clone / "more", 32 * MiB)
    assert err.value.errno == errno.EDQUOT
    write(driver.prefix / source / "more", 16 * MiB)
    write(driver.target_root / sibling / "more", 16 * MiB)
    assert (driver.target_root / sibling / "more").stat().st_size == 16 * MiB
    # The full clone is still readable, and writable again once it frees space.
    assert digest(driver.target_root / clone / "base") == digest(driver.prefix / source / "base")
    (driver.target_root / clone / "more").unlink()
    write(driver.target_root / clone / "after", 4 * MiB)


def test_deleting_a_source_leaves_its_clones_and_snapshots_intact(driver: Driver) -> None:
    source = volume(driver, "pvc-src", 256 * MiB)
    write(driver.prefix / source / "base", 32 * MiB, byte=b"\x05")
    expected = digest(driver.prefix / source / "base")
    clone = volume(driver, "pvc-clone", 256 * MiB, source)
    snap = driver.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-src", source_volume_id=source)
    ).snapshot
    [snap_dir] = driver.prefix.glob(f".pg-reflinker/snapshots/{snap.snapshot_id}")
    assert is_subvolume(snap_dir)

    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source))
    assert not (driver.prefix / source).exists()
    assert digest(driver.prefix / clone / "base") == expected
    req = create_request("pvc-restored", size=256 * MiB)
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    restored = driver.controller.CreateVolume(req).volume.volume_id
    assert is_subvolume(driver.prefix / restored)
    assert digest(driver.prefix / restored / "base") == expected
    write(driver.prefix / restored / "base", 1 * MiB, byte=b"\x06")
    assert digest(snap_dir / "base") == expected  # the snapshot is not written through


def stats(driver: Driver, volume_id: str, target: Path) -> tuple[int, int, int]:
    """(used, available, total) bytes as NodeGetVolumeStats reports them to kubelet, after a
    sync: btrfs updates qgroups when it commits."""
    os.sync()
    answer = driver.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target))
    )
    [usage] = [u for u in answer.usage if u.unit == csi_pb2.VolumeUsage.BYTES]
    return int(usage.used), int(usage.available), int(usage.total)


def test_a_volume_holding_subvolumes_its_tenant_made_is_deleted_whole(driver: Driver) -> None:
    """A pod may make subvolumes inside its own volume (btrfs lets a directory's owner); the
    volume still goes in one DeleteVolume, and only it."""
    doomed, kept = volume(driver, "pvc-doomed", 64 * MiB), volume(driver, "pvc-kept", 64 * MiB)
    write(driver.prefix / kept / "base", 1 * MiB)
    inner = driver.prefix / doomed / "data" / "inner"
    inner.parent.mkdir()
    subvolume.create(inner)
    subvolume.create(inner / "deeper")
    write(inner / "deeper" / "file", 1 * MiB)
    # A read-only one (btrfs property set -ts ... ro true), whose files cannot be unlinked.
    frozen = driver.prefix / doomed / "frozen"
    subvolume.create(frozen)
    write(frozen / "file", 1 * MiB)
    subprocess.run(["btrfs", "property", "set", "-ts", str(frozen), "ro", "true"], check=True)
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=doomed))
    assert not (driver.prefix / doomed).exists()
    assert (driver.prefix / kept / "base").stat().st_size == 1 * MiB


def test_a_clone_owns_what_is_written_into_it_and_sees_room_up_to_its_size(
    driver: Driver,
) -> None:
    """Own bytes and room from the clone's qgroup, no walk over its files: kubelet's used bytes
    are what the clone alone holds, its capacity the volume's size, its available bytes what
    it may still write before EDQUOT."""
    source = volume(driver, "pvc-src", 512 * MiB)
    write(driver.prefix / source / "base", 256 * MiB)
    clone = volume(driver, "pvc-clone", 512 * MiB, source)
    target = driver.target_root / "clone"
    publish(driver, clone, target)
    own, available, total = stats(driver, clone, target)
    assert own < 1 * MiB  # its own metadata; every data block is shared with the source
    assert total == 512 * MiB
    assert 255 * MiB <= available <= 256 * MiB

    write(target / "base", 10 * MiB, offset=100 * MiB, byte=b"\x02")
    # btrfs copies on write the blocks written, no more (no extent size hint as on XFS).
    own, available, total = stats(driver, clone, target)
    assert 10 * MiB <= own <= 11 * MiB
    # The rewritten blocks count towards the cap: the clone still refers to the rest of each
    # old extent, and btrfs counts an extent whole while any of it is referred to.
    assert 245 * MiB <= available <= 246 * MiB
    write(target / "new", 50 * MiB)
    assert 195 * MiB <= stats(driver, clone, target)[1] <= 196 * MiB
    # The walk over the files agrees with the qgroup on what the source holds.
    assert measure(driver.prefix / source).used_bytes == 256 * MiB


def test_the_pieces_of_a_capture_start_where_cnpg_mounts_them(btrfs: Filesystem) -> None:
    """A capture of a whole instance (a native copy: a subvolume) cut into its pieces: the
    PG_DATA piece is a snapshot of it holding pgdata alone, its pg_wal the link to the new
    instance's WAL volume; the WAL and tablespace pieces are reflinked into subvolumes of
    their own, each capped at its size."""
    layout = Layout(btrfs.mnt / f"prefix-{uuid.uuid4().hex[:8]}")
    layout.prefix.mkdir()
    disk = LocalDisk(layout)
    capture = VolumeRecord(new_guid(), "capture-x", "node-a", 0, 0, kind=Kind.CAPTURE)
    top = disk.data_dir(capture)
    top.parent.mkdir(parents=True)
    subvolume.create(top)
    (top / "pgdata" / "pg_wal").mkdir(parents=True)
    (top / "pgdata" / "PG_VERSION").write_text("18\n")
    (top / "pgdata" / "pg_wal" / "000000010000000000000003").write_bytes(b"w" * 4096)
    (top / "tablespaces" / "ts1" / "data").mkdir(parents=True)
    (top / "tablespaces" / "ts1" / "data" / "16384").write_bytes(b"t" * 4096)

    def piece(name: str, wal_link: str = "") -> Path:
        record = VolumeRecord(new_guid(), f"pvc-{name}", "node-a", 64 * MiB, 0)
        disk.cut_piece(capture, record, name, wal_link)
        made = disk.data_dir(record)
        assert is_subvolume(made)
        return made

    data = piece(PG_DATA, WAL_LINK)
    assert sorted(os.listdir(data)) == ["pgdata"]
    assert (data / "pgdata" / "PG_VERSION").read_text() == "18\n"
    # A snapshot keeps the inode numbers of its subvolume (a copy would make new files).
    version = "pgdata/PG_VERSION"
    assert os.stat(data / version).st_ino == os.stat(top / version).st_ino
    assert os.readlink(data / "pgdata" / "pg_wal") == WAL_LINK
    wal = piece(PG_WAL)
    assert os.listdir(wal / "pg_wal") == ["000000010000000000000003"]
    space = piece(tablespace_piece("ts1"))
    assert (space / "data" / "16384").read_bytes() == b"t" * 4096
    with pytest.raises(OSError) as err:
        write(space / "data" / "big", 80 * MiB)
    assert err.value.errno == errno.EDQUOT
    # The capture itself is untouched by the cutting.
    assert os.listdir(top / "pgdata" / "pg_wal") == ["000000010000000000000003"]
