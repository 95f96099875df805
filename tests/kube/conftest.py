"""Reconciler tests: the Kubernetes-mode loops in-process against a real kube-apiserver and etcd
(no kubelet, no root, no loop devices), as TopoLVM's envtest tests do. `make unit` runs them."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest
import urllib3
import yaml

from reflinker_csi import DRIVER_NAME, TOPOLOGY_KEY, config
from reflinker_csi.core.keys import ANNOTATION_FREE_BYTES, ANNOTATION_REPORTED_AT
from reflinker_csi.core.layout import Layout
from reflinker_csi.disk.local import NO_FLOOR, LocalDisk
from reflinker_csi.kube import app
from reflinker_csi.kube.api import CSINODES, JSON, NODES, Kube, Resource
from reflinker_csi.metrics import Metrics
from tests.e2e.cluster import ControlPlane, reference_grant_crd
from tests.e2e.stack import wait_for

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False)
CRDS = Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False
)
T = TypeVar("T")


def tools_dir() -> Path:
    path = os.environ.get("K8S_TOOLS", "")
    if not path or not (Path(path) / "kube-apiserver").exists():
        pytest.skip("K8S_TOOLS is not set: run through `make unit` or `make test`")
    return Path(path)


@pytest.fixture(scope="session")
def plane() -> Iterator[ControlPlane]:
    urllib3.disable_warnings()
    with tempfile.TemporaryDirectory(prefix="pg-reflinker-unit.") as work:
        control = ControlPlane(tools_dir(), Path(work), controllers="")
        try:
            control.start()
            yield control
        finally:
            control.stop()


@pytest.fixture(scope="session")
def admin(plane: ControlPlane) -> Kube:
    kube = Kube(plane.api_client())
    # Ours, and the ReferenceGrant CRD the claim loop reads for cross-namespace consent.
    for path in (ROOT / "deploy" / "crd-reflinkvolume.yaml", reference_grant_crd(tools_dir())):
        crd = yaml.safe_load(path.read_text())
        kube.create(CRDS, crd)

        def established(name: str = crd["metadata"]["name"]) -> bool:
            value = kube.get(CRDS, name) or {}
            conditions = (value.get("status") or {}).get("conditions") or []  # type: ignore[union-attr]
            return any(
                c.get("type") == "Established" and c.get("status") == "True" for c in conditions
            )

        wait_for(f"the CRD {crd['metadata']['name']}", established)
    return kube


_counter = iter(range(1, 10_000))


@pytest.fixture
def namespace(admin: Kube) -> str:
    name = f"t{next(_counter)}"
    admin.create(NAMESPACES, {"metadata": {"name": name}})
    return name


def add_node(
    kube: Kube, name: str, free: int | None, plugin: bool = True, stale: bool = False
) -> None:
    """A Node as a kubelet registers it, the CSINode the registrar fills, and the free-space
    report the node plugin writes (free None: no report)."""
    annotations: dict[str, str] = {}
    if free is not None:
        at = datetime(2020, 1, 1, tzinfo=UTC) if stale else datetime.now(UTC)
        annotations = {
            ANNOTATION_FREE_BYTES: str(free),
            ANNOTATION_REPORTED_AT: at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    kube.create(NODES, {"metadata": {"name": name, "annotations": annotations}})
    drivers: list[JSON] = (
        [{"name": DRIVER_NAME, "nodeID": name, "topologyKeys": [TOPOLOGY_KEY]}] if plugin else []
    )
    kube.create(CSINODES, {"metadata": {"name": name}, "spec": {"drivers": drivers}})


@dataclass
class Mode:
    controller: app.ControllerApp
    prefix: Path
    node: str
    nodes: list[str]
    agent: app.NodeApp


@pytest.fixture
def mode(
    admin: Kube, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Mode]:
    """A controller and the node plugin of node `<namespace>-a` (in-process; the disk type and
    the free-space floor may be the test's parameter), with the claim loop waiting up to 30 s
    for a node agent, retrying a failing claim after 0.5 s at first (2 s in the product) and
    looking for sources in namespace `<namespace>-src` too."""
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    node = f"{namespace}-a"
    (tmp_path / "kubelet").mkdir()
    # As the processes read it, from an environment; then the product's waits shortened.
    env = {
        "HOSTPATH_PREFIX": str(prefix),
        "TARGET_ROOT": str(tmp_path / "kubelet"),
        "NODE_ID": node,
        "STORAGE_CLASS": "pg-reflinker,pg-reflinker-native",
        "NAMESPACE_PATH": f"{namespace}-src",
        "POD_NAMESPACE": namespace,
        "USAGE_INTERVAL": "1",
    }
    settings = dataclasses.replace(
        config.load(env, "node"),
        report_period_seconds=1.0,
        claim_wait_seconds=30.0,
        claim_first_backoff_seconds=0.5,
    )
    add_node(admin, node, None)
    floor = getattr(request, "param", {}).get("floor", NO_FLOOR)
    disk_type = getattr(request, "param", {}).get("disk", LocalDisk)
    agent = app.node(admin, settings, disk_type(Layout(prefix), floor=floor), Metrics())
    # In-process: losing the Lease must not end the test run (the product's process exits;
    # tests/e2e/test_claim_loop.py shows that on a real process).
    controller = app.controller(admin, settings, Metrics(), on_lost_lease=lambda: None)
    nodes = [node]
    try:
        wait_for(
            "the controller to see the node plugin's report",
            lambda: node in controller.reports.reports(),
        )
        yield Mode(controller, prefix, node, nodes, agent)
    finally:
        controller.runner.stop(10)
        agent.runner.stop(10)
        for name in nodes:
            admin.delete(NODES, name)
            admin.delete(CSINODES, name)
