"""High-availability CloudNativePG Clusters on pg-reflinker, on the real three-node cluster:
instances spread over the nodes, a clone taken from a standby lands on the standby's node, a
new Cluster's replica gets its empty volume on another node, a drained node keeps its clones.

The other nodes are uncordoned for this module only (every other scenario runs on the first
node) and cordoned again at its end, after its namespace and volumes are gone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster import cnpg
from tests.e2e.onenode import NODE, OneNodeCluster

NS = "ha"
SOURCE = "ha-db"
CLONE = "ha-db-dev"
SCALE = 5


@pytest.fixture(scope="module")
def nodes(k8s: OneNodeCluster) -> Iterator[list[str]]:
    names = [n.name for n in k8s.nodes]
    assert len(names) == 3, "the real-cluster package runs on three nodes"
    k8s.kubectl("uncordon", *names[1:])
    try:
        yield names
    finally:
        k8s.kubectl("uncordon", *names[1:])  # a drained node's pods must be able to end
        k8s.kubectl(
            "delete", "namespace", NS, "--wait=true", "--timeout=240s", check=False, timeout=300
        )
        k8s.wait("the ha namespace's volumes gone", lambda: not _records_in(k8s, NS), 120)
        k8s.kubectl("cordon", *names[1:])


def _records_in(k8s: OneNodeCluster, ns: str) -> list[dict[str, Any]]:
    records = k8s.get("reflinkvolumes")["items"]
    return [r for r in records if r["spec"].get("claim", "").startswith(f"{ns}/")]


def _record_of(k8s: OneNodeCluster, claim: str) -> dict[str, Any]:
    guid = cnpg.volume_handle(k8s, claim, NS)
    (record,) = [r for r in k8s.get("reflinkvolumes")["items"] if r["spec"]["guid"] == guid]
    return record


@pytest.fixture(scope="module")
def source(k8s: OneNodeCluster, nodes: list[str]) -> str:
    """A three-instance Cluster (deploy/examples/source-cluster.yaml with instances: 3 and a WAL
    volume) holding pgbench's tables; its primary's pod name."""
    cnpg.ensure_namespace(k8s, NS)
    cnpg.install_function_configmap(k8s, NS)
    doc = cnpg.example("source-cluster.yaml")
    doc["metadata"].update(name=SOURCE, namespace=NS)
    doc["spec"]["instances"] = 3
    doc["spec"]["walStorage"] = {"storageClass": "pg-reflinker", "size": "2Gi"}
    start = time.monotonic()
    k8s.apply(doc)
    cnpg.wait_healthy(k8s, SOURCE, NS, timeout=420)
    print(f"\nthree-instance Cluster healthy {time.monotonic() - start:.1f} s after apply")
    primary = cnpg.primary_pod(k8s, SOURCE, NS)
    cnpg.pgbench(k8s, primary, "-i", "-s", str(SCALE), "-q", ns=NS)
    return primary


def test_a_three_instance_cluster_spreads_over_the_three_nodes(
    k8s: OneNodeCluster, nodes: list[str], source: str
) -> None:
    """Each instance's empty volumes went to a node no other instance of the Cluster uses, its
    WAL volume with its data volume (claims made within milliseconds of each other), and its
    pod followed them there; the replicas stream from the primary (found through cluster DNS
    as ha-db-rw)."""
    placed = cnpg.instance_nodes(k8s, SOURCE, NS)
    assert sorted(placed.values()) == sorted(nodes), placed
    for pod, node in placed.items():
        assert cnpg.node_of_claim(k8s, pod, NS) == node
        assert cnpg.node_of_claim(k8s, f"{pod}-wal", NS) == node
        assert _record_of(k8s, pod)["spec"]["nodeName"] == node
    streaming = cnpg.psql(
        k8s, source, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'", ns=NS
    )
    assert streaming == "2"


def _standby(k8s: OneNodeCluster) -> str:
    primary = cnpg.primary_pod(k8s, SOURCE, NS)
    standbys = sorted(p for p in cnpg.instance_nodes(k8s, SOURCE, NS) if p != primary)
    assert standbys, "the source has no standby"
    return standbys[0]


def test_a_clone_of_a_standby_under_load_lands_on_its_node_and_its_replica_elsewhere(
    k8s: OneNodeCluster, nodes: list[str], source: str
) -> None:
    """docs/ha.md: clone a standby's claim. The new Cluster's primary volume is a hot clone on
    the standby's node; its second instance's empty volume goes to another node and joins; the
    copy is consistent (pgbench's invariant, pg_amcheck --heapallindexed)."""
    primary = cnpg.primary_pod(k8s, SOURCE, NS)
    standby = _standby(k8s)
    standby_node = cnpg.node_of_claim(k8s, standby, NS)
    load = cnpg.pgbench_background(k8s, primary, seconds=25, ns=NS)
    try:
        k8s.wait(
            "pgbench transactions on the primary",
            lambda: int(cnpg.psql(k8s, primary, "SELECT count(*) FROM pgbench_history", ns=NS)),
            60,
        )
        doc = cnpg.example("clone-cluster.yaml")
        doc["metadata"].update(name=CLONE, namespace=NS)
        doc["spec"]["instances"] = 2
        doc["spec"]["bootstrap"]["recovery"]["volumeSnapshots"]["storage"]["name"] = standby
        k8s.apply(doc)
        cnpg.wait_healthy(k8s, CLONE, NS, timeout=300)
    finally:
        out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, f"pgbench on the primary failed: {out}"

    clone_primary = cnpg.primary_pod(k8s, CLONE, NS)
    record = _record_of(k8s, clone_primary)
    assert record["spec"]["cloneMode"] == "hot"
    assert record["spec"]["sourceVolume"] == cnpg.volume_handle(k8s, standby, NS)
    assert cnpg.node_of_claim(k8s, clone_primary, NS) == standby_node
    placed = cnpg.instance_nodes(k8s, CLONE, NS)
    (replica,) = [p for p in placed if p != clone_primary]
    assert placed[clone_primary] == standby_node
    assert placed[replica] != standby_node, f"both instances of {CLONE} on {standby_node}"
    assert cnpg.node_of_claim(k8s, replica, NS) == placed[replica]
    assert not _record_of(k8s, replica)["spec"].get("sourceVolume"), "the replica is no copy"

    sums = cnpg.pgbench_sums(k8s, clone_primary, NS)
    assert len(sums) == 1 and sums != {"0"}, f"pgbench invariant in the clone: {sums}"
    cnpg.amcheck(k8s, clone_primary, NS)
    # The replica holds what its primary holds (it joined by streaming, through cluster DNS).
    count = "SELECT count(*) FROM pgbench_history"
    assert cnpg.psql(k8s, replica, count, ns=NS) == cnpg.psql(k8s, clone_primary, count, ns=NS)
    taken = cnpg.hot_clone_taken(k8s, record["spec"]["guid"])
    assert taken is not None, "no 'hot clone taken' log line"
    print(f"\nclone of standby {standby} on {standby_node}: {taken['method']} in {taken['s']} s")
    cnpg.delete_cluster(k8s, CLONE, NS)


def test_the_sources_primary_deleted_while_its_clone_is_taken(
    k8s: OneNodeCluster, nodes: list[str], source: str
) -> None:
    """docs/ha.md#failover-during-a-clone: the primary's pod deleted as the clone of its claim
    begins. CNPG fails over; the copy's session ends with the pod, so no instance is left with
    a pg-reflinker session (a backup in progress) or a replication slot of the copy; the new
    Cluster starts from the instance as it comes back, consistent."""
    primary = cnpg.primary_pod(k8s, SOURCE, NS)
    doc = cnpg.example("clone-cluster.yaml")
    doc["metadata"].update(name="ha-db-failover", namespace=NS)
    doc["spec"]["bootstrap"]["recovery"]["volumeSnapshots"]["storage"]["name"] = primary
    k8s.apply(doc)
    k8s.wait(
        "the clone's claim",
        lambda: (
            k8s.kubectl("get", "pvc", "ha-db-failover-1", "-n", NS, check=False).returncode == 0
        ),
        60,
    )
    k8s.kubectl("delete", "pod", primary, "-n", NS, "--grace-period=1", "--wait=false")
    cnpg.wait_healthy(k8s, "ha-db-failover", NS, timeout=420)
    cnpg.wait_healthy(k8s, SOURCE, NS, timeout=300)
    assert cnpg.primary_pod(k8s, SOURCE, NS) != primary, "CNPG did not fail over"
    clone = cnpg.primary_pod(k8s, "ha-db-failover", NS)
    sums = cnpg.pgbench_sums(k8s, clone, NS)
    assert len(sums) == 1, f"pgbench invariant in the clone: {sums}"
    cnpg.amcheck(k8s, clone, NS)
    for pod in cnpg.instance_nodes(k8s, SOURCE, NS):
        left = cnpg.psql(
            k8s,
            pod,
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE application_name = "
            "'pg-reflinker') || ',' || (SELECT count(*) FROM pg_replication_slots WHERE "
            "slot_name LIKE 'pg_reflinker%')",
            db="postgres",
            ns=NS,
        )
        assert left == "0,0", f"{pod}: pg-reflinker sessions, slots = {left}"
    events = k8s.get("events", "-n", NS, "--field-selector", "involvedObject.name=ha-db-failover-1")
    said = [e.get("message", "") for e in events["items"] if e.get("type") == "Warning"]
    print(f"\nprimary {primary} deleted as its clone began; the claim's warnings: {said}")
    cnpg.delete_cluster(k8s, "ha-db-failover", NS)


def test_a_drained_node_keeps_its_clone_and_the_other_nodes_keep_serving(
    k8s: OneNodeCluster, nodes: list[str], source: str
) -> None:
    """docs/ha.md#draining-a-node: a single-instance clone whose node is drained (with CNPG's
    nodeMaintenanceWindow, which lifts the primary's PodDisruptionBudget) waits for its node:
    its volume and data stay there, the source's primary on another node keeps taking writes,
    and once the node is uncordoned the clone starts again on the same data."""
    primary = cnpg.primary_pod(k8s, SOURCE, NS)
    primary_node = cnpg.node_of_claim(k8s, primary, NS)
    standby = next(
        p
        for p, n in cnpg.instance_nodes(k8s, SOURCE, NS).items()
        if p != primary and n not in (primary_node, NODE)
    )
    drained = cnpg.node_of_claim(k8s, standby, NS)
    doc = cnpg.example("clone-cluster.yaml")
    doc["metadata"].update(name="ha-db-drained", namespace=NS)
    doc["spec"]["bootstrap"]["recovery"]["volumeSnapshots"]["storage"]["name"] = standby
    doc["spec"]["nodeMaintenanceWindow"] = {"inProgress": True, "reusePVC": True}
    k8s.apply(doc)
    cnpg.wait_healthy(k8s, "ha-db-drained", NS, timeout=240)
    clone = cnpg.primary_pod(k8s, "ha-db-drained", NS)
    assert cnpg.node_of_claim(k8s, clone, NS) == drained
    cnpg.psql(k8s, clone, "CREATE TABLE before_drain AS SELECT 42 AS answer", ns=NS)
    guid = cnpg.volume_handle(k8s, clone, NS)
    data = k8s.prefix_of(drained) / guid / "pgdata"

    try:
        # Uncordoned whatever happens: the scenarios after this one need the node.
        k8s.kubectl(
            "drain",
            drained,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=180s",
            timeout=240,
        )
        # Evicted, made again by CNPG, and refused by the scheduler everywhere: its volume can
        # only be mounted on the cordoned node.
        k8s.wait(f"{clone} evicted and unschedulable", lambda: _unschedulable(k8s, clone), 120)
        assert (data / "PG_VERSION").exists(), "the clone's data left the drained node"
        assert _record_of(k8s, clone)["status"]["phase"] == "Ready"
        cnpg.psql(k8s, primary, "CREATE TABLE during_drain (id int)", ns=NS)
    finally:
        k8s.kubectl("uncordon", drained)
    cnpg.wait_healthy(k8s, "ha-db-drained", NS, timeout=240)
    cnpg.wait_healthy(k8s, SOURCE, NS, timeout=240)
    assert cnpg.node_of_claim(k8s, clone, NS) == drained
    assert cnpg.instance_nodes(k8s, "ha-db-drained", NS)[clone] == drained
    assert cnpg.psql(k8s, clone, "SELECT answer FROM before_drain", ns=NS) == "42"


def _unschedulable(k8s: OneNodeCluster, pod: str) -> bool:
    result = k8s.kubectl("get", "pod", pod, "-n", NS, "-o", "json", check=False)
    if result.returncode != 0:
        return False
    conditions = json.loads(result.stdout)["status"].get("conditions") or []
    return any(
        c["type"] == "PodScheduled"
        and c["status"] == "False"
        and c.get("reason") == "Unschedulable"
        for c in conditions
    )


def _archive_wal_to_the_object_store(k8s: OneNodeCluster) -> None:
    """The source's WAL archived (barmanObjectStore, to the test's object store) and its
    volumeSnapshot Backups taken with pg-reflinker's VolumeSnapshotClass: what CNPG needs to
    seed new replicas from snapshots (docs/ha.md#replicas-seeded-from-snapshots)."""
    s3 = k8s.s3
    k8s.kubectl(
        "create", "secret", "generic", "ha-db-s3", "-n", NS,
        f"--from-literal=ACCESS_KEY_ID={s3['access']}",
        f"--from-literal=ACCESS_SECRET_KEY={s3['secret']}",
    )  # fmt: skip
    backup = {
        "barmanObjectStore": {
            "destinationPath": f"s3://{s3['bucket']}/",
            "endpointURL": s3["endpoint"],
            "s3Credentials": {
                "accessKeyId": {"name": "ha-db-s3", "key": "ACCESS_KEY_ID"},
                "secretAccessKey": {"name": "ha-db-s3", "key": "ACCESS_SECRET_KEY"},
            },
        },
        "volumeSnapshot": {
            "className": "pg-reflinker",
            "onlineConfiguration": {"immediateCheckpoint": True},
        },
    }
    _patch_cluster(k8s, {"spec": {"backup": backup}})

    def archiving() -> bool:
        conditions = cnpg.cluster_status(k8s, SOURCE, NS).get("conditions") or []
        return any(c["type"] == "ContinuousArchiving" and c["status"] == "True" for c in conditions)

    primary = cnpg.primary_pod(k8s, SOURCE, NS)
    cnpg.psql(k8s, primary, "SELECT pg_switch_wal()", db="postgres", ns=NS)
    try:
        k8s.wait("WAL archived to the object store", archiving, 180)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{cnpg.diagnose(k8s, SOURCE, NS)}") from None


def _patch_cluster(k8s: OneNodeCluster, patch: dict[str, Any], *how: str) -> None:
    k8s.kubectl(
        "patch", "cluster.postgresql.cnpg.io", SOURCE, "-n", NS, *how, "--type", "merge", "-p",
        json.dumps(patch),
    )  # fmt: skip


def _completed_backup(k8s: OneNodeCluster, name: str, target: str) -> dict[str, Any]:
    k8s.apply(
        {
            "apiVersion": "postgresql.cnpg.io/v1",
            "kind": "Backup",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "method": "volumeSnapshot",
                "cluster": {"name": SOURCE},
                "target": target,
                "online": True,
                "onlineConfiguration": {"immediateCheckpoint": True},
            },
        }
    )

    def done() -> dict[str, Any] | None:
        status = k8s.get("backup.postgresql.cnpg.io", name, "-n", NS).get("status", {})
        assert status.get("phase") != "failed", f"Backup {name} failed: {status}"
        return status if status.get("phase") == "completed" else None

    status: dict[str, Any] = k8s.wait(f"Backup {name} completed", done, 240)
    return status


