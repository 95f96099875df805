"""Least privilege with the real API server and the RBAC and admission policies of deploy/: the
controller reads Secrets only in namespaces an admin enabled as sources (docs/install.md), and
says how to enable one when it may not; it creates only PersistentVolumes of this driver; a node
plugin changes only its own Node and the records of its own node."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kubernetes import client, config

from reflinker_csi.core.errors import FailedPrecondition
from reflinker_csi.core.layout import Layout
from reflinker_csi.kube.api import NODES, REFLINKVOLUMES, SECRETS, VOLUMES, ApiError, Kube
from reflinker_csi.kube.controller.locator import KubeSourceLocator
from tests.e2e.stack import NODE, NS, Cluster

pytestmark = pytest.mark.integration


def as_controller(cluster: Cluster) -> Kube:
    path = cluster.plane.service_account_kubeconfig("pg-reflinker", "pg-reflinker-controller")
    return Kube(config.new_client_from_config(str(path)))


def test_the_controller_reads_secrets_only_in_enabled_namespaces(cluster: Cluster) -> None:
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="closed")))
    for ns in ("closed", NS):
        cluster.core.create_namespaced_secret(
            ns,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name="pg-x-ca"), string_data={"ca.crt": "x"}
            ),
        )
    controller = as_controller(cluster)
    assert controller.get(SECRETS, "pg-x-ca", NS) is not None  # apps is enabled
    with pytest.raises(ApiError) as denied:
        controller.get(SECRETS, "pg-x-ca", "closed")
    assert denied.value.status == 403
    with pytest.raises(ApiError) as listing:
        controller.list(SECRETS, NS)  # by name only, never a list
    assert listing.value.status == 403
    # What a clone of an instance in that namespace reports.
    locator = KubeSourceLocator(controller, None, Layout(Path("/nonexistent")), "pg-reflinker.csi")  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition) as err:
        locator._secret_key("closed", "pg-x-ca", "ca.crt")
    assert str(err.value) == (
        "namespace closed is not enabled as a source of clones: the controller may not read "
        "secret closed/pg-x-ca; an admin enables it with: kubectl create rolebinding "
        "pg-reflinker-source -n closed --clusterrole=pg-reflinker-source "
        "--serviceaccount=pg-reflinker:pg-reflinker-controller"
    )
    for ns in ("closed", NS):
        cluster.core.delete_namespaced_secret("pg-x-ca", ns)


def controller_may(cluster: Cluster, verb: str, resource: str, ns: str = "") -> bool:
    """What the API server's authorizer answers for the controller's service account;
    resource is "[group:]plural[/subresource]"."""
    group, _, rest = resource.rpartition(":")
    plural, _, sub = rest.partition("/")
    review = client.AuthorizationV1Api(cluster.core.api_client).create_subject_access_review(
        client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user="system:serviceaccount:pg-reflinker:pg-reflinker-controller",
                groups=["system:serviceaccounts", "system:serviceaccounts:pg-reflinker"],
                resource_attributes=client.V1ResourceAttributes(
                    verb=verb,
                    group=group,
                    resource=plural,
                    subresource=sub or None,
                    namespace=ns or None,
                ),
            )
        )
    )
    return bool(review.status.allowed)


def test_the_controller_has_only_the_rules_it_and_its_sidecars_use(cluster: Cluster) -> None:
    """The controller, csi-provisioner and csi-snapshotter do what deploy/ allows (every other
    test shows that); rules none of them uses are not granted."""
    used = [
        ("create", "persistentvolumes"),
        ("patch", "persistentvolumes"),
        ("update", "persistentvolumeclaims"),
        ("update", "snapshot.storage.k8s.io:volumesnapshotcontents/status"),
    ]
    unused = [
        ("update", "persistentvolumes"),
        ("patch", "persistentvolumeclaims"),
        ("patch", "persistentvolumeclaims/status"),
        ("list", "storage.k8s.io:volumeattachments"),
        ("list", "secrets"),
    ]
    assert [r for r in used if not controller_may(cluster, *r)] == []
    assert [r for r in unused if controller_may(cluster, *r)] == []
    leases = "coordination.k8s.io:leases"
    for verb in ("get", "create", "update"):
        assert controller_may(cluster, verb, leases, "pg-reflinker"), verb
    for verb in ("list", "watch", "delete"):
        assert not controller_may(cluster, verb, leases, "pg-reflinker"), verb
    assert not controller_may(cluster, "get", leases, NS)


def as_node_plugin(cluster: Cluster) -> Kube:
    """The node plugin's credentials: a token bound to its pod on NODE."""
    pod = cluster.core.read_namespaced_pod(f"pg-reflinker-node-{NODE}", "pg-reflinker")
    path = cluster.plane.service_account_kubeconfig("pg-reflinker", "pg-reflinker-node", pod)
    return Kube(config.new_client_from_config(str(path)))


