"""Where a source volume lives and whether a PostgreSQL server is using it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .layout import Layout
from .mounts import mounts_of
from .registry import VolumeRecord
from .source import SourceServer


@dataclass(frozen=True)
class SourceLocation:
    node: str
    host_path: Path
    # What uses the source now (pods, or mount points), for messages.
    in_use_at: tuple[str, ...] = ()
    # The PostgreSQL server using the source, when it is a CNPG instance: clone it hot.
    server: SourceServer | None = None
    # Where that server's pod mounts the source volume (maps paths the server returns).
    mount_path: str = ""
    pod_uid: str = ""
    # Traceability for the clone's volume_context (source claim, pod).
    context: dict[str, str] = field(default_factory=dict)


class SourceLocator(Protocol):
    def locate(self, source: VolumeRecord) -> SourceLocation: ...


class LocalSourceLocator:
    """Standalone: every volume is on this host; it is in use while anything mounts it."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def locate(self, source: VolumeRecord) -> SourceLocation:
        path = self._layout.volume_dir(source.guid)
        users = tuple(m.mount_point for m in mounts_of(path)) if path.exists() else ()
        return SourceLocation(node=source.node, host_path=path, in_use_at=users)
