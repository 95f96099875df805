"""Controller service over a real unix socket, on a real XFS reflink filesystem."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2
from reflinker_csi import TOPOLOGY_KEY
from tests.conftest import MOUNT_RW, Driver, Filesystem, code_of, create_request

pytestmark = pytest.mark.integration


def tree_snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_create_is_idempotent_and_reports_what_was_asked(driver: Driver) -> None:
    req = create_request("pvc-1", size=5 << 30)
    first = driver.controller.CreateVolume(req).volume
    again = driver.controller.CreateVolume(req).volume
    assert first.volume_id == again.volume_id
    assert first.capacity_bytes == 5 << 30
    assert first.accessible_topology[0].segments == {TOPOLOGY_KEY: "node-a"}
    assert first.volume_context["pg-reflinker.csi/guid"] == first.volume_id
    assert first.volume_context["pg-reflinker.csi/host-path"] == str(
        driver.prefix / first.volume_id
    )
    assert (driver.prefix / first.volume_id).is_dir()


def test_same_name_with_other_capacity_is_already_exists(driver: Driver) -> None:
    driver.controller.CreateVolume(create_request("pvc-2", size=1 << 30))
    with pytest.raises(grpc.RpcError) as err:
        driver.controller.CreateVolume(create_request("pvc-2", size=2 << 30))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "pvc-2" in err.value.details()


def test_limit_below_required_is_out_of_range(driver: Driver) -> None:
    req = create_request("pvc-3")
    req.capacity_range.limit_bytes = 1
    assert code_of(driver.controller.CreateVolume, req) == grpc.StatusCode.OUT_OF_RANGE


def test_extra_create_metadata_shows_on_the_volume(driver: Driver) -> None:
    req = create_request(
        "pvc-4",
        parameters={
            "csi.storage.k8s.io/pvc/name": "dev-db",
            "csi.storage.k8s.io/pvc/namespace": "apps",
            "csi.storage.k8s.io/pv/name": "pvc-4",
        },
    )
    ctx = driver.controller.CreateVolume(req).volume.volume_context
    assert ctx["pg-reflinker.csi/claim"] == "apps/dev-db"
    assert ctx["pg-reflinker.csi/pv"] == "pvc-4"


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda r: r.ClearField("name"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: setattr(r, "name", "n" * 129), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: setattr(r, "name", "bad\x00name"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: r.ClearField("volume_capabilities"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: r.volume_capabilities[0].block.SetInParent(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda r: setattr(
                r.volume_capabilities[0].access_mode,
                "mode",
                csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda r: r.parameters.update({"replicas": "3"}), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda r: r.accessibility_requirements.requisite.add().segments.update(
                {TOPOLOGY_KEY: "node-z"}
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            lambda r: setattr(r.volume_content_source.volume, "volume_id", "../../etc"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            lambda r: setattr(
                r.volume_content_source.volume, "volume_id", "0b6f4c1e-1111-4222-8333-444455556666"
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            lambda r: setattr(r.volume_content_source.snapshot, "snapshot_id", "/abs"),
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
)
def test_bad_create_requests_get_the_right_code_and_touch_nothing(
    driver: Driver,
    mutate,
    code: grpc.StatusCode,  # type: ignore[no-untyped-def]
) -> None:
    before = tree_snapshot(driver.prefix)
    req = create_request("pvc-bad")
    mutate(req)
    assert code_of(driver.controller.CreateVolume, req) == code
    assert tree_snapshot(driver.prefix) == before


@pytest.mark.parametrize(
    "volume_id",
    [
        "../../etc",
        "/abs",
        "..",
        ".",
        "F0000000-0000-4000-8000-000000000000",
        "not-a-uuid",
        "é",
        "0b6f4c1e-1111-4222-8333-444455556666\x00x",
    ],
)
def test_hostile_volume_ids(driver: Driver, tmp_path: Path, volume_id: str) -> None:
    outside = tmp_path / "keep"
    outside.mkdir()
    before = tree_snapshot(driver.prefix.parent)
    ctl = driver.controller
    # Nothing with such an id can exist: delete succeeds, lookups are NOT_FOUND.
    assert (
        code_of(ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
        == grpc.StatusCode.OK
    )
    assert (
        code_of(
            ctl.ValidateVolumeCapabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=volume_id, volume_capabilities=[MOUNT_RW]
            ),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    target = str(driver.target_root / "pod" / "mount")
    assert (
        code_of(
            driver.node.NodePublishVolume,
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id, target_path=target, volume_capability=MOUNT_RW
            ),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(
            driver.node.NodeGetVolumeStats,
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert tree_snapshot(driver.prefix.parent) == before
    assert outside.is_dir()


def test_delete_is_idempotent_and_removes_the_data(driver: Driver) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-del")).volume
    (driver.prefix / vol.volume_id / "file").write_text("data")
    for _ in range(2):
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not (driver.prefix / vol.volume_id).exists()
    assert [p.name for p in driver.prefix.iterdir()] == [".pg-reflinker"]
    # The name is free again and gets a fresh GUID.
    again = driver.controller.CreateVolume(create_request("pvc-del")).volume
    assert again.volume_id != vol.volume_id


def test_delete_never_follows_a_symlink_out_of_the_prefix(driver: Driver, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    vol = driver.controller.CreateVolume(create_request("pvc-link")).volume
    (driver.prefix / vol.volume_id / "escape").symlink_to(victim)
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert (victim / "precious").read_text() == "keep me"
    assert not (driver.prefix / vol.volume_id).exists()


def test_clone_is_a_reflink_copy_with_owner_and_modes(driver: Driver, xfs: Filesystem) -> None:
    src = driver.controller.CreateVolume(create_request("pvc-src")).volume
    src_dir = driver.prefix / src.volume_id
    (src_dir / "pgdata" / "base").mkdir(parents=True)
    os.chmod(src_dir / "pgdata", 0o700)
    data = os.urandom(1 << 20) * 64  # 64 MiB
    (src_dir / "pgdata" / "base" / "16384").write_bytes(data)
    os.chown(src_dir / "pgdata" / "base" / "16384", 26, 26)
    (src_dir / "pgdata" / "link").symlink_to("base")
    os.sync()
    before = used_bytes(xfs.mnt)

    clone = driver.controller.CreateVolume(create_request("pvc-clone", source=src.volume_id))
    clone_dir = driver.prefix / clone.volume.volume_id
    os.sync()
    grown = used_bytes(xfs.mnt) - before

    copied = clone_dir / "pgdata" / "base" / "16384"
    assert copied.read_bytes() == data
    assert (copied.stat().st_uid, copied.stat().st_gid) == (26, 26)
    assert oct((clone_dir / "pgdata").stat().st_mode & 0o777) == oct(0o700)
    assert os.readlink(clone_dir / "pgdata" / "link") == "base"
    assert grown < 8 << 20, f"a reflink clone of 64 MiB used {grown} bytes"
    assert clone.volume.content_source.volume.volume_id == src.volume_id
    assert clone.volume.volume_context["pg-reflinker.csi/source-volume"] == src.volume_id
    # Writing the clone leaves the source untouched.
    copied.write_bytes(b"changed")
    assert (src_dir / "pgdata" / "base" / "16384").read_bytes() == data


def test_clone_must_stay_on_source_node(driver: Driver) -> None:
    src = driver.controller.CreateVolume(create_request("pvc-src-topo")).volume
    req = create_request("pvc-clone-topo", source=src.volume_id)
    req.accessibility_requirements.requisite.add().segments[TOPOLOGY_KEY] = "node-b"
    with pytest.raises(grpc.RpcError) as err:
        driver.controller.CreateVolume(req)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "node-a" in err.value.details() and "node-b" in err.value.details()


def test_clone_of_a_volume_in_use_is_refused(driver: Driver) -> None:
    src = driver.controller.CreateVolume(create_request("pvc-busy")).volume
    target = driver.target_root / "pod-busy"
    driver.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=src.volume_id, target_path=str(target), volume_capability=MOUNT_RW
        )
    )
    with pytest.raises(grpc.RpcError) as err:
        driver.controller.CreateVolume(create_request("pvc-busy-clone", source=src.volume_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "in use" in err.value.details() and "PostgreSQL server" in err.value.details()
    # A published volume cannot be deleted either.
    with pytest.raises(grpc.RpcError) as err:
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=src.volume_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(target) in err.value.details()
    driver.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=src.volume_id, target_path=str(target))
    )
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=src.volume_id))


def test_clone_on_a_filesystem_without_reflink_fails_naming_it(driver_on) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import Filesystem

    tmpfs = Filesystem("tmpfs")
    try:
        drv = driver_on(tmpfs.mnt)
        src = drv.controller.CreateVolume(create_request("pvc-tmpfs")).volume
        (drv.prefix / src.volume_id / "f").write_bytes(b"x" * 10000)
        with pytest.raises(grpc.RpcError) as err:
            drv.controller.CreateVolume(create_request("pvc-tmpfs-clone", source=src.volume_id))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tmpfs" in err.value.details()
        assert "never falls back to a full copy" in err.value.details()
        assert sorted(p.name for p in drv.prefix.iterdir()) == [".pg-reflinker", src.volume_id]
        drv.stop()
    finally:
        tmpfs.close()


def test_snapshot_then_restore(driver: Driver) -> None:
    src = driver.controller.CreateVolume(create_request("pvc-snapsrc")).volume
    (driver.prefix / src.volume_id / "PG_VERSION").write_text("16\n")
    snap = driver.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=src.volume_id)
    ).snapshot
    assert snap.ready_to_use and snap.source_volume_id == src.volume_id
    (driver.prefix / src.volume_id / "PG_VERSION").write_text("changed\n")
    req = create_request("pvc-restored")
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    restored = driver.controller.CreateVolume(req).volume
    assert (driver.prefix / restored.volume_id / "PG_VERSION").read_text() == "16\n"
    listed = driver.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=src.volume_id)
    ).entries
    assert [e.snapshot.snapshot_id for e in listed] == [snap.snapshot_id]
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries == []


def test_list_volumes_pages_and_rejects_foreign_tokens(driver: Driver) -> None:
    ids = sorted(
        driver.controller.CreateVolume(create_request(f"pvc-l{i}")).volume.volume_id
        for i in range(5)
    )
    seen, token = [], ""
    while True:
        page = driver.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token)
        )
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert seen == ids
    assert (
        code_of(driver.controller.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="bogus"))
        == grpc.StatusCode.ABORTED
    )


def test_get_capacity_is_free_space_of_the_prefix_above_the_floor(
    driver: Driver, xfs: Filesystem
) -> None:
    free = driver.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    st = os.statvfs(xfs.mnt)
    floor = st.f_blocks * st.f_frsize * 5 // 100  # FREE_SPACE_FLOOR's default: 5%
    assert abs(free - (st.f_bavail * st.f_frsize - floor)) < 64 << 20
    other = csi_pb2.GetCapacityRequest()
    other.accessible_topology.segments[TOPOLOGY_KEY] = "node-z"
    assert driver.controller.GetCapacity(other).available_capacity == 0


def test_validate_volume_capabilities(driver: Driver) -> None:
    vol = driver.controller.CreateVolume(create_request("pvc-vvc")).volume
    ok = driver.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[MOUNT_RW]
        )
    )
    assert ok.HasField("confirmed")
    block = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=MOUNT_RW.access_mode
    )
    no = driver.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[block]
        )
    )
    assert not no.HasField("confirmed") and "block" in no.message


def test_probe_follows_the_prefix(driver: Driver) -> None:
    assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    info = driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "pg-reflinker.csi" and info.vendor_version
    subprocess.run(
        ["mount", "--bind", "-o", "ro", str(driver.prefix), str(driver.prefix)], check=True
    )
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(driver.prefix)], check=True)
        # Root may still pass access(W_OK) on a read-only mount; the probe checks statvfs flags.
        ready = driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    finally:
        subprocess.run(["umount", str(driver.prefix)], check=True)
    assert ready is False
