"""The node agent: makes each ReflinkVolume of this node real on the local disk.

Level-triggered: every pass looks at the record and the disk and does what is missing, so a
restart in the middle of any step converges. A full list runs every resync period; a watch in
between reacts at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from .errors import ReflinkerError
from .kube import (
    GROUP,
    LABEL_NODE,
    PHASE_FAILED,
    PHASE_READY,
    PLURAL,
    VERSION,
    KubeRegistry,
    from_object,
)
from .local import LocalDisk, remove_tree
from .registry import SNAPSHOT, VolumeRecord

log = logging.getLogger(__name__)


def list_and_watch(
    list_fn: Callable[..., Any],
    handle: Callable[[dict[str, Any]], None],
    stop: threading.Event,
    resync_seconds: float,
    what: str,
    **selector: Any,
) -> None:
    """List, handle every item, then watch and handle changes; relist on 410 Gone, on errors
    (with backoff) and every resync period. Returns when stop is set."""
    backoff = 1.0
    while not stop.is_set():
        try:
            listing = list_fn(**selector)
            items = listing["items"] if isinstance(listing, dict) else listing.items
            for item in items:
                handle(item if isinstance(item, dict) else item.to_dict())
            version = (
                listing["metadata"]["resourceVersion"]
                if isinstance(listing, dict)
                else listing.metadata.resource_version
            )
            stream = watch.Watch()
            for event in stream.stream(
                list_fn,
                resource_version=version,
                timeout_seconds=max(1, int(resync_seconds)),
                **selector,
            ):
                if stop.is_set():
                    stream.stop()
                    break
                obj = event["object"]
                if event["type"] in ("ADDED", "MODIFIED"):
                    handle(obj if isinstance(obj, dict) else obj.to_dict())
            backoff = 1.0
        except ApiException as err:
            if err.status != 410:
                log.warning("%s: %s %s; retrying in %.0f s", what, err.status, err.reason, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30)
        except Exception:
            log.exception("%s failed; retrying in %.0f s", what, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 30)


class NodeAgent:
    def __init__(
        self, registry: KubeRegistry, disk: LocalDisk, node_id: str, resync_seconds: float = 30
    ) -> None:
        self.registry = registry
        self.disk = disk
        self.node_id = node_id
        self.resync_seconds = resync_seconds
        self._lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        self.disk.sweep()
        list_and_watch(
            lambda **kw: self.registry.api.custom.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, **kw
            ),
            self.reconcile,
            stop,
            self.resync_seconds,
            "watching ReflinkVolumes",
            label_selector=f"{LABEL_NODE}={self.node_id}",
        )

    def reconcile(self, obj: dict[str, Any]) -> None:
        with self._lock:
            try:
                self._reconcile(obj)
            except Exception:
                log.exception("reconciling ReflinkVolume %s", obj.get("metadata", {}).get("name"))

    def _reconcile(self, obj: dict[str, Any]) -> None:
        record = from_object(obj)
        if record.node != self.node_id:
            return
        if obj["metadata"].get("deletionTimestamp"):
            self._remove(obj, record)
            return
        status = obj.get("status") or {}
        if status.get("phase") in (PHASE_READY, PHASE_FAILED):
            return
        start = time.monotonic()
        try:
            self._make(record)
        except (ReflinkerError, OSError) as err:
            log.warning("volume %s failed: %s", record.guid, err)
            self.registry.set_status(record, PHASE_FAILED, type(err).__name__, str(err))
            return
        if not self.disk.data_dir(record).is_dir():
            return  # a hot clone not yet delivered: a later event brings hotCloneDir
        self.registry.set_status(record, PHASE_READY, "", "")
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

    def _make(self, record: VolumeRecord) -> None:
        if self.disk.data_dir(record).is_dir():
            return
        if record.hot_clone_dir:
            self.disk.adopt(record, Path(record.hot_clone_dir))
            return
        if record.clone_mode == "hot":
            return
        source_id = record.source_volume_id or record.source_snapshot_id
        if not source_id:
            self.disk.make_empty(record)
            return
        source = self.registry.get(source_id)
        if source is None:
            raise ReflinkerError(f"source {source_id} of volume {record.guid} no longer exists")
        self.disk.reflink_copy(source, record)

    def _remove(self, obj: dict[str, Any], record: VolumeRecord) -> None:
        users = self.disk.publishers(record) if record.kind != SNAPSHOT else []
        if users:
            self.registry.set_status(
                record,
                PHASE_FAILED,
                "StillPublished",
                f"still mounted at {', '.join(users)}; removal waits",
            )
            return
        self.disk.remove(record)
        if record.hot_clone_dir:
            leftover = Path(record.hot_clone_dir)
            if self.disk.layout.contains(leftover) and leftover.name == record.guid:
                remove_tree(leftover)
                remove_tree(leftover.with_name(leftover.name + ".partial"))
        self.registry.drop_finalizer(obj)
        log.info("volume removed", extra={"fields": {"guid": record.guid}})
