"""Kubernetes SourceLocator: source GUID -> PV -> bound PVC -> the CNPG pod using it -> secrets."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from .errors import FailedPrecondition, SourceUnavailable
from .kube import Api, api_error
from .layout import Layout
from .locator import SourceLocation
from .registry import VolumeRecord
from .source import SourceServer
from .volumes import PV_NAME

CNPG_CLUSTER_LABEL = "cnpg.io/cluster"
CTX_SOURCE_PVC = "pg-reflinker.csi/source-pvc"
CTX_SOURCE_POD = "pg-reflinker.csi/source-pod"


def _ready(pod: Any) -> bool:
    conditions = pod.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


class KubeSourceLocator:
    def __init__(self, api: Api, layout: Layout, driver_name: str) -> None:
        self.api = api
        self.layout = layout
        self.driver_name = driver_name

    def _pv_of(self, record: VolumeRecord) -> Any:
        name = record.context.get("pg-reflinker.csi/pv") or record.parameters.get(PV_NAME)
        try:
            if name:
                pv = self.api.core.read_persistent_volume(name)
                if pv.spec.csi and pv.spec.csi.volume_handle == record.guid:
                    return pv
            for pv in self.api.core.list_persistent_volume().items:
                csi = pv.spec.csi
                if csi and csi.driver == self.driver_name and csi.volume_handle == record.guid:
                    return pv
        except ApiException as err:
            if err.status != 404:
                raise api_error(err, f"find the PersistentVolume of {record.guid}") from None
        return None

    def locate(self, source: VolumeRecord) -> SourceLocation:
        host_path = self.layout.volume_dir(source.guid)
        pv = self._pv_of(source)
        if pv is None or pv.spec.claim_ref is None:
            return SourceLocation(node=source.node, host_path=host_path)
        return self.locate_claim(
            pv.spec.claim_ref.namespace, pv.spec.claim_ref.name, host_path, source.node
        )

    def instance_using(self, ns: str, claim: str) -> tuple[Any, str] | None:
        """The live pod that mounts claim, and the name of its volume for it."""
        try:
            pods = self.api.core.list_namespaced_pod(ns).items
        except ApiException as err:
            raise api_error(err, f"list pods in namespace {ns}") from None
        for pod in pods:
            if pod.status.phase in ("Succeeded", "Failed") or pod.metadata.deletion_timestamp:
                continue
            for volume in pod.spec.volumes or []:
                pvc = volume.persistent_volume_claim
                if pvc is not None and pvc.claim_name == claim:
                    return pod, str(volume.name)
        return None

    def locate_claim(
        self, ns: str, claim: str, host_path: Path, default_node: str
    ) -> SourceLocation:
        """Where the volume of claim ns/claim is used, and how to reach its server."""
        context = {CTX_SOURCE_PVC: f"{ns}/{claim}"}
        user = self.instance_using(ns, claim)
        if user is None:
            return SourceLocation(node=default_node, host_path=host_path, context=context)
        pod, volume_name = user
        where = f"pod {ns}/{pod.metadata.name}"
        context[CTX_SOURCE_POD] = f"{ns}/{pod.metadata.name}"
        cluster = (pod.metadata.labels or {}).get(CNPG_CLUSTER_LABEL)
        if not cluster:
            return SourceLocation(
                node=default_node,
                host_path=host_path,
                in_use_at=(f"{where}, which is not a CNPG instance",),
                context=context,
            )
        if pod.status.phase != "Running" or not _ready(pod) or not pod.status.pod_ip:
            raise SourceUnavailable(
                f"source {where} (CNPG cluster {cluster}) is not Running and Ready "
                f"(phase {pod.status.phase}); the clone is retried once it is"
            )
        mount_path, port = self._mount_and_port(pod, volume_name)
        server = SourceServer(
            pod_ip=pod.status.pod_ip,
            cluster=cluster,
            namespace=ns,
            port=port,
            pod=pod.metadata.name,
            ca_cert=self._secret_key(ns, f"{cluster}-ca", "ca.crt"),
            client_cert=self._secret_key(ns, f"{cluster}-replication", "tls.crt"),
            client_key=self._secret_key(ns, f"{cluster}-replication", "tls.key"),
        )
        return SourceLocation(
            node=pod.spec.node_name or default_node,
            host_path=host_path,
            in_use_at=(where,),
            server=server,
            mount_path=mount_path,
            pod_uid=pod.metadata.uid or "",
            context=context,
        )

    @staticmethod
    def _mount_and_port(pod: Any, volume_name: str) -> tuple[str, int]:
        containers = sorted(pod.spec.containers, key=lambda c: c.name != "postgres")
        mount_path, port = "", 5432
        for container in containers:
            for mount in container.volume_mounts or []:
                if mount.name == volume_name and not mount_path:
                    mount_path = mount.mount_path.rstrip("/") or "/"
                    for p in container.ports or []:
                        if p.name == "postgresql":
                            port = int(p.container_port)
        if not mount_path:
            raise FailedPrecondition(
                f"pod {pod.metadata.namespace}/{pod.metadata.name} does not mount volume "
                f"{volume_name} in any container"
            )
        return mount_path, port

    def _secret_key(self, ns: str, name: str, key: str) -> bytes:
        try:
            secret = self.api.core.read_namespaced_secret(name, ns)
        except ApiException as err:
            if err.status == 404:
                raise FailedPrecondition(
                    f"secret {ns}/{name} is missing; CNPG creates it for the source cluster"
                ) from None
            raise api_error(err, f"read secret {ns}/{name}") from None
        value = (secret.data or {}).get(key)
        if not value:
            raise FailedPrecondition(f"secret {ns}/{name} has no key {key}")
        return base64.b64decode(value)
