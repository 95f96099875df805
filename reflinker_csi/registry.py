"""Durable volume records. Standalone mode keeps them as JSON files under the prefix.

The record is written before any directory, so whatever a crash leaves behind is either nothing
or a record the next call completes or cleans.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import FailedPrecondition
from .layout import is_guid

VOLUME = "volume"
SNAPSHOT = "snapshot"

CREATING = "creating"
READY = "ready"
DELETING = "deleting"


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
    kind: str = VOLUME
    # "hot": the source's PostgreSQL server makes the copy; "cold": the node copies the files.
    clone_mode: str = ""
    # Kubernetes mode: where the hot clone's <label> directory is on the node, before the move.
    hot_clone_dir: str = ""
    state: str = CREATING
    context: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    @property
    def capacity_bytes(self) -> int:
        return self.required_bytes or self.limit_bytes

    def with_state(self, state: str) -> VolumeRecord:
        return dataclasses.replace(self, state=state)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _name_key(record: VolumeRecord) -> str:
    # Volumes and snapshots have separate name spaces in CSI.
    return f"{record.kind}/{record.name}"


class Registry(Protocol):
    def reserve(self, record: VolumeRecord) -> tuple[VolumeRecord, bool]:
        """Store record unless its name is taken; return (the stored record, created?)."""

    def get(self, guid: str) -> VolumeRecord | None: ...

    def get_by_name(self, name: str, kind: str = VOLUME) -> VolumeRecord | None: ...

    def list(self) -> list[VolumeRecord]: ...

    def update(self, record: VolumeRecord) -> None: ...

    def remove(self, guid: str) -> None: ...


class FileRegistry:
    """One JSON file per volume in <prefix>/.pg-reflinker/volumes, indexed in memory.

    An exclusive lock on <prefix>/.pg-reflinker/lock makes this process the only writer.
    """

    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir / "volumes"
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise FailedPrecondition(
                f"another reflinker-csi process holds {state_dir}/lock; "
                "stop it before starting a second one on the same HOSTPATH_PREFIX"
            ) from None
        self._mutex = threading.Lock()
        self._by_guid: dict[str, VolumeRecord] = {}
        self._by_name: dict[str, str] = {}
        for path in self._dir.iterdir():
            if path.suffix == ".tmp":
                path.unlink()
                continue
            if path.suffix != ".json" or not is_guid(path.stem):
                continue
            record = VolumeRecord.from_json(json.loads(path.read_text()))
            self._by_guid[record.guid] = record
            self._by_name[_name_key(record)] = record.guid

    def close(self) -> None:
        os.close(self._lock_fd)

    def _write(self, record: VolumeRecord) -> None:
        final = self._dir / f"{record.guid}.json"
        tmp = self._dir / f"{record.guid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(record.to_json(), sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def reserve(self, record: VolumeRecord) -> tuple[VolumeRecord, bool]:
        with self._mutex:
            existing = self._by_name.get(_name_key(record))
            if existing is not None:
                return self._by_guid[existing], False
            self._write(record)
            self._by_guid[record.guid] = record
            self._by_name[_name_key(record)] = record.guid
            return record, True

    def get(self, guid: str) -> VolumeRecord | None:
        with self._mutex:
            return self._by_guid.get(guid)

    def get_by_name(self, name: str, kind: str = VOLUME) -> VolumeRecord | None:
        with self._mutex:
            guid = self._by_name.get(f"{kind}/{name}")
            return None if guid is None else self._by_guid[guid]

    def list(self) -> list[VolumeRecord]:
        with self._mutex:
            return sorted(self._by_guid.values(), key=lambda r: r.guid)

    def update(self, record: VolumeRecord) -> None:
        with self._mutex:
            self._write(record)
            self._by_guid[record.guid] = record

    def remove(self, guid: str) -> None:
        with self._mutex:
            record = self._by_guid.pop(guid, None)
            if record is not None:
                self._by_name.pop(_name_key(record), None)
            with contextlib.suppress(FileNotFoundError):
                (self._dir / f"{guid}.json").unlink()
