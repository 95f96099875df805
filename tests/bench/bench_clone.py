"""Benchmark: hot clones by both methods (reflink_snapshot() in the server; native:
pg_backup_start/stop in our session with the copy made here, as the node plugin makes it)
against the physical floor (a bare `cp -a --reflink=always` of the same data directory) and
against pg_basebackup, all measured in one run on one XFS reflink loop filesystem, for each
PostgreSQL major here (pg_majors(): 15, 17 and 18 after `make pg-majors`).

Run as root: make bench-clone [BENCH_SCALES="50 400"] [BENCH_RUNS=5] [BENCH_MAJORS="15 18"]
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from reflinker_csi.core.locator import SourceServer
from reflinker_csi.disk.backup import LocalCopier
from reflinker_csi.pg.backup import native_hot_clone
from reflinker_csi.pg.source import hot_clone
from tests.conftest import Filesystem
from tests.pgserver import (
    Certificates,
    PostgresServer,
    free_port,
    pg_majors,
    remove,
)


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    samples = [measure() for _ in range(runs)]
    return statistics.median(samples), samples


def bench_scale(
    fs: Filesystem, certs: Certificates, bindir: Path, scale: int, runs: int
) -> dict[str, float]:
    server = PostgresServer(
        volume=fs.mnt / f"src-{scale}",
        port=free_port(),
        socket_dir=fs.work / "sock",
        certs=certs,
        bin=bindir,
    )
    tag = f"PG {server.major}, scale {scale}"
    server.initdb()
    server.start()
    server.install_function()
    server.psql("CREATE DATABASE app")
    print(f"[{tag}] loading pgbench data ...", flush=True)
    load = timed(lambda: server.pgbench("-i", "-s", str(scale), "-q"))
    server.psql("CHECKPOINT")
    size = int(server.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
    print(f"[{tag}] {size / 2**30:.2f} GiB loaded in {load:.0f} s", flush=True)
    endpoint = SourceServer(
        pod_ip="127.0.0.1",
        port=server.port,
        cluster="pg-xyz",
        namespace="apps",
        ca_cert=certs.read("ca.crt"),
        client_cert=certs.read("replication.crt"),
        client_key=certs.read("replication.key"),
    )
    area = server.volume / ".pg-reflinker"

    def one_hot() -> float:
        label = str(uuid.uuid4())
        seconds = hot_clone(endpoint, label).seconds
        remove(area / label)
        return seconds

    def one_native() -> float:
        label = str(uuid.uuid4())
        area.mkdir(exist_ok=True)
        start = time.monotonic()
        native_hot_clone(endpoint, label, LocalCopier(server.pgdata, area / label))
        seconds = time.monotonic() - start
        remove(area / label)
        return seconds

    def one_cp() -> float:
        target = fs.mnt / f"cp-{uuid.uuid4()}"
        seconds = timed(
            lambda: subprocess.run(
                ["cp", "-a", "--reflink=always", str(server.pgdata), str(target)], check=True
            )
        )
        remove(target)
        return seconds

    def one_basebackup() -> float:
        target = fs.mnt / f"bb-{uuid.uuid4()}"
        seconds = timed(lambda: server.basebackup(target))
        remove(target)
        fs.trim()  # each pg_basebackup writes the whole database again
        return seconds

    def one_checkpoint() -> float:
        return timed(lambda: server.psql("CHECKPOINT"))

    one_hot()  # warm-up: first connection, page cache
    one_native()
    result: dict[str, float] = {"major": server.major, "scale": scale, "bytes": size}
    for name, measure in (
        ("hot", one_hot),
        ("native", one_native),
        ("cp", one_cp),
        ("checkpoint", one_checkpoint),
        ("basebackup", one_basebackup),
    ):
        med, samples = median_of(runs, measure)
        result[name] = med
        print(
            f"[{tag}] {name:<11} median {med:8.3f} s  samples "
            + " ".join(f"{s:.3f}" for s in samples),
            flush=True,
        )
    server.stop()
    remove(server.volume)
    fs.trim()
    return result


def main() -> int:
    scales = [int(s) for s in os.environ.get("BENCH_SCALES", "50 400").split()]
    runs = int(os.environ.get("BENCH_RUNS", "5"))
    fs = Filesystem("xfs", size=os.environ.get("BENCH_DISK", "64G"))
    try:
        os.chmod(fs.work, 0o755)
        certs = Certificates.create(fs.work / "certs", "pg-xyz", "apps")
        os.chmod(certs.directory, 0o755)
        majors = pg_majors()
        chosen = [
            int(m) for m in os.environ.get("BENCH_MAJORS", " ".join(map(str, majors))).split()
        ]
        missing = [m for m in chosen if m not in majors]
        if missing:
            sys.exit(f"BENCH_MAJORS: no PostgreSQL {missing} here (make pg-majors builds 17, 18)")
        rows = [
            bench_scale(fs, certs, majors[major], scale, runs)
            for major in chosen
            for scale in scales
        ]
    finally:
        fs.close()
    print()
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {platform.platform()}; "
        f"PostgreSQL {', '.join(str(m) for m in chosen)}; XFS reflink on a sparse loop file; "
        f"median of {runs} runs each"
    )
    print(
        f"{'major':>5} {'scale':>6} {'size GiB':>9} {'function s':>11} {'native s':>9} "
        f"{'bare cp s':>10} "
        f"{'checkpoint s':>13} {'pg_basebackup s':>16} {'function/cp':>12} {'native/cp':>10} "
        f"{'native/function':>16} {'basebackup/function':>20}"
    )
    for r in rows:
        print(
            f"{r['major']:>5.0f} {r['scale']:>6.0f} {r['bytes'] / 2**30:>9.2f} {r['hot']:>11.3f} "
            f"{r['native']:>9.3f} {r['cp']:>10.3f} {r['checkpoint']:>13.3f} "
            f"{r['basebackup']:>16.3f} {r['hot'] / r['cp']:>12.2f} {r['native'] / r['cp']:>10.2f} "
            f"{r['native'] / r['hot']:>16.2f} {r['basebackup'] / r['hot']:>20.1f}"
        )
    ok = True
    for r in rows:
        budget = 2 * r["cp"] + r["checkpoint"]
        met = r["hot"] <= budget
        ok &= met
        print(
            f"target PG {r['major']:.0f} scale {r['scale']:.0f}: hot clone {r['hot']:.3f} s "
            f"<= 2 x bare cp + checkpoint = {budget:.3f} s: {'met' if met else 'MISSED'}"
        )
    for r in rows:
        met = r["native"] <= 1.5 * r["hot"]
        ok &= met
        print(
            f"target PG {r['major']:.0f} scale {r['scale']:.0f}: native {r['native']:.3f} s "
            f"<= 1.5 x function {r['hot']:.3f} s: {r['native'] / r['hot']:.2f}x: "
            f"{'met' if met else 'MISSED'}"
        )
    for major in chosen:
        mine = [r for r in rows if r["major"] == major]
        small, large = mine[0], mine[-1]
        speedup = large["basebackup"] / large["hot"]
        growth = large["hot"] / small["hot"]
        ok &= speedup >= 30 and growth <= 1.5
        print(
            f"target PG {major}: >= 30x faster than pg_basebackup at scale "
            f"{large['scale']:.0f}: {speedup:.1f}x: {'met' if speedup >= 30 else 'MISSED'}"
        )
        print(
            f"target PG {major}: hot clone at scale {large['scale']:.0f} <= 1.5 x scale "
            f"{small['scale']:.0f}: {growth:.2f}x: {'met' if growth <= 1.5 else 'MISSED'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as failed:
        sys.exit(f"{failed}\n{failed.stderr or ''}")
