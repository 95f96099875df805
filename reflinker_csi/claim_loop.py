"""The claim loop: provisions claims that external-provisioner cannot (the design's reconcile loop).

external-provisioner only clones a Bound pg-reflinker volume in the claim's own namespace. This
loop takes the other claims of our StorageClass whose dataSourceRef names a PVC: it finds the
source (dataSourceRef.namespace, else the claim's namespace, then NAMESPACE_PATH in order),
reserves a ReflinkVolume keyed by the claim's UID, has the source's PostgreSQL take
reflink_snapshot(GUID), waits for the node agent, and creates the PV (name = GUID) bound to the
claim. external-provisioner still deletes that PV (it carries the provisioned-by annotation).

It runs on one controller replica at a time (a Lease)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import TOPOLOGY_KEY
from .errors import FailedPrecondition, NotFound, ReflinkerError, VolumeInUse
from .kube import Api, KubeRegistry, api_error
from .kube_controller import (
    ANNOTATION_CLAIM,
    ANNOTATION_GUID,
    ANNOTATION_SOURCE_PVC,
    KubeMaterializer,
)
from .kube_locator import CTX_SOURCE_PVC, KubeSourceLocator
from .layout import Layout, new_guid
from .locator import SourceLocation
from .node_agent import list_and_watch
from .registry import DELETING, VolumeRecord
from .volumes import CTX_CLAIM, CTX_GUID, CTX_HOST_PATH, CTX_NODE, CTX_PV, CTX_SOURCE_VOLUME

log = logging.getLogger(__name__)
COMPONENT = "pg-reflinker.csi/claim-loop"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
MAX_BACKOFF = 60.0
SWEEP_SECONDS = 30.0


class SourceNotFound(NotFound):
    pass


@dataclass
class _Retry:
    due: float
    backoff: float
    source: tuple[str, ...]  # namespaces searched


class Lease:
    """Leader election on a coordination.k8s.io Lease: one holder, renewed while alive."""

    def __init__(self, api: Api, namespace: str, name: str, duration: int = 15) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.duration = duration
        self.identity = f"{socket.gethostname()}-{os.getpid()}"
        self.leading = threading.Event()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                held = self._try()
            except ApiException as err:
                log.warning("lease %s/%s: %s %s", self.namespace, self.name, err.status, err.reason)
                held = False
            if held != self.leading.is_set():
                log.info("claim loop %s", "leading" if held else "standing by")
            (self.leading.set if held else self.leading.clear)()
            stop.wait(self.duration / 3)

    def _try(self) -> bool:
        now = datetime.now(UTC)
        coord = self.api.coordination
        try:
            lease = coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            coord.create_namespaced_lease(
                self.namespace,
                client.V1Lease(
                    metadata=client.V1ObjectMeta(name=self.name),
                    spec=client.V1LeaseSpec(
                        holder_identity=self.identity,
                        acquire_time=now,
                        renew_time=now,
                        lease_duration_seconds=self.duration,
                    ),
                ),
            )
            return True
        spec = lease.spec
        expired = spec.renew_time is None or (
            spec.renew_time + timedelta(seconds=spec.lease_duration_seconds or self.duration) < now
        )
        if spec.holder_identity != self.identity and not expired:
            return False
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = self.duration
        coord.replace_namespaced_lease(self.name, self.namespace, lease)  # resourceVersion-checked
        return True


def _ref(claim: dict[str, Any]) -> dict[str, Any] | None:
    spec = claim.get("spec") or {}
    ref = spec.get("data_source_ref") or spec.get("data_source")
    if not ref or ref.get("kind") != "PersistentVolumeClaim" or ref.get("api_group"):
        return None
    return dict(ref)


class ClaimLoop:
    def __init__(
        self,
        api: Api,
        registry: KubeRegistry,
        locator: KubeSourceLocator,
        materializer: KubeMaterializer,
        layout: Layout,
        driver_name: str,
        storage_class: str,
        namespace_path: tuple[str, ...],
        lease: Lease,
        target_root: Path,
    ) -> None:
        self.api = api
        self.registry = registry
        self.locator = locator
        self.materializer = materializer
        self.layout = layout
        self.driver_name = driver_name
        self.storage_class = storage_class
        self.namespace_path = namespace_path
        self.lease = lease
        self.target_root = target_root
        self._retries: dict[str, _Retry] = {}
        self._next_sweep = 0.0
        self._lock = threading.Lock()

    # -- loop -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        threading.Thread(target=self.lease.run, args=(stop,), daemon=True, name="lease").start()
        list_and_watch(
            self.api.core.list_persistent_volume_claim_for_all_namespaces,
            self.on_claim,
            stop,
            5,
            "watching PersistentVolumeClaims",
        )

    def on_claim(self, claim: dict[str, Any]) -> None:
        if not self.lease.leading.is_set():
            return
        with self._lock:
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + SWEEP_SECONDS
                self.sweep()
            meta = claim.get("metadata") or {}
            # A new PVC may be the source some waiting claim is looking for: retry those now.
            for waiting in self._retries.values():
                if meta.get("name") in waiting.source:
                    waiting.due = 0
            if self._is_ours(claim):
                retry = self._retries.get(meta["uid"])
                if retry is None or retry.due <= time.monotonic():
                    self._attempt(claim, retry)

    def _is_ours(self, claim: dict[str, Any]) -> bool:
        spec, status = claim.get("spec") or {}, claim.get("status") or {}
        meta = claim.get("metadata") or {}
        ref = _ref(claim)
        if (
            ref is None
            or spec.get("storage_class_name") != self.storage_class
            or spec.get("volume_name")
            or status.get("phase") != "Pending"
            or meta.get("deletion_timestamp")
        ):
            return False
        # Leave to external-provisioner: a Bound pg-reflinker volume in the claim's namespace.
        if ref.get("namespace") in (None, "", meta["namespace"]):
            own = self._read_claim(meta["namespace"], ref["name"])
            if own is not None and own.spec.volume_name:
                pv = self._read_pv(own.spec.volume_name)
                if pv is not None and pv.spec.csi and pv.spec.csi.driver == self.driver_name:
                    return False
        return True

    def _attempt(self, claim: dict[str, Any], retry: _Retry | None) -> None:
        meta = claim["metadata"]
        started = time.monotonic()
        try:
            guid, node = self.provision(claim)
        except Exception as err:
            backoff = min(retry.backoff * 2, MAX_BACKOFF) if retry else 2.0
            source = str((_ref(claim) or {}).get("name", ""))
            self._retries[meta["uid"]] = _Retry(time.monotonic() + backoff, backoff, (source,))
            if isinstance(err, ReflinkerError):
                message = str(err)
            else:
                log.exception("claim %s/%s", meta["namespace"], meta["name"])
                message = f"internal error ({type(err).__name__}); the controller log has details"
            self._event(
                claim, "Warning", "ProvisioningFailed", f"{message} (retrying in {backoff:.0f} s)"
            )
            return
        self._retries.pop(meta["uid"], None)
        self._event(
            claim,
            "Normal",
            "ProvisioningSucceeded",
            f"cloned into volume {guid} on node {node} in {time.monotonic() - started:.2f} s",
        )

    def sweep(self) -> None:
        """Delete records of claims that went away before their PV was made (a claim deleted,
        or the controller restarted, mid-provisioning): no orphaned directories."""
        try:
            records = self.registry.list()
        except ReflinkerError as err:
            log.warning("cannot sweep ReflinkVolumes: %s", err)
            return
        for record in records:
            if not record.name.startswith("claim-") or record.state == DELETING:
                continue
            if self._read_pv(record.guid) is not None:
                continue  # bound: external-provisioner deletes it with the claim
            ns, _, name = record.context.get(CTX_CLAIM, "/").partition("/")
            claim = self._read_claim(ns, name) if ns and name else None
            if claim is not None and f"claim-{claim.metadata.uid}" == record.name:
                continue  # still being provisioned or retried
            log.info("removing volume %s: its claim %s/%s is gone", record.guid, ns, name)
            self.registry.remove(record.guid)

    # -- one claim ------------------------------------------------------------------------

    def provision(self, claim: dict[str, Any]) -> tuple[str, str]:
        """Clone the claim's source and bind a new PV to the claim; return (GUID, node)."""
        meta, spec = claim["metadata"], claim["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        ref = _ref(claim)
        assert ref is not None
        source_ns, source = self._find_source(ns, ref)
        pv = self._read_pv(source.spec.volume_name) if source.spec.volume_name else None
        if pv is None:
            raise FailedPrecondition(
                f"source claim {source_ns}/{ref['name']} is not Bound to a volume yet"
            )
        location = self._locate(source_ns, ref["name"], pv)
        self._event(
            claim,
            "Normal",
            "Provisioning",
            f"source {source_ns}/{ref['name']} found"
            + (f", used by {location.in_use_at[0]}" if location.in_use_at else "")
            + f" on node {location.node}",
        )
        ours = pv.spec.csi is not None and pv.spec.csi.driver == self.driver_name
        request = str(((spec.get("resources") or {}).get("requests") or {}).get("storage", "0"))
        guid = new_guid()
        record = VolumeRecord(
            guid=guid,
            name=f"claim-{uid}",
            node=location.node,
            required_bytes=_bytes(request),
            limit_bytes=0,
            source_volume_id=pv.spec.csi.volume_handle if ours else "",
            clone_mode="hot" if location.server else "cold",
            context={**location.context, CTX_CLAIM: f"{ns}/{name}", CTX_PV: guid},
        )
        # Keyed by the claim's UID: a restart, or the next attempt, finds the same GUID.
        record, _ = self.registry.reserve(record)
        # The same path as CreateVolume: hot clone if a server uses the source, then wait for
        # the node agent.
        ready = self.materializer.materialize(record, None, location, 120)
        self._create_pv(claim, ready, location, request)
        return ready.guid, ready.node

    def _find_source(self, ns: str, ref: dict[str, Any]) -> tuple[str, Any]:
        if ref.get("namespace"):
            searched = [ref["namespace"]]
        else:
            searched = [ns, *[n for n in self.namespace_path if n != ns]]
        for candidate in searched:
            found = self._read_claim(candidate, ref["name"])
            if found is not None:
                return candidate, found
        raise SourceNotFound(
            f"source claim {ref['name']!r} not found in namespaces {', '.join(searched)}; "
            "create it there or add its namespace to NAMESPACE_PATH"
        )

    def _locate(self, ns: str, claim: str, pv: Any) -> SourceLocation:
        csi, spec = pv.spec.csi, pv.spec
        ours = csi is not None and csi.driver == self.driver_name
        default_node = ""
        if ours:
            host = self.layout.volume_dir(csi.volume_handle)
            record = self.registry.get(csi.volume_handle)
            default_node = record.node if record else ""
        elif spec.host_path is not None:
            host = Path(spec.host_path.path)
        elif spec.local is not None:
            host = Path(spec.local.path)
        else:
            host = Path()  # a CSI volume of another driver: kubelet's mount, known per pod
        location = self.locator.locate_claim(ns, claim, host, default_node)
        if location.server is None:
            if location.in_use_at:
                raise VolumeInUse(
                    f"source claim {ns}/{claim} is used by "
                    f"{location.in_use_at[0]}; only CNPG instances are cloned"
                )
            if not ours:
                raise FailedPrecondition(
                    f"no running CNPG instance uses source claim {ns}/{claim}; a volume of "
                    "another driver is cloned through its PostgreSQL server, start it"
                )
        if host == Path():
            host = (
                self.target_root
                / "pods"
                / location.pod_uid
                / "volumes"
                / "kubernetes.io~csi"
                / pv.metadata.name
                / "mount"
            )
            location = SourceLocation(**{**location.__dict__, "host_path": host})
        if not location.node:
            raise FailedPrecondition(f"cannot tell which node holds source claim {ns}/{claim}")
        return location

    def _create_pv(
        self, claim: dict[str, Any], record: VolumeRecord, location: SourceLocation, request: str
    ) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        sc = self.api.storage.read_storage_class(self.storage_class)
        attributes = {
            CTX_GUID: record.guid,
            CTX_NODE: record.node,
            CTX_HOST_PATH: str(self.layout.volume_dir(record.guid)),
            **record.context,
        }
        if record.source_volume_id:
            attributes[CTX_SOURCE_VOLUME] = record.source_volume_id
        pv = client.V1PersistentVolume(
            metadata=client.V1ObjectMeta(
                name=record.guid,
                annotations={
                    PROVISIONED_BY: self.driver_name,
                    ANNOTATION_GUID: record.guid,
                    ANNOTATION_SOURCE_PVC: location.context.get(CTX_SOURCE_PVC, ""),
                    ANNOTATION_CLAIM: f"{meta['namespace']}/{meta['name']}",
                },
            ),
            spec=client.V1PersistentVolumeSpec(
                capacity={"storage": request},
                access_modes=spec.get("access_modes") or ["ReadWriteOnce"],
                volume_mode=spec.get("volume_mode") or "Filesystem",
                claim_ref=client.V1ObjectReference(
                    api_version="v1",
                    kind="PersistentVolumeClaim",
                    namespace=meta["namespace"],
                    name=meta["name"],
                    uid=meta["uid"],
                ),
                persistent_volume_reclaim_policy=sc.reclaim_policy or "Delete",
                storage_class_name=self.storage_class,
                csi=client.V1CSIPersistentVolumeSource(
                    driver=self.driver_name, volume_handle=record.guid, volume_attributes=attributes
                ),
                node_affinity=client.V1VolumeNodeAffinity(
                    required=client.V1NodeSelector(
                        node_selector_terms=[
                            client.V1NodeSelectorTerm(
                                match_expressions=[
                                    client.V1NodeSelectorRequirement(
                                        key=TOPOLOGY_KEY, operator="In", values=[record.node]
                                    )
                                ]
                            )
                        ]
                    )
                ),
            ),
        )
        try:
            self.api.core.create_persistent_volume(pv)
        except ApiException as err:
            if err.status != 409:
                raise api_error(err, f"create PersistentVolume {record.guid}") from None

    # -- helpers --------------------------------------------------------------------------

    def _read_claim(self, ns: str, name: str) -> Any:
        try:
            return self.api.core.read_namespaced_persistent_volume_claim(name, ns)
        except ApiException as err:
            if err.status == 404:
                return None
            raise api_error(err, f"read claim {ns}/{name}") from None

    def _read_pv(self, name: str) -> Any:
        try:
            return self.api.core.read_persistent_volume(name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise api_error(err, f"read PersistentVolume {name}") from None

    def _event(self, claim: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = claim["metadata"]
        now = datetime.now(UTC)
        try:
            self.api.core.create_namespaced_event(
                meta["namespace"],
                client.CoreV1Event(
                    metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}."),
                    involved_object=client.V1ObjectReference(
                        api_version="v1",
                        kind="PersistentVolumeClaim",
                        namespace=meta["namespace"],
                        name=meta["name"],
                        uid=meta["uid"],
                    ),
                    reason=reason,
                    message=message[:1000],
                    type=kind,
                    source=client.V1EventSource(component=COMPONENT),
                    first_timestamp=now,
                    last_timestamp=now,
                    count=1,
                ),
            )
        except ApiException as err:
            log.warning(
                "cannot record event on %s/%s: %s", meta["namespace"], meta["name"], err.status
            )
        log.info(
            "claim event",
            extra={
                "fields": {
                    "claim": f"{meta['namespace']}/{meta['name']}",
                    "reason": reason,
                    "msg": message,
                }
            },
        )


def _bytes(quantity: str) -> int:
    from kubernetes.utils import parse_quantity

    try:
        return int(parse_quantity(quantity))
    except ValueError:
        return 0
