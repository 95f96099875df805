"""The node agent: makes each ReflinkVolume of this node real on the local disk, and reports
the node's free space on its Node object.

Level-triggered: each reconcile looks at the record and the disk and does what is missing, so a
restart in the middle of any step converges."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from ..core.errors import FailedPrecondition, ReflinkerError
from ..core.keys import ANNOTATION_FREE_BYTES, ANNOTATION_REPORTED_AT, FINALIZER
from ..core.records import CloneMode, Kind, Phase, VolumeRecord
from ..disk.local import LocalDisk, remove_tree
from .api import NODES, ApiError, Kube
from .model import Meta, record_of
from .registry import KubeRegistry
from .runtime import DONE, Requeue, Result

log = logging.getLogger(__name__)


class NodeAgent:
    def __init__(self, registry: KubeRegistry, disk: LocalDisk, node_id: str) -> None:
        self.registry = registry
        self.disk = disk
        self.node_id = node_id
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
        if FINALIZER not in meta.finalizers or record.phase in (Phase.READY, Phase.FAILED):
            return DONE
        start = time.monotonic()
        try:
            made = self._make(record)
        except (ReflinkerError, OSError) as err:
            log.warning("volume %s failed: %s", record.guid, err)
            self.registry.set_phase(record, Phase.FAILED, err)
            self.changed.set()
            return DONE
        if not made:
            return DONE  # a hot clone not yet delivered: the hotCloneDir update brings it
        self.registry.set_phase(record, Phase.READY)
        self.changed.set()
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
        if record.hot_clone_dir:
            self.disk.adopt(record, Path(record.hot_clone_dir))
            return True
        if record.clone_mode == CloneMode.HOT:
            return False
        if not record.source_id:
            self.disk.make_empty(record)
            return True
        source = self.registry.get(record.source_id)
        if source is None:
            raise FailedPrecondition(
                f"source {record.source_id} of volume {record.guid} no longer exists"
            )
        self.disk.reflink_copy(source, record)
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


class CapacityReporter:
    """Writes the free space under HOSTPATH_PREFIX on this node's Node object: at start, every
    `period` seconds, and soon after a volume of this node was made or removed."""

    def __init__(
        self,
        kube: Kube,
        disk: LocalDisk,
        node_id: str,
        changed: threading.Event,
        period: float = 60.0,
    ) -> None:
        self.kube = kube
        self.disk = disk
        self.node_id = node_id
        self.changed = changed
        self.period = period

    def report(self) -> None:
        free = self.disk.free_bytes()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch: dict[str, object] = {
            "metadata": {
                "annotations": {ANNOTATION_FREE_BYTES: str(free), ANNOTATION_REPORTED_AT: now}
            }
        }
        self.kube.merge_patch(NODES, self.node_id, patch)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.report()
            except ApiError as err:
                log.warning("cannot report free space on node %s: %s", self.node_id, err)
            except OSError as err:
                log.warning("cannot measure free space: %s", err)
            deadline = time.monotonic() + self.period
            while not stop.is_set() and time.monotonic() < deadline:
                if self.changed.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                    self.changed.clear()
                    break
