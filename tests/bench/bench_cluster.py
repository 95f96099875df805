"""`make bench`: what a cluster admin waits for, on the real three-node cluster with the real
CloudNativePG operator (tests/e2e/onenode.py; all but the HA part on its first node), at several
database sizes, all in one run:

  - a new CNPG Cluster from a running one, apply to healthy: with pg-reflinker
    (deploy/examples/clone-cluster.yaml) and with CNPG's own `bootstrap.pg_basebackup` from the
    same source onto the same filesystem;
  - a clone claim: claim to Bound, and claim to a pod that mounts it Running;
  - the hot clone itself (from the controller's log) next to a bare `cp -a --reflink=always` of
    the source's data directory on the node (the physical floor), and what kubelet's recursive
    fsGroup walk would cost on that copy (the driver avoids it);
  - whole instances (a source with walStorage and a tablespace holding pgbench's tables,
    deploy/examples/source-cluster-tablespace.yaml): a new Cluster from its three running claims
    (clone-cluster-whole.yaml) against CNPG's `bootstrap.pg_basebackup` of it, and an online
    volumeSnapshot Backup (backup-online.yaml) to completed.

  - high availability on the three nodes (tests/bench/bench_ha.py): the tps dip on a primary
    while its claim or its standby's is cloned, and a scaled-up replica seeded from a
    pg-reflinker snapshot against one joined by pg_basebackup;
  - what copies cost production (tests/bench/bench_impact.py): pgbench on production while ten
    copies are taken of it, against while ten are taken of its clone source.

BENCH_SIZES (GiB of pgbench data, default "1 4 16"), WHOLE_SIZES (default "1 4"), HA_SIZES
(default "1 4"), IMPACT_SIZE (default 1), IMPACT_COPIES (default 10) and BENCH_RUNS (default
3); an empty list skips its part. Writes its sections
of docs/benchmarks.md and docs/cluster-time.png."""

from __future__ import annotations

import os
import platform
import shutil
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench.bench_ha import bench_ha, write_ha_report
from tests.bench.bench_impact import bench_impact, write_impact_report
from tests.bench.report import DOCS, plot, write_section
from tests.cluster import cnpg
from tests.e2e import images
from tests.e2e.onenode import PREFIX, OneNodeCluster, running_cluster

NS = cnpg.NS
SOURCE = "pg-prod"
SCALE_PER_GIB = 68  # pgbench scale units per GiB of database


def log(text: str) -> None:
    print(text, flush=True)


def time_new_cluster(k8s: OneNodeCluster, doc: dict[str, Any], timeout: float) -> float:
    """Seconds from applying a Cluster to its healthy state; the Cluster is removed after."""
    name = doc["metadata"]["name"]
    start = time.monotonic()
    k8s.apply(doc)
    cnpg.wait_healthy(k8s, name, timeout=timeout)
    elapsed = time.monotonic() - start
    remove_cluster(k8s, name)
    return elapsed


def cluster_from_claim(k8s: OneNodeCluster, size: str) -> float:
    doc = cnpg.example("clone-cluster.yaml")
    doc["metadata"]["name"] = "bench-reflink"
    doc["spec"]["storage"]["size"] = size
    return time_new_cluster(k8s, doc, 900)


