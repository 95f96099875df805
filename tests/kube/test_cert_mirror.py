"""The certificate mirror (kube/controller/cert_mirror.py) against a real API server: a
production Cluster's replication certificate and CA kept in its clone source's namespace, only
with production's namespace's consent, renewed when CNPG renews them, never the CA's key, never
over a secret that is not ours."""

from __future__ import annotations

import base64

import pytest

from reflinker_csi.core.keys import CERT_MIRROR_LABEL
from reflinker_csi.kube.api import JSON, REFERENCEGRANTS, SECRETS, Kube
from reflinker_csi.kube.controller.cert_mirror import CertMirror, key_of
from reflinker_csi.kube.fields import strings
from reflinker_csi.kube.model import Meta
from reflinker_csi.kube.runtime import Requeue
from tests.kube.conftest import NAMESPACES

CLUSTER = "pg-prod"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def cnpg_secrets(admin: Kube, ns: str, serial: str) -> None:
    """What CNPG makes for a Cluster: its CA (with the CA's private key) and streaming_replica's
    client certificate; serial stands for a renewal."""
    for name, kind, data in (
        (f"{CLUSTER}-ca", "Opaque", {"ca.crt": f"CA {serial}", "ca.key": f"CA KEY {serial}"}),
        (
            f"{CLUSTER}-replication",
            "kubernetes.io/tls",
            {"tls.crt": f"CERT {serial}", "tls.key": f"KEY {serial}"},
        ),
    ):
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": kind,
            "data": {k: b64(v) for k, v in data.items()},
        }
        current = admin.get(SECRETS, name, ns)
        if current is None:
            admin.create(SECRETS, body, ns)
        else:
            body["metadata"]["resourceVersion"] = Meta.of(current).resource_version
            admin.replace(SECRETS, name, body, ns)


def consent(admin: Kube, ns: str, clusters_of: str) -> None:
    admin.create(
        REFERENCEGRANTS,
        {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": "clone-source"},
            "spec": {
                "from": [
                    {"group": "postgresql.cnpg.io", "kind": "Cluster", "namespace": clusters_of}
                ],
                "to": [{"group": "postgresql.cnpg.io", "kind": "Cluster", "name": CLUSTER}],
            },
        },
        ns,
    )


def mirrored(admin: Kube, ns: str) -> dict[str, dict[str, str]]:
    found = {}
    for name in (f"{CLUSTER}-ca", f"{CLUSTER}-replication"):
        value = admin.get(SECRETS, name, ns)
        if value is not None:
            data = strings(value, "data")
            found[name] = {k: base64.b64decode(v).decode() for k, v in data.items()}
    return found


@pytest.fixture
def pair(admin: Kube) -> tuple[str, str]:
    """Production's namespace with CNPG's secrets, and an empty one for its clone source."""
    names = []
    for role in ("prod", "copies"):
        name = f"mirror-{role}-{len(admin.list(NAMESPACES)[0])}"
        admin.create(NAMESPACES, {"metadata": {"name": name}})
        names.append(name)
    cnpg_secrets(admin, names[0], "1")
    return names[0], names[1]


def test_without_consent_nothing_is_copied_and_with_it_both_are_kept_without_the_ca_key(
    admin: Kube, pair: tuple[str, str]
) -> None:
    prod, copies = pair
    mirror = CertMirror(admin, period=60.0)
    key = key_of(prod, CLUSTER, copies)
    assert mirror.reconcile(key) == Requeue(60.0)
    assert mirrored(admin, copies) == {}, "copied without the production namespace's consent"

    consent(admin, prod, copies)
    mirror.reconcile(key)
    assert mirrored(admin, copies) == {
        f"{CLUSTER}-ca": {"ca.crt": "CA 1"},
        f"{CLUSTER}-replication": {"tls.crt": "CERT 1", "tls.key": "KEY 1"},
    }
    replication = admin.get(SECRETS, f"{CLUSTER}-replication", copies)
    assert replication is not None and replication["type"] == "kubernetes.io/tls"
    assert Meta.of(replication).labels[CERT_MIRROR_LABEL] == f"{prod}.{CLUSTER}"

    # CNPG renews them: the next pass copies the new ones.
    cnpg_secrets(admin, prod, "2")
    mirror.reconcile(key)
    assert mirrored(admin, copies)[f"{CLUSTER}-replication"]["tls.crt"] == "CERT 2"
    assert mirrored(admin, copies)[f"{CLUSTER}-ca"] == {"ca.crt": "CA 2"}

    # Consent withdrawn: the mirrors go.
    admin.delete(REFERENCEGRANTS, "clone-source", prod)
    mirror.reconcile(key)
    assert mirrored(admin, copies) == {}


def test_a_secret_of_that_name_that_is_not_the_mirror_is_never_overwritten(
    admin: Kube, pair: tuple[str, str]
) -> None:
    prod, copies = pair
    consent(admin, prod, copies)
    own: JSON = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{CLUSTER}-ca"},
        "data": {"ca.crt": b64("the tenant's own")},
    }
    admin.create(SECRETS, own, copies)
    CertMirror(admin).reconcile(key_of(prod, CLUSTER, copies))
    found = mirrored(admin, copies)
    assert found[f"{CLUSTER}-ca"] == {"ca.crt": "the tenant's own"}
    assert found[f"{CLUSTER}-replication"]["tls.key"] == "KEY 1"
    # And withdrawing consent removes only the mirror.
    admin.delete(REFERENCEGRANTS, "clone-source", prod)
    CertMirror(admin).reconcile(key_of(prod, CLUSTER, copies))
    assert mirrored(admin, copies) == {f"{CLUSTER}-ca": {"ca.crt": "the tenant's own"}}
