"""`make bench`, what copies cost production (IMPACT_SIZE GiB, IMPACT_COPIES copies): on the
three-node cluster, production (one instance on pg-reflinker, on the second node) and its clone
source (a CNPG replica Cluster on the third node, labelled and tainted for copies,
docs/clone-source.md), in one run:

  - pgbench on production, progress every second and every transaction logged, while
    IMPACT_COPIES claims copy production's own claim (each copy a backup on production), then
    while as many copy the clone source's claim;
  - for each: the median tps of the seconds before the copies, the worst second and the p99
    latency from the first claim to one second after the last is Bound.

Writes its section of docs/benchmarks.md."""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from typing import Any

from tests.bench.report import write_section
from tests.cluster import cnpg
from tests.e2e.onenode import OneNodeCluster

NS = "bench-impact"
PROD = "pg-prod"
SCALE_PER_GIB = 68
CLASS = "pg-reflinker-placed"  # volumes made where the scheduler puts the pod
CLONE_NODE_KEY = "pg-reflinker.csi/clone-node"
PROGRESS = re.compile(r"progress: ([0-9.]+) s, ([0-9.]+) tps")
LOG = "/var/lib/postgresql/data/bench-impact"  # beside pgdata, not in it: copies leave it


def log(text: str) -> None:
    print(text, flush=True)


def _claims(name: str, source: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{name}-{i}", "namespace": NS},
            "spec": {
                "storageClassName": "pg-reflinker",
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "64Gi"}},
                "dataSource": {"kind": "PersistentVolumeClaim", "name": source},
            },
        }
        for i in range(count)
    ]


def _bound(k8s: OneNodeCluster, name: str, count: int) -> bool:
    claims = k8s.get("pvc", "-n", NS)["items"]
    phases = [c["status"].get("phase") for c in claims if c["metadata"]["name"].startswith(name)]
    return len(phases) == count and all(p == "Bound" for p in phases)


