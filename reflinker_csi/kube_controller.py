"""Controller side of Kubernetes mode: hot clones through the source's server, waiting for the
node agent, and traceability annotations on our PersistentVolumes."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from . import TOPOLOGY_KEY
from .errors import FailedPrecondition, OperationInProgress, SourceUnavailable
from .kube import (
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_READY,
    Api,
    KubeRegistry,
    api_error,
    record_name,
)
from .kube_locator import CTX_SOURCE_PVC
from .layout import Layout
from .locator import SourceLocation
from .node_agent import list_and_watch
from .registry import READY, VolumeRecord
from .source import hot_clone
from .volumes import CTX_CLAIM

log = logging.getLogger(__name__)

ANNOTATION_GUID = "pg-reflinker.csi/guid"
ANNOTATION_SOURCE_PVC = "pg-reflinker.csi/source-pvc"
ANNOTATION_CLAIM = "pg-reflinker.csi/claim"


def host_path_of(returned: str, location: SourceLocation, layout: Layout, label: str) -> str:
    """Map the directory reflink_snapshot() returned (as the server sees it) to the node."""
    own = layout.volume_dir(label)
    if os.path.normpath(returned) == str(own):
        return str(own)
    mount = location.mount_path.rstrip("/")
    normal = os.path.normpath(returned)
    if mount and normal.startswith(mount + "/") and ".." not in returned.split("/"):
        inside = normal[len(mount) + 1 :]
        host = location.host_path / inside
        if host.name == label:
            return str(host)
    raise FailedPrecondition(
        f"reflink_snapshot() returned {returned!r}, which is neither {own} nor a {label} "
        f"directory inside the source volume (mounted at {location.mount_path or '?'}); "
        "check pg_reflinker.hostpath_prefix on the source server"
    )


class KubeMaterializer:
    """Reserve -> (hot clone) -> wait for the node agent to report Ready."""

    def __init__(
        self,
        api: Api,
        registry: KubeRegistry,
        layout: Layout,
        driver_name: str,
        connect_timeout: float,
        statement_timeout: float,
    ) -> None:
        self.api = api
        self.registry = registry
        self.layout = layout
        self.driver_name = driver_name
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout

    def placeable_nodes(self) -> set[str]:
        """Nodes whose CSINode lists this driver with the topology key (the node plugin runs)."""
        try:
            csinodes = self.api.storage.list_csi_node().items
        except ApiException as err:
            raise api_error(err, "list CSINodes") from None
        return {
            n.metadata.name
            for n in csinodes
            for d in (n.spec.drivers or [])
            if d.name == self.driver_name and TOPOLOGY_KEY in (d.topology_keys or [])
        }

    def materialize(
        self,
        record: VolumeRecord,
        source: VolumeRecord | None,
        location: SourceLocation | None,
        timeout: float,
    ) -> VolumeRecord:
        deadline = time.monotonic() + max(1.0, timeout - 1.0)
        obj = self.registry.object(record_name(record.kind, record.name)) or {}
        current = obj.get("spec", {})
        if location is not None and location.server is not None and not current.get("hotCloneDir"):
            budget = min(self.statement_timeout, max(1.0, deadline - time.monotonic()))
            result = hot_clone(location.server, record.guid, self.connect_timeout, budget)
            path = host_path_of(result.directory, location, self.layout, record.guid)
            self.registry.set_hot_clone_dir(record, path)
            log.info(
                "hot clone taken",
                extra={
                    "fields": {
                        "guid": record.guid,
                        "source": location.context.get(CTX_SOURCE_PVC, record.source_volume_id),
                        "s": round(result.seconds, 3),
                    }
                },
            )
        elif record.clone_mode == "hot" and not current.get("hotCloneDir"):
            raise SourceUnavailable(
                f"volume {record.guid} is a hot clone of {record.source_volume_id or 'a claim'}, "
                "but no running CNPG instance uses the source now; retried until one does"
            )
        if (obj.get("status") or {}).get("phase") == PHASE_FAILED:
            # A new attempt: the node agent tries again.
            self.registry.set_status(record, PHASE_PENDING, "Retry", "")
        return self._wait_ready(record, deadline)

    def _wait_ready(self, record: VolumeRecord, deadline: float) -> VolumeRecord:
        delay = 0.05
        name = record_name(record.kind, record.name)
        while True:
            obj = self.registry.object(name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                raise OperationInProgress(f"volume {record.guid} is being deleted; retry later")
            status = obj.get("status") or {}
            if status.get("phase") == PHASE_READY:
                return record.with_state(READY)
            if status.get("phase") == PHASE_FAILED:
                raise FailedPrecondition(
                    f"node {record.node} could not create volume {record.guid}: "
                    f"{status.get('message') or status.get('reason')}"
                )
            if time.monotonic() + delay > deadline:
                raise OperationInProgress(
                    f"volume {record.guid} is not ready yet: waiting for the pg-reflinker node "
                    f"plugin on node {record.node}; the request is retried"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def publishers(self, record: VolumeRecord) -> list[str]:
        # Kubernetes keeps a claim in use from being released; the node agent re-checks mounts.
        return []

    def dematerialize(self, record: VolumeRecord) -> None:
        self.registry.remove(record.guid)


class PvAnnotator:
    """Adds the GUID, the source claim and the claim to PVs of this driver (traceability)."""

    def __init__(self, api: Api, driver_name: str, resync_seconds: float = 60) -> None:
        self.api = api
        self.driver_name = driver_name
        self.resync_seconds = resync_seconds

    def run(self, stop: threading.Event) -> None:
        list_and_watch(
            self.api.core.list_persistent_volume,
            self.annotate,
            stop,
            self.resync_seconds,
            "watching PersistentVolumes",
        )

    def annotate(self, pv: dict[str, Any]) -> None:
        spec, meta = pv.get("spec") or {}, pv.get("metadata") or {}
        csi = spec.get("csi") or {}
        if csi.get("driver") != self.driver_name:
            return
        attributes = csi.get("volume_attributes") or csi.get("volumeAttributes") or {}
        claim = spec.get("claim_ref") or spec.get("claimRef") or {}
        wanted = {ANNOTATION_GUID: csi.get("volume_handle") or csi.get("volumeHandle")}
        if attributes.get(CTX_SOURCE_PVC):
            wanted[ANNOTATION_SOURCE_PVC] = attributes[CTX_SOURCE_PVC]
        if claim.get("name"):
            wanted[ANNOTATION_CLAIM] = f"{claim.get('namespace')}/{claim.get('name')}"
        elif attributes.get(CTX_CLAIM):
            wanted[ANNOTATION_CLAIM] = attributes[CTX_CLAIM]
        have = meta.get("annotations") or {}
        missing = {k: v for k, v in wanted.items() if v and have.get(k) != v}
        if not missing:
            return
        try:
            self.api.core.patch_persistent_volume(
                meta["name"], {"metadata": {"annotations": missing}}
            )
        except ApiException as err:
            log.warning("cannot annotate PV %s: %s %s", meta.get("name"), err.status, err.reason)
