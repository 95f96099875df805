"""CloudNativePG on the real cluster: apply the example manifests, wait for health, run SQL and
pgbench inside the instance pods (as the postgres user, through `kubectl exec`)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from typing import Any

import yaml

from tests.conftest import ROOT
from tests.e2e.onenode import OneNodeCluster

EXAMPLES = ROOT / "deploy" / "examples"
FUNCTION_SQL = ROOT / "deploy" / "postgres" / "reflink_snapshot.sql"
NS = "apps"
# docs/install.md#enable-a-namespace-as-a-source, without the leading `kubectl`.
ENABLE_SOURCE = (
    "create rolebinding pg-reflinker-source -n {ns} --clusterrole=pg-reflinker-source "
    "--serviceaccount=pg-reflinker:pg-reflinker-controller"
)


def example(name: str, **changes: Any) -> dict[str, Any]:
    """A manifest from deploy/examples, with top-level metadata/spec changes for a scenario."""
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        doc[section][field] = value
    return doc


def ensure_namespace(k8s: OneNodeCluster, ns: str = NS) -> None:
    """The namespace, enabled as a source of clones the way docs/install.md says."""
    if k8s.kubectl("get", "namespace", ns, check=False).returncode != 0:
        k8s.kubectl("create", "namespace", ns)
    if k8s.kubectl("get", "rolebinding", "-n", ns, "pg-reflinker-source", check=False).returncode:
        k8s.kubectl(*ENABLE_SOURCE.format(ns=ns).split())
        k8s.wait(f"service account default in {ns}", lambda: _has_default_sa(k8s, ns), 60)


def _has_default_sa(k8s: OneNodeCluster, ns: str) -> bool:
    return k8s.kubectl("get", "serviceaccount", "default", "-n", ns, check=False).returncode == 0


def install_function_configmap(k8s: OneNodeCluster, ns: str = NS) -> None:
    """What docs/cloning-cnpg.md tells users to run before creating the source cluster."""
    if k8s.kubectl("get", "configmap", "pg-reflinker-snapshot", "-n", ns, check=False).returncode:
        k8s.kubectl(
            "create",
            "configmap",
            "pg-reflinker-snapshot",
            "-n",
            ns,
            f"--from-file=reflink_snapshot.sql={FUNCTION_SQL}",
        )


def cluster_status(k8s: OneNodeCluster, name: str, ns: str = NS) -> dict[str, Any]:
    result = k8s.kubectl(
        "get", "cluster.postgresql.cnpg.io", name, "-n", ns, "-o", "json", check=False
    )
    if result.returncode != 0:
        return {}
    status: dict[str, Any] = json.loads(result.stdout).get("status", {})
    return status


def wait_healthy(k8s: OneNodeCluster, name: str, ns: str = NS, timeout: float = 240) -> float:
    """Seconds until the Cluster reports a healthy state with all its instances ready."""
    start = time.monotonic()

    def healthy() -> bool:
        status = cluster_status(k8s, name, ns)
        return (
            status.get("phase") == "Cluster in healthy state"
            and status.get("readyInstances", 0) >= 1
            and status.get("readyInstances") == status.get("instances")
        )

    try:
        k8s.wait(f"Cluster {ns}/{name} healthy", healthy, timeout)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnose(k8s, name, ns)}") from None
    return time.monotonic() - start


def diagnose(k8s: OneNodeCluster, name: str, ns: str = NS) -> str:
    parts = [
        f"status: {cluster_status(k8s, name, ns)}",
        k8s.kubectl("get", "pods,pvc", "-n", ns, "-o", "wide", check=False).stdout,
        k8s.kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp", check=False).stdout[
            -3000:
        ],
        "--- instance ---",
        k8s.pod_logs(ns, f"cnpg.io/cluster={name}")[-3000:],
        "--- pg-reflinker controller ---",
        k8s.pod_logs(
            "pg-reflinker", "app.kubernetes.io/name=pg-reflinker-controller", "controller"
        )[-3000:],
        "--- pg-reflinker node ---",
        k8s.pod_logs("pg-reflinker", "app.kubernetes.io/name=pg-reflinker-node", "node")[-2000:],
    ]
    return "\n".join(parts)


def primary_pod(k8s: OneNodeCluster, name: str, ns: str = NS) -> str:
    pod = cluster_status(k8s, name, ns).get("currentPrimary", "")
    assert pod, f"Cluster {ns}/{name} has no primary"
    return str(pod)


def exec_postgres(
    k8s: OneNodeCluster, pod: str, *command: str, ns: str = NS, timeout: float = 300
) -> str:
    """Run `command` in the instance's postgres container (as the postgres user): its standard
    output, or an AssertionError naming the command, the pod and what it printed."""
    result = k8s.kubectl(
        "exec", "-n", ns, pod, "-c", "postgres", "--", *command, check=False, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{command[0]} in {ns}/{pod} failed: {result.stdout[-2000:]}{result.stderr}"
        )
    return result.stdout


def psql(k8s: OneNodeCluster, pod: str, sql: str, db: str = "app", ns: str = NS) -> str:
    return exec_postgres(
        k8s, pod, "psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", db, "-tAc", sql, ns=ns
    ).strip()


def pgbench(k8s: OneNodeCluster, pod: str, *args: str, ns: str = NS) -> str:
    return exec_postgres(k8s, pod, "pgbench", *args, "app", ns=ns, timeout=900)


def pgbench_background(
    k8s: OneNodeCluster, pod: str, seconds: int, ns: str = NS, script: str = ""
) -> subprocess.Popen[str]:
    """A bounded pgbench run (it stops by itself after `seconds`): pgbench's own transactions,
    or `script` (a custom script, read from standard input)."""
    custom = ["-f", "-"] if script else []
    run = subprocess.Popen(
        [
            str(k8s.bin / "kubectl"),
            f"--kubeconfig={k8s.kubeconfig}",
            "exec",
            *(["-i"] if script else []),
            "-n",
            ns,
            pod,
            "-c",
            "postgres",
            "--",
            "pgbench",
            *custom,
            "-c",
            "2",
            "-T",
            str(seconds),
            "-n",
            "app",
        ],
        stdin=subprocess.PIPE if script else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if script:
        assert run.stdin is not None
        run.stdin.write(script)
        run.stdin.close()
        run.stdin = None  # communicate() later has nothing to send
    return run


def pgbench_sums(k8s: OneNodeCluster, pod: str, ns: str = NS) -> set[str]:
    """pgbench's invariant: every transaction adds the same delta to an account, its teller,
    its branch and the history, so the four sums are equal in any consistent copy."""
    sums = psql(
        k8s,
        pod,
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts) || ',' ||"
        " (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers) || ',' ||"
        " (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches) || ',' ||"
        " (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
        ns=ns,
    )
    return set(sums.split(","))


def amcheck(k8s: OneNodeCluster, pod: str, ns: str = NS, standby: bool = False) -> None:
    """pg_amcheck --heapallindexed over every table and index of database app. On a standby
    (read-only) the extension must already be there: run it on the primary first."""
    exec_postgres(
        k8s,
        pod,
        "pg_amcheck",
        "--heapallindexed",
        *([] if standby else ["--install-missing"]),
        "-d",
        "app",
        ns=ns,
        timeout=600,
    )


def delete_cluster(k8s: OneNodeCluster, name: str, ns: str = NS) -> None:
    k8s.kubectl(
        "delete",
        "cluster.postgresql.cnpg.io",
        name,
        "-n",
        ns,
        "--wait=true",
        "--timeout=120s",
        timeout=150,
    )


def hot_clone_seconds(k8s: OneNodeCluster, guid: str) -> float | None:
    """How long the hot clone of volume `guid` (or of the capture it was cut from) took, from
    the controller's log line."""
    entry = hot_clone_taken(k8s, guid)
    return float(entry["s"]) if entry else None


