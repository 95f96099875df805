"""Benchmark: what a clone costs as a database grows and fragments, on XFS and on btrfs.

A reflink copy costs per extent, and a database written after it was cloned fragments. For each
backend (a loop filesystem of each kind, the source's volume a subvolume on btrfs) and each
pgbench scale: a freshly loaded database, then BENCH_ROUNDS rounds of BENCH_LOAD seconds of
pgbench writes during which four native clones are taken (as a busy source is cloned). After
loading and after each round, measured in the same run (median of BENCH_RUNS, pg_basebackup
once): a hot clone by the function (reflink_snapshot(), cp --reflink in the server), a native
hot clone (pg_backup_start/stop, the copy made here: a subvolume snapshot on btrfs), the
physical floor (a bare `cp -a --reflink=always` of the data directory; on btrfs also a bare
subvolume snapshot) and pg_basebackup; and the data directory's extents. During each round, the
stall a writer sees: the slowest pgbench transaction that overlapped a clone, against the 99th
percentile of the others. Then pgbench throughput on the source and on a booted clone, and how
much the filesystem grew for the clone's writes.

Writes its section of docs/benchmarks.md and docs/clone-scale.png.
Run as root: make bench-scale [BENCH_SCALES="50 200"] [BENCH_ROUNDS=2] [BENCH_RUNS=3]
[BENCH_LOAD=20] [BENCH_BACKENDS="xfs btrfs"]
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from reflinker_csi.core.locator import SourceServer
from reflinker_csi.disk import subvolume
from reflinker_csi.disk.backup import LocalCopier
from reflinker_csi.disk.usage import measure, set_cow_extent_size
from reflinker_csi.pg.backup import native_hot_clone
from reflinker_csi.pg.source import hot_clone
from tests.bench.bench_clone import median_of, timed
from tests.bench.bench_space import DEFAULT_KIB, tps, used
from tests.bench.report import DOCS, write_section
from tests.conftest import Filesystem
from tests.pgserver import (
    Certificates,
    PostgresServer,
    boot_clone,
    chown_postgres,
    free_port,
    pg_majors,
    remove,
)

MiB = 2**20


@dataclass
class Point:
    backend: str
    scale: int
    stage: str  # "fresh" or "rewritten N"
    size: int  # bytes of the databases
    extents: int  # of the data directory's files
    function: float
    native: float
    cp: float
    snapshot: float  # a bare subvolume snapshot (btrfs; 0 elsewhere)
    basebackup: float


@dataclass
class Stall:
    backend: str
    scale: int
    round: int
    during_max_ms: float  # slowest transaction that overlapped a clone
    others_p99_ms: float  # 99th percentile of the transactions that did not
    clones: int


@dataclass
class Rates:
    backend: str
    scale: int
    tps_source: float
    tps_clone: float
    clone_tx: int
    growth: int  # filesystem bytes the clone's writes took


@dataclass
class Result:
    points: list[Point] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)
    rates: list[Rates] = field(default_factory=list)


class Bench:
    def __init__(self, fs: Filesystem, certs: Certificates, bindir: Path, scale: int) -> None:
        self.fs = fs
        self.scale = scale
        self.server = PostgresServer(
            volume=fs.new_volume(fs.mnt / f"src-{scale}"),
            port=free_port(),
            socket_dir=fs.work / "sock",
            certs=certs,
            bin=bindir,
        )
        self.tag = f"{fs.kind}, PG {self.server.major}, scale {scale}"
        self.endpoint = SourceServer(
            pod_ip="127.0.0.1",
            port=self.server.port,
            cluster="pg-xyz",
            namespace="apps",
            ca_cert=certs.read("ca.crt"),
            client_cert=certs.read("replication.crt"),
            client_key=certs.read("replication.key"),
        )
        self.area = self.server.volume / ".pg-reflinker"

    def log(self, text: str) -> None:
        print(f"[{self.tag}] {text}", flush=True)

    def load(self) -> None:
        s = self.server
        s.initdb()
        s.start()
        s.install_function()
        s.psql("CREATE DATABASE app")
        self.log("loading pgbench data ...")
        seconds = timed(lambda: s.pgbench("-i", "-s", str(self.scale), "-q"))
        s.psql("CHECKPOINT")
        self.log(f"{self.size() / 2**30:.2f} GiB loaded in {seconds:.0f} s")
        self.area.mkdir()
        chown_postgres(self.area)

    def size(self) -> int:
        return int(self.server.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))

    def native(self, keep: bool = False) -> tuple[float, Path]:
        target = self.area / str(uuid.uuid4())
        began = time.monotonic()
        native_hot_clone(self.endpoint, target.name, LocalCopier(self.server.pgdata, target))
        seconds = time.monotonic() - began
        if not keep:
            remove(target)
        return seconds, target

    def function(self) -> float:
        label = str(uuid.uuid4())
        seconds = hot_clone(self.endpoint, label).seconds
        remove(self.area / label)
        return seconds

    def cp(self) -> float:
        target = self.fs.mnt / f"cp-{uuid.uuid4()}"
        seconds = timed(
            lambda: subprocess.run(
                ["cp", "-a", "--reflink=always", str(self.server.pgdata), str(target)], check=True
            )
        )
        remove(target)
        return seconds

    def snapshot(self) -> float:
        target = self.fs.mnt / f"snap-{uuid.uuid4()}"
        seconds = timed(lambda: subvolume.snapshot(self.server.volume, target))
        subvolume.delete(target)
        return seconds

    def basebackup(self) -> float:
        target = self.fs.mnt / f"bb-{uuid.uuid4()}"
        seconds = timed(lambda: self.server.basebackup(target))
        remove(target)
        self.fs.trim()  # each pg_basebackup writes the whole database again
        return seconds

    def point(self, stage: str, runs: int) -> Point:
        self.server.psql("CHECKPOINT")
        times: dict[str, float] = {}
        measures = [("function", self.function), ("native", lambda: self.native()[0])]
        measures.append(("cp", self.cp))
        if self.fs.kind == "btrfs":
            measures.append(("snapshot", self.snapshot))
        for name, one in measures:
            times[name], samples = median_of(runs, one)
            self.log(f"{stage}: {name:<9} median {times[name]:.3f} s ({fmt(samples)})")
        times["basebackup"] = self.basebackup()
        extents = measure(self.server.pgdata).extents
        self.log(f"{stage}: pg_basebackup {times['basebackup']:.3f} s, {extents} extents")
        self.fs.trim()
        return Point(
            self.fs.kind,
            self.scale,
            stage,
            self.size(),
            extents,
            times["function"],
            times["native"],
            times["cp"],
            times.get("snapshot", 0.0),
            times["basebackup"],
        )

    def rewrite(self, round_no: int, seconds: int) -> Stall:
        """seconds of pgbench writes with a native clone taken every seconds/5 s; the
        latency of each transaction from pgbench's log, against the clones' windows."""
        logs = Path(tempfile.mkdtemp(prefix="pgbench-log.", dir=self.fs.work))
        chown_postgres(logs)
        bench = self.server.pgbench_background(
            "-n", "-c", "2", "-j", "2", "-T", str(seconds), "-l", f"--log-prefix={logs}/tx"
        )
        windows: list[tuple[float, float]] = []
        kept: list[Path] = []
        try:
            for _ in range(4):
                time.sleep(seconds / 5)
                began = time.time()
                kept.append(self.native(keep=True)[1])
                windows.append((began, time.time()))
        finally:
            out, _ = bench.communicate(timeout=seconds + 120)
        if bench.returncode != 0:
            raise RuntimeError(f"pgbench failed:\n{out}")
        during: list[float] = []
        others: list[float] = []
        for log in logs.iterdir():
            for line in log.read_text().splitlines():
                fields = line.split()
                latency = int(fields[2]) / 1e6
                end = int(fields[4]) + int(fields[5]) / 1e6
                start = end - latency
                hit = any(start < w_end and end > w_start for w_start, w_end in windows)
                (during if hit else others).append(latency * 1000)
        remove(logs)
        for path in kept:
            remove(path)
        others.sort()
        stall = Stall(
            self.fs.kind,
            self.scale,
            round_no,
            max(during, default=0.0),
            others[int(len(others) * 0.99)] if others else 0.0,
            len(windows),
        )
        self.log(
            f"round {round_no}: slowest transaction during a clone {stall.during_max_ms:.0f} ms, "
            f"p99 of the others {stall.others_p99_ms:.0f} ms"
        )
        return stall

    def rates(self, seconds: int) -> Rates:
        """pgbench tps on the source, then on a booted native clone, and the filesystem's
        growth for the clone's writes."""
        out = self.server.pgbench("-n", "-c", "2", "-j", "2", "-T", str(seconds)).stdout
        on_source = tps(out)
        _, target = self.native(keep=True)
        clone = boot_clone(target, self.fs.work / "sock", self.server.bin)
        try:
            subprocess.run(["sync"], check=True)
            before = used(self.fs.mnt)
            out = clone.pgbench("-n", "-c", "2", "-j", "2", "-T", str(seconds)).stdout
            clone.psql("CHECKPOINT")
            subprocess.run(["sync"], check=True)
            growth = used(self.fs.mnt) - before
        finally:
            clone.stop()
        remove(target)
        count = next(
            (
                int(line.split(":")[1])
                for line in out.splitlines()
                if "transactions actually" in line
            ),
            0,
        )
        rates = Rates(self.fs.kind, self.scale, on_source, tps(out), count, growth)
        self.log(
            f"tps source {rates.tps_source:.0f}, clone {rates.tps_clone:.0f}; the clone's "
            f"{count} transactions grew the filesystem {growth / MiB:.0f} MiB"
        )
        return rates

    def close(self) -> None:
        self.server.stop()
        remove(self.server.volume)
        self.fs.trim()


