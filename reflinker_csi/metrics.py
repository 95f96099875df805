"""Prometheus metrics of the controller and the node plugin, served on METRICS_PORT at
/metrics. Names start with pg_reflinker_; docs/space.md lists them. In Kubernetes the endpoint
answers only a bearer token the API server authenticates and authorizes for GET /metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.made = Counter(
            "pg_reflinker_volumes_made",
            "Volumes and snapshots made, by method (hot, cold, empty, snapshot, capture) and "
            "result (OK or the CSI code of the failure)",
            ["method", "result"],
            registry=r,
        )
        self.seconds = Histogram(
            "pg_reflinker_volume_make_seconds",
            "Time to make a volume that succeeded: on the controller the whole CreateVolume "
            "attempt (a hot clone included), on the node the disk work",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "pg_reflinker_reconcile_errors",
            "Reconcile attempts that failed and were retried, by loop",
            ["loop"],
            registry=r,
        )
        self.volumes = Gauge(
            "pg_reflinker_volumes", "Volumes and snapshots on this node", ["node"], registry=r
        )
        # A volume by its claim (or a snapshot by its VolumeSnapshot), as an admin knows it.
        owner = ["namespace", "persistentvolumeclaim", "volumesnapshot", "node"]
        self.used = Gauge(
            "pg_reflinker_volume_used_bytes",
            "Bytes allocated to a volume's files, shared or not",
            owner,
            registry=r,
        )
        self.own = Gauge(
            "pg_reflinker_volume_own_bytes",
            "Bytes of a volume shared with no other file: what it really costs",
            owner,
            registry=r,
        )
        self.free = Gauge(
            "pg_reflinker_filesystem_free_bytes",
            "Free bytes under HOSTPATH_PREFIX",
            ["node"],
            registry=r,
        )
        self.free_inodes = Gauge(
            "pg_reflinker_filesystem_free_inodes",
            "Free inodes under HOSTPATH_PREFIX",
            ["node"],
            registry=r,
        )
        self.floor = Gauge(
            "pg_reflinker_free_space_floor_bytes",
            "FREE_SPACE_FLOOR in bytes: below it no new volume is made on the node",
            ["node"],
            registry=r,
        )
        # Read at each hot copy, in the copy's own session; NaN while the lag is unknown (a
        # standby whose stream from production is down).
        self.source_lag = Gauge(
            "pg_reflinker_source_lag_seconds",
            "How far behind production a hot copy's source instance was at its last copy (0 "
            "for a primary; NaN: a standby without a WAL stream)",
            ["namespace", "cluster", "pod"],
            registry=r,
        )
        self.scan_seconds = Gauge(
            "pg_reflinker_usage_scan_seconds",
            "How long the last measurement of every volume's used and own bytes took",
            ["node"],
            registry=r,
        )

    # -- the domain's Recorder --------------------------------------------------------------

    def volume_made(self, method: str, result: str, seconds: float) -> None:
        self.made.labels(method, result).inc()
        if result == "OK":
            self.seconds.labels(method).observe(seconds)

    def source_read(self, namespace: str, cluster: str, pod: str, lag: float | None) -> None:
        self.source_lag.labels(namespace, cluster, pod).set(float("nan") if lag is None else lag)

    def reconcile_error(self, loop: str) -> None:
        self.reconcile_errors.labels(loop).inc()

    def serve(
        self, port: int, authorize: Callable[[str], bool] | None = None
    ) -> threading.Thread | None:
        """Serve /metrics on port (all addresses); None when port is 0. authorize: whether a
        bearer token may read them (None: anyone may)."""
        if not port:
            return None
        app = make_wsgi_app(self.registry)
        if authorize is not None:
            app = _bearer_only(app, authorize)
        server = make_server("", port, app, ThreadingWSGIServer, handler_class=_Quiet)
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        log.info(
            "metrics",
            extra={"fields": {"port": port, "path": "/metrics", "auth": authorize is not None}},
        )
        return thread


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


_App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _bearer_only(app: _App, authorize: Callable[[str], bool]) -> _App:
    """401 without a bearer token, 403 for one that may not read /metrics."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, token = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
            )
            return [b"a bearer token that may get /metrics is needed\n"]
        if not authorize(token.strip()):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"this token may not get /metrics\n"]
        return app(environ, start_response)

    return guarded
