"""Kubernetes access and the ReflinkVolume record: one custom resource per volume.

The controller creates the record (named from the CSI request name, so a retry finds it); the
node agent on spec.nodeName does the disk work, sets status.phase, and owns the finalizer.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .errors import FailedPrecondition, Unavailable
from .layout import is_guid
from .registry import CREATING, DELETING, READY, SNAPSHOT, VOLUME, VolumeRecord

GROUP = "pg-reflinker.csi"
VERSION = "v1alpha1"
PLURAL = "reflinkvolumes"
KIND = "ReflinkVolume"
FINALIZER = "pg-reflinker.csi/node-agent"
LABEL_GUID = "pg-reflinker.csi/guid"
LABEL_NODE = "pg-reflinker.csi/node"

PHASE_PENDING = "Pending"
PHASE_READY = "Ready"
PHASE_FAILED = "Failed"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass
class Api:
    core: client.CoreV1Api
    storage: client.StorageV1Api
    custom: client.CustomObjectsApi
    coordination: client.CoordinationV1Api


def connect() -> Api:
    """Credentials from KUBECONFIG when set, else the pod's service account."""
    try:
        if os.environ.get("KUBECONFIG"):
            config.load_kube_config(config_file=os.environ["KUBECONFIG"])
        else:
            config.load_incluster_config()
    except (config.ConfigException, OSError) as err:
        raise FailedPrecondition(
            f"no Kubernetes configuration ({err}); run inside a pod with a service account or "
            "set KUBECONFIG"
        ) from None
    api = client.ApiClient()
    return Api(
        client.CoreV1Api(api),
        client.StorageV1Api(api),
        client.CustomObjectsApi(api),
        client.CoordinationV1Api(api),
    )


def api_error(err: ApiException, what: str) -> Exception:
    """Turn an API server failure into a domain error naming the object."""
    if err.status == 403:
        return FailedPrecondition(f"the service account may not {what}: check the RBAC in deploy/")
    if err.status in (429, 500, 502, 503, 504) or err.status is None:
        return Unavailable(f"the Kubernetes API server failed to {what} ({err.status}); retrying")
    return FailedPrecondition(f"cannot {what}: {err.status} {err.reason}")


def record_name(kind: str, request_name: str) -> str:
    """A stable, valid object name for a CSI request name (the same name on every retry)."""
    if kind == VOLUME and _DNS_LABEL.match(request_name):
        return request_name
    digest = hashlib.sha256(request_name.encode()).hexdigest()[:40]
    return f"{'snap' if kind == SNAPSHOT else 'vol'}-{digest}"


def to_object(record: VolumeRecord) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "guid": record.guid,
        "requestName": record.name,
        "kind": record.kind,
        "nodeName": record.node,
        "requiredBytes": record.required_bytes,
        "limitBytes": record.limit_bytes,
        "parameters": record.parameters,
        "context": record.context,
        "sourceVolume": record.source_volume_id,
        "sourceSnapshot": record.source_snapshot_id,
        "cloneMode": record.clone_mode,
        "source": record.context.get("pg-reflinker.csi/source-pvc", record.source_volume_id),
        "claim": record.context.get("pg-reflinker.csi/claim", ""),
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": record_name(record.kind, record.name),
            "labels": {LABEL_GUID: record.guid, LABEL_NODE: record.node},
            "finalizers": [FINALIZER],
        },
        "spec": spec,
    }


def from_object(obj: dict[str, Any]) -> VolumeRecord:
    spec, meta = obj.get("spec", {}), obj.get("metadata", {})
    status = obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        state = DELETING
    elif status.get("phase") == PHASE_READY:
        state = READY
    else:
        state = CREATING
    created = meta.get("creationTimestamp")
    created_at = (
        datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        if isinstance(created, str)
        else 0.0
    )
    return VolumeRecord(
        guid=spec["guid"],
        name=spec.get("requestName", ""),
        node=spec.get("nodeName", ""),
        required_bytes=int(spec.get("requiredBytes", 0)),
        limit_bytes=int(spec.get("limitBytes", 0)),
        parameters=dict(spec.get("parameters") or {}),
        source_volume_id=spec.get("sourceVolume", ""),
        source_snapshot_id=spec.get("sourceSnapshot", ""),
        kind=spec.get("kind", VOLUME),
        clone_mode=spec.get("cloneMode", ""),
        hot_clone_dir=spec.get("hotCloneDir", ""),
        state=state,
        context=dict(spec.get("context") or {}),
        created_at=created_at,
    )


