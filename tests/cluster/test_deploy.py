"""The chart as cluster admins install it (helm install with tests/e2e/values-test.yaml, which
changes only image names, pull policy, the prefix's host directory and captureWait), checked on
the real cluster: every value set's rendering is accepted by the real API server, every
container has requests and a memory limit, every probe answers on the endpoint it names, the
node plugin runs on a tainted database node, and the controller's replicas, priority, grace and
worker counts are what keep provisioning going through a lost node."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import urllib3

from tests.e2e.onenode import NODE, OneNodeCluster
from tests.tools import chart

DRIVER_NS = "pg-reflinker"
CONTROLLER = "app.kubernetes.io/name=pg-reflinker-controller"
NODE_PLUGIN = "app.kubernetes.io/name=pg-reflinker-node"
# CNPG's recommended taint for dedicated PostgreSQL nodes.
TAINT = "node-role.kubernetes.io/postgres=:NoSchedule"


def _pods(k8s: OneNodeCluster, selector: str, node: str = "") -> list[dict[str, Any]]:
    where = ["--field-selector", f"spec.nodeName={node}"] if node else []
    items = k8s.get("pods", "-n", DRIVER_NS, "-l", selector, *where)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def node_plugin(k8s: OneNodeCluster, node: str = NODE) -> dict[str, Any]:
    """The node plugin pod of one node (the DaemonSet runs one on every node, cordoned too)."""
    [pod] = _pods(k8s, NODE_PLUGIN, node)
    return pod


def _env(container: dict[str, Any], name: str) -> str:
    return next(str(e["value"]) for e in container.get("env", []) if e["name"] == name)


def _flag(container: dict[str, Any], name: str) -> str:
    return next(a.split("=", 1)[1] for a in container.get("args", []) if a.startswith(name + "="))


def _probe_urls(pod: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(container, kind, URL) of each HTTP probe, its named port resolved as kubelet does
    (against the container's own ports)."""
    ip = pod["status"]["podIP"]
    urls = []
    for container in pod["spec"]["containers"]:
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        for kind in ("livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            port = probe["httpGet"]["port"]
            port = ports[port] if isinstance(port, str) else port
            urls.append((container["name"], kind, f"http://{ip}:{port}{probe['httpGet']['path']}"))
    return urls


def _answers(url: str) -> int:
    return urllib3.request("GET", url, timeout=5, retries=False).status


def test_every_value_set_of_the_chart_is_accepted_by_the_api_server(k8s: OneNodeCluster) -> None:
    """helm template with the defaults and with each other value set (tests/tools/chart.py),
    applied as a server-side dry run: the real API server's validation and admission (the
    admission policies' CEL included) accept every object, over the installed release too."""
    made = []
    for namespace in ("storage", "ledger", "analytics"):
        if k8s.kubectl("get", "namespace", namespace, check=False).returncode != 0:
            k8s.kubectl("create", "namespace", namespace)
            made.append(namespace)
    try:
        for name, args in chart.VALUE_SETS.items():
            result = k8s.kubectl(
                "apply", "--dry-run=server", "-f", "-", input=chart.template(*args), check=False
            )
            assert result.returncode == 0, f"value set {name}: {result.stderr}"
            assert "created (server dry run)" in result.stdout or "configured" in result.stdout
    finally:
        for namespace in made:
            k8s.kubectl("delete", "namespace", namespace, "--wait=false")


def test_every_container_has_requests_a_memory_limit_and_probes_that_answer(
    k8s: OneNodeCluster,
) -> None:
    pods = _pods(k8s, CONTROLLER) + _pods(k8s, NODE_PLUGIN)
    nodes = k8s.get("nodes")["items"]
    assert len(_pods(k8s, CONTROLLER)) == 2 and len(_pods(k8s, NODE_PLUGIN)) == len(nodes)
    for pod in pods:
        for container in pod["spec"]["containers"]:
            resources = container.get("resources", {})
            where = f"{pod['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where
    probed = set()
    for pod in pods:
        for container, kind, url in _probe_urls(pod):
            assert _answers(url) == 200, (pod["metadata"]["name"], container, kind, url)
            probed.add((pod["metadata"]["labels"]["app.kubernetes.io/name"], container, kind))
    # The drivers are both live- and readiness-probed through livenessprobe; each sidecar that
    # has a health endpoint is live-probed on it.
    assert probed == {
        ("pg-reflinker-controller", "controller", "livenessProbe"),
        ("pg-reflinker-controller", "controller", "readinessProbe"),
        ("pg-reflinker-controller", "csi-provisioner", "livenessProbe"),
        ("pg-reflinker-controller", "csi-snapshotter", "livenessProbe"),
        ("pg-reflinker-node", "node", "livenessProbe"),
        ("pg-reflinker-node", "node", "readinessProbe"),
        ("pg-reflinker-node", "node-driver-registrar", "livenessProbe"),
    }


def test_the_controller_is_two_replicas_that_cannot_be_evicted_together_nor_starved(
    k8s: OneNodeCluster,
) -> None:
    [pdb] = k8s.get("pdb", "-n", DRIVER_NS)["items"]
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "pg-reflinker-controller"
    }
    assert pdb["status"]["expectedPods"] == 2 and pdb["status"]["disruptionsAllowed"] == 1
    for pod in _pods(k8s, CONTROLLER):
        spec = pod["spec"]
        assert spec["priorityClassName"] == "system-cluster-critical"
        containers = {c["name"]: c for c in spec["containers"]}
        controller = containers["controller"]
        # Every call the sidecars may have in flight at once, and Probe besides.
        sidecar_workers = int(_flag(containers["csi-provisioner"], "--worker-threads")) + int(
            _flag(containers["csi-snapshotter"], "--worker-threads")
        )
        assert int(_env(controller, "GRPC_WORKERS")) > sidecar_workers
        # SIGTERM's grace for calls and loops ends before kubelet's SIGKILL.
        assert spec["terminationGracePeriodSeconds"] > int(
            _env(controller, "SHUTDOWN_GRACE_SECONDS")
        )
    node = node_plugin(k8s)
    assert node["spec"]["priorityClassName"] == "system-node-critical"
    prefix = next(v for v in node["spec"]["volumes"] if v["name"] == "prefix")
    assert prefix["hostPath"]["type"] == "Directory"


