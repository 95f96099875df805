"""Typed views of Kubernetes' own objects that pg-reflinker reads (the ReflinkVolume, our own,
is kube/reflinkvolume.py).

Objects arrive as JSON (api.py) and are parsed here, once, into frozen dataclasses with the
fields the driver uses; a field that is missing or of the wrong type reads as empty, so a
hostile or half-written object cannot crash a loop."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from .api import JSON
from .fields import number, obj, objs, strings, text, texts

# -- typed access to JSON -----------------------------------------------------------------------


def key_of(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


# -- metadata -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    finalizers: tuple[str, ...] = ()
    deleting: bool = False
    created: str = ""

    @property
    def key(self) -> str:
        return key_of(self.namespace, self.name)

    @classmethod
    def of(cls, value: JSON) -> Meta:
        m = obj(value, "metadata")
        return cls(
            name=text(m, "name"),
            namespace=text(m, "namespace"),
            uid=text(m, "uid"),
            resource_version=text(m, "resourceVersion"),
            labels=strings(m, "labels"),
            annotations=strings(m, "annotations"),
            finalizers=texts(m, "finalizers"),
            deleting=bool(text(m, "deletionTimestamp")),
            created=text(m, "creationTimestamp"),
        )


# -- core objects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    name: str
    mounts: tuple[tuple[str, str], ...]  # (volume name, mount path)
    ports: tuple[tuple[str, int], ...]  # (port name, container port)


@dataclass(frozen=True)
class Pod:
    meta: Meta
    node_name: str
    phase: str
    ready: bool
    ip: str
    claims: tuple[tuple[str, str], ...]  # (volume name, claim name)
    containers: tuple[Container, ...]

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed") or self.meta.deleting

    @classmethod
    def of(cls, value: JSON) -> Pod:
        spec, status = obj(value, "spec"), obj(value, "status")
        return cls(
            meta=Meta.of(value),
            node_name=text(spec, "nodeName"),
            phase=text(status, "phase"),
            ready=any(
                text(c, "type") == "Ready" and text(c, "status") == "True"
                for c in objs(status, "conditions")
            ),
            ip=text(status, "podIP"),
            claims=tuple(
                (text(v, "name"), text(obj(v, "persistentVolumeClaim"), "claimName"))
                for v in objs(spec, "volumes")
                if text(obj(v, "persistentVolumeClaim"), "claimName")
            ),
            containers=tuple(
                Container(
                    name=text(c, "name"),
                    mounts=tuple(
                        (text(m, "name"), text(m, "mountPath")) for m in objs(c, "volumeMounts")
                    ),
                    ports=tuple(
                        (text(p, "name"), number(p, "containerPort")) for p in objs(c, "ports")
                    ),
                )
                for c in objs(spec, "containers")
            ),
        )


@dataclass(frozen=True)
class SourceRef:
    """A claim's dataSourceRef (or dataSource) naming another claim."""

    name: str
    namespace: str  # "" when the claim's own namespace is meant


def grants(grant: JSON, group: str, kind: str, namespace: str, name: str) -> bool:
    """A ReferenceGrant (in the namespace of the object referred to) lets objects of `kind`
    (in `group`) of `namespace` refer to the grant's namespace's object of that kind `name`:
    a `from` entry for that kind and namespace, and a `to` entry for it, all or this one."""
    spec = obj(grant, "spec")
    granted_from = any(
        text(f, "group") == group and text(f, "kind") == kind
        and text(f, "namespace") == namespace
        for f in objs(spec, "from")
    )  # fmt: skip
    granted_to = any(
        text(t, "group") == group and text(t, "kind") == kind and text(t, "name") in ("", name)
        for t in objs(spec, "to")
    )  # fmt: skip
    return granted_from and granted_to


def grants_clone(grant: JSON, claim_namespace: str, source_claim: str) -> bool:
    """Claims of claim_namespace may use source_claim as their data source."""
    return grants(grant, "", "PersistentVolumeClaim", claim_namespace, source_claim)


@dataclass(frozen=True)
class Claim:
    meta: Meta
    storage_class: str
    volume_name: str
    phase: str
    source: SourceRef | None
    request: str
    access_modes: tuple[str, ...]
    volume_mode: str

    @classmethod
    def of(cls, value: JSON) -> Claim:
        spec = obj(value, "spec")
        ref = obj(spec, "dataSourceRef") or obj(spec, "dataSource")
        source = None
        if text(ref, "kind") == "PersistentVolumeClaim" and not text(ref, "apiGroup"):
            source = SourceRef(text(ref, "name"), text(ref, "namespace"))
        return cls(
            meta=Meta.of(value),
            storage_class=text(spec, "storageClassName"),
            volume_name=text(spec, "volumeName"),
            phase=text(obj(value, "status"), "phase"),
            source=source,
            request=text(obj(obj(spec, "resources"), "requests"), "storage"),
            access_modes=texts(spec, "accessModes"),
            volume_mode=text(spec, "volumeMode"),
        )


@dataclass(frozen=True)
class ClaimRef:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class PersistentVolume:
    meta: Meta
    driver: str
    handle: str
    attributes: Mapping[str, str]
    claim: ClaimRef | None
    host_path: str  # hostPath or local path, when the volume is one

    @classmethod
    def of(cls, value: JSON) -> PersistentVolume:
        spec = obj(value, "spec")
        csi, ref = obj(spec, "csi"), obj(spec, "claimRef")
        return cls(
            meta=Meta.of(value),
            driver=text(csi, "driver"),
            handle=text(csi, "volumeHandle"),
            attributes=strings(csi, "volumeAttributes"),
            claim=(
                ClaimRef(text(ref, "namespace"), text(ref, "name"), text(ref, "uid"))
                if text(ref, "name")
                else None
            ),
            host_path=text(obj(spec, "hostPath"), "path") or text(obj(spec, "local"), "path"),
        )


@dataclass(frozen=True)
class CSINode:
    name: str
    topology_keys: Mapping[str, tuple[str, ...]]  # driver name -> its topology keys

    @classmethod
    def of(cls, value: JSON) -> CSINode:
        return cls(
            name=Meta.of(value).name,
            topology_keys={
                text(d, "name"): texts(d, "topologyKeys")
                for d in objs(obj(value, "spec"), "drivers")
            },
        )


@dataclass(frozen=True)
class Lease:
    holder: str
    renewed: datetime | None
    duration: int
    resource_version: str

    @classmethod
    def of(cls, value: JSON) -> Lease:
        spec = obj(value, "spec")
        renewed = text(spec, "renewTime")
        return cls(
            holder=text(spec, "holderIdentity"),
            renewed=parse_time(renewed) if renewed else None,
            duration=number(spec, "leaseDurationSeconds"),
            resource_version=Meta.of(value).resource_version,
        )


def parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
