"""Least privilege with the real API server and the RBAC of deploy/: the controller reads
Secrets only in namespaces an admin enabled as sources (docs/install.md), and says how to
enable one when it may not."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client, config

from reflinker_csi.core.errors import FailedPrecondition
from reflinker_csi.core.layout import Layout
from reflinker_csi.kube.api import SECRETS, ApiError, Kube
from reflinker_csi.kube.locator import KubeSourceLocator
from tests.e2e.stack import NS, Cluster

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