def fmt(samples: list[float]) -> str:
    return " ".join(f"{s:.3f}" for s in samples)


def run_backend(
    kind: str, bindir: Path, scales: list[int], rounds: int, runs: int, load: int
) -> Result:
    result = Result()
    fs = Filesystem(kind, size=os.environ.get("BENCH_DISK", "48G"))
    try:
        os.chmod(fs.work, 0o755)
        if kind == "xfs":
            # As the driver sets it on HOSTPATH_PREFIX (COW_EXTENT_SIZE): a written page of a
            # clone unshares that page, not XFS's default 128 KiB around it.
            set_cow_extent_size(fs.mnt, DEFAULT_KIB * 1024)
        certs = Certificates.create(fs.work / "certs", "pg-xyz", "apps")
        os.chmod(certs.directory, 0o755)
        for scale in scales:
            bench = Bench(fs, certs, bindir, scale)
            bench.load()
            bench.function()  # warm-up: first connection, page cache
            bench.native()
            result.points.append(bench.point("fresh", runs))
            for n in range(1, rounds + 1):
                result.stalls.append(bench.rewrite(n, load))
                result.points.append(bench.point(f"rewritten {n}", runs))
            result.rates.append(bench.rates(10))
            bench.close()
    finally:
        fs.close()
    return result


