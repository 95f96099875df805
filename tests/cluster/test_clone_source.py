"""Production on storage that is not ours, copies from a clone source (docs/clone-source.md), on
the real three-node cluster.

Production: a CNPG Cluster on Kubernetes local PVs (StorageClass kubernetes.io/no-provisioner,
what bare-metal CNPG users run) on the second node. The clone source: a CNPG replica Cluster of
it on pg-reflinker volumes (PGDATA and WAL) on the third node, labelled and tainted for copies.
Copies are taken from the clone source's designated primary, a standby in continuous recovery;
nothing of pg-reflinker connects to production.

The other nodes are uncordoned for this module only, as for tests/cluster/test_ha.py, and the
third node's label and taint are removed at its end."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.cluster import cnpg
from tests.e2e.onenode import OneNodeCluster

NS = "prod"
PROD = "pg-prod"
COPIES = "pg-copies"
DEV = "pg-dev"
LOCAL_CLASS = "local-disks"
# The clone source's own empty volumes: bound where the scheduler puts its pod (the clone node).
SOURCE_CLASS = "pg-reflinker-clone-source"
# The copies' class: a copy of a source further behind production than this is refused.
FRESH_CLASS = "pg-reflinker-fresh"
LAG_BOUND = 10
CLONE_NODE_KEY = "pg-reflinker.csi/clone-node"
TOLERATE_CLONE_NODE = [{"key": CLONE_NODE_KEY, "operator": "Exists", "effect": "NoSchedule"}]
SCALE = 5


@pytest.fixture(scope="module")
def nodes(k8s: OneNodeCluster) -> Iterator[tuple[str, str, str]]:
    """(production's two nodes, the clone node): the first two, and the third labelled and
    tainted for copies."""
    names = [n.name for n in k8s.nodes]
    assert len(names) == 3, "the real-cluster package runs on three nodes"
    prod_node, clone_node = names[1], names[2]
    k8s.kubectl("uncordon", prod_node, clone_node)
    k8s.kubectl("label", "node", clone_node, f"{CLONE_NODE_KEY}=true", "--overwrite")
    k8s.kubectl("taint", "node", clone_node, f"{CLONE_NODE_KEY}=true:NoSchedule", "--overwrite")
    try:
        yield names[0], prod_node, clone_node
    finally:
        k8s.kubectl(
            "delete", "namespace", NS, "--wait=true", "--timeout=240s", check=False, timeout=300
        )
        k8s.wait("the prod namespace's volumes gone", lambda: not _records_in(k8s), 120)
        k8s.kubectl("delete", "pv", "-l", "test=clone-source", "--wait=true", check=False)
        k8s.kubectl("delete", "storageclass", LOCAL_CLASS, SOURCE_CLASS, FRESH_CLASS, check=False)
        k8s.kubectl("taint", "node", clone_node, f"{CLONE_NODE_KEY}-", check=False)
        k8s.kubectl("label", "node", clone_node, f"{CLONE_NODE_KEY}-", check=False)
        k8s.kubectl("cordon", prod_node, clone_node)


def _records_in(k8s: OneNodeCluster) -> list[dict[str, Any]]:
    records = k8s.get("reflinkvolumes")["items"]
    return [r for r in records if r["spec"].get("claim", "").startswith(f"{NS}/")]


def _classes() -> list[dict[str, Any]]:
    def pg_reflinker(name: str, binding: str, **parameters: str) -> dict[str, Any]:
        return {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name},
            "provisioner": "pg-reflinker.csi",
            "volumeBindingMode": binding,
            "reclaimPolicy": "Delete",
            **({"parameters": parameters} if parameters else {}),
        }

    return [
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": LOCAL_CLASS},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
        },
        pg_reflinker(SOURCE_CLASS, "WaitForFirstConsumer"),
        pg_reflinker(FRESH_CLASS, "Immediate", maxSourceLag=f"{LAG_BOUND}s"),
    ]


def _local_pv(k8s: OneNodeCluster, node: str) -> dict[str, Any]:
    """A Kubernetes local PV: a directory on the node, made as an admin would."""
    (spec,) = [n for n in k8s.nodes if n.name == node]
    path = k8s.work / f"local-disk-{node}"
    subprocess.run([*spec.enter(), "mkdir", "-p", str(path)], check=True)
    subprocess.run([*spec.enter(), "chown", "26:26", str(path)], check=True)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"local-{node}", "labels": {"test": "clone-source"}},
        "spec": {
            "capacity": {"storage": "4Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": LOCAL_CLASS,
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [node],
                                }
                            ]
                        }
                    ]
                }
            },
        },
    }


@pytest.fixture(scope="module")
def production(k8s: OneNodeCluster, nodes: tuple[str, ...]) -> str:
    """pg-prod: two instances, each on a local PV of one of the production nodes, with
    pgbench's tables and the two grants of the native method (replayed by its replicas); its
    primary's pod name."""
    cnpg.ensure_namespace(k8s, NS)
    k8s.apply([*_classes(), *(_local_pv(k8s, node) for node in nodes[:2])])
    doc = cnpg.example("source-cluster-native.yaml")
    doc["metadata"].update(name=PROD, namespace=NS)
    doc["spec"]["instances"] = 2
    doc["spec"]["storage"] = {"storageClass": LOCAL_CLASS, "size": "4Gi"}
    del doc["spec"]["walStorage"]
    k8s.apply(doc)
    seconds = cnpg.wait_healthy(k8s, PROD, NS, timeout=300)
    print(f"\nproduction on a local PV healthy in {seconds:.1f} s")
    primary = cnpg.primary_pod(k8s, PROD, NS)
    cnpg.pgbench(k8s, primary, "-i", "-s", str(SCALE), "-q", ns=NS)
    # CNPG's pg_basebackup asks for a spread checkpoint: with pgbench's load dirty, it would
    # take most of checkpoint_timeout; with nothing left to write it takes a moment.
    cnpg.psql(k8s, primary, "CHECKPOINT", db="postgres", ns=NS)
    return primary


@pytest.fixture(scope="module")
def clone_source(k8s: OneNodeCluster, production: str) -> str:
    """pg-copies: a replica Cluster of pg-prod on pg-reflinker volumes on the clone node
    (docs/clone-source.md's manifest); its designated primary's pod name."""
    doc = cnpg.example("clone-source.yaml")
    doc["metadata"]["namespace"] = NS
    doc["spec"]["storage"]["storageClass"] = SOURCE_CLASS
    doc["spec"]["walStorage"]["storageClass"] = SOURCE_CLASS
    k8s.apply(doc)
    seconds = cnpg.wait_healthy(k8s, COPIES, NS, timeout=300)
    print(f"clone source streaming from production, healthy in {seconds:.1f} s")
    return cnpg.primary_pod(k8s, COPIES, NS)


def _lsn(text: str) -> int:
    high, _, low = text.strip().partition("/")
    return (int(high, 16) << 32) + int(low, 16)


class Watch:
    """Production's WAL position and pg-reflinker's sessions on it, sampled every half second
    (by the host's clock, as the API server's timestamps are)."""

    def __init__(self, k8s: OneNodeCluster, pod: str) -> None:
        self.k8s, self.pod = k8s, pod
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            answer = cnpg.psql(
                self.k8s,
                self.pod,
                "SELECT pg_current_wal_lsn() || ' ' || (SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = 'pg-reflinker' OR usename = 'streaming_replica' "
                "AND backend_type <> 'walsender')",
                db="postgres",
                ns=NS,
            )
            lsn, sessions = answer.split()
            self.samples.append((time.time(), _lsn(lsn), int(sessions)))

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def lsn_at(self, when: float) -> int:
        """Production's LSN at the last sample at or before `when`."""
        before = [lsn for t, lsn, _ in self.samples if t <= when]
        assert before, f"no sample of production before {when}"
        return before[-1]

    def sessions(self) -> int:
        return max((s for _, _, s in self.samples), default=0)


def _created(item: dict[str, Any]) -> float:
    stamp = item["metadata"]["creationTimestamp"].replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def _phase(k8s: OneNodeCluster, claim: str) -> str:
    """A claim's phase; "" while it does not exist (CNPG makes a new Cluster's claims)."""
    found = k8s.kubectl(
        "get", "pvc", claim, "-n", NS, "-o", "jsonpath={.status.phase}", check=False
    )
    return found.stdout if found.returncode == 0 else ""


def _copy_claim(name: str, source: str, storage_class: str) -> dict[str, Any]:
    """A claim that copies the clone source's PGDATA claim (its copy carries the WAL)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "storageClassName": storage_class,
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "8Gi"}},
            "dataSource": {"kind": "PersistentVolumeClaim", "name": source},
        },
    }


def _event(k8s: OneNodeCluster, claim: str, text: str) -> str:
    """The message of the claim's first event that says text, "" for none."""
    events = k8s.get("events", "-n", NS, "--field-selector", f"involvedObject.name={claim}")
    found = [e["message"] for e in events["items"] if text in e["message"]]
    return found[0] if found else ""


def _copy_cluster(name: str, source: str) -> dict[str, Any]:
    """A new Cluster recovered from the clone source's claims, on the clone node."""
    doc = cnpg.example("clone-cluster.yaml")
    doc["metadata"].update(name=name, namespace=NS)
    doc["spec"]["storage"]["storageClass"] = FRESH_CLASS
    doc["spec"]["walStorage"] = {"storageClass": FRESH_CLASS, "size": "2Gi"}
    doc["spec"]["affinity"] = {"tolerations": TOLERATE_CLONE_NODE}
    doc["spec"]["bootstrap"]["recovery"]["volumeSnapshots"] = {
        "storage": {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": source},
        "walStorage": {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": f"{source}-wal"},
    }
    return doc


def _record_of_claim(k8s: OneNodeCluster, claim: str) -> dict[str, Any]:
    guid = cnpg.volume_handle(k8s, claim, NS)
    (record,) = [r for r in k8s.get("reflinkvolumes")["items"] if r["spec"]["guid"] == guid]
    return record


def _snapshot_records(k8s: OneNodeCluster, backup: str) -> list[dict[str, Any]]:
    """The records of a CNPG Backup's VolumeSnapshots (through their contents' handles)."""
    snapshots = k8s.get("volumesnapshots", "-n", NS, "-l", f"cnpg.io/backupName={backup}")
    handles = set()
    for snapshot in snapshots["items"]:
        content = k8s.get(
            "volumesnapshotcontents", snapshot["status"]["boundVolumeSnapshotContentName"]
        )
        handles.add(content["status"]["snapshotHandle"])
    records = k8s.get("reflinkvolumes")["items"]
    return [r for r in records if r["spec"]["guid"] in handles]


def test_a_volume_snapshot_backup_of_the_clone_source_under_load_restores_consistent(
    k8s: OneNodeCluster, nodes: tuple[str, str, str], production: str, clone_source: str
) -> None:
    """A CNPG volumeSnapshot Backup of the clone source (pg-reflinker's VolumeSnapshotClass)
    while pgbench writes to production: it completes, each snapshot says what it is as of (no
    later than production after it, no earlier than production maxSourceLag before it), a
    Cluster recovered from it on the clone node keeps pgbench's invariant and passes amcheck,
    and production saw no pg-reflinker session. First in the module: taken before the
    scenarios that fail production over and stop the clone node's kubelet (after those, CNPG's
    Backup of the clone source once waited past 240 s with its snapshots ready; not yet
    understood)."""
    backup = "pg-copies-online"
    k8s.kubectl(
        "patch", "cluster.postgresql.cnpg.io", COPIES, "-n", NS, "--type", "merge", "-p",
        '{"spec": {"backup": {"volumeSnapshot": {"className": "pg-reflinker"}}}}',
    )  # fmt: skip
    load = cnpg.pgbench_background(k8s, production, seconds=40, ns=NS)
    with Watch(k8s, production) as watch:
        try:
            time.sleep(LAG_BOUND + 5)
            asked = time.time()
            k8s.apply(
                {
                    "apiVersion": "postgresql.cnpg.io/v1",
                    "kind": "Backup",
                    "metadata": {"name": backup, "namespace": NS},
                    "spec": {
                        "method": "volumeSnapshot",
                        "cluster": {"name": COPIES},
                        "online": True,
                        "onlineConfiguration": {"immediateCheckpoint": True},
                    },
                }
            )

            def completed() -> bool:
                status = k8s.get("backup.postgresql.cnpg.io", backup, "-n", NS).get("status", {})
                assert status.get("phase") != "failed", f"Backup {backup} failed: {status}"
                return status.get("phase") == "completed"

            try:
                k8s.wait(f"Backup {backup} completed", completed, 240)
            except AssertionError as err:
                status = k8s.get("backup.postgresql.cnpg.io", backup, "-n", NS).get("status")
                snapshots = k8s.kubectl("get", "volumesnapshots", "-n", NS, check=False).stdout
                raise AssertionError(
                    f"{err}\nBackup status: {status}\n{snapshots}\n{cnpg.diagnose(k8s, COPIES, NS)}"
                ) from None
            after = watch.samples[-1][1]
            time.sleep(1.0)
        finally:
            out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, out
    records = _snapshot_records(k8s, backup)
    assert len(records) == 2, f"the Backup's snapshots (PGDATA and WAL): {records}"
    floor = watch.lsn_at(asked - LAG_BOUND)
    for record in records:
        assert record["spec"]["nodeName"] == nodes[2]
        as_of = record["status"]["asOf"]
        assert floor <= _lsn(as_of["lsn"]) <= after, f"snapshot as of {as_of}"
    assert watch.sessions() == 0, "pg-reflinker connected to production"

    restored = _copy_cluster(f"{DEV}-restored", clone_source)
    restored["spec"]["bootstrap"] = {"recovery": {"backup": {"name": backup}}}
    k8s.apply(restored)
    cnpg.wait_healthy(k8s, f"{DEV}-restored", NS, timeout=300)
    pod = cnpg.primary_pod(k8s, f"{DEV}-restored", NS)
    sums = cnpg.pgbench_sums(k8s, pod, ns=NS)
    assert len(sums) == 1 and sums != {"0"}, f"pgbench's invariant in the restored Cluster: {sums}"
    cnpg.amcheck(k8s, pod, ns=NS)
    cnpg.delete_cluster(k8s, f"{DEV}-restored", NS)


def test_a_copy_of_production_on_local_disks_comes_from_its_clone_source_under_load(
    k8s: OneNodeCluster, nodes: tuple[str, str, str], production: str, clone_source: str
) -> None:
    """A new Cluster recovered from the clone source's claims while pgbench writes to
    production: it lands on the clone node, keeps pgbench's invariant and passes amcheck; each
    volume says what it is as of (record, PV, claim event), an LSN no later than production's
    after the copy and no earlier than production's LSN maxSourceLag before the request; no
    pg-reflinker session, slot or volume ever touches production or its node."""
    clone_node = nodes[2]
    assert set(cnpg.instance_nodes(k8s, PROD, NS).values()) == set(nodes[:2])
    assert cnpg.instance_nodes(k8s, COPIES, NS) == {clone_source: clone_node}
    assert cnpg.psql(k8s, clone_source, "SELECT pg_is_in_recovery()", ns=NS) == "t"
    load = cnpg.pgbench_background(k8s, production, seconds=40, ns=NS)
    with Watch(k8s, production) as watch:
        try:
            time.sleep(LAG_BOUND + 5)  # production's LSN moves for a whole bound before the copy
            k8s.apply(_copy_cluster(DEV, clone_source))
            k8s.wait(
                "the copy's claims bound",
                lambda: all(_phase(k8s, c) == "Bound" for c in (f"{DEV}-1", f"{DEV}-1-wal")),
                180,
            )
            after = watch.samples[-1][1] if watch.samples else 0
            time.sleep(1.0)
        finally:
            out, _ = load.communicate(timeout=120)
    assert load.returncode == 0, out
    cnpg.wait_healthy(k8s, DEV, NS, timeout=300)
    dev = cnpg.primary_pod(k8s, DEV, NS)
    assert cnpg.instance_nodes(k8s, DEV, NS) == {dev: clone_node}
    assert len(cnpg.pgbench_sums(k8s, dev, ns=NS)) == 1, "pgbench's invariant broke in the copy"
    cnpg.amcheck(k8s, dev, ns=NS)

    for claim in (f"{DEV}-1", f"{DEV}-1-wal"):
        record = _record_of_claim(k8s, claim)
        as_of = record["status"]["asOf"]
        lsn = _lsn(as_of["lsn"])
        assert lsn <= after, f"{claim} claims to be as of {as_of}, later than production"
        floor = watch.lsn_at(_created(record) - LAG_BOUND - 1)
        assert lsn >= floor, f"{claim} is as of {as_of}: older than production {LAG_BOUND} s before"
        assert 0 <= as_of["lagSeconds"] <= LAG_BOUND
        pv = k8s.get("pv", k8s.get("pvc", claim, "-n", NS)["spec"]["volumeName"])
        assert pv["metadata"]["annotations"]["pg-reflinker.csi/as-of-lsn"] == as_of["lsn"]
        events = k8s.get("events", "-n", NS, "--field-selector", f"involvedObject.name={claim}")[
            "items"
        ]
        copied = [e["message"] for e in events if e["reason"] == "CopiedAsOf"]
        assert copied and f"as of LSN {as_of['lsn']}" in copied[0], events
    wide = k8s.kubectl("get", "reflinkvolumes", "-o", "wide").stdout
    assert "AS OF" in wide.splitlines()[0] and "LAG" in wide.splitlines()[0]

    assert watch.sessions() == 0, "pg-reflinker connected to production"
    slots = cnpg.psql(
        k8s,
        production,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pg\\_reflinker%'",
        db="postgres",
        ns=NS,
    )
    assert slots == "0", "a pg-reflinker replication slot was left on production"
    records = _records_in(k8s)
    assert records and {r["spec"]["nodeName"] for r in records} == {clone_node}
    cnpg.delete_cluster(k8s, DEV, NS)


def test_a_clone_source_behind_the_bound_is_refused_saying_by_how_much_then_copied(
    k8s: OneNodeCluster, production: str, clone_source: str
) -> None:
    """The clone source stops replaying (as when it falls behind a burst of writes) while
    production writes: a copy in a class with maxSourceLag is refused, the claim's event saying
    how far behind it is and over which bound; once it replays again the claim binds, as of an
    LSN that holds the writes made meanwhile."""
    claim = "lagging-copy"
    cnpg.psql(k8s, clone_source, "SELECT pg_wal_replay_pause()", db="postgres", ns=NS)
    try:
        cnpg.pgbench(k8s, production, "-n", "-c", "1", "-t", "200", ns=NS)
        written = _lsn(cnpg.psql(k8s, production, "SELECT pg_current_wal_lsn()", ns=NS))
        time.sleep(LAG_BOUND + 1)
        k8s.apply(_copy_claim(claim, clone_source, FRESH_CLASS))
        message = k8s.wait(
            "the copy refused for the source's lag",
            lambda: _event(k8s, claim, "behind production"),
            90,
        )
        assert f"over the StorageClass's maxSourceLag of {LAG_BOUND} s" in message, message
        assert _phase(k8s, claim) == "Pending"
    finally:
        cnpg.psql(k8s, clone_source, "SELECT pg_wal_replay_resume()", db="postgres", ns=NS)
    k8s.wait(
        "the copy bound once the source caught up",
        lambda: _phase(k8s, claim) == "Bound",
        120,
    )
    as_of = _record_of_claim(k8s, claim)["status"]["asOf"]
    assert _lsn(as_of["lsn"]) >= written, f"the copy is as of {as_of}, before the writes"
    k8s.kubectl("delete", "pvc", claim, "-n", NS, "--wait=true")


def test_production_fails_over_while_a_copy_is_taken_and_the_clone_source_follows(
    k8s: OneNodeCluster, production: str, clone_source: str
) -> None:
    """Production's primary is deleted as a copy is asked for: CNPG promotes the other
    instance, the replica Cluster streams from it (through pg-prod-rw) on the new timeline, the
    copy binds (refused for an unknown lag while the stream is down, then retried), and the
    next copy is consistent and holds the new primary's writes."""
    old_primary = cnpg.primary_pod(k8s, PROD, NS)
    claim = "copy-during-failover"
    k8s.apply(_copy_claim(claim, clone_source, FRESH_CLASS))
    k8s.kubectl("delete", "pod", old_primary, "-n", NS, "--wait=false")
    new_primary = k8s.wait(
        "production failed over",
        lambda: (
            (p := cnpg.cluster_status(k8s, PROD, NS).get("currentPrimary")) != old_primary and p
        ),
        180,
    )
    k8s.wait(
        "the copy asked for during the failover bound", lambda: _phase(k8s, claim) == "Bound", 240
    )
    cnpg.wait_healthy(k8s, PROD, NS, timeout=300)
    cnpg.pgbench(k8s, new_primary, "-n", "-c", "1", "-t", "200", ns=NS)
    written = _lsn(cnpg.psql(k8s, new_primary, "SELECT pg_current_wal_lsn()", ns=NS))

    def replayed() -> bool:
        at = cnpg.psql(k8s, clone_source, "SELECT pg_last_wal_replay_lsn()", db="postgres", ns=NS)
        return _lsn(at) >= written

    k8s.wait("the clone source replayed the new primary's writes", replayed, 120)
    stream = cnpg.psql(
        k8s,
        clone_source,
        "SELECT status || ' ' || received_tli FROM pg_stat_wal_receiver",
        db="postgres",
        ns=NS,
    )
    assert stream.split()[0] == "streaming" and int(stream.split()[1]) >= 2, stream

    k8s.apply(_copy_cluster(f"{DEV}-next", clone_source))
    cnpg.wait_healthy(k8s, f"{DEV}-next", NS, timeout=300)
    copy = cnpg.primary_pod(k8s, f"{DEV}-next", NS)
    assert len(cnpg.pgbench_sums(k8s, copy, ns=NS)) == 1, "pgbench's invariant broke"
    cnpg.amcheck(k8s, copy, ns=NS)
    as_of = _record_of_claim(k8s, f"{DEV}-next-1")["status"]["asOf"]
    assert _lsn(as_of["lsn"]) >= written, f"the next copy is as of {as_of}, before the writes"
    cnpg.delete_cluster(k8s, f"{DEV}-next", NS)
    k8s.kubectl("delete", "pvc", claim, "-n", NS, "--wait=true")


def _ready(k8s: OneNodeCluster, node: str) -> bool:
    conditions = k8s.get("node", node)["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_the_clone_nodes_kubelet_stopped_leaves_production_serving_and_copies_waiting(
    k8s: OneNodeCluster, nodes: tuple[str, str, str], production: str, clone_source: str
) -> None:
    """The clone node's kubelet stops: production keeps serving (pgbench runs on without an
    error), a copy asked for meanwhile is refused as unavailable (its source pod is not
    Ready), and it binds once the kubelet is back."""
    clone_node = nodes[2]
    primary = cnpg.primary_pod(k8s, PROD, NS)
    claim = "copy-while-node-down"
    load = cnpg.pgbench_background(k8s, primary, seconds=100, ns=NS)
    try:
        k8s.stop_kubelet(clone_node)
        try:
            k8s.wait(f"{clone_node} NotReady", lambda: not _ready(k8s, clone_node), 150)
            k8s.apply(_copy_claim(claim, clone_source, "pg-reflinker"))
            message = k8s.wait(
                "the copy refused while the clone node is down",
                lambda: _event(k8s, claim, "is not Running and Ready"),
                120,
            )
            assert clone_source in message, message
            assert _phase(k8s, claim) == "Pending"
        finally:
            k8s.start_kubelet(clone_node)
        k8s.wait(
            "the copy bound once the node was back", lambda: _phase(k8s, claim) == "Bound", 240
        )
    finally:
        out, _ = load.communicate(timeout=240)
    assert load.returncode == 0, f"production's pgbench failed while the clone node was down: {out}"
    k8s.kubectl("delete", "pvc", claim, "-n", NS, "--wait=true")
