"""Kubernetes mode end to end: PVCs through csi-provisioner, our controller (under its service
account), our node plugin, ReflinkVolume records, and a running PostgreSQL source."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from kubernetes import client

from reflinker_csi import TOPOLOGY_KEY
from reflinker_csi.kube import GROUP, PLURAL, VERSION
from tests.e2e.stack import NODE, NS, Cluster, CnpgInstance, wait_for
from tests.pgserver import boot_clone

pytestmark = pytest.mark.integration
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def record_of(cluster: Cluster, guid: str) -> list[dict]:  # type: ignore[type-arg]
    items = cluster.custom.list_cluster_custom_object(
        GROUP, VERSION, PLURAL, label_selector=f"pg-reflinker.csi/guid={guid}"
    )["items"]
    return list(items)


def test_empty_claim_gets_a_volume_on_node_a(cluster: Cluster) -> None:
    cluster.pvc("scratch")
    pv = cluster.wait_bound("scratch")
    guid = pv.spec.csi.volume_handle
    assert UUID4.match(guid)
    assert (cluster.prefix / guid).is_dir()
    terms = pv.spec.node_affinity.required.node_selector_terms
    assert terms[0].match_expressions[0].key == TOPOLOGY_KEY
    assert terms[0].match_expressions[0].values == [NODE]
    [record] = record_of(cluster, guid)
    assert record["status"]["phase"] == "Ready"
    assert record["spec"]["claim"] == f"{NS}/scratch"


def test_clone_of_a_running_cnpg_instance_binds_and_boots(
    cluster: Cluster, cnpg: CnpgInstance
) -> None:
    started = time.monotonic()
    cluster.pvc("pg-xyz-dev", source=cnpg.pvc)
    pv = cluster.wait_bound("pg-xyz-dev", timeout=30)
    bound_after = time.monotonic() - started
    guid = pv.spec.csi.volume_handle
    assert UUID4.match(guid)
    attrs = pv.spec.csi.volume_attributes
    assert attrs["pg-reflinker.csi/source-pvc"] == f"{NS}/{cnpg.pvc}"
    assert attrs["pg-reflinker.csi/source-pod"] == f"{NS}/{cnpg.pvc}"
    assert attrs["pg-reflinker.csi/claim"] == f"{NS}/pg-xyz-dev"
    assert pv.spec.node_affinity.required.node_selector_terms[0].match_expressions[0].values == [
        NODE
    ]
    annotations = wait_for(
        "the PV annotations",
        lambda: (
            (cluster.core.read_persistent_volume(pv.metadata.name).metadata.annotations or {}).get(
                "pg-reflinker.csi/guid"
            )
            and cluster.core.read_persistent_volume(pv.metadata.name).metadata.annotations
        ),
        15,
    )
    assert annotations["pg-reflinker.csi/guid"] == guid
    assert annotations["pg-reflinker.csi/source-pvc"] == f"{NS}/{cnpg.pvc}"
    assert annotations["pg-reflinker.csi/claim"] == f"{NS}/pg-xyz-dev"
    # The hot clone was moved out of the source volume into HOSTPATH_PREFIX/<GUID>.
    assert not (cnpg.target / ".pg-reflinker" / guid).exists()
    hot = [
        line
        for line in cluster.log_tail("controller", 400).splitlines()
        if "hot clone taken" in line and guid in line
    ]
    assert hot, "the controller log should show the hot clone through reflink_snapshot()"
    print(f"\nclaim to Bound: {bound_after:.2f} s; {hot[-1].strip()}")

    # Play kubelet: publish the clone, then boot PostgreSQL on it.
    target = cluster.publish(pv, str(uuid.uuid4()))
    clone = boot_clone(target, cluster.plane.work / "sock")
    try:
        assert clone.psql("SELECT pg_is_in_recovery()") == "f"
        for table in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers"):
            q = f"SELECT count(*) FROM {table}"
            assert clone.psql(q, db="app") == cnpg.server.psql(q, db="app")
        clone.amcheck()
    finally:
        clone.stop()
        cluster.unpublish(pv, target)

    # Deleting the claim removes the PV, the record and the directory.
    cluster.core.delete_namespaced_persistent_volume_claim("pg-xyz-dev", NS)
    wait_for(
        "the clone's PV to go",
        lambda: not _exists(lambda: cluster.core.read_persistent_volume(pv.metadata.name)),
        30,
    )
    wait_for("the clone's record to go", lambda: not record_of(cluster, guid), 30)
    assert not (cluster.prefix / guid).exists()


def test_source_pod_not_ready_keeps_the_claim_pending_until_it_is(
    cluster: Cluster, cnpg: CnpgInstance
) -> None:
    cnpg.set_ready(cluster, False)
    try:
        cluster.pvc("pg-xyz-wait", source=cnpg.pvc)
        events = wait_for(
            "a ProvisioningFailed event naming the pod",
            lambda: [
                e
                for e in cluster.events_for("PersistentVolumeClaim", "pg-xyz-wait")
                if "ProvisioningFailed" in e and f"{NS}/{cnpg.pvc}" in e
            ],
            30,
        )
        assert "not Running and Ready" in events[0]
        pvc = cluster.core.read_namespaced_persistent_volume_claim("pg-xyz-wait", NS)
        assert pvc.status.phase == "Pending"
    finally:
        cnpg.set_ready(cluster, True)
    pv = cluster.wait_bound("pg-xyz-wait", timeout=30)
    assert (cluster.prefix / pv.spec.csi.volume_handle / "pgdata" / "PG_VERSION").exists()
    cluster.core.delete_namespaced_persistent_volume_claim("pg-xyz-wait", NS)


def test_records_show_in_kubectl_columns(cluster: Cluster) -> None:
    crd = client.ApiextensionsV1Api(cluster.plane.api_client()).read_custom_resource_definition(
        "reflinkvolumes.pg-reflinker.csi"
    )
    columns = [c.name for c in crd.spec.versions[0].additional_printer_columns]
    assert columns == ["GUID", "Node", "Source", "Claim", "Phase", "Age"]


def test_node_agent_restart_converges(cluster: Cluster) -> None:
    """Stop the node plugin, create a claim, start it again: the volume appears."""
    cluster.stop_process("node")
    try:
        cluster.pvc("while-node-down")
        time.sleep(2)
        pvc = cluster.core.read_namespaced_persistent_volume_claim("while-node-down", NS)
        assert pvc.status.phase == "Pending"
    finally:
        cluster.restart("node")
    pv = cluster.wait_bound("while-node-down", timeout=60)
    assert (cluster.prefix / pv.spec.csi.volume_handle).is_dir()


def _exists(read) -> bool:  # type: ignore[no-untyped-def]
    try:
        read()
        return True
    except client.exceptions.ApiException as err:
        if err.status == 404:
            return False
        raise


def test_claim_whose_source_no_pod_uses_gets_a_cold_clone(cluster: Cluster) -> None:
    cluster.pvc("template")
    source = cluster.wait_bound("template")
    (cluster.prefix / source.spec.csi.volume_handle / "seed.sql").write_text("select 1;\n")
    cluster.pvc("from-template", source="template")
    pv = cluster.wait_bound("from-template")
    guid = pv.spec.csi.volume_handle
    assert (cluster.prefix / guid / "seed.sql").read_text() == "select 1;\n"
    [record] = record_of(cluster, guid)
    assert record["spec"]["cloneMode"] == "cold"
    assert pv.spec.csi.volume_attributes["pg-reflinker.csi/source-pvc"] == f"{NS}/template"


def test_missing_replication_secret_is_named_and_the_claim_binds_once_it_exists(
    cluster: Cluster, cnpg: CnpgInstance
) -> None:
    secret = cluster.core.read_namespaced_secret("pg-xyz-replication", NS)
    cluster.core.delete_namespaced_secret("pg-xyz-replication", NS)
    try:
        cluster.pvc("pg-xyz-nosecret", source=cnpg.pvc)
        events = wait_for(
            "a ProvisioningFailed event naming the secret",
            lambda: [
                e
                for e in cluster.events_for("PersistentVolumeClaim", "pg-xyz-nosecret")
                if "ProvisioningFailed" in e and f"{NS}/pg-xyz-replication" in e
            ],
            30,
        )
        assert "is missing" in events[0]
    finally:
        secret.metadata = client.V1ObjectMeta(name="pg-xyz-replication")
        cluster.core.create_namespaced_secret(NS, secret)
    cluster.wait_bound("pg-xyz-nosecret", timeout=30)
    cluster.core.delete_namespaced_persistent_volume_claim("pg-xyz-nosecret", NS)
