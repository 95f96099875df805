"""How the Kubernetes-mode processes are put together: which informers, which controllers, and
the objects the gRPC services call. cli.py serves them; the reconciler tests run the same
assembly in-process against a real API server."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from ..core.keys import COPY_COMPONENT, LABEL_NODE
from ..core.layout import Layout
from ..core.volumes import VolumeService
from ..disk.local import LocalDisk
from ..metrics import Metrics
from . import api
from .controller.captures import Captures
from .controller.cert_mirror import CertMirror
from .controller.cert_mirror import key_of as mirror_key
from .controller.claim_loop import ClaimLoop
from .controller.gate import SourceGate
from .controller.locator import KubeSourceLocator
from .controller.materializer import KubeMaterializer, NodeReports
from .controller.pv_annotator import PvAnnotator
from .events import EventRecorder
from .node.agent import NodeAgent, NodeSpace
from .registry import KubeRegistry
from .runtime import Controller, Informer, LeaderElector, Runner

CLAIM_LOOP_LEASE = "pg-reflinker-claim-loop"


@dataclass
class ControllerApp:
    volumes: VolumeService
    runner: Runner
    records: Informer
    claim_loop: ClaimLoop
    lease: LeaderElector
    reports: NodeReports
    informers: tuple[Informer, ...] = ()

    def ready(self) -> bool:
        """Probe's answer: every cache synced and fresh (a watch that went quiet without an
        error, or an API server unreachable for minutes, turns the liveness probe red)."""
        return self.records.synced.is_set() and all(i.fresh() for i in self.informers)


def end_process() -> None:
    """The controller's end when it lost its Lease: exit code 1 at once (kubelet starts it
    again, a follower now), so nothing the deposed leader had in hand goes on beside the new
    leader's work."""
    logging.shutdown()
    os._exit(1)


def controller(
    kube: api.Kube,
    settings: Config,
    metrics: Metrics,
    on_lost_lease: Callable[[], None] = end_process,
) -> ControllerApp:
    """The controller's loops, started: informers, the PV annotator, and on the Lease holder
    the claim loop and the sweep of records whose claim went away. on_lost_lease: what losing
    the Lease does (ends the process)."""
    layout = Layout(settings.hostpath_prefix)
    errors = metrics.reconcile_error
    records = Informer(kube, api.REFLINKVOLUMES, on_error=errors)
    pvs = Informer(kube, api.VOLUMES, on_error=errors)
    claims = Informer(kube, api.CLAIMS, on_error=errors)
    csinodes = Informer(kube, api.CSINODES, on_error=errors)
    nodes = Informer(kube, api.NODES, on_error=errors)
    registry = KubeRegistry(kube, records)
    reports = NodeReports(csinodes, nodes, settings.driver_name)
    captures = Captures(kube, registry, claims, settings.capture_wait_seconds)
    materializer = KubeMaterializer(
        registry,
        reports,
        layout,
        settings.pg_connect_timeout_seconds,
        settings.pg_statement_timeout_seconds,
        captures,
        claims,
        SourceGate(kube, settings.pod_namespace, settings.backup_mode_limit_seconds),
        settings.backup_mode_limit_seconds,
        EventRecorder(kube, COPY_COMPONENT),
        metrics,
    )
    locator = KubeSourceLocator(kube, pvs, layout, settings.driver_name, settings.target_root)
    volumes = VolumeService(layout, registry, locator, settings.node_id, materializer, metrics)

    runner = Runner()
    # On SIGTERM the Lease is kept while the claim loop's workers finish, within most of the
    # shutdown grace, then released; the rest is for the release itself.
    lease = LeaderElector(
        kube,
        settings.pod_namespace,
        CLAIM_LOOP_LEASE,
        hold_on_stop=settings.shutdown_grace_seconds * 0.8,
        on_lost=on_lost_lease,
    )
    annotate = Controller(
        "pv-annotator",
        PvAnnotator(kube, pvs, settings.driver_name).reconcile,
        workers=1,
        on_error=errors,
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
        settings.storage_classes,
        settings.namespace_path,
        settings.claim_wait(),
        errors,
        settings.claim_first_backoff_seconds,
    )
    claim_loop = Controller(
        "claim-loop",
        loop.reconcile,
        workers=settings.reconcile_workers,
        leader=lease,
        on_error=errors,
    )
    claim_loop.watch(claims, loop.keys_for_claim)
    claim_loop.reads(pvs, records)
    orphans = Controller("orphans", loop.reconcile_record, workers=1, leader=lease, on_error=errors)
    orphans.watch(records)
    orphans.watch(claims, loop.records_of_claim)
    orphans.reads(pvs)
    expiry = Controller("captures", captures.reconcile, workers=1, leader=lease, on_error=errors)
    expiry.watch(records)
    # Production's replication certificate and CA in its clone source's namespace: compared
    # every period, no watch (the controller may read secrets only by name).
    mirror = CertMirror(kube, settings.cert_mirror_period_seconds)
    mirrors = Controller("cert-mirror", mirror.reconcile, workers=1, leader=lease, on_error=errors)
    for entry in settings.cert_mirrors:
        mirrors.queue.add(mirror_key(*entry))
    for informer in (records, pvs, claims, csinodes, nodes):
        runner.start(informer.name, informer.run, informer.close, cache=True)
    runner.start("lease", lease.run)
    for each in (annotate, claim_loop, orphans, expiry, mirrors):
        runner.start(each.name, each.run)
    return ControllerApp(
        volumes, runner, records, loop, lease, reports, (records, pvs, claims, csinodes, nodes)
    )


@dataclass
class NodeApp:
    agent: NodeAgent
    runner: Runner
    records: Informer
    space: NodeSpace


def node(kube: api.Kube, settings: Config, disk: LocalDisk, metrics: Metrics) -> NodeApp:
    """The node plugin's loops, started: the node agent for this node's records, and the
    node's space (free-space report, each volume's own bytes, metrics)."""
    disk.layout.state_dir.mkdir(mode=0o700, exist_ok=True)
    disk.sweep()
    records = Informer(
        kube,
        api.REFLINKVOLUMES,
        selector=f"{LABEL_NODE}={settings.node_id}",
        on_error=metrics.reconcile_error,
    )
    registry = KubeRegistry(kube, records)
    agent = NodeAgent(registry, disk, settings.node_id, metrics, metrics.reconcile_error)
    agent_loop = Controller(
        "node-agent",
        agent.reconcile,
        workers=settings.reconcile_workers,
        on_error=metrics.reconcile_error,
    )
    agent_loop.watch(records)
    space = NodeSpace(
        kube,
        disk,
        registry,
        settings.node_id,
        agent.changed,
        metrics,
        period=settings.report_period_seconds,
        usage_interval=settings.usage_interval_seconds,
    )
    runner = Runner()
    runner.start(records.name, records.run, records.close, cache=True)
    runner.start("node-agent", agent_loop.run)
    runner.start("space", space.run)
    return NodeApp(agent, runner, records, space)
