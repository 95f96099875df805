"""CSI Identity service."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from google.protobuf import wrappers_pb2

from csi import csi_pb2, csi_pb2_grpc

from .. import __version__

_Service = csi_pb2.PluginCapability.Service


class IdentityServicer(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    def __init__(self, driver_name: str, ready: Callable[[], bool], controller: bool) -> None:
        self._name = driver_name
        self._ready = ready
        self._controller = controller

    def GetPluginInfo(self, request: Any, context: Any) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._name, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        types = [_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
        if self._controller:
            types.insert(0, _Service.CONTROLLER_SERVICE)
        return csi_pb2.GetPluginCapabilitiesResponse(
            capabilities=[csi_pb2.PluginCapability(service=_Service(type=t)) for t in types]
        )

    def Probe(self, request: Any, context: Any) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._ready()))


def prefix_usable(prefix: str) -> Callable[[], bool]:
    """A readiness check: the prefix is a writable directory on a read-write filesystem."""

    def ready() -> bool:
        try:
            st = os.statvfs(prefix)
        except OSError:
            return False
        if st.f_flag & os.ST_RDONLY:
            return False
        return os.path.isdir(prefix) and os.access(prefix, os.W_OK | os.X_OK)

    return ready
