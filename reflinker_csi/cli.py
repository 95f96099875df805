"""The reflinker-csi command."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from csi import csi_pb2_grpc

from . import __version__, config, logs
from .controller import ControllerServicer
from .errors import ReflinkerError
from .identity import IdentityServicer, prefix_usable
from .layout import Layout, new_guid
from .local import LocalDisk, LocalMaterializer
from .locator import LocalSourceLocator
from .node import NodeServicer
from .publish import Publisher
from .registry import FileRegistry
from .server import EndpointInUse, start_server
from .source import SourceServer, hot_clone
from .volumes import VolumeService

log = logging.getLogger("reflinker_csi")


def _fail(message: str, code: int) -> int:
    print(f"reflinker-csi: {message}", file=sys.stderr)
    return code


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
    server = start_server(
        cfg.endpoint,
        cfg.grpc_workers,
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
            lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
        ],
    )
    log.info(
        "serving",
        extra={
            "fields": {
                "mode": "standalone",
                "endpoint": str(cfg.endpoint),
                "node": cfg.node_id,
                "prefix": str(layout.prefix),
                "version": __version__,
            }
        },
    )
    stopped = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info(
            "stopping",
            extra={
                "fields": {
                    "signal": signal.Signals(signum).name,
                    "grace_s": cfg.shutdown_grace_seconds,
                }
            },
        )
        server.stop(cfg.shutdown_grace_seconds).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopped.wait(1.0):
        pass
    registry.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cfg.endpoint)
    log.info("stopped")
    return 0


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
        if args.command == "standalone":
            return run_standalone(cfg)
        return _fail(
            f"'{args.command}' is the Kubernetes mode, which this version does not provide yet; "
            "run 'reflinker-csi standalone' on a single host",
            2,
        )
    except (EndpointInUse, ReflinkerError) as err:
        return _fail(str(err), 1)


if __name__ == "__main__":
    sys.exit(main())
