"""Node service: real bind mounts at a target under TARGET_ROOT."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2
from reflinker_csi.disk.mounts import mount_at
from tests.conftest import MOUNT_RW, Driver, code_of, create_request

pytestmark = pytest.mark.integration


def publish(
    driver: Driver,
    volume_id: str,
    target: Path,
    readonly: bool = False,
    flags: tuple[str, ...] = (),
    group: str = "",
) -> None:
    cap = csi_pb2.VolumeCapability()
    cap.CopyFrom(MOUNT_RW)
    cap.mount.mount_flags.extend(flags)
    cap.mount.volume_mount_group = group
    driver.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=str(target), volume_capability=cap, readonly=readonly
        )
    )


def unpublish(driver: Driver, volume_id: str, target: Path) -> None:
    driver.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    )


def test_publish_binds_the_volume_and_unpublish_removes_the_target(driver: Driver) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-pub")).volume
    target = driver.target_root / "pods" / "uid" / "mount"
    target.parent.mkdir(parents=True)
    publish(driver, vol.volume_id, target)
    publish(driver, vol.volume_id, target)  # idempotent
    (target / "written-by-pod").write_text("hello")
    assert (driver.prefix / vol.volume_id / "written-by-pod").read_text() == "hello"
    assert mount_at(target) is not None
    unpublish(driver, vol.volume_id, target)
    unpublish(driver, vol.volume_id, target)  # already gone: still OK
    assert not target.exists()
    assert mount_at(target) is None


def _volume_with_pgdata(driver: Driver, name: str, group: int) -> tuple[str, Path]:
    vol = driver.controller.CreateVolume(create_request(name)).volume
    top = driver.prefix / vol.volume_id
    pgdata = top / "pgdata"
    pgdata.mkdir(mode=0o700)
    (pgdata / "PG_VERSION").write_text("15")
    os.chmod(pgdata / "PG_VERSION", 0o600)
    for path in (top, pgdata, pgdata / "PG_VERSION"):
        os.chown(path, 26, group)
    return vol.volume_id, pgdata


def test_fs_group_already_on_the_volume_leaves_its_files_alone(driver: Driver) -> None:
    """kubelet passes the pod's fsGroup (VOLUME_MOUNT_GROUP) instead of walking the tree. A clone
    mounted by the same kind of pod as its source (CNPG: 26) already has the group: its data
    directory keeps the 0700/0600 modes PostgreSQL insists on; only the top directory becomes
    group-writable and setgid."""
    volume_id, pgdata = _volume_with_pgdata(driver, "pvc-group", group=26)
    target = driver.target_root / "pods" / "uid-group" / "mount"
    target.parent.mkdir(parents=True)
    publish(driver, volume_id, target, group="26")
    try:
        top = os.stat(target)
        assert top.st_gid == 26
        assert top.st_mode & 0o2070 == 0o2070
        assert os.stat(pgdata).st_mode & 0o7777 == 0o700
        assert os.stat(pgdata / "PG_VERSION").st_mode & 0o777 == 0o600
    finally:
        unpublish(driver, volume_id, target)
    caps = driver.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities
    assert csi_pb2.NodeServiceCapability.RPC.VOLUME_MOUNT_GROUP in [c.rpc.type for c in caps]


def test_another_fs_group_is_applied_to_every_file_like_kubelet(driver: Driver) -> None:
    """A pod with another fsGroup gets what kubelet's own walk would give it: every entry in
    the group, group read/write, directories setgid; a symbolic link is not followed."""
    volume_id, pgdata = _volume_with_pgdata(driver, "pvc-regroup", group=26)
    outside = driver.prefix.parent / "outside-the-volume"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    (pgdata / "link").symlink_to(outside)
    target = driver.target_root / "pods" / "uid-regroup" / "mount"
    target.parent.mkdir(parents=True)
    publish(driver, volume_id, target, group="2000")
    try:
        assert os.stat(target).st_gid == 2000
        assert os.stat(pgdata).st_gid == 2000
        assert os.stat(pgdata).st_mode & 0o7777 == 0o2770
        assert os.stat(pgdata / "PG_VERSION").st_gid == 2000
        assert os.stat(pgdata / "PG_VERSION").st_mode & 0o777 == 0o660
        assert os.stat(outside).st_gid == 0 and os.stat(outside).st_mode & 0o777 == 0o600
    finally:
        unpublish(driver, volume_id, target)
        outside.unlink()


def test_a_mount_group_that_is_not_a_group_id_is_refused(driver: Driver) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-badgroup")).volume
    target = driver.target_root / "pods" / "uid-badgroup" / "mount"
    target.parent.mkdir(parents=True)
    with pytest.raises(grpc.RpcError) as err:
        publish(driver, vol.volume_id, target, group="staff")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'staff' is not a numeric group id" in (err.value.details() or "")
    assert not target.exists()


def test_read_only_publish_refuses_writes(driver: Driver) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-ro")).volume
    (driver.prefix / vol.volume_id / "data").write_text("x")
    target = driver.target_root / "ro"
    publish(driver, vol.volume_id, target, readonly=True, flags=("noexec",))
    try:
        with pytest.raises(OSError) as err:
            (target / "new").write_text("y")
        assert err.value.errno == errno.EROFS
        assert (target / "data").read_text() == "x"
        # Same target, other mode: ALREADY_EXISTS.
        assert (
            code_of(
                driver.node.NodePublishVolume,
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vol.volume_id, target_path=str(target), volume_capability=MOUNT_RW
                ),
            )
            == grpc.StatusCode.ALREADY_EXISTS
        )
    finally:
        unpublish(driver, vol.volume_id, target)
    # The volume itself stayed writable.
    (driver.prefix / vol.volume_id / "after").write_text("z")


def test_target_holding_another_volume_is_already_exists(driver: Driver) -> None:
    a = driver.controller.CreateVolume(create_request("pvc-a")).volume
    b = driver.controller.CreateVolume(create_request("pvc-b")).volume
    target = driver.target_root / "shared"
    publish(driver, a.volume_id, target)
    try:
        assert (
            code_of(
                driver.node.NodePublishVolume,
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=b.volume_id, target_path=str(target), volume_capability=MOUNT_RW
                ),
            )
            == grpc.StatusCode.ALREADY_EXISTS
        )
    finally:
        unpublish(driver, a.volume_id, target)


@pytest.mark.parametrize(
    "target",
    [
        "relative/path",
        "/etc/pg-reflinker-test",
        "/tmp/../etc/x",
        "/var/lib/kubelet/\x00x",
        "PREFIX",
        "OUTSIDE_LINK",
    ],
)
def test_foreign_or_malformed_targets_are_refused(
    driver: Driver, tmp_path: Path, target: str
) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-t")).volume
    if target == "PREFIX":
        target = str(driver.prefix / "inside")
    if target == "OUTSIDE_LINK":
        # A symlink inside the target root that points elsewhere must not be followed.
        (driver.target_root / "link").symlink_to(tmp_path)
        target = str(driver.target_root / "link" / "mount")
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, target_path=target, volume_capability=MOUNT_RW
    )
    assert code_of(driver.node.NodePublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT
    assert not Path("/etc/pg-reflinker-test").exists()
    assert list(tmp_path.iterdir()) == []
    assert not (driver.prefix / "inside").exists()


def test_unsupported_mount_flag_is_invalid(driver: Driver) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-flag")).volume
    cap = csi_pb2.VolumeCapability()
    cap.CopyFrom(MOUNT_RW)
    cap.mount.mount_flags.append("uid=1000")
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, volume_capability=cap, target_path=str(driver.target_root / "f")
    )
    assert code_of(driver.node.NodePublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT
    assert not (driver.target_root / "f").exists()


def test_stats_and_condition(driver: Driver) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-stats")).volume
    target = driver.target_root / "stats"
    publish(driver, vol.volume_id, target)
    try:
        stats = driver.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(target))
        )
        units = {u.unit: u for u in stats.usage}
        assert units[csi_pb2.VolumeUsage.BYTES].total > 0
        assert units[csi_pb2.VolumeUsage.INODES].total > 0
        assert not stats.volume_condition.abnormal
        # A path that is not this volume's mount is NOT_FOUND.
        assert (
            code_of(
                driver.node.NodeGetVolumeStats,
                csi_pb2.NodeGetVolumeStatsRequest(
                    volume_id=vol.volume_id, volume_path=str(driver.target_root)
                ),
            )
            == grpc.StatusCode.NOT_FOUND
        )
        # The directory vanishing under a published volume is reported, not hidden.
        os.rename(driver.prefix / vol.volume_id, driver.prefix / "moved-away")
        stats = driver.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(target))
        )
        assert stats.volume_condition.abnormal
        assert vol.volume_id in stats.volume_condition.message
        os.rename(driver.prefix / "moved-away", driver.prefix / vol.volume_id)
    finally:
        unpublish(driver, vol.volume_id, target)


def test_node_info_reports_topology(driver: Driver) -> None:
    info = driver.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "node-a"
    assert info.accessible_topology.segments == {"topology.pg-reflinker.csi/node": "node-a"}