class KubeRegistry:
    """Registry over ReflinkVolume objects."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(GROUP, VERSION, PLURAL, *args, **kwargs)
        except ApiException as err:
            raise api_error(err, what) from None

    def object(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.api.custom.get_cluster_custom_object(
                GROUP, VERSION, PLURAL, name
            )
            return obj
        except ApiException as err:
            if err.status == 404:
                return None
            raise api_error(err, f"read ReflinkVolume {name}") from None

    def object_of(self, guid: str) -> dict[str, Any] | None:
        if not is_guid(guid):
            return None
        items = self._call(
            f"list ReflinkVolumes of {guid}",
            self.api.custom.list_cluster_custom_object,
            label_selector=f"{LABEL_GUID}={guid}",
        )["items"]
        return items[0] if items else None

    def reserve(self, record: VolumeRecord) -> tuple[VolumeRecord, bool]:
        body = to_object(record)
        try:
            self.api.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
            return record, True
        except ApiException as err:
            if err.status != 409:
                raise api_error(err, f"create ReflinkVolume {body['metadata']['name']}") from None
        existing = self.object(body["metadata"]["name"])
        if existing is None:  # deleted between the conflict and the read
            return self.reserve(record)
        return from_object(existing), False

    def get(self, guid: str) -> VolumeRecord | None:
        obj = self.object_of(guid)
        return None if obj is None else from_object(obj)

    def get_by_name(self, name: str, kind: str = VOLUME) -> VolumeRecord | None:
        obj = self.object(record_name(kind, name))
        if obj is None or obj.get("spec", {}).get("requestName") != name:
            return None
        return from_object(obj)

    def list(self) -> list[VolumeRecord]:
        items = self._call("list ReflinkVolumes", self.api.custom.list_cluster_custom_object)
        return sorted((from_object(o) for o in items["items"]), key=lambda r: r.guid)

    def update(self, record: VolumeRecord) -> None:
        if record.state == READY:
            self.set_status(record, PHASE_READY, "", "")

    def set_status(self, record: VolumeRecord, phase: str, reason: str, message: str) -> None:
        self._call(
            f"update the status of ReflinkVolume {record.guid}",
            self.api.custom.patch_cluster_custom_object_status,
            record_name(record.kind, record.name),
            {"status": {"phase": phase, "reason": reason, "message": message[:1000]}},
        )

    def set_hot_clone_dir(self, record: VolumeRecord, path: str) -> None:
        self._call(
            f"update ReflinkVolume {record.guid}",
            self.api.custom.patch_cluster_custom_object,
            record_name(record.kind, record.name),
            {"spec": {"hotCloneDir": path}},
        )

    def remove(self, guid: str) -> None:
        obj = self.object_of(guid)
        if obj is None:
            return
        try:
            self.api.custom.delete_cluster_custom_object(
                GROUP, VERSION, PLURAL, obj["metadata"]["name"]
            )
        except ApiException as err:
            if err.status != 404:
                raise api_error(err, f"delete ReflinkVolume {guid}") from None

    def drop_finalizer(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        remaining = [f for f in meta.get("finalizers", []) if f != FINALIZER]
        try:
            self.api.custom.patch_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                meta["name"],
                {"metadata": {"finalizers": remaining, "resourceVersion": meta["resourceVersion"]}},
            )
        except ApiException as err:
            if err.status not in (404, 409):
                raise api_error(
                    err, f"remove the finalizer of ReflinkVolume {meta['name']}"
                ) from None