@pytest.mark.parametrize("target", ["prefer-standby", "primary"])
def test_a_replica_added_after_a_volume_snapshot_backup_is_seeded_from_it_and_can_lead(
    k8s: OneNodeCluster, nodes: list[str], source: str, target: str
) -> None:
    """cloudnative-pg issue #11383's scenario on pg-reflinker: WAL archived, a volumeSnapshot
    Backup taken under write load completes, the Cluster is scaled up. The new replica's claim
    is restored from the Backup's VolumeSnapshot (CNPG's restoresnapshot, no pg_basebackup), it
    streams, passes pg_amcheck --heapallindexed and holds every row its primary has; a
    switchover makes it the primary and amcheck passes on it again. With target primary, a new
    Cluster recovered from the Backup passes the same checks."""
    if k8s.kubectl("get", "secret", "ha-db-s3", "-n", NS, check=False).returncode != 0:
        _archive_wal_to_the_object_store(k8s)  # once, for both targets
    primary = cnpg.primary_pod(k8s, SOURCE, NS)
    before = set(cnpg.instance_nodes(k8s, SOURCE, NS))
    name = f"ha-db-{target}"
    load = cnpg.pgbench_background(k8s, primary, seconds=15, ns=NS)
    try:
        status = _completed_backup(k8s, name, target)
    finally:
        out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, f"pgbench on the primary failed: {out}"
    taken_on = status["instanceID"]["podName"]
    assert (taken_on == primary) == (target == "primary"), f"{target} Backup taken on {taken_on}"

    _patch_cluster(k8s, {"spec": {"instances": len(before) + 1}})
    k8s.wait(
        "the new instance's pod",
        lambda: len(cnpg.instance_nodes(k8s, SOURCE, NS)) > len(before),
        120,
    )
    cnpg.wait_healthy(k8s, SOURCE, NS, timeout=300)
    (new,) = set(cnpg.instance_nodes(k8s, SOURCE, NS)) - before
    claim = k8s.get("pvc", new, "-n", NS)
    assert claim["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": name,
    }, f"replica {new} was not seeded from Backup {name}: {claim['spec'].get('dataSource')}"
    # A reflink snapshot is restored on its own node: the instance the Backup was taken from.
    assert cnpg.node_of_claim(k8s, new, NS) == cnpg.node_of_claim(k8s, taken_on, NS)
    assert cnpg.node_of_claim(k8s, f"{new}-wal", NS) == cnpg.node_of_claim(k8s, new, NS)
    streaming = cnpg.psql(
        k8s,
        primary,
        f"SELECT state FROM pg_stat_replication WHERE application_name = '{new}'",
        db="postgres",
        ns=NS,
    )
    assert streaming == "streaming", f"{new} is not streaming: {streaming!r}"

    cnpg.amcheck(k8s, primary, NS)  # installs amcheck where the standbys get it by replication
    count = "SELECT count(*) FROM pgbench_history"
    on_primary = cnpg.psql(k8s, primary, count, ns=NS)
    k8s.wait(
        f"{new} holding every row of the primary",
        lambda: cnpg.psql(k8s, new, count, ns=NS) == on_primary,
        60,
    )
    sums = cnpg.pgbench_sums(k8s, new, NS)
    assert len(sums) == 1 and sums == cnpg.pgbench_sums(k8s, primary, NS), sums
    cnpg.amcheck(k8s, new, NS, standby=True)

    _patch_cluster(
        k8s,
        {
            "status": {
                "targetPrimary": new,
                "targetPrimaryTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                "phase": "Switchover in progress",
                "phaseReason": f"Switching over to {new}",
            }
        },
        "--subresource=status",
    )
    k8s.wait(f"{new} the primary", lambda: cnpg.cluster_status(k8s, SOURCE, NS).get(
        "currentPrimary") == new, 180)  # fmt: skip
    cnpg.wait_healthy(k8s, SOURCE, NS, timeout=300)
    cnpg.psql(k8s, new, f"CREATE TABLE led_by_{new.replace('-', '_')} (id int)", ns=NS)
    cnpg.amcheck(k8s, new, NS)
    print(f"\n{target} Backup on {taken_on}; replica {new} seeded from it, now the primary")
    if target != "primary":
        return

    restored = cnpg.example("source-cluster.yaml")
    restored["metadata"].update(name="ha-db-restored", namespace=NS)
    restored["spec"]["walStorage"] = {"storageClass": "pg-reflinker", "size": "2Gi"}
    restored["spec"]["bootstrap"] = {"recovery": {"backup": {"name": name}}}
    k8s.apply(restored)
    cnpg.wait_healthy(k8s, "ha-db-restored", NS, timeout=300)
    pod = cnpg.primary_pod(k8s, "ha-db-restored", NS)
    sums = cnpg.pgbench_sums(k8s, pod, NS)
    assert len(sums) == 1 and sums != {"0"}, f"pgbench invariant in the recovered Cluster: {sums}"
    cnpg.amcheck(k8s, pod, NS)
    cnpg.delete_cluster(k8s, "ha-db-restored", NS)