def record(name: str, node: str) -> dict[str, object]:
    """A ReflinkVolume of node (no node label: no node agent acts on it)."""
    return {
        "apiVersion": "pg-reflinker.csi/v1alpha1",
        "kind": "ReflinkVolume",
        "metadata": {"name": name},
        "spec": {"guid": str(uuid.uuid4()), "requestName": name, "nodeName": node},
    }


def test_the_controller_creates_only_volumes_of_this_driver(cluster: Cluster) -> None:
    controller = as_controller(cluster)
    root_on_a_node = {
        "metadata": {"name": "rbac-hostpath"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "hostPath": {"path": "/"},
        },
    }
    with pytest.raises(ApiError) as denied:
        controller.create(VOLUMES, root_on_a_node)
    assert denied.value.status == 403
    assert "may only create, change or delete PersistentVolumes of driver pg-reflinker.csi" in str(
        denied.value
    )
    # Nor delete one: an admin's hostPath PV stays.
    admin = Kube(cluster.plane.api_client())
    admin.create(VOLUMES, root_on_a_node)
    try:
        with pytest.raises(ApiError) as denied:
            controller.delete(VOLUMES, "rbac-hostpath")
        assert denied.value.status == 403, denied.value
        assert admin.get(VOLUMES, "rbac-hostpath") is not None
    finally:
        admin.delete(VOLUMES, "rbac-hostpath")
    ours = {
        "metadata": {"name": "rbac-ours"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "csi": {"driver": "pg-reflinker.csi", "volumeHandle": str(uuid.uuid4())},
            "claimRef": {"namespace": NS, "name": "asked", "uid": str(uuid.uuid4())},
        },
    }
    for wrong, message in (
        ({"volumeHandle": "../../etc"}, "named by the volume id of its ReflinkVolume"),
        ({"claimRef": {"namespace": NS, "name": "asked"}}, "names it whole"),
    ):
        bad = {**ours, "spec": {**ours["spec"]}}
        if "volumeHandle" in wrong:
            bad["spec"]["csi"] = {**ours["spec"]["csi"], **wrong}  # type: ignore[dict-item]
        else:
            bad["spec"].update(wrong)  # type: ignore[attr-defined]
        with pytest.raises(ApiError) as denied:
            controller.create(VOLUMES, bad)
        assert denied.value.status == 403 and message in str(denied.value), denied.value
    controller.create(VOLUMES, ours)
    # The claim it was made for is the claim it stays for.
    with pytest.raises(ApiError) as denied:
        controller.merge_patch(VOLUMES, "rbac-ours", {"spec": {"claimRef": {"name": "victim"}}})
    assert denied.value.status == 403, denied.value
    assert "may not point a PersistentVolume at another claim" in str(denied.value)
    controller.delete(VOLUMES, "rbac-ours")


def test_a_node_plugin_changes_only_its_own_node_and_records(cluster: Cluster) -> None:
    admin = Kube(cluster.plane.api_client())
    other = "node-rbac-other"
    admin.create(NODES, {"metadata": {"name": other}})
    admin.create(REFLINKVOLUMES, record("rbac-own", NODE))
    admin.create(REFLINKVOLUMES, record("rbac-other", other))
    node = as_node_plugin(cluster)
    try:
        note = {"metadata": {"annotations": {"capacity.pg-reflinker.csi/free-bytes": "1"}}}
        node.merge_patch(NODES, NODE, {"metadata": {"annotations": {"rbac-test": "ok"}}})
        for attempt in (
            lambda: node.merge_patch(NODES, other, note),
            lambda: node.merge_patch(NODES, NODE, {"metadata": {"labels": {"steer": "me"}}}),
            lambda: node.merge_patch(
                REFLINKVOLUMES, "rbac-other", {"metadata": {"labels": {"x": "y"}}}
            ),
            lambda: node.merge_patch(
                REFLINKVOLUMES, "rbac-other", {"status": {"phase": "Failed"}}, status=True
            ),
        ):
            with pytest.raises(ApiError) as denied:
                attempt()
            assert denied.value.status == 403, denied.value
        node.merge_patch(REFLINKVOLUMES, "rbac-own", {"metadata": {"labels": {"x": "y"}}})
    finally:
        admin.merge_patch(NODES, NODE, {"metadata": {"annotations": {"rbac-test": None}}})
        admin.delete(REFLINKVOLUMES, "rbac-own")
        admin.delete(REFLINKVOLUMES, "rbac-other")
        admin.delete(NODES, other)
