"""Benchmark: the controller at many claims and records, on a real API server (etcd and
kube-apiserver of `make k8s-tools`; no nodes, no pods: what grows is what the controller caches
and looks at, not what it copies).

BENCH_OBJECTS claims (default 10,000) in one namespace and as many ReflinkVolumes, each made for
one of those claims (the orphan sweep looks a claim's records up on every claim event). Then the
controller process (`reflinker-csi controller`, as deployed) is started, twice (the second a
restart with everything in place): printed per start, the seconds until its Probe answers ready
(every cache listed), its resident memory once settled and at its peak, and how long one lookup
of a claim's records takes through the index against a scan of every record (what the sweep did
per claim event before).

Run as root: make bench-scale-kube [BENCH_OBJECTS=10000]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import urllib3
import yaml

from csi import csi_pb2, csi_pb2_grpc
from reflinker_csi.kube.api import CLAIMS, REFLINKVOLUMES, Kube, Resource
from reflinker_csi.kube.controller.claim_loop import BY_CLAIM
from reflinker_csi.kube.reflinkvolume import claim_of, record_of
from reflinker_csi.kube.runtime import Informer, Runner
from tests.bench.report import write_section
from tests.e2e.cluster import ControlPlane, reference_grant_crd

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False)
CRDS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False
)
NS = "scale"
MiB = 1 << 20


def established(kube: Kube, name: str) -> bool:
    value = kube.get(CRDS, name) or {}
    conditions = (value.get("status") or {}).get("conditions") or []  # type: ignore[union-attr]
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def fill(kube: Kube, count: int) -> float:
    """count claims and as many records, each made for one claim; the seconds it took."""
    began = time.monotonic()

    def claim(i: int) -> str:
        made = kube.create(
            CLAIMS,
            {
                "metadata": {"name": f"claim-{i}"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "elsewhere",
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
            NS,
        )
        return str(made["metadata"]["uid"])  # type: ignore[index]

    def record(i: int, uid: str) -> None:
        # As the claim loop names the record of the claim it clones (so the orphan sweep
        # finds it still wanted and keeps it).
        name = f"claim-{uid}"
        guid = str(uuid.uuid4())
        kube.create(
            REFLINKVOLUMES,
            {
                "apiVersion": "pg-reflinker.csi/v1alpha1",
                "kind": "ReflinkVolume",
                "metadata": {"name": name, "labels": {"pg-reflinker.csi/guid": guid}},
                "spec": {
                    "guid": guid,
                    "requestName": name,
                    "kind": "volume",
                    "nodeName": "node-a",
                    "requiredBytes": 1 << 30,
                    "limitBytes": 0,
                    "parameters": {},
                    "context": {"pg-reflinker.csi/claim": f"{NS}/claim-{i}"},
                    "sourceVolume": "",
                    "sourceSnapshot": "",
                    "cloneMode": "hot",
                    "source": f"templates/pg-{i}",
                    "claim": f"{NS}/claim-{i}",
                },
            },
        )

    with ThreadPoolExecutor(16) as pool:
        uids = list(pool.map(claim, range(count)))
        list(pool.map(record, range(count), uids))
    return time.monotonic() - began


def memory(pid: int) -> tuple[int, int]:
    """(resident, peak resident) bytes of process pid."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def start_controller(plane: ControlPlane, work: Path) -> tuple[float, int, int]:
    """The controller process until its Probe answers ready: (seconds, resident bytes once
    settled, peak resident bytes); stopped afterwards."""
    socket = work / f"controller-{uuid.uuid4().hex[:6]}.sock"
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "KUBECONFIG": str(plane.admin_kubeconfig),
        "HOSTPATH_PREFIX": "/var/lib/pg-reflinker",
        "CSI_ENDPOINT": f"unix://{socket}",
        "POD_NAMESPACE": "pg-reflinker",
        "NODE_ID": "controller",
        "LOG_LEVEL": "warning",
    }
    began = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "reflinker_csi.cli", "controller"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        while not socket.exists():
            if process.poll() is not None or time.monotonic() - began > 600:
                raise RuntimeError("the controller did not start")
            time.sleep(0.05)
        identity = csi_pb2_grpc.IdentityStub(grpc.insecure_channel(f"unix://{socket}"))
        while True:
            answer = identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
            if answer.HasField("ready") and answer.ready.value:
                break
            if time.monotonic() - began > 600:
                raise RuntimeError("the controller's caches were not ready in 600 s")
            time.sleep(0.1)
        ready = time.monotonic() - began
        time.sleep(20)  # the sweep's first pass over every record, the handlers' resync
        resident, peak = memory(process.pid)
        return ready, resident, peak
    finally:
        process.terminate()
        process.wait(60)


