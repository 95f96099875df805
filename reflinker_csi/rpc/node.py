"""CSI Node service: checks arguments, calls Publisher, builds the reply."""

from __future__ import annotations

from typing import Any

from csi import csi_pb2, csi_pb2_grpc

from ..core.errors import InvalidArgument
from ..disk.publish import Publisher
from .capabilities import is_read_only_mode, unsupported_reason
from .controller import topology

_RPC = csi_pb2.NodeServiceCapability.RPC
# VOLUME_MOUNT_GROUP: kubelet hands the pod's fsGroup to NodePublishVolume instead of walking
# the volume's tree itself (a recursive chown/chmod of a cloned PGDATA at every mount).
CAPABILITIES = (
    _RPC.GET_VOLUME_STATS,
    _RPC.VOLUME_CONDITION,
    _RPC.SINGLE_NODE_MULTI_WRITER,
    _RPC.VOLUME_MOUNT_GROUP,
)


class NodeServicer(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(self, publisher: Publisher, node_id: str) -> None:
        self._publisher = publisher
        self._node_id = node_id

    def NodePublishVolume(self, request: Any, context: Any) -> csi_pb2.NodePublishVolumeResponse:
        for field in ("volume_id", "target_path"):
            if not getattr(request, field):
                raise InvalidArgument(f"{field} is required")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        cap = request.volume_capability
        reason = unsupported_reason(cap)
        if reason:
            raise InvalidArgument(reason)
        self._publisher.publish(
            request.volume_id,
            request.target_path,
            readonly=request.readonly or is_read_only_mode(cap),
            options=list(cap.mount.mount_flags),
            mount_group=cap.mount.volume_mount_group,
        )
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: Any, context: Any
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        self._publisher.unpublish(request.volume_id, request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(self, request: Any, context: Any) -> csi_pb2.NodeGetVolumeStatsResponse:
        s = self._publisher.stats(request.volume_id, request.volume_path)
        usage = csi_pb2.VolumeUsage
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=[
                usage(
                    unit=usage.BYTES,
                    total=s.bytes_total,
                    available=s.bytes_available,
                    used=s.bytes_used,
                ),
                usage(
                    unit=usage.INODES,
                    total=s.inodes_total,
                    available=s.inodes_available,
                    used=s.inodes_used,
                ),
            ],
            volume_condition=csi_pb2.VolumeCondition(abnormal=s.abnormal, message=s.message),
        )

    def NodeGetCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=_RPC(type=t)) for t in CAPABILITIES]
        )

    def NodeGetInfo(self, request: Any, context: Any) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._node_id,
            max_volumes_per_node=0,
            accessible_topology=topology(self._node_id),
        )
