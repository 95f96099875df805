"""`make bench`, high availability (HA_SIZES, default "1 4" GiB): on the three-node cluster, a
two-instance Cluster (primary and standby on different nodes) with its WAL archived to the test's
object store, at each size:

  - pgbench's tps on the primary, second by second, while a clone of the primary's claim is
    taken and while a clone of the standby's claim is taken: the worst second during the clone
    against the median of the seconds before it (the dip each costs the primary's writers);
  - the time for a scaled-up replica to be ready, seeded from a volumeSnapshot Backup made by
    pg-reflinker against joined by CNPG's `pg_basebackup` (the Backup's snapshots deleted).

Writes its section of docs/benchmarks.md."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from typing import Any

from tests.bench.report import write_section
from tests.cluster import cnpg
from tests.e2e.onenode import OneNodeCluster

NS = "bench-ha"
SOURCE = "pg-ha"
SCALE_PER_GIB = 68
PROGRESS = re.compile(r"progress: ([0-9.]+) s, ([0-9.]+) tps")


def log(text: str) -> None:
    print(text, flush=True)


def _status(k8s: OneNodeCluster) -> dict[str, Any]:
    return cnpg.cluster_status(k8s, SOURCE, NS)


def _patch(k8s: OneNodeCluster, patch: dict[str, Any]) -> None:
    k8s.kubectl(
        "patch", "cluster.postgresql.cnpg.io", SOURCE, "-n", NS, "--type", "merge", "-p",
        json.dumps(patch),
    )  # fmt: skip


def start_source(k8s: OneNodeCluster, volume: str) -> None:
    """The two-instance source, its WAL archived and its Backups taken by pg-reflinker."""
    cnpg.ensure_namespace(k8s, NS)
    cnpg.install_function_configmap(k8s, NS)
    s3 = k8s.s3
    k8s.kubectl(
        "create", "secret", "generic", "s3", "-n", NS,
        f"--from-literal=ACCESS_KEY_ID={s3['access']}",
        f"--from-literal=ACCESS_SECRET_KEY={s3['secret']}",
    )  # fmt: skip
    doc = cnpg.example("source-cluster.yaml")
    doc["metadata"].update(name=SOURCE, namespace=NS)
    doc["spec"]["instances"] = 2
    doc["spec"]["storage"]["size"] = volume
    doc["spec"]["backup"] = {
        "barmanObjectStore": {
            "destinationPath": f"s3://{s3['bucket']}/",
            "endpointURL": s3["endpoint"],
            "s3Credentials": {
                "accessKeyId": {"name": "s3", "key": "ACCESS_KEY_ID"},
                "secretAccessKey": {"name": "s3", "key": "ACCESS_SECRET_KEY"},
            },
        },
        "volumeSnapshot": {
            "className": "pg-reflinker",
            "onlineConfiguration": {"immediateCheckpoint": True},
        },
    }
    k8s.apply(doc)
    cnpg.wait_healthy(k8s, SOURCE, NS, timeout=420)


def clone_dip(k8s: OneNodeCluster, primary: str, claim: str, name: str) -> dict[str, float]:
    """pgbench -P 1 on the primary; after 8 s a clone of `claim`; the median tps of the
    seconds before the clone, the worst second from its start to one second after Bound, and
    the clone's claim-to-Bound time."""
    bench = subprocess.Popen(
        [
            str(k8s.bin / "kubectl"), f"--kubeconfig={k8s.kubeconfig}", "exec", "-n", NS,
            primary, "-c", "postgres", "--", "pgbench", "-c", "4", "-T", "24", "-P", "1", "-n",
            "app",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started = time.monotonic()
    time.sleep(8)  # the baseline: seconds of pgbench before the clone
    clone_at = time.monotonic() - started
    k8s.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "storageClassName": "pg-reflinker",
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "64Gi"}},
                "dataSource": {"kind": "PersistentVolumeClaim", "name": claim},
            },
        }
    )
    k8s.wait(
        f"claim {name} Bound",
        lambda: k8s.get("pvc", name, "-n", NS)["status"].get("phase") == "Bound",
        300,
    )
    bound_at = time.monotonic() - started
    out, _ = bench.communicate(timeout=120)
    k8s.kubectl("delete", "pvc", name, "-n", NS, "--wait=true", timeout=120)
    seconds = [(float(t), float(tps)) for t, tps in PROGRESS.findall(out)]
    before = [tps for t, tps in seconds if 2 <= t <= clone_at]
    during = [tps for t, tps in seconds if clone_at < t <= bound_at + 1.5]
    if not before or not during:
        raise RuntimeError(f"pgbench printed too little progress:\n{out[-2000:]}")
    return {
        "tps": statistics.median(before),
        "worst": min(during),
        "bound": bound_at - clone_at,
    }


def _instances_ready(k8s: OneNodeCluster, count: int) -> bool:
    status = _status(k8s)
    return status.get("instances") == count and status.get("readyInstances") == count


