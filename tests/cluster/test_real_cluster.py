"""pg-reflinker in a real one-node cluster: real kubelet and containerd running real pods, our
image built from the Dockerfile, deploy/ applied through the test overlay, and the real
CloudNativePG operator creating the databases and their clones.

The scenarios build on each other in file order (one source cluster for the package)."""

from __future__ import annotations

import time

import pytest

from tests.cluster import cnpg
from tests.e2e.onenode import NODE, PREFIX, OneNodeCluster

NS = cnpg.NS
SOURCE = "pg-xyz"
PGBENCH_SCALE = 20


@pytest.fixture(scope="package")
def source(k8s: OneNodeCluster) -> str:
    """The source CNPG cluster (from deploy/examples/source-cluster.yaml) with pgbench data."""
    cnpg.ensure_namespace(k8s)
    cnpg.install_function_configmap(k8s)
    start = time.monotonic()
    k8s.apply(cnpg.example("source-cluster.yaml"))
    healthy = cnpg.wait_healthy(k8s, SOURCE)
    print(f"\nsource Cluster healthy {time.monotonic() - start:.1f} s after apply ({healthy:.1f} s)")
    pod = cnpg.primary_pod(k8s, SOURCE)
    cnpg.pgbench(k8s, pod, "-i", "-s", str(PGBENCH_SCALE), "-q")
    return pod


def test_source_cluster_runs_on_a_pg_reflinker_volume_with_the_function(
    k8s: OneNodeCluster, source: str
) -> None:
    pvc = k8s.get("pvc", source, "-n", NS)
    assert pvc["spec"]["storageClassName"] == "pg-reflinker"
    pv = k8s.get("pv", pvc["spec"]["volumeName"])
    assert pv["spec"]["csi"]["driver"] == "pg-reflinker.csi"
    node_terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert node_terms[0]["matchExpressions"][0]["values"] == [NODE]
    # The data lives on the node's HOSTPATH_PREFIX, under the volume's GUID.
    guid = pv["spec"]["csi"]["volumeHandle"]
    assert (PREFIX / guid / "pgdata" / "PG_VERSION").read_text().strip() == "15"
    # postInitSQLRefs installed the function where streaming_replica can call it.
    assert cnpg.psql(
        k8s,
        source,
        "SELECT has_function_privilege('streaming_replica', 'reflink_snapshot(text)', 'EXECUTE')",
        db="postgres",
    ) == "t"
    assert int(cnpg.psql(k8s, source, "SELECT count(*) FROM pgbench_accounts")) == (
        PGBENCH_SCALE * 100000
    )
