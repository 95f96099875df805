"""The Kubernetes SourceLocator: source GUID -> PV -> bound claim -> the CNPG pod using it ->
the secrets to reach its server. PVs come from the informer's cache; pods and secrets are read
when a clone needs them (once per attempt)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from ...core.capture import PG_WAL, tablespace_piece
from ...core.errors import FailedPrecondition, SourceUnavailable
from ...core.keys import (
    CNPG_CLUSTER_LABEL,
    CNPG_DATA_MOUNT,
    CNPG_FENCED_ANNOTATION,
    CNPG_ROLE_LABEL,
    CNPG_TABLESPACES_MOUNT,
    CTX_PIECE,
    CTX_SOURCE_FENCED,
    CTX_SOURCE_POD,
    CTX_SOURCE_PVC,
)
from ...core.layout import Layout
from ...core.locator import SourceLocation, SourceServer
from ...core.records import VolumeRecord
from ..api import CLAIMS, CNPG_CLUSTERS, PODS, SECRETS, ApiError, Kube, domain_error, parse_json
from ..fields import obj, text
from ..model import Claim, Meta, PersistentVolume, Pod
from ..runtime import Informer


def piece_at(role: str, mount_path: str) -> str:
    """The piece a claim of a CNPG instance is, by its role and where the pod mounts it."""
    if role == "PG_WAL":
        return PG_WAL
    name = mount_path.removeprefix(CNPG_TABLESPACES_MOUNT + "/")
    if role == "PG_TABLESPACE" and name != mount_path and name and "/" not in name:
        return tablespace_piece(name)
    raise FailedPrecondition(
        f"a claim with CNPG role {role[:40]!r} mounted at {mount_path[:120]!r} is neither "
        "PGDATA, WAL nor a tablespace where CNPG mounts them; it cannot be copied"
    )


class KubeSourceLocator:
    def __init__(
        self,
        kube: Kube,
        volumes: Informer,
        layout: Layout,
        driver_name: str,
        target_root: Path = Path("/var/lib/kubelet"),
    ) -> None:
        self.kube = kube
        self.volumes = volumes
        self.layout = layout
        self.driver_name = driver_name
        self.target_root = target_root

    def node_path(self, pv: PersistentVolume, pod_uid: str) -> Path:
        """Where a pod's volume is on its node: our directory, the hostPath or local path, or
        where kubelet mounted another driver's CSI volume for that pod."""
        if pv.driver == self.driver_name and pv.handle:
            return self.layout.volume_dir(pv.handle)
        if pv.host_path:
            return Path(pv.host_path)
        return (
            self.target_root
            / "pods"
            / pod_uid
            / "volumes"
            / "kubernetes.io~csi"
            / pv.meta.name
            / "mount"
        )

    def _claimed(self, ns: str, claim: str) -> PersistentVolume | None:
        for value in self.volumes.items():
            pv = PersistentVolume.of(value)
            if pv.claim is not None and (pv.claim.namespace, pv.claim.name) == (ns, claim):
                return pv
        return None

    def _other_volumes(self, pod: Pod, data_volume: str) -> dict[str, str]:
        """mount path -> node path of the pod's other claim volumes (in its postgres container)."""
        claims = dict(pod.claims)
        found: dict[str, str] = {}
        for container in pod.containers:
            if container.name != "postgres":
                continue
            for name, path in container.mounts:
                claim = claims.get(name)
                if name == data_volume or claim is None:
                    continue
                pv = self._claimed(pod.meta.namespace, claim)
                if pv is not None:
                    found[path.rstrip("/") or "/"] = str(self.node_path(pv, pod.meta.uid))
        return found

    def volume_of(self, guid: str) -> PersistentVolume | None:
        for value in self.volumes.items():
            pv = PersistentVolume.of(value)
            if pv.driver == self.driver_name and pv.handle == guid:
                return pv
        return None

    def locate(self, source: VolumeRecord) -> SourceLocation:
        host_path = self.layout.volume_dir(source.guid)
        pv = self.volume_of(source.guid)
        if pv is None or pv.claim is None:
            return SourceLocation(node=source.node, host_path=host_path)
        self.require_bound(pv)
        return self.locate_claim(pv.claim.namespace, pv.claim.name, host_path, source.node)

    def require_bound(self, pv: PersistentVolume) -> None:
        """The claim a PV's claimRef names is Bound to that PV (same uid): only then are its
        pods, Cluster and secrets the volume's. The answer names neither the claim nor the PV."""
        ref = pv.claim
        assert ref is not None
        try:
            value = self.kube.get(CLAIMS, ref.name, ref.namespace)
        except ApiError as err:
            raise domain_error(err, f"read the claim of PersistentVolume {pv.meta.name}") from None
        claim = Claim.of(value) if value is not None else None
        if (
            claim is None
            or claim.phase != "Bound"
            or claim.volume_name != pv.meta.name
            or claim.meta.uid != ref.uid
        ):
            raise FailedPrecondition(
                f"source volume {pv.handle or pv.meta.name} is not bound to a claim; a volume "
                "is cloned only through the claim bound to it, once it is Bound"
            )

    def instance_using(self, ns: str, claim: str) -> tuple[Pod, str] | None:
        """The live pod that mounts claim, and the name of its volume for it."""
        try:
            items, _ = self.kube.list(PODS, ns)
        except ApiError as err:
            raise domain_error(err, f"list pods in namespace {ns}") from None
        for pod in map(Pod.of, items):
            if pod.finished:
                continue
            for volume, claim_name in pod.claims:
                if claim_name == claim:
                    return pod, volume
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
        where = f"pod {ns}/{pod.meta.name}"
        context[CTX_SOURCE_POD] = f"{ns}/{pod.meta.name}"
        cluster = pod.meta.labels.get(CNPG_CLUSTER_LABEL)
        if not cluster:
            return SourceLocation(
                node=default_node,
                host_path=host_path,
                in_use_at=(f"{where}, which is not a CNPG instance",),
                context=context,
            )
        role = self._cnpg_role(ns, claim)
        if self._fenced(ns, cluster, pod.meta.name):
            # A stopped database: each of its claims is copied cold, once the node sees its
            # PostgreSQL down (CNPG's offline backups fence the instance, then snapshot it).
            if role in ("", "PG_DATA"):
                pgdata = host_path / "pgdata"
            else:
                data = self._other_volumes(pod, volume_name).get(CNPG_DATA_MOUNT)
                if data is None:
                    raise FailedPrecondition(
                        f"claim {ns}/{claim} holds the {role} volume of fenced CNPG instance "
                        f"{where}, whose PGDATA volume is not mounted at {CNPG_DATA_MOUNT}; "
                        "its claims cannot be copied while it is fenced"
                    )
                pgdata = Path(data) / "pgdata"
            context[CTX_SOURCE_FENCED] = str(pgdata)
            return SourceLocation(
                node=pod.node_name or default_node, host_path=host_path, context=context
            )
        mount_path, port = self._mount_and_port(pod, volume_name)
        volumes = self._other_volumes(pod, volume_name)
        if role not in ("", "PG_DATA"):
            # A piece of the instance: it is copied from a capture of the whole instance,
            # taken through its PGDATA (core/capture.py); the materializer refuses it alone.
            context[CTX_PIECE] = piece_at(role, mount_path)
            data = volumes.pop(CNPG_DATA_MOUNT, None)
            if data is None:
                raise FailedPrecondition(
                    f"claim {ns}/{claim} holds the {role} volume of CNPG instance {where}, "
                    f"whose PGDATA volume is not mounted at {CNPG_DATA_MOUNT}; it cannot be "
                    "copied"
                )
            volumes[mount_path] = str(host_path)
            host_path, mount_path = Path(data), CNPG_DATA_MOUNT
        if pod.phase != "Running" or not pod.ready or not pod.ip:
            raise SourceUnavailable(
                f"source {where} (CNPG cluster {cluster}) is not Running and Ready "
                f"(phase {pod.phase or 'unknown'}); the clone is retried once it is"
            )
        server = SourceServer(
            pod_ip=pod.ip,
            cluster=cluster,
            namespace=ns,
            port=port,
            pod=pod.meta.name,
            claim=f"{ns}/{claim}",
            ca_cert=self._secret_key(ns, f"{cluster}-ca", "ca.crt"),
            client_cert=self._secret_key(ns, f"{cluster}-replication", "tls.crt"),
            client_key=self._secret_key(ns, f"{cluster}-replication", "tls.key"),
        )
        return SourceLocation(
            node=pod.node_name or default_node,
            host_path=host_path,
            in_use_at=(where,),
            server=server,
            mount_path=mount_path,
            pod_uid=pod.meta.uid,
            volumes=volumes,
            context=context,
        )

    def _fenced(self, ns: str, cluster: str, instance: str) -> bool:
        """Whether CNPG fenced the instance (the Cluster's cnpg.io/fencedInstances lists it, or
        "*"). No Cluster, or no CNPG API on this cluster: not fenced."""
        try:
            value = self.kube.get(CNPG_CLUSTERS, cluster, ns)
        except ApiError as err:
            if err.status == 404:
                return False
            if err.status == 403:
                raise self._not_enabled(ns, f"cluster {ns}/{cluster}") from None
            raise domain_error(err, f"read CNPG cluster {ns}/{cluster}") from None
        raw = Meta.of(value or {}).annotations.get(CNPG_FENCED_ANNOTATION, "")
        try:
            fenced = parse_json(raw) if raw else []
        except ValueError:
            raise FailedPrecondition(
                f"CNPG cluster {ns}/{cluster} has an annotation {CNPG_FENCED_ANNOTATION} that is "
                f"not a JSON list ({raw[:80]!r}); fix or remove it"
            ) from None
        return isinstance(fenced, list) and ("*" in fenced or instance in fenced)

    def _cnpg_role(self, ns: str, claim: str) -> str:
        """CNPG's cnpg.io/pvcRole label of the claim (PG_DATA, PG_WAL, PG_TABLESPACE)."""
        try:
            value = self.kube.get(CLAIMS, claim, ns)
        except ApiError as err:
            raise domain_error(err, f"read claim {ns}/{claim}") from None
        return Meta.of(value or {}).labels.get(CNPG_ROLE_LABEL, "")

    @staticmethod
    def _mount_and_port(pod: Pod, volume_name: str) -> tuple[str, int]:
        # CNPG's own container first.
        containers = [c for c in pod.containers if c.name == "postgres"] + [
            c for c in pod.containers if c.name != "postgres"
        ]
        mount_path, port = "", 5432
        for container in containers:
            for name, path in container.mounts:
                if name == volume_name and not mount_path:
                    mount_path = path.rstrip("/") or "/"
                    port = next((p for n, p in container.ports if n == "postgresql" and p), port)
        if not mount_path:
            raise FailedPrecondition(
                f"pod {pod.meta.namespace}/{pod.meta.name} does not mount volume "
                f"{volume_name} in any container"
            )
        return mount_path, port

    @staticmethod
    def _not_enabled(ns: str, what: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"namespace {ns} is not enabled as a source of clones: the controller may not read "
            f"{what}; an admin enables it with: kubectl create rolebinding pg-reflinker-source "
            f"-n {ns} --clusterrole=pg-reflinker-source "
            "--serviceaccount=pg-reflinker:pg-reflinker-controller"
        )

    def _secret_key(self, ns: str, name: str, key: str) -> bytes:
        try:
            secret = self.kube.get(SECRETS, name, ns)
        except ApiError as err:
            if err.status == 403:
                raise self._not_enabled(ns, f"secret {ns}/{name}") from None
            raise domain_error(err, f"read secret {ns}/{name}") from None
        if secret is None:
            raise FailedPrecondition(
                f"secret {ns}/{name} is missing; CNPG creates it for the source cluster"
            )
        value = text(obj(secret, "data"), key)
        try:
            decoded = base64.b64decode(value, validate=True) if value else b""
        except (binascii.Error, ValueError):
            decoded = b""
        if not decoded:
            raise FailedPrecondition(f"secret {ns}/{name} has no usable key {key}")
        return decoded