def copies_under_load(
    k8s: OneNodeCluster, primary: str, source: str, name: str, count: int
) -> dict[str, float]:
    """pgbench on production; after 8 s, `count` claims copy `source`; production's median tps
    before, its worst second and p99 latency (ms) while they are made, and the seconds until
    the last is Bound."""
    cnpg.exec_postgres(k8s, primary, "rm", "-rf", LOG, ns=NS)
    cnpg.exec_postgres(k8s, primary, "mkdir", "-p", LOG, ns=NS)
    bench = subprocess.Popen(
        [
            str(k8s.bin / "kubectl"), f"--kubeconfig={k8s.kubeconfig}", "exec", "-n", NS,
            primary, "-c", "postgres", "--", "pgbench", "-c", "4", "-j", "2", "-T", "120",
            "-P", "1", "-n", "-l", f"--log-prefix={LOG}/tx", "app",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started = time.monotonic()
    time.sleep(8)
    copy_at, copy_wall = time.monotonic() - started, time.time()
    k8s.apply(_claims(name, source, count))
    k8s.wait(f"{count} copies of {source} Bound", lambda: _bound(k8s, name, count), 600)
    bound_at, bound_wall = time.monotonic() - started, time.time()
    out, _ = bench.communicate(timeout=300)
    if bench.returncode != 0:
        raise RuntimeError(f"pgbench on production failed:\n{out[-2000:]}")
    k8s.kubectl("delete", "pvc", "-n", NS, *(f"{name}-{i}" for i in range(count)), timeout=300)
    seconds = [(float(t), float(tps)) for t, tps in PROGRESS.findall(out)]
    before = [tps for t, tps in seconds if 2 <= t <= copy_at]
    during = [tps for t, tps in seconds if copy_at < t <= bound_at + 1.5]
    # Transaction log lines: client, transaction, latency us, script, epoch s, us.
    latencies = []
    logs = cnpg.exec_postgres(k8s, primary, "sh", "-c", f"cat {LOG}/tx*", ns=NS)
    for line in logs.splitlines():
        parts = line.split()
        if len(parts) >= 6:
            done = int(parts[4]) + int(parts[5]) / 1e6
            if copy_wall <= done <= bound_wall + 1.5:
                latencies.append(int(parts[2]) / 1000)
    cnpg.exec_postgres(k8s, primary, "rm", "-rf", LOG, ns=NS)
    if not before or not during or len(latencies) < 100:
        raise RuntimeError(f"pgbench printed too little:\n{out[-2000:]}")
    return {
        "tps": statistics.median(before),
        "worst": min(during),
        "p99": statistics.quantiles(latencies, n=100)[98],
        "bound": bound_at - copy_at,
    }


def start(k8s: OneNodeCluster, gib: float) -> tuple[str, str]:
    """Production on the second node and its clone source on the third; their pods."""
    prod_node, clone_node = k8s.nodes[1].name, k8s.nodes[2].name
    k8s.kubectl("uncordon", prod_node, clone_node)
    k8s.kubectl("label", "node", clone_node, f"{CLONE_NODE_KEY}=true", "--overwrite")
    k8s.kubectl("taint", "node", clone_node, f"{CLONE_NODE_KEY}=true:NoSchedule", "--overwrite")
    cnpg.ensure_namespace(k8s, NS)
    k8s.apply(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": CLASS},
            "provisioner": "pg-reflinker.csi",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        }
    )
    volume = f"{int(gib * 2.5) + 8}Gi"
    doc = cnpg.example("source-cluster-native.yaml")
    doc["metadata"].update(name=PROD, namespace=NS)
    doc["spec"]["storage"] = {"storageClass": CLASS, "size": volume}
    doc["spec"]["walStorage"]["storageClass"] = CLASS
    doc["spec"]["affinity"] = {"nodeSelector": {"kubernetes.io/hostname": prod_node}}
    k8s.apply(doc)
    cnpg.wait_healthy(k8s, PROD, NS, timeout=420)
    primary = cnpg.primary_pod(k8s, PROD, NS)
    scale = max(1, round(gib * SCALE_PER_GIB))
    log(f"== impact: load pgbench data, scale {scale}")
    cnpg.pgbench(k8s, primary, "-i", "-s", str(scale), "-q", ns=NS)
    cnpg.psql(k8s, primary, "CHECKPOINT", ns=NS)
    source = cnpg.example("clone-source.yaml")
    source["metadata"]["namespace"] = NS
    source["spec"]["storage"].update(storageClass=CLASS, size=volume)
    source["spec"]["walStorage"]["storageClass"] = CLASS
    k8s.apply(source)
    cnpg.wait_healthy(k8s, "pg-copies", NS, timeout=1200)
    return primary, cnpg.primary_pod(k8s, "pg-copies", NS)


def stop(k8s: OneNodeCluster) -> None:
    prod_node, clone_node = k8s.nodes[1].name, k8s.nodes[2].name
    k8s.kubectl("delete", "namespace", NS, "--wait=true", "--timeout=300s", timeout=360)
    k8s.kubectl("delete", "storageclass", CLASS, check=False)
    k8s.kubectl("taint", "node", clone_node, f"{CLONE_NODE_KEY}-", check=False)
    k8s.kubectl("label", "node", clone_node, f"{CLONE_NODE_KEY}-", check=False)
    k8s.kubectl("cordon", prod_node, clone_node)


def bench_impact(k8s: OneNodeCluster, gib: float, copies: int, runs: int) -> dict[str, Any]:
    primary, source = start(k8s, gib)
    size = int(cnpg.psql(k8s, primary, "SELECT pg_database_size('app')", ns=NS))
    samples: dict[str, list[float]] = {}
    for run in range(runs):
        direct = copies_under_load(k8s, primary, primary, "of-production", copies)
        replica = copies_under_load(k8s, primary, source, "of-clone-source", copies)
        measured = {f"direct_{k}": v for k, v in direct.items()}
        measured.update({f"source_{k}": v for k, v in replica.items()})
        for key, value in measured.items():
            samples.setdefault(key, []).append(value)
        log(f"   run {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()))
    stop(k8s)
    row: dict[str, Any] = {"bytes": size, "copies": copies}
    row.update({k: statistics.median(v) for k, v in samples.items()})
    return row


def write_impact_report(row: dict[str, Any], runs: int, seconds: float) -> None:
    lines = [
        "### What copies cost production: copies of it, or of its clone source (`make bench`)",
        "",
        "The three-node cluster; production is one instance on pg-reflinker on the second node,",
        "its clone source a CNPG replica Cluster on the third ([clone source](clone-source.md)).",
        f"pgbench (4 clients) on production while {row['copies']} claims are made at once that",
        "copy production's claim (each a backup of production: a checkpoint, backup mode, reflinks",
        "of the files its writers use), then while as many copy the clone source's claim",
        "(production is not touched). The median tps of the seconds before, and from the first",
        "claim to one second after the last is Bound (or to pgbench's end, 120 s in, if that",
        "comes first): the worst second and the p99 latency. The copies of one source are taken",
        "one backup at a time. The nodes share one machine's two cores and one disk, so the",
        "clone source's copies (and its replay) still compete with production for them, which a",
        "node of its own would not; the two phases run one after the other, so the second starts",
        "on a busier disk (the first phase's copies being deleted).",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; database {row['bytes'] / 2**30:.2f} GiB; medians "
        f"of {runs} run(s); this section's run took {seconds / 60:.0f} minutes (`IMPACT_SIZE`, "
        "`IMPACT_COPIES`)",
        "",
        "| copies taken of | tps before | worst second | p99 latency ms | all Bound s |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, what in (("direct", "production"), ("source", "the clone source")):
        lines.append(
            f"| {what} | {row[f'{key}_tps']:.0f} | {row[f'{key}_worst']:.0f} "
            f"({row[f'{key}_worst'] / row[f'{key}_tps']:.0%}) | {row[f'{key}_p99']:.1f} | "
            f"{row[f'{key}_bound']:.1f} |"
        )
    lines += [
        "",
        "Copies of the clone source against copies of production: the worst second "
        f"{row['source_worst'] / max(row['direct_worst'], 1):.1f}x the tps, the p99 latency "
        f"{row['source_p99'] / max(row['direct_p99'], 0.001):.1f}x, all Bound in "
        f"{row['source_bound'] / max(row['direct_bound'], 0.001):.2f}x the time.",
    ]
    write_section("impact", lines)
    log("wrote the production-impact section of docs/benchmarks.md")
