"""`make demo`: pg-reflinker doing its job on one machine, step by step, with timings.

A PostgreSQL configured like a CloudNativePG instance runs on a pg-reflinker volume of a real
Kubernetes control plane; a PersistentVolumeClaim whose dataSource is that instance's PGDATA claim
becomes a consistent, bootable clone in about a second. Only kubelet and CNPG are played.

Settings: DEMO_SCALE (pgbench scale, default 70: about 1 GB), DEMO_KEEP=1 (keep everything
running at the end and print how to connect; Ctrl-C tears it down)."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
import uuid
from pathlib import Path

from tests.e2e.stack import NS, running_stack, start_cnpg
from tests.pgserver import boot_clone

HINTS = {
    "make an XFS reflink filesystem": "run as root; `losetup -f` must find a free loop device "
    "and mkfs.xfs must exist (make demo installs xfsprogs)",
    "start etcd": "the binaries in K8S_TOOLS (make k8s-tools); free loopback ports",
    "apply deploy/": "deploy/*.yaml must be valid for the API server (see the error above)",
    "start reflinker-csi": "the driver logs in the kept work directory (run with DEMO_KEEP=1)",
    "start PostgreSQL": "PostgreSQL server packages (make demo installs postgresql); the "
    "postgres user must be able to reach the work directory",
    "load pgbench data": "free space for the loop file; pgbench from postgresql-contrib",
    "create the clone claim": "csi-provisioner and controller logs; events of claim "
    "apps/pg-xyz-dev",
    "publish the clone": "the node plugin log; mount privileges",
}


class Story:
    def __init__(self) -> None:
        self.number = 0
        self.name = ""
        self.started = time.monotonic()
        self.t0 = self.started

    def step(self, name: str) -> None:
        self.finish()
        self.number += 1
        self.name = name
        self.started = time.monotonic()
        print(f"[{self.number:2}] {name} ...", flush=True)

    def finish(self) -> None:
        if self.name:
            print(f"     done in {time.monotonic() - self.started:.2f} s", flush=True)
            self.name = ""

    def hint(self) -> str:
        for prefix, hint in HINTS.items():
            if self.name.startswith(prefix):
                return hint
        return "the message above"


def main() -> int:
    tools = Path(os.environ.get("K8S_TOOLS", ""))
    scale = int(os.environ.get("DEMO_SCALE", "70"))
    keep = os.environ.get("DEMO_KEEP") == "1"
    disk = f"{max(8, scale * 15 * 6 // 1024 + 8)}G"
    story = Story()
    summary: list[str] = []
    try:
        with running_stack(tools, disk=disk, announce=story.step) as cluster:
            source = start_cnpg(
                cluster, scale=scale, announce=story.step, pgbench_output=sys.stdout
            )
            size = source.server.psql("SELECT pg_size_pretty(pg_database_size('app'))")
            source.server.psql("CHECKPOINT")
            print(f"     source database: {size}")

            story.step(f"create the clone claim {NS}/pg-xyz-dev (dataSource: {source.pvc})")
            started = time.monotonic()
            cluster.pvc("pg-xyz-dev", source=source.pvc, size="2Gi")
            pv = cluster.wait_bound("pg-xyz-dev", timeout=120)
            bound = time.monotonic() - started
            print(f"     Bound after {bound:.2f} s")
            hot = [
                line
                for line in cluster.log_tail("controller", 400).splitlines()
                if "hot clone taken" in line
            ]
            hot_seconds = hot[-1].rsplit("s=", 1)[-1].strip() if hot else "?"

            story.step("show the PersistentVolume")
            attrs = pv.spec.csi.volume_attributes
            terms = pv.spec.node_affinity.required.node_selector_terms
            print(f"     PV            {pv.metadata.name}")
            print(f"     GUID          {pv.spec.csi.volume_handle}")
            print(f"     node          {terms[0].match_expressions[0].values[0]}")
            print(f"     source claim  {attrs.get('pg-reflinker.csi/source-pvc')}")
            print(f"     source pod    {attrs.get('pg-reflinker.csi/source-pod')}")
            print(f"     claim         {attrs.get('pg-reflinker.csi/claim')}")
            print(f"     host path     {attrs.get('pg-reflinker.csi/host-path')}")

            story.step("publish the clone (as kubelet would) and boot PostgreSQL on it")
            target = cluster.publish(pv, str(uuid.uuid4()))
            clone = boot_clone(target, cluster.plane.work / "sock")

            story.step("count rows in the source and in the clone")
            tables = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers")
            rows = {
                t: (
                    source.server.psql(f"SELECT count(*) FROM {t}", db="app"),
                    clone.psql(f"SELECT count(*) FROM {t}", db="app"),
                )
                for t in tables
            }
            for table, (a, b) in rows.items():
                print(f"     {table:<18} source {a:>10}   clone {b:>10}")
            equal = all(a == b for a, b in rows.values())
            summary = [f"{t}: source {a} rows, clone {b} rows" for t, (a, b) in rows.items()] + [
                f"row counts {'equal' if equal else 'DIFFER'}; hot clone of {size} took "
                f"{hot_seconds} s, claim to Bound {bound:.2f} s"
            ]
            if keep:
                story.finish()
                print("\nEverything is still running. Connect with:")
                print(
                    f"  source: runuser -u postgres -- psql -h {source.server.socket_dir} "
                    f"-p {source.server.port} app"
                )
                print(
                    f"  clone:  runuser -u postgres -- psql -h {clone.socket_dir} "
                    f"-p {clone.port} app"
                )
                print(
                    f"  API:    KUBECONFIG={cluster.plane.admin_kubeconfig} "
                    "(insecure-skip-tls-verify)"
                )
                print("Press Ctrl-C to tear everything down.")
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
            story.step("tear everything down")
            clone.stop()
            cluster.unpublish(pv, target)
            source.server.stop("immediate")
            cluster.unpublish(source.pv, source.target)
        story.finish()
    except Exception as err:
        print(f"\ndemo failed at step {story.number} ({story.name}): {err}", file=sys.stderr)
        traceback.print_exc(limit=3)
        print(f"check: {story.hint()}", file=sys.stderr)
        return 1
    print(f"\ndemo finished in {time.monotonic() - story.t0:.1f} s")
    for line in summary:
        print(line)
    return 0 if summary and "equal" in summary[-1] else 1


if __name__ == "__main__":
    sys.exit(main())
