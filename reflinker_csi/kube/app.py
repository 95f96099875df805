"""How the Kubernetes-mode processes are put together: which informers, which controllers, and
the objects the gRPC services call. cli.py serves them; the reconciler tests run the same
assembly in-process against a real API server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.keys import LABEL_NODE
from ..core.layout import Layout
from ..core.volumes import VolumeService
from ..disk.local import LocalDisk
from . import api
from .annotator import PvAnnotator
from .claims import ClaimLoop
from .locator import KubeSourceLocator
from .materializer import KubeMaterializer, NodeReports
from .node_agent import CapacityReporter, NodeAgent
from .registry import KubeRegistry
from .runtime import Controller, Informer, LeaderElector, Runner

CLAIM_LOOP_LEASE = "pg-reflinker-claim-loop"


@dataclass(frozen=True)
class Settings:
    driver_name: str
    node_id: str
    hostpath_prefix: Path
    target_root: Path
    storage_class: str
    namespace_path: tuple[str, ...]
    pod_namespace: str
    workers: int = 4
    pg_connect_timeout: float = 10.0
    pg_statement_timeout: float = 300.0
    claim_wait_seconds: float = 20.0
    report_period: float = 60.0


@dataclass
class ControllerApp:
    volumes: VolumeService
    runner: Runner
    records: Informer
    claim_loop: ClaimLoop
    lease: LeaderElector

    def ready(self) -> bool:
        return self.records.synced.is_set()


def controller(kube: api.Kube, settings: Settings) -> ControllerApp:
    """The controller's loops, started: informers, the PV annotator, and on the Lease holder
    the claim loop and the sweep of records whose claim went away."""
    layout = Layout(settings.hostpath_prefix)
    records = Informer(kube, api.REFLINKVOLUMES)
    pvs = Informer(kube, api.VOLUMES)
    claims = Informer(kube, api.CLAIMS)
    csinodes = Informer(kube, api.CSINODES)
    nodes = Informer(kube, api.NODES)
    registry = KubeRegistry(kube, records)
    materializer = KubeMaterializer(
        registry,
        NodeReports(csinodes, nodes, settings.driver_name),
        layout,
        settings.pg_connect_timeout,
        settings.pg_statement_timeout,
    )
    locator = KubeSourceLocator(kube, pvs, layout, settings.driver_name)
    volumes = VolumeService(layout, registry, locator, settings.node_id, materializer)

    runner = Runner()
    lease = LeaderElector(
        kube, settings.pod_namespace, CLAIM_LOOP_LEASE, on_lost=runner.stopping.set
    )
    annotate = Controller(
        "pv-annotator", PvAnnotator(kube, pvs, settings.driver_name).reconcile, workers=1
    )
    annotate.watch(pvs)
    loop = ClaimLoop(
        kube,
        volumes,
        claims,
        pvs,
        records,
        locator,
        layout,
        settings.driver_name,
        settings.storage_class,
        settings.namespace_path,
        settings.target_root,
        settings.claim_wait_seconds,
    )
    claim_loop = Controller("claim-loop", loop.reconcile, workers=settings.workers, leader=lease)
    claim_loop.watch(claims, loop.keys_for_claim)
    claim_loop.reads(pvs, records)
    orphans = Controller("orphans", loop.reconcile_record, workers=1, leader=lease)
    orphans.watch(records)
    orphans.watch(claims, loop.records_of_claim)
    orphans.reads(pvs)
    for informer in (records, pvs, claims, csinodes, nodes):
        runner.start(informer.name, informer.run, informer.close)
    runner.start("lease", lease.run)
    for each in (annotate, claim_loop, orphans):
        runner.start(each.name, each.run)
    return ControllerApp(volumes, runner, records, loop, lease)


@dataclass
class NodeApp:
    agent: NodeAgent
    runner: Runner
    records: Informer


def node(kube: api.Kube, settings: Settings, disk: LocalDisk) -> NodeApp:
    """The node plugin's loops, started: the node agent for this node's records and the
    free-space report on its Node."""
    disk.layout.state_dir.mkdir(mode=0o700, exist_ok=True)
    disk.sweep()
    records = Informer(kube, api.REFLINKVOLUMES, selector=f"{LABEL_NODE}={settings.node_id}")
    agent = NodeAgent(KubeRegistry(kube, records), disk, settings.node_id)
    agent_loop = Controller("node-agent", agent.reconcile, workers=settings.workers)
    agent_loop.watch(records)
    reporter = CapacityReporter(
        kube, disk, settings.node_id, agent.changed, period=settings.report_period
    )
    runner = Runner()
    runner.start(records.name, records.run, records.close)
    runner.start("node-agent", agent_loop.run)
    runner.start("capacity", reporter.run)
    return NodeApp(agent, runner, records)
