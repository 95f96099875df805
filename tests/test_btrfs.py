"""Volumes on btrfs: each volume a subvolume capped at its size by a qgroup, each copy of a
volume or snapshot a subvolume snapshot, on a real btrfs loop filesystem through the standalone
driver. (The hot clones on btrfs run in tests/test_hot_clone.py.)"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import csi_pb2
from reflinker_csi.disk.subvolume import is_subvolume
from reflinker_csi.disk.usage import measure
from tests.conftest import Driver, Filesystem, create_request, mount_unavailable
from tests.test_node import publish
from tests.test_space import MiB, used, write

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


def test_a_fresh_clone_owns_nothing_and_owns_what_is_written_into_it(driver: Driver) -> None:
    source = volume(driver, "pvc-src", 512 * MiB)
    write(driver.prefix / source / "base", 256 * MiB)
    clone = volume(driver, "pvc-clone", 512 * MiB, source)
    publish(driver, clone, driver.target_root / "clone")
    assert used(driver, clone, driver.target_root / "clone") == 0

    write(driver.target_root / "clone" / "base", 10 * MiB, offset=100 * MiB, byte=b"\x02")
    # btrfs copies on write the blocks written, no more (no extent size hint as on XFS).
    assert used(driver, clone, driver.target_root / "clone") == 10 * MiB
    assert measure(driver.prefix / source).used_bytes == 256 * MiB