def test_the_node_plugin_runs_on_a_node_tainted_for_databases(k8s: OneNodeCluster) -> None:
    """A new node plugin pod (as on a node that joins, or after an update) is scheduled and
    ready on a node tainted NoSchedule."""
    k8s.kubectl("taint", "node", NODE, TAINT)
    try:
        name = node_plugin(k8s)["metadata"]["name"]
        k8s.kubectl("delete", "pod", name, "-n", DRIVER_NS, "--wait=true", "--timeout=60s")
        k8s.wait_rollout("daemonset/pg-reflinker-node", DRIVER_NS)
        new = node_plugin(k8s)
        assert new["metadata"]["name"] != name
        ready = [c["status"] for c in new["status"]["conditions"] if c["type"] == "Ready"]
        assert ready == ["True"]
    finally:
        k8s.kubectl("taint", "node", NODE, TAINT.replace("=:", ":") + "-")


def container_cgroup(pod: dict[str, Any], container: str) -> Path:
    """The memory cgroup (cgroup v1) of a running container of pod."""
    status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == container)
    cid = status["containerID"].split("://")[-1]
    found = list(Path("/sys/fs/cgroup/memory").glob(f"**/pod{pod['metadata']['uid']}/{cid}"))
    assert found, f"no memory cgroup for {container} of {pod['metadata']['name']}"
    return found[0]


def container_pids(pod: dict[str, Any], container: str) -> list[int]:
    """The host PIDs of a running container's processes (for faults injected into them)."""
    return [int(p) for p in (container_cgroup(pod, container) / "cgroup.procs").read_text().split()]


def memory_peaks(k8s: OneNodeCluster) -> list[tuple[str, int, int]]:
    """(pod/container, highest memory use since it started, its limit) of every driver
    container, from its memory cgroup (cgroup v1: memory.max_usage_in_bytes)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    peaks = []
    for pod in _pods(k8s, CONTROLLER) + _pods(k8s, NODE_PLUGIN):
        limits = {c["name"]: c["resources"]["limits"]["memory"] for c in pod["spec"]["containers"]}
        for status in pod["status"]["containerStatuses"]:
            cgroup = container_cgroup(pod, status["name"])
            peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
            number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", limits[status["name"]]).groups()  # type: ignore[union-attr]
            where = f"{pod['metadata']['name']}/{status['name']}"
            peaks.append((where, peak, int(number) * units[unit]))
    return peaks
