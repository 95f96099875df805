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
from types import FrameType

from csi import csi_pb2_grpc

from . import __version__, config, logs
from .controller import ControllerServicer
from .errors import ReflinkerError
from .identity import IdentityServicer, prefix_usable
from .layout import Layout
from .locator import LocalSourceLocator
from .node import NodeServicer
from .publish import Publisher
from .registry import FileRegistry
from .server import EndpointInUse, start_server
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
    volumes = VolumeService(layout, registry, LocalSourceLocator(layout), cfg.node_id)
    volumes.recover()
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
