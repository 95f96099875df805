"""The volume record: one per volume or snapshot, written before any directory, so whatever a
crash leaves behind is either nothing or a record the next call completes or cleans.

Standalone mode keeps records as JSON files (standalone/registry.py); Kubernetes mode as
ReflinkVolume resources (kube/registry.py). Both store this one type."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class Kind(StrEnum):
    VOLUME = "volume"
    SNAPSHOT = "snapshot"
    # One consistent copy of a whole running CNPG instance (PGDATA with its WAL, every
    # tablespace), from which the volumes and snapshots of one group are cut (core/capture.py).
    CAPTURE = "capture"


class Phase(StrEnum):
    """Pending -> Ready, or Pending -> Failed -> (retry) Pending; Deleting once removal began."""

    PENDING = "Pending"
    READY = "Ready"
    FAILED = "Failed"
    DELETING = "Deleting"


# Records written by earlier versions named their states in lowercase.
_OLD_PHASES = {"creating": Phase.PENDING, "ready": Phase.READY, "deleting": Phase.DELETING}


class CloneMode(StrEnum):
    NONE = ""  # an empty volume
    HOT = "hot"  # the source's PostgreSQL server makes a consistent copy
    COLD = "cold"  # the node reflinks the files of a source nothing is using


class CloneMethod(StrEnum):
    """How a hot clone is taken (StorageClass parameter cloneMethod; auto picks one)."""

    AUTO = "auto"  # the function when the source has it, native otherwise
    FUNCTION = "function"  # reflink_snapshot(label) in the source server
    NATIVE = "native"  # pg_backup_start/stop by the controller, the copy by the node plugin


class Step(StrEnum):
    """A native hot clone's hand-off: what the controller asks of the node agent."""

    COPY = "Copy"  # the source is in backup mode: reflink its data directory
    FINISH = "Finish"  # the backup stopped: write backup_label, copy the WAL
    COMPLETE = "Complete"  # the WAL was protected to the end: put the copy in place


@dataclass(frozen=True)
class HandOff:
    """One attempt of a native hot clone, as the controller wrote it on the record; `done` is
    the last step the node agent finished for this attempt."""

    attempt: str
    step: Step
    source_dir: str  # the source's data directory on the node
    # The server pod's other volumes: mount path in the pod -> path on the node (a pg_wal that
    # links to a WAL volume is found through them).
    volumes: dict[str, str]
    system_id: str
    start_lsn: str
    segment_bytes: int
    stop_lsn: str = ""
    label_file: str = ""
    map_file: str = ""
    done: Step | None = None


@dataclass(frozen=True)
class VolumeRecord:
    guid: str
    name: str
    node: str
    required_bytes: int
    limit_bytes: int
    parameters: dict[str, str] = field(default_factory=dict)
    source_volume_id: str = ""
    source_snapshot_id: str = ""
    kind: Kind = Kind.VOLUME
    clone_mode: CloneMode = CloneMode.NONE
    # Kubernetes mode: where the hot clone's <label> directory is on the node, before the move.
    hot_clone_dir: str = ""
    # A hot clone: how it was taken (function or native), and a native one's hand-off.
    clone_method: str = ""
    hand_off: HandOff | None = None
    # A piece of a capture: the capture's GUID, set once the capture is Ready (the piece is
    # named in context, CTX_PIECE).
    capture: str = ""
    phase: Phase = Phase.PENDING
    # When Failed: the CSI status code by name and the message for the caller.
    code: str = ""
    message: str = ""
    context: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    @property
    def capacity_bytes(self) -> int:
        return self.required_bytes or self.limit_bytes

    @property
    def source_id(self) -> str:
        return self.source_volume_id or self.source_snapshot_id

    @property
    def method(self) -> str:
        """How it is made, as metrics name it: snapshot, capture, hot, cold or empty."""
        if self.kind in (Kind.SNAPSHOT, Kind.CAPTURE):
            return str(self.kind)
        return str(self.clone_mode or "empty")

    def with_phase(self, phase: Phase, code: str = "", message: str = "") -> VolumeRecord:
        return dataclasses.replace(self, phase=phase, code=code, message=message)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        phase = data.get("phase", data.get("state", Phase.PENDING))
        values["phase"] = _OLD_PHASES.get(phase) or Phase(phase)
        values["kind"] = Kind(values.get("kind", Kind.VOLUME))
        values["clone_mode"] = CloneMode(values.get("clone_mode", CloneMode.NONE))
        values["hand_off"] = None  # only Kubernetes mode hands off, and keeps it on its records
        return cls(**values)


class Registry(Protocol):
    def reserve(self, record: VolumeRecord) -> tuple[VolumeRecord, bool]:
        """Store record unless its name is taken; return (the stored record, created?)."""

    def get(self, guid: str) -> VolumeRecord | None: ...

    def get_by_name(self, name: str, kind: Kind = Kind.VOLUME) -> VolumeRecord | None: ...

    def list(self) -> list[VolumeRecord]: ...

    def remove(self, guid: str) -> None: ...
