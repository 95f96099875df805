"""A production Cluster's replication certificate and CA, kept current in the namespace of its
clone source (docs/clone-source.md#the-clone-source-in-another-namespace).

A CNPG replica Cluster names the secrets it streams with (`externalClusters[].sslCert`,
`sslKey`, `sslRootCert`) in its own namespace, and CNPG makes `<cluster>-replication` and
`<cluster>-ca` only in production's. For each CERT_MIRRORS entry
`<namespace>/<cluster>:<target>`, this loop (on the Lease holder) keeps in `target`:

- `<cluster>-replication`: `tls.crt` and `tls.key` of streaming_replica's client certificate;
- `<cluster>-ca`: `ca.crt` only (the CA's key never leaves production's namespace);

both labelled as our mirror, replaced when CNPG renews the originals, compared every
`period` seconds. Only with the consent of production's namespace: a ReferenceGrant there
from Clusters of `target` to that Cluster (postgresql.cnpg.io). A Secret of those names that
is not our mirror is never overwritten. Without consent, the mirrors made earlier are removed."""

from __future__ import annotations

import logging

from ...core.keys import CERT_MIRROR_LABEL
from ..api import JSON, REFERENCEGRANTS, SECRETS, ApiError, Kube
from ..fields import strings, text
from ..model import Meta, grants
from ..runtime import Requeue, Result

log = logging.getLogger(__name__)

CNPG_GROUP = "postgresql.cnpg.io"
# What each mirrored secret carries: its name's suffix, its type and the keys copied.
PARTS = (
    ("-replication", "kubernetes.io/tls", ("tls.crt", "tls.key")),
    ("-ca", "Opaque", ("ca.crt",)),
)


def key_of(namespace: str, cluster: str, target: str) -> str:
    return f"{namespace}/{cluster}:{target}"


class CertMirror:
    def __init__(self, kube: Kube, period: float = 60.0) -> None:
        self.kube = kube
        self.period = period

    def reconcile(self, key: str) -> Result:
        source, _, target = key.partition(":")
        namespace, _, cluster = source.partition("/")
        mark = f"{namespace}.{cluster}"
        if not self._granted(namespace, cluster, target):
            log.warning(
                "certificates not mirrored: no consent",
                extra={
                    "fields": {
                        "cluster": source,
                        "to": target,
                        "ask": f"a ReferenceGrant in namespace {namespace} from {CNPG_GROUP} "
                        f"Cluster in namespace {target} to Cluster {cluster}",
                    }
                },
            )
            self._remove(cluster, target, mark)
            return Requeue(self.period)
        for suffix, kind, keys in PARTS:
            name = f"{cluster}{suffix}"
            original = self.kube.get(SECRETS, name, namespace)
            data = strings(original, "data")
            wanted = {k: data[k] for k in keys if k in data}
            if original is None or len(wanted) != len(keys):
                log.warning(
                    "certificate not mirrored: its original is missing",
                    extra={"fields": {"secret": f"{namespace}/{name}", "keys": ",".join(keys)}},
                )
                continue
            self._keep(target, name, kind, wanted, mark)
        return Requeue(self.period)

    def _granted(self, namespace: str, cluster: str, target: str) -> bool:
        try:
            found, _ = self.kube.list(REFERENCEGRANTS, namespace)
        except ApiError as err:
            if err.status in (403, 404):
                return False
            raise
        return any(grants(g, CNPG_GROUP, "Cluster", target, cluster) for g in found)

    def _keep(self, target: str, name: str, kind: str, data: dict[str, str], mark: str) -> None:
        """The mirror of one secret in target: made, or replaced when it differs; a secret of
        that name that is not ours is left alone."""
        current = self.kube.get(SECRETS, name, target)
        meta: JSON = {"name": name, "namespace": target, "labels": {CERT_MIRROR_LABEL: mark}}
        body: JSON = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": kind}
        body["data"] = data
        if current is None:
            self.kube.create(SECRETS, body, target)
            log.info("certificate mirrored", extra={"fields": {"secret": f"{target}/{name}"}})
            return
        if Meta.of(current).labels.get(CERT_MIRROR_LABEL) != mark:
            log.warning(
                "certificate not mirrored: a secret of that name is not pg-reflinker's mirror",
                extra={"fields": {"secret": f"{target}/{name}", "mirror-of": mark}},
            )
            return
        if strings(current, "data") != data or text(current, "type") != kind:
            meta["resourceVersion"] = Meta.of(current).resource_version
            self.kube.replace(SECRETS, name, body, target)
            log.info("certificate renewed", extra={"fields": {"secret": f"{target}/{name}"}})

    def _remove(self, cluster: str, target: str, mark: str) -> None:
        for suffix, _, _ in PARTS:
            name = f"{cluster}{suffix}"
            current = self.kube.get(SECRETS, name, target)
            if current is not None and Meta.of(current).labels.get(CERT_MIRROR_LABEL) == mark:
                self.kube.delete(SECRETS, name, target)
                log.info("certificate mirror removed", extra={"fields": {"secret": name}})
