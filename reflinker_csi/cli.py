"""The reflinker-csi command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import grpc

from csi import csi_pb2_grpc

from . import __version__, config, kube, logs
from .claim_loop import ClaimLoop, Lease
from .controller import ControllerServicer
from .errors import ReflinkerError
from .identity import IdentityServicer, prefix_usable
from .kube import KubeRegistry
from .kube_controller import KubeMaterializer, PvAnnotator
from .kube_locator import KubeSourceLocator
from .layout import Layout, new_guid
from .local import LocalDisk, LocalMaterializer
from .locator import LocalSourceLocator
from .node import NodeServicer
from .node_agent import NodeAgent
from .publish import Publisher
from .registry import FileRegistry
from .server import EndpointInUse, start_server
from .source import SourceServer, hot_clone
from .volumes import VolumeService

log = logging.getLogger("reflinker_csi")


def _fail(message: str, code: int) -> int:
    print(f"reflinker-csi: {message}", file=sys.stderr)
    return code


def _serve(
    cfg: config.Config,
    mode: str,
    register: list[Callable[[grpc.Server], None]],
    background: Sequence[Callable[[threading.Event], None]] = (),
) -> int:
    """Serve until SIGTERM/SIGINT; background loops get a stop event."""
    server = start_server(cfg.endpoint, cfg.grpc_workers, register)
    stop = threading.Event()
    threads = [
        threading.Thread(target=loop, args=(stop,), daemon=True, name=loop.__qualname__)
        for loop in background
    ]
    for thread in threads:
        thread.start()
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
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info(
            "stopping",
            extra={
                "fields": {
                    "signal": signal.Signals(signum).name,
                    "grace_s": cfg.shutdown_grace_seconds,
                }
            },
        )
        stop.set()
        server.stop(cfg.shutdown_grace_seconds).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopped.wait(1.0):
        pass
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cfg.endpoint)
    log.info("stopped")
    return 0


def run_standalone(cfg: config.Config) -> int:
    """Identity + Controller + Node on one socket, state in a file registry under the prefix."""
    layout = Layout(cfg.hostpath_prefix)
    layout.state_dir.mkdir(mode=0o700, exist_ok=True)
    registry = FileRegistry(layout.state_dir)
    materializer = LocalMaterializer(LocalDisk(layout), registry, cfg.node_id)
    materializer.recover()
    volumes = VolumeService(layout, registry, LocalSourceLocator(layout), cfg.node_id, materializer)
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


def run_controller(cfg: config.Config) -> int:
    """Kubernetes: Identity + Controller beside csi-provisioner; records are ReflinkVolumes."""
    api = kube.connect()
    layout = Layout(cfg.hostpath_prefix)
    registry = KubeRegistry(api)
    materializer = KubeMaterializer(
        api,
        registry,
        layout,
        cfg.driver_name,
        cfg.pg_connect_timeout_seconds,
        cfg.pg_statement_timeout_seconds,
    )
    locator = KubeSourceLocator(api, layout, cfg.driver_name)
    volumes = VolumeService(layout, registry, locator, cfg.node_id, materializer)
    identity = IdentityServicer(cfg.driver_name, lambda: True, controller=True)
    controller = ControllerServicer(volumes, snapshots=False)
    annotator = PvAnnotator(api, cfg.driver_name)
    claims = ClaimLoop(
        api,
        registry,
        locator,
        materializer,
        layout,
        cfg.driver_name,
        cfg.storage_class,
        cfg.namespace_path,
        Lease(api, cfg.pod_namespace, "pg-reflinker-claim-loop"),
        cfg.target_root,
    )
    return _serve(
        cfg,
        "controller",
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
        ],
        [annotator.run, claims.run],
    )


def run_node(cfg: config.Config) -> int:
    """Kubernetes: Identity + Node on each node, and the node agent for its ReflinkVolumes."""
    api = kube.connect()
    layout = Layout(cfg.hostpath_prefix)
    layout.state_dir.mkdir(mode=0o700, exist_ok=True)
    agent = NodeAgent(KubeRegistry(api), LocalDisk(layout, (cfg.target_root,)), cfg.node_id)
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
        [agent.run],
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
        help="take one hot clone of a running CNPG instance through reflink_snapshot()",
        description="Connects as streaming_replica over verified TLS, calls "
        "reflink_snapshot(label) and prints the directory (as the server sees it) and the time.",
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
    result = hot_clone(server, label, args.connect_timeout, args.statement_timeout)
    print(f"label      {label}")
    print(f"directory  {result.directory}")
    print(f"time       {result.seconds:.3f} seconds")
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
        cfg = config.load()
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
