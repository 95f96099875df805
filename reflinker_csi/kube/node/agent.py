"""The node agent: makes each ReflinkVolume of this node real on the local disk, and reports
the node's free space on its Node object.

Level-triggered: each reconcile looks at the record and the disk and does what is missing, so a
restart in the middle of any step converges."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ...core.errors import (
    FailedPrecondition,
    ReflinkerError,
    ReflinkUnsupported,
    SourceUnavailable,
    classify,
)
from ...core.keys import (
    ANNOTATION_FILESYSTEM,
    ANNOTATION_FLOOR_BYTES,
    ANNOTATION_FREE_BYTES,
    ANNOTATION_REPORTED_AT,
    CTX_CLAIM,
    CTX_PIECE,
    CTX_SOURCE_FENCED,
    CTX_WAL_LINK,
    FINALIZER,
    NODE_COMPONENT,
    SNAPSHOT_NAME,
    SNAPSHOT_NAMESPACE,
)
from ...core.observe import Recorder
from ...core.records import CloneMode, Kind, Phase, VolumeRecord
from ...core.space import size
from ...disk import reflink
from ...disk.local import LocalDisk, remove_tree
from ...disk.usage import Usage, volume_usage
from ...metrics import Metrics
from ..api import JSON, NODES, ApiError, Kube
from ..events import EventRecorder, stamp
from ..handoff import NodeSteps
from ..model import Meta
from ..reflinkvolume import record_of
from ..registry import KubeRegistry
from ..runtime import DONE, Requeue, Result

log = logging.getLogger(__name__)


def owner_labels(record: VolumeRecord) -> tuple[str, str, str] | None:
    """(namespace, claim, VolumeSnapshot) a volume's metrics are labelled with: what an admin
    knows it by, never its GUID. None for what has neither (a capture, a volume made without
    csi-provisioner's --extra-create-metadata): its space still counts on its record."""
    namespace, _, claim = record.context.get(CTX_CLAIM, "").rpartition("/")
    if record.kind == Kind.VOLUME and claim:
        return namespace, claim, ""
    snapshot = record.parameters.get(SNAPSHOT_NAME, "")
    if record.kind == Kind.SNAPSHOT and snapshot:
        return record.parameters.get(SNAPSHOT_NAMESPACE, ""), "", snapshot
    return None


class NodeAgent:
    def __init__(
        self,
        registry: KubeRegistry,
        disk: LocalDisk,
        node_id: str,
        recorder: Recorder,
        on_error: Callable[[str], None] = lambda loop: None,
    ) -> None:
        self.recorder = recorder
        self.on_error = on_error
        self.registry = registry
        self.disk = disk
        self.node_id = node_id
        self.steps = NodeSteps(registry, disk, node_id)
        # Reconciles on different records run in parallel; a cold copy reads another record.
        self.changed = threading.Event()

    def reconcile(self, key: str) -> Result:
        value = self.registry.informer.get(key)
        if value is None:
            return DONE
        record = record_of(value)
        if record.node != self.node_id:
            return DONE
        meta = Meta.of(value)
        if meta.deleting:
            return self._remove(record, value)
        if FINALIZER not in meta.finalizers or record.phase == Phase.READY:
            return DONE
        if record.phase == Phase.FAILED:
            if record.hand_off is not None:  # an abandoned native attempt's copy
                self.steps.abandoned(record)
            return DONE
        start = time.monotonic()
        try:
            made = self._make(record)
        except (ReflinkerError, OSError) as err:
            log.warning("volume %s failed: %s", record.guid, err)
            self.on_error("node-agent")
            known = classify(err)
            self.recorder.volume_made(record.method, known.code if known else "INTERNAL", 0)
            self.registry.set_phase(record, Phase.FAILED, err)
            self.changed.set()
            return DONE
        if not made:
            return DONE  # a hot clone not yet delivered: the hotCloneDir update brings it
        self.registry.set_phase(record, Phase.READY)
        self.changed.set()
        self.recorder.volume_made(record.method, "OK", time.monotonic() - start)
        log.info(
            "volume ready",
            extra={
                "fields": {
                    "guid": record.guid,
                    "mode": record.clone_mode or "empty",
                    "ms": round((time.monotonic() - start) * 1000, 1),
                }
            },
        )
        return DONE

    def _make(self, record: VolumeRecord) -> bool:
        if self.disk.data_dir(record).is_dir():
            return True
        self.disk.data_dir(record).parent.mkdir(mode=0o700, exist_ok=True)  # snapshots/
        if record.hot_clone_dir:
            self.disk.adopt(record, Path(record.hot_clone_dir))
            return True
        if record.hand_off is not None:
            return self.steps.do(record, record.hand_off)
        if record.capture:
            return self._cut(record)
        if record.clone_mode == CloneMode.HOT:
            return False
        self.disk.check_room(self.node_id)
        if not record.source_id:
            self.disk.make_empty(record)
            return True
        source = self.registry.get(record.source_id)
        if source is None:
            raise FailedPrecondition(
                f"source {record.source_id} of volume {record.guid} no longer exists"
            )
        fenced = record.context.get(CTX_SOURCE_FENCED)
        # No pod uses it now: a data directory in it must have been shut down cleanly (a pod
        # deleted mid-failover leaves one that is not, for a second).
        clean = not fenced and source.kind == Kind.VOLUME
        self.disk.reflink_copy(source, record, Path(fenced) if fenced else None, clean)
        return True

    def _cut(self, record: VolumeRecord) -> bool:
        """A piece of a capture of a whole instance, both on this node."""
        capture = self.registry.get(record.capture)
        if capture is None or capture.kind != Kind.CAPTURE or capture.phase != Phase.READY:
            raise SourceUnavailable(
                f"the capture {record.capture} that {record.kind} {record.guid} is cut from is "
                "gone; the controller takes a new one"
            )
        if capture.node != self.node_id:
            raise FailedPrecondition(
                f"capture {capture.guid} is on node {capture.node}, not on {self.node_id}"
            )
        self.disk.check_room(self.node_id)
        piece = record.context.get(CTX_PIECE, "")
        self.disk.cut_piece(capture, record, piece, record.context.get(CTX_WAL_LINK, ""))
        return True

    def _remove(self, record: VolumeRecord, value: dict[str, object]) -> Result:
        users = self.disk.publishers(record) if record.kind != Kind.SNAPSHOT else []
        if users:
            log.warning(
                "volume %s is deleted but still mounted at %s; removal waits",
                record.guid,
                ", ".join(users),
            )
            return Requeue(10.0)
        self.disk.remove(record)
        if record.hot_clone_dir:
            leftover = Path(record.hot_clone_dir)
            if self.disk.layout.contains(leftover) and leftover.name == record.guid:
                remove_tree(leftover)
                remove_tree(leftover.with_name(leftover.name + ".partial"))
        self.registry.drop_finalizer(value)
        self.changed.set()
        log.info("volume removed", extra={"fields": {"guid": record.guid}})
        return DONE


class NodeSpace:
    """The node's space, on a bounded schedule: free space, inodes and the floor (on the Node
    as annotations, for the controller's placement, and as metrics) every `period` seconds and
    soon after a volume of this node was made or removed; each Ready volume's used and own
    bytes every `usage_interval` seconds (on its record and as metrics; the scan's cost is a
    metric too); a Warning event on the Node when free space falls below twice the floor."""

    def __init__(
        self,
        kube: Kube,
        disk: LocalDisk,
        registry: KubeRegistry,
        node_id: str,
        changed: threading.Event,
        metrics: Metrics,
        period: float = 60.0,
        usage_interval: float = 300.0,
    ) -> None:
        self.kube = kube
        self.disk = disk
        self.registry = registry
        self.node_id = node_id
        self.changed = changed
        self.metrics = metrics
        self.period = period
        self.usage_interval = usage_interval
        self._warned = False
        self._measured: dict[str, Usage] = {}
        self._owners: dict[str, tuple[str, str, str]] = {}  # guid -> its series' labels
        self.events = EventRecorder(kube, NODE_COMPONENT, node_id)

    def report(self) -> None:
        free, floor, inodes = self.disk.space()
        self.metrics.free.labels(self.node_id).set(free)
        self.metrics.free_inodes.labels(self.node_id).set(inodes)
        self.metrics.floor.labels(self.node_id).set(floor)
        now = stamp()
        patch: JSON = {
            "metadata": {
                "annotations": {
                    ANNOTATION_FREE_BYTES: str(free),
                    ANNOTATION_FLOOR_BYTES: str(floor),
                    ANNOTATION_REPORTED_AT: now,
                    ANNOTATION_FILESYSTEM: self.disk.filesystem,
                }
            }
        }
        self.kube.merge_patch(NODES, self.node_id, patch)
        low = free < 2 * floor
        if low and not self._warned:
            self._event(
                "LowFreeSpace",
                f"{size(free)} free under HOSTPATH_PREFIX {self.disk.layout.prefix}; at "
                f"{size(floor)} (FREE_SPACE_FLOOR) new volumes on this node are refused",
            )
        self._warned = low

    def scan(self) -> None:
        """Measure every Ready volume of this node (never following symlinks)."""
        began = time.monotonic()
        records = [r for r in self.registry.list() if r.node == self.node_id]
        self.metrics.volumes.labels(self.node_id).set(len(records))
        seen = set()
        for record in records:
            if record.phase != Phase.READY:
                continue
            directory = self.disk.data_dir(record)
            if not directory.is_dir():
                continue
            usage, _ = volume_usage(directory)
            seen.add(record.guid)
            owner = owner_labels(record)
            if owner is not None:
                self.metrics.used.labels(*owner, self.node_id).set(usage.used_bytes)
                self.metrics.own.labels(*owner, self.node_id).set(usage.own_bytes)
                self._owners[record.guid] = owner
            before = self._measured.get(record.guid)
            if (
                before is None
                or abs(before.own_bytes - usage.own_bytes) >= 1 << 20
                or abs(before.used_bytes - usage.used_bytes) >= 1 << 20
            ):
                self.registry.set_usage(record, usage.used_bytes, usage.own_bytes)
            self._measured[record.guid] = usage
        for gone in set(self._measured) - seen:
            self._measured.pop(gone)
            gone_owner = self._owners.pop(gone, None)
            if gone_owner is not None:
                self.metrics.used.remove(*gone_owner, self.node_id)
                self.metrics.own.remove(*gone_owner, self.node_id)
        self.metrics.scan_seconds.labels(self.node_id).set(time.monotonic() - began)

    def _event(self, reason: str, message: str) -> None:
        warn_on_node(self.events, self.kube, self.node_id, reason, message)
        log.warning("low free space", extra={"fields": {"node": self.node_id, "msg": message}})

    def run(self, stop: threading.Event) -> None:
        next_scan = 0.0
        while not stop.is_set():
            try:
                self.report()
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self.usage_interval
                    self.scan()
            except (ApiError, ReflinkerError) as err:
                self.metrics.reconcile_error("space")
                log.warning("cannot report space on node %s: %s", self.node_id, err)
            except OSError as err:
                self.metrics.reconcile_error("space")
                log.warning("cannot measure space: %s", err)
            deadline = time.monotonic() + min(self.period, self.usage_interval)
            while not stop.is_set() and time.monotonic() < deadline:
                if self.changed.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                    self.changed.clear()
                    break


def warn_on_node(
    events: EventRecorder, kube: Kube, node_id: str, reason: str, message: str
) -> None:
    """A Warning on this node's Node object (`kubectl describe node` shows it)."""
    try:
        node = kube.get(NODES, node_id) or {}
    except ApiError as err:
        log.warning("cannot read node %s for an event: %s", node_id, err)
        return
    involved: JSON = {"apiVersion": "v1", "kind": "Node", "name": node_id, "uid": Meta.of(node).uid}
    events.record(involved, "Warning", reason, message)


def require_reflink_prefix(kube: Kube, disk: LocalDisk, node_id: str) -> None:
    """The node plugin starts only on a prefix that reflinks (XFS reflink=1 or btrfs): a
    prefix on the wrong filesystem (the XFS not mounted yet, so the host's root) is named in
    the log and on the Node, and the plugin exits; kubelet starts it again with backoff, so it
    serves once the filesystem is there. Nothing is made on the wrong filesystem meanwhile."""
    disk.layout.state_dir.mkdir(mode=0o700, exist_ok=True)
    try:
        reflink.probe(disk.layout.state_dir)
    except ReflinkUnsupported as err:
        message = (
            f"{err}; the node plugin exits until HOSTPATH_PREFIX {disk.layout.prefix} reflinks"
        )
        warn_on_node(
            EventRecorder(kube, NODE_COMPONENT, node_id),
            kube,
            node_id,
            "ReflinkUnsupported",
            message,
        )
        raise ReflinkUnsupported(message) from None
