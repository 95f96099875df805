"""The gRPC server: a unix socket, one interceptor that logs every RPC and maps errors."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from ..core import errors

log = logging.getLogger("reflinker_csi.rpc")

# Request fields that identify what an RPC is about; only these are logged (never secrets).
_SUBJECT_FIELDS = ("volume_id", "name", "target_path", "volume_path")


def status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed RPC returns."""
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, f"{method} is not offered by pg-reflinker"
    known = errors.classify(exc)
    if known is not None and known.code != "INTERNAL":
        # Each domain error family names its CSI code (core/errors.py): the one mapping.
        return grpc.StatusCode[known.code], str(known)
    return grpc.StatusCode.INTERNAL, (
        f"internal error in {method} ({type(exc).__name__}: {exc}); "
        "this is a bug in pg-reflinker, the driver log has the traceback"
    )


def _subject(request: Any) -> dict[str, str]:
    fields = {}
    names = request.DESCRIPTOR.fields_by_name
    for name in _SUBJECT_FIELDS:
        if name in names and getattr(request, name):
            fields[name] = str(getattr(request, name))[:200]
    if "volume_content_source" in names and request.HasField("volume_content_source"):
        src = request.volume_content_source
        fields["source"] = src.volume.volume_id or src.snapshot.snapshot_id
    return fields


class RpcInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Logs each RPC once (method, subject, duration, code) and turns exceptions into statuses."""

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            fields = {"method": method, **_subject(request)}
            try:
                response = inner(request, context)
            except Exception as exc:  # every failure leaves through the mapping below
                code, message = status_of(exc, method)
                fields.update(
                    code=code.name, ms=round((time.monotonic() - start) * 1000, 1), error=message
                )
                if code == grpc.StatusCode.INTERNAL:
                    log.error("rpc failed", exc_info=exc, extra={"fields": fields})
                else:
                    log.info("rpc", extra={"fields": fields})
                context.abort(code, message)
            fields.update(code="OK", ms=round((time.monotonic() - start) * 1000, 1))
            log.info("rpc", extra={"fields": fields})
            return response

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class EndpointInUse(Exception):
    pass


def _prepare_socket(path: Path) -> None:
    """Remove a stale socket; refuse when a live server answers on it or it is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointInUse(f"{path} exists and is not a socket; remove it or choose CSI_ENDPOINT")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise EndpointInUse(f"another server is listening on {path}; stop it first")


def start_server(
    endpoint: Path, workers: int, register: list[Callable[[grpc.Server], None]]
) -> grpc.Server:
    """Start serving on a unix socket with mode 0660."""
    _prepare_socket(endpoint)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=[RpcInterceptor()],
    )
    for add in register:
        add(server)
    old_umask = os.umask(0o117)
    try:
        server.add_insecure_port(f"unix://{endpoint}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(endpoint, 0o660)
    return server