def plot(points: list[Point], runs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for backend in sorted({p.backend for p in points}):
        mine = sorted((p for p in points if p.backend == backend), key=lambda p: p.extents)
        x = [p.extents for p in mine]
        lines = [("native", "native hot clone"), ("function", "function hot clone")]
        lines.append(
            ("snapshot", "bare subvolume snapshot")
            if backend == "btrfs"
            else ("cp", "bare cp --reflink")
        )
        for key, label in lines:
            ax.plot(x, [getattr(p, key) for p in mine], marker="o", label=f"{backend}: {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("extents in the data directory")
    ax.set_ylabel(f"seconds (median of {runs})")
    ax.set_title("clone time against fragmentation, XFS and btrfs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "clone-scale.png")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def report(result: Result, major: int, runs: int, rounds: int, load: int) -> list[str]:
    lines = [
        "## Clone time against size and fragmentation, XFS and btrfs (`make bench-scale`)",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; PostgreSQL "
        f"{major}; loop filesystems on sparse files; median of {runs} runs (pg_basebackup: one). "
        f"Each database is measured freshly loaded, then after each of {rounds} rounds of "
        f"{load} s of pgbench writes (2 clients) during which four native clones are taken. "
        "function: reflink_snapshot() in the server (cp --reflink); native: pg_backup_start/"
        "stop with the copy made by pg-reflinker (a subvolume snapshot on btrfs); floor: a bare "
        "`cp -a --reflink=always` of the data directory (XFS) or a bare subvolume snapshot "
        f"(btrfs). XFS carries the driver's default copy-on-write extent size hint "
        f"({DEFAULT_KIB} KiB).",
        "",
        "| backend | scale | stage | GiB | extents | function s | native s | bare cp s "
        "| snapshot s | pg_basebackup s | pg_basebackup / native | native / fresh |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fresh = {(p.backend, p.scale): p for p in result.points if p.stage == "fresh"}
    for p in result.points:
        base = fresh[(p.backend, p.scale)]
        lines.append(
            f"| {p.backend} | {p.scale} | {p.stage} | {p.size / 2**30:.2f} | {p.extents} | "
            f"{p.function:.3f} | {p.native:.3f} | {p.cp:.3f} | "
            f"{f'{p.snapshot:.3f}' if p.snapshot else '-'} | {p.basebackup:.2f} | "
            f"{ratio(p.basebackup, p.native)} | {ratio(p.native, base.native)} |"
        )
    lines += [
        "",
        "![clone time against extents](clone-scale.png)",
        "",
        "The stall a writer on the source sees while a native clone is taken:",
        "",
        "| backend | scale | round | slowest transaction during a clone ms "
        "| p99 of the others ms |",
        "|---|---|---|---|---|",
    ]
    for s in result.stalls:
        lines.append(
            f"| {s.backend} | {s.scale} | {s.round} | {s.during_max_ms:.0f} | "
            f"{s.others_p99_ms:.0f} |"
        )
    lines += [
        "",
        "pgbench throughput (10 s, 2 clients) on the source after the rounds and on a native "
        "clone of it, and what the clone's writes took from the filesystem:",
        "",
        "| backend | scale | tps source | tps clone | clone transactions | growth MiB "
        "| KiB per transaction |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.rates:
        lines.append(
            f"| {r.backend} | {r.scale} | {r.tps_source:.0f} | {r.tps_clone:.0f} | {r.clone_tx} | "
            f"{r.growth / MiB:.0f} | {r.growth / 1024 / max(r.clone_tx, 1):.1f} |"
        )
    lines += ["", *summary(result)]
    return lines


def summary(result: Result) -> list[str]:
    """The ratios that decide between the backends, one line each."""
    out = []
    for backend in sorted({p.backend for p in result.points}):
        mine = [p for p in result.points if p.backend == backend]
        largest = max(p.scale for p in mine)
        first = next(p for p in mine if p.scale == largest and p.stage == "fresh")
        last = [p for p in mine if p.scale == largest][-1]
        out.append(
            f"- {backend}, scale {largest}: native clone {last.stage} / fresh = "
            f"{ratio(last.native, first.native)} ({first.extents} -> {last.extents} extents); "
            f"function {ratio(last.function, first.function)}; pg_basebackup / native "
            f"{ratio(last.basebackup, last.native)} ({last.stage})."
        )
    by = {(r.backend, r.scale): r for r in result.rates}
    for (backend, scale), r in sorted(by.items()):
        if backend == "btrfs" and ("xfs", scale) in by:
            x = by[("xfs", scale)]
            out.append(
                f"- scale {scale}: tps btrfs / XFS = {ratio(r.tps_source, x.tps_source)} on the "
                f"source, {ratio(r.tps_clone, x.tps_clone)} on a clone; space per clone "
                f"transaction btrfs / XFS = "
                f"{ratio(r.growth / max(r.clone_tx, 1), x.growth / max(x.clone_tx, 1))}."
            )
    return out


def main() -> int:
    scales = [int(s) for s in os.environ.get("BENCH_SCALES", "50 200").split()]
    rounds = int(os.environ.get("BENCH_ROUNDS", "2"))
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    load = int(os.environ.get("BENCH_LOAD", "20"))
    backends = os.environ.get("BENCH_BACKENDS", "xfs btrfs").split()
    majors = pg_majors()
    major = int(os.environ.get("BENCH_MAJOR", max(majors)))
    if major not in majors:
        sys.exit(f"BENCH_MAJOR: no PostgreSQL {major} here (make pg-majors builds 17, 18)")
    result = Result()
    for kind in backends:
        one = run_backend(kind, majors[major], scales, rounds, runs, load)
        result.points += one.points
        result.stalls += one.stalls
        result.rates += one.rates
    lines = report(result, major, runs, rounds, load)
    print("\n".join(lines))
    plot(result.points, runs)
    write_section("scale", lines)
    print(f"wrote docs/benchmarks.md and {DOCS / 'clone-scale.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as failed:
        sys.exit(f"{failed}\n{failed.stderr or ''}")