def hot_clone_taken(k8s: OneNodeCluster, guid: str) -> dict[str, Any] | None:
    """The controller's log line on the hot clone of volume `guid` (or of the capture it was
    cut from): its method ("function", "native") and seconds ("s")."""
    record = k8s.kubectl(
        "get", "reflinkvolumes", "-l", f"pg-reflinker.csi/guid={guid}", "-o", "json", check=False
    ).stdout
    with contextlib.suppress(ValueError, IndexError, KeyError):
        guid = json.loads(record)["items"][0]["spec"].get("capture") or guid
    # Both replicas' logs: the clone ran on whichever led csi-provisioner or the claim loop.
    logs = k8s.kubectl(
        "logs",
        "-n",
        "pg-reflinker",
        "-l",
        "app.kubernetes.io/name=pg-reflinker-controller",
        "-c",
        "controller",
        "--tail=2000",
        check=False,
    ).stdout
    for line in reversed(logs.splitlines()):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("msg") == "hot clone taken" and entry.get("guid") == guid:
                return dict(entry)
    return None


def volume_handle(k8s: OneNodeCluster, claim: str, ns: str = NS) -> str:
    pvc = k8s.get("pvc", claim, "-n", ns)
    pv = k8s.get("pv", pvc["spec"]["volumeName"])
    return str(pv["spec"]["csi"]["volumeHandle"])


def node_of_claim(k8s: OneNodeCluster, claim: str, ns: str = NS) -> str:
    """The node a claim's volume lives on (its PV's node affinity, from the CSI topology)."""
    pvc = k8s.get("pvc", claim, "-n", ns)
    assert pvc["status"]["phase"] == "Bound", f"claim {ns}/{claim} is {pvc['status']['phase']}"
    pv = k8s.get("pv", pvc["spec"]["volumeName"])
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    (node,) = terms[0]["matchExpressions"][0]["values"]
    return str(node)


def instance_nodes(k8s: OneNodeCluster, name: str, ns: str = NS) -> dict[str, str]:
    """Each instance pod of the Cluster and the node it runs on."""
    pods = k8s.get("pods", "-n", ns, "-l", f"cnpg.io/cluster={name},cnpg.io/podRole=instance")
    return {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in pods["items"]}
