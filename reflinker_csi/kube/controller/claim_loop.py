"""The claim loop: provisions claims that external-provisioner cannot.

external-provisioner only clones a Bound pg-reflinker volume in the claim's own namespace. This
loop takes the other claims of our StorageClass whose dataSourceRef names a PVC: it finds the
source (dataSourceRef.namespace, else the claim's namespace, then NAMESPACE_PATH in order),
creates the volume through VolumeService exactly as CreateVolume does (the request name is
claim-<claim UID>, so every retry finds the same GUID), and creates the PV (name = GUID) bound to
the claim. external-provisioner still deletes that PV (it carries the provisioned-by annotation).

It runs on the runtime's work queue (one claim per worker, several claims at once) and only on
the replica that holds the Lease."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ...core.access import require_claim_servable
from ...core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OperationInProgress,
    PermissionDenied,
    ReflinkerError,
    VolumeInUse,
)
from ...core.keys import (
    ANNOTATION_CLAIM,
    ANNOTATION_GUID,
    ANNOTATION_SOURCE_PVC,
    CLAIM_LOOP_COMPONENT,
    CTX_CLAIM,
    CTX_GUID,
    CTX_HOST_PATH,
    CTX_NODE,
    CTX_PV,
    CTX_SOURCE_PVC,
    CTX_SOURCE_VOLUME,
    PROVISIONED_BY,
    TOPOLOGY_KEY,
)
from ...core.layout import Layout
from ...core.locator import SourceLocation
from ...core.records import Phase, VolumeRecord
from ...core.space import parse_quantity
from ...core.volumes import CreateSpec, VolumeService
from ..api import (
    CLAIMS,
    JSON,
    REFERENCEGRANTS,
    STORAGECLASSES,
    VOLUMES,
    ApiError,
    Kube,
    domain_error,
)
from ..events import EventRecorder
from ..fields import strings, text
from ..model import Claim, PersistentVolume, grants_clone, key_of
from ..reflinkvolume import claim_of, record_of
from ..runtime import DONE, Informer, Requeue, Result
from .locator import KubeSourceLocator

log = logging.getLogger(__name__)
BY_CLAIM = "claim"  # the records' index by the claim they were made for
MAX_BACKOFF = 60.0
REQUEST_PREFIX = "claim-"
# external-provisioner names volumes <prefix>-<claim UID>; "pvc" unless --volume-name-prefix.
SIDECAR_PREFIX = "pvc-"


class SourceNotFound(NotFound):
    pass


def request_name(claim: Claim) -> str:
    return REQUEST_PREFIX + claim.meta.uid


def not_found_message(ns: str, name: str, searched: list[str]) -> str:
    """One answer whether the source claim is absent or its namespace has not consented."""
    message = f"source claim {name!r} not found in namespace{'s' * (len(searched) > 1)} "
    message += ", ".join(searched)
    others = [n for n in searched if n != ns]
    if not others:
        return message + "; create it there or add its namespace to NAMESPACE_PATH"
    where = f"namespace {others[0]}" if len(others) == 1 else "the source's namespace"
    return message + (
        f", or not shared with namespace {ns}: a claim of another namespace is cloned only "
        f"while a ReferenceGrant in {where} lets PersistentVolumeClaims of namespace {ns} use "
        f"PersistentVolumeClaim {name} (or all of them); create the claim, or ask the owner of "
        "its namespace for the grant (docs/cloning-cnpg.md#sources-in-other-namespaces)"
    )


def claim_bytes(claim: Claim) -> int:
    """The claim's storage request in bytes (0: none asked); a quantity that is not a whole
    number of bytes (100m) is refused, never read as no size at all."""
    if not claim.request:
        return 0
    value = parse_quantity(claim.request)
    if value is None:
        raise InvalidArgument(
            f"claim {claim.meta.key} requests storage {claim.request[:40]!r}, which is not a "
            "number of bytes (such as 10Gi, 500M or 1e9); fix spec.resources.requests.storage"
        )
    return value


class ClaimLoop:
    def __init__(
        self,
        kube: Kube,
        volumes: VolumeService,
        claims: Informer,
        persistent_volumes: Informer,
        records: Informer,
        locator: KubeSourceLocator,
        layout: Layout,
        driver_name: str,
        storage_classes: tuple[str, ...],
        namespace_path: tuple[str, ...],
        wait_seconds: float,
        on_error: Callable[[str], None] = lambda loop: None,
        first_backoff: float = 2.0,
    ) -> None:
        self.kube = kube
        self.first_backoff = first_backoff  # doubled on each failure, up to MAX_BACKOFF
        self.on_error = on_error
        self.events = EventRecorder(kube, CLAIM_LOOP_COMPONENT)
        # How long one reconcile waits for its clone before it lets the worker go and comes
        # back: long enough for a whole backup (a native clone's ends with its session).
        self.wait_seconds = wait_seconds
        self.volumes = volumes
        self.claims = claims
        self.pvs = persistent_volumes
        self.records = records
        records.index(BY_CLAIM, claim_of)
        self.locator = locator
        self.layout = layout
        self.driver_name = driver_name
        self.storage_classes = storage_classes  # the classes whose claims this loop serves
        self.namespace_path = namespace_path
        self._lock = threading.Lock()
        self._waiting: dict[str, set[str]] = {}  # source claim name -> waiting claim keys
        self._failures: dict[str, int] = {}  # claim key -> failed attempts in a row
        self._announced: set[str] = set()
        self._provisioned: set[str] = set()  # PV made; waiting for the PV controller to bind

    # -- what to reconcile ------------------------------------------------------------------

    def keys_for_claim(self, key: str) -> list[str]:
        """A changed claim, and the claims waiting for a source of that name."""
        name = key.rpartition("/")[2]
        with self._lock:
            return [key, *sorted(self._waiting.get(name, ()))]

    def _claim(self, key: str) -> Claim | None:
        value = self.claims.get(key)
        return None if value is None else Claim.of(value)

    def _pv(self, name: str) -> PersistentVolume | None:
        value = self.pvs.get(name)
        return None if value is None else PersistentVolume.of(value)

    def _is_ours(self, claim: Claim) -> bool:
        if (
            claim.source is None
            or claim.storage_class not in self.storage_classes
            or claim.volume_name
            or claim.phase != "Pending"
            or claim.meta.deleting
        ):
            return False
        # Leave to external-provisioner: a Bound pg-reflinker volume in the claim's namespace.
        if claim.source.namespace in ("", claim.meta.namespace):
            own = self._claim(key_of(claim.meta.namespace, claim.source.name))
            if own is not None and own.volume_name:
                pv = self._pv(own.volume_name)
                if pv is not None and pv.driver == self.driver_name:
                    return False
        return True

    # -- reconcile --------------------------------------------------------------------------

    def reconcile(self, key: str) -> Result:
        claim = self._claim(key)
        if claim is None or not self._is_ours(claim):
            self._forget(key)
            return DONE
        if key in self._provisioned or self._bound_elsewhere(claim):
            return DONE  # our PV exists: the claim changes until the PV controller binds it
        started = time.monotonic()
        try:
            record = self.provision(claim)
        except OperationInProgress:
            return Requeue(2.0)  # the node agent is still at work, or another worker is
        except Exception as err:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            self.on_error("claim-loop")
            backoff = min(self.first_backoff * 2.0 ** (failures - 1), MAX_BACKOFF)
            if isinstance(err, ReflinkerError):
                message = str(err)
            else:
                log.exception("claim %s", key)
                message = f"internal error ({type(err).__name__}); the controller log has details"
            # The same failure again counts on the same Event (no delay in the message).
            self.event(claim, "Warning", "ProvisioningFailed", message)
            log.info("claim %s: again in %.0f s", key, backoff)
            return Requeue(backoff)
        self._forget(key)
        self._provisioned.add(key)
        self.event(
            claim,
            "Normal",
            "ProvisioningSucceeded",
            f"cloned into volume {record.guid} on node {record.node} in "
            f"{time.monotonic() - started:.2f} s",
        )
        return DONE

    def _bound_elsewhere(self, claim: Claim) -> bool:
        """A PV of ours already names this claim (made before a restart of the controller)."""
        record = self.volumes.registry.get_by_name(request_name(claim))
        return record is not None and self.pvs.get(record.guid) is not None

    def _forget(self, key: str) -> None:
        self._failures.pop(key, None)
        self._announced.discard(key)
        self._provisioned.discard(key)
        with self._lock:
            for waiting in self._waiting.values():
                waiting.discard(key)

    def provision(self, claim: Claim) -> VolumeRecord:
        """Clone the claim's source through VolumeService and bind a new PV to the claim."""
        assert claim.source is not None
        require_claim_servable(claim.meta.key, claim.access_modes, claim.volume_mode)
        source_ns, source = self._find_source(claim)
        pv = self._bound_volume(source_ns, source)
        storage_class = self._storage_class(claim)
        ours = pv.driver == self.driver_name
        location = None if ours else self._locate_foreign(source_ns, source.meta.name, pv)
        if claim.meta.key not in self._announced:
            self._announced.add(claim.meta.key)
            where = (location.in_use_at[0] + " on node " + location.node) if location else ""
            self.event(
                claim,
                "Normal",
                "Provisioning",
                f"cloning source claim {source_ns}/{source.meta.name}"
                + (f", used by {where}" if where else ""),
            )
        spec = CreateSpec(
            name=request_name(claim),
            required_bytes=claim_bytes(claim),
            source_volume_id=pv.handle if ours else "",
            located_source=location,
            # The class's cloneMethod, as csi-provisioner passes it to CreateVolume.
            parameters=strings(storage_class, "parameters"),
            context={
                CTX_CLAIM: claim.meta.key,
                CTX_SOURCE_PVC: f"{source_ns}/{source.meta.name}",
            },
        )
        record = self.volumes.create(spec, self.wait_seconds)
        self._create_pv(claim, record, storage_class)
        return record

    def _storage_class(self, claim: Claim) -> JSON:
        try:
            return self.kube.get(STORAGECLASSES, claim.storage_class) or {}
        except ApiError as err:
            raise domain_error(err, f"read StorageClass {claim.storage_class}") from None

    def _bound_volume(self, ns: str, source: Claim) -> PersistentVolume:
        """The source claim's volume, only while the two name each other: the claim Bound to
        the PV, and the PV's claimRef naming that claim (namespace, name and uid). A claim that
        merely sets spec.volumeName to someone else's PV stays Pending and gets nothing; the
        answer says nothing of the PV or of the claim it really belongs to."""
        pv = self._pv(source.volume_name) if source.volume_name else None
        ref = pv.claim if pv is not None else None
        if (
            pv is None
            or ref is None
            or source.phase != "Bound"
            or (ref.namespace, ref.name, ref.uid) != (ns, source.meta.name, source.meta.uid)
        ):
            raise FailedPrecondition(
                f"source claim {ns}/{source.meta.name} is not bound to a volume; it is cloned "
                "once it is Bound"
            )
        return pv

    def _find_source(self, claim: Claim) -> tuple[str, Claim]:
        """The source claim: in the claim's own namespace, or in another one searched (its
        dataSourceRef.namespace, else NAMESPACE_PATH in order) that consents by a
        ReferenceGrant, read on every attempt (a grant deleted stops the next clone). A claim
        in a namespace that does not consent is not seen at all: "absent" and "not shared" are
        one answer, so a refusal tells a tenant nothing of another namespace's claims."""
        assert claim.source is not None
        ns, name = claim.meta.namespace, claim.source.name
        if claim.source.namespace:
            searched = [claim.source.namespace]
        else:
            searched = [ns, *[n for n in self.namespace_path if n != ns]]
        for candidate in searched:
            if candidate != ns and not self._consents(claim, candidate, name):
                continue
            found = self._claim(key_of(candidate, name))
            if found is not None:
                with self._lock:
                    self._waiting.get(name, set()).discard(claim.meta.key)
                return candidate, found
        with self._lock:
            self._waiting.setdefault(name, set()).add(claim.meta.key)
        raise SourceNotFound(not_found_message(ns, name, searched))

    def _consents(self, claim: Claim, source_ns: str, source: str) -> bool:
        """Whether source_ns has a ReferenceGrant letting claims of the claim's namespace use
        its claim source."""
        try:
            grants, _ = self.kube.list(REFERENCEGRANTS, source_ns)
        except ApiError as err:
            if err.status == 404:
                raise PermissionDenied(
                    f"a source claim in another namespace than {claim.meta.namespace} needs a "
                    "ReferenceGrant in the source's namespace, and the ReferenceGrant CRD "
                    "(gateway.networking.k8s.io) is not installed; install it, then create the "
                    "grant (docs/cloning-cnpg.md#sources-in-other-namespaces)"
                ) from None
            raise domain_error(err, f"list ReferenceGrants in namespace {source_ns}") from None
        return any(grants_clone(g, claim.meta.namespace, source) for g in grants)

    def _locate_foreign(self, ns: str, claim: str, pv: PersistentVolume) -> SourceLocation:
        """A source on another driver is cloned only hot, through the CNPG instance using it."""
        host = Path(pv.host_path) if pv.host_path else None
        location = self.locator.locate_claim(ns, claim, host or Path(), "")
        if location.server is None:
            if location.in_use_at:
                raise VolumeInUse(
                    f"source claim {ns}/{claim} is used by {location.in_use_at[0]}; "
                    "only CNPG instances are cloned"
                )
            raise FailedPrecondition(
                f"no running CNPG instance uses source claim {ns}/{claim}; a volume of "
                "another driver is cloned through its PostgreSQL server, start it"
            )
        if host is None:  # a CSI volume of another driver: where kubelet mounted it for the pod
            mounted = self.locator.node_path(pv, location.pod_uid)
            location = dataclasses.replace(location, host_path=mounted)
        if not location.node:
            raise FailedPrecondition(f"cannot tell which node holds source claim {ns}/{claim}")
        return location

    def _create_pv(self, claim: Claim, record: VolumeRecord, sc: JSON) -> None:
        attributes = {
            CTX_GUID: record.guid,
            CTX_NODE: record.node,
            CTX_HOST_PATH: str(self.layout.volume_dir(record.guid)),
            **record.context,
            CTX_PV: record.guid,
        }
        if record.source_volume_id:
            attributes[CTX_SOURCE_VOLUME] = record.source_volume_id
        body: JSON = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": record.guid,
                "annotations": {
                    PROVISIONED_BY: self.driver_name,
                    ANNOTATION_GUID: record.guid,
                    ANNOTATION_SOURCE_PVC: record.context.get(CTX_SOURCE_PVC, ""),
                    ANNOTATION_CLAIM: claim.meta.key,
                },
            },
            "spec": {
                "capacity": {"storage": claim.request or "1"},
                "accessModes": list(claim.access_modes) or ["ReadWriteOnce"],
                "volumeMode": claim.volume_mode or "Filesystem",
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": claim.meta.namespace,
                    "name": claim.meta.name,
                    "uid": claim.meta.uid,
                },
                "persistentVolumeReclaimPolicy": text(sc, "reclaimPolicy") or "Delete",
                "storageClassName": claim.storage_class,
                "csi": {
                    "driver": self.driver_name,
                    "volumeHandle": record.guid,
                    "volumeAttributes": attributes,
                },
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": TOPOLOGY_KEY, "operator": "In", "values": [record.node]}
                                ]
                            }
                        ]
                    }
                },
            },
        }
        try:
            self.kube.create(VOLUMES, body)
        except ApiError as err:
            if err.status != 409:
                raise domain_error(err, f"create PersistentVolume {record.guid}") from None

    # -- orphans ----------------------------------------------------------------------------

    def reconcile_record(self, key: str) -> Result:
        """Delete the record of a claim that went away (or is going) before its volume was made
        (a claim deleted, or the controller restarted, mid-provisioning): no orphaned directories,
        hot-clone copies or partial copies. Records of the claim loop (`claim-<uid>`) until their
        PV exists; records of csi-provisioner (`pvc-<uid>`, with the claim in their context)
        until they are Ready, after which external-provisioner owns the volume."""
        value = self.records.get(key)
        if value is None:
            return DONE
        record = record_of(value)
        if record.phase == Phase.DELETING or CTX_CLAIM not in record.context:
            return DONE
        if record.name.startswith(REQUEST_PREFIX):
            if self.pvs.get(record.guid) is not None:
                return DONE  # bound: external-provisioner deletes it with the claim
        elif record.name.startswith(SIDECAR_PREFIX):
            if record.phase == Phase.READY or self.pvs.get(record.name) is not None:
                return DONE
        else:
            return DONE
        if self._still_wanted(record, self._claim(record.context[CTX_CLAIM])):
            return DONE  # still being provisioned or retried
        # The caches may be stale (a relist in progress, a watch behind): what they say is gone
        # is read from the API server itself before anything is deleted.
        if self._still_wanted(record, self._live_claim(record.context[CTX_CLAIM])) or (
            self._live_pv(record.guid if record.name.startswith(REQUEST_PREFIX) else record.name)
        ):
            return DONE
        log.info(
            "removing volume %s: its claim %s is gone", record.guid, record.context.get(CTX_CLAIM)
        )
        # The record goes at once (a clone still waiting for it sees Deleting and stops); the
        # node agent removes the directory and then the finalizer.
        self.volumes.registry.remove(record.guid)
        return DONE

    @staticmethod
    def _still_wanted(record: VolumeRecord, claim: Claim | None) -> bool:
        return (
            claim is not None
            and not claim.meta.deleting
            and record.name in (request_name(claim), SIDECAR_PREFIX + claim.meta.uid)
        )

    def _live_claim(self, key: str) -> Claim | None:
        namespace, _, name = key.rpartition("/")
        try:
            value = self.kube.get(CLAIMS, name, namespace)
        except ApiError as err:
            raise domain_error(err, f"read PersistentVolumeClaim {key}") from None
        return None if value is None else Claim.of(value)

    def _live_pv(self, name: str) -> bool:
        try:
            return self.kube.get(VOLUMES, name) is not None
        except ApiError as err:
            raise domain_error(err, f"read PersistentVolume {name}") from None

    def records_of_claim(self, key: str) -> list[str]:
        """The records made for claim key (to check when the claim changes or goes)."""
        return [text(v.get("metadata"), "name") for v in self.records.by_index(BY_CLAIM, key)]

    # -- events -----------------------------------------------------------------------------

    def event(self, claim: Claim, kind: str, reason: str, message: str) -> None:
        involved: JSON = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": claim.meta.namespace,
            "name": claim.meta.name,
            "uid": claim.meta.uid,
        }
        self.events.record(involved, kind, reason, message)
        log.info(
            "claim event",
            extra={"fields": {"claim": claim.meta.key, "reason": reason, "msg": message}},
        )
