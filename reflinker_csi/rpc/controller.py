"""CSI Controller service: checks arguments, calls VolumeService, builds the reply."""

from __future__ import annotations

from typing import Any

from csi import csi_pb2, csi_pb2_grpc

from .. import TOPOLOGY_KEY
from ..core.errors import InvalidArgument
from ..core.records import VolumeRecord
from ..core.volumes import CreateSpec, VolumeService
from .capabilities import require_supported, unsupported_reason

_RPC = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (
    _RPC.CREATE_DELETE_VOLUME,
    _RPC.CLONE_VOLUME,
    _RPC.CREATE_DELETE_SNAPSHOT,
    _RPC.LIST_SNAPSHOTS,
    _RPC.LIST_VOLUMES,
    _RPC.GET_CAPACITY,
    _RPC.SINGLE_NODE_MULTI_WRITER,
)


def topology(node: str) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={TOPOLOGY_KEY: node})


class ControllerServicer(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(self, volumes: VolumeService) -> None:
        self._volumes = volumes
        self._capabilities = list(CAPABILITIES)

    def _volume(self, record: VolumeRecord) -> csi_pb2.Volume:
        volume = csi_pb2.Volume(
            capacity_bytes=record.capacity_bytes,
            volume_id=record.guid,
            volume_context=self._volumes.context(record),
            accessible_topology=[topology(record.node)],
        )
        if record.source_volume_id:
            volume.content_source.volume.volume_id = record.source_volume_id
        elif record.source_snapshot_id:
            volume.content_source.snapshot.snapshot_id = record.source_snapshot_id
        return volume

    @staticmethod
    def _snapshot(record: VolumeRecord) -> csi_pb2.Snapshot:
        snapshot = csi_pb2.Snapshot(
            size_bytes=record.capacity_bytes,
            snapshot_id=record.guid,
            source_volume_id=record.source_volume_id,
            ready_to_use=True,
        )
        snapshot.creation_time.FromNanoseconds(int(record.created_at * 1e9))
        return snapshot

    def CreateVolume(self, request: Any, context: Any) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        require_supported(request.volume_capabilities, "volume_capabilities")
        source_volume = source_snapshot = ""
        if request.HasField("volume_content_source"):
            content = request.volume_content_source
            if content.WhichOneof("type") == "snapshot":
                source_snapshot = content.snapshot.snapshot_id
                if not source_snapshot:
                    raise InvalidArgument("volume_content_source.snapshot.snapshot_id is required")
            else:
                source_volume = content.volume.volume_id
                if not source_volume:
                    raise InvalidArgument("volume_content_source.volume.volume_id is required")
        req = request.accessibility_requirements
        spec = CreateSpec(
            name=request.name,
            required_bytes=request.capacity_range.required_bytes,
            limit_bytes=request.capacity_range.limit_bytes,
            parameters=dict(request.parameters),
            source_volume_id=source_volume,
            source_snapshot_id=source_snapshot,
            preferred=[dict(t.segments) for t in req.preferred],
            requisite=[dict(t.segments) for t in req.requisite],
        )
        remaining = context.time_remaining() if context is not None else None
        timeout = 60.0 if remaining is None else remaining
        return csi_pb2.CreateVolumeResponse(
            volume=self._volume(self._volumes.create(spec, timeout))
        )

    def DeleteVolume(self, request: Any, context: Any) -> csi_pb2.DeleteVolumeResponse:
        self._volumes.delete(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        record = self._volumes.get(request.volume_id)
        for cap in request.volume_capabilities:
            reason = unsupported_reason(cap)
            if reason:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        if request.parameters and dict(request.parameters) != record.parameters:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(
                message="parameters differ from those the volume was created with"
            )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    def ListVolumes(self, request: Any, context: Any) -> csi_pb2.ListVolumesResponse:
        records, next_token = self._volumes.list_volumes(
            request.max_entries, request.starting_token
        )
        return csi_pb2.ListVolumesResponse(
            entries=[csi_pb2.ListVolumesResponse.Entry(volume=self._volume(r)) for r in records],
            next_token=next_token,
        )

    def GetCapacity(self, request: Any, context: Any) -> csi_pb2.GetCapacityResponse:
        if any(unsupported_reason(cap) for cap in request.volume_capabilities):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        node = request.accessible_topology.segments.get(TOPOLOGY_KEY)
        return csi_pb2.GetCapacityResponse(available_capacity=self._volumes.free_bytes(node))

    def ControllerGetCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.ControllerServiceCapability(rpc=_RPC(type=t)) for t in self._capabilities
            ]
        )

    def CreateSnapshot(self, request: Any, context: Any) -> csi_pb2.CreateSnapshotResponse:
        remaining = context.time_remaining() if context is not None else None
        record = self._volumes.create_snapshot(
            request.name,
            request.source_volume_id,
            dict(request.parameters),
            60.0 if remaining is None else remaining,
        )
        return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot(record))

    def DeleteSnapshot(self, request: Any, context: Any) -> csi_pb2.DeleteSnapshotResponse:
        self._volumes.delete_snapshot(request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: Any, context: Any) -> csi_pb2.ListSnapshotsResponse:
        records, next_token = self._volumes.list_snapshots(
            request.max_entries,
            request.starting_token,
            request.snapshot_id,
            request.source_volume_id,
        )
        return csi_pb2.ListSnapshotsResponse(
            entries=[
                csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot(r)) for r in records
            ],
            next_token=next_token,
        )