def cluster_from_basebackup(
    k8s: OneNodeCluster, size: str, source: str = SOURCE, like: dict[str, Any] | None = None
) -> float:
    """CNPG's bootstrap.pg_basebackup from source; like: more of the new Cluster's spec (its
    walStorage and tablespaces)."""
    host = k8s.kubectl(
        "get", "service", f"{source}-rw", "-n", NS, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout.strip()
    doc = {
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": {"name": "bench-basebackup", "namespace": NS},
        "spec": {
            **(like or {}),
            "instances": 1,
            "storage": {"storageClass": "pg-reflinker", "size": size},
            "bootstrap": {"pg_basebackup": {"source": source}},
            "externalClusters": [
                {
                    "name": source,
                    # The service's address: the test cluster runs no cluster DNS.
                    "connectionParameters": {
                        "host": host,
                        "user": "streaming_replica",
                        "sslmode": "verify-ca",
                        "dbname": "postgres",
                    },
                    "sslKey": {"name": f"{source}-replication", "key": "tls.key"},
                    "sslCert": {"name": f"{source}-replication", "key": "tls.crt"},
                    "sslRootCert": {"name": f"{source}-ca", "key": "ca.crt"},
                }
            ],
        },
    }
    return time_new_cluster(k8s, doc, 1800)


def remove_cluster(k8s: OneNodeCluster, name: str) -> None:
    cnpg.delete_cluster(k8s, name)
    k8s.wait(
        f"the claims of {name} deleted",
        lambda: not k8s.get("pvc", "-n", NS, "-l", f"cnpg.io/cluster={name}")["items"],
        300,
    )


def bench_claim(name: str, source: dict[str, str]) -> dict[str, Any]:
    """A claim of our StorageClass made from source (a claim or a VolumeSnapshot)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "storageClassName": "pg-reflinker",
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "64Gi"}},
            "dataSource": source,
        },
    }


def claim_and_pod(k8s: OneNodeCluster, source_claim: str) -> tuple[float, float, float | None]:
    """Seconds from creating a clone claim to Bound and to a pod on it Running; hot clone s."""
    claim = bench_claim("bench-claim", {"kind": "PersistentVolumeClaim", "name": source_claim})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bench-pod", "namespace": NS},
        "spec": {
            "securityContext": {"runAsUser": 26, "runAsGroup": 26, "fsGroup": 26},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "shell",
                    "image": images.POSTGRES,
                    "imagePullPolicy": "Never",
                    "command": ["sleep", "3600"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "bench-claim"}}],
        },
    }
    start = time.monotonic()
    k8s.apply([claim, pod])
    k8s.wait(
        "bench-claim Bound",
        lambda: _jsonpath(k8s, "pvc", "bench-claim", "{.status.phase}") == "Bound",
        300,
    )
    bound = time.monotonic() - start
    k8s.wait(
        "bench-pod Running",
        lambda: _jsonpath(k8s, "pod", "bench-pod", "{.status.phase}") == "Running",
        300,
    )
    running = time.monotonic() - start
    hot = cnpg.hot_clone_seconds(k8s, cnpg.volume_handle(k8s, "bench-claim"))
    k8s.kubectl("delete", "pod", "bench-pod", "-n", NS, "--wait=true", "--timeout=60s")
    k8s.kubectl("delete", "pvc", "bench-claim", "-n", NS, "--wait=true", "--timeout=120s")
    return bound, running, hot


def snapshot_and_clone(k8s: OneNodeCluster, source_claim: str) -> tuple[float, float]:
    """Seconds from creating a VolumeSnapshot of the running instance's claim to readyToUse, and
    from creating a claim from that snapshot to Bound."""
    snapshot = {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": "bench-snap", "namespace": NS},
        "spec": {
            "volumeSnapshotClassName": "pg-reflinker",
            "source": {"persistentVolumeClaimName": source_claim},
        },
    }
    claim = bench_claim(
        "bench-from-snap",
        {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "bench-snap"},
    )
    snapped = _until(k8s, snapshot, "volumesnapshot", "{.status.readyToUse}", "true")
    cloned = _until(k8s, claim, "pvc", "{.status.phase}", "Bound")
    k8s.kubectl("delete", "pvc", "bench-from-snap", "-n", NS, "--wait=true", "--timeout=120s")
    k8s.kubectl("delete", "volumesnapshot", "bench-snap", "-n", NS, "--wait=true")
    return snapped, cloned


def _until(k8s: OneNodeCluster, doc: dict[str, Any], kind: str, path: str, value: str) -> float:
    """Seconds from applying doc until its field at path reads value."""
    name = doc["metadata"]["name"]
    start = time.monotonic()
    k8s.apply(doc)
    k8s.wait(f"{kind} {name}: {value}", lambda: _jsonpath(k8s, kind, name, path) == value, 300)
    return time.monotonic() - start


def _jsonpath(k8s: OneNodeCluster, kind: str, name: str, path: str) -> str:
    return k8s.kubectl(
        "get", kind, name, "-n", NS, "-o", f"jsonpath={path}", check=False
    ).stdout.strip()


def online_backup(k8s: OneNodeCluster, cluster: str, name: str) -> float:
    """Seconds from creating CNPG's online volumeSnapshot Backup `name` to completed; then
    removed. (The instance remembers the last Backup by name: each run needs a new one.)"""
    backup = cnpg.example("backup-online.yaml")
    backup["metadata"]["name"] = name
    backup["spec"]["cluster"]["name"] = cluster
    seconds = _until(k8s, backup, "backups.postgresql.cnpg.io", "{.status.phase}", "completed")
    done = k8s.get("backups.postgresql.cnpg.io", name, "-n", NS)
    k8s.kubectl("delete", "backups.postgresql.cnpg.io", name, "-n", NS)
    for element in done["status"]["snapshotBackupStatus"]["elements"]:
        k8s.kubectl("delete", "volumesnapshot", element["name"], "-n", NS, "--wait=true")
    return seconds


def bench_whole(k8s: OneNodeCluster, sizes: list[float], runs: int) -> list[dict[str, Any]]:
    """The whole-instance rows: pg-spaces (PGDATA, WAL, a tablespace with pgbench's tables)."""
    source_doc = cnpg.example("source-cluster-tablespace.yaml")
    volume = f"{int(max(sizes) * 2.5) + 8}Gi"
    source_doc["spec"]["storage"]["size"] = volume
    source_doc["spec"]["walStorage"]["size"] = "8Gi"
    source_doc["spec"]["tablespaces"][0]["storage"]["size"] = volume
    source_doc["spec"]["backup"] = {"volumeSnapshot": {"className": "pg-reflinker"}}
    k8s.apply(source_doc)
    cnpg.wait_healthy(k8s, "pg-spaces", timeout=300)
    pod = cnpg.primary_pod(k8s, "pg-spaces")
    like = {k: source_doc["spec"][k] for k in ("walStorage", "tablespaces")}
    rows: list[dict[str, Any]] = []
    for gib in sizes:
        scale = max(1, round(gib * SCALE_PER_GIB))
        log(f"== whole instance: load pgbench data, scale {scale}, tables in the tablespace")
        cnpg.pgbench(k8s, pod, "-i", "-s", str(scale), "-q", "--tablespace=archive")
        cnpg.psql(k8s, pod, "CHECKPOINT")
        size = int(cnpg.psql(k8s, pod, "SELECT pg_database_size('app')"))
        samples: dict[str, list[float]] = {}
        for run in range(runs):
            whole = cnpg.example("clone-cluster-whole.yaml")
            whole["metadata"]["name"] = "bench-whole"
            whole["spec"]["storage"]["size"] = volume
            whole["spec"]["walStorage"]["size"] = "8Gi"
            whole["spec"]["tablespaces"][0]["storage"]["size"] = volume
            start = time.monotonic()
            k8s.apply(whole)
            cnpg.wait_healthy(k8s, "bench-whole", timeout=900)
            whole_cluster = time.monotonic() - start
            copy = cnpg.primary_pod(k8s, "bench-whole")
            capture = cnpg.hot_clone_seconds(k8s, cnpg.volume_handle(k8s, copy))
            remove_cluster(k8s, "bench-whole")
            measured = {
                "whole_cluster": whole_cluster,
                "capture": capture if capture is not None else float("nan"),
                "floor": bare_copy_of(
                    [
                        PREFIX / cnpg.volume_handle(k8s, pod) / "pgdata",
                        PREFIX / cnpg.volume_handle(k8s, f"{pod}-wal") / "pg_wal",
                        PREFIX / cnpg.volume_handle(k8s, f"{pod}-tbs-archive") / "data",
                    ]
                ),
                "whole_basebackup": cluster_from_basebackup(k8s, volume, "pg-spaces", like),
                "online_backup": online_backup(k8s, "pg-spaces", f"bench-{scale}-{run}"),
            }
            for key, value in measured.items():
                samples.setdefault(key, []).append(value)
            log(f"   run {run + 1}: " + ", ".join(f"{k} {v:.3f} s" for k, v in measured.items()))
        row: dict[str, Any] = {"scale": scale, "bytes": size}
        row.update({k: statistics.median(v) for k, v in samples.items()})
        rows.append(row)
    remove_cluster(k8s, "pg-spaces")
    return rows


def bare_copy_of(directories: list[Path]) -> float:
    """The physical floor of a whole instance: `cp -a --reflink=always` of each directory."""
    target = PREFIX / ".bench-floor"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    start = time.monotonic()
    for i, directory in enumerate(directories):
        subprocess.run(
            ["cp", "-a", "--reflink=always", str(directory), str(target / str(i))], check=True
        )
    copied = time.monotonic() - start
    shutil.rmtree(target)
    return copied


def bare_copy_and_walk(source_dir: Path) -> tuple[float, float]:
    """The physical floor: reflink every file of the data directory, nothing else. Then, on
    that copy, what kubelet's recursive fsGroup handling would cost at every mount of a clone
    (a group change and a mode change per file, as its SetVolumeOwnership does), which the
    driver's VOLUME_MOUNT_GROUP capability avoids."""
    target = PREFIX / ".bench-floor"
    shutil.rmtree(target, ignore_errors=True)
    start = time.monotonic()
    subprocess.run(["cp", "-a", "--reflink=always", str(source_dir), str(target)], check=True)
    copied = time.monotonic() - start
    start = time.monotonic()
    for root, dirs, files in os.walk(target):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            os.lchown(path, -1, 26)
            if not stat.S_ISLNK(st.st_mode):
                extra = 0o2070 if stat.S_ISDIR(st.st_mode) else 0o060
                os.chmod(path, stat.S_IMODE(st.st_mode) | extra)
    walked = time.monotonic() - start
    shutil.rmtree(target)
    return copied, walked


def bench() -> int:
    k8s_tools, cnpg_tools = Path(os.environ["K8S_TOOLS"]), Path(os.environ["CNPG_TOOLS"])
    sizes = [float(s) for s in os.environ.get("BENCH_SIZES", "1 4 16").split()]
    whole_sizes = [float(s) for s in os.environ.get("WHOLE_SIZES", "1 4").split()]
    ha_sizes = [float(s) for s in os.environ.get("HA_SIZES", "1 4").split()]
    impact_sizes = [float(s) for s in os.environ.get("IMPACT_SIZE", "1").split()][:1]
    copies = int(os.environ.get("IMPACT_COPIES", "10"))
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    largest = max(sizes + whole_sizes + ha_sizes + impact_sizes)
    volume = f"{int(largest * 2.5) + 8}Gi"
    disk = f"{int(largest * 4) + 24}G"
    started = time.monotonic()
    with running_cluster(
        k8s_tools,
        cnpg_tools,
        disk=disk,
        announce=lambda s: log(f"== {s}"),
        nodes=3,
        object_store=True,
    ) as k8s:
        cnpg.ensure_namespace(k8s)
        if sizes:
            bench_sizes(k8s, sizes, runs, volume, started)
        if whole_sizes:
            began = time.monotonic()
            rows = bench_whole(k8s, whole_sizes, runs)
            write_whole_report(rows, runs, time.monotonic() - began)
        if ha_sizes:
            began = time.monotonic()
            rows = bench_ha(k8s, ha_sizes, runs)
            write_ha_report(rows, runs, time.monotonic() - began)
        if impact_sizes:
            began = time.monotonic()
            row = bench_impact(k8s, impact_sizes[0], copies, runs)
            write_impact_report(row, runs, time.monotonic() - began)
    return 0


def bench_sizes(
    k8s: OneNodeCluster, sizes: list[float], runs: int, volume: str, started: float
) -> list[dict[str, Any]]:
    """The rows of one source with its PGDATA on one volume, at each size."""
    cnpg.install_function_configmap(k8s)
    source_doc = cnpg.example("source-cluster.yaml")
    source_doc["spec"]["storage"]["size"] = volume
    k8s.apply(source_doc)
    cnpg.wait_healthy(k8s, SOURCE, timeout=300)
    pod = cnpg.primary_pod(k8s, SOURCE)
    pgdata = PREFIX / cnpg.volume_handle(k8s, pod) / "pgdata"
    rows: list[dict[str, Any]] = []
    for gib in sizes:
        scale = max(1, round(gib * SCALE_PER_GIB))
        log(f"== load pgbench data, scale {scale}")
        cnpg.pgbench(k8s, pod, "-i", "-s", str(scale), "-q")
        cnpg.psql(k8s, pod, "CHECKPOINT")
        size = int(cnpg.psql(k8s, pod, "SELECT pg_database_size('app')"))
        log(f"== scale {scale}: {size / 2**30:.2f} GiB")
        samples: dict[str, list[float]] = {}
        for run in range(runs):
            bound, running, hot = claim_and_pod(k8s, pod)
            snapped, from_snapshot = snapshot_and_clone(k8s, pod)
            copied, walked = bare_copy_and_walk(pgdata)
            measured = {
                "bound": bound,
                "running": running,
                "hot": hot if hot is not None else float("nan"),
                "cp": copied,
                "walk": walked,
                "snapshot": snapped,
                "from_snapshot": from_snapshot,
                "reflink_cluster": cluster_from_claim(k8s, volume),
                "basebackup_cluster": cluster_from_basebackup(k8s, volume),
            }
            for key, value in measured.items():
                samples.setdefault(key, []).append(value)
            log(f"   run {run + 1}: " + ", ".join(f"{k} {v:.3f} s" for k, v in measured.items()))
        row: dict[str, Any] = {"scale": scale, "bytes": size}
        row.update({k: statistics.median(v) for k, v in samples.items()})
        rows.append(row)
        # Written after each size, so a run cut short keeps what it measured.
        write_report(rows, runs, time.monotonic() - started)
    remove_cluster(k8s, SOURCE)
    return rows


def write_report(rows: list[dict[str, Any]], runs: int, seconds: float) -> None:
    plot(
        rows,
        [
            ("basebackup_cluster", "new Cluster, CNPG bootstrap.pg_basebackup: apply to healthy"),
            ("reflink_cluster", "new Cluster from the claim (pg-reflinker): apply to healthy"),
            ("running", "clone claim to a pod on it Running"),
            ("bound", "clone claim to Bound"),
            ("hot", "hot clone (reflink_snapshot)"),
            ("cp", "bare cp -a --reflink=always (floor)"),
        ],
        runs,
        "pg-reflinker on a real cluster with CloudNativePG",
        "cluster-time.png",
        7,
    )

    lines = [
        "## On a real cluster with CloudNativePG (`make bench`)",
        "",
        "A one-node cluster on this machine: kubelet and containerd running real pods, the",
        "pg-reflinker image built from the Dockerfile, installed with helm from the chart, the",
        f"CloudNativePG 1.30.0 operator, PostgreSQL {images.PG_MAJOR} from Debian's packages; "
        "one XFS",
        "(`reflink=1`) loop filesystem holds the source and every copy.",
        "",
        f"- machine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
        f"{platform.platform()}; shared and noisy, so each figure is the median of {runs} runs",
        f"- date: {time.strftime('%Y-%m-%d')}; the whole run took {seconds / 60:.0f} minutes",
        "",
        "![time against database size](cluster-time.png)",
        "",
        "| pgbench scale | size GiB | new Cluster, pg_basebackup s | new Cluster, pg-reflinker s "
        "| claim to Bound s | claim to pod Running s | hot clone s | bare reflink cp s "
        "| fsGroup walk avoided s | VolumeSnapshot to readyToUse s "
        "| claim from snapshot to Bound s | pg_basebackup / pg-reflinker | hot / cp |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']} | {r['bytes'] / 2**30:.2f} | {r['basebackup_cluster']:.1f} | "
            f"{r['reflink_cluster']:.1f} | {r['bound']:.2f} | {r['running']:.2f} | "
            f"{r['hot']:.3f} | {r['cp']:.3f} | {r['walk']:.3f} | "
            f"{r['snapshot']:.2f} | {r['from_snapshot']:.2f} | "
            f"{r['basebackup_cluster'] / r['reflink_cluster']:.1f}x | {r['hot'] / r['cp']:.2f} |"
        )
    lines += [
        "",
        "A new Cluster's time includes what CNPG does around the copy either way (the",
        "bootstrap job, the instance's start-up and its readiness probe, about 15 s here); the",
        "copy itself is the difference. The claim-to-pod time is for a pod with `fsGroup: 26`",
        "(as CNPG's); \"fsGroup walk avoided\" is what kubelet's recursive ownership change",
        "would add to every such mount without the driver's VOLUME_MOUNT_GROUP capability",
        "(measured on a reflink copy of the data directory). The VolumeSnapshot is of the",
        "running instance's claim (hot, through snapshot-controller and csi-snapshotter); the",
        "claim from it is a reflink copy that touches no database. Reproduce: `make bench` as root",
        "(BENCH_SIZES in GiB, BENCH_RUNS).",
    ]
    write_section("cluster", lines)
    log(f"wrote docs/benchmarks.md and {DOCS / 'cluster-time.png'}")


def write_whole_report(rows: list[dict[str, Any]], runs: int, seconds: float) -> None:
    lines = [
        "### Whole instances: walStorage and a tablespace (`make bench`)",
        "",
        "A source Cluster whose instance has three pg-reflinker volumes: PGDATA, its WAL and a",
        "tablespace holding pgbench's tables (its indexes in the default tablespace),",
        "deploy/examples/source-cluster-tablespace.yaml. A new Cluster with the same three",
        "volumes from its running claims (one capture, three pieces, native method:",
        "deploy/examples/clone-cluster-whole.yaml) against CNPG's `bootstrap.pg_basebackup` of",
        "the same source into the same layout; the capture itself (from the controller's log)",
        "against the physical floor, a bare `cp -a --reflink=always` of the three directories",
        "(data directory, WAL, tablespace); and CNPG's online volumeSnapshot Backup",
        "(deploy/examples/backup-online.yaml) to `completed`.",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; medians of {runs} runs; this section's run took "
        f"{seconds / 60:.0f} minutes (`WHOLE_SIZES`)",
        "",
        "| pgbench scale | size GiB | new Cluster, pg_basebackup s | new Cluster, pg-reflinker s "
        "| pg_basebackup / pg-reflinker | capture s | bare reflink cp of the three s "
        "| capture / cp | online Backup to completed s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']} | {r['bytes'] / 2**30:.2f} | {r['whole_basebackup']:.1f} | "
            f"{r['whole_cluster']:.1f} | {r['whole_basebackup'] / r['whole_cluster']:.1f}x | "
            f"{r['capture']:.2f} | {r['floor']:.2f} | {r['capture'] / r['floor']:.1f} | "
            f"{r['online_backup']:.1f} |"
        )
    lines += [
        "",
        "A new Cluster's time includes what CNPG does around the copy either way (the",
        "bootstrap job, the instance's start-up and readiness, about 15 s here); the capture is",
        "the part pg-reflinker adds: one backup (checkpoint, the three directories reflinked,",
        "the WAL), then a reflink cut per piece.",
    ]
    write_section("whole", lines)
    log("wrote the whole-instance section of docs/benchmarks.md")


if __name__ == "__main__":
    sys.exit(bench())
