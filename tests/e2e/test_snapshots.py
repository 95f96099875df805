"""VolumeSnapshots in Kubernetes mode, through the real snapshot-controller and csi-snapshotter
(external-snapshotter v8.6.0) and csi-provisioner: a snapshot of a running database is hot and
self-contained, volumes made from it are reflink copies that touch no database, and snapshots
and volumes can be deleted in any order."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from tests.e2e.stack import NS, Cluster, CnpgInstance, wait_for
from tests.e2e.test_kubernetes import record_of
from tests.pgserver import PostgresServer, boot_clone

pytestmark = pytest.mark.integration
GROUP, VERSION = "snapshot.storage.k8s.io", "v1"


def snapshot(cluster: Cluster, name: str, claim: str) -> None:
    cluster.custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        "volumesnapshots",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name},
            "spec": {
                "volumeSnapshotClassName": "pg-reflinker",
                "source": {"persistentVolumeClaimName": claim},
            },
        },
    )


def ready_snapshot(cluster: Cluster, name: str, timeout: float = 60) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        obj = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, NS, "volumesnapshots", name
        )
        return obj if (obj.get("status") or {}).get("readyToUse") else None

    found: dict[str, Any] = wait_for(f"VolumeSnapshot {name} readyToUse", ready, timeout)
    return found


def handle_of(cluster: Cluster, snap: dict[str, Any]) -> str:
    content = cluster.custom.get_cluster_custom_object(
        GROUP, VERSION, "volumesnapshotcontents", snap["status"]["boundVolumeSnapshotContentName"]
    )
    return str(content["status"]["snapshotHandle"])


def claim_from_snapshot(cluster: Cluster, name: str, snap: str) -> None:
    cluster.core.create_namespaced_persistent_volume_claim(
        NS,
        client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                storage_class_name="pg-reflinker",
                resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"}),
                data_source=client.V1TypedLocalObjectReference(
                    api_group=GROUP, kind="VolumeSnapshot", name=snap
                ),
            ),
        ),
    )


def record(cluster: Cluster, guid: str) -> dict[str, Any]:
    items = record_of(cluster, guid)
    assert len(items) == 1, f"{len(items)} records for {guid}"
    return dict(items[0])


def pgbench_sums(server: PostgresServer) -> set[str]:
    return set(
        server.psql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ',' ||"
            " (SELECT sum(bbalance) FROM pgbench_branches) || ',' ||"
            " (SELECT sum(tbalance) FROM pgbench_tellers) || ',' ||"
            " (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
            db="app",
        ).split(",")
    )


def test_a_snapshot_of_a_running_database_under_load_gives_five_bootable_volumes(
    cluster: Cluster, cnpg: CnpgInstance
) -> None:
    def committed() -> int:
        return int(cnpg.server.psql("SELECT count(*) FROM pgbench_history", db="app"))

    before = committed()
    bench = cnpg.server.pgbench_background("-n", "-c", "2", "-j", "2", "-T", "15")
    try:
        wait_for("transactions committing", lambda: committed() > before + 50, 15, every=0.05)
        snapshot(cluster, "golden", cnpg.pvc)
        snap = ready_snapshot(cluster, "golden")
        at_snapshot = committed()
    finally:
        out, _ = bench.communicate(timeout=60)
    assert bench.returncode == 0, out
    after = committed()
    guid = handle_of(cluster, snap)
    rec = record(cluster, guid)
    assert rec["spec"]["kind"] == "snapshot" and rec["spec"]["cloneMode"] == "hot"
    assert rec["spec"]["cloneMethod"] in ("function", "native")
    # A directory on the source's node that no pod can reach, with its own backup_label.
    directory = cluster.prefix / ".pg-reflinker" / "snapshots" / guid
    assert "START WAL LOCATION" in (directory / "pgdata" / "backup_label").read_text()
    names = [f"from-golden-{i}" for i in range(5)]
    for name in names:
        claim_from_snapshot(cluster, name, "golden")
    pvs = [cluster.wait_bound(name, timeout=60) for name in names]
    for pv in pvs:
        clone = boot_clone(cluster.prefix / pv.spec.csi.volume_handle, cluster.plane.work / "sock")
        try:
            assert clone.psql("SELECT pg_is_in_recovery()") == "f"
            sums = pgbench_sums(clone)
            assert len(sums) == 1 and sums != {"0"}, f"pgbench invariant: {sums}"
            # Taken while transactions were committing: some, not all, of the load is in it.
            copied = int(clone.psql("SELECT count(*) FROM pgbench_history", db="app"))
            assert before + 50 < copied <= at_snapshot < after, (before, copied, at_snapshot, after)
            clone.amcheck()
        finally:
            clone.stop()
        assert record(cluster, pv.spec.csi.volume_handle)["spec"]["cloneMode"] == "cold"
    # Any order: the snapshot first, then the volumes made from it.
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "volumesnapshots", "golden")
    wait_for("the snapshot's directory removed", lambda: not directory.exists(), 60)
    survivor = boot_clone(
        cluster.prefix / pvs[0].spec.csi.volume_handle, cluster.plane.work / "sock"
    )
    survivor.stop()
    for name in names:
        cluster.core.delete_namespaced_persistent_volume_claim(name, NS)
    wait_for(
        "the volumes removed",
        lambda: not any((cluster.prefix / pv.spec.csi.volume_handle).exists() for pv in pvs),
        60,
    )


def test_a_snapshot_of_an_unused_volume_is_a_reflink_copy_that_outlives_it(
    cluster: Cluster,
) -> None:
    cluster.pvc("plain")
    pv = cluster.wait_bound("plain")
    (cluster.prefix / pv.spec.csi.volume_handle / "note.txt").write_text("kept\n")
    snapshot(cluster, "plain-snap", "plain")
    snap = ready_snapshot(cluster, "plain-snap")
    guid = handle_of(cluster, snap)
    assert record(cluster, guid)["spec"]["cloneMode"] == "cold"
    # The source goes first; the snapshot still makes volumes.
    cluster.core.delete_namespaced_persistent_volume_claim("plain", NS)
    wait_for(
        "the source volume removed",
        lambda: not (cluster.prefix / pv.spec.csi.volume_handle).exists(),
        60,
    )
    claim_from_snapshot(cluster, "from-plain", "plain-snap")
    made = cluster.wait_bound("from-plain")
    assert (cluster.prefix / made.spec.csi.volume_handle / "note.txt").read_text() == "kept\n"
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, NS, "volumesnapshots", "plain-snap"
    )
    cluster.core.delete_namespaced_persistent_volume_claim("from-plain", NS)
    snapshots = cluster.prefix / ".pg-reflinker" / "snapshots"
    wait_for(
        "everything removed",
        lambda: (
            not (snapshots / guid).exists()
            and not (cluster.prefix / made.spec.csi.volume_handle).exists()
        ),
        60,
    )