def replica_ready(k8s: OneNodeCluster, backup: str | None) -> float:
    """Seconds from scaling up to three instances until the third is ready; then back to two.
    backup: a volumeSnapshot Backup to seed it from, taken first (not timed); None: the
    Backups' snapshots are deleted, so CNPG joins the replica by pg_basebackup."""
    if backup is not None:
        k8s.apply(
            {
                "apiVersion": "postgresql.cnpg.io/v1",
                "kind": "Backup",
                "metadata": {"name": backup, "namespace": NS},
                "spec": {
                    "method": "volumeSnapshot",
                    "cluster": {"name": SOURCE},
                    "online": True,
                    "onlineConfiguration": {"immediateCheckpoint": True},
                },
            }
        )
        k8s.wait(
            f"Backup {backup} completed",
            lambda: (
                k8s.get("backup.postgresql.cnpg.io", backup, "-n", NS)
                .get("status", {})
                .get("phase")
                == "completed"
            ),
            600,
        )
    else:
        k8s.kubectl("delete", "volumesnapshot", "-n", NS, "--all", "--wait=true", timeout=300)
    before = set(cnpg.instance_nodes(k8s, SOURCE, NS))
    start = time.monotonic()
    _patch(k8s, {"spec": {"instances": 3}})
    k8s.wait("three instances ready", lambda: _instances_ready(k8s, 3), 1800)
    seconds = time.monotonic() - start
    (new,) = set(cnpg.instance_nodes(k8s, SOURCE, NS)) - before
    source = k8s.get("pvc", new, "-n", NS)["spec"].get("dataSource") or {}
    seeded = source.get("kind") == "VolumeSnapshot"
    if seeded != (backup is not None):
        raise RuntimeError(f"replica {new}: data source {source}, expected Backup {backup}")
    _patch(k8s, {"spec": {"instances": 2}})
    k8s.wait("back to two instances", lambda: _instances_ready(k8s, 2), 300)
    k8s.wait(
        "the removed instance's claim deleted",
        lambda: len(k8s.get("pvc", "-n", NS, "-l", f"cnpg.io/cluster={SOURCE}")["items"]) == 2,
        300,
    )
    return seconds


def bench_ha(k8s: OneNodeCluster, sizes: list[float], runs: int) -> list[dict[str, Any]]:
    others = [n.name for n in k8s.nodes[1:]]
    k8s.kubectl("uncordon", *others)
    volume = f"{int(max(sizes) * 2.5) + 8}Gi"
    start_source(k8s, volume)
    rows: list[dict[str, Any]] = []
    for gib in sizes:
        primary = cnpg.primary_pod(k8s, SOURCE, NS)
        standby = next(p for p in cnpg.instance_nodes(k8s, SOURCE, NS) if p != primary)
        scale = max(1, round(gib * SCALE_PER_GIB))
        log(f"== HA: load pgbench data, scale {scale}")
        cnpg.pgbench(k8s, primary, "-i", "-s", str(scale), "-q", ns=NS)
        cnpg.psql(k8s, primary, "CHECKPOINT", ns=NS)
        size = int(cnpg.psql(k8s, primary, "SELECT pg_database_size('app')", ns=NS))
        samples: dict[str, list[float]] = {}
        for run in range(runs):
            of_primary = clone_dip(k8s, primary, primary, "bench-of-primary")
            of_standby = clone_dip(k8s, primary, standby, "bench-of-standby")
            measured = {
                "primary_tps": of_primary["tps"],
                "primary_worst": of_primary["worst"],
                "primary_bound": of_primary["bound"],
                "standby_tps": of_standby["tps"],
                "standby_worst": of_standby["worst"],
                "standby_bound": of_standby["bound"],
                "seeded": replica_ready(k8s, f"bench-ha-{scale}-{run}"),
                "basebackup": replica_ready(k8s, None),
            }
            for key, value in measured.items():
                samples.setdefault(key, []).append(value)
            log(f"   run {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()))
        row: dict[str, Any] = {"scale": scale, "bytes": size}
        row.update({k: statistics.median(v) for k, v in samples.items()})
        rows.append(row)
    cnpg.delete_cluster(k8s, SOURCE, NS)
    k8s.kubectl("delete", "namespace", NS, "--wait=true", "--timeout=300s", timeout=360)
    k8s.kubectl("cordon", *others)
    return rows


def write_ha_report(rows: list[dict[str, Any]], runs: int, seconds: float) -> None:
    lines = [
        "### High availability: which claim to clone, replicas from snapshots (`make bench`)",
        "",
        "The three-node cluster; a two-instance Cluster (primary and standby on different",
        "nodes) with its WAL archived to the test's S3-compatible store. pgbench (4 clients) on",
        "the primary, progress every second: the median tps of the seconds before a clone claim",
        "is made, and the worst second from then until one second after it is Bound, for a clone",
        "of the primary's claim and one of the standby's ([docs/ha.md](ha.md)). Then the Cluster",
        "scaled up to three instances: seconds until the new one is ready when CNPG seeds it",
        "from a volumeSnapshot Backup (pg-reflinker snapshots, restored by reflink on the",
        "Backup's node), and when it joins by `pg_basebackup` (the snapshots deleted).",
        "The three nodes share one machine's two cores and one disk: a clone taken on the",
        "standby's node still competes with the primary for them (and the standby's restartpoint",
        "writes to the same disk), which a node of its own would not; single seconds are noisy.",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; medians of {runs} runs; this section's run took "
        f"{seconds / 60:.0f} minutes (`HA_SIZES`)",
        "",
        "| pgbench scale | size GiB | tps before | worst second, clone of the primary "
        "| worst second, clone of the standby | clone to Bound, primary / standby s "
        "| replica ready, seeded from a snapshot s | replica ready, pg_basebackup s "
        "| pg_basebackup / seeded |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']} | {r['bytes'] / 2**30:.2f} | {r['primary_tps']:.0f} | "
            f"{r['primary_worst']:.0f} ({r['primary_worst'] / r['primary_tps']:.0%}) | "
            f"{r['standby_worst']:.0f} ({r['standby_worst'] / r['standby_tps']:.0%}) | "
            f"{r['primary_bound']:.1f} / {r['standby_bound']:.1f} | {r['seeded']:.1f} | "
            f"{r['basebackup']:.1f} | {r['basebackup'] / r['seeded']:.1f}x |"
        )
    write_section("ha", lines)
    log("wrote the high-availability section of docs/benchmarks.md")