def lookups(kube: Kube, count: int) -> tuple[float, float]:
    """Median microseconds of one claim's records: through the index, and by scanning (and
    parsing) every record as the sweep did on each claim event."""
    records = Informer(kube, REFLINKVOLUMES)
    records.index(BY_CLAIM, claim_of)
    runner = Runner()
    runner.start("records", records.run, records.close, cache=True)
    try:
        records.synced.wait(300)
        assert len(records.items()) >= count, f"{len(records.items())} records cached"
        keys = [f"{NS}/claim-{i}" for i in range(0, count, max(1, count // 200))]
        indexed, scanned = [], []
        for key in keys:
            t = time.perf_counter()
            records.by_index(BY_CLAIM, key)
            indexed.append(time.perf_counter() - t)
        for key in keys[:20]:
            t = time.perf_counter()
            [
                v
                for v in records.items()
                if record_of(v).context.get("pg-reflinker.csi/claim") == key
            ]
            scanned.append(time.perf_counter() - t)
        return statistics.median(indexed) * 1e6, statistics.median(scanned) * 1e6
    finally:
        runner.stop(10)


def main() -> int:
    count = int(os.environ.get("BENCH_OBJECTS", "10000"))
    tools = Path(os.environ["K8S_TOOLS"])
    urllib3.disable_warnings()
    with tempfile.TemporaryDirectory(prefix="pg-reflinker-bench.") as tmp:
        work = Path(tmp)
        plane = ControlPlane(tools, work, controllers="")
        plane.start()
        try:
            kube = Kube(plane.api_client())
            for path in (ROOT / "deploy" / "crd-reflinkvolume.yaml", reference_grant_crd(tools)):
                crd = yaml.safe_load(path.read_text())
                kube.create(CRDS, crd)
                while not established(kube, crd["metadata"]["name"]):
                    time.sleep(0.2)
            for ns in (NS, "pg-reflinker"):
                kube.create(NAMESPACES, {"metadata": {"name": ns}})
            filled = fill(kube, count)
            print(f"{count} claims and {count} records created in {filled:.0f} s", flush=True)
            first = start_controller(plane, work)
            again = start_controller(plane, work)
            indexed, scanned = lookups(kube, count)
        finally:
            plane.stop()
    limit = 384 * MiB  # charts/pg-reflinker/values.yaml: controller.resources.limits.memory
    lines = [
        "## The controller at scale (`make bench-scale-kube`)",
        "",
        f"A real API server holding {count:,} claims and {count:,} ReflinkVolumes (one per "
        "claim); the controller process started on it, then restarted. "
        f"Python {sys.version.split()[0]}.",
        "",
        "| start | caches ready | resident, settled | resident, peak | chart limit |",
        "|---|---|---|---|---|",
    ]
    for name, (ready, resident, peak) in (("first", first), ("restart", again)):
        lines.append(
            f"| {name} | {ready:.1f} s | {resident / MiB:.0f} MiB | {peak / MiB:.0f} MiB | "
            f"{limit / MiB:.0f} MiB |"
        )
    lines += [
        "",
        f"One claim's records: {indexed:.1f} µs through the index, {scanned / 1000:.1f} ms by "
        f"parsing every record (the orphan sweep's cost per claim event before the index; "
        f"{scanned / max(indexed, 0.001):,.0f} times as long).",
    ]
    print("\n".join(lines))
    write_section("bench-scale-kube", lines)
    return 0 if max(first[2], again[2]) < limit else 1


if __name__ == "__main__":
    sys.exit(main())
