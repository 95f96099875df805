"""Kubernetes mode end to end: PVCs through csi-provisioner, our controller (under its service
account), our node plugin, ReflinkVolume records, and a running PostgreSQL source."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from kubernetes import client

from reflinker_csi.kube.api import REFLINKVOLUMES
from tests.e2e.stack import NODE, NS, Cluster, CnpgInstance, wait_for

pytestmark = pytest.mark.integration


def record_of(cluster: Cluster, guid: str) -> list[dict]:  # type: ignore[type-arg]
    items = cluster.custom.list_cluster_custom_object(
        REFLINKVOLUMES.group,
        REFLINKVOLUMES.version,
        REFLINKVOLUMES.plural,
        label_selector=f"pg-reflinker.csi/guid={guid}",
    )["items"]
    return list(items)


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
        # external-provisioner's event carries the driver's message whole.
        assert re.fullmatch(
            r"pg-reflinker\.csi_\S+ ProvisioningFailed: rpc error: code = Unavailable desc = "
            r"source pod "
            rf"{NS}/{cnpg.pvc} \(CNPG cluster pg-xyz\) is not Running and Ready \(phase "
            r"Running\); the clone is retried once it is",
            events[0],
        ), events[0]
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
    wanted = [
        "GUID",
        "Node",
        "Source",
        "Claim",
        "Phase",
        "Own",
        "As of",
        "LSN",
        "Lag",
        "Used",
        "Mode",
        "Method",
        "Message",
        "Age",
    ]
    assert columns == wanted


def test_node_agent_restart_converges(cluster: Cluster) -> None:
    """Stop the node plugin, create a claim, start it again: the volume appears."""
    cluster.stop_process("node")
    try:
        cluster.pvc("while-node-down")
        # The controller has made the record; with no node agent it stays Pending.
        [record] = wait_for(
            "the record of the claim",
            lambda: [
                r
                for r in cluster.custom.list_cluster_custom_object(
                    REFLINKVOLUMES.group, REFLINKVOLUMES.version, REFLINKVOLUMES.plural
                )["items"]
                if r["spec"].get("context", {}).get("pg-reflinker.csi/claim")
                == f"{NS}/while-node-down"
            ],
            30,
        )
        assert (record.get("status") or {}).get("phase", "Pending") == "Pending"
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
    # Both processes count the clone and time it: the controller the CreateVolume attempt, the
    # node plugin its disk work.
    for process in ("controller", "node"):
        text = cluster.metrics(process)
        assert re.search(
            r'^pg_reflinker_volumes_made_total\{method="cold",result="OK"\} [1-9]', text, re.M
        ), process
        assert re.search(
            r'^pg_reflinker_volume_make_seconds_count\{method="cold"\} [1-9]', text, re.M
        ), process
    node = cluster.metrics("node")
    assert re.search(r'^pg_reflinker_filesystem_free_bytes\{node="node-a"\} [1-9]', node, re.M)
    assert re.search(r'^pg_reflinker_free_space_floor_bytes\{node="node-a"\} [1-9]', node, re.M)


def test_metrics_name_claims_and_answer_only_a_token_allowed_to_read_them(
    cluster: Cluster,
) -> None:
    """/metrics of both processes: nothing without a bearer token (401), nothing for the token
    of a tenant's pod (its namespace's default service account: 403), everything for the
    chart's metrics reader; a volume's series name its claim, never its GUID."""
    cluster.pvc("measured")
    guid = cluster.wait_bound("measured").spec.csi.volume_handle
    tenant = wait_for("the tenant's service account", lambda: _token_or_none(cluster), 30)
    for process in ("controller", "node"):
        anonymous = cluster.metrics_response(process)
        assert anonymous.status == 401 and b"pg_reflinker" not in anonymous.data, process
        denied = cluster.metrics_response(process, tenant)
        assert denied.status == 403 and b"pg_reflinker" not in denied.data, process
    series = wait_for(
        "the claim's own bytes on the node's /metrics",
        lambda: [
            line
            for line in cluster.metrics("node").splitlines()
            if line.startswith("pg_reflinker_volume_own_bytes{")
            and 'persistentvolumeclaim="measured"' in line
        ],
        30,
    )
    assert f'namespace="{NS}"' in series[0], series
    assert guid not in cluster.metrics("node")
    cluster.core.delete_namespaced_persistent_volume_claim("measured", NS)


def _token_or_none(cluster: Cluster) -> str | None:
    try:
        return cluster.token(NS, "default")
    except client.exceptions.ApiException:
        return None


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
        assert re.fullmatch(
            r"pg-reflinker\.csi_\S+ ProvisioningFailed: rpc error: code = FailedPrecondition "
            r"desc = secret "
            rf"{NS}/pg-xyz-replication is missing; CNPG creates it for the source cluster",
            events[0],
        ), events[0]
    finally:
        secret.metadata = client.V1ObjectMeta(name="pg-xyz-replication")
        cluster.core.create_namespaced_secret(NS, secret)
    cluster.wait_bound("pg-xyz-nosecret", timeout=30)
    cluster.core.delete_namespaced_persistent_volume_claim("pg-xyz-nosecret", NS)


def test_a_node_plugin_on_a_prefix_that_cannot_reflink_says_so_and_makes_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    """HOSTPATH_PREFIX on the wrong filesystem (as when the XFS is not mounted yet and the
    directory is on the host's root): the node plugin names the prefix and its filesystem in
    its log and on the Node, exits, and has made no volume there."""
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(prefix)], check=True)
    try:
        args, env = cluster.commands["node"]
        env = {
            **env,
            "HOSTPATH_PREFIX": str(prefix),
            "CSI_ENDPOINT": f"unix://{tmp_path / 'csi.sock'}",
            "METRICS_PORT": "0",
        }
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert f"cannot reflink {prefix}" in last and "tmpfs filesystem" in last, last
        assert "XFS (mkfs.xfs -m reflink=1) or btrfs" in last
        assert sorted(p.name for p in prefix.iterdir()) == [".pg-reflinker"]
        assert list((prefix / ".pg-reflinker").iterdir()) == []
        assert not (tmp_path / "csi.sock").exists()
        wait_for(
            "the Warning on the Node",
            lambda: any(
                "ReflinkUnsupported" in e and str(prefix) in e
                for e in cluster.events_for("Node", NODE, "default")
            ),
            10,
        )
    finally:
        subprocess.run(["umount", str(prefix)], check=True)
