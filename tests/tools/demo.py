"""`make demo`: pg-reflinker doing its job on one machine, step by step, with timings.

A real one-node Kubernetes cluster (kubelet, containerd, the control plane), pg-reflinker from
deploy/ with the image built from the Dockerfile, and the real CloudNativePG operator: a CNPG
Cluster on a pg-reflinker volume with about 1 GB of pgbench data, then a second Cluster made
from the running first one (deploy/examples/clone-cluster.yaml), row counts side by side.

Settings: DEMO_SCALE (pgbench scale, default 70: about 1 GB), DEMO_KEEP=1 (keep everything
running at the end and print how to connect; Ctrl-C or SIGTERM tears it down), DEMO_FS=btrfs
(HOSTPATH_PREFIX on btrfs instead of XFS: volumes are subvolumes, cloneMethod auto takes the
native method there, and the clone is a subvolume snapshot).

Ctrl-C (SIGINT) or SIGTERM at any step ends the demo the same way: everything is torn down and
the host restored; a second signal during the teardown is ignored so that it can finish."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path

from reflinker_csi.disk.subvolume import is_subvolume
from tests.cluster import cnpg
from tests.e2e.onenode import PREFIX, running_cluster

FILESYSTEMS = ("xfs", "btrfs")  # DEMO_FS: what HOSTPATH_PREFIX is on

HINTS = {
    "build image": "buildah and debootstrap (make demo installs them); the Debian mirror in "
    "/etc/apt must be reachable",
    "start containerd": "containerd and runc (make demo installs them); /run/pg-reflinker-test",
    "start etcd": "the binaries in K8S_TOOLS (make k8s-tools); free ports",
    "start kubelet": "kubelet.log in the kept work directory (DEMO_KEEP=1)",
    "apply deploy/": "kubectl -n pg-reflinker get pods; the node plugin's and controller's logs",
    "install the CloudNativePG": "kubectl -n cnpg-system get pods; the operator's log",
    "create the source": "kubectl -n apps get cluster,pods,pvc; events of namespace apps",
    "load pgbench": "free space on the loop filesystem",
    "create the clone": "kubectl -n apps describe pvc pg-prod-dev-1; the controller's log",
}


class Stopped(Exception):
    """A signal asked the demo to stop; raised in the main thread wherever it is."""


def _stop(signum: int, _frame: object) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


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
    k8s_tools = Path(os.environ.get("K8S_TOOLS", ""))
    cnpg_tools = Path(os.environ.get("CNPG_TOOLS", ""))
    scale = int(os.environ.get("DEMO_SCALE", "70"))
    keep = os.environ.get("DEMO_KEEP") == "1"
    filesystem = os.environ.get("DEMO_FS", "xfs")
    if filesystem not in FILESYSTEMS:
        print(f"DEMO_FS={filesystem}: choose one of {', '.join(FILESYSTEMS)}", file=sys.stderr)
        return 2
    disk = f"{max(16, scale * 15 * 4 // 1024 + 16)}G"
    size = f"{max(4, scale * 15 * 2 // 1024 + 4)}Gi"
    story = Story()
    summary: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        with running_cluster(
            k8s_tools,
            cnpg_tools,
            disk=disk,
            announce=story.step,
            filesystem=filesystem,
        ) as k8s:
            story.step("create the source: CNPG Cluster apps/pg-prod on StorageClass pg-reflinker")
            cnpg.ensure_namespace(k8s)
            cnpg.install_function_configmap(k8s)
            source_doc = cnpg.example("source-cluster.yaml")
            source_doc["spec"]["storage"]["size"] = size
            k8s.apply(source_doc)
            cnpg.wait_healthy(k8s, "pg-prod", timeout=300)
            source = cnpg.primary_pod(k8s, "pg-prod")

            story.step(f"load pgbench data into pg-prod, scale {scale} (about {scale * 15} MB)")
            cnpg.pgbench(k8s, source, "-i", "-s", str(scale), "-q")
            db_size = cnpg.psql(k8s, source, "SELECT pg_size_pretty(pg_database_size('app'))")
            version = cnpg.psql(k8s, source, "SHOW server_version")
            print(f"     source database: {db_size}, PostgreSQL {version}")

            story.step("create the clone: CNPG Cluster apps/pg-prod-dev from claim pg-prod-1")
            clone_doc = cnpg.example("clone-cluster.yaml")
            clone_doc["spec"]["storage"]["size"] = size
            started = time.monotonic()
            k8s.apply(clone_doc)
            cnpg.wait_healthy(k8s, "pg-prod-dev", timeout=300)
            ready = time.monotonic() - started
            clone = cnpg.primary_pod(k8s, "pg-prod-dev")
            taken = cnpg.hot_clone_taken(k8s, cnpg.volume_handle(k8s, clone)) or {}
            hot = float(taken["s"]) if "s" in taken else None
            print(f"     Cluster pg-prod-dev healthy {ready:.1f} s after apply")
            volume = PREFIX / cnpg.volume_handle(k8s, clone)
            kind = "a btrfs subvolume" if is_subvolume(volume) else "a directory"
            print(
                f"     the clone's volume is {kind} on {filesystem} ({volume}), copied by the "
                f"{taken.get('method', '?')} method"
            )

            story.step("show what Kubernetes has")
            print(
                k8s.kubectl(
                    "get", "cluster,pvc,pv,reflinkvolumes", "-n", "apps", "-o", "wide"
                ).stdout
            )

            story.step("count rows in the source and in the clone")
            tables = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers")
            rows = {
                t: (
                    cnpg.psql(k8s, source, f"SELECT count(*) FROM {t}"),
                    cnpg.psql(k8s, clone, f"SELECT count(*) FROM {t}"),
                )
                for t in tables
            }
            versions = (version, cnpg.psql(k8s, clone, "SHOW server_version"))
            print(f"     {'PostgreSQL':<18} source {versions[0]:>10}   clone {versions[1]:>10}")
            for table, (a, b) in rows.items():
                print(f"     {table:<18} source {a:>10}   clone {b:>10}")
            equal = all(a == b for a, b in rows.values())
            hot_text = f"{hot:.2f} s" if hot is not None else "(not in the log)"
            summary = [f"{t}: source {a} rows, clone {b} rows" for t, (a, b) in rows.items()] + [
                f"row counts {'equal' if equal else 'DIFFER'}; hot clone of {db_size} took "
                f"{hot_text}; new Cluster healthy {ready:.1f} s after apply"
            ]
            if keep:
                story.finish()
                print("\nEverything is still running. Try:")
                print(f"  {k8s.bin / 'kubectl'} --kubeconfig={k8s.kubeconfig} get pods -A")
                print(
                    f"  {k8s.bin / 'kubectl'} --kubeconfig={k8s.kubeconfig} exec -it -n apps "
                    f"{clone} -c postgres -- psql app"
                )
                print("Press Ctrl-C (or send SIGTERM) to tear everything down.", flush=True)
                while True:
                    signal.pause()
            story.step("tear everything down and restore the host")
        story.finish()
    except Stopped as stop:
        print(f"\n{stop} received at step {story.number} ({story.name}): torn down, host restored")
        if not (keep and summary):
            return 130
    except Exception as err:
        print(f"\ndemo failed at step {story.number} ({story.name}): {err}", file=sys.stderr)
        traceback.print_exc(limit=3)
        print(f"check: {story.hint()}", file=sys.stderr)
        return 1
    print(f"\ndemo finished in {time.monotonic() - story.t0:.1f} s", flush=True)
    for line in summary:
        print(line)
    return 0 if summary and "equal" in summary[-1] else 1


if __name__ == "__main__":
    sys.exit(main())
