"""Kubernetes mode's create path in-process: VolumeService on ReflinkVolumes, the node agent,
placement and capacity from the nodes' reports. A real API server; the disk is a temporary
directory (empty volumes need no reflinks)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
import shutil
import time
import uuid

import pytest

from reflinker_csi import TOPOLOGY_KEY
from reflinker_csi.core import errors
from reflinker_csi.core.keys import ANNOTATION_FREE_BYTES
from reflinker_csi.core.records import CloneMode, HandOff, Phase, Step, VolumeRecord
from reflinker_csi.core.space import SpaceFloor
from reflinker_csi.core.volumes import CreateSpec
from reflinker_csi.disk.local import LocalDisk
from reflinker_csi.kube.api import EVENTS, NODES, REFLINKVOLUMES, Kube
from reflinker_csi.kube.fields import obj, text
from reflinker_csi.kube.model import Meta
from reflinker_csi.kube.reflinkvolume import hand_off_body, object_name, record_of
from tests.kube.conftest import Mode, add_node, wait_for

GiB = 1 << 30


class FullDisk(LocalDisk):
    """Stand-in for a full filesystem: producing ENOSPC for real needs a loop filesystem and
    root, which these tests do without (tests/host/test_controller.py fills a real one)."""

    def make_empty(self, record: VolumeRecord) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.data_dir(record)))


def reported(admin: Kube, node: str) -> int:
    value = admin.get(NODES, node) or {}
    raw = Meta.of(value).annotations.get(ANNOTATION_FREE_BYTES, "")
    return int(raw) if raw.isdigit() else 0


def test_empty_volume_goes_to_the_node_with_room_and_create_waits_for_its_agent(
    admin: Kube, mode: Mode
) -> None:
    free = reported(admin, mode.node)
    # Nodes that cannot take it: too little room, no node plugin, a report from long ago.
    for name, room, plugin, stale in (
        (f"{mode.node}-small", 1, True, False),
        (f"{mode.node}-noplugin", free * 10, False, False),
        (f"{mode.node}-stale", free * 10, True, True),
    ):
        add_node(admin, name, room, plugin, stale)
        mode.nodes.append(name)
    volumes = mode.controller.volumes
    wait_for("the controller to see the nodes", lambda: volumes.free_bytes(f"{mode.node}-small"))
    record = volumes.create(CreateSpec(name="pvc-room", required_bytes=GiB), timeout=30)
    assert record.node == mode.node and record.phase == Phase.READY
    assert (mode.prefix / record.guid).is_dir()
    # GetCapacity answers per node from the reports; never from the controller's own disk.
    measured = shutil.disk_usage(mode.prefix).free
    assert abs(volumes.free_bytes(mode.node) - measured) < measured / 10
    assert volumes.free_bytes(f"{mode.node}-small") == 1
    assert volumes.free_bytes(f"{mode.node}-noplugin") == 0
    assert volumes.free_bytes(f"{mode.node}-stale") == 0


def test_no_node_with_room_is_resource_exhausted(admin: Kube, mode: Mode) -> None:
    free = reported(admin, mode.node)
    with pytest.raises(errors.ResourceExhausted) as err:
        mode.controller.volumes.create(CreateSpec(name="pvc-huge", required_bytes=free * 1000), 10)
    assert str(err.value) == (
        "no node can hold the volume: no schedulable node with a pg-reflinker node plugin has "
        "reported enough free "
        "space; check that the node DaemonSet runs and that HOSTPATH_PREFIX has room"
    )


@pytest.mark.parametrize("mode", [{"disk": FullDisk}], indirect=True)
def test_a_node_failure_reaches_the_caller_with_its_own_code(admin: Kube, mode: Mode) -> None:
    with pytest.raises(errors.ResourceExhausted) as err:
        mode.controller.volumes.create(
            CreateSpec(name="pvc-full", preferred=[{TOPOLOGY_KEY: mode.node}]), 30
        )
    [value] = [v for v in admin.list(REFLINKVOLUMES)[0] if record_of(v).name == "pvc-full"]
    record = record_of(value)
    assert (record.phase, record.code) == (Phase.FAILED, "RESOURCE_EXHAUSTED")
    assert str(err.value) == (
        f"node {mode.node} could not create volume {record.guid}: no space left: "
        f"[Errno 28] No space left on device: '{mode.prefix / record.guid}'"
    )


def test_deleting_a_volume_removes_its_directory_and_record(admin: Kube, mode: Mode) -> None:
    volumes = mode.controller.volumes
    record = volumes.create(CreateSpec(name="pvc-gone"), 30)
    assert (mode.prefix / record.guid).is_dir()
    volumes.delete(record.guid)
    wait_for(
        "the record to go",
        lambda: all(record_of(v).guid != record.guid for v in admin.list(REFLINKVOLUMES)[0]),
    )
    assert not (mode.prefix / record.guid).exists()
    assert list(mode.prefix.iterdir()) == [mode.prefix / ".pg-reflinker"]


def test_each_volume_shows_what_it_holds_on_its_record(admin: Kube, mode: Mode) -> None:
    volumes = mode.controller.volumes
    record = volumes.create(CreateSpec(name="pvc-usage"), 30)
    (mode.prefix / record.guid / "data").write_bytes(b"x" * (3 << 20))

    def usage() -> dict[str, object] | None:
        [value] = [v for v in admin.list(REFLINKVOLUMES)[0] if record_of(v).guid == record.guid]
        status = value.get("status")
        found = status.get("usage") if isinstance(status, dict) else None
        if isinstance(found, dict) and found.get("usedBytes") == 3 << 20:
            return found
        return None

    shown = wait_for("the measured usage on the record", usage)
    # This filesystem shares nothing (no reflinks): everything a volume holds is its own.
    assert (shown["ownBytes"], shown["own"], shown["used"]) == (3 << 20, "3.0 MiB", "3.0 MiB")


@pytest.mark.parametrize("mode", [{"floor": SpaceFloor(percent=99.99)}], indirect=True)
def test_below_the_floor_the_node_warns_and_takes_no_new_volume(admin: Kube, mode: Mode) -> None:
    def warning() -> list[str]:
        items, _ = admin.list(EVENTS, "default")
        return [
            f"{text(e, 'type')} {text(e, 'reason')}: {text(e, 'message')}"
            for e in items
            if text(obj(e, "involvedObject"), "name") == mode.node
        ]

    [event] = wait_for("a Warning event on the node", warning)
    assert re.fullmatch(
        rf"Warning LowFreeSpace: [0-9.]+ GiB free under HOSTPATH_PREFIX "
        rf"{re.escape(str(mode.prefix))}; at [0-9.]+ GiB \(FREE_SPACE_FLOOR\) new volumes on "
        r"this node are refused",
        event,
    ), event
    assert mode.controller.volumes.free_bytes(mode.node) == 0
    with pytest.raises(errors.ResourceExhausted) as err:
        mode.controller.volumes.create(
            CreateSpec(name="pvc-floor", requisite=[{TOPOLOGY_KEY: mode.node}]), 10
        )
    assert str(err.value) == (
        f"no requested node can hold the volume: requested ['{mode.node}'], but only [] run the "
        "pg-reflinker node plugin, take new pods and have enough free space; check the "
        "StorageClass allowedTopologies, the node plugin's NODE_ID, cordoned nodes and free space"
    )


def test_a_new_attempt_never_runs_the_old_attempts_step(
    admin: Kube, mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    """A native attempt that failed at Copy, then the controller's retry: the old hand-off is
    gone before the record is Pending again, so the node agent does not run the old Copy (a
    copy outside any backup) and fail the new attempt with it; each step replaces spec.backup."""
    caplog.set_level(logging.INFO, logger="reflinker_csi.kube.handoff")
    registry = mode.controller.volumes.registry
    record, _ = registry.reserve(
        VolumeRecord(
            guid=str(uuid.uuid4()),
            name="pvc-retried",
            node=mode.node,
            required_bytes=0,
            limit_bytes=0,
            clone_mode=CloneMode.HOT,
        )
    )
    source = mode.prefix / str(uuid.uuid4()) / "pgdata"  # no data directory there
    old = HandOff(
        attempt="attempt-1",
        step=Step.COPY,
        source_dir=str(source),
        volumes={"/var/lib/postgresql/wal": "/nowhere/a", "/var/lib/postgresql/other": "/b"},
        system_id="1",
        start_lsn="0/2000028",
        segment_bytes=16 << 20,
    )
    registry.set_hand_off(record, old)  # type: ignore[attr-defined]

    wait_for(
        "the old attempt to fail",
        lambda: registry.get(record.guid).phase == Phase.FAILED or None,
    )
    registry.new_attempt(record)  # type: ignore[attr-defined]
    # The node agent sees the record Pending with no step to do, and leaves it Pending.
    wait_for(
        "the retry's Pending", lambda: registry.get(record.guid).phase == Phase.PENDING or None
    )
    refailed = registry.informer.wait_until(  # type: ignore[attr-defined]
        lambda: True if registry.get(record.guid).phase == Phase.FAILED else None,
        time.monotonic() + 5,
    )
    current = registry.get(record.guid)
    assert refailed is None and current.phase == Phase.PENDING and current.hand_off is None
    # The node agent's log: the old Copy ran once, for its own attempt, never again.
    steps = [
        (r.fields["attempt"], r.fields["step"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "hot clone step" and r.fields["guid"] == record.guid  # type: ignore[attr-defined]
    ]
    assert steps == [("attempt-1", Step.COPY)], steps
    # Each step replaces spec.backup whole: no volume of an earlier step survives in it.
    registry.set_hand_off(record, old)  # type: ignore[attr-defined]
    new = dataclasses.replace(old, attempt="attempt-2", volumes={"/var/lib/postgresql/wal": "/c"})
    registry.set_hand_off(record, new)  # type: ignore[attr-defined]
    value = admin.get(REFLINKVOLUMES, "pvc-retried") or {}
    backup = obj(obj(value, "spec"), "backup")
    assert (backup["attempt"], backup["volumes"]) == (
        "attempt-2",
        {"/var/lib/postgresql/wal": "/c"},
    )


def test_a_writer_whose_attempt_was_replaced_changes_nothing(admin: Kube, mode: Mode) -> None:
    """A deposed leader resumed after its successor began a new attempt (it was frozen after
    its slot was dropped): its Finish and Complete steps and its abandon are refused by the
    API server (JSON-patch tests on the attempt), and the successor's attempt is intact. The
    record is on a node without an agent, so only these writers touch it."""
    registry = mode.controller.volumes.registry
    record, _ = registry.reserve(
        VolumeRecord(
            guid=str(uuid.uuid4()),
            name="pvc-fenced",
            node=f"{mode.node}-without-agent",
            required_bytes=0,
            limit_bytes=0,
            clone_mode=CloneMode.HOT,
        )
    )
    stale = HandOff(
        attempt="attempt-1",
        step=Step.COPY,
        source_dir=str(mode.prefix / "src" / "pgdata"),
        volumes={},
        system_id="1",
        start_lsn="0/2000028",
        segment_bytes=16 << 20,
    )
    registry.set_hand_off(record, stale)  # type: ignore[attr-defined]
    successor = dataclasses.replace(stale, attempt="attempt-2")
    registry.set_hand_off(record, successor)  # type: ignore[attr-defined]
    for step in (Step.FINISH, Step.COMPLETE):
        with pytest.raises(
            errors.OperationInProgress, match=r"attempt attempt-1 .* this one stops"
        ):
            registry.set_hand_off(record, dataclasses.replace(stale, step=step))  # type: ignore[attr-defined]
    wait_for(
        "the cache at the successor's attempt",
        lambda: (registry.get(record.guid).hand_off or stale).attempt == "attempt-2" or None,
    )
    gone = errors.SourceUnavailable("abandoned")
    assert registry.fail_attempt(record, "attempt-1", gone) is False  # type: ignore[attr-defined]
    value = admin.get(REFLINKVOLUMES, "pvc-fenced") or {}
    backup = obj(obj(value, "spec"), "backup")
    assert (backup["attempt"], backup["step"]) == ("attempt-2", "Copy")
    assert text(obj(value, "status"), "phase") != "Failed"
    # The successor's own writes go through.
    registry.set_hand_off(record, dataclasses.replace(successor, step=Step.FINISH))  # type: ignore[attr-defined]
    assert registry.fail_attempt(record, "attempt-2", gone) is True  # type: ignore[attr-defined]
    value = admin.get(REFLINKVOLUMES, "pvc-fenced") or {}
    assert text(obj(value, "status"), "phase") == "Failed"
    admin.delete(REFLINKVOLUMES, "pvc-fenced")
    registry.drop_finalizer(admin.get(REFLINKVOLUMES, "pvc-fenced") or {})  # no agent here


def test_a_step_with_a_broken_lsn_fails_the_attempt_and_says_why(admin: Kube, mode: Mode) -> None:
    registry = mode.controller.volumes.registry
    record, _ = registry.reserve(
        VolumeRecord(
            guid=str(uuid.uuid4()),
            name="pvc-broken-lsn",
            node=mode.node,
            required_bytes=0,
            limit_bytes=0,
            clone_mode=CloneMode.HOT,
        )
    )
    source = mode.prefix / str(uuid.uuid4()) / "pgdata"
    source.mkdir(parents=True)
    step = HandOff(
        attempt="attempt-1",
        step=Step.FINISH,
        source_dir=str(source),
        volumes={},
        system_id="1",
        start_lsn="0/2000028",
        segment_bytes=16 << 20,
        stop_lsn="not-an-lsn",
    )
    # The record at Finish as a broken controller would leave it (written whole: the
    # registry refuses a Finish whose attempt is not the record's).
    admin.json_patch(
        REFLINKVOLUMES,
        object_name(record),
        [{"op": "add", "path": "/spec/backup", "value": hand_off_body(step)}],
    )
    failed = wait_for(
        "the attempt to fail",
        lambda: (
            registry.get(record.guid) if registry.get(record.guid).phase == Phase.FAILED else None
        ),
    )
    assert (failed.code, failed.message) == (
        "FAILED_PRECONDITION",
        "spec.backup.stopLSN 'not-an-lsn' of the record is not an LSN; the clone starts over",
    )
