"""Standalone: the controller does the disk work itself, on this host."""

from __future__ import annotations

from ..core.errors import FailedPrecondition
from ..core.placement import Placement
from ..core.records import Phase, VolumeRecord
from ..core.volumes import Origin
from ..disk.local import LocalDisk
from .registry import FileRegistry


class LocalMaterializer:
    def __init__(self, disk: LocalDisk, registry: FileRegistry, node_id: str) -> None:
        self.disk = disk
        self.registry = registry
        self.node_id = node_id

    def placement(self, required_bytes: int, claim: str) -> Placement:
        # Volumes are directories without a size limit: the one node takes any size.
        return Placement([self.node_id])

    def materialize(
        self, record: VolumeRecord, origin: Origin | None, timeout: float
    ) -> VolumeRecord:
        if not self.disk.data_dir(record).is_dir():
            self.disk.check_room(self.node_id)
        if origin is None:
            self.disk.make_empty(record)
        elif origin.record is not None:
            self.disk.reflink_copy(origin.record, record)
        else:
            raise FailedPrecondition(
                f"volume {record.guid}: standalone mode copies only its own volumes and snapshots"
            )
        ready = record.with_phase(Phase.READY)
        self.registry.update(ready)
        return ready

    def free_bytes(self, node: str | None) -> int:
        if node is not None and node != self.node_id:
            return 0
        free, floor, _ = self.disk.space()
        return max(0, free - floor)

    def publishers(self, record: VolumeRecord) -> list[str]:
        return self.disk.publishers(record)

    def dematerialize(self, record: VolumeRecord) -> None:
        if record.phase != Phase.DELETING:
            self.registry.update(record.with_phase(Phase.DELETING))
        self.disk.remove(record)
        self.registry.remove(record.guid)

    def recover(self) -> None:
        self.disk.sweep()
        for record in self.registry.list():
            if record.phase == Phase.DELETING:
                self.dematerialize(record)
