"""Space you can see: what a volume owns (bytes shared with no other file) through
NodeGetVolumeStats, and the free-space floor, on a real XFS reflink filesystem."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2
from reflinker_csi.disk.usage import cow_extent_size, measure
from tests.conftest import Driver, Filesystem, create_request, mount_unavailable
from tests.host.test_node import publish

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture(scope="module")
def own_fs() -> Iterator[Filesystem]:
    """A filesystem of its own: the gigabyte written here must not crowd other tests."""
    if reason := mount_unavailable():
        pytest.skip(reason)
    fs = Filesystem("xfs", "3G")
    yield fs
    fs.close()


def write(path: Path, size: int, offset: int = 0, byte: bytes = b"\x01") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = byte * (8 * MiB)
        for at in range(offset, offset + size, len(chunk)):
            os.pwrite(fd, chunk[: min(len(chunk), offset + size - at)], at)
        os.fsync(fd)
    finally:
        os.close(fd)


def used(driver: Driver, volume_id: str, target: Path) -> int:
    stats = driver.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target))
    )
    [usage] = [u for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES]
    return int(usage.used)


def test_a_fresh_clone_owns_nothing_and_owns_what_is_written_into_it(
    own_fs: Filesystem,
    driver_on,  # type: ignore[no-untyped-def]
) -> None:
    driver = driver_on(own_fs.mnt)
    source = driver.controller.CreateVolume(create_request("pvc-gig")).volume.volume_id
    write(driver.prefix / source / "base.1", 1024 * MiB)
    clone = driver.controller.CreateVolume(create_request("pvc-gig-dev", source=source)).volume
    publish(driver, source, driver.target_root / "source")
    publish(driver, clone.volume_id, driver.target_root / "clone")

    # COW_EXTENT_SIZE (8 KiB by default) is set on the prefix and inherited by every volume.
    assert cow_extent_size(driver.prefix) == 8 * 1024
    assert cow_extent_size(driver.prefix / clone.volume_id) == 8 * 1024
    assert used(driver, clone.volume_id, driver.target_root / "clone") == 0
    assert used(driver, source, driver.target_root / "source") == 0  # all of it is shared now

    write(driver.target_root / "clone" / "base.1", 10 * MiB, offset=100 * MiB, byte=b"\x02")
    # Copy-on-write unshares whole CoW extents around what was written.
    clone_owns = used(driver, clone.volume_id, driver.target_root / "clone")
    assert 10 * MiB <= clone_owns <= 11 * MiB
    # The source's blocks under those 10 MiB are no longer shared: they are its own again.
    assert used(driver, source, driver.target_root / "source") == clone_owns
    assert measure(driver.prefix / source).used_bytes == 1024 * MiB


def test_below_the_floor_no_new_volume_and_existing_ones_stay_writable(
    own_fs: Filesystem,
    driver_on,  # type: ignore[no-untyped-def]
) -> None:
    driver = driver_on(own_fs.mnt)
    kept = driver.controller.CreateVolume(create_request("pvc-kept")).volume.volume_id
    publish(driver, kept, driver.target_root / "kept")
    driver.stop()
    driver.env["FREE_SPACE_FLOOR"] = "99%"
    driver.start()

    with pytest.raises(grpc.RpcError) as err:
        driver.controller.CreateVolume(create_request("pvc-new"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(
        rf"node node-a has [0-9.]+ GiB free under {re.escape(str(driver.prefix))}, below the "
        r"floor of [0-9.]+ GiB \(FREE_SPACE_FLOOR=99%\); no new volume is made there until "
        r"space is freed \(existing volumes are not affected\)",
        err.value.details(),
    ), err.value.details()
    assert not any(p.name not in (".pg-reflinker", kept) for p in driver.prefix.iterdir())
    capacity = driver.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    assert capacity.available_capacity == 0

    write(driver.target_root / "kept" / "still-writable", 4 * MiB)
    assert (driver.prefix / kept / "still-writable").stat().st_size == 4 * MiB
