"""Standalone records: one JSON file per volume under <prefix>/.pg-reflinker/volumes, written
atomically (tmp + fsync + rename) and indexed in memory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from pathlib import Path

from ..core.errors import FailedPrecondition
from ..core.layout import is_guid
from ..core.records import Kind, VolumeRecord


def _name_key(record: VolumeRecord) -> str:
    # Volumes and snapshots have separate name spaces in CSI.
    return f"{record.kind}/{record.name}"


class FileRegistry:
    """The standalone Registry.

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

    def get_by_name(self, name: str, kind: Kind = Kind.VOLUME) -> VolumeRecord | None:
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
