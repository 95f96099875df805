"""The reflinker-csi command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import grpc

from csi import csi_pb2_grpc

from . import __version__, config, logs
from .core.errors import ReflinkerError
from .core.layout import STATE_DIR_NAME, Layout, new_guid, require_guid
from .core.locator import SourceServer
from .core.volumes import VolumeService
from .disk.backup import LocalCopier
from .disk.local import LocalDisk
from .disk.publish import Publisher
from .kube import api as kube_api
from .kube import app
from .kube.node.agent import require_reflink_prefix
from .kube.review import TokenAuthorizer
from .kube.runtime import Runner
from .metrics import Metrics
from .pg.backup import native_hot_clone
from .pg.source import hot_clone
from .rpc.controller import ControllerServicer
from .rpc.identity import IdentityServicer, prefix_usable
from .rpc.node import NodeServicer
from .rpc.server import EndpointInUse, start_server
from .standalone.locator import LocalSourceLocator
from .standalone.materializer import LocalMaterializer
from .standalone.registry import FileRegistry

log = logging.getLogger("reflinker_csi")


def _fail(message: str, code: int) -> int:
    print(f"reflinker-csi: {message}", file=sys.stderr)
    return code


def _serve(
    cfg: config.Config,
    mode: str,
    register: list[Callable[[grpc.Server], None]],
    runner: Runner | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then stop the gRPC server and join every loop."""
    server = start_server(cfg.endpoint, cfg.grpc_workers, register)
    log.info(
        "serving",
        extra={
            "fields": {
                "mode": mode,
                "endpoint": str(cfg.endpoint),
                "node": cfg.node_id,
                "prefix": str(cfg.hostpath_prefix),
                "version": __version__,
            }
        },
    )
    failed = runner.stopping if runner is not None else threading.Event()
    asked = threading.Event()
    reason: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        reason.append(signal.Signals(signum).name)
        asked.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not asked.wait(1.0) and not failed.is_set():
        pass
    log.info(
        "stopping",
        extra={
            "fields": {
                "signal": reason[0] if reason else "a loop failed",
                "grace_s": cfg.shutdown_grace_seconds,
            }
        },
    )
    # No new calls; those in flight finish first, while the caches they wait on (a native
    # clone waits for the node's answers on its record) and the other loops still run; then
    # the loops stop, the caches last. All within the grace (the pod's
    # terminationGracePeriodSeconds leaves a margin above it); a call still running then
    # ends with the process, and its backup session with it (the server ends the backup).
    deadline = time.monotonic() + cfg.shutdown_grace_seconds
    stopped = server.stop(cfg.shutdown_grace_seconds)
    stopped.wait(max(0.0, deadline - time.monotonic()) * 0.8)
    if runner is not None:
        runner.stop(max(1.0, deadline - time.monotonic()))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cfg.endpoint)
    log.info("stopped")
    return 0 if reason else 1


def run_standalone(cfg: config.Config) -> int:
    """Identity + Controller + Node on one socket, state in a file registry under the prefix."""
    layout = Layout(cfg.hostpath_prefix)
    layout.state_dir.mkdir(mode=0o700, exist_ok=True)
    registry = FileRegistry(layout.state_dir)
    disk = LocalDisk(layout, floor=cfg.free_space_floor)
    disk.apply_cow_extent_size(cfg.cow_extent_size)
    materializer = LocalMaterializer(disk, registry, cfg.node_id)
    materializer.recover()
    metrics = Metrics()
    metrics.serve(cfg.metrics_port)
    volumes = VolumeService(
        layout, registry, LocalSourceLocator(layout), cfg.node_id, materializer, metrics
    )
    identity = IdentityServicer(cfg.driver_name, prefix_usable(str(layout.prefix)), controller=True)
    controller = ControllerServicer(volumes)
    node = NodeServicer(Publisher(layout, cfg.target_root), cfg.node_id)
    try:
        return _serve(
            cfg,
            "standalone",
            [
                lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
                lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
                lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
            ],
        )
    finally:
        registry.close()


def _metrics_readers(cfg: config.Config, kube: kube_api.Kube) -> TokenAuthorizer | None:
    return TokenAuthorizer(kube) if cfg.metrics_auth == "kubernetes" else None


def run_controller(cfg: config.Config) -> int:
    """Kubernetes: Identity + Controller beside csi-provisioner; records are ReflinkVolumes;
    the loops of kube/app.py on the reconcile runtime."""
    metrics = Metrics()
    kube = kube_api.connect()
    started = app.controller(kube, cfg, metrics)
    metrics.serve(cfg.metrics_port, _metrics_readers(cfg, kube))
    identity = IdentityServicer(cfg.driver_name, started.ready, controller=True)
    controller = ControllerServicer(started.volumes)
    return _serve(
        cfg,
        "controller",
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
        ],
        started.runner,
    )


def run_node(cfg: config.Config) -> int:
    """Kubernetes: Identity + Node on each node; the node agent and the free-space report."""
    layout = Layout(cfg.hostpath_prefix)
    metrics = Metrics()
    disk = LocalDisk(layout, (cfg.target_root,), cfg.free_space_floor)
    disk.apply_cow_extent_size(cfg.cow_extent_size)
    kube = kube_api.connect()
    require_reflink_prefix(kube, disk, cfg.node_id)
    started = app.node(kube, cfg, disk, metrics)
    metrics.serve(cfg.metrics_port, _metrics_readers(cfg, kube))
    identity = IdentityServicer(
        cfg.driver_name, prefix_usable(str(layout.prefix)), controller=False
    )
    node = NodeServicer(Publisher(layout, cfg.target_root), cfg.node_id)
    return _serve(
        cfg,
        "node",
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
            lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
        ],
        started.runner,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reflinker-csi",
        description="CSI driver that clones PostgreSQL data directories with reflinks. "
        "Settings come from environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=f"reflinker-csi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("standalone", help="Identity, Controller and Node on one socket, no Kubernetes")
    sub.add_parser("controller", help="Identity and Controller for a Kubernetes cluster")
    sub.add_parser("node", help="Identity and Node on each Kubernetes node")
    snap = sub.add_parser(
        "snapshot",
        help="take one hot clone of a running CNPG instance, to test a source by hand",
        description="Connects as streaming_replica over verified TLS and takes one hot clone: "
        "by reflink_snapshot(label), or with --pgdata by the native method (pg_backup_start/stop "
        "in this session, the copy made here from the source's data directory on this host). "
        "Prints the method, the directory (for the function, as the server sees it) and the time.",
    )
    snap.add_argument("--host", required=True, help="the instance's IP address (pod IP)")
    snap.add_argument("--port", type=int, default=5432)
    snap.add_argument("--cluster", required=True, help="CNPG cluster name")
    snap.add_argument("--namespace", required=True, help="the cluster's namespace")
    snap.add_argument("--ca", required=True, type=Path, help="ca.crt of secret <cluster>-ca")
    snap.add_argument(
        "--cert", required=True, type=Path, help="tls.crt of secret <cluster>-replication"
    )
    snap.add_argument(
        "--key", required=True, type=Path, help="tls.key of secret <cluster>-replication"
    )
    snap.add_argument("--label", default="", help="a lowercase UUID (default: a new one)")
    snap.add_argument(
        "--pgdata",
        type=Path,
        help="native method: the source's data directory as this host sees it; the copy goes "
        "to .pg-reflinker/<label> beside it, on the same filesystem",
    )
    snap.add_argument("--connect-timeout", type=float, default=10.0)
    snap.add_argument("--statement-timeout", type=float, default=300.0)
    return parser


def run_snapshot(args: argparse.Namespace) -> int:
    """One hot clone, for a cluster admin testing a source by hand."""
    try:
        ca, cert, key = (p.read_bytes() for p in (args.ca, args.cert, args.key))
    except OSError as err:
        return _fail(f"cannot read {err.filename}: {err.strerror}", 2)
    server = SourceServer(
        pod_ip=args.host,
        port=args.port,
        cluster=args.cluster,
        namespace=args.namespace,
        ca_cert=ca,
        client_cert=cert,
        client_key=key,
    )
    label = args.label or new_guid()
    if args.pgdata is None:
        result = hot_clone(server, label, args.connect_timeout, args.statement_timeout)
        method, directory, seconds = "function", result.directory, result.seconds
    else:
        pgdata = Path(os.path.realpath(args.pgdata))
        area = pgdata.parent / STATE_DIR_NAME
        area.mkdir(mode=0o700, exist_ok=True)
        began = time.monotonic()
        copier = LocalCopier(pgdata, area / require_guid(label, "--label"))
        native_hot_clone(server, label, copier, args.connect_timeout, args.statement_timeout)
        method, directory, seconds = "native", str(area / label), time.monotonic() - began
    print(f"method     {method}")
    print(f"label      {label}")
    print(f"directory  {directory}")
    print(f"time       {seconds:.3f} seconds")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "snapshot":
        logs.setup("warning", "text")
        try:
            return run_snapshot(args)
        except ReflinkerError as err:
            return _fail(str(err), 1)
    try:
        cfg = config.load(mode=args.command)
    except config.ConfigError as err:
        return _fail(f"configuration error: {err}", 2)
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        run = {"standalone": run_standalone, "controller": run_controller, "node": run_node}
        return run[args.command](cfg)
    except (EndpointInUse, ReflinkerError) as err:
        return _fail(str(err), 1)


if __name__ == "__main__":
    sys.exit(main())
